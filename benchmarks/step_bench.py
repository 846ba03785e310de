"""Optimizer-step benchmark: optgen's generated optimizers against their peers, on one GPU.

Each entry builds a parameter set (random params, random grads in the param dtype), takes
``--warmup`` steps, then times ``--iters`` calls of ``opt.step()`` with CUDA events (one
synchronize before each, so every sample is one whole step, launch overhead included) and
reports the median. The numbers are set against a device-to-device copy measured in the
same run, the floor for any memory-bound elementwise kernel.

``back-to-back ms`` is a second timing: ``--iters`` steps enqueued one after another with no
synchronize between them, divided by their number (median of 3 such runs). As in a training
loop, where the host runs ahead of the GPU, the host work of one step then overlaps the GPU
work before it; an optimizer whose step waits for the GPU (a blocking copy, ``.item()``)
gains nothing.

Bytes moved per element (``moved B/elem``) is what one step must read and write, per
parameter element:

    moved = 2 * sizeof(param)   # read + write the parameter
          + sizeof(grad)        # read the gradient
          + 2 * state           # read + write every state tensor

where ``state`` is the optimizer's state in bytes per parameter element, measured by
summing ``nbytes`` over every tensor in ``optimizer.state`` (quantization scales and
error-correction bits included) and dividing by the parameter count. That is one pass over
the tensors. optgen's classes declare their figure (``cls.bytes_per_element(param_dtype,
grad_dtype, moved=True)``), which differs only for a spec with whole-tensor reductions: no
element of LAMB's update can be stored before the norms over the whole tensor are known, so
its step reads the tensors twice. fp32 LAMB moves 40 B per element (first pass: read p, g,
m, v and store the new m, v; second: read p, m, v and store p), not 28; LAMB16 26 B, not 16
(the second pass reads p, g and the fp8 m, v again, since their new scales come from the
first). The table shows that figure; the count of one pass is given beside it in the text.

Columns: ``GB/s`` = moved * numel / time; ``frac copy BW`` = GB/s over the copy bandwidth;
``floor ratio`` = time / (moved * numel / copy bandwidth), i.e. how many times slower than
a copy of the same traffic; ``step extra MiB`` = peak memory during the timed steps beyond
what was allocated before them (params, grads, state).

Usage (from the repository root)::

    python benchmarks/step_bench.py [--sets large,gpt2] [--only NAMES] [--warmup 5] [--iters 20]
    python benchmarks/step_bench.py --dry-run      # tiny CPU sets, torch.optim.AdamW only

The table goes to stdout, and to ``$OUT/step_bench.md`` when ``OUT`` is set; progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

Shape = tuple[int, ...]
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

MiB = 2**20
PEER_PACKAGES = ("flashoptim", "bitsandbytes", "torchao")
OPTGEN_NAMES = (
    "AdamW",
    "Adam",
    "SGD",
    "Lion",
    "FlashAdamW",
    "FlashAdam",
    "FlashSGD",
    "FlashLion",
    "StochasticAdamW",
    "AdamW8bit",
    "AdamW4bit",
    "Lamb",
    "Lamb16",
)
OPTGEN_BF16_TOO = ("AdamW",)  # also run on bf16 parameters, beside torch fused AdamW on bf16
DTYPE_ALIASES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


# ----------------------------------------------------------------------------- parameter sets


def large_shapes(d: int = 4096, d_small: int = 1024) -> list[Shape]:
    """~302M params at the default sizes: 16 d x d, 8 d_small x d, 32 vectors of d."""
    return [(d, d)] * 16 + [(d_small, d)] * 8 + [(d,)] * 32


def gpt2_shapes(vocab: int = 50257, n_ctx: int = 1024, d: int = 768, n_layer: int = 12) -> list[Shape]:
    """The 148 parameter tensors of GPT-2 small (~124M params at the default sizes)."""

    def linear(n_in: int, n_out: int) -> list[Shape]:  # GPT-2's Conv1D: weight (in, out), bias
        return [(n_in, n_out), (n_out,)]

    layer_norm = [(d,), (d,)]
    # ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    block = layer_norm + linear(d, 3 * d) + linear(d, d) + layer_norm + linear(d, 4 * d) + linear(4 * d, d)
    return [(vocab, d), (n_ctx, d)] + block * n_layer + layer_norm  # wte, wpe, blocks, ln_f


PARAM_SETS: dict[str, Callable[[], list[Shape]]] = {"large": large_shapes, "gpt2": gpt2_shapes}
DRY_RUN_SETS: dict[str, Callable[[], list[Shape]]] = {
    "large": lambda: large_shapes(d=128, d_small=32),
    "gpt2": lambda: gpt2_shapes(vocab=1000, n_ctx=64, d=32, n_layer=2),
}


def make_params(shapes: list[Shape], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Random leaf parameters with random gradients of the same dtype (never zeros)."""
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, dtype=dtype, device=device))
        p.grad = torch.randn(shape, dtype=dtype, device=device)
        params.append(p)
    return params


