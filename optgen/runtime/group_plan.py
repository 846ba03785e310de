"""One param group's eager Triton step, prepared once and re-checked at every step.

The general step of a GPT-2-sized model (~150 tensors) spent ~450 µs on the host, against ~1.2 ms for the kernel
on an H100, mostly in Python passes over the tensors: state lookups, the layout key, the address of every buffer
for the launch key. A ``GroupPlan`` keeps what these passes find: the launches, their state lists and launch
tables. Each step re-checks what they depend on, with passes that run in C (``map`` over the lists):

- the optimizer's state table files the same per-parameter dicts under the same parameters (``load_state_dict``,
  ``optimizer.state[p] = {}``, ``del optimizer.state[p]`` change that; checked once per step for all groups by
  ``PlanBook``), and the group's dicts hold the same state tensors, those the kernels use at the same
  addresses and with the same dtypes (``state["m"] = x``, ``state["m"].data = x`` change that; the step counts go
  by identity, as on the general path, which checks every state against its layout). Not checked: a state cut
  at the same address (``state["m"].resize_(k)``): its storage still holds every element the kernel steps;
- the group lists the same parameters, at the same addresses, with as many elements, the same contiguity and
  dtype (``p.data = ...`` changes these), and starts at the same position among all parameters (the ids of its
  stochastic-rounding streams);
- every parameter has a dense gradient, at the address and with the contiguity and dtype the tables were built
  for (a fresh gradient from the caching allocator usually lands where the last one was);
- the backend and ``min_quantized_size`` are unchanged.

If any of it fails, the step takes the general path, which makes a new plan (or refuses a state that does not fit
its parameter's layout).

The checks follow the launches (``Stage``): the state table's, every gradient's address and the first launch's
tensors' (parameters, their gradients' contiguity and dtype, states) come before the first launch; each later
launch's tensors' right before it, while the launches before it run. A launch over many tensors runs in two
parts (``MultiTensorLauncher.split_min_tensors``: the programs of its largest tensors first), two stages here, and
goes first. If a later stage's checks fail, the stages before it have been stepped and the others' parameters
take the general path, as one group (which refuses a state set by hand that does not fit its layout: the stages
before it stay stepped). A missing or sparse gradient fails the first checks: nothing is stepped before the
general path refuses it.

Plans are made only by ``step()`` (gradient release steps one parameter at a time) and only for fp32 step
counts. A plan keeps its tensors alive until the next ``step()`` drops it (or ``load_state_dict``):
``optimizer.state.clear()`` frees the states' memory at the next step.
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_numel = torch.Tensor.numel
_getitem = dict.__getitem__
_dtype = operator.attrgetter("dtype")


def _one(position: int, entries: list) -> tuple:
    return (entries[position],)


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
    streams: torch.Tensor | None  # stochastic rounding: each tensor's stable id, on the device; None without rng
    written: list[torch.Tensor]  # what the kernel writes (its version counters are bumped)


@dataclass(frozen=True)
class Placement:
    """Where some of a group's parameters, their gradients and their states are, as the plan's launch tables have
    them (the gradients' addresses aside: every step checks all of them first, see ``GroupPlan.holds``)."""

    pick: Callable[[list], Any]  # the group's list -> these parameters' entries (their gradients)
    grad_contiguous: tuple[bool, ...]
    grad_dtypes: tuple[torch.dtype, ...]
    params: list[torch.Tensor]
    param_ptrs: tuple[int, ...]
    param_numels: tuple[int, ...]
    param_contiguous: tuple[bool, ...]
    param_dtypes: tuple[torch.dtype, ...]
    # every (dict, key) of their states and the value it held, as three flat lists (one pass checks them); the
    # values the kernels use and their addresses (not the step counts: the general path goes by identity there)
    state_dicts: list[dict[str, Any]]
    state_keys: list[str]
    state_values: list[Any]
    kernel_values: list[torch.Tensor]
    kernel_ptrs: tuple[int, ...]
    kernel_dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, positions: list[int], params: list[torch.Tensor], grads: list[torch.Tensor],
           states: list[dict[str, Any]], launched: set[int]) -> Placement:
        """The placement of the group's parameters at ``positions`` (every one: the plan's lists as they are)."""
        if len(positions) == len(params):
            pick = tuple
        elif len(positions) == 1:
            pick = functools.partial(_one, positions[0])
        else:
            pick = operator.itemgetter(*positions)
        params, states = list(pick(params)), list(pick(states))
        pairs = [(s, k) for s in states for k in s]
        values = [s[k] for s, k in pairs]
        in_kernel = [v for v in values if id(v) in launched]
        return cls(pick, tuple(map(_is_contiguous, pick(grads))), tuple(map(_dtype, pick(grads))), params,
                   tuple(map(_data_ptr, params)), tuple(map(_numel, params)), tuple(map(_is_contiguous, params)),
                   tuple(map(_dtype, params)), [s for s, _ in pairs], [k for _, k in pairs], values,
                   in_kernel, tuple(map(_data_ptr, in_kernel)), tuple(map(_dtype, in_kernel)))

    def holds(self, grads: list[torch.Tensor]) -> bool:
        """Whether the parameters, their ``grads`` (of the whole group, at the addresses checked) and their states
        are still as placed (the caller checked the parameters' identity)."""
        try:
            mine = self.pick(grads)
            return (tuple(map(_is_contiguous, mine)) == self.grad_contiguous
                    and tuple(map(_dtype, mine)) == self.grad_dtypes
                    and tuple(map(_data_ptr, self.params)) == self.param_ptrs
                    and tuple(map(_numel, self.params)) == self.param_numels
                    and tuple(map(_is_contiguous, self.params)) == self.param_contiguous
                    and tuple(map(_dtype, self.params)) == self.param_dtypes
                    and all(map(operator.is_, map(_getitem, self.state_dicts, self.state_keys), self.state_values))
                    and tuple(map(_data_ptr, self.kernel_values)) == self.kernel_ptrs
                    and tuple(map(_dtype, self.kernel_values)) == self.kernel_dtypes)
        except KeyError:  # a state key deleted
            return False


