"""Host time of ``step()``: from the call to the first kernel launch, and the whole call.

The synchronized median of ``step_bench.py`` holds the host time up to the launch (the GPU idles until then);
back-to-back steps hide it. This prints both host times per optimizer, median over ``--iters`` steps with a
synchronize before each. ``--no-kernel`` replaces the launch by a no-op, to time the host path alone on a
machine without a GPU (the Triton interpreter would otherwise run the kernel on the CPU).

    python -m benchmarks.host_bench [--only AdamW,FlashAdamW] [--sets gpt2,large] [--no-kernel]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before optgen's kernels are defined

from benchmarks.step_bench import gpt2_shapes, large_shapes, make_params
from optgen import optim
from optgen.runtime import launch as launch_module
from optgen.runtime.launch import MultiTensorLauncher

SETS = {"gpt2": gpt2_shapes, "large": large_shapes}


class _NoKernel:
    """A Triton kernel whose launches (``kernel[grid](...)``) do nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def host_times(name: str, shapes: list[tuple[int, ...]], device: torch.device, iters: int,
               launches: list[float]) -> tuple[float, float]:
    """Median µs from the ``step()`` call to its first launch, and of the whole call."""
    cls = getattr(optim, name)
    dtype = getattr(torch, cls.param_dtypes[0])
    params = make_params(shapes, dtype, device)
    opt = cls(params, backend="triton")
    for _ in range(3):  # states and plans
        opt.step()
    to_launch, whole = [], []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        launches.clear()
        start = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        to_launch.append(launches[0] - start)
        whole.append(end - start)
    return statistics.median(to_launch) * 1e6, statistics.median(whole) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="AdamW,SGD,FlashAdamW,StochasticAdamW,AdamW8bit")
    parser.add_argument("--sets", default="gpt2,large")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-kernel", action="store_true", help="time the host path alone (no launch)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launches: list[float] = []
    launch = MultiTensorLauncher._launch

    def timed_launch(self: MultiTensorLauncher, *a: object, **k: object) -> None:
        launches.append(time.perf_counter())
        if not args.no_kernel:
            launch(self, *a, **k)

    MultiTensorLauncher._launch = timed_launch
    if args.no_kernel:  # and the per-tensor sums between passes (LAMB's), a kernel of their own
        launch_module._sum_partials = _NoKernel()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch "
          f"{torch.__version__}{'; kernel launches replaced by a no-op' if args.no_kernel else ''}\n")
    print("| set | optimizer | tensors | host µs to the first launch | host µs, whole step() |")
    print("|---|---|---|---|---|")
    for set_name in args.sets.split(","):
        shapes = SETS[set_name]()
        for name in args.only.split(","):
            to_launch, whole = host_times(name, shapes, device, args.iters, launches)
            print(f"| {set_name} | {name} | {len(shapes)} | {to_launch:.0f} | {whole:.0f} |")
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
