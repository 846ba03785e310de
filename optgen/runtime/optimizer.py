"""The hand-written base of every generated optimizer: a real ``torch.optim.Optimizer``.

The generated subclass only says what its spec decides (hyper-parameters, buffer layout, the op, the
host scalars). Everything else lives here: validation before any state exists, lazy state, steps grouped
into one op call per (param group, device, step count, storage layout), backends, and exact state_dict round trips.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from optgen.codecs.ecc import ecc8_dtype
from optgen.runtime import distributed
from optgen.runtime.group_plan import GroupPlan, PlanBook, PlannedLaunch, next_count
from optgen.runtime.launch import RngArgs, Scalars
from optgen.runtime.release import attach, check_no_gradient_left
from optgen.runtime.step_hooks import with_step_hooks
from optgen.runtime.transfer import host_to_device, make_rng, refuse_graph_capture, to_device

BACKENDS = ("triton", "inductor", "eager")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HyperParamRule:
    """How one constructor argument is validated: a float (or 0-d tensor) in an interval, a bool, or a tuple."""

    name: str
    kind: str  # "float", "bool" or "tuple"
    default: Any
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = True

    def _interval(self) -> str:
        return f"{'[' if self.low_closed else '('}{self.low}, {self.high}{']' if self.high_closed else ')'}"

    def _check_number(self, value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):  # numpy scalars too
            raise ValueError(f"Invalid {what}: expected a number, got {type(value).__name__} {value!r}")  # noqa: TRY004 - torch.optim raises ValueError for bad hyper-parameters
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
                raise ValueError(f"Invalid {what}: a tensor hyper-parameter must be a 1-element float tensor")
            value = value.item()
        x = float(value)
        ok = not math.isnan(x) and (x >= self.low if self.low_closed else x > self.low) and \
            (x <= self.high if self.high_closed else x < self.high)
        if not ok:
            raise ValueError(f"Invalid {what}: {value} (must be in {self._interval()})")

    def validate(self, value: Any) -> Any:
        """Return the value to store in the param group, or raise ValueError."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {self.name}: expected True or False, got {value!r}")
            return value
        if self.kind == "tuple":
            if isinstance(value, torch.Tensor) or not isinstance(value, (tuple, list)) or \
                    len(value) != len(self.default):
                raise ValueError(f"Invalid {self.name}: expected {len(self.default)} numbers, got {value!r}")
            for i, v in enumerate(value):
                self._check_number(v, f"{self.name}[{i}]")
            return tuple(value)
        self._check_number(value, f"{self.name} value")
        return value


@dataclass(frozen=True)
class Buffer:
    """One list argument of the op: the parameters, their gradients, or a state buffer (``key``)."""

    arg: str
    key: str | None  # key in optimizer.state[p]; None for the parameter ("param") and gradient ("grad")
    dtype: str  # torch dtype name, "param" for the parameter's own dtype, or "ecc8" (see optgen.codecs.ecc)
    written: bool = False
    shape: str = "param"  # "param", "groups" (one per `group` elements), "half" (4-bit pairs) or "scalar"
    group: int = 1
    state: str | None = None  # torch name of the spec state it stores (None: the parameter and its side buffers)
    reads: int = 1  # passes of a step that read it: more than one where whole-tensor reductions come first (LAMB)

    def torch_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        if self.dtype == "ecc8":
            return ecc8_dtype(param_dtype)
        return param_dtype if self.dtype == "param" else getattr(torch, self.dtype)

    def shape_for(self, p: torch.Tensor) -> tuple[int, ...]:
        """The buffer's shape for parameter ``p``."""
        n = p.numel()
        return {"param": tuple(p.shape), "groups": (-(-n // self.group),), "half": (-(-n // 2),),
                "scalar": ()}[self.shape]

    def bytes_per_element(self, param_dtype: torch.dtype) -> float:
        size = torch.empty((), dtype=self.torch_dtype(param_dtype)).element_size()
        return {"param": size, "groups": size / self.group, "half": size / 2, "scalar": 0.0}[self.shape]


@dataclass(frozen=True)
class Variant:
    """One storage layout of a spec with its state initializer and kernels.

    Every spec has the main layout (""); a spec with compressed states also has "fp32", the same update
    with fp32 states, used for small tensors and parameters marked to keep full-precision state.
    """

    buffers: tuple[Buffer, ...]
    init_state: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    export_state: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]]
    import_state: Callable[[torch.Tensor, dict], dict[str, torch.Tensor]]
    op: Callable[..., None]
    fallback: Callable[..., None]
    triton_step: Callable[..., None] | None = None
    triton_launcher: Callable[..., None] | None = None
    param_dtypes: tuple[str, ...] = ("float32",)  # parameter dtypes this layout stores
    needs_rng: bool = False  # stochastic rounding: the op takes an int64 [seed, step, *ids] tensor last
    # whole-tensor values (reductions, numel): on shards, the fallback and launcher take ``shard=Sharding``
    global_values: bool = False


FP32_STATE_ATTR = "optgen_fp32_state"  # set to True on a parameter to keep its optimizer state in fp32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPE_DEVICE = operator.attrgetter("dtype", "device")
_DEVICE_INDEX = torch.Tensor.get_device  # -1 on the CPU: an int, cheaper to get than the device
_DTYPE = operator.attrgetter("dtype")
_GRAD_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))  # the kernels load these
_NUMBER_TYPES = frozenset((float, int, bool))  # scalars of these types need no isinstance check for tensors
_MIXED_COUNTS_UNDER_COMPILE = (
    "a compiled step takes one step count per param group, and the parameters of this group are at different "
    "counts (one got its first gradient later, e.g. unfrozen): put such parameters in their own param group, "
    "or step eagerly")
# torch.optim options: a param group that sets one the spec lacks is refused, not ignored. Those that change the
# math are also refused in a torch.optim state_dict that load_torch_state_dict is given (the others are harmless there).
_TORCH_MATH_OPTIONS = ("maximize", "amsgrad", "nesterov", "dampening", "momentum")
_TORCH_OPTIONS = (*_TORCH_MATH_OPTIONS, "foreach", "fused", "capturable", "differentiable")