@dataclass(frozen=True)
class Stage:
    """One launch of a plan, or one part of a split launch, with the placement of its tensors: checked right
    before it, while the launches before it run on the GPU (the first stage's before any launch)."""

    launch: PlannedLaunch
    part: int | None  # of a split launch: 0 its head, 1 the rest; None: the whole launch
    placement: Placement
    positions: list[int]  # where its parameters are in the group
    written: list[torch.Tensor]  # what it writes


def _stages(launches: list[PlannedLaunch], params: list[torch.Tensor], grads: list[torch.Tensor],
            states: list[dict[str, Any]], launched: set[int]) -> tuple[Stage, ...]:
    """The launches in the order they run, a split launch first and as two stages."""
    split = next((launch for launch in launches if launch.plan.parts is not None), None)
    stages = []
    for launch in ([split] if split is not None else []) + [x for x in launches if x is not split]:
        everywhere = list(range(len(params))) if launch.positions is None else launch.positions
        own = range(len(everywhere))  # indices into the launch's own lists
        head = set(launch.plan.head)
        parts = [(None, own)] if launch is not split else [(0, sorted(head)), (1, [i for i in own if i not in head])]
        m = len(everywhere)  # its written lists, one after another
        for part, picked in parts:
            positions = sorted(everywhere[i] for i in picked)
            written = [launch.written[k + i] for k in range(0, len(launch.written), m) for i in picked]
            stages.append(Stage(launch, part, Placement.of(positions, params, grads, states, launched), positions,
                                written))
    return tuple(stages)


