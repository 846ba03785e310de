"""Compile every generated Triton kernel for an H100 (sm_90) without a GPU, and print one line per failure.
With ``--amd``, for an AMD MI300 (gfx942) instead: the kernels' NVIDIA-only inline PTX must be guarded there.

Run by tests/test_sm90_compile.py in a fresh process (TRITON_INTERPRET must be off when kernels are
defined). The interpreter accepts code the GPU compiler rejects (non-constexpr globals, some casts), so
CI checks both.

``python tests/sm90_compile.py --resources`` also prints each kernel's registers, stack (spills) and SASS
instruction count, from Triton's bundled cuobjdump: with the GPU's Triton version installed here (e.g.
``pip install --target DIR triton==3.6.0`` and DIR first on PYTHONPATH) they equal the GPU's, at no device
time.
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.language import target_info

from optgen import optim
from optgen.runtime.launch import _sum_partials

SCALAR_PTRS = {"scalars": "*fp32", "red": "*fp32", "part": "*fp32", "rng": "*i64", "numels": "*i64", "blocks": "*i64"}


def signature(cls, variant) -> tuple[dict, list[dict]]:
    """Argument types and one constexpr set per kernel pass, for an eager launch (the scalars as arguments), with
    parameters of the first dtype the spec takes: each dtype constexpr is its buffer's dtype for them."""
    sig, consts = {}, {}
    launcher = variant.triton_launcher
    param_dtype = getattr(torch, cls.param_dtypes[0])
    dtypes = {name: getattr(tl, str(variant.buffers[k].torch_dtype(param_dtype)).removeprefix("torch."))
              for name, k in launcher.dtype_args.items()}  # torch's dtype names are Triton's
    names = launcher.kernel.arg_names
    first = names.index("scalars") + 1
    scalar_args = names[first:first + launcher.scalar_count]
    for name in names:
        if name == "scalars":  # None: an eager launch passes the values instead
            sig[name] = "constexpr"
            consts[name] = None
        elif name in scalar_args:
            sig[name] = "fp32"
        elif name in ("rng_seed", "rng_step"):
            sig[name] = "i32"
        elif name.endswith("_ptrs"):
            sig[name] = "*i64"
        elif name in SCALAR_PTRS:
            sig[name] = SCALAR_PTRS[name]
        elif name.startswith("qmap"):
            sig[name] = "*fp32"
        else:
            sig[name] = "constexpr"
            consts[name] = {**launcher.tile_constexprs(), "NRED": max(1, len(launcher.slots)), "PASS": 1,
                            "SCALARS_TENSOR": False, **dtypes}[name]
    passes = range(1, launcher.passes + 1) if launcher.slots else [1]
    return sig, [{**consts, **({"PASS": k} if "PASS" in consts else {})} for k in passes]


def resources(kernel) -> str:
    """Registers, stack bytes and SASS instructions of a compiled kernel."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    count = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.MULTILINE))
    return f"registers {regs}, stack {stack}, SASS {count}"


def options(launcher, amd: bool) -> dict:
    """The launcher's compile options, less the register cap for AMD (which its launcher leaves out on ROCm)."""
    opts = launcher.compile_options()
    return {k: v for k, v in opts.items() if k != "maxnreg"} if amd else opts


def main() -> None:
    amd = "--amd" in sys.argv
    report = "--resources" in sys.argv and not amd  # cuobjdump reads NVIDIA binaries only
    target = GPUTarget("hip", "gfx942", 64) if amd else GPUTarget("cuda", 90, 32)

    # The codecs' inline PTX is guarded by ``cuda_capability_geq`` (``optgen.codecs.division.nvidia_ptx``), which
    # asks the active driver for the device's target; there is no device here, so it gets the one compiled for.
    # Triton's cache key leaves the guard's answer out, so kernels compiled without this answer must not be
    # found: a cache of its own.
    def compiled_for() -> GPUTarget:
        return target

    compiled_for.__triton_builtin__ = True  # as Triton marks its own, which JIT functions may reach
    target_info.current_target = compiled_for
    compiled = 0
    with tempfile.TemporaryDirectory(prefix="sm90_compile_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        for name in optim.__all__:
            cls = getattr(optim, name)
            importlib.import_module(cls.__module__)
            for key, variant in cls.variants.items():
                sig, passes = signature(cls, variant)
                for consts in passes:
                    launcher = variant.triton_launcher
                    try:
                        kernel = triton.compile(ASTSource(launcher.kernel, sig, consts), target=target,
                                                options=options(launcher, amd))
                        compiled += 1
                        if report:
                            print(f"{name}[{key or 'main'}] pass {consts.get('PASS', 1)}: "
                                  f"{launcher.rows}x{launcher.cols}, {launcher.num_warps} warps: {resources(kernel)}")
                    except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                        cause = exc
                        while cause.__cause__ is not None:
                            cause = cause.__cause__
                        print(f"FAIL {name}[{key or 'main'}] pass {consts.get('PASS', 1)}: {cause}".replace("\n", " "))
        # the per-tensor sums between a reducing kernel's passes (Lamb's), a kernel of the launcher's own
        sig = {"part": "*fp32", "segments": "*i64", "red": "*fp32", "n": "i32", "NRED": "constexpr",
               "SUMS": "constexpr", "CHUNK": "constexpr"}
        try:
            triton.compile(ASTSource(_sum_partials, sig, {"NRED": 6, "SUMS": 15, "CHUNK": 1024}), target=target)
            compiled += 1
        except Exception as exc:  # noqa: BLE001 - reported as the kernels above
            print(f"FAIL _sum_partials: {exc}".replace("\n", " "))
    print(f"compiled {compiled}")


if __name__ == "__main__":
    main()
