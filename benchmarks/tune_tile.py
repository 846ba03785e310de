"""Tile-shape sweep for the generated multi-tensor kernel (GPU): which (rows, cols, num_warps) and register cap
(Triton's ``maxnreg``) move bytes fastest.

    python -m benchmarks.tune_tile [--spec adamw] [--sets large,gpt2] [--tiles all|default|512x4,1024x8]
                                   [--max-registers none,64,72,80]      (from the repository root)

Times the kernel alone (tables cached, CUDA events, median) on the large parameter set of step_bench.py,
and the whole ``opt.step()`` to show the host-side overhead. Prints one table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import statistics

import torch

from benchmarks.step_bench import copy_bandwidth, gpt2_shapes, large_shapes, make_params
from optgen.runtime.transfer import make_rng

ELEMENTS_WARPS = [(256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]  # tile sizes x num_warps


def median_ms(fn, iters: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", default="adamw")
    parser.add_argument("--sets", default="large,gpt2")
    parser.add_argument("--tiles", default="all",
                        help="'all' (every tile of ELEMENTS_WARPS), 'default' (the generated kernel's own), or a "
                             "comma-separated list of ELEMENTSxWARPS")
    parser.add_argument("--max-registers", default="default",
                        help="comma-separated caps per thread to try: numbers, 'none', or 'default' (the kernel's)")
    args = parser.parse_args()
    device = torch.device("cuda")
    module = importlib.import_module(f"optgen.generated.{args.spec}")
    cls = next(v for v in vars(module).values() if isinstance(v, type) and getattr(v, "spec_name", None) == args.spec)
    copy_gbps = copy_bandwidth(device, 2**31, 10)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s")
    dtype = getattr(torch, cls.param_dtypes[0])
    sets = {"large": large_shapes, "gpt2": gpt2_shapes}
    for set_name in args.sets.split(","):
        params = make_params(sets[set_name](), dtype, device)
        for p in params:
            p.grad = torch.randn_like(p)
        opt = cls(params, lr=1e-3, backend="triton", min_quantized_size=0)
        opt.step()
        numel = sum(p.numel() for p in params)
        moved = cls.bytes_per_element(dtype, moved=True) * numel
        group = opt.param_groups[0]
        lists = [params if b.key is None and b.arg == "param" else [p.grad for p in params] if b.key is None
                 else [opt.state[p][b.key] for p in params] for b in cls.buffers]
        scalars = opt._scalars(group, 2, device)
        rng = make_rng(0, 2, list(range(len(params))), device) if cls.variants[""].needs_rng else None
        launcher = module._launcher
        print(f"\n{set_name}: {numel / 1e6:.1f}M params, floor {moved / copy_gbps / 1e6:.3f} ms")
        print("| rows | cols | warps | max registers | kernel ms | frac copy BW |\n|---|---|---|---|---|---|")
        default = (launcher.rows, launcher.cols, launcher.num_warps, launcher.max_registers)
        cols = launcher.cols  # fixed by the storage format's group size
        tiles = (ELEMENTS_WARPS if args.tiles == "all" else [(launcher.block, launcher.num_warps)]
                 if args.tiles == "default" else [tuple(map(int, t.split("x"))) for t in args.tiles.split(",")])
        caps = [default[3] if c == "default" else None if c == "none" else int(c) for c in args.max_registers.split(",")]
        for (elements, warps), cap in itertools.product(tiles, caps):
            rows = elements // cols
            launcher.rows, launcher.num_warps, launcher.max_registers = rows, warps, cap
            launcher._plans.clear()
            ms = median_ms(functools.partial(launcher, *lists, scalars=scalars, rng=rng))
            print(f"| {rows} | {cols} | {warps} | {cap or '-'} | {ms:.3f} | {moved / (ms * 1e6) / copy_gbps:.2f} |")
        launcher.rows, launcher.cols, launcher.num_warps, launcher.max_registers = default
        launcher._plans.clear()
        print(f"opt.step() total: {median_ms(opt.step):.3f} ms")
        del opt, params
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