@dataclass(frozen=True)
class GroupPlan:
    """What one param group's eager step launches, and what must still hold for it to launch that again."""

    group: dict[str, Any]  # kept alive, so that the id the plan is filed under is not reused
    params: list[torch.Tensor]
    ids: list[int]  # the parameters' stable ids (their stochastic-rounding streams)
    grad_ptrs: tuple[int, ...]
    stages: tuple[Stage, ...]  # its launches in order, a split launch's two parts as two stages
    steps: torch.Tensor  # the packed fp32 step counts: every ``state["step"]`` of the group is a view of it
    written: list[torch.Tensor]
    devices: frozenset[torch.device]  # where its launches run
    backend: str | None
    min_quantized_size: int

    @classmethod
    def build(cls, optimizer: Any, group: dict[str, Any], ids: list[int], steps: torch.Tensor,
              launches: list[PlannedLaunch]) -> GroupPlan:
        params = list(group["params"])
        grads = [p.grad for p in params]
        states = [optimizer.state[p] for p in params]
        launched = {id(t) for launch in launches for lst in launch.lists if lst is not None for t in lst}
        return cls(group, params, list(ids), tuple(map(_data_ptr, grads)),
                   _stages(launches, params, grads, states, launched), steps,
                   [t for launch in launches for t in launch.written], frozenset(launch.device for launch in launches),
                   optimizer.backend, optimizer.min_quantized_size)

    def holds(self, optimizer: Any, params: list[torch.Tensor], grads: list[torch.Tensor | None],
              first_id: int) -> bool:
        """Whether this plan still describes the group's step up to its first launch, the state table aside
        (``PlanBook.begin``): every gradient's address (a dense gradient's: a missing or sparse one changes
        nothing before it is refused), every parameter's identity, and the first stage's placement."""
        try:
            return (tuple(map(_data_ptr, grads)) == self.grad_ptrs
                    and len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                    and first_id == self.ids[0]
                    and optimizer.backend == self.backend and optimizer.min_quantized_size == self.min_quantized_size
                    and self.stages[0].placement.holds(grads))
        except (RuntimeError, TypeError):  # a missing (None) or sparse gradient
            return False


class PlanBook:
    """An optimizer's plans, one per param group, and the state table they were made against.

    The table (``optimizer.state``) is checked once per step, not once per plan: with one group per parameter
    (per-layer learning rates), per-plan checks of the whole table would cost the square of the parameters.
    Any change to the table between steps drops every plan; the states a step itself adds (the general path
    creates them) leave the plans in place."""

    def __init__(self) -> None:
        self.plans: dict[int, GroupPlan] = {}  # by id(group)
        self._table: Any = None  # the state table the plans hold for: its parameters and their dicts, in order
        self._keys: list[torch.Tensor] = []
        self._values: list[dict[str, Any]] = []
        self._added = False

    def clear(self) -> None:
        self.plans.clear()
        self._table, self._keys, self._values = None, [], []

    def begin(self, table: Any, groups: list[dict[str, Any]]) -> None:
        """At the start of a step: drop every plan unless ``table`` files the same dicts under the same
        parameters as when they were made; drop the plans of groups no longer in ``groups``."""
        if not self.plans:
            return
        if not (table is self._table and len(table) == len(self._values)
                and all(map(operator.is_, table, self._keys)) and all(map(operator.is_, table.values(), self._values))):
            self.clear()
            return
        current = set(map(id, groups))
        for key in [k for k in self.plans if k not in current]:
            del self.plans[key]

    def holding(self, optimizer: Any, group: dict[str, Any],
                first_id: int) -> tuple[GroupPlan | None, list[torch.Tensor]]:
        """The group's plan and its gradients, if it has a plan that still holds."""
        plan = self.plans.get(id(group))
        if plan is None:
            return None, []
        grads = [p.grad for p in group["params"]]
        return (plan, grads) if plan.holds(optimizer, group["params"], grads, first_id) else (None, [])

    def add(self, plan: GroupPlan) -> None:
        self.plans[id(plan.group)] = plan
        self._added = True

    def end(self, table: Any) -> None:
        """At the end of a step: the table now, with the states this step added, is what the plans hold for."""
        if self._added or (self.plans and len(table) != len(self._values)):
            self._table, self._keys, self._values, self._added = table, list(table), list(table.values()), False