# ----------------------------------------------------------------------------- byte accounting


def _state_tensors(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    """Every plain tensor reachable from an optimizer state: through dicts, lists, tensor
    subclasses (torchao's quantized states, DTensor) and plain objects (FlashOptim's)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            inner_names, _ = obj.__tensor_flatten__()
            for name in inner_names:
                yield from _state_tensors(getattr(obj, name), seen)
        else:
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _state_tensors(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _state_tensors(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            yield from _state_tensors(value, seen)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Total bytes of the tensors in ``opt.state``, each distinct buffer counted once."""
    seen_ids: set[int] = set()
    buffers: set[tuple[str, int, int]] = set()
    total = 0
    for tensor in _state_tensors(dict(opt.state), seen_ids):
        key = (str(tensor.device), tensor.data_ptr(), tensor.nbytes)
        if tensor.nbytes and key not in buffers:
            buffers.add(key)
            total += tensor.nbytes
    return total


def bytes_moved_per_elem(param_dtype: torch.dtype, grad_dtype: torch.dtype, state_per_param: float) -> float:
    """Traffic of one step per element: param read+write, grad read, state read+write."""
    return 2 * param_dtype.itemsize + grad_dtype.itemsize + 2 * state_per_param


def as_dtype(value: Any) -> torch.dtype:
    """A torch.dtype from a dtype or a name such as 'bf16' / 'float32'."""
    if isinstance(value, torch.dtype):
        return value
    return DTYPE_ALIASES[str(value).lower().removeprefix("torch.")]


# ----------------------------------------------------------------------------- registry


@dataclass
class Entry:
    """One optimizer implementation to benchmark."""

    name: str  # algorithm, e.g. "AdamW"
    impl: str  # implementation, e.g. "torch fused"; first word = package
    factory: Factory
    param_dtype: torch.dtype = torch.float32
    declared_moved: float | None = None  # bytes moved/elem; None: formula on the measured state


def torch_entries() -> list[Entry]:
    """torch.optim.AdamW: fused and foreach on fp32, fused on bf16."""
    adamw = torch.optim.AdamW
    return [
        Entry("AdamW", "torch fused", lambda ps: adamw(ps, lr=1e-3, fused=True)),
        Entry("AdamW", "torch foreach", lambda ps: adamw(ps, lr=1e-3, foreach=True)),
        Entry("AdamW", "torch fused bf16", lambda ps: adamw(ps, lr=1e-3, fused=True), torch.bfloat16),
    ]


def peer_entries(skipped: list[str]) -> list[Entry]:
    """FlashOptim, bitsandbytes and torchao entries, for those that import; others go to skipped."""
    entries: list[Entry] = []
    try:
        import flashoptim

        # Defaults: int8 states with fp16 group scales (quantize=True), 24-bit master
        # weights through int8 error bits on bf16 params (master_weight_bits=24), fused=True.
        entries += [
            Entry(
                "FlashAdamW", "flashoptim bf16", lambda ps: flashoptim.FlashAdamW(ps, lr=1e-3), torch.bfloat16
            ),
            Entry(
                "FlashSGD",
                "flashoptim bf16 momentum=0.9",
                lambda ps: flashoptim.FlashSGD(ps, lr=1e-3, momentum=0.9),
                torch.bfloat16,
            ),
            Entry(
                "FlashLion", "flashoptim bf16", lambda ps: flashoptim.FlashLion(ps, lr=1e-3), torch.bfloat16
            ),
        ]
    except Exception as exc:  # noqa: BLE001 - any import failure means 'not available'
        skipped.append(f"flashoptim ({type(exc).__name__}: {exc})")
    try:
        import bitsandbytes as bnb

        entries.append(Entry("AdamW8bit", "bnb", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)))
    except Exception as exc:  # noqa: BLE001 - any import failure means 'not available'
        skipped.append(f"bitsandbytes ({type(exc).__name__}: {exc})")
    try:
        import torchao.optim as ao_optim

        entries += [
            Entry("AdamW8bit", "torchao", lambda ps: ao_optim.AdamW8bit(ps, lr=1e-3)),
            Entry("AdamW4bit", "torchao", lambda ps: ao_optim.AdamW4bit(ps, lr=1e-3)),
        ]
    except Exception as exc:  # noqa: BLE001 - any import failure means 'not available'
        skipped.append(f"torchao ({type(exc).__name__}: {exc})")
    return entries


