"""The PyTorch backend: the update as plain torch ops over a list of tensors (fp32 math).

It runs on every device, is the reference for the Triton kernel, and is what ``backend="inductor"`` hands
to ``torch.compile``. Scalars arrive as one fp32 tensor so that changing lr never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import sympy

from optgen.backends.printing import BasePrinter
from optgen.ir import IR


class TorchPrinter(BasePrinter):
    sqrt_fn = "optgen_torch.sqrt_rn"
    rsqrt_fn = "optgen_torch.rsqrt_rn"
    functions: ClassVar[dict[str, str]] = {"Abs": "torch.abs", "sign": "torch.sign", "exp": "torch.exp", "log": "torch.log",
                 "Min": "torch.minimum", "Max": "torch.maximum", "where": "torch.where"}

    def _print_Min(self, expr: sympy.Basic) -> str:
        return self._clamp_chain(expr.args, "max", "torch.minimum")

    def _print_Max(self, expr: sympy.Basic) -> str:
        return self._clamp_chain(expr.args, "min", "torch.maximum")

    def _clamp_chain(self, args: tuple, bound: str, fn: str) -> str:
        """min/max against a number is a clamp (torch.minimum needs two tensors)."""
        numbers = [a for a in args if a.is_Number]
        tensors = [a for a in args if not a.is_Number]
        out = self._binary_chain(fn, tuple(tensors))
        for n in numbers:
            out = f"torch.clamp({out}, {bound}={self._print(n)})"
        return out

    def _print_And(self, expr: sympy.Basic) -> str:
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr: sympy.Basic) -> str:
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Not(self, expr: sympy.Basic) -> str:
        return f"~({self._print(expr.args[0])})"


@dataclass(frozen=True)
class TorchStep:
    """The pieces of the fallback function the template lays out."""

    args: list[str]  # op arguments (lists of tensors), then "scalars"
    mutated: tuple[str, ...]
    scalar_names: list[str]
    loads: list[str]
    body: list[str]
    stores: list[str]
    # Sharded tensors (FSDP2): the fallback takes ``shard`` when the update needs whole-tensor values (a
    # reduction, or ``numel``). Each reduction pass then computes every tensor's local partials into
    # ``red[i, j]`` before one all-reduce; the update reads ``red`` instead of reducing its shard.
    global_values: bool
    reduction_kinds: list[str]  # "sum" or "max", one per reduction (column of ``red``)
    # per pass: the loop body over tensor i that fills its partials, and the columns it fills
    reduction_passes: list[tuple[list[str], list[int]]]


def render_torch_step(ir: IR) -> TorchStep:
    printer = TorchPrinter()
    args = [a for t in ir.tensors for a in t.arg_names]
    mutated = tuple(a for t in ir.written for a in t.arg_names)
    uses_numel = any(sympy.Symbol("numel") in st.expr.free_symbols for st in ir.statements) or \
        any(sympy.Symbol("numel") in r.arg.free_symbols for r in ir.reductions)
    global_values = bool(ir.reductions) or uses_numel
    # a device tensor: dividing by a Python number on CUDA multiplies by its reciprocal (not exact); the
    # element count of the whole tensor, not of this rank's shard
    numel_line = [("numel = torch.full((), param[i].numel() if shard is None else shard.numels[i], "
                   "dtype=torch.float32, device=param[i].device)")] if uses_numel else []
    column = {r.symbol: j for j, r in enumerate(ir.reductions)}
    per_tensor = {s.symbol for s in ir.scalars} | {r.symbol for r in ir.reductions} | {sympy.Symbol("numel")}
    per_tensor |= {sym for t in ir.tensors for _, sym, _ in t.side}
    for st in ir.statements:  # a temporary made of per-tensor values only (s = sum(p)) is one too
        if st.expr.free_symbols and st.expr.free_symbols <= per_tensor:
            per_tensor.add(st.target)

    def loads_for(wanted: set) -> list[str]:
        lines = [line for t in ir.tensors if t.input in wanted
                 for line in t.codec.torch_decode(t.input.name, [f"{a}[i]" for a in t.arg_names])]
        return lines + [f"{sym.name} = {t.arg_names[k]}[i]" for t in ir.tensors for k, sym, _ in t.side if sym in wanted]

    def reduced(r) -> str:
        arg = printer.doprint(r.arg)
        if r.arg.free_symbols <= per_tensor:  # no elementwise value in it: broadcast to the tensor
            arg = f"torch.full_like(p, 1.0) * ({arg})"
        return f"{'torch.sum' if r.kind == 'sum' else 'optgen_torch.tensor_max'}({arg})"

    def statement(st) -> str:
        if st.expr.is_Number:
            code = f"torch.full_like(p, {printer.doprint(st.expr)})"
        elif st.expr in inputs:  # a bare copy of an input would alias a buffer that is overwritten below
            code = f"{printer.doprint(st.expr)}.clone()"
        else:
            code = printer.doprint(st.expr)
        return f"{st.target.name} = {code}"

    inputs = {t.input for t in ir.tensors}
    loads = loads_for(inputs)
    body = list(numel_line)
    pending = list(ir.reductions)

    def emit_reductions(symbols: set) -> None:
        """Each reduction right before its first use (after the reductions its argument needs)."""
        for r in [r for r in pending if r.symbol in symbols]:
            pending.remove(r)
            emit_reductions(r.arg.free_symbols)
            body.append(f"{r.symbol.name} = {reduced(r)} if red is None else red[i, {column[r.symbol]}]")

    for st in ir.statements:
        emit_reductions(st.expr.free_symbols)
        body.append(statement(st))

    passes = []
    for level in range(1, ir.passes + 1):  # as the Triton kernel's reduction passes
        mine = [r for r in ir.reductions if r.level == level]
        wanted = set().union(*(r.arg.free_symbols for r in mine))
        if any(r.arg.free_symbols <= per_tensor for r in mine):
            wanted.add(ir.param.input)
        needed = []
        for st in reversed(ir.statements):  # the statements the reductions of this pass depend on
            if st.target in wanted:
                needed.append(st)
                wanted |= st.expr.free_symbols
        lines = [("numel = torch.full((), shard.numels[i], dtype=torch.float32, device=param[i].device)")] \
            if sympy.Symbol("numel") in wanted else []
        lines += loads_for(wanted)
        lines += [f"{r.symbol.name} = red[i, {column[r.symbol]}]" for r in ir.reductions if r.level < level]
        lines += [statement(st) for st in reversed(needed)]
        lines += [f"red[i, {column[r.symbol]}] = {reduced(r)}" for r in mine]
        passes.append((lines, [column[r.symbol] for r in mine]))
    stores = []
    for t in ir.written[1:] + ir.written[:1]:  # states first, the parameter last
        # a new per-tensor scale is stored first: the codec encodes with the stored scale
        stores += [f"{t.arg_names[k]}[i].copy_({out.name})" for k, _, out in t.side if out is not None]
        stores += t.codec.torch_encode(t.output.name, [f"{a}[i]" for a in t.arg_names])
    return TorchStep(args, mutated, [s.symbol.name for s in ir.scalars], loads, body, stores, global_values,
                     [r.kind for r in ir.reductions], passes)
