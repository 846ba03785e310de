"""``torch.optim.Optimizer``'s wrapper of ``step()``, with the profiler label only while a profiler runs.

Every optimizer's ``step`` is wrapped by torch (``Optimizer.profile_hook_step``): it runs the step pre- and post-
hooks (``register_step_pre_hook`` and the global ones) and labels the step with ``record_function``. The label
costs ~12 µs of host time per step even with no profiler running (CPU, torch 2.13: entering and leaving it),
the entry before the kernel launch. This wrapper does the same, labelling only while the autograd profiler is
on (``torch.profiler`` turns it on); torch leaves a step marked ``hooked`` unwrapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch.optim import optimizer as torch_optimizer


def with_step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` with the optimizer's step hooks around it, as torch's wrapper calls them."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if type(self).step is not wrapper:  # a subclass's own step(), which torch wrapped, ran the hooks already
            return step(*args, **kwargs)
        if torch.compiler.is_compiling() or not torch._C._autograd._profiler_enabled():
            return _hooked(step, self, args, kwargs)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            return _hooked(step, self, args, kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]  # torch's _patch_step_function then leaves it alone
    return wrapper


def _hooked(step: Callable[..., Any], self: Any, args: tuple, kwargs: dict) -> Any:
    for pre_hook in chain(torch_optimizer._global_optimizer_pre_hooks.values(),
                          self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(),
                           torch_optimizer._global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out
