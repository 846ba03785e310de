"""Offloaded optimizer states: step time and GPU memory against the bus bandwidth, beside the peers.

One run measures, on one GPU:

* host<->device copy bandwidth with pinned memory: host-to-device alone, device-to-host alone, and both at
  once on two streams (the aggregate is what design (a) can use, since it copies both ways concurrently);
* for FlashAdamW (bf16 parameters) and AdamW8bit (fp32 parameters): the plain on-GPU step; design (a)
  (``optgen.offloaded``: states in pinned CPU memory streamed through GPU staging chunks into the same fused
  kernel, with 3 and with 2 staging buffers); paged states with a GPU budget of half the state; and design
  (b) (step on the CPU with the PyTorch fallback, gradients down and parameters up: torchao's
  CPUOffloadOptimizer idea with optgen's states; on a subset of the parameters, ``--cpu-step-mparams``, one
  warm-up step and at most 3 timed, as the CPU step is slow);
* torchao's ``CPUOffloadOptimizer`` (torch AdamW, fused, on the CPU) and bitsandbytes' ``PagedAdamW8bit``
  (CUDA managed memory) where they import.

Each timed iteration hands the gradients over through autograd (``torch.autograd.backward`` on the leaf
parameters, so torchao's gradient hooks fire as in training) and calls ``step()``; the time is wall clock
between two ``torch.cuda.synchronize()`` (the device-wide one waits for the side-stream copies too), the
median of ``--iters`` after ``--warmup``.

Columns: ``bus MB`` = bytes that must cross the bus per step (design (a): the offloaded states both ways;
(b) and torchao: gradients down, parameters up; plain and bitsandbytes: none while the GPU has room, as
managed memory then never pages); ``floor ms`` = those bytes over the measured bandwidth (both-ways aggregate
for (a), which overlaps the two directions; one direction after the other for (b), whose CPU step needs the
whole gradient before and gives the parameters after); ``ratio`` = step / floor (target <= 1.2 for (a));
``opt GPU MiB`` = peak memory the torch allocator held during the timed steps beyond parameters and
gradients; ``device MiB`` = growth of the device's used memory (``cudaMemGetInfo``, after emptying the cache),
which also sees managed memory; ``chunks MiB`` = the staging chunks of (a). The note says whether the
offloaded and paged runs left the parameters bit-identical to the on-GPU run (same data, same steps).

Usage (repository root)::

    python benchmarks/offload_bench.py                     # the H100 run
    python benchmarks/offload_bench.py --dry-run           # tiny, CPU-to-CPU, checks the script

The table goes to stdout, and to ``$OUT/offload_bench.md`` when ``OUT`` is set; progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from optgen import offloaded
from optgen.optim import AdamW8bit, FlashAdamW

MiB = 2**20
GB = 1e9


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def large_shapes(d: int = 4096, d_small: int = 1024) -> list[tuple[int, ...]]:
    """~302M parameters at the default sizes (as benchmarks/step_bench.py): 16 d x d, 8 d_small x d, 32 d."""
    return [(d, d)] * 16 + [(d_small, d)] * 8 + [(d,)] * 32


# ----------------------------------------------------------------------------- bandwidth
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    """Pinned host <-> device copy bandwidth in GB/s: each direction alone, and the aggregate of both at once."""
    cuda = device.type == "cuda"
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).random_(0, 256)
    host_b = torch.empty_like(host_a, pin_memory=cuda)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dev_b = torch.empty_like(dev_a)
    streams = (torch.cuda.Stream(device), torch.cuda.Stream(device)) if cuda else (None, None)

    def timed(fn: Callable[[], None]) -> float:
        samples = []
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples[1:])

    def h2d() -> None:
        dev_b.copy_(host_a, non_blocking=cuda)

    def d2h() -> None:
        host_b.copy_(dev_a, non_blocking=cuda)

    def both() -> None:
        if not cuda:
            h2d()
            d2h()
            return
        for stream, fn in zip(streams, (h2d, d2h)):
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                fn()

    return {"h2d": nbytes / timed(h2d) / GB, "d2h": nbytes / timed(d2h) / GB,
            "both": 2 * nbytes / timed(both) / GB}


# ----------------------------------------------------------------------------- design (b)
class CpuStep:
    """Design (b): the optimizer steps on the CPU (optgen's fallback on CPU copies of the parameters and
    states); gradients come down and parameters go back up through pinned buffers."""

    def __init__(self, cls: type, params: list[torch.Tensor], backend: str) -> None:
        self.params = params
        cuda = params[0].device.type == "cuda"
        self.cpu_params = [torch.nn.Parameter(p.detach().to("cpu", copy=True).pin_memory() if cuda
                                              else p.detach().clone()) for p in params]
        for cp in self.cpu_params:
            cp.grad = torch.empty(cp.shape, dtype=cp.dtype, pin_memory=cuda)
        self.opt = cls(self.cpu_params, backend=backend)
        self.stream = torch.cuda.Stream(params[0].device) if cuda else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        if self.stream is None:
            for p, cp in zip(self.params, self.cpu_params):
                cp.grad.copy_(p.grad)
            self.opt.step()
            for p, cp in zip(self.params, self.cpu_params):
                p.data.copy_(cp.detach())
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for p, cp in zip(self.params, self.cpu_params):
                cp.grad.copy_(p.grad, non_blocking=True)
        self.stream.synchronize()
        self.opt.step()
        with torch.cuda.stream(self.stream):
            for p, cp in zip(self.params, self.cpu_params):
                p.data.copy_(cp.detach(), non_blocking=True)
        torch.cuda.current_stream().wait_stream(self.stream)


# ----------------------------------------------------------------------------- one row
@dataclass
class Row:
    optimizer: str
    impl: str
    mparams: float
    bus_mb: float | None = None
    floor_ms: float | None = None
    step_ms: float | None = None
    opt_gpu_mib: float | None = None
    device_mib: float | None = None
    chunks_mib: float | None = None
    note: str = ""
    fingerprint: int | None = None  # of the parameters after the timed steps (same data, same steps)

    def cells(self) -> list[str]:
        def f(x: float | None, fmt: str) -> str:
            return "–" if x is None else format(x, fmt)
        ratio = None if self.step_ms is None or not self.floor_ms else self.step_ms / self.floor_ms
        return [self.optimizer, self.impl, f"{self.mparams:.1f}", f(self.bus_mb, ".0f"), f(self.floor_ms, ".2f"),
                f(self.step_ms, ".2f"), f(ratio, ".2f"), f(self.opt_gpu_mib, ".1f"), f(self.device_mib, ".1f"),
                f(self.chunks_mib, "g"), self.note]


def device_used(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / MiB


def fingerprint(params: list[torch.Tensor]) -> int:
    """A position-weighted sum of the parameters' bits: equal for bit-identical parameters (and, in practice,
    different otherwise)."""
    total = 0
    for p in params:
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32}[p.element_size()]
        bits = p.detach().reshape(-1).view(ints).to(torch.int64)
        total += int((bits * (torch.arange(bits.numel(), device=bits.device) % 1009 + 1)).sum())
    return total


def run_row(row: Row, make_opt: Callable[[list[torch.Tensor]], Any], shapes: list[tuple[int, ...]],
            dtype: torch.dtype, device: torch.device, warmup: int, iters: int,
            bus: Callable[[Any, list[torch.Tensor]], tuple[float, float]] | None) -> Row:
    """Build parameters and gradients, then the optimizer; time ``iters`` steps. ``bus(opt, params)`` gives
    (bus bytes, floor seconds) once the optimizer has its states."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype)) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    torch.autograd.backward(params, grads)
    used0 = device_used(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    opt = make_opt(params)
    samples = []
    for k in range(warmup + iters):
        sync(device)
        if k == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(params, grads)
        opt.step()
        sync(device)
        samples.append(time.perf_counter() - t0)
    row.step_ms = statistics.median(samples[warmup:]) * 1e3
    if device.type == "cuda":
        row.opt_gpu_mib = (torch.cuda.max_memory_allocated(device) - base) / MiB
    if bus is not None:
        nbytes, floor = bus(opt, params)
        row.bus_mb, row.floor_ms = nbytes / 1e6, floor * 1e3
    if hasattr(opt, "gpu_state_bytes"):
        row.chunks_mib = len(opt._slots) * opt.chunk_bytes / MiB
        row.note = f"{len(opt._chunks)} chunks, {sum(c.gpu is None for c in opt._chunks)} in CPU memory"
    row.fingerprint = fingerprint(params)
    # while the optimizer lives (measured after ``del`` it came out negative: the parameters and gradients,
    # counted in used0, were gone too)
    row.device_mib = device_used(device) - used0 if device.type == "cuda" else None
    del opt, params, grads
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--chunk-mib", type=float, default=64)
    parser.add_argument("--cpu-step-mparams", type=float, default=34.0,
                        help="design (b) steps the first tensors of the set up to this many million parameters")
    parser.add_argument("--cpu-backend", default="inductor", choices=["inductor", "eager"],
                        help="backend of design (b)'s CPU step (inductor: the fallback compiled to C++)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU-to-CPU (checks the script)")
    args = parser.parse_args()

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("offload_bench needs a CUDA GPU (or --dry-run)")
    device = torch.device("cpu" if dry else "cuda")
    shapes = large_shapes(256, 64) if dry else large_shapes()
    chunk_mib = 0.25 if dry else args.chunk_mib
    staging = {"staging_device": "cpu"} if dry else {}
    if dry:
        args.warmup, args.iters, args.cpu_step_mparams, args.cpu_backend = 1, 2, 0.2, "eager"
    cpu_shapes, total = [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        if cpu_shapes and total + n > args.cpu_step_mparams * 1e6:
            break
        cpu_shapes.append(s)
        total += n

    bw = bandwidth(device, (16 if dry else 512) * MiB, 3 if dry else 10)
    log(f"bandwidth GB/s: {bw}")

    def offload_bus(opt: Any, params: list[torch.Tensor]) -> tuple[float, float]:
        paged = sum(c.nbytes for c in opt._chunks if c.gpu is None)
        return 2 * paged, 2 * paged / (bw["both"] * GB)

    def cpu_step_bus(opt: Any, params: list[torch.Tensor]) -> tuple[float, float]:
        grad = sum(p.numel() * p.element_size() for p in params)  # the same dtype as the parameters here
        return 2 * grad, grad / (bw["d2h"] * GB) + grad / (bw["h2d"] * GB)

    rows: list[Row] = []
    n_all = sum(torch.Size(s).numel() for s in shapes) / 1e6
    n_cpu = sum(torch.Size(s).numel() for s in cpu_shapes) / 1e6
    plain_kw = {"backend": "eager"} if dry else {}
    for cls, dtype in ((FlashAdamW, torch.bfloat16), (AdamW8bit, torch.float32)):
        name = f"{cls.__name__} ({'bf16' if dtype == torch.bfloat16 else 'fp32'} params)"
        state_bpe = cls.bytes_per_element(dtype) - 2 * torch.empty((), dtype=dtype).element_size()  # no p, g
        half_budget = max(state_bpe * n_all * 1e6 / 2 / MiB, 3 * chunk_mib)
        entries: list[tuple[Row, Callable, list, Any]] = [
            (Row(name, "optgen on GPU (reference)", n_all), lambda ps, c=cls: c(ps, **plain_kw), shapes, None),
            (Row(name, "optgen offloaded (a), 3 staging buffers", n_all),
             lambda ps, c=cls: offloaded(c)(ps, chunk_mib=chunk_mib, **staging), shapes, offload_bus),
            (Row(name, "optgen offloaded (a), 2 staging buffers", n_all),
             lambda ps, c=cls: offloaded(c)(ps, chunk_mib=chunk_mib, staging_buffers=2, **staging), shapes,
             offload_bus),
            (Row(name, f"optgen paged, budget {half_budget:.0f} MiB", n_all),
             lambda ps, c=cls, b=half_budget: offloaded(c)(ps, chunk_mib=chunk_mib, gpu_budget_mib=b, **staging),
             shapes, offload_bus),
            (Row(name, f"optgen CPU step (b), {args.cpu_backend}", n_cpu),
             lambda ps, c=cls: CpuStep(c, ps, args.cpu_backend), cpu_shapes, cpu_step_bus),
        ]
        reference = Row(name, "", 0.0)
        for row, make, set_shapes, bus in entries:
            log(f"{row.optimizer} / {row.impl} ...")
            cpu_step = set_shapes is cpu_shapes  # slow: one warm-up step (compiles) and at most 3 timed
            warmup, iters = (1, min(3, args.iters)) if cpu_step else (args.warmup, args.iters)
            try:
                rows.append(run_row(row, make, set_shapes, dtype, device, warmup, iters, bus))
                reference = rows[-1] if set_shapes is shapes and bus is None else reference
                if bus is offload_bus:  # the same kernel on the same data: the parameters must match bit for bit
                    same = row.fingerprint == reference.fingerprint
                    row.note = "; ".join(filter(None, [row.note, "params identical to the on-GPU run" if same
                                                       else "PARAMS DIFFER from the on-GPU run"]))
            except Exception as exc:  # noqa: BLE001 - a failing row is reported, the others still run
                row.note = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                if cpu_step and args.cpu_backend == "inductor":  # no C++ toolchain, say: measure eager
                    log(f"inductor CPU step failed ({exc}); eager instead")
                    retry = Row(name, "optgen CPU step (b), eager", n_cpu)
                    try:
                        rows.append(run_row(retry, lambda ps, c=cls: CpuStep(c, ps, "eager"), set_shapes, dtype,
                                            device, warmup, iters, bus))
                    except Exception as exc2:  # noqa: BLE001 - reported like any failing row
                        retry.note = f"failed: {type(exc2).__name__}: {str(exc2)[:120]}"
                        rows.append(retry)
            gc.collect()

    peers = []
    if not dry:
        try:
            try:
                from torchao.optim import CPUOffloadOptimizer
            except ImportError:
                from torchao.prototype.low_bit_optim import CPUOffloadOptimizer
            peers.append((Row("AdamW (fp32 params)", "torchao CPUOffloadOptimizer, fused CPU AdamW", n_all),
                          lambda ps: CPUOffloadOptimizer(ps, torch.optim.AdamW, fused=True), cpu_step_bus))
        except Exception as exc:  # noqa: BLE001 - any import failure means 'not available'
            log(f"torchao unavailable: {exc}")
        try:
            import bitsandbytes as bnb
            peers.append((Row("AdamW8bit (fp32 params)", "bitsandbytes PagedAdamW8bit", n_all),
                          lambda ps: bnb.optim.PagedAdamW8bit(ps), None))
        except Exception as exc:  # noqa: BLE001 - any import failure means 'not available'
            log(f"bitsandbytes unavailable: {exc}")
    for row, make, bus in peers:
        log(f"{row.optimizer} / {row.impl} ...")
        try:
            rows.append(run_row(row, make, shapes, torch.float32, device, args.warmup, args.iters, bus))
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, the others still run
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            rows.append(row)
        gc.collect()

    versions = []
    for pkg in ("torch", "triton", "torchao", "bitsandbytes"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    lines = [f"device: {dev_name}; {', '.join(versions)}; CPU threads: {torch.get_num_threads()}.",
             (f"Pinned copy bandwidth measured in this run: host-to-device {bw['h2d']:.1f} GB/s, device-to-host "
              f"{bw['d2h']:.1f} GB/s, both at once {bw['both']:.1f} GB/s aggregate. Chunk size {chunk_mib} MiB; "
              f"median of {args.iters} steps after {args.warmup} warm-up steps."), "",
             ("| optimizer | impl | params (M) | bus MB | floor ms | step ms | ratio | opt GPU MiB | device MiB "
              "| chunks MiB | note |"), "|" + "---|" * 11]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "offload_bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
