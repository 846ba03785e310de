"""sympy printers shared by the backends: readable Python with exact float literals."""

from __future__ import annotations

from typing import ClassVar

import sympy
from sympy.printing.pycode import PythonCodePrinter


class BasePrinter(PythonCodePrinter):
    """Python syntax; subclasses choose the function names (``math``-like, torch, triton)."""

    sqrt_fn = "sqrt"
    rsqrt_fn = "rsqrt"
    functions: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__({"fully_qualified_modules": False, "standard": "python3"})

    def _print_Float(self, expr: sympy.Float) -> str:
        return repr(float(expr))

    def _print_Rational(self, expr: sympy.Rational) -> str:
        return repr(float(expr))

    def _print_Half(self, expr: sympy.Rational) -> str:
        return "0.5"

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exp = expr.args
        if exp == sympy.Rational(-1, 2):
            return f"{self.rsqrt_fn}({self._print(base)})"
        if exp == sympy.Rational(1, 2):
            return f"{self.sqrt_fn}({self._print(base)})"
        return super()._print_Pow(expr, rational=rational)

    def _print_rsqrt(self, expr: sympy.Basic) -> str:
        return f"{self.rsqrt_fn}({self._print(expr.args[0])})"

    def _print_Function(self, expr: sympy.Basic) -> str:
        name = type(expr).__name__
        if name in self.functions:
            return f"{self.functions[name]}({', '.join(self._print(a) for a in expr.args)})"
        return super()._print_Function(expr)

    def _print_Abs(self, expr: sympy.Basic) -> str:
        return f"{self.functions['Abs']}({self._print(expr.args[0])})"

    def _print_sign(self, expr: sympy.Basic) -> str:
        return f"{self.functions['sign']}({self._print(expr.args[0])})"

    def _print_exp(self, expr: sympy.Basic) -> str:
        return f"{self.functions['exp']}({self._print(expr.args[0])})"

    def _print_log(self, expr: sympy.Basic) -> str:
        return f"{self.functions['log']}({self._print(expr.args[0])})"

    def _binary_chain(self, fn: str, args: tuple) -> str:
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr: sympy.Basic) -> str:
        return self._binary_chain(self.functions["Min"], expr.args)

    def _print_Max(self, expr: sympy.Basic) -> str:
        return self._binary_chain(self.functions["Max"], expr.args)

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        *branches, (last, _) = expr.args
        out = self._print(last)
        for value, cond in reversed(branches):
            out = f"{self.functions['where']}({self._print(cond)}, {self._print(value)}, {out})"
        return out


class HostPrinter(BasePrinter):
    """Scalars on the host: Python floats (or 0-d tensors) through ``optgen.runtime.hostmath``."""

    sqrt_fn = "hm.sqrt"
    rsqrt_fn = "hm.rsqrt"
    functions: ClassVar[dict[str, str]] = {"Abs": "abs", "sign": "hm.sign", "exp": "hm.exp", "log": "hm.log", "Min": "hm.minimum",
                 "Max": "hm.maximum", "where": "hm.where"}
