"""docs/tutorial.md stays true: its Adan specs build and match a float64 reference, and its commands run.

- examples/specs/adan.yaml (fp32 states) follows an independent float64 Adan (the update of the authors'
  code, sail-sg/Adan) for 20 steps on fresh random gradients, on both backends (Triton in its interpreter
  on the CPU).
- examples/specs/adan_q8.yaml (int8/uint8 moments, bf16 previous gradient): every step is checked from the
  states the optimizer actually holds (decoded): the new parameter within fp32 rounding of the float64 step,
  and each new state within its codec's error bound (optgen/codecs/q8.py's docstring; bf16: half an ulp).
- the tutorial's yaml block is the spec file, and its bash and python blocks run as written.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optgen

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
ADAN, ADAN_Q8 = ROOT / "examples" / "specs" / "adan.yaml", ROOT / "examples" / "specs" / "adan_q8.yaml"
HP = {"lr": 1e-2, "betas": (0.98, 0.92, 0.99), "eps": 1e-8, "weight_decay": 0.02}
SHAPES = [(64, 80), (4099,), (100,)]  # quantized (whole groups), quantized (a partial last group), fp32 (< 4096)
STATES = ("m", "d", "v", "gp")
BACKENDS = ["eager"] + (["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else [])


def adan_step(p, g, state, t, lr, betas, eps, weight_decay):
    """One Adan step in float64, as sail-sg/Adan's _single_tensor_adan (no_prox=False): returns (p, state)."""
    beta1, beta2, beta3 = betas
    pre_grad = g if t == 1 else state["gp"]  # the first step has no previous gradient: difference 0
    diff = g - pre_grad
    update = g + beta2 * diff
    m = beta1 * state["m"] + (1 - beta1) * g
    d = beta2 * state["d"] + (1 - beta2) * diff
    v = beta3 * state["v"] + (1 - beta3) * update * update
    denom = v.sqrt() / math.sqrt(1 - beta3**t) + eps
    step = (m / (1 - beta1**t) + beta2 * d / (1 - beta2**t)) / denom
    return (p - lr * step) / (1 + lr * weight_decay), {"m": m, "d": d, "v": v, "gp": g.clone()}


def _setup(spec: Path, backend: str, seed: int = 0):
    cls = optgen.load(spec)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    params = [w.clone().requires_grad_() for w in init]
    return cls(params, backend=backend, **HP), params, gen


@pytest.mark.parametrize("backend", BACKENDS)
def test_adan_fp32_follows_float64_reference(backend):
    opt, params, gen = _setup(ADAN, backend)
    ref = [p.detach().double() for p in params]
    states = [{k: torch.zeros(s, dtype=torch.float64) for k in STATES} for s in SHAPES]
    moved = worst = 0.0
    for t in range(1, 21):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            new, states[i] = adan_step(ref[i], g.double(), states[i], t, **HP)
            moved = max(moved, (new - ref[i]).abs().max().item())
            ref[i] = new
        for p, r in zip(params, ref):
            # fp32 rounding, accumulated over t steps: of p itself (an ulp is 2^-23 |p|) and of the step (~lr)
            ratio = (p.detach().double() - r).abs() / (t * (2.0**-22 * r.abs() + 1e-5 * HP["lr"]))
            worst = max(worst, ratio.max().item())
            assert ratio.max() <= 1, (t, ratio.max().item())
    print(f"{backend}: worst error / bound {worst:.3f}")
    assert moved > 0.5 * HP["lr"]  # the steps are real (Adan's normalised step is O(lr) per element)


def _groups(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Per element, the max |x| of its group of ``size`` consecutive elements (the q8 codecs' scale)."""
    flat = x.reshape(-1).abs()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % size)).view(-1, size)
    return padded.amax(1).repeat_interleave(size)[:flat.numel()].view(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adan_q8_every_step_within_codec_error(backend):
    opt, params, gen = _setup(ADAN_Q8, backend)
    assert [opt.variant_of(p) for p in params] == ["", "", "fp32"]  # the 100-element tensor keeps fp32 states
    held = [{k: torch.zeros(s, dtype=torch.float64) for k in STATES} for s in SHAPES]
    r255, fp16_rel = 0.5 / 255, 2.0**-11  # q8_sqrt's rounding; fp16 scale's relative rounding
    for t in range(1, 21):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        before = [p.detach().double() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        decoded = opt.torch_state_dict()["state"]
        for i, (p, g) in enumerate(zip(params, grads)):
            want_p, want = adan_step(before[i], g.double(), held[i], t, **HP)
            # the parameter is fp32: exact up to fp32 rounding of the step computed from the held states
            torch.testing.assert_close(p.detach().double(), want_p, rtol=2e-6, atol=1e-6 * HP["lr"])
            got = {k: decoded[i][k].double() for k in STATES}
            if opt.variant_of(p) == "fp32":
                for k in STATES:
                    # fp32 rounding, relative to the operands (d and v sum terms of either sign)
                    torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * want[k].abs().max().item())
            else:
                for k in ("m", "d"):  # q8_softsign: at most s/127 (+ the fp16 scale's rounding) per element
                    bound = _groups(want[k]) * (1 / 127 + fp16_rel) * (1 + 1e-4) + 1e-12
                    assert ((got[k] - want[k]).abs() <= bound).all(), (t, k, ((got[k] - want[k]).abs() / bound).max())
                s = _groups(want["v"].sqrt())  # q8_sqrt bounds the error of sqrt(v)
                bound = s * (r255 + fp16_rel) * (1 + 1e-4) + 1e-12
                assert ((got["v"].sqrt() - want["v"].sqrt()).abs() <= bound).all(), (t, "v")
                assert ((got["gp"] - want["gp"]).abs() <= 2.0**-8 * want["gp"].abs()).all(), (t, "gp")  # bf16: half an ulp
                assert opt.state[p]["m"].dtype == torch.int8 and opt.state[p]["gp"].dtype == torch.bfloat16
            held[i] = got  # the next step starts from what the optimizer holds


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)


def test_tutorial_shows_the_spec_files():
    yaml_blocks = _blocks("yaml")
    assert yaml_blocks[0] == ADAN.read_text()  # the whole fp32 spec, verbatim
    q8 = ADAN_Q8.read_text()
    for line in yaml_blocks[1].splitlines():  # the low-memory version's changed lines
        assert line in q8, line


@pytest.mark.skipif(shutil.which("optgen") is None and not (Path(sys.executable).parent / "optgen").exists(),
                    reason="the optgen console script is not installed")
def test_tutorial_commands_run(tmp_path):
    """Every bash block (from a scratch folder that links examples/) and every python block, as written."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for block in _blocks("bash"):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900, check=False)
        assert done.returncode == 0, f"{block}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (tmp_path / "build" / "adan_q8.py").exists() and (tmp_path / "build" / "adan.py").exists()
    table = (tmp_path / "runs" / "adan" / "digits.md").read_text()
    assert "| Adan |" in table and "| AdanQ8 |" in table and (tmp_path / "runs" / "adan" / "digits_loss.png").exists()
    for block in _blocks("python"):
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, f"{block}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
