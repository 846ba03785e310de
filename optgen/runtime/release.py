"""Gradient release: step each parameter as soon as its gradient is complete, then free the gradient.

With release attached, gradients are never all alive at once (FlashOptim's "5 bytes per parameter" for
AdamW with bf16 weights), at the cost of one optimizer launch per parameter instead of one per group.
What cannot work this way is refused: closures, and (documented, not detectable) global gradient clipping
or gradient accumulation over micro-batches, since each gradient is consumed by the time backward ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from optgen.runtime.optimizer import OptgenOptimizer


class GradientRelease:
    """The handle returned by ``attach_gradient_release``; ``remove()`` restores the normal step."""

    def __init__(self, optimizer: OptgenOptimizer) -> None:
        self.optimizer = optimizer
        self._handles: list[Any] = []
        for index in range(len(optimizer.param_groups)):
            self.hook_group(index)

    def hook_group(self, index: int) -> None:
        """Hook every parameter of param group ``index`` (``add_param_group`` calls this for a group added while
        release is attached: its parameters would otherwise keep their gradients and never be stepped)."""
        first_id = sum(len(group["params"]) for group in self.optimizer.param_groups[:index])
        for k, p in enumerate(self.optimizer.param_groups[index]["params"]):
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(index, first_id + k)))

    def _hook(self, index: int, param_id: int):
        """The hook of one parameter of group ``index``; ``param_id`` is its stable id, as in a plain ``step()``.
        It takes the group when it runs: ``load_state_dict`` replaces the group dicts (an LR scheduler then sets
        the new ones)."""
        def step_and_free(p: torch.Tensor) -> None:
            with torch.no_grad():
                group = self.optimizer.param_groups[index]
                self.optimizer._step_group(group, *self.optimizer._params_with_grad({"params": [p]}, param_id))
            p.grad = None
        return step_and_free

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.optimizer._release is self:
            self.optimizer._release = None


def check_no_gradient_left(optimizer: OptgenOptimizer, when: str) -> None:
    """Raise unless every parameter's gradient is gone: one still there was never stepped by a hook (the
    parameter did not require grad when release was attached), or would be added into the next one."""
    for k, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        if p.grad is not None:
            raise RuntimeError(f"{when}: parameter {k} (shape {tuple(p.shape)}) holds a gradient that gradient "
                               f"release did not take (attach with no gradients left, after zero_grad(); a "
                               f"parameter unfrozen since attaching needs remove() and a new attach)")


def attach(optimizer: OptgenOptimizer, model: torch.nn.Module | None = None) -> GradientRelease:
    """Check that release can work here and attach the hooks (see OptgenOptimizer.attach_gradient_release)."""
    if optimizer._release is not None:
        raise RuntimeError("gradient release is already attached to this optimizer; remove() it first")
    if model is not None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError("gradient release cannot run under DistributedDataParallel: DDP reduces gradients "
                           "in buckets after the hooks would have consumed them (use FSDP2's fully_shard)")
    if model is not None:
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if missing:
            raise ValueError(f"parameters not in this optimizer would keep their gradients: {', '.join(missing[:5])}")
    check_no_gradient_left(optimizer, "attach_gradient_release")
    release = GradientRelease(optimizer)
    optimizer._release = release
    return release
