"""The IR: what every backend renders from one spec.

Lowering resolves storage formats to codecs, parses the update into SSA statements, hoists every
sub-expression that depends only on hyper-parameters and the step count into host scalars (computed once
per step and group, in float64, then passed to the kernel as fp32), and drops statements nobody reads.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import sympy

from optgen.codecs import CODECS, Codec, get_codec
from optgen.codecs.base import DTYPE_BYTES
from optgen.codecs.rng import STREAM_NAMES
from optgen.expr import REDUCTIONS, Statement, as_condition, is_condition, parse_condition, parse_update, tensor_sum
from optgen.spec import Spec, Storage

# Names the generated code uses for itself: a spec may not use them as symbols.
GENERATED_NAMES = {"param", "grad", "scalars", "torch", "triton", "tl", "math", "hm", "i", "params",
                   "backend", "defaults", "group", "hp", "errors", "optgen_tl", "libdevice", "pid", "tensor",
                   "start", "numel", "numels", "blocks", "tile", "offs", "mask", "key", "ROWS", "COLS",
                   "optgen_torch", "value", "out", "rng", "red", "shard", "variants",
                   "violated_checks", "numel_here", "part", "Sharding",
                   # the kernel's slice loop, the generated class and its functions' own names
                   "k", "start_k", "offs_k", "self", "state", "values", "seed", "device", "tl_rng_args",
                   "min_quantized_size", "quantized_multiple", "spec_name", "hyperparam_rules", "param_dtypes",
                   "host_scalars", "op", "fallback", "triton_step", "buffers", "annotations",
                   *(f"{f}{layout}" for f in ("init_state", "export_state", "import_state")
                     for layout in ("", "_fp32", "_native")),
                   "Buffer", "HyperParamRule", "MultiTensorLauncher", "OptgenOptimizer", "Variant",
                   # param group keys that torch.optim and its LR schedulers write ("params" is above)
                   "param_names", "initial_lr", "max_lr", "min_lr", "optgen"}
GENERATED_NAMES |= set(STREAM_NAMES)  # the kernel's random streams
# and the codec modules the generated functions call (``from optgen.codecs import q8``: q8.torch_decode(...))
GENERATED_NAMES |= {line.rsplit(" ", 1)[1] for codec in CODECS.values() for line in codec.imports}


def _reserved(name: str) -> bool:
    """Names the generated code uses itself (and Python builtins, which the fallback calls)."""
    return name in GENERATED_NAMES or hasattr(builtins, name) or name.startswith("state_") or name.isupper()


@dataclass(frozen=True)
class TensorIO:
    """One logical tensor the kernel reads (and for p and states, writes)."""

    role: str  # "param", "grad" or "state"
    name: str  # "p", "g" or the state's name
    codec: Codec
    init: float
    input: sympy.Symbol
    output: sympy.Symbol | None  # the SSA symbol stored back; None for the gradient
    # Per-tensor scalar buffers the spec reads and assigns by name (e.g. LAMB16's m_scale):
    # (buffer index, symbol holding the stored value, symbol of the new value or None if unchanged)
    side: tuple[tuple[int, sympy.Symbol, sympy.Symbol | None], ...] = ()

    @property
    def arg_names(self) -> list[str]:
        """Op argument names, one list of tensors per physical buffer."""
        base = {"param": "param", "grad": "grad"}.get(self.role, f"state_{self.name}")
        return [base + (f"_{b.suffix}" if b.suffix else "") for b in self.codec.buffers()]

    @property
    def state_keys(self) -> list[str | None]:
        """Where each buffer lives in ``optimizer.state[p]`` (None: the parameter / its gradient)."""
        keys: list[str | None] = []
        for b in self.codec.buffers():
            if self.role == "state":
                keys.append(self.name + (f"_{b.suffix}" if b.suffix else ""))
            elif b.suffix and self.role == "param":
                keys.append(f"p_{b.suffix}")
            else:
                keys.append(None)
        return keys


@dataclass(frozen=True)
class HostScalar:
    """A kernel scalar: ``symbol`` in the kernel, ``expr`` (hyper-parameters and t) on the host."""

    symbol: sympy.Symbol
    expr: sympy.Basic

    @property
    def is_condition(self) -> bool:
        return is_condition(self.expr)


@dataclass(frozen=True)
class Reduction:
    """A whole-tensor reduction: one value per tensor, computed in an extra pass over the tensor."""

    symbol: sympy.Symbol
    kind: str  # "sum" or "max"
    arg: sympy.Expr  # elementwise expression reduced over the tensor
    level: int  # the pass that computes it: 1 + the highest level of the reductions its argument needs


@dataclass(frozen=True)
class Pass:
    """One pass of a step over every element of a tensor: the values it decodes, computes and stores."""

    statements: list[Statement]  # computed here, in order
    inputs: list[TensorIO]  # whose stored value (before the step) it decodes
    stored_earlier: list[TensorIO]  # whose new value, stored by an earlier pass, it decodes
    stores: list[TensorIO]  # whose new value it encodes and stores

    def reads(self) -> list[TensorIO]:
        return self.inputs + self.stored_earlier


@dataclass(frozen=True)
class Check:
    condition: sympy.Basic
    message: str
    source: str


@dataclass
class IR:
    spec: Spec
    tensors: list[TensorIO]
    statements: list[Statement]
    scalars: list[HostScalar]
    checks: list[Check]
    reductions: list[Reduction]

    @property
    def needs_rng(self) -> bool:
        """Stochastic rounding somewhere: the op takes an ``rng`` tensor (seed, step)."""
        return any(t.codec.needs_rng for t in self.tensors)

    @property
    def passes(self) -> int:
        """Reduction passes before the final (writing) pass: 0 for a purely elementwise update."""
        return max((r.level for r in self.reductions), default=0)

    @property
    def param(self) -> TensorIO:
        return self.tensors[0]

    @property
    def written(self) -> list[TensorIO]:
        return [t for t in self.tensors if t.output is not None]

    def _param_bytes(self) -> int:
        """The size of a parameter stored in its own dtype: fp32 where its format takes fp32, else 16 bits."""
        return 4 if "float32" in self.param.codec.param_dtypes else 2

    def _grad_bytes(self, param_bytes: int) -> int:
        """A native gradient has the dtype of the model's parameter (the param codec's main buffer)."""
        main = self.param.codec.buffers()[0].dtype
        return param_bytes if main == "param" else DTYPE_BYTES[main]

    def bytes_per_param(self, param_bytes: int | None = None, grad_bytes: int | None = None) -> float:
        """Bytes held per parameter: parameter (+ its side buffers), gradient and states (``param_bytes``: the
        size of a buffer in the parameter's dtype, by default fp32's where the format takes fp32)."""
        param_bytes = self._param_bytes() if param_bytes is None else param_bytes
        grad_bytes = self._grad_bytes(param_bytes) if grad_bytes is None else grad_bytes
        total = 0.0
        for t in self.tensors:
            total += grad_bytes if t.role == "grad" else t.codec.bytes_per_element(param_bytes)
        return total

    def schedule(self) -> list[Pass]:
        """The step's passes over a tensor: one per reduction level, then the pass that stores the update.

        No element can be stored before the whole-tensor reductions it depends on are complete, so a spec with
        reductions reads its tensors more than once. A reduction pass decodes the inputs its reductions need.
        A state stored losslessly (fp32) whose new value a reduction pass computes is stored by that pass, if
        nothing after it reads the old value: later passes decode the new value instead of recomputing it and
        need none of its inputs (LAMB's second pass then reads neither the gradient nor the old moments:
        40 bytes per fp32 element over the two passes, against 44 when recomputing). Without such a state, the
        final pass decodes every input again (LAMB16: its fp8 moments need the new per-tensor scales first)."""
        def needed_for(wanted: set, known: set) -> tuple[list[Statement], set]:
            """The statements computing ``wanted`` from the inputs and ``known``, in order, and what they read."""
            needed, reads = [], set(wanted)
            for st in reversed(self.statements):
                if st.target in reads and st.target not in known:
                    needed.append(st)
                    reads |= st.expr.free_symbols
            return needed[::-1], reads

        def decoded(reads: set) -> tuple[list[TensorIO], list[TensorIO]]:
            return [t for t in self.tensors if t.input in reads], [t for t in early if t.output in reads]

        sides = {out for t in self.tensors for _, _, out in t.side if out is not None}  # new per-tensor scales
        early: list[TensorIO] = []
        passes = []
        for level in range(1, self.passes + 1):
            known = {t.output for t in early}
            wanted = set().union(*(r.arg.free_symbols for r in self.reductions if r.level == level))
            needed, reads = needed_for(wanted, known)
            inputs, stored_earlier = decoded(reads)
            stores = []
            for t in self.written:
                if t.role != "state" or not t.codec.lossless or t.side or t.output not in {st.target for st in needed}:
                    continue
                later = set().union(*(r.arg.free_symbols for r in self.reductions if r.level > level),
                                    {u.output for u in self.written if u is not t and u not in early} | sides)
                if t.input not in needed_for(later, known | {t.output})[1]:
                    stores.append(t)
                    early.append(t)
                    known.add(t.output)
            passes.append(Pass(needed, inputs, stored_earlier, stores))
        last = [t for t in self.written[1:] + self.written[:1] if t not in early]  # the parameter stored last
        if early:  # the final pass computes only what it still stores
            needed, reads = needed_for({t.output for t in last} | sides, {t.output for t in early})
            inputs, stored_earlier = decoded(reads)
        else:
            needed, inputs, stored_earlier = list(self.statements), list(self.tensors), []
        passes.append(Pass(needed, inputs, stored_earlier, last))
        return passes

    def bytes_moved_per_element(self, param_bytes: int | None = None, grad_bytes: int | None = None) -> float:
        """Bytes one step moves per element: each tensor read by as many passes as decode it (``reads_per_step``)
        and written once if stored; for an elementwise update (one pass), each buffer read once and each written
        buffer written once. The generated class sums the same (``bytes_per_element(moved=True)``)."""
        param_bytes = self._param_bytes() if param_bytes is None else param_bytes
        grad_bytes = self._grad_bytes(param_bytes) if grad_bytes is None else grad_bytes
        reads = self.reads_per_step()
        return sum((grad_bytes if t.role == "grad" else t.codec.bytes_per_element(param_bytes))
                   * (reads[t.name] + (t.output is not None)) for t in self.tensors)

    def reads_per_step(self) -> dict[str, int]:
        """How many passes of a step decode each tensor (by name): 1 everywhere for an elementwise update."""
        counts = dict.fromkeys((t.name for t in self.tensors), 0)
        for step_pass in self.schedule():
            for t in step_pass.reads():
                counts[t.name] += 1
        return counts


def _codec(spec: Spec, storage: Storage, role: str, path: tuple) -> Codec:
    line = storage.line or spec.lines.get(path)
    return get_codec(storage.codec, storage.options, role, lambda m: spec.error(m, path + ("storage",), line=line))


class _Hoister:
    """Replaces sub-expressions free of tensor symbols by named host scalars (deduplicated)."""

    def __init__(self, scalar_symbols: set[sympy.Symbol], taken: set[str]) -> None:
        self.scalar_symbols = scalar_symbols
        self.taken = taken
        self.scalars: dict[sympy.Basic, HostScalar] = {}

    def _is_scalar(self, e: sympy.Basic) -> bool:
        return e.free_symbols <= self.scalar_symbols

    def _name(self, e: sympy.Basic) -> sympy.Basic:
        if e in self.scalars:
            hs = self.scalars[e]
        else:
            if isinstance(e, sympy.Symbol):
                symbol = e
            else:
                k = len([s for s in self.scalars.values() if s.symbol != s.expr])
                name = f"c{k}"
                while name in self.taken:
                    name = "_" + name
                self.taken.add(name)
                symbol = sympy.Symbol(name)
            hs = self.scalars[e] = HostScalar(symbol, e)
        return sympy.Ne(hs.symbol, 0) if hs.is_condition else hs.symbol

    def hoist(self, e: sympy.Basic) -> sympy.Basic:
        if e.is_Number or e in (sympy.true, sympy.false):
            return e
        if self._is_scalar(e):
            return self._name(e)
        if e.is_Atom:
            return e
        if isinstance(e, (sympy.Add, sympy.Mul)):
            scalar = [a for a in e.args if self._is_scalar(a)]
            rest = [self.hoist(a) for a in e.args if not self._is_scalar(a)]
            if any(not a.is_Number for a in scalar):
                rest.append(self._name(e.func(*scalar)))
            else:
                rest.extend(scalar)
            return e.func(*rest)
        if isinstance(e, sympy.Piecewise):
            return sympy.Piecewise(*[(self.hoist(v), self.hoist(c)) for v, c in e.args])
        return e.func(*[self.hoist(a) for a in e.args])


def _extract_reductions(statements: list[Statement], taken: set[str]) -> tuple[list[Statement], list[Reduction]]:
    """Replace each whole-tensor reduction by a per-tensor symbol and give it the pass that computes it."""
    level: dict[sympy.Symbol, int] = {}
    found: dict[tuple, sympy.Symbol] = {}
    reductions: list[Reduction] = []

    def replace(e: sympy.Basic) -> sympy.Basic:
        if e.is_Atom:
            return e
        args = tuple(replace(a) for a in e.args)
        e = e.func(*args) if args != e.args else e
        if not isinstance(e, REDUCTIONS):
            return e
        arg = e.args[0]
        key = (type(e), arg)
        if key not in found:
            name = f"r{len(reductions)}"
            while name in taken:
                name = "_" + name
            taken.add(name)
            symbol = found[key] = sympy.Symbol(name)
            level[symbol] = 1 + max((level.get(x, 0) for x in arg.free_symbols), default=0)
            kind = "sum" if isinstance(e, tensor_sum) else "max"
            reductions.append(Reduction(symbol, kind, arg, level[symbol]))
        return found[key]

    out = []
    for st in statements:
        expr = replace(st.expr)
        level[st.target] = max((level.get(x, 0) for x in expr.free_symbols), default=0)
        out.append(Statement(st.name, st.target, expr, st.line))
    return out, reductions


def _prune(statements: list[Statement], outputs: set[sympy.Symbol]) -> list[Statement]:
    """Drop assignments whose value is never read and never stored."""
    live = set(outputs)
    kept: list[Statement] = []
    for st in reversed(statements):
        if st.target in live:
            kept.append(st)
            live |= st.expr.free_symbols
    return kept[::-1]


def _check_names_against_buffers(spec: Spec, tensors: list[TensorIO],
                                 symbols: list[tuple[str, tuple, int | None]]) -> None:
    """Names that depend on the codecs chosen: the op's buffer arguments (and their ``_ptrs`` tables), the codecs'
    kernel constants, the generated functions (``<name>_step...``) and class. And the keys of
    ``optimizer.state[p]``: each buffer's and each state's torch name once, never 'step' (the step count) or
    'master' (the fp32 weight that ``master_weights`` exports)."""
    taken = {a for tio in tensors for a in tio.arg_names} | {c for tio in tensors for c, _ in tio.codec.constants}
    taken |= {a + "_ptrs" for a in taken} | {spec.class_name}
    for name, path, line in symbols:  # (name, field, line of an update statement or None)
        if name in taken or name.startswith(f"{spec.name}_step"):
            raise spec.error(f"'{name}' is a name the generated code uses for this spec's buffers or functions; "
                             f"choose another name", path, line=line)
    keys: dict[str, str] = {}
    for tio in tensors:
        for key in tio.state_keys:
            if key is None:
                continue
            owner = tio.name if tio.role == "state" else "p"
            if key == "step" or key in keys:
                held = "the step count" if key == "step" else f"a buffer of '{keys[key]}'"
                raise spec.error(f"a buffer of '{owner}' would be kept under the key '{key}' in optimizer.state[p], "
                                 f"which holds {held}; rename the state", ("state", tio.name) if tio.role == "state"
                                 else ("param",))
            keys[key] = owner
    torch_names: dict[str, str] = {}
    for st in spec.state:
        if st.torch_name in ("step", "master") or st.torch_name in torch_names:
            raise spec.error(f"torch_name '{st.torch_name}' is taken (by 'step', 'master' or another state); each "
                             f"state needs its own", ("state", st.name, "torch_name"))
        torch_names[st.torch_name] = st.name


def lower(spec: Spec, fp32_states: bool = False, native_param: bool = False) -> IR:
    """Spec → IR. Raises SpecError (file, line, field) for anything the dataclass check could not see.

    ``fp32_states`` lowers the same update with every state stored as fp32 (the layout of small tensors and
    of parameters marked to keep fp32 state); ``native_param`` also stores the parameter as it is (the
    layout of fp32 parameters, such as norms kept in fp32, when the spec's format holds bf16 only).
    """
    defined = [(n, ("hyperparams", h.name)) for h in spec.hyperparams
               for n in dict.fromkeys((h.name, *h.names))] + [(s.name, ("state", s.name)) for s in spec.state]
    for name, path in defined:
        if _reserved(name):
            raise spec.error(f"'{name}' is reserved by the generated code; choose another name", path)
    if spec.class_name in GENERATED_NAMES:
        raise spec.error(f"class '{spec.class_name}' is reserved by the generated code; choose another name",
                         ("class",))

    param_codec = _codec(spec, spec.param, "param", ("param",))
    if native_param:  # the parameter in its own dtype (an fp32 norm weight beside bf16+ecc8 weights)
        param_codec = _codec(spec, Storage("native", {}, spec.param.line), "param", ("param",))
    grad_codec = _codec(spec, spec.grad, "grad", ("grad",))
    state_codecs = [_codec(spec, Storage("fp32", {}, s.storage.line) if fp32_states else s.storage, "state",
                           ("state", s.name)) for s in spec.state]

    p, g, t = sympy.Symbol("p"), sympy.Symbol("g"), sympy.Symbol("t")
    scalar_syms = {n: sympy.Symbol(n) for n in spec.scalar_names}
    env: dict[str, sympy.Symbol] = {"p": p, "g": g, "t": t, "numel": sympy.Symbol("numel"), **scalar_syms}
    env.update({s.name: sympy.Symbol(s.name) for s in spec.state})
    assignable = {"p", "g"} | {s.name for s in spec.state}
    side_names = {}  # state name -> [(buffer index, symbol name)] for its per-tensor scalar buffers
    for s, codec in zip(spec.state, state_codecs):
        for k, b in enumerate(codec.buffers()):
            if b.shape == "scalar":
                name = f"{s.name}_{b.suffix}"
                side_names.setdefault(s.name, []).append((k, name))
                env[name] = sympy.Symbol(name)
                assignable.add(name)
    statements = parse_update(spec.update, env, assignable, spec.file, spec.update_line)

    final: dict[str, sympy.Symbol] = {}
    for st in statements:
        if _reserved(st.name):
            raise spec.error(f"'{st.name}' is reserved by the generated code; choose another name", ("update",),
                             line=st.line)
        final[st.name] = st.target
    if "p" not in final:
        raise spec.error("the update must assign the parameter 'p'", ("update",))
    for s in spec.state:
        if s.name not in final:
            raise spec.error(f"state '{s.name}' is declared but never assigned in update", ("state", s.name))

    tensors = [TensorIO("param", "p", param_codec, 0.0, p, final["p"]),
               TensorIO("grad", "g", grad_codec, 0.0, g, None)]
    for s, codec in zip(spec.state, state_codecs):
        side = tuple((k, sympy.Symbol(n), final.get(n)) for k, n in side_names.get(s.name, []))
        tensors.append(TensorIO("state", s.name, codec, s.init, sympy.Symbol(s.name), final[s.name], side))

    _check_names_against_buffers(spec, tensors, [(n, path, None) for n, path in defined] +
                                 [(st.name, ("update",), st.line) for st in statements])

    outputs = {tio.output for tio in tensors if tio.output is not None}
    outputs |= {out for tio in tensors for _, _, out in tio.side if out is not None}
    statements = _prune(statements, outputs)
    taken = set(env) | {st.target.name for st in statements}
    hoister = _Hoister(set(scalar_syms.values()) | {t}, taken)
    statements = [Statement(st.name, st.target, hoister.hoist(st.expr), st.line) for st in statements]
    scalars = list(hoister.scalars.values())
    statements, reductions = _extract_reductions(statements, taken)

    check_env = {**scalar_syms, **{h.name: sympy.Symbol(h.name) for h in spec.hyperparams if h.kind == "bool"}}
    checks = [Check(parse_condition(c.require, check_env, spec.file, "checks", c.line or 1),
                    c.message or f"requires {c.require}", c.require) for c in spec.checks]
    return IR(spec, tensors, statements, scalars, checks, reductions)


__all__ = ["IR", "Check", "HostScalar", "Reduction", "TensorIO", "as_condition", "lower"]
