"""Triton checks of a test module: in Triton's interpreter in a fresh process on a CPU, in this one on a GPU.

``triton.jit`` reads TRITON_INTERPRET when a function is decorated, i.e. when the Triton code is first
imported (see tests/test_codecs_quant.py); in a fresh process with TRITON_INTERPRET=1 in its environment that
is always early enough. The module runs as a script there (``python tests/test_x.py --triton-worker DIR``) and calls
``worker_main``; its fixture calls ``case_results``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
FLAG = "--triton-worker"

Runner = Callable[[Any, Path, str], Any]  # (cases, workdir, device) -> results


def case_results(module_file: str, cases: Any, run: Runner, workdir: Path) -> Any:
    """``run(cases, workdir, device)``: here on a GPU, else in a fresh interpreter process running ``module_file``."""
    if torch.cuda.is_available():
        return run(cases, workdir, "cuda")
    torch.save(cases, workdir / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, module_file, FLAG, str(workdir)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(workdir / "results.pt")


def worker_main(run: Runner) -> None:
    """In the fresh process: the cases the fixture saved, run on the CPU, their results saved beside them."""
    workdir = Path(sys.argv[sys.argv.index(FLAG) + 1])
    torch.save(run(torch.load(workdir / "cases.pt"), workdir, "cpu"), workdir / "results.pt")