def optgen_entries(skipped: list[str]) -> list[Entry]:
    """One entry per class of OPTGEN_NAMES found in optgen.optim, on the Triton backend."""
    try:
        optim = importlib.import_module("optgen.optim")
    except Exception as exc:  # noqa: BLE001 - a broken optgen must not stop the peers
        skipped.append(f"optgen.optim ({type(exc).__name__}: {exc})")
        return []
    missing = [name for name in OPTGEN_NAMES if getattr(optim, name, None) is None]
    if missing:
        skipped.append(f"optgen: {', '.join(missing)} (not in optgen.optim)")
    entries = []
    for name in OPTGEN_NAMES:
        cls = getattr(optim, name, None)
        if cls is None:
            continue
        dtypes = [as_dtype(d) for d in cls.param_dtypes]
        # fp32 where the spec allows it, and bf16 as well for native-dtype specs (beside torch fused bf16)
        for dtype in dtypes if name in OPTGEN_BF16_TOO else dtypes[:1]:
            short = {torch.float32: "", torch.bfloat16: " bf16", torch.float16: " fp16"}[dtype]
            label = "optgen triton" + short
            entries.append(Entry(name, label, lambda ps, cls=cls: cls(ps, lr=1e-3, backend="triton"), dtype,
                                 float(cls.bytes_per_element(dtype, dtype, moved=True))))
    return entries


def selected(entry: Entry, only: set[str]) -> bool:
    """--only matches an entry's name or its package (first word of impl), case-insensitively."""
    return not only or entry.name.lower() in only or entry.impl.split()[0].lower() in only


# ----------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in ms: CUDA events on GPU (synchronized before each call),
    perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def back_to_back_ms(fn: Callable[[], object], device: torch.device, steps: int, runs: int = 3) -> float:
    """Median over ``runs`` of the GPU time of ``steps`` calls of fn() enqueued without a synchronize, per call."""
    samples = []
    for _ in range(runs):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / steps)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(functools.partial(dst.copy_, src), device, warmup=3, iters=iters)
    del src, dst
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- one row


@dataclass
class Row:
    """One line of the table; ``error`` set when the entry failed."""

    set_name: str
    entry: Entry
    numel: int = 0
    state_per_param: float = 0.0
    moved_per_elem: float = 0.0
    median_ms: float = 0.0
    back_to_back_ms: float | None = None
    extra_mib: float | None = None
    error: str | None = None

    def cells(self, copy_gbps: float) -> list[str]:
        head = [self.set_name, self.entry.name, self.entry.impl]
        if self.error is not None:
            return [*head, f"ERROR: {self.error}"] + [""] * 8
        gbps = self.moved_per_elem * self.numel / (self.median_ms * 1e-3) / 1e9
        extra = "n/a" if self.extra_mib is None else f"{self.extra_mib:.1f}"
        back_to_back = "n/a" if self.back_to_back_ms is None else f"{self.back_to_back_ms:.3f}"
        return [
            *head,
            f"{self.numel / 1e6:.1f}",
            f"{self.state_per_param:.3f}",
            f"{self.moved_per_elem:.2f}",
            f"{self.median_ms:.3f}",
            back_to_back,
            f"{gbps:.0f}",
            f"{gbps / copy_gbps:.2f}",
            f"{copy_gbps / gbps:.2f}",
            extra,
        ]


