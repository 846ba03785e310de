"""Render a lowered spec into one readable Python module (jinja2 template + sympy printers) and write it."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path
from types import ModuleType

import jinja2
import sympy

from optgen.backends.printing import HostPrinter
from optgen.backends.torch import render_torch_step
from optgen.backends.triton import render_triton_kernel
from optgen.codecs.rng import STREAM_NAMES
from optgen.ir import IR, lower
from optgen.spec import HyperParam, Spec, load_spec

TILE_COLS = 256  # row length of elementwise specs (grouped formats use their group size)
LAYOUT_LABELS = {"": "as specified", "fp32": "with fp32 states", "native": "fp32 states, parameter as it is"}


def tile_config(group_size: int, needs_rng: bool, has_reductions: bool,
                aligned_groups: bool) -> tuple[int, int, bool]:
    """(elements per program, num_warps, aligned hint) of a kernel; swept on an H100 (benchmarks/RESULTS.md).
    ``aligned_groups``: whether every grouped format of the kernel takes the hint (``Codec.aligned_hint``).

    Small tiles move bytes fastest: more programs fit on an SM, and each thread keeps fewer values live.
    Kernel alone, large set, one run, 4096 elements x 8 warps -> 512 x 4: AdamW 0.93 -> 0.97 of copy
    bandwidth, SGD 0.94 -> 0.96, Lion 0.83 -> 0.99. Kernels with whole-tensor reductions (two passes, per-program
    partial sums) and stochastic rounding (whose hash makes every element heavier) do best at 1024 x 4: Lamb
    0.57 -> 0.61, Lamb16 0.20 -> 0.22; StochasticAdamW 2.6x faster than at 4096 x 8. Grouped formats (one
    group per row) took 512 x 4 then (against 1024 x 8 or 4, with the kernels of that time: FlashAdamW 3.60 ->
    2.89 ms, AdamW8bit 4.90 -> 4.31; see below for now). Groups of 32 (q8) also want vector loads (the
    ``aligned`` hint: 1.7x); q4 and q8_dynamic did without. Twelfth session, with the kernels of then, back to
    back: AdamW4bit 2.30-2.32 -> 2.15-2.16 ms with the hint, so q4 takes it; q8_dynamic took it in the
    sixteenth session, once its table gathers kept the tile's layout (AdamW8bit 2.04 -> 1.77 ms back to back).
    Since whole tiles run unmasked (so their loads vectorize), the hint also shortens elementwise kernels
    (sm_90 SASS of a whole tile: AdamW 224 -> 197 instructions, StochasticAdamW 864 -> 792) but lengthens
    Lamb16's (its update pass 1737 -> 1792), so kernels with reductions go without.
    Kernels with reductions then take 2048 x 4 (seventh session, same H100, back-to-back: Lamb16 6.02 ->
    5.05 ms, Lamb 4.46 -> 4.42; every thread computes the per-tensor factors, so more elements per thread pay).
    Ninth session: grouped formats take 1024 x 4, eight elements per thread, which halves each thread's fixed
    work (pointers, scalars, group indices) per element. Kernel alone, H100, large set, 512 -> 1024: FlashSGD
    1.227 -> 1.158 ms, FlashLion 1.383 -> 1.272, FlashAdam 1.813 -> 1.608, AdamW8bit 2.426 -> 2.268, AdamW4bit
    2.557 -> 2.523; FlashAdamW 1.883 -> 1.753 with its partial tile in slices (``masked_slice_rows``).
    """
    if group_size > 1:
        return 1024, 4, aligned_groups
    if has_reductions:
        return 2048, 4, False
    return (1024, 4, True) if needs_rng else (512, 4, True)


def masked_slice_rows(rows: int, cols: int, warps: int, buffers: int, has_slots: bool) -> int | None:
    """Rows per slice of a tensor's last, partial tile, about two elements per thread; None: it runs whole.

    Its loads do not vectorize, so a whole partial tile needs more registers than the full tiles, and the kernel
    is allocated for its heavier path: FlashAdamW's 32 x 32 tile needs 70 registers unmasked, 95 with the masked
    path (sm_90), 80 with the masked path in a loop over slices. But the loop costs registers of its own: at
    512 x 4, back to back on an H100, slices made FlashSGD 1.155 -> 1.306 ms (32 -> 48 registers), FlashLion
    1.303 -> 1.377, FlashAdam 1.738 -> 1.872. So only kernels that hold many values per thread (buffers times
    elements per thread, at least 48: at 1024 x 4 FlashAdamW, FlashAdam, AdamW8bit and AdamW4bit, not FlashSGD
    or FlashLion) slice it; there FlashAdamW's kernel took 1.753 ms against 1.862 whole (kernel alone).
    AdamW8bit and AdamW4bit, capped at 56 and 64 registers, spill at 1024 x 4 even so (sm_90: 48 and 120 bytes
    of stack; 72 and 144 with whole partial tiles), and were faster there than at 512 x 4 all the same (kernel
    alone, AdamW8bit: 2.246 against 2.655 ms sliced, 2.298 against 2.400 whole). Kernels with per-tensor slots
    (reductions, staged scales) store one value per program or test ``start == 0``, so their partial tiles run
    whole."""
    per_thread = rows * cols // (32 * warps)
    slice_rows = max(1, 64 * warps // cols)
    if has_slots or slice_rows >= rows or buffers * per_thread < 48:
        return None
    return slice_rows


def formats_register_cap(codecs: list) -> int | None:
    """The register cap per thread (Triton's ``maxnreg``) of a kernel without reductions: the one its grouped and
    stochastic-rounding formats all declare, else None (an unmeasured mix runs uncapped).

    A kernel takes the registers of its heavier path, the masked last tile of a tensor (whose
    loads do not vectorize: FlashAdamW's alone needs 96, its whole tile 56, the two together 64). Capped at
    what the whole tile needs, the masked path spills instead (it runs once per tensor) and more programs fit
    on an SM. Eighth session, H100, large set, kernel alone (``tune_tile``), no cap -> cap: AdamW8bit 2.34 ->
    2.24 ms (56; 48 spills in the whole tile too: 2.41), AdamW4bit 3.06 -> 2.99 (64; 56: 3.13),
    StochasticAdamW 1.73 -> 1.62 (64). But any cap, even one above the kernel's own count, changes how ptxas
    allocates: the q8-group kernels lose with every cap from 72 down but FlashAdamW's (FlashSGD, 48 registers
    of its own, 1.35 -> 1.54 ms at 72; FlashLion 1.46 -> 1.58; FlashAdamW 2.00 -> 1.95 at 48), so they go
    without. So each format declares its cap (``Codec.register_cap``, measured on its built-in spec; q4's 64 was
    dropped when its kernel changed, see ``Q4Codec``).
    """
    caps = {c.register_cap for c in codecs if c.group_size > 1 or c.needs_rng}
    return caps.pop() if len(caps) == 1 else None


def formats_aligned(codecs: list) -> bool:
    """Whether a kernel with grouped formats takes the ``aligned`` hint: only if each of them does
    (``Codec.aligned_hint``, measured on its built-in spec; see ``tile_config``)."""
    return all(c.aligned_hint for c in codecs if c.group_size > 1)


def _docstring(text: str) -> str:
    """Text that is safe on one line of a comment or inside a triple-quoted docstring (a spec is data).

    Whitespace (newlines included) collapses to single spaces, other control characters are dropped,
    backslashes and quotes are escaped.
    """
    text = "".join(c for c in " ".join(str(text).split()) if c.isprintable())
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _wrap_args(args: list[str], indent: int) -> str:
    """Arguments joined by commas, broken into lines of at most 120 characters that start at column ``indent``."""
    lines = [""]
    for k, arg in enumerate(args):
        piece = arg + ("," if k < len(args) - 1 else "")
        if lines[-1] and indent + len(lines[-1]) + 1 + len(piece) > 119:
            lines.append("")
        lines[-1] += (" " if lines[-1] else "") + piece
    return ("\n" + " " * indent).join(lines)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files("optgen.templates").joinpath(name).read_text()),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["docstring"] = _docstring
    env.filters["pyrepr"] = repr
    env.filters["wrap_args"] = _wrap_args
    return env


def _py_float(x: float) -> str:
    return "math.inf" if x == math.inf else "-math.inf" if x == -math.inf else repr(float(x))


def _hyperparam_context(h: HyperParam) -> dict:
    if h.kind == "tuple":
        default_code = repr(tuple(float(v) for v in h.default))
    elif h.kind == "bool":
        default_code = repr(h.default)
    else:
        default_code = repr(float(h.default))
    args = [repr(h.name), repr(h.kind), default_code]
    if h.interval is not None:
        i = h.interval
        args += [f"low={_py_float(i.low)}", f"high={_py_float(i.high)}", f"low_closed={i.low_closed}",
                 f"high_closed={i.high_closed}"]
    return {"name": h.name, "doc": h.doc, "default_code": default_code, "interval": h.interval,
            "rule": f"HyperParamRule({', '.join(args)})"}


def _hp_unpack(spec: Spec) -> list[str]:
    lines = []
    for h in spec.hyperparams:
        if h.kind == "tuple":
            lines.append(f"{', '.join(h.names)} = hp[{h.name!r}]")
        else:
            lines.append(f"{h.name} = hp[{h.name!r}]")
    return lines


def _storage_summary(ir: IR) -> str:
    parts = []
    for t in ir.tensors:
        label = {"param": "parameter", "grad": "gradient"}.get(t.role, t.name)
        parts.append(f"{label} {t.codec.name}")
    return ", ".join(parts)


def _init_state_lines(ir: IR) -> list[str]:
    """Body of the generated ``init_state(p)``: allocate every state buffer and encode its initial value.

    Side buffers of the parameter (e.g. an ECC correction) start at zero: the parameter holds its value exactly.
    """
    dtypes = {"param": "p.dtype", "ecc8": "ecc.ecc8_dtype(p.dtype)"}
    shapes = {"param": "p.shape", "half": "((numel + 1) // 2,)", "scalar": "()"}
    lines = ["numel = p.numel()"]
    if ir.needs_rng:
        lines.append("rng, i = None, 0  # the initial values are rounded to nearest")
    keys = []
    for t in ir.tensors:
        if t.role == "grad":
            continue
        for arg, key, b in zip(t.arg_names, t.state_keys, t.codec.buffers()):
            if key is None:
                continue
            shape = shapes.get(b.shape) or f"((numel + {t.codec.group_size - 1}) // {t.codec.group_size},)"
            dtype = dtypes.get(b.dtype, f"torch.{b.dtype}")
            if b.shape == "scalar":  # a per-tensor value (e.g. a scale) the encode below reads
                lines.append(f"{arg} = torch.full((), {float(b.init)!r}, dtype={dtype}, device=p.device)")
            else:
                fill = "zeros" if t.role == "param" else "empty"
                lines.append(f"{arg} = torch.{fill}({shape}, dtype={dtype}, device=p.device)")
            keys.append((key, arg))
        if t.role == "state":
            lines.append(f"{t.input.name} = torch.full((numel,), {float(t.init)!r}, device=p.device)")
            lines += t.codec.torch_encode(t.input.name, t.arg_names)
    lines.append("return {" + ", ".join(f"{k!r}: {a}" for k, a in keys) + "}")
    return lines


def _buffer_records(ir: IR) -> list[str]:
    """``Buffer(...)`` constructor calls, one per op argument, for the generated class."""
    records = []
    names = {s.name: s.torch_name for s in ir.spec.state}
    reads = ir.reads_per_step()
    for t in ir.tensors:
        for arg, key, b in zip(t.arg_names, t.state_keys, t.codec.buffers()):
            fields = [repr(arg), repr(key), repr(b.dtype)]
            if t.output is not None:
                fields.append("written=True")
            if reads[t.name] != 1:
                fields.append(f"reads={reads[t.name]}")
            if b.shape != "param":
                fields.append(f"shape={b.shape!r}")
            if b.shape == "groups":
                fields.append(f"group={t.codec.group_size}")
            if t.role == "state":
                fields.append(f"state={names[t.name]!r}")
            records.append(f"Buffer({', '.join(fields)})")
    return records


def _checkpoint_lines(ir: IR) -> tuple[list[str], list[str]]:
    """Bodies of ``export_state(p, state)`` (fp32 values under torch.optim's names, and the fp32 master
    weight) and ``import_state(p, values)`` (encode fp32 values into this layout's buffers)."""
    names = {s.name: s.torch_name for s in ir.spec.state}
    export = ["param, i = [p], 0  # codec snippets name the parameter as in the fallback's loop", "out = {}"]
    for t in ir.tensors:
        if t.role == "grad":
            continue
        refs = ["p" if key is None else f"state[{key!r}]" for key in t.state_keys]
        export += t.codec.torch_decode("value", refs)
        name = "master" if t.role == "param" else names[t.name]
        export.append(f"out[{name!r}] = value.reshape(p.shape)")
    export.append("return out")
    imp = _init_state_lines(ir)[:-1]  # allocate and encode the initial values ...
    for t in ir.tensors:  # ... then encode the given ones
        if t.role == "state":
            imp.append(f"if {names[t.name]!r} in values:")
            value = f"values[{names[t.name]!r}].reshape(-1).to(device=p.device, dtype=torch.float32)"
            imp.append(f"    {t.input.name} = {value}")
            imp += ["    " + line for line in t.codec.torch_encode(t.input.name, t.arg_names)]
    imp.append(_init_state_lines(ir)[-1])
    return export, imp


def _tile_args(kernel, uses_numel: bool) -> list[str]:
    """The kernel's names that its tile function reads: every buffer and scalar, then those of the program's own
    values (tensor, first element, counts, reduction slots) that its lines mention."""
    lines = kernel.loads + kernel.body + kernel.stores + kernel.epilogue
    lines += [line for lines_of_pass in kernel.passes for line in lines_of_pass]
    text = "\n".join(lines + (["start == 0"] if kernel.epilogue else []))  # the template's epilogue test
    optional = ([*STREAM_NAMES, *(name for name, _ in kernel.constants), "red", "part", "pid", "tensor", "start",
                 "numel_here"] + (["numel"] if uses_numel else []))
    buffers = [a.removesuffix("_ptrs") for a in kernel.table_args]  # each table's typed pointer, in the kernel
    return buffers + kernel.scalar_names + [a for a in optional if re.search(rf"\b{a}\b", text)]


def _variant_context(key: str, sfx: str, ir: IR, name: str, op_base: str) -> dict:
    """What the template needs for one storage layout (its init, fallback, op and kernel)."""
    torch_step = render_torch_step(ir)
    kernel = render_triton_kernel(ir)
    # Grouped formats: one row per group, so a group's scale is a plain row reduction (no reshape).
    cols = kernel.group_size if kernel.group_size > 1 else TILE_COLS
    codecs = [t.codec for t in ir.tensors]
    elements, warps, aligned = tile_config(kernel.group_size, ir.needs_rng, bool(ir.reductions),
                                           formats_aligned(codecs))
    max_registers = None if ir.reductions else formats_register_cap(codecs)
    slice_rows = masked_slice_rows(elements // cols, cols, warps, len(kernel.table_args), bool(kernel.slots))
    uses_numel = any(sympy.Symbol("numel") in e.free_symbols
                     for e in [st.expr for st in ir.statements] + [r.arg for r in ir.reductions])
    tile_args = _tile_args(kernel, uses_numel)
    return {
        "key": key, "sfx": sfx, "const": f"{(key or 'main').upper()}_VARIANT", "label": LAYOUT_LABELS[key],
        "fn": f"{name}_step{sfx}", "op_name": f"{op_base}{sfx}", "rng": ir.needs_rng,
        "param_dtypes": ir.param.codec.param_dtypes,
        "torch": torch_step, "triton": kernel, "buffers": _buffer_records(ir), "init_state": _init_state_lines(ir),
        "export_state": _checkpoint_lines(ir)[0], "import_state": _checkpoint_lines(ir)[1],
        "dtype_lists": {d: torch_step.args.index(d.removesuffix("_DTYPE").lower()) for d in kernel.dtype_args},
        "rows": elements // cols, "cols": cols, "warps": warps, "aligned": aligned,
        "max_registers": max_registers,
        "uses_numel": uses_numel, "tile_args": tile_args, "slice_rows": slice_rows,
        "slice_args": ["start_k" if a == "start" else a for a in tile_args],
        "levels": [r.level for r in ir.reductions],  # the reduction pass of each reduction slot
        "written": tuple(i for i, a in enumerate(torch_step.args) if a in torch_step.mutated),
    }


def render(spec: Spec, spec_path: str, op_name: str | None = None) -> str:
    """The generated module's source text for ``spec``."""
    ir = lower(spec)
    host = HostPrinter()
    host_scalars = []
    for s in ir.scalars:
        code = host.doprint(s.expr)
        host_scalars.append({"name": s.symbol.name, "code": f"hm.flag({code})" if s.is_condition else code})
    checks = [{"code": host.doprint(c.condition), "message": c.message} for c in ir.checks]
    layouts = [("", "", ir)]
    if any(t.role == "state" and t.codec.quantized for t in ir.tensors):
        layouts.append(("fp32", "_fp32", lower(spec, fp32_states=True)))
    if "float32" not in ir.param.codec.param_dtypes:
        layouts.append(("native", "_native", lower(spec, fp32_states=True, native_param=True)))
    variants = [_variant_context(key, sfx, v_ir, spec.name, op_name or f"{spec.name}_step") for key, sfx, v_ir in layouts]
    context = {
        "spec_path": spec_path,
        "name": spec.name,
        "class_name": spec.class_name,
        "doc": spec.doc,
        "update_lines": [ln.rstrip() for ln in spec.update.strip().splitlines() if ln.strip()],
        "storage_summary": _storage_summary(ir),
        "bytes_per_param": f"{ir.bytes_per_param():.10g}",
        "hp_unpack": _hp_unpack(spec),
        "host": host_scalars,
        "checks": checks,
        "variants": variants,
        "codec_imports": list(dict.fromkeys(
            i for _, _, v_ir in layouts for t in v_ir.tensors for i in t.codec.imports)),
        "hyperparams": [_hyperparam_context(h) for h in spec.hyperparams],
        "param_dtypes": ir.param.codec.param_dtypes,
        "needs_rng": ir.needs_rng,
        "quantized_multiple": math.lcm(*(t.codec.group_size for t in ir.tensors if t.codec.whole_groups)),
        "needs_shard": any(v["torch"].global_values for v in variants),
    }
    return _environment().get_template("optimizer.py.j2").render(**context)


def display_path(path: Path) -> str:
    """A stable way to name a spec in generated headers and messages: ``specs/<file>`` for a built-in spec
    (wherever optgen is installed), otherwise the path as given."""
    path = Path(path)
    builtin = Path(str(resources.files("optgen.specs"))).resolve()
    return f"specs/{path.name}" if path.resolve().parent == builtin else str(path)


def build_files(spec_paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """``optgen build``: each spec file → ``out_dir/<name>.py``. Every spec is compiled before any file is
    written, so a bad spec, or two specs of one name, leaves the folder as it was."""
    sources: dict[str, tuple[str, str]] = {}  # name -> (spec file, generated source)
    for path in spec_paths:
        spec = load_spec(path)
        if spec.name in sources:
            raise spec.error(f"name '{spec.name}' is also the name of {sources[spec.name][0]}: both would be "
                             f"written to {spec.name}.py", ("name",))
        sources[spec.name] = (str(path), render(spec, display_path(Path(path))))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    outs = []
    for name, (_, source) in sources.items():
        out = Path(out_dir) / f"{name}.py"
        out.write_text(source)
        outs.append(out)
    return outs


def load(spec_path: str | Path) -> type:
    """Build a spec in-process and return its optimizer class.

    The module is written to a cache folder and imported from there (Triton needs a source file). Its op is
    ``optgen::<name>_<hash>_step`` so that loading an edited spec never collides with an earlier one.
    """
    spec = load_spec(spec_path)
    digest = hashlib.sha256(Path(spec_path).read_bytes()).hexdigest()[:10]
    module_name = f"optgen_user_{spec.name}_{digest}"
    if module_name not in sys.modules:
        source = render(spec, Path(spec_path).name, op_name=f"{spec.name}_{digest}_step")
        folder = Path(tempfile.gettempdir()) / "optgen_cache"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{module_name}.py"
        if not path.is_file() or path.read_text() != source:
            # written whole, then renamed: processes loading the same spec at once (torchrun's ranks) never
            # read a file another one is still writing
            with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
                tmp.write(source)
            os.replace(tmp.name, path)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module: ModuleType = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    return getattr(sys.modules[module_name], spec.class_name)
