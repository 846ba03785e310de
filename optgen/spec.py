"""Load and validate a YAML optimizer spec into plain dataclasses, remembering the line of every field.

A spec is data: this module reads YAML with PyYAML's safe composer (no tags, no object construction)
and checks every field against a fixed schema. Expressions stay text here; ``optgen.expr`` parses them.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optgen.errors import SpecError
from optgen.expr import FP32_MAX

IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
MODULE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?inf$")
RANGE = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])\s*$")

TOP_FIELDS = {"name", "class", "doc", "hyperparams", "param", "grad", "state", "update", "checks"}
HYPER_FIELDS = {"default", "range", "names", "doc"}
STORAGE_FIELDS = {"storage"}  # codec-specific options are checked by the codec
STATE_FIELDS = {"storage", "init", "torch_name"}
CHECK_FIELDS = {"require", "message"}
RESERVED = {"p", "g", "t"}
# modules the generated code imports (a generated module of the same name in their folder would shadow them)
SHADOWED_MODULES = {"torch", "triton", "optgen", "sympy", "jinja2", "yaml", "numpy"}


@dataclass(frozen=True)
class Interval:
    """A closed/open interval such as ``[0, 1)``, used to validate a hyper-parameter."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def contains(self, x: float) -> bool:
        if math.isnan(x):
            return False
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def __str__(self) -> str:
        def fmt(v: float) -> str:
            return "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)

        return f"{'[' if self.low_closed else '('}{fmt(self.low)}, {fmt(self.high)}{']' if self.high_closed else ')'}"


@dataclass(frozen=True)
class HyperParam:
    """One constructor argument / param_group key. A pair (``betas``) exposes one symbol per element."""

    name: str
    default: float | bool | tuple[float, ...]
    interval: Interval | None
    names: tuple[str, ...]  # the symbols the update may use: (name,) or e.g. ("beta1", "beta2")
    doc: str = ""

    @property
    def kind(self) -> str:
        if isinstance(self.default, bool):
            return "bool"
        return "tuple" if isinstance(self.default, tuple) else "float"


@dataclass(frozen=True)
class Storage:
    """The storage format of one tensor: a codec name plus its options (validated by the codec)."""

    codec: str
    options: dict[str, Any]
    line: int | None


@dataclass(frozen=True)
class StateSpec:
    name: str
    storage: Storage
    init: float
    torch_name: str = ""  # the key of this state in the matching torch.optim optimizer (checkpoint interop)


@dataclass(frozen=True)
class Check:
    """A constraint between hyper-parameters, checked in the constructor (e.g. nesterov needs momentum)."""

    require: str
    message: str
    line: int | None


@dataclass
class Spec:
    name: str
    class_name: str
    doc: str
    hyperparams: list[HyperParam]
    param: Storage
    grad: Storage
    state: list[StateSpec]
    update: str
    update_line: int  # file line of the first line of the update text
    checks: list[Check] = field(default_factory=list)
    file: str = "<spec>"
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    def error(self, message: str, field_path: tuple = (), line: int | None = None) -> SpecError:
        """A SpecError pointing at ``field_path`` (or an explicit line)."""
        if line is None:
            line = self.lines.get(field_path)
        return SpecError(message, file=self.file, line=line, field=".".join(map(str, field_path)))

    @property
    def scalar_names(self) -> list[str]:
        return [n for h in self.hyperparams for n in h.names]


# The only YAML tags a spec may carry (explicitly or implicitly): plain data. A plain scalar that YAML 1.1
# would read as a date stays text. Anything else (``!!python/...``, ``!!binary``, ``!!set``, local ``!tags``)
# is rejected, so a spec can never ask for an object to be built.
DATA_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}
TEXT_TAGS = {"tag:yaml.org,2002:timestamp"}