@dataclass(frozen=True)
class _ExpectedState:
    """One state buffer of a list of parameters: each one's (dtype, device), number of elements and shape."""

    buffer: Buffer
    dtype_device: tuple[tuple[torch.dtype, torch.device], ...]
    numels: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _Layouts:
    """Parameters grouped by (device, variant, sharding layout), and what each group's states must be."""

    groups: dict[tuple, list[int]]  # indices of the parameters, by (device, variant, sharding layout)
    params: list[torch.Tensor]  # kept alive: the cache key holds their ids
    expected: dict[tuple, list[_ExpectedState]]  # by the same key as groups


def _step_count(value: Any, index: Any) -> float:
    """A saved step count (a number, or a one-element tensor anywhere: torch's capturable ones are on a GPU) as a
    float; ValueError unless it is a finite, non-negative whole number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or value != int(value):
        raise ValueError(f"state 'step' of parameter {index} must be a finite, non-negative whole number, got {value!r}")
    return float(value)


def _check_state(value: Any, key: str, index: int, dtype: torch.dtype, device: torch.device,
                 shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``value``, state ``key`` of parameter ``index``, has this dtype, device and size."""
    if isinstance(value, torch.Tensor) and value.dtype == dtype and value.device == device and \
            value.numel() == math.prod(shape):
        return
    got = f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}" \
        if isinstance(value, torch.Tensor) else "nothing" if value is None else type(value).__name__
    raise ValueError(f"state '{key}' of parameter {index}: expected a {dtype} tensor of shape {shape} on {device}, "
                     f"got {got}. A state is made for its parameter's layout at the first step (its dtype, "
                     f"min_quantized_size and the '{FP32_STATE_ATTR}' mark choose it): load states with "
                     f"load_state_dict, or delete the parameter's state to start it afresh")


