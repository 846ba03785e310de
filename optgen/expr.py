"""Safe expressions: spec text → Python ``ast`` (checked against a whitelist) → sympy.

Nothing from a spec is ever evaluated by Python: the text is parsed, every node is checked against the
whitelist below, and the allowed nodes are translated one by one into sympy objects. Names must be known
symbols; functions must be in ``FUNCTIONS``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from optgen.errors import SpecError


class rsqrt(sympy.Function):
    """1/sqrt(x) as one operation (a single instruction on GPUs)."""


class tensor_sum(sympy.Function):
    """Sum of an elementwise expression over the whole tensor: one value per tensor (a reduction)."""


class tensor_max(sympy.Function):
    """Maximum of an elementwise expression over the whole tensor (a reduction)."""


REDUCTIONS = (tensor_sum, tensor_max)


def _norm(x: sympy.Expr) -> sympy.Expr:
    return sympy.sqrt(tensor_sum(x ** 2))


def _max(*args: sympy.Expr) -> sympy.Expr:
    """max(x) of one argument reduces over the tensor; max(a, b, ...) is elementwise."""
    return tensor_max(args[0]) if len(args) == 1 else sympy.Max(*args)


def _where(cond: sympy.Basic, a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    return sympy.Piecewise((a, as_condition(cond)), (b, True))


def is_condition(x: sympy.Basic) -> bool:
    """True for comparisons, and/or/not and true/false (sympy also calls a Symbol 'Boolean')."""
    return isinstance(x, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction,
                          sympy.logic.boolalg.BooleanAtom))


def as_condition(x: sympy.Basic) -> sympy.Basic:
    """A boolean for ``where``: comparisons stay, a plain number/flag x means ``x != 0``."""
    return x if is_condition(x) else sympy.Ne(x, 0)


def _clamp(x: sympy.Expr, lo: sympy.Expr, hi: sympy.Expr) -> sympy.Expr:
    return sympy.Min(sympy.Max(x, lo), hi)


# name -> (sympy constructor, allowed argument counts)
FUNCTIONS: dict[str, tuple[Callable[..., sympy.Basic], tuple[int, ...]]] = {
    "sqrt": (sympy.sqrt, (1,)),
    "rsqrt": (rsqrt, (1,)),
    "abs": (sympy.Abs, (1,)),
    "sign": (sympy.sign, (1,)),
    "exp": (sympy.exp, (1,)),
    "log": (sympy.log, (1,)),
    "min": (sympy.Min, (2, 3, 4)),
    "max": (_max, (1, 2, 3, 4)),
    "sum": (tensor_sum, (1,)),
    "norm": (_norm, (1,)),
    "where": (_where, (3,)),
    "clamp": (_clamp, (3,)),
}

BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
# A constant exponent above this is refused: sympy would compute 9**9**9 exactly (and hang), and no fp32
# update needs one.
MAX_CONSTANT_EXPONENT = 1024
NOT_FINITE = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan, sympy.I)
FP32_MAX = 3.4028234663852886e38  # the largest finite fp32 value: constants beyond it are refused

COMPARE = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge, ast.Eq: sympy.Eq,
           ast.NotEq: sympy.Ne}


@dataclass(frozen=True)
class Statement:
    """One assignment of the update block, in SSA form: ``target`` is a fresh symbol."""

    name: str  # the spec's name for the assigned value (p, m, a temporary, ...)
    target: sympy.Symbol
    expr: sympy.Expr
    line: int


class ExprBuilder:
    """Translate whitelisted ``ast`` nodes into sympy, resolving names through ``env``."""

    def __init__(self, env: dict[str, sympy.Basic], file: str, field: str, line_of: Callable[[int], int]):
        self.env = env
        self.file = file
        self.field = field
        self.line_of = line_of

    def error(self, node: ast.AST | None, message: str) -> SpecError:
        line = self.line_of(getattr(node, "lineno", 1)) if node is not None else self.line_of(1)
        return SpecError(message, file=self.file, line=line, field=self.field)

    def build(self, node: ast.AST) -> sympy.Basic:
        try:
            value = self._build(node)
        except SpecError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # e.g. a comparison used as a number
            raise self.error(node, f"invalid expression: {exc}") from None
        if value.has(*NOT_FINITE):  # 1e400, 1/0, log(0), sqrt(-1): no finite real fp32 value to compute
            raise self.error(node, f"the expression has a constant that is not a finite real number: {value}")
        # exp(1) evaluates to sympy's E (printed as a bare name): keep named constants as plain numbers
        return value.xreplace({c: sympy.Float(c.evalf(30), 30) for c in value.atoms(sympy.NumberSymbol)})

    def _fits_fp32(self, node: ast.AST, value: sympy.Basic) -> sympy.Basic:
        """Refuse a constant beyond the fp32 range as soon as it is built: the kernels compute in fp32, and a
        nested power such as (9**1024)**1024 would otherwise grow for ever."""
        if isinstance(value, sympy.Expr) and value.is_number:
            magnitude = abs(value.evalf(20))
            if magnitude.is_real and magnitude.is_finite and magnitude > FP32_MAX:
                raise self.error(node, f"the constant {str(value)[:40]} is outside the fp32 range "
                                       f"(|x| <= {FP32_MAX:.7g})")
        return value

    def _power(self, node: ast.BinOp) -> sympy.Basic:
        base, exponent = self._build(node.left), self._build(node.right)
        if exponent.is_Number and abs(exponent) > MAX_CONSTANT_EXPONENT:
            raise self.error(node, f"constant exponent {exponent} is too large "
                                   f"(at most {MAX_CONSTANT_EXPONENT})")
        return base ** exponent

    def _build(self, node: ast.AST) -> sympy.Basic:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return sympy.true if node.value else sympy.false
            if isinstance(node.value, int):
                return self._fits_fp32(node, sympy.Integer(node.value))
            if isinstance(node.value, float):
                return self._fits_fp32(node, sympy.Float(node.value))
            raise self.error(node, f"only numbers are allowed as constants, got {node.value!r}")
        if isinstance(node, ast.Name):
            if node.id not in self.env:
                raise self.error(node, f"unknown name '{node.id}' (known: {', '.join(sorted(self.env))}; "
                                       "a temporary must be assigned before it is read)")
            return self.env[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return self._fits_fp32(node, self._power(node))
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            return self._fits_fp32(node, BINOPS[type(node.op)](self._build(node.left), self._build(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = self._build(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return sympy.Not(as_condition(self._build(node.operand)))
        if isinstance(node, ast.BoolOp):
            values = [as_condition(self._build(v)) for v in node.values]
            return sympy.And(*values) if isinstance(node.op, ast.And) else sympy.Or(*values)
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1 or type(node.ops[0]) not in COMPARE:
                raise self.error(node, "only single comparisons (a < b) are allowed")
            return COMPARE[type(node.ops[0])](self._build(node.left), self._build(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return _where(self._build(node.test), self._build(node.body), self._build(node.orelse))
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise self.error(node, "only plain function calls like sqrt(x) are allowed")
            name = node.func.id
            if name not in FUNCTIONS:
                raise self.error(node, f"unknown function '{name}' (allowed: {', '.join(sorted(FUNCTIONS))})")
            if node.keywords:
                raise self.error(node, f"{name}() takes positional arguments only")
            fn, counts = FUNCTIONS[name]
            if len(node.args) not in counts:
                raise self.error(node, f"{name}() takes {' or '.join(map(str, counts))} arguments")
            return self._fits_fp32(node, fn(*[self._build(a) for a in node.args]))
        raise self.error(node, f"'{type(node).__name__}' is not allowed in a spec expression "
                               "(only arithmetic, comparisons and whitelisted functions)")


def _parse(text: str, mode: str, file: str, field: str, line_of: Callable[[int], int]) -> ast.AST:
    try:
        return ast.parse(text, mode=mode)
    except SyntaxError as exc:
        raise SpecError(f"syntax error: {exc.msg}", file=file, line=line_of(exc.lineno or 1), field=field) from None


def parse_update(text: str, env: dict[str, sympy.Symbol], assignable: set[str], file: str,
                 first_line: int) -> list[Statement]:
    """Parse the update block into SSA statements.

    ``env`` maps every readable name to its input symbol; ``assignable`` names may be (re)assigned
    (p, g, states); other new names become temporaries. Each assignment makes a fresh symbol.
    """
    def line_of(lineno: int) -> int:
        return first_line + lineno - 1

    env = dict(env)
    protected = set(env) - assignable
    taken = set(env)
    module = _parse(text, "exec", file, "update", line_of)
    builder = ExprBuilder(env, file, "update", line_of)
    statements: list[Statement] = []
    for node in module.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            raise builder.error(node, "each line of update must be one assignment 'name = expression'")
        name = node.targets[0].id
        if name in protected:
            raise builder.error(node, f"'{name}' is a hyper-parameter or the step count and cannot be assigned")
        if name.startswith("_"):
            raise builder.error(node, f"names starting with '_' are reserved, got '{name}'")
        expr = builder.build(node.value)
        if is_condition(expr) and name in assignable:  # a named condition is fine as a temporary
            raise builder.error(node, f"'{name}' is assigned a condition; use where(cond, a, b) for a value")
        target_name = name
        k = 1
        while target_name in taken:
            target_name = f"{name}_{k}"
            k += 1
        taken.add(target_name)
        target = sympy.Symbol(target_name)
        env[name] = target
        builder.env = env
        statements.append(Statement(name, target, expr, line_of(node.lineno)))
    return statements


def parse_condition(text: str, env: dict[str, sympy.Symbol], file: str, field: str, line: int) -> sympy.Basic:
    """Parse a single boolean expression (a spec's ``checks``)."""
    node = _parse(text, "eval", file, field, lambda _: line)
    condition = as_condition(ExprBuilder(env, file, field, lambda _: line).build(node.body))
    if condition.has(*REDUCTIONS):
        raise SpecError("a check is on hyper-parameters: whole-tensor reductions (sum, max, norm) have no value "
                        "there", file=file, line=line, field=field)
    return condition