def _check_tag(node: yaml.Node, path: tuple, file: str) -> None:
    if node.tag not in DATA_TAGS and node.tag not in TEXT_TAGS:
        raise SpecError(f"YAML tags such as '{node.tag}' are not allowed in a spec", file=file,
                        line=node.start_mark.line + 1, field=".".join(map(str, path)))


def _to_python(node: yaml.Node, path: tuple, lines: dict[tuple, int], file: str) -> Any:
    """Convert a composed YAML node to plain Python, recording the 1-based line of each path."""
    _check_tag(node, path, file)
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError("mapping keys must be plain names", file=file, line=key_node.start_mark.line + 1,
                                field=".".join(map(str, path)))
            _check_tag(key_node, path, file)
            key = key_node.value
            if key in out:
                raise SpecError(f"duplicate key '{key}'", file=file, line=key_node.start_mark.line + 1,
                                field=".".join(map(str, path + (key,))))
            out[key] = _to_python(value_node, path + (key,), lines, file)
            lines[path + (key,)] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.ScalarNode) and value_node.style in ("|", ">"):
                lines[path + (key, "__text__")] = value_node.start_mark.line + 2
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, path + (i,), lines, file) for i, n in enumerate(node.value)]
    if node.tag in TEXT_TAGS:
        return node.value
    # Build the scalar from the composed node (never by parsing its text again as a YAML document).
    construct = yaml.constructor.SafeConstructor.yaml_constructors[node.tag]
    try:
        value = construct(yaml.constructor.SafeConstructor(), node)
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as exc:  # '!!int adamw', '!!bool maybe'
        raise SpecError(f"the value {node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]} ({exc})", file=file,
                        line=node.start_mark.line + 1, field=".".join(map(str, path))) from None
    if node.style is None and isinstance(value, str) and NUMBER.match(value):  # YAML 1.1 reads '1e-3' as text
        return float(value)
    return value


def _parse_yaml(text: str, file: str) -> tuple[dict, dict[tuple, int]]:
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):  # could expand exponentially (or forever, if recursive)
                raise SpecError(f"YAML aliases such as '*{event.anchor}' are not allowed in a spec",
                                file=file, line=event.start_mark.line + 1)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and "block" not in context and context_mark is not None and \
                (mark is None or context_mark.line != mark.line):
            problem += f" ({context} that starts on line {context_mark.line + 1})"  # e.g. an unclosed '{'
        raise SpecError(f"malformed YAML: {problem}", file=file, line=line) from None
    if node is None or not isinstance(node, yaml.MappingNode):
        raise SpecError("a spec must be a YAML mapping of fields (name, class, update, ...)", file=file, line=1)
    lines: dict[tuple, int] = {}
    data = _to_python(node, (), lines, file)
    return data, lines


def _parse_interval(text: Any, err) -> Interval:
    m = RANGE.match(str(text))
    if not m:
        raise err(f"range must look like '[0, 1)' or '(0, inf)', got {text!r}")
    try:
        low, high = float(m.group(2)), float(m.group(3))
    except ValueError:
        raise err(f"range bounds must be numbers or inf, got {text!r}") from None
    if not low <= high:
        raise err(f"range {text!r} is empty")
    return Interval(low, high, m.group(1) == "[", m.group(4) == "]")


def _number(value: Any, err) -> float:
    """A finite number that fp32 holds (the generated code computes in fp32 and prints it as a literal)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise err(f"expected a number, got {value!r}")
    if isinstance(value, int) and abs(value) > FP32_MAX or not abs(float(value)) <= FP32_MAX:
        raise err(f"expected a finite number within the fp32 range (|x| <= {FP32_MAX:.7g}), got {value!r}")
    return float(value)


def _check_ident(name: Any, err, what: str) -> str:
    if not isinstance(name, str) or not IDENT.match(name) or keyword.iskeyword(name):
        raise err(f"{what} must be an identifier (letters, digits, '_'), got {name!r}")
    return name


def _text(value: Any, err) -> str:
    """Free text (doc strings, messages): a string of printable characters, tabs and newlines."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise err(f"expected text, got {value!r}")
    bad = [c for c in value if not (c.isprintable() or c in "\t\n\r ")]
    if bad:
        raise err(f"text may not contain control characters, got {bad[0]!r}")
    return value