def _saved_meta(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The 'optgen' entry (spec name, seed) of a saved state_dict: at the top, else in its first param group."""
    groups = state_dict.get("param_groups") or [{}]
    meta = state_dict.get("optgen") or (groups[0].get("optgen") if isinstance(groups[0], dict) else None)
    return meta if isinstance(meta, dict) else {}


def _param_list(params: Any) -> list[Any]:
    """A param group's 'params' as a list, as torch.optim takes them: one tensor, or an ordered collection of
    tensors or of (name, tensor) pairs (``model.named_parameters()``: torch keeps the names)."""
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensors_of(params: list[Any]) -> list[Any]:
    """The tensors of a ``_param_list``: the second item of each (name, tensor) pair."""
    return [p[1] if isinstance(p, tuple) else p for p in params]


class OptgenOptimizer(torch.optim.Optimizer):
    """Base class of generated optimizers. Subclasses set the class attributes below."""

    spec_name: ClassVar[str]
    hyperparam_rules: ClassVar[tuple[HyperParamRule, ...]]
    param_dtypes: ClassVar[tuple[str, ...]]
    quantized_multiple: ClassVar[int] = 1  # only tensors of a multiple of this many elements get quantized states
    # "" the spec's layout; "fp32" with fp32 states (if the spec quantizes states); "native": fp32 states and
    # the parameter in its own dtype (if the spec's parameter format cannot hold fp32)
    variants: ClassVar[dict[str, Variant]]
    # The main variant's parts, for direct use (tests, benchmarks):
    buffers: ClassVar[tuple[Buffer, ...]]
    op: ClassVar[Callable[..., None]]  # the torch.library op, PyTorch fallback inside
    fallback: ClassVar[Callable[..., None]]  # the same fallback as a plain function (for torch.compile)
    triton_step: ClassVar[Callable[..., None] | None] = None  # the Triton kernel as an op (for torch.compile)
    _compiled: ClassVar[dict[tuple[type, str], Callable[..., None]]] = {}

    @staticmethod
    def host_scalars(hp: dict[str, Any], t: int) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def violated_checks(hp: dict[str, Any]) -> list[str]:
        return []

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, backend: str | None = None,
                 min_quantized_size: int = 4096, seed: int | None = None) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"Invalid backend {backend!r}: expected one of {', '.join(BACKENDS)} or None")
        if isinstance(min_quantized_size, bool) or not isinstance(min_quantized_size, int) or min_quantized_size < 0:
            raise ValueError(f"Invalid min_quantized_size: {min_quantized_size!r} (a number of elements >= 0)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
            raise ValueError(f"Invalid seed: {seed!r} (an int in [0, 2**31))")
        self.backend = backend
        self.min_quantized_size = min_quantized_size
        self.seed = int(torch.initial_seed() % 2**31) if seed is None else seed  # stochastic rounding
        self.__dict__.update(self._runtime_attributes())
        for rule in self.hyperparam_rules:
            defaults[rule.name] = rule.validate(defaults[rule.name])
        self._validate_group(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _runtime_attributes() -> dict[str, Any]:
        """What an optimizer holds beside torch's state and its settings, fresh: caches rebuilt as it steps."""
        return {
            "_release": None,  # the GradientRelease handle while gradient release is attached
            "_step_packs": {},  # packed step counts (_advance_packed): {ids of the views: (packed, views)}
            "_layout_groups": {},  # _layouts_of's cache: {key: _Layouts}
            "_plans": PlanBook(),  # each param group's eager Triton step, prepared
        }

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, param groups) and this optimizer's settings, for copy.deepcopy and pickle;
        caches, launch plans and an attached gradient release are not copied: a copy makes its own."""
        return {**super().__getstate__(), "backend": self.backend, "min_quantized_size": self.min_quantized_size,
                "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with state and param groups only
        for name, value in self._runtime_attributes().items():
            self.__dict__.setdefault(name, value)

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        errors = self.violated_checks(group)
        if errors:
            raise ValueError("; ".join(errors))

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise unless the kernel's scalars can be made from the group's hyper-parameters as they are now (a
        scheduler, or a user, writes ``group["lr"]`` between steps); ``step()`` checks every group it steps on the
        general path before it steps any (a prepared step makes its scalars before its first launch). Values the
        constructor would refuse but that make scalars pass (DCP steps with ``lr=0.0`` to create the states), as
        in ``torch.optim``, which checks hyper-parameters only when a group is added."""
        try:
            values = self._scalar_values(group, 1)
        except Exception:  # say which value, else re-raise
            self._name_bad_hyperparameter(group)
            raise
        if not all(v.numel() == 1 for v in values if isinstance(v, torch.Tensor)):
            self._name_bad_hyperparameter(group)
            raise ValueError("a tensor hyper-parameter must hold one value")

    def _name_bad_hyperparameter(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming the first hyper-parameter of ``group`` the constructor would refuse, if any."""
        for rule in self.hyperparam_rules:
            if rule.name not in group:
                raise ValueError(f"param group lacks hyper-parameter '{rule.name}'")
            rule.validate(group[rule.name])
        self._validate_group(group)

    def _validate_params(self, params: list[Any]) -> None:
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{type(self).__name__} can only optimize Tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"{type(self).__name__} can't optimize a non-leaf Tensor")
            name = _dtype_name(p.dtype)
            accepted = sorted({d for v in self.variants.values() for d in v.param_dtypes})
            if name not in accepted:
                raise ValueError(f"{type(self).__name__} ({self.spec_name}) stores parameters as "
                                 f"{' or '.join(accepted)}; got a {name} parameter of shape {tuple(p.shape)}")
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is listed twice in one param group")
            seen.add(id(p))

    def _lacked_option(self, group: dict[str, Any], options: tuple[str, ...]) -> str | None:
        """The first of torch.optim's ``options`` that ``group`` turns on and this spec has no hyper-parameter for."""
        names = {rule.name for rule in self.hyperparam_rules}
        return next((key for key in options if key not in names and group.get(key)), None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group (parameters and every hyper-parameter) before anything is stored."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = {**param_group, "params": _param_list(param_group["params"])}
        self._validate_params(_tensors_of(group["params"]))
        key = self._lacked_option(group, _TORCH_OPTIONS)
        if key is not None:
            raise ValueError(f"{type(self).__name__} ({self.spec_name}) does not implement torch.optim's "
                             f"'{key}' option; a param group sets {key}={group[key]!r}")
        for rule in self.hyperparam_rules:
            if rule.name in group:
                group[rule.name] = rule.validate(group[rule.name])
        self._validate_group({**self.defaults, **group})
        super().add_param_group(group)
        if self._release is not None:  # attached: the new parameters are stepped in backward too
            self._release.hook_group(len(self.param_groups) - 1)

    # ------------------------------------------------------------------ step
    def variant_of(self, p: torch.Tensor) -> str:
        """Which storage layout parameter ``p`` uses: fp32 states for small or marked parameters (and, in a spec
        whose formats quantize whole groups only, for sizes of partial groups), and for parameters the spec's
        parameter format cannot hold (an fp32 norm weight beside bf16+ecc8 weights)."""
        if _dtype_name(p.dtype) not in self.variants[""].param_dtypes and "native" in self.variants:
            return "native"
        if "fp32" in self.variants and (p.numel() < self.min_quantized_size or getattr(p, FP32_STATE_ATTR, False)
                                        or p.numel() % self.quantized_multiple):
            return "fp32"
        return ""

    def _backend_on(self, device: torch.device) -> str:
        """The backend that steps tensors on ``device``: the one asked for, else Triton on CUDA, eager elsewhere."""
        return self.backend or ("triton" if device.type == "cuda" else "eager")

    def _check_backend(self, device: torch.device, variant: str) -> None:
        """Raise unless the backend can step ``variant`` on ``device`` (checked before a step changes anything)."""
        if device.type == "meta":
            raise ValueError(f"{type(self).__name__}: a parameter on the meta device holds no values to step")
        if self._backend_on(device) == "triton":
            if self.variants[variant].triton_step is None:
                raise RuntimeError(f"{type(self).__name__} has no Triton kernel; use backend='eager' or 'inductor'")
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")

    def _kernel(self, device: torch.device, variant: str,
                shard: distributed.Sharding | None = None) -> Callable[..., Any]:
        """The step function of ``variant`` on ``device``. With ``shard`` (the tensors are shards), the
        launcher, or the plain fallback where the update needs whole-tensor values (an op cannot take it).
        The eager Triton step returns the launcher and the launch plan it used (a ``GroupPlan`` keeps them);
        the others return None."""
        backend, v = self._backend_on(device), self.variants[variant]
        self._check_backend(device, variant)
        if backend == "triton":
            if torch.compiler.is_compiling() and shard is None:
                return v.triton_step

            def launch(*args: Any) -> tuple[Any, Any]:
                # Eager: call the launcher directly (the op's dispatch costs more than the kernel for small
                # models), and bump the version counters as an in-place op would.
                *lists, scalars, rng = args if v.needs_rng else (*args, None)
                plan = v.triton_launcher.plan_for(lists, rng is not None, shard)
                v.triton_launcher.run_plan(plan, lists, scalars, rng, shard)
                torch.autograd.graph.increment_version(
                    [t for b, lst in zip(v.buffers, lists) if b.written for t in lst])
                return v.triton_launcher, plan
            return launch
        if shard is not None and v.global_values:  # eager: the fallback's collectives run between its passes
            return functools.partial(v.fallback, shard=shard)
        if backend == "inductor":
            key = (type(self), variant)
            if key not in OptgenOptimizer._compiled:
                OptgenOptimizer._compiled[key] = torch.compile(v.fallback, dynamic=True)
            return OptgenOptimizer._compiled[key]
        return v.op

    def _params_with_grad(self, group: dict[str, Any], first_id: int = 0) -> tuple[list[torch.Tensor], list[int]]:
        """Parameters that have a gradient and their stable ids: ``first_id`` + position in the group (the
        stochastic-rounding stream of each). torch's grad setter checks a gradient's shape, device and dtype, but
        ``p.grad.data = x`` does not: the kernels take addresses, and would read past the end of a gradient with
        fewer elements, or a host address as a device one. Such a gradient is refused here, before any change."""
        params, ids, grads = [], [], []
        for k, p in enumerate(group["params"]):
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                ids.append(first_id + k)
                grads.append(g)
        if torch.compiler.is_compiling() or tuple(map(torch.Tensor.numel, grads)) != tuple(
                map(torch.Tensor.numel, params)) or tuple(map(_DEVICE_INDEX, grads)) != tuple(map(_DEVICE_INDEX, params)) \
                or not _GRAD_DTYPES.issuperset(map(_DTYPE, grads)):
            for p, i, g in zip(params, ids, grads):  # the one that does not fit (traced: once, while compiling)
                if g.numel() != p.numel() or g.device != p.device or g.dtype not in _GRAD_DTYPES:
                    raise ValueError(f"the gradient of parameter {i} is a {g.dtype} tensor of shape "
                                     f"{tuple(g.shape)} on {g.device}, the parameter {tuple(p.shape)} on {p.device}")
        return params, ids

    def _create_states(self, params: list[torch.Tensor]) -> list[dict[str, Any]]:
        """The parameters' states, missing ones created. Not named ``_init_group``: Dynamo runs a method of that
        name eagerly and refuses to when backward ran in the same graph (a pending ``.grad`` mutation), so a
        compiled training step (forward, backward, step) could not be one graph. Traced, it creates the states
        in the graph."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state.update(self.variants[self.variant_of(p)].init_state(distributed.local(p).detach()))
        return states

    def _scalar_values(self, group: dict[str, Any], t: Any) -> list[Any]:
        """The kernel's scalars for ``group`` at step ``t``, computed in float64: numbers, or tensors where a
        hyper-parameter or ``t`` is one (promoted to float64 first: in fp32, ``1 - 0.999**t`` alone would be off
        by 1e-5 relative)."""
        def f64(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(torch.float64)
            return tuple(map(f64, v)) if isinstance(v, tuple) else v

        hp = {k: f64(v) for k, v in group.items() if k != "params"}
        try:
            return self.host_scalars(hp, f64(t))
        except ZeroDivisionError:  # e.g. lr=0.0, which DCP sets to create the states: IEEE inf, as on a device
            hp = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else v for k, v in hp.items()}
            return self.host_scalars(hp, f64(t))

    def _scalars(self, group: dict[str, Any], t: Any, device: torch.device,
                 values: list[Any] | None = None) -> torch.Tensor:
        """The kernel's scalars (``values``, else ``_scalar_values(group, t)``) as one fp32 tensor on ``device``."""
        if values is None:
            values = self._scalar_values(group, t)
        if not any(isinstance(v, torch.Tensor) for v in values):
            return to_device(values, torch.float32, device)
        # A tensor lr or step stays a tensor. In eager, values already on ``device`` (a CUDA lr) stay there and
        # the rest (numbers, CPU tensors) cross in one asynchronous copy: nothing waits for the GPU.
        eager = not torch.compiler.is_compiling()
        on_device = [eager and isinstance(v, torch.Tensor) and v.device == device for v in values]
        host = [torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v, d in zip(values, on_device) if not d]
        crossed = iter(host_to_device(torch.stack(host).float(), device).unbind() if host else ())
        return torch.stack([v.reshape(()).float() if d else next(crossed) for v, d in zip(values, on_device)])

    def _buckets(self, params: list[torch.Tensor], states: list[dict[str, Any]], counts: list[float] | None = None,
                 layouts: _Layouts | None = None) -> dict[tuple, list[int]]:
        """Advance each parameter's step (unless ``counts``, the advanced counts, are given); group indices of
        parameters sharing (device, step count, variant, sharding layout). Every rank of a sharded model forms
        the same buckets (from the DTensors' global sizes), so the collectives of whole-tensor reductions match
        across ranks.

        Under torch.compile the step count stays a tensor (no ``.item()``, no recompiles as it grows) and
        the parameters of a group share the first one's count, as they do when every one gets a gradient. A
        group whose counts differ (a parameter that got its first gradient later) would take a wrong bias
        correction: the compiled step refuses it before any count advances.
        """
        buckets: dict[tuple, list[int]] = {}
        steps = [state["step"] for state in states]
        if torch.compiler.is_compiling():
            if len(steps) > 1:
                torch._assert_async(torch.all(torch.stack(steps) == steps[0]), _MIXED_COUNTS_UNDER_COMPILE)
            torch._foreach_add_(steps, 1)
            for i, p in enumerate(params):
                buckets.setdefault((p.device, steps[0], self.variant_of(p), distributed.layout(p)), []).append(i)
            return buckets
        if counts is None:
            counts = self._advance_packed(states, steps)
        groups = (layouts or self._layouts_of(params)).groups
        if counts.count(counts[0]) == len(counts):  # the usual case: every parameter at the same step
            return {(device, int(counts[0]), variant, layout): idx for (device, variant, layout), idx in groups.items()}
        for (device, variant, layout), idx in groups.items():
            for i in idx:
                buckets.setdefault((device, int(counts[i]), variant, layout), []).append(i)
        return buckets

    def _layouts_of(self, params: list[torch.Tensor]) -> _Layouts:
        """``params`` grouped by (device, variant, sharding layout), with what their states must be. Cached (for a
        model of ~150 tensors, deriving it per parameter cost a third of the host time of a step): the key holds
        everything ``variant_of`` reads (dtype, size, the fp32-state mark, ``min_quantized_size``) and the device;
        the entry keeps the parameters alive, so their ids cannot be reused while it exists. A parameter's
        sharding layout is taken as fixed (FSDP2 replaces the parameter objects it shards)."""
        marks = tuple(getattr(p, FP32_STATE_ATTR, False) for p in params) if "fp32" in self.variants else ()
        key = (tuple(map(id, params)), tuple(map(_DTYPE_DEVICE, params)), tuple(map(torch.Tensor.numel, params)),
               marks, self.min_quantized_size, self.backend)
        entry = self._layout_groups.get(key)
        if entry is None:
            self._validate_params(params)  # a dtype set through ``p.data`` since the parameter was added
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                groups.setdefault((p.device, self.variant_of(p), distributed.layout(p)), []).append(i)
            for device, variant, _ in groups:
                self._check_backend(device, variant)
            entry = self._layout_groups[key] = _Layouts(groups, list(params), {
                where: self._expected_states(where[1], [distributed.local(params[i]) for i in idx])
                for where, idx in groups.items()})
            while len(self._layout_groups) > 4 * max(1, len(self.param_groups)):
                self._layout_groups.pop(next(iter(self._layout_groups)))
        return entry

    def _expected_states(self, variant: str, local: list[torch.Tensor]) -> list[_ExpectedState]:
        """What each state buffer of ``variant`` must be for the parameters (their local shards) ``local``."""
        expected = []
        for b in self.variants[variant].buffers:
            if b.key is not None:
                shapes = tuple(b.shape_for(p) for p in local)
                expected.append(_ExpectedState(b, tuple((b.torch_dtype(p.dtype), p.device) for p in local),
                                               tuple(map(math.prod, shapes)), shapes))
        return expected

    def _check_states(self, params: list[torch.Tensor], ids: list[int], layouts: _Layouts | None) -> None:
        """Raise ValueError unless every state buffer the kernels take is a tensor of the dtype, size and device its
        layout gives the parameter (``layouts``: ``_layouts_of(params)``; None under torch.compile, where this runs
        once, as the step is traced); a parameter with no state yet gets a fresh one. The Triton kernels take
        addresses: a state set by hand (``optimizer.state[p]["m"] = x``) that is smaller would be written past its
        end, one of another dtype read as garbage. So is a state made before ``min_quantized_size`` or a
        parameter's fp32-state mark changed (another layout)."""
        if layouts is None:
            for p, i in zip(params, ids):
                state, local = self.state.get(p), distributed.local(p)  # not ``state[p]``: it files an empty dict
                for b in self.variants[self.variant_of(p)].buffers:
                    if state and b.key is not None:
                        _check_state(state.get(b.key), b.key, i, b.torch_dtype(local.dtype), local.device,
                                     b.shape_for(local))
            return
        states = list(map(self.state.get, params))
        for where, idx in layouts.groups.items():
            for want in layouts.expected[where]:
                try:  # one pass per buffer list, in C (``map``): a model's ~150 tensors are checked every step
                    found = [states[i][want.buffer.key] for i in idx]
                    if tuple(map(_DTYPE_DEVICE, found)) == want.dtype_device and \
                            tuple(map(torch.Tensor.numel, found)) == want.numels:
                        continue
                except (KeyError, AttributeError, TypeError):  # no state yet, a key missing, a value no tensor
                    pass
                for k, i in enumerate(idx):  # the one that is not
                    if states[i]:
                        _check_state(states[i].get(want.buffer.key), want.buffer.key, ids[i], *want.dtype_device[k],
                                     want.shapes[k])

    def _advance_packed(self, states: list[dict[str, Any]], steps: list[torch.Tensor]) -> list[float]:
        """Add 1 to every step count with one op and return the new counts.

        The counts become 0-d views of one packed tensor (each ``state[p]["step"]`` is still its own tensor,
        as in torch.optim): a per-tensor add costs more than the kernel itself for a small model. A pack is
        found again by the identity of its views, which it keeps alive so that no id is reused.
        """
        key = tuple(map(id, steps))
        entry = self._step_packs.get(key)
        if entry is None:
            packed = torch.stack(steps)
            views = list(packed.unbind())
            for state, view in zip(states, views):
                state["step"] = view
            entry = (packed, views)
            self._step_packs[tuple(map(id, views))] = entry
            while len(self._step_packs) > 4 * max(1, len(self.param_groups)):
                self._step_packs.pop(next(iter(self._step_packs)))
        entry[0].add_(1)
        return entry[0].tolist()

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor], ids: list[int],
                    counts: list[float] | None = None, layouts: _Layouts | None = None) -> GroupPlan | None:
        """One launch per (device, step count, variant, sharding); ``ids`` are the parameters' stable ids.
        DTensor parameters (FSDP2) are stepped on their local shards, where their states live. Returns a plan
        for the next step (``optgen.runtime.group_plan``) when the eager Triton launcher stepped the whole
        group at one step count. ``layouts``: the parameters' ``_layouts_of``, their states checked against it
        (``step()`` checks every group's before it steps any)."""
        eager = not torch.compiler.is_compiling()
        if eager:
            refuse_graph_capture()  # before any state changes
        if layouts is None:
            layouts = self._layouts_of(params) if eager else None
            self._check_states(params, ids, layouts)
        states = self._create_states(params)
        buckets = self._buckets(params, states, counts, layouts)
        planned = []
        for (device, t, variant, sharded), idx in buckets.items():
            v = self.variants[variant]
            bucket = [params[i] for i in idx]
            ps, gs = bucket, [p.grad for p in bucket]
            if sharded:
                ps, gs = list(map(distributed.local, ps)), list(map(distributed.local, gs))
            lists = [[states[i][b.key] for i in idx] if b.key is not None else ps if b.arg == "param" else gs
                     for b in v.buffers]
            shard = distributed.Sharding.of(bucket) if sharded else None
            values = self._scalar_values(group, t)
            # An eager launch (not of shards) takes numbers as kernel arguments; the others take tensors
            numbers = eager and shard is None and self._backend_on(device) == "triton" \
                and not any(isinstance(x, torch.Tensor) for x in values)
            scalars = values if numbers else self._scalars(group, t, device, values)
            extra, streams = (), None  # the tensors' stable ids on the device stay with a plan
            if v.needs_rng:
                stream = [ids[i] for i in idx] if shard is None else shard.stream_ids([ids[i] for i in idx])
                if numbers:
                    streams = to_device(stream, torch.int64, device)
                    extra = (RngArgs(self.seed, t, streams),)
                else:
                    extra = (make_rng(self.seed, t, stream, device),)
                    streams = extra[0][2:]
            launched = self._kernel(device, variant, shard)(*lists, scalars, *extra)
            if launched is not None and shard is None:
                planned.append(PlannedLaunch(
                    *launched, tuple(None if b.arg == "grad" else lst for b, lst in zip(v.buffers, lists)),
                    None if len(idx) == len(params) else idx, device, streams,
                    [x for b, lst in zip(v.buffers, lists) if b.written for x in lst]))
        pack = self._step_packs.get(tuple(id(s["step"]) for s in states)) if eager else None
        if pack is None or pack[0].dtype != torch.float32 or len(planned) < len(buckets) \
                or len({key[1] for key in buckets}) > 1 or len(params) < len(group["params"]):
            return None
        return GroupPlan.build(self, group, ids, pack[0], planned)

    def _planned_scalars(self, planned: list[tuple[dict[str, Any], GroupPlan]]
                         ) -> dict[int, tuple[int, dict[torch.device, Scalars]]]:
        """For each planned group (by ``id`` of its plan): its next step count t and its scalars for each device
        it launches on. Numbers stay numbers: the kernels take them as arguments, with nothing to copy to the
        device before the launch. A group with a tensor hyper-parameter gets them as a tensor on each device. A
        group whose counts differ (set by hand) is left out: it takes the general path."""
        if not planned:
            return {}
        refuse_graph_capture()  # a replayed launch would reuse this step's scalars
        prepared: dict[int, tuple[int, dict[torch.device, Scalars]]] = {}
        for group, plan in planned:
            counts = plan.steps.tolist()  # read every step: a count may be set by hand, even through .data
            if counts.count(counts[0]) != len(counts):
                continue
            t = next_count(counts[0])
            try:
                values = self._scalar_values(group, t)
                tensors = not _NUMBER_TYPES.issuperset(map(type, values)) and \
                    any(isinstance(v, torch.Tensor) for v in values)
                prepared[id(plan)] = (t, {d: self._scalars(group, t, d, values) if tensors else values
                                          for d in plan.devices})
            except Exception:  # a hyper-parameter set between steps: say which, else re-raise
                self._name_bad_hyperparameter(group)
                raise
        return prepared

    def _step_planned(self, group: dict[str, Any], plan: GroupPlan, grads: list[torch.Tensor],
                      prepared: tuple[int, dict[torch.device, torch.Tensor]] | None) -> None:
        """The step of ``_step_group`` with what ``plan`` holds and the step count and scalars ``prepared`` for it
        (``_planned_scalars``; None: a count was set by hand): launch, then advance the counts (the kernels do not
        read them, and the launch comes sooner) and bump the version counters; these two also when a launch
        raises, as on the general path. Each stage after the first runs once its placement is checked; where that
        fails, its parameters and those of the stages after it take the general path."""
        if prepared is None:  # one launch per count
            self._step_group(group, plan.params, plan.ids, plan.steps.add_(1).tolist())
            return
        t, scalars = prepared
        stopped = 0  # the stage whose placement no longer holds (0: none)
        launch, lists, rng = None, [], None
        try:
            for k, stage in enumerate(plan.stages):
                if k and not stage.placement.holds(grads):
                    stopped = k
                    break
                if stage.launch is not launch:
                    launch = stage.launch
                    rng = None if launch.streams is None else RngArgs(self.seed, t, launch.streams)
                    gs = grads if launch.positions is None else [grads[i] for i in launch.positions]
                    lists = [gs if lst is None else lst for lst in launch.lists]
                launch.launcher.run_plan(launch.plan, lists, scalars[launch.device], rng, part=stage.part)
        finally:
            if stopped:  # the counts (views of plan.steps, as checked) and versions of the stages stepped
                plan.steps[[i for stage in plan.stages[:stopped] for i in stage.positions]] += 1
                torch.autograd.graph.increment_version([x for stage in plan.stages[:stopped] for x in stage.written])
            else:
                plan.steps.add_(1)
                torch.autograd.graph.increment_version(plan.written)
        if stopped:
            self._plans.plans.pop(id(group), None)
            rest = sorted(i for stage in plan.stages[stopped:] for i in stage.positions)
            self._step_group(group, [plan.params[i] for i in rest], [plan.ids[i] for i in rest])

    def attach_gradient_release(self, model: torch.nn.Module | None = None) -> Any:
        """Step each parameter during backward, as soon as its gradient is accumulated, and free the gradient.

        Returns a handle whose ``remove()`` undoes it. While attached, ``step()`` does nothing (the work
        happened in backward), a closure is refused, and the learning rate and other hyper-parameters are read
        when each hook runs, so LR schedulers work. Gradient clipping over all parameters and accumulation over
        micro-batches cannot work (each gradient is gone when backward ends); DistributedDataParallel is
        refused. Attaching while a parameter holds a gradient is refused (the first released step would add it
        in), and so is ``step()`` while one holds a gradient no hook took (a parameter frozen when release was
        attached and unfrozen since: attach again). Pass ``model`` to check that it owns no parameter this
        optimizer lacks.
        """
        return attach(self, model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, but traceable: torch's is excluded from Dynamo, which would split a compiled
        training step in two."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    @with_step_hooks
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not torch.compiler.is_compiling():
            self._opt_called = True  # what an LR scheduler's wrapper of step() would record (see below)
        if self._release is not None:
            if closure is not None:
                raise RuntimeError("step(closure) cannot run with gradient release attached: the parameters "
                                   "are stepped inside backward")
            check_no_gradient_left(self, "step()")
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        eager = not torch.compiler.is_compiling()
        if eager:
            self._plans.begin(self.state, self.param_groups)
        work, first_id = [], 0
        for group in self.param_groups:  # check every group before stepping any
            plan, grads = self._plans.holding(self, group, first_id) if eager else (None, [])
            if plan is not None:
                work.append((group, plan, grads))
            else:
                params, ids = self._params_with_grad(group, first_id)
                layouts = None  # traced: hyper-parameters are symbols, and _step_group checks the states
                if eager and params:
                    self._check_group(group)
                    layouts = self._layouts_of(params)
                    self._check_states(params, ids, layouts)
                work.append((group, None, (params, ids, layouts)))
            first_id += len(group["params"])
        prepared = self._planned_scalars([(group, plan) for group, plan, _ in work if plan is not None]) \
            if eager else {}
        for group, plan, found in work:
            if plan is not None:
                self._step_planned(group, plan, found, prepared.get(id(plan)))
            elif found[0]:
                plan = self._step_group(group, found[0], found[1], layouts=found[2])
                if plan is not None and eager:
                    self._plans.add(plan)
        if eager:
            self._plans.end(self.state)
        return loss

    # LR schedulers wrap ``optimizer.step`` unless it carries this mark, in a function that sets
    # ``_opt_called`` (only to warn about the call order). Under torch.compile that write is dropped (torch 2.13)
    # or breaks the graph (torch 2.11), so step() records the call itself, outside compiled code.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ sizes
    @classmethod
    def bytes_per_element(cls, param_dtype: torch.dtype = torch.float32, grad_dtype: torch.dtype | None = None,
                          moved: bool = False) -> float:
        """Bytes held per parameter element (or, with ``moved``, read + written by one step: a spec with
        whole-tensor reductions reads some buffers in more than one pass, see ``optgen.ir.IR.schedule``)."""
        grad_dtype = grad_dtype or param_dtype
        total = 0.0
        for b in cls.buffers:
            size = b.bytes_per_element(grad_dtype if b.arg == "grad" else param_dtype)
            total += size * (b.reads + b.written if moved else 1)
        return total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, exact: compressed states as stored. The states of DTensor parameters
        (FSDP2) are DTensors placed like them, in a layout DCP can reshard (``optgen.runtime.distributed``).
        The spec and the stochastic-rounding seed are saved at the top and in each param group, since DCP's
        ``get_optimizer_state_dict`` keeps only 'state' and 'param_groups'."""
        sd = super().state_dict()
        sd["optgen"] = {"spec": self.spec_name, "seed": self.seed}
        for g in sd["param_groups"]:
            g["optgen"] = dict(sd["optgen"])
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(params):
            state = sd["state"].get(index)
            if not state:
                continue
            if distributed.layout(p) is not None:
                sd["state"][index] = distributed.state_dict_sharded(self.variants[self.variant_of(p)], p, self.state[p])
            elif any(v.dtype in distributed.FP8 for v in state.values()):  # as bytes, as sharded states are
                sd["state"][index] = {k: v.view(distributed.saved_dtype(v.dtype)) for k, v in state.items()}
        return sd

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError unless ``state_dict`` fits this optimizer exactly (nothing is changed)."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict: expected keys 'state' and 'param_groups'")
        spec = _saved_meta(state_dict).get("spec", self.spec_name)
        if spec != self.spec_name:
            raise ValueError(f"state_dict was saved by optgen spec '{spec}', not '{self.spec_name}'")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer has {len(self.param_groups)}")
        index_to_param: dict[Any, torch.Tensor] = {}
        for saved, group in zip(groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("a param group of the state_dict has a different number of parameters")
            index_to_param.update(zip(saved["params"], group["params"]))
            for rule in self.hyperparam_rules:
                if rule.name not in saved:
                    raise ValueError(f"state_dict param group lacks hyper-parameter '{rule.name}'")
                rule.validate(saved[rule.name])
        for index, state in state_dict["state"].items():
            if index not in index_to_param:
                raise ValueError(f"state_dict has state for unknown parameter index {index}")
            if isinstance(state, dict) and not state:  # never stepped (reading ``optimizer.state[p]`` files a {})
                continue
            p = index_to_param[index]
            buffers = self.variants[self.variant_of(p)].buffers
            expected = {"step"} | {b.key for b in buffers if b.key is not None}
            if distributed.layout(p) is not None:
                expected = {"step"} | set(distributed.expected_sharded(self.variants[self.variant_of(p)], p))
            if set(state) != expected:
                raise ValueError(f"state for parameter {index} has keys {sorted(state)}, expected {sorted(expected)}")
            step = state.get("step")
            if not isinstance(step, torch.Tensor) or step.dim() != 0 or not step.is_floating_point():
                raise ValueError(f"state 'step' of parameter {index} must be a 0-d float tensor, got {step!r}")
            _step_count(step, index)
            if distributed.layout(p) is not None:
                self._check_sharded_state(index, p, state)
                continue
            for b in buffers:
                if b.key is None:
                    continue
                dtype, shape = b.torch_dtype(p.dtype), b.shape_for(p)
                value = state[b.key]
                value = distributed.as_stored(value, dtype) if isinstance(value, torch.Tensor) else value
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
                    got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)
                    raise ValueError(f"state '{b.key}' of parameter {index}: expected shape {shape} "
                                     f"and dtype {dtype}, got {got}")
                if value.is_meta:  # an offloaded optimizer copies states into its chunks after loading the groups
                    raise ValueError(f"state '{b.key}' of parameter {index} is on the meta device: it holds no values")

    def _check_sharded_state(self, index: Any, p: torch.Tensor, state: dict[str, Any]) -> None:
        """The saved state of DTensor parameter ``p``: every entry with its shape and dtype, and DTensors
        holding this rank's shard of it (not another world size's, not a missing one)."""
        for key, (shape, dtype, is_dtensor) in distributed.expected_sharded(self.variants[self.variant_of(p)], p).items():
            value = state[key]
            ok = isinstance(value, torch.Tensor) and tuple(value.shape) == shape and value.dtype == dtype and \
                (distributed.layout(value) is not None) == is_dtensor
            if ok and is_dtensor:
                ok = distributed.layout(value) == distributed.layout(p) and \
                    distributed.local(value).shape == distributed.local(p).shape
            if not ok:
                got = (type(value).__name__, tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) \
                    else type(value)
                where = "a DTensor placed like the parameter" if is_dtensor else "a plain tensor"
                raise ValueError(f"state '{key}' of parameter {index}: expected {where} of shape {shape} and "
                                 f"dtype {dtype} (this rank's shard included), got {got}")

    def _export(self, p: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """fp32 values (states under torch names, and "master") of ``p``, the ``index``-th parameter; DTensors for a
        DTensor ``p``. A state that no longer fits the parameter's layout is refused, as ``step()`` refuses it."""
        self._check_states([p], [index], None)
        layout = self.variants[self.variant_of(p)]
        p_local = distributed.local(p).detach()
        state = self.state.get(p) or layout.init_state(p_local)
        values = layout.export_state(p_local, state)
        if distributed.layout(p) is not None:
            values = {k: distributed.as_dtensor(v, p) for k, v in values.items()}
        return values

    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 master weight of every parameter (e.g. bf16 value + ECC correction), in group order
        (DTensors for DTensor parameters)."""
        return [self._export(p, i)["master"] for i, p in enumerate(p for g in self.param_groups for p in g["params"])]

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state in fp32, in the layout of the matching torch.optim optimizer (e.g. an
        AdamW-like spec gives 'exp_avg' / 'exp_avg_sq' / 'step'), which that optimizer loads."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, p in enumerate(params):
            if self.state.get(p):
                values = self._export(p, index)
                values.pop("master")
                state[index] = {"step": self.state[p]["step"].clone(), **values}
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_torch_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load fp32 states saved by the matching torch.optim optimizer (or by ``torch_state_dict``), encoding
        them into this spec's storage. Hyper-parameters this spec has are taken from the saved groups. A state
        with other keys than this spec's (another optimizer's), or a group saved with a torch.optim option that
        changes the math and that this spec lacks (``maximize``, ``amsgrad``), is refused. Everything is checked
        before anything changes."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(len(a["params"]) != len(b["params"])
                                                          for a, b in zip(groups, self.param_groups)):
            raise ValueError("the state_dict's param groups do not match this optimizer's")
        new_groups = []
        for saved, group in zip(groups, self.param_groups):
            key = self._lacked_option(saved, _TORCH_MATH_OPTIONS)
            if key is not None:
                raise ValueError(f"the state_dict was saved with {key}={saved[key]!r}, which {type(self).__name__} "
                                 f"({self.spec_name}) does not implement")
            merged = dict(group)
            for rule in self.hyperparam_rules:
                if rule.name in saved:
                    merged[rule.name] = rule.validate(saved[rule.name])
            self._validate_group(merged)
            new_groups.append(merged)
        saved_ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        new_state = {}
        for index, p in zip(saved_ids, params):
            values = state_dict["state"].get(index)
            if not values:
                continue
            expected = {b.state for b in self.variants[self.variant_of(p)].buffers if b.state}
            if set(values) - {"step"} != expected:
                raise ValueError(f"state of parameter {index} has keys {sorted(values)}, but {type(self).__name__} "
                                 f"({self.spec_name}) imports {sorted(expected)} (and 'step'): a state_dict of another "
                                 f"optimizer")
            for k, v in values.items():
                if k != "step" and (not isinstance(v, torch.Tensor) or v.shape != p.shape or
                                    distributed.layout(v) != distributed.layout(p)):
                    raise ValueError(f"state '{k}' of parameter {index} must be a tensor of shape {tuple(p.shape)}"
                                     f"{' placed like the parameter' if distributed.layout(p) else ''}")
            # torch.optim.SGD keeps no step count: a state it saved was made by a step (so the first step's rule,
            # e.g. SGD's momentum buffer = gradient, is not applied again)
            state = {"step": torch.tensor(_step_count(values.get("step", 1.0), index), dtype=torch.float32)}
            local = {k: distributed.local(v) for k, v in values.items() if k != "step"}
            state.update(self.variants[self.variant_of(p)].import_state(distributed.local(p).detach(), local))
            new_state[p] = state
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self._plans.clear()  # they would keep the replaced states alive until the next step
        for p, state in new_state.items():
            self.state[p] = state

    def _sharded_states(self, state_dict: dict[str, Any], params: list[torch.Tensor]) -> dict[torch.Tensor, dict]:
        """The states of a checked state_dict for an optimizer with DTensor parameters, encoded (nothing changes
        if that fails): DTensor parameters take theirs from the sharded layout ``state_dict`` gives them."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        new_states = {}
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index)
            if not saved:
                continue
            state = {"step": saved["step"].detach().to(device="cpu", dtype=torch.float32, copy=True).reshape(())}
            if distributed.layout(p) is not None:
                state.update(distributed.load_state_sharded(self.variants[self.variant_of(p)], p, saved))
            else:
                state.update({k: v.detach().to(device=p.device, copy=True) for k, v in saved.items() if k != "step"})
            new_states[p] = state
        return new_states

    def _as_stored(self, p: torch.Tensor, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The saved states of plain parameter ``p`` in the dtypes its buffers store (fp8 saved as bytes)."""
        dtypes = {b.key: b.torch_dtype(p.dtype) for b in self.variants[self.variant_of(p)].buffers if b.key}
        return {k: distributed.as_stored(v, dtypes[k]) if k in dtypes else v for k, v in saved.items()}

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        """Load a checked state_dict exactly: copies of the saved states in their saved dtypes (torch's loader
        would cast them to the parameter's dtype), the saved groups' settings, and the seed."""
        self._plans.clear()  # they would keep the replaced states alive until the next step
        params = [p for g in self.param_groups for p in g["params"]]
        if any(distributed.layout(p) is not None for p in params):
            new_states = self._sharded_states(state_dict, params)
        else:
            saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            # copies, never the saved tensors themselves: the step count is updated in place
            new_states = {p: {key: value.detach().to(device="cpu" if key == "step" else p.device, dtype=value.dtype,
                                                     copy=True).reshape(value.shape)
                              for key, value in self._as_stored(p, state_dict["state"][index]).items()}
                          for index, p in zip(saved_ids, params) if state_dict["state"].get(index)}
        groups = []
        for group, saved in zip(self.param_groups, deepcopy(state_dict["param_groups"])):
            saved.pop("optgen", None)
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:  # as torch.optim keeps them
                saved["param_names"] = group["param_names"]
            groups.append(saved)
        self.__setstate__({"state": defaultdict(dict, new_states), "param_groups": groups})
        self.seed = _saved_meta(state_dict).get("seed", self.seed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict, exact: the load pre-hooks run first (they may convert the dict), then
        everything is checked before anything changes, then the post-hooks run on the loaded states."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_state_dict(state_dict)
        self._load_checked(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