def run_entry(
    set_name: str, shapes: list[Shape], entry: Entry, device: torch.device, warmup: int, iters: int
) -> Row:
    """Build params and optimizer, warm up, measure state, time the steps."""
    params = make_params(shapes, entry.param_dtype, device)
    opt = entry.factory(params)
    numel = sum(p.numel() for p in params)
    for _ in range(max(warmup, 1)):  # the first step allocates the state
        opt.step()
    state_per_param = state_bytes(opt) / numel
    moved = entry.declared_moved
    if moved is None:
        moved = bytes_moved_per_elem(entry.param_dtype, params[0].grad.dtype, state_per_param)
    if device.type != "cuda":
        return Row(set_name, entry, numel, state_per_param, moved, time_ms(opt.step, device, 0, iters))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    median_ms = time_ms(opt.step, device, warmup=0, iters=iters)
    extra_mib = (torch.cuda.max_memory_allocated(device) - before) / MiB
    return Row(set_name, entry, numel, state_per_param, moved, median_ms, back_to_back_ms(opt.step, device, iters),
               extra_mib)


# ----------------------------------------------------------------------------- report


COLUMNS = [
    "set",
    "optimizer",
    "impl",
    "params (M)",
    "state B/param",
    "moved B/elem",
    "median step ms",
    "back-to-back ms",
    "GB/s",
    "frac copy BW",
    "floor ratio",
    "step extra MiB",
]


def markdown_table(rows: list[Row], copy_gbps: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row.cells(copy_gbps)) + " |" for row in rows]
    return "\n".join(lines)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(device: torch.device) -> str:
    """GPU (or CPU) and the versions of torch, triton and every peer package."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    versions = ", ".join(f"{name} {package_version(name)}" for name in ("torch", "triton", *PEER_PACKAGES))
    return f"device: {gpu}; CUDA {torch.version.cuda}; {versions}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="large,gpt2", help="comma-separated: " + ",".join(PARAM_SETS))
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated optimizer names (AdamW, FlashAdamW, ...) or packages "
        "(torch, flashoptim, bnb, torchao, optgen); default all",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny parameter sets on CPU, torch.optim.AdamW entries only"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        device, sets, copy_nbytes = torch.device("cpu"), DRY_RUN_SETS, 64 * MiB
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on a GPU, or pass --dry-run")
        device, sets, copy_nbytes = torch.device("cuda"), PARAM_SETS, 2 * 2**30
    set_names = [s for s in args.sets.split(",") if s]
    unknown = [s for s in set_names if s not in sets]
    if unknown:
        sys.exit(f"unknown set(s) {unknown}; choose from {list(sets)}")

    skipped: list[str] = []
    entries = torch_entries()
    if not args.dry_run:
        entries += peer_entries(skipped) + optgen_entries(skipped)
    only = {token.strip().lower() for token in args.only.split(",") if token.strip()}
    entries = [entry for entry in entries if selected(entry, only)]

    lines = [header(device)]
    print(lines[0], flush=True)
    copy_gbps = copy_bandwidth(device, copy_nbytes, iters=args.iters)
    lines.append(f"copy bandwidth (read+write, {copy_nbytes // MiB} MiB fp32 copy_): {copy_gbps:.0f} GB/s")
    lines += [f"skipped: {reason}" for reason in skipped]
    print("\n".join(lines[1:]), flush=True)

    rows: list[Row] = []
    for set_name in set_names:
        shapes = sets[set_name]()
        for entry in entries:
            t0 = time.perf_counter()
            try:
                row = run_entry(set_name, shapes, entry, device, args.warmup, args.iters)
            except Exception as exc:  # noqa: BLE001 - one failing entry must not stop the others
                first_line = (str(exc).splitlines() or [""])[0][:200].replace("|", "/")
                row = Row(set_name, entry, error=f"{type(exc).__name__}: {first_line}")
            free_memory(device)
            rows.append(row)
            log(
                f"[{set_name}] {entry.name} / {entry.impl}: "
                f"{row.error or f'{row.median_ms:.3f} ms'} ({time.perf_counter() - t0:.1f} s)"
            )

    table = markdown_table(rows, copy_gbps)
    print("\n" + table, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "step_bench.md").write_text("\n".join(lines) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
