"""The PyTorch backend: the update as plain torch ops over a list of tensors (fp32 math).

It runs on every device, is the reference for the Triton kernel, and is what ``backend="inductor"`` hands
to ``torch.compile``. Scalars arrive as one fp32 tensor so that changing lr never recompiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from optgen.backends.printing import BasePrinter
from optgen.ir import IR


class TorchPrinter(BasePrinter):
    sqrt_fn = "optgen_torch.sqrt_rn"
    rsqrt_fn = "optgen_torch.rsqrt_rn"
    functions = {"Abs": "torch.abs", "sign": "torch.sign", "exp": "torch.exp", "log": "torch.log",
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


def render_torch_step(ir: IR) -> TorchStep:
    printer = TorchPrinter()
    args = [a for t in ir.tensors for a in t.arg_names]
    mutated = tuple(a for t in ir.written for a in t.arg_names)
    loads = [line for t in ir.tensors for line in t.codec.torch_decode(t.input.name, [f"{a}[i]" for a in t.arg_names])]
    loads += [f"{sym.name} = {t.arg_names[k]}[i]" for t in ir.tensors for k, sym, _ in t.side]
    inputs = {t.input for t in ir.tensors}
    body = []
    pending = list(ir.reductions)
    if any(sympy.Symbol("numel") in st.expr.free_symbols for st in ir.statements) or \
            any(sympy.Symbol("numel") in r.arg.free_symbols for r in ir.reductions):
        # a device tensor: dividing by a Python number on CUDA multiplies by its reciprocal (not exact)
        body.append("numel = torch.full((), param[i].numel(), dtype=torch.float32, device=p.device)")
    per_tensor = {s.symbol for s in ir.scalars} | {r.symbol for r in ir.reductions} | {sympy.Symbol("numel")}
    per_tensor |= {sym for t in ir.tensors for _, sym, _ in t.side}

    def emit_reductions(symbols: set) -> None:
        """Each reduction right before its first use (after the reductions its argument needs)."""
        for r in [r for r in pending if r.symbol in symbols]:
            pending.remove(r)
            emit_reductions(r.arg.free_symbols)
            arg = printer.doprint(r.arg)
            if r.arg.free_symbols <= per_tensor:  # no elementwise value in it: broadcast to the tensor
                arg = f"torch.full_like(p, 1.0) * ({arg})"
            fn = "torch.sum" if r.kind == "sum" else "optgen_torch.tensor_max"
            body.append(f"{r.symbol.name} = {fn}({arg})")

    for st in ir.statements:
        emit_reductions(st.expr.free_symbols)
        if st.expr.is_Number:
            code = f"torch.full_like(p, {printer.doprint(st.expr)})"
        elif st.expr in inputs:  # a bare copy of an input would alias a buffer that is overwritten below
            code = f"{printer.doprint(st.expr)}.clone()"
        else:
            code = printer.doprint(st.expr)
        body.append(f"{st.target.name} = {code}")
    stores = []
    for t in ir.written[1:] + ir.written[:1]:  # states first, the parameter last
        # a new per-tensor scale is stored first: the codec encodes with the stored scale
        stores += [f"{t.arg_names[k]}[i].copy_({out.name})" for k, _, out in t.side if out is not None]
        stores += t.codec.torch_encode(t.output.name, [f"{a}[i]" for a in t.arg_names])
    return TorchStep(args, mutated, [s.symbol.name for s in ir.scalars], loads, body, stores)
