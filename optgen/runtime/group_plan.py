"""One param group's eager Triton step, prepared once and re-checked at every step.

The general step of a GPT-2-sized model (~150 tensors) spent ~450 µs on the host, against ~1.2 ms for the kernel
on an H100, mostly in Python passes over the tensors: state lookups, the layout key, the address of every buffer
for the launch key. A ``GroupPlan`` keeps what these passes find: the launches, their state lists and launch
tables. Each step re-checks what they depend on, with passes that run in C (``map`` over the lists):

- the optimizer's state table is the same dict, holding the same per-parameter dicts, plus any new ones
  (``load_state_dict`` or ``optimizer.state[p] = {}`` change it; checked once per step for all groups, by
  ``PlanBook``), and the group's dicts hold the same state tensors;
- the group lists the same parameters, at the same addresses (``p.data = ...`` moves one);
- every parameter has a dense gradient, at the address and with the layout the tables were built for (a fresh
  gradient from the caching allocator usually lands where the last one was);
- the backend and ``min_quantized_size`` are unchanged.

If any of it fails, the step takes the general path, which builds a new plan. A state tensor is checked by
identity, not address: its storage is the optimizer's, and swapping it in place (``state["m"].data = x``)
is not noticed. Plans are made only by ``step()``: gradient release steps one parameter at a time.
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
    written: list[torch.Tensor]  # what the kernel writes (its version counters are bumped)


@dataclass(frozen=True)
class GroupPlan:
    group: dict[str, Any]  # kept alive, so that the id the plan is filed under is not reused
    params: list[torch.Tensor]
    ids: list[int]  # the parameters' stable ids (their stochastic-rounding streams)
    param_ptrs: tuple[int, ...]
    grad_ptrs: tuple[int, ...]
    grad_contiguous: tuple[bool, ...]
    held: tuple[tuple[str, list[dict[str, Any]], list[Any]], ...]  # per state key: the dicts with it, its values
    steps: torch.Tensor  # the packed step counts: every ``state["step"]`` of the group is a view of it
    launches: tuple[PlannedLaunch, ...]
    written: list[torch.Tensor]
    backend: str | None
    min_quantized_size: int

    @classmethod
    def build(cls, optimizer: Any, group: dict[str, Any], ids: list[int], steps: torch.Tensor,
              launches: list[PlannedLaunch]) -> GroupPlan:
        params = list(group["params"])
        grads = [p.grad for p in params]
        states = [optimizer.state[p] for p in params]
        keys = sorted({k for s in states for k in s})
        held = tuple((k, [s for s in states if k in s], [s[k] for s in states if k in s]) for k in keys)
        return cls(group, params, list(ids), tuple(map(_data_ptr, params)), tuple(map(_data_ptr, grads)),
                   tuple(map(_is_contiguous, grads)), held, steps, tuple(launches),
                   [t for launch in launches for t in launch.written], optimizer.backend,
                   optimizer.min_quantized_size)

    def holds(self, optimizer: Any, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> bool:
        """Whether this plan still describes the group's step, the state table aside (``PlanBook.begin``)."""
        try:
            return (tuple(map(_data_ptr, grads)) == self.grad_ptrs
                    and tuple(map(_is_contiguous, grads)) == self.grad_contiguous
                    and len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                    and tuple(map(_data_ptr, params)) == self.param_ptrs
                    and all(all(map(operator.is_, map(operator.itemgetter(k), dicts), values))
                            for k, dicts, values in self.held)
                    and optimizer.backend == self.backend and optimizer.min_quantized_size == self.min_quantized_size)
        except (RuntimeError, TypeError, KeyError):  # a missing (None) or sparse gradient, a state key deleted
            return False


class PlanBook:
    """An optimizer's plans, one per param group, and the state table they were made against.

    The table (``optimizer.state``) is checked once per step, not once per plan: with one group per parameter
    (per-layer learning rates), per-plan checks of the whole table would cost the square of the parameters.
    Between steps, only new states may be added (the general path adds them); any other change drops every
    plan."""

    def __init__(self) -> None:
        self.plans: dict[int, GroupPlan] = {}  # by id(group)
        self._table: Any = None  # the state table the plans hold for, and its per-parameter dicts in order
        self._values: list[dict[str, Any]] = []
        self._added = False

    def clear(self) -> None:
        self.plans.clear()
        self._table, self._values = None, []

    def begin(self, table: Any) -> None:
        """At the start of a step: drop every plan unless ``table`` holds the same dicts as when they were made."""
        if self.plans and not (table is self._table and len(table) == len(self._values)
                               and all(map(operator.is_, table.values(), self._values))):
            self.clear()

    def holding(self, optimizer: Any, group: dict[str, Any]) -> tuple[GroupPlan | None, list[torch.Tensor]]:
        """The group's plan and its gradients, if it has a plan that still holds."""
        plan = self.plans.get(id(group))
        if plan is None:
            return None, []
        grads = [p.grad for p in group["params"]]
        return (plan, grads) if plan.holds(optimizer, group["params"], grads) else (None, [])

    def add(self, plan: GroupPlan) -> None:
        self.plans[id(plan.group)] = plan
        self._added = True

    def end(self, table: Any) -> None:
        """At the end of a step: the table now, with the states this step added, is what the plans hold for."""
        if self._added:
            self._table, self._values, self._added = table, list(table.values()), False