def _unknown_fields(spec: Spec, data: dict, allowed: set[str], path: tuple) -> None:
    for key in data:
        if key not in allowed:
            raise spec.error(f"unknown field '{key}' (expected one of: {', '.join(sorted(allowed))})",
                             path + (key,))


def _hyperparam(spec: Spec, name: str, body: Any) -> HyperParam:
    path = ("hyperparams", name)

    def err(msg: str, sub: str = ""):
        return spec.error(msg, path + ((sub,) if sub else ()))

    _check_ident(name, err, "a hyper-parameter name")
    if not isinstance(body, dict):
        body = {"default": body}
    _unknown_fields(spec, body, HYPER_FIELDS, path)
    if "default" not in body:
        raise err("missing field 'default'")
    raw = body["default"]
    interval = _parse_interval(body["range"], lambda m: err(m, "range")) if "range" in body else None
    if isinstance(raw, list):
        default: Any = tuple(_number(v, lambda m: err(m, "default")) for v in raw)
        names = body.get("names")
        if names is None and name == "betas":
            names = [f"beta{i + 1}" for i in range(len(default))]
        if not isinstance(names, list) or len(names) != len(default):
            raise err(f"a list default needs 'names' with {len(default)} symbols", "names")
        names = tuple(_check_ident(n, lambda m: err(m, "names"), "a symbol") for n in names)
        values = default
    elif isinstance(raw, bool):
        default, names, values = raw, (name,), ()
        if interval is not None:
            raise err("a boolean hyper-parameter has no range", "range")
    else:
        default = _number(raw, lambda m: err(m, "default"))
        names, values = (name,), (default,)
        if "names" in body:
            raise err("'names' is only for list defaults such as betas", "names")
    for v in values:
        if interval is not None and not interval.contains(v):
            raise err(f"default {v!r} is outside its range {interval}", "default")
    return HyperParam(name, default, interval, names, _text(body.get("doc"), lambda m: err(m, "doc")))


def _storage(spec: Spec, body: Any, path: tuple, allowed: set[str]) -> Storage:
    if isinstance(body, str):
        body = {"storage": body}
    if isinstance(body, dict) and "storage" not in body:
        for key in body:
            if key not in allowed:  # most likely a misspelling of 'storage'
                raise spec.error(f"unknown field '{key}' (expected 'storage', e.g. {{storage: fp32}})",
                                 path + (key,))
    if not isinstance(body, dict) or "storage" not in body:
        raise spec.error("expected a mapping with a 'storage' field, e.g. {storage: fp32}", path)
    codec = body["storage"]
    if not isinstance(codec, str):
        raise spec.error(f"storage must be a codec name, got {codec!r}", path + ("storage",))
    options = {k: v for k, v in body.items() if k not in allowed}
    return Storage(codec, options, spec.lines.get(path + ("storage",)))


