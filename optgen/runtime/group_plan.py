"""One param group's eager Triton step, prepared once and re-checked at every step.

The general step of a GPT-2-sized model (~150 tensors) spent ~450 µs on the host, against ~1.2 ms for the kernel
on an H100, mostly in Python passes over the tensors: state lookups, the layout key, the address of every buffer
for the launch key. A ``GroupPlan`` keeps what these passes find: the launches, their state lists and launch
tables. Each step re-checks what they depend on, with passes that run in C (``map`` over the lists):

- the optimizer's state table is the same dict, holding the same per-parameter dicts (``load_state_dict``,
  ``optimizer.state[p] = {}`` or a new parameter's state change them), which hold the same state tensors;
- the group lists the same parameters, at the same addresses (``p.data = ...`` moves one);
- every parameter has a dense gradient, at the address and with the layout the tables were built for (a fresh
  gradient from the caching allocator usually lands where the last one was);
- the backend and ``min_quantized_size`` are unchanged.

If any of it fails, the step takes the general path, which builds a new plan. A state tensor is checked by
identity, not address: its storage is the optimizer's, and swapping it in place (``state["exp_avg"].data = x``)
is not noticed.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass
from typing import Any

import torch

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous


def next_count(count: float) -> int:
    """``count + 1`` as the fp32 step tensor holds it (rounded above 2**24, like the general path's ``add_``)."""
    return int(struct.unpack("f", struct.pack("f", count + 1.0))[0])


@dataclass(frozen=True)
class PlannedLaunch:
    """One launch of the group: a launcher, its cached plan and its buffer lists, gradients left out."""

    launcher: Any  # optgen.runtime.launch.MultiTensorLauncher
    plan: Any  # its launch plan for these tensors
    lists: tuple[list[torch.Tensor] | None, ...]  # the buffer lists in kernel order; None: the gradients
    positions: list[int] | None  # where its parameters are in the group; None: all of them, in order
    device: torch.device
    stream_ids: list[int] | None  # stochastic rounding: the stable id of each tensor; None without rng


@dataclass(frozen=True)
class GroupPlan:
    group: dict[str, Any]  # kept alive, so that the id the optimizer files this plan under is not reused
    table: Any  # the optimizer's ``state`` mapping
    table_values: list[dict[str, Any]]  # its per-parameter dicts, in its order
    params: list[torch.Tensor]
    ids: list[int]  # the parameters' stable ids (their stochastic-rounding streams)
    param_ptrs: tuple[int, ...]
    grad_ptrs: tuple[int, ...]
    grad_contiguous: tuple[bool, ...]
    states: list[dict[str, Any]]  # each parameter's state dict
    held: tuple[tuple[str, list[dict[str, Any]], list[Any]], ...]  # per state key: the dicts with it, its values
    steps: torch.Tensor  # the packed step counts: every ``state["step"]`` of the group is a view of it
    launches: tuple[PlannedLaunch, ...]
    written: list[torch.Tensor]  # what the kernels write: their version counters are bumped
    backend: str | None
    min_quantized_size: int

    @classmethod
    def build(cls, optimizer: Any, group: dict[str, Any], ids: list[int], steps: torch.Tensor,
              launches: list[PlannedLaunch], written: list[torch.Tensor]) -> GroupPlan:
        params = list(group["params"])
        grads = [p.grad for p in params]
        states = [optimizer.state[p] for p in params]
        keys = sorted({k for s in states for k in s})
        held = tuple((k, [s for s in states if k in s], [s[k] for s in states if k in s]) for k in keys)
        return cls(group, optimizer.state, list(optimizer.state.values()), params, list(ids),
                   tuple(map(_data_ptr, params)), tuple(map(_data_ptr, grads)), tuple(map(_is_contiguous, grads)),
                   states, held, steps, tuple(launches),
                   written, optimizer.backend, optimizer.min_quantized_size)

    def holds(self, optimizer: Any, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> bool:
        """Whether this plan still describes the group's step (see the module's docstring)."""
        table = optimizer.state
        try:
            return (tuple(map(_data_ptr, grads)) == self.grad_ptrs
                    and tuple(map(_is_contiguous, grads)) == self.grad_contiguous
                    and len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                    and tuple(map(_data_ptr, params)) == self.param_ptrs
                    and table is self.table and len(table) == len(self.table_values)
                    and all(map(operator.is_, table.values(), self.table_values))
                    and all(all(map(operator.is_, map(operator.itemgetter(k), dicts), values))
                            for k, dicts, values in self.held)
                    and optimizer.backend == self.backend and optimizer.min_quantized_size == self.min_quantized_size)
        except (RuntimeError, TypeError, KeyError):  # a missing (None) or sparse gradient, a state key deleted
            return False