def load_spec_text(text: str, file: str = "<spec>") -> Spec:
    """Parse and validate the spec's structure (expressions and codecs are checked later in the pipeline)."""
    data, lines = _parse_yaml(text, file)
    spec = Spec(name="", class_name="", doc="", hyperparams=[], param=Storage("native", {}, None),
                grad=Storage("native", {}, None), state=[], update="", update_line=0, file=file, lines=lines)
    _unknown_fields(spec, data, TOP_FIELDS, ())
    for required in ("name", "class", "update", "param"):
        if required not in data:
            raise spec.error(f"missing required field '{required}'", (required,), line=1)

    spec.name = data["name"]
    if not isinstance(spec.name, str) or not MODULE_NAME.match(spec.name) or keyword.iskeyword(spec.name):
        raise spec.error(f"name must be a lower-case module name like 'flash_adamw', got {spec.name!r}",
                         ("name",))
    if spec.name in SHADOWED_MODULES or spec.name in sys.stdlib_module_names:
        raise spec.error(f"name '{spec.name}' is the name of a module the generated code (or Python) imports: a "
                         f"generated {spec.name}.py would shadow it", ("name",))
    spec.class_name = data["class"]
    if not isinstance(spec.class_name, str) or not CLASS_NAME.match(spec.class_name) or \
            keyword.iskeyword(spec.class_name) or hasattr(builtins, spec.class_name):
        raise spec.error(f"class must be a CamelCase class name that is not a Python keyword or builtin, got "
                         f"{spec.class_name!r}", ("class",))
    spec.doc = _text(data.get("doc"), lambda m: spec.error(m, ("doc",)))

    hyper = data.get("hyperparams", {}) or {}
    if not isinstance(hyper, dict):
        raise spec.error("hyperparams must be a mapping of name: {default: ...}", ("hyperparams",))
    if "lr" not in hyper:
        raise spec.error("every optimizer needs an 'lr' hyper-parameter", ("hyperparams",))
    spec.hyperparams = [_hyperparam(spec, name, body) for name, body in hyper.items()]

    spec.param = _storage(spec, data["param"], ("param",), STORAGE_FIELDS)
    spec.grad = _storage(spec, data.get("grad", {"storage": "native"}), ("grad",), STORAGE_FIELDS)

    state = data.get("state", {}) or {}
    if not isinstance(state, dict):
        raise spec.error("state must be a mapping of name: {storage: ...}", ("state",))
    for name, body in state.items():
        path = ("state", name)
        _check_ident(name, lambda m, p=path: spec.error(m, p), "a state name")
        storage = _storage(spec, body, path, STATE_FIELDS)
        init = body.get("init", 0) if isinstance(body, dict) else 0
        torch_name = body.get("torch_name", name) if isinstance(body, dict) else name
        _check_ident(torch_name, lambda m, p=path: spec.error(m, p + ("torch_name",)), "torch_name")
        spec.state.append(StateSpec(name, storage, _number(init, lambda m, p=path: spec.error(m, p + ("init",))),
                                    torch_name))

    checks = data.get("checks", []) or []
    if not isinstance(checks, list):
        raise spec.error("checks must be a list of {require: <condition>, message: <text>}", ("checks",))
    for i, check in enumerate(checks):
        path = ("checks", i)
        if not isinstance(check, dict) or "require" not in check:
            raise spec.error("each check is {require: <condition>, message: <text>}", path)
        _unknown_fields(spec, check, CHECK_FIELDS, path)
        message = _text(check.get("message"), lambda m, p=path: spec.error(m, p + ("message",)))
        spec.checks.append(Check(str(check["require"]), message, lines.get(path + ("require",))))

    # every name a spec defines, with the field that defines it (for the error's line)
    defined = [(h.name, ("hyperparams", h.name)) for h in spec.hyperparams] + \
        [(n, ("hyperparams", h.name, "names")) for h in spec.hyperparams if h.names != (h.name,)
         for n in h.names] + \
        [(s.name, ("state", s.name)) for s in spec.state]
    for n, path in defined:
        if n in RESERVED:
            raise spec.error(f"'{n}' is reserved (p = parameter, g = gradient, t = step)", path)
    symbols = [n for h in spec.hyperparams for n in h.names] + [s.name for s in spec.state]
    for n, path in defined:
        if symbols.count(n) > 1:
            raise spec.error(f"name used twice: {n}", path)

    update = data["update"]
    if not isinstance(update, str) or not update.strip():
        raise spec.error("update must be a block of assignments (use 'update: |')", ("update",))
    spec.update = update
    spec.update_line = lines.get(("update", "__text__"), lines.get(("update",), 1))
    return spec


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"cannot read spec: not UTF-8 text (byte {exc.start})", file=str(path)) from None
    return load_spec_text(text, str(path))
