"""Quantized state codecs (q8_linear, q8_softsign, q8_sqrt, q8_dynamic, q4_dynamic, q4_linear, fp8_*_norm).

What is checked, and against what:
- PyTorch encode/decode against float64 references written here (plain float64 math on the same fp32
  inputs). The codec computes in fp32; the reference in float64. The two can only disagree where the
  exact value sits on a rounding boundary within a few fp32 ulps (127·y + 0.5 next to an integer, x/s
  next to a map midpoint): every such code is counted, must differ by exactly one step, must be explained
  by such a near-tie, and the count must be tiny.
- fp8 bit patterns against PyTorch's own casts and against a float64 round-to-nearest-even reference.
- The Triton device functions (through the codecs' renderings, pasted into a small test kernel) against
  the PyTorch path: identical code bits, scale bits and decoded bits, on random tiles whose element count
  is not a multiple of the tile or the group, with the masked lanes of the tile holding NaN.
- Decode error bounds, padding of partial groups (numel 1, 31, 33, 257), option validation, and that
  companding beats linear quantization (NMSE) on Adam-like m and v.

Triton without a GPU: ``triton.jit`` reads TRITON_INTERPRET when a function is *decorated* (checked in
Triton 3.9: ``triton.runtime.jit.jit`` consults ``knobs.runtime.interpret`` at decoration time), i.e. when
``optgen.codecs`` is first imported. tests/conftest.py sets it before any test module is imported, and this
module sets it too, but when another module imported Triton code first that can be too late. So on a CPU
machine the Triton checks run in a fresh subprocess (this file run as a script by tests/triton_worker.py)
with TRITON_INTERPRET=1 in its environment, which is always early enough. With CUDA they run in this process
on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see the module docstring)
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from triton_worker import FLAG, case_results, worker_main

from optgen.codecs import CODECS, dynamic, fp8, get_codec, q8
from optgen.errors import SpecError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fail(msg: str) -> SpecError:
    return SpecError(msg, field="state.m.storage")


def _codec(name: str, **options):
    return get_codec(name, options, "state", _fail)


def _heavy(n: int, gen: torch.Generator, positive: bool = False) -> torch.Tensor:
    """Fresh heavy-tailed fp32 data spanning many magnitudes (never zeros)."""
    x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.exp(2.0 * torch.randn(n, generator=gen,
                                                                                          dtype=torch.float64))
    x = x * 1e-2
    x = x.abs() + 1e-9 if positive else x
    return x.float()


# ==========================================================================================================
# float64 references (independent of the codec modules)
# ==========================================================================================================
def _pad_groups64(x: torch.Tensor, g: int) -> torch.Tensor:
    x = x.double().reshape(-1)
    out = torch.zeros((x.numel() + g - 1) // g * g, dtype=torch.float64)
    out[: x.numel()] = x
    return out.view(-1, g)


def ref_q8(x: torch.Tensor, g: int, kind: str):
    """float64 FlashOptim quantization: returns (codes, scale as float64, t = the exact k·y + 0.5)."""
    u = _pad_groups64(x, g)
    if kind == "sqrt":
        u = u.sqrt()
    s = u.abs().max(dim=1).values.clamp(min=1e-12)
    n = u / s[:, None]
    if kind == "softsign":
        y, k = 2 * n / (1 + n.abs()), 127.0
    elif kind == "sqrt":
        y, k = n, 255.0
    else:
        y, k = n, 127.0
    t = k * y + 0.5
    codes = torch.floor(t)
    return codes.reshape(-1)[: x.numel()], s, t.reshape(-1)[: x.numel()]


def ref_q8_decode(codes: torch.Tensor, scale16: torch.Tensor, g: int, kind: str) -> torch.Tensor:
    q = codes.double().reshape(-1)
    S = scale16.double().repeat_interleave(g)[: q.numel()]
    if kind == "softsign":
        y = q / 127
        return y / (2 - y.abs()) * S
    if kind == "sqrt":
        return (q / 255 * S) ** 2
    return q / 127 * S


def ref_nearest(r: torch.Tensor, table: torch.Tensor, ties_up: bool) -> torch.Tensor:
    """Index of the nearest table value to each r (float64 distances); a tie goes up or down."""
    d = (r.double()[:, None] - table.double()[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    hit = d == best
    idx = torch.arange(table.numel()).expand_as(d)
    return torch.where(hit, idx, -1).max(dim=1).values if ties_up else torch.where(hit, idx, 10**9).min(dim=1).values


def ref_blocks(x: torch.Tensor, b: int):
    """float64 block normalization: (x/s flat, s per block)."""
    u = _pad_groups64(x, b)
    s = u.abs().max(dim=1).values.clamp(min=1e-12)
    return (u / s[:, None]).reshape(-1)[: x.numel()], s


def ref_fp8(x: torch.Tensor, mant: int, bias: int, max_finite: float, saturate: bool) -> torch.Tensor:
    """float64 round-to-nearest-even into an fp8 format; returns the fp8 value as float64 (NaN, ±inf kept)."""
    v = x.double()
    a = v.abs()
    _, e = torch.frexp(a)  # a = f·2^e, f in [0.5, 1)
    exp = torch.clamp(e - 1, min=1 - bias)  # unbiased exponent, subnormals share the smallest one
    quantum = torch.exp2((exp - mant).double())
    r = torch.round(a / quantum) * quantum  # a/quantum is exact: round() is half-to-even
    overflow_limit = max_finite + 0.5 * torch.exp2(torch.tensor(math.floor(math.log2(max_finite)) - mant,
                                                                dtype=torch.float64))
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    if saturate:
        big = torch.full_like(a, max_finite)
    else:
        big = torch.full_like(a, float("nan")) if mant == 3 else inf.expand_as(a)
    # above max: RNE rounds to the next binade's first value (out of range) once a exceeds max + half a step
    # (a tie at exactly max + half step goes to the even one: max's mantissa is odd for e5m2 (1.11), even
    # for e4m3fn (1.110))
    up = (a > overflow_limit) | ((a == overflow_limit) & (mant == 2))
    r = torch.where(up | torch.isinf(a), big, torch.where(a > max_finite, torch.full_like(a, max_finite), r))
    r = torch.where(torch.isnan(a), torch.full_like(a, float("nan")), r)
    return torch.where(v < 0, -r, r)


# ==========================================================================================================
# Registry, options, buffers, renderings
# ==========================================================================================================
QUANT = ["q8_linear", "q8_softsign", "q8_sqrt", "q8_dynamic", "q4_dynamic", "q4_linear", "fp8_e4m3_norm",
         "fp8_e5m2_norm"]


def test_registry_and_buffers():
    for name in QUANT:
        assert name in CODECS
        c = _codec(name)
        assert c.roles == frozenset({"state"})
        assert c.name == name
    assert _codec("q8_softsign").bytes_per_element() == 1 + 2 / 32
    assert _codec("q8_sqrt", group=128).bytes_per_element() == 1 + 2 / 128
    assert _codec("q8_dynamic").bytes_per_element() == 1 + 4 / 256
    assert _codec("q4_linear").bytes_per_element() == 0.5 + 4 / 128
    assert _codec("fp8_e5m2_norm").bytes_per_element() == 1
    shapes = {name: [(b.suffix, b.dtype, b.shape, b.init) for b in _codec(name).buffers()] for name in QUANT}
    assert shapes["q8_linear"] == [("", "int8", "param", 0.0), ("scale", "float16", "groups", 0.0)]
    assert shapes["q8_sqrt"] == [("", "uint8", "param", 0.0), ("scale", "float16", "groups", 0.0)]
    assert shapes["q8_dynamic"] == [("", "uint8", "param", 0.0), ("absmax", "float32", "groups", 0.0)]
    assert shapes["q4_dynamic"] == [("", "uint8", "half", 0.0), ("scale", "float32", "groups", 0.0)]
    assert shapes["fp8_e4m3_norm"] == [("", "float8_e4m3fn", "param", 0.0), ("scale", "float32", "scalar", 1.0)]
    assert shapes["fp8_e5m2_norm"] == [("", "float8_e5m2", "param", 0.0), ("scale", "float32", "scalar", 1.0)]
    assert _codec("q8_sqrt", group=64).group_size == 64 and _codec("q8_sqrt").group_size == 32
    assert _codec("q8_dynamic").group_size == 256 and _codec("q4_linear").group_size == 128


@pytest.mark.parametrize("name,options,message", [
    ("q8_softsign", {"group": 48}, "group must be one of 32, 64, 128, 256"),
    ("q8_linear", {"group": True}, "group must be one of"),
    ("q8_sqrt", {"block": 32}, "takes only the option 'group'"),
    ("q8_dynamic", {"signed": "yes"}, "signed must be true or false"),
    ("q8_dynamic", {"group": 256}, "takes only the option 'signed'"),
    ("q4_dynamic", {"group": 128}, "takes only the option 'whole_groups'"),
    ("q4_linear", {"whole_groups": "yes"}, "whole_groups must be true or false"),
    ("fp8_e4m3_norm", {"scale": 1.0}, "takes only the option .clip."),
    ("fp8_e5m2_norm", {"clip": -1}, "clip must be a positive number"),
])
def test_bad_options(name, options, message):
    with pytest.raises(SpecError, match=message) as err:
        get_codec(name, options, "state", _fail)
    assert "state.m.storage" in str(err.value)


def test_roles_refused():
    for name in QUANT:
        for role in ("param", "grad"):
            with pytest.raises(SpecError, match=f"cannot hold the {role}"):
                get_codec(name, {}, role, _fail)


def test_renderings_are_calls_into_the_codec_modules():
    c = _codec("q8_softsign", group=64)
    assert c.imports == ("from optgen.codecs import q8",)
    assert c.torch_decode("m", ["state_m[i]", "state_m_scale[i]"]) == [
        "m = q8.torch_decode(state_m[i], state_m_scale[i], 64, 'softsign')"]
    assert c.triton_encode("m_1", ["state_m", "state_m_scale"], "offs", "mask") == [
        "q8.triton_encode_softsign(m_1, state_m, state_m_scale, offs, mask, start, numel_here, 64)"]
    d = _codec("q8_dynamic", signed=False)
    assert d.constants == (("qmap_unsigned", "dynamic.qmap_table(False, {device})"),)
    assert "qmap_unsigned" in d.triton_decode("v", ["a", "b"], "offs", "mask")[0]
    q4 = _codec("q4_linear")
    assert q4.torch_decode("v", ["s[i]", "t[i]"]) == ["v = dynamic.torch_decode_q4(s[i], t[i], param[i].numel(), False)"]


# ==========================================================================================================
# q8 (FlashOptim) against the float64 reference
# ==========================================================================================================
def _check_codes_vs_ref(codes: torch.Tensor, ref_codes: torch.Tensor, t: torch.Tensor | None, what: str,
                        near: float = 1e-4) -> int:
    """Codes equal the reference except at near-ties (|t - round(t)| < near), where they differ by one."""
    diff = codes.long() - ref_codes.long()
    bad = diff != 0
    assert diff.abs().max() <= 1, f"{what}: a code differs by more than one step"
    if t is not None:
        dist = (t[bad] - torch.round(t[bad])).abs()
        assert (dist < near).all(), f"{what}: a code differs away from a rounding tie: {dist.max()}"
    assert bad.sum() <= max(2, codes.numel() // 2000), f"{what}: {int(bad.sum())} flipped codes"
    return int(bad.sum())


@pytest.mark.parametrize("kind", ["linear", "softsign", "sqrt"])
@pytest.mark.parametrize("group", [32, 256])
def test_q8_torch_vs_float64(kind, group):
    gen = torch.Generator().manual_seed(1 + group + len(kind))
    n = 50_000 + 7
    x = _heavy(n, gen, positive=kind == "sqrt")
    codes, scale = q8.quantize(x, group, kind)
    assert codes.dtype == (torch.uint8 if kind == "sqrt" else torch.int8) and codes.shape == (n,)
    assert scale.dtype == torch.float16 and scale.shape == ((n + group - 1) // group,)
    rc, rs, t = ref_q8(x, group, kind)
    flips = _check_codes_vs_ref(codes, rc, t, f"q8 {kind}")
    # scales: fp16 of the float64 s (the fp32 s is exact for linear/softsign; for sqrt the fp32 sqrt can
    # only move the fp16 rounding at a fp16 midpoint, counted like the codes)
    s16 = rs.to(torch.float16)
    sbad = scale.view(torch.int16) != s16.view(torch.int16)
    assert int(sbad.sum()) <= (1 if kind == "sqrt" else 0)
    # decode against the float64 decode of the same codes and scales. Relative rounding budget, in units of
    # 2^-24: linear (q·fp32(1/127))·S: 3 (the reciprocal, two products); softsign (q/(254-|q|))·S: 2;
    # sqrt ((q·fp32(1/255))·S)²: 2·3 + 1 = 7 (plus second order terms)
    dec = q8.dequantize(codes, scale, group, kind)
    ref = ref_q8_decode(codes, scale, group, kind)
    assert dec.dtype == torch.float32 and dec.shape == (n,) and not torch.isnan(dec).any()
    budget = {"linear": 3, "softsign": 2, "sqrt": 7.001}[kind]
    assert ((dec.double() - ref).abs() <= budget * 2.0**-24 * ref.abs()).all()
    print(f"q8_{kind} group {group}: {flips} near-tie codes of {n} differ from float64")


def test_round_half_up_is_the_same_with_or_without_fma():
    """floor(k·r + 0.5), k = 127 or 255, |r| <= 1: rounding k·r first (two fp32 ops, as PyTorch does) and
    rounding k·r + 0.5 once (a fused multiply-add, which the GPU compiler may emit) agree, checked on
    every fp32 value within 3000 ulps of every code boundary (k·r = j - 0.5)."""
    for k in (127.0, 255.0):
        j = torch.arange(-254 if k == 127 else 1, 256, dtype=torch.float64) - 0.5
        j = j[(j / k).abs() <= 1]
        centre = (j / k).float().view(torch.int32)
        r = (centre[:, None] + torch.arange(-3000, 3001, dtype=torch.int32)[None, :]).view(torch.float32).reshape(-1)
        r = r[r.abs() <= 1]
        two = q8.round_half_up(r, k)
        once = torch.floor((r.double() * k + 0.5).float())  # k·r + 0.5 is exact in float64 here: one rounding
        assert r.numel() > 500_000 and torch.equal(two, once)


@pytest.mark.parametrize("kind", ["linear", "softsign", "sqrt"])
def test_q8_decode_error_bound(kind):
    """Documented bounds, per element of a group with fp32 scale s and stored S = fp16(s) (|S-s| <= 2^-11 s
    in fp16's normal range), n = x/s (u = √v/s for sqrt), h = 1/2 code step:
      linear:   |x̂ - x| <= s·(0.5/127) + |n̂|·|S - s| + 4 ulp
      softsign: |x̂ - x| <= s·|f⁻¹(ŷ ± 0.5/127) - n̂| + |n̂|·|S - s| + 4 ulp, f⁻¹(y) = y/(2-|y|); i.e. between
                ≈ s/507 near 0 and s/127 near the group max (4x finer than linear near 0)
      sqrt:     |√v̂ - √v| <= s·(0.5/255) + û·|S - s|/s... and |v̂ - v| = |√v̂ - √v|·(√v̂ + √v)."""
    gen = torch.Generator().manual_seed(7)
    n, g = 40_000, 32
    x = _heavy(n, gen, positive=kind == "sqrt") * 100  # keep s inside fp16's normal range
    codes, scale = q8.quantize(x, g, kind)
    dec = q8.dequantize(codes, scale, g, kind).double()
    x64 = x.double()
    _, s, _ = ref_q8(x, g, kind)
    s = s.repeat_interleave(g)[:n]
    S = scale.double().repeat_interleave(g)[:n]
    assert ((S - s).abs() <= 2.0**-11 * s).all()
    ulp = 4 * 2.0**-24
    if kind == "linear":
        nh = codes.double() / 127
        bound = s * 0.5 / 127 + nh.abs() * (S - s).abs() + ulp * (x64.abs() + dec.abs())
        err = (dec - x64).abs()
    elif kind == "softsign":
        yh = codes.double() / 127

        def inv(y):
            y = y.clamp(-1, 1)
            return y / (2 - y.abs())
        nh = inv(yh)
        step = torch.maximum((inv(yh + 0.5 / 127) - nh).abs(), (inv(yh - 0.5 / 127) - nh).abs())
        bound = s * step + nh.abs() * (S - s).abs() + ulp * (x64.abs() + dec.abs())
        err = (dec - x64).abs()
        assert (step <= 1 / 127).all() and (step[codes == 0] <= 1 / 507).all()
    else:
        uh = codes.double() / 255 * S
        u = x64.sqrt()
        bound_u = s * 0.5 / 255 + (codes.double() / 255) * (S - s).abs() + ulp * (u + uh)
        bound = bound_u * (uh + u) + ulp * (x64 + dec)
        err = (dec - x64).abs()
    ratio = (err / bound).max().item()
    assert ratio <= 1.0, f"{kind}: error exceeds the documented bound ({ratio})"
    rel = ((dec - x64).abs() / s).max().item()
    print(f"q8_{kind}: max |x̂-x|/s = {rel:.3e}, max err/bound = {ratio:.6f}")


@pytest.mark.parametrize("kind", ["linear", "softsign", "sqrt"])
def test_q8_scale_extremes(kind):
    """fp16 scale quirks: s < 2^-25 stores 0 and decodes its group to 0; s > 65504 stores inf; fp16
    subnormal scales are kept with reduced precision; an all-zero group decodes to zeros."""
    g = 32
    gen = torch.Generator().manual_seed(3)
    base = _heavy(g, gen, positive=True)
    base = base / base.abs().max()
    sign = 1.0 if kind == "sqrt" else -1.0
    groups = [base * 1e-9, base * 3e-6 * sign, base * 1e6, torch.zeros(g), base * 0.5]
    if kind == "sqrt":  # the scale is of √v
        groups = [base * 1e-18, base * 9e-12, base * 1e12, torch.zeros(g), base * 0.25]
    x = torch.cat(groups)
    codes, scale = q8.quantize(x, g, kind)
    assert scale[0] == 0 and scale[3] == 0  # 1e-9 (√: 1e-9) < 2^-25; zero group: fp16(1e-12) = 0
    assert 0 < scale[1] < 6.1e-5  # fp16 subnormal
    assert torch.isinf(scale[2])
    dec = q8.dequantize(codes, scale, g, kind)
    assert (dec[:g] == 0).all() and (dec[3 * g: 4 * g] == 0).all()
    assert torch.isfinite(dec[g: 2 * g]).all() and torch.isfinite(dec[4 * g:]).all()
    big = dec[2 * g: 3 * g]  # S = inf: ±inf where the code is not 0 (0·inf is NaN)
    nz = codes[2 * g: 3 * g] != 0
    assert torch.isinf(big[nz]).all() and torch.isnan(big[~nz]).all()
    # the subnormal-scale group still decodes within the fp16 subnormal step of the scale
    sub = dec[g: 2 * g].double()
    xs = (x[g: 2 * g].double().sqrt() if kind == "sqrt" else x[g: 2 * g].double())
    err = (sub.sqrt() if kind == "sqrt" else sub) - xs
    assert (err.abs() <= xs.abs().max() * (0.5 / 127 if kind != "sqrt" else 0.5 / 255) + 2.0**-25).all()
    rc, _, t = ref_q8(x, g, kind)
    _check_codes_vs_ref(codes, rc, t, f"extremes {kind}")


def test_q8_nan_and_inf_are_visible():
    g = 32
    gen = torch.Generator().manual_seed(5)
    x = _heavy(4 * g, gen)
    x[5] = float("nan")
    x[g + 3] = float("inf")
    for kind in ("linear", "softsign", "sqrt"):
        xx = x.abs() if kind == "sqrt" else x
        codes, scale = q8.quantize(xx, g, kind)
        assert torch.isnan(scale[0]) and torch.isinf(scale[1]) and torch.isfinite(scale[2:]).all()
        assert codes[5] == 0
        dec = q8.dequantize(codes, scale, g, kind)
        assert torch.isnan(dec[:g]).all()  # the NaN group decodes to NaN (NaN·code)
        assert torch.isfinite(dec[2 * g:]).all()


@pytest.mark.parametrize("numel", [1, 31, 33, 257])
def test_q8_partial_groups(numel):
    """The padding of the last group counts as 0: a tensor quantizes exactly like its prefix of a longer
    tensor whose tail is zero, and decodes to numel elements."""
    gen = torch.Generator().manual_seed(numel)
    for kind in ("linear", "softsign", "sqrt"):
        x = _heavy(numel, gen, positive=kind == "sqrt")
        codes, scale = q8.quantize(x, 32, kind)
        assert codes.shape == (numel,) and scale.shape == ((numel + 31) // 32,)
        padded = torch.cat([x, torch.zeros(32 * scale.numel() - numel)])
        pc, ps = q8.quantize(padded, 32, kind)
        assert torch.equal(codes, pc[:numel]) and torch.equal(scale.view(torch.int16), ps.view(torch.int16))
        rc, _, t = ref_q8(x, 32, kind)
        _check_codes_vs_ref(codes, rc, t, f"partial {kind}")
        dec = q8.dequantize(codes, scale, 32, kind)
        assert dec.shape == (numel,)
        # in-place API on a parameter-shaped buffer
        cbuf = torch.full((numel,), 77, dtype=codes.dtype)
        sbuf = torch.full_like(scale, float("nan"))
        q8.torch_encode(x, cbuf, sbuf, 32, kind)
        assert torch.equal(cbuf, codes) and torch.equal(sbuf.view(torch.int16), scale.view(torch.int16))
        assert torch.equal(q8.torch_decode(cbuf, sbuf, 32, kind), dec)


# ==========================================================================================================
# Adam-like moments: companding vs linear
# ==========================================================================================================
def _adam_moments(n=32 * 512, steps=200, seed=11):
    """m, v after `steps` Adam updates on heavy-tailed gradients (Student-t with 3 degrees of freedom around
    a small signal, per-coordinate scales spread over about four decades), float64, rounded to fp32. The
    gradient magnitude (~1e-2) keeps every group's scale in fp16's normal range, so what is compared is
    the companding, not fp16's range."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1e-2 * torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * 1.5)
    m = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        chi2 = torch.randn(3, n, generator=gen, dtype=torch.float64).pow(2).sum(0) / 3
        g = scale * (z / chi2.sqrt() + 0.1)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
    return m.float(), v.float()


def _nmse(xh: torch.Tensor, x: torch.Tensor) -> float:
    return float(((xh.double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())


def test_companding_beats_linear_on_adam_moments():
    m, v = _adam_moments()
    g = 32
    m_lin = q8.dequantize(*q8.quantize(m, g, "linear"), g, "linear")
    m_soft = q8.dequantize(*q8.quantize(m, g, "softsign"), g, "softsign")
    # linear uint8 for v, written here: q = floor(255·v/max v + 0.5) with an fp32 scale (favouring it)
    vg = _pad_groups64(v, g)
    s = vg.max(dim=1).values.clamp(min=1e-12)
    v_lin = (torch.floor(255 * vg / s[:, None] + 0.5) / 255 * s[:, None]).reshape(-1)[: v.numel()]
    v_sqrt = q8.dequantize(*q8.quantize(v, g, "sqrt"), g, "sqrt")
    # relative error of √v per element: what Adam's denominator sees (v decoded to 0 counts as 1)
    rel_lin = ((v_lin.sqrt() - v.double().sqrt()).abs() / v.double().sqrt()).median().item()
    rel_sqrt = ((v_sqrt.double().sqrt() - v.double().sqrt()).abs() / v.double().sqrt()).median().item()
    r = {"m linear": _nmse(m_lin, m), "m softsign": _nmse(m_soft, m),
         "v linear": _nmse(v_lin, v), "v sqrt": _nmse(v_sqrt, v)}
    print("NMSE on Adam-like moments: " + ", ".join(f"{k} {val:.3e}" for k, val in r.items())
          + f"; median relative error of sqrt(v): linear {rel_lin:.3e}, sqrt {rel_sqrt:.3e}")
    for val in r.values():
        assert math.isfinite(val) and val > 0
    assert r["m softsign"] < r["m linear"]
    assert r["v sqrt"] < r["v linear"]
    assert rel_sqrt < rel_lin


# ==========================================================================================================
# Dynamic maps (bitsandbytes / torchao)
# ==========================================================================================================
# SHA-256 of the fp32 bytes of bitsandbytes 0.50.2 ``functional.create_dynamic_map(signed)`` (read by running
# that function; torchao 0.18.0's ``quant_utils.create_dynamic_map`` gives the same bytes); the fp32 bit
# patterns of torchao's 4-bit ``create_dynamic_map(True, 3, 4)``.
BNB_SHA256 = {True: "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
              False: "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398"}
TORCHAO_Q4_BITS = [3210949427, 3207174554, 3202351104, 3193543065, 3181295698, 3171229369, 3149150552, 0,
                   1001666904, 1023745721, 1033812050, 1046059417, 1054867456, 1059690906, 1063465779,
                   1065353216]


def test_dynamic_maps_equal_bitsandbytes_and_torchao():
    import hashlib
    for signed in (True, False):
        t = torch.tensor(dynamic.dynamic_map(signed), dtype=torch.float32)
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == BNB_SHA256[signed]
        assert t.numel() == 256 and bool((t[1:] > t[:-1]).all()) and t[-1] == 1.0
        # each value is the decade's midpoint formula in float64 up to fp32 rounding
        pos = t[t > 0][:-1].double()
        dec = torch.floor(torch.log10(pos / 0.1))
        assert ((pos / 10**dec) >= 0.1).all() and ((pos / 10**dec) < 1).all()
    signed = torch.tensor(dynamic.Q8_SIGNED_MAP)
    assert signed[0] > -1 and signed[127] == 0 and signed[128] == pytest.approx(5.5e-7, rel=1e-6)
    unsigned = torch.tensor(dynamic.Q8_UNSIGNED_MAP)
    assert unsigned[0] == 0 and unsigned[1] == pytest.approx(3.25e-7, rel=1e-6)
    q4 = torch.tensor(dynamic.Q4_SIGNED_MAP, dtype=torch.float32).view(torch.int32).tolist()
    assert [b & 0xFFFFFFFF for b in q4] == TORCHAO_Q4_BITS
    assert dynamic.Q4_LINEAR_MAP == [k / 16 for k in range(1, 17)]
    try:  # when bitsandbytes is installed, compare with it directly
        import bitsandbytes.functional as bnbf
    except (ImportError, OSError, RuntimeError):
        return
    for signed in (True, False):
        assert torch.equal(bnbf.create_dynamic_map(signed=signed), torch.tensor(dynamic.dynamic_map(signed)))


@pytest.mark.parametrize("signed", [True, False])
def test_q8_dynamic_vs_float64(signed):
    gen = torch.Generator().manual_seed(21 + signed)
    n = 20_000 + 13
    x = _heavy(n, gen, positive=not signed)
    codes, absmax = dynamic.quantize_q8(x, signed)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32 and absmax.numel() == (n + 255) // 256
    r, s = ref_blocks(x, 256)
    assert torch.equal(absmax.double(), s)
    table = torch.tensor(dynamic.Q8_SIGNED_MAP if signed else dynamic.Q8_UNSIGNED_MAP, dtype=torch.float64)
    ref = ref_nearest(r, table, ties_up=False)
    if signed:  # bitsandbytes: a negative value never takes the code of 0
        ref = torch.where((r < 0) & (ref == 127), ref - 1, ref)
    # near-ties: r within a few fp32 ulps of a midpoint between the two codes
    diff = codes.long() - ref
    bad = diff != 0
    assert diff.abs().max() <= 1
    mid = (table[torch.minimum(codes.long(), ref)[bad]] + table[torch.maximum(codes.long(), ref)[bad]]) / 2
    assert ((r[bad] - mid).abs() <= 4 * 2.0**-24 * r[bad].abs()).all()
    assert bad.sum() <= 2
    dec = dynamic.dequantize_q8(codes, absmax, signed)
    refdec = table[codes.long()] * absmax.double().repeat_interleave(256)[:n]
    assert ((dec.double() - refdec).abs() <= 2.0**-24 * refdec.abs()).all()
    # error bound: half the gap to the neighbouring code (the sign rule at 0 can cost a full smallest step)
    gaps = torch.cat([table[1:] - table[:-1], torch.zeros(1, dtype=torch.float64)])
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), gaps[:-1]])
    c = codes.long()
    half = torch.maximum(gaps[c], lower[c]) / 2 + (table[128] if signed else 0)
    sx = s.repeat_interleave(256)[:n]
    assert ((dec.double() - x.double()).abs() <= half * sx * (1 + 1e-6)).all()
    print(f"q8_dynamic signed={signed}: {int(bad.sum())} near-tie codes differ; NMSE {_nmse(dec, x):.3e}")


def test_q8_dynamic_ties_and_sign_rule():
    """Exact ties at an fp32 midpoint take the lower code; a negative value next to 0 takes the smallest
    negative code (bitsandbytes' optimizer rule); the block max maps to 1.0 and -max to the lowest code."""
    t = dynamic.qmap_table(True)
    vals, mids = t[:256], t[256:511]
    k = 200
    x = torch.zeros(256)
    x[0] = 1.0  # the block max: scale 1, so x/s = x exactly
    x[1] = mids[k]  # exactly on the midpoint between codes k and k+1
    x[2] = -1e-9  # nearest is 0, but negative
    x[3] = 1e-9
    x[4] = -1.0
    x[5] = vals[130]
    codes, s = dynamic.quantize_q8(x, True)
    assert s.item() == 1.0
    assert codes[0] == 255 and codes[1] == k and codes[2] == 126 and codes[3] == 127 and codes[4] == 0
    assert codes[5] == 130
    cu, _ = dynamic.quantize_q8(x.abs(), False)
    assert cu[2] == 0 or dynamic.Q8_UNSIGNED_MAP[int(cu[2])] < 2e-9


def test_dynamic_huge_scales_keep_codes_in_range():
    """A block max >= 2^126 has a subnormal reciprocal, and s·fp32(1/s) can exceed 1 (by at most two ulps):
    the block max still takes the top code and decodes to s, and -s the lowest code (the Triton side of these
    blocks is in ``triton_cases``)."""
    scales = _huge_scales()
    for s in scales[:2]:
        t = torch.tensor(s)
        assert 1.0 < float(t * (torch.ones_like(t) / t)) <= 1.0 + 2 * 2.0**-23
    x = torch.cat([torch.tensor([1.0, -1.0, 0.5, -0.25, 1e-3] + [0.0] * 251) * s for s in scales])
    codes, absmax = dynamic.quantize_q8(x, True)
    assert absmax.tolist() == scales
    dec = dynamic.dequantize_q8(codes, absmax, True).view(3, 256)
    assert (codes.view(3, 256)[:, 0] == 255).all() and (codes.view(3, 256)[:, 1] == 0).all()
    assert dec[:, 0].tolist() == scales  # (the signed map has no -1.0: code 0 is its lowest value)
    ucodes, _ = dynamic.quantize_q8(x.abs(), False)
    assert (ucodes.view(3, 256)[:, 0] == 255).all()
    for signed in (True, False):
        y = x if signed else x.abs()
        packed, scale = dynamic.quantize_q4(y.view(3, 256)[:, :128].reshape(-1), signed)
        top = (packed.view(3, 64)[:, 0] >> 4)
        assert (top == 15).all() and scale.tolist() == scales


@pytest.mark.parametrize("signed", [True, False])
def test_q4_vs_float64(signed):
    gen = torch.Generator().manual_seed(31 + signed)
    n = 20_000 + 3  # odd: the last byte carries a pad nibble
    x = _heavy(n, gen, positive=not signed)
    packed, scale = dynamic.quantize_q4(x, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2 and scale.numel() == (n + 127) // 128
    r, s = ref_blocks(x, 128)
    assert torch.equal(scale.double(), s)
    table = torch.tensor(dynamic.Q4_SIGNED_MAP if signed else dynamic.Q4_LINEAR_MAP, dtype=torch.float64)
    ref = ref_nearest(r, table, ties_up=True)
    hi, lo = (packed >> 4).long(), (packed & 15).long()
    codes = torch.stack([hi, lo], 1).reshape(-1)
    pad = codes[n:]
    codes = codes[:n]
    assert pad.numel() == 1 and pad.item() == (7 if signed else 0)  # the code of 0 (linear: nearest is 1/16)
    diff = codes - ref
    bad = diff != 0
    assert diff.abs().max() <= 1
    mid = (table[torch.minimum(codes, ref)[bad]] + table[torch.maximum(codes, ref)[bad]]) / 2
    assert ((r[bad] - mid).abs() <= 4 * 2.0**-24).all()
    assert bad.sum() <= 2
    dec = dynamic.dequantize_q4(packed, scale, n, signed)
    assert dec.shape == (n,)
    refdec = table[codes] * s.repeat_interleave(128)[:n]
    assert ((dec.double() - refdec).abs() <= 2.0**-24 * refdec.abs()).all()
    # bound: half the largest gap next to the code; below the lowest map value the error is x's distance
    gaps = torch.cat([table[1:] - table[:-1], torch.zeros(1, dtype=torch.float64)])
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), gaps[:-1]])
    below = (table[0] - r).clamp(min=0)
    half = torch.maximum(torch.maximum(gaps[codes], lower[codes]) / 2, below)
    sx = s.repeat_interleave(128)[:n]
    assert ((dec.double() - x.double()).abs() <= half * sx * (1 + 1e-6)).all()
    print(f"q4 signed={signed}: {int(bad.sum())} near-tie codes differ; NMSE {_nmse(dec, x):.3e}")


def test_q4_torchao_rounding_rule():
    """torchao's rule: an exact tie (in fp32: x - M[c] == (M[c+1] - M[c])·0.5) goes up; values below the
    lowest map value take code 0; -1 (absent from the signed map) takes the lowest code."""
    h = float(torch.tensor(dynamic.Q4_SIGNED_MAP[8]) * 0.5)  # M[8] = 0.0055 = 2h exactly in fp32
    x = torch.zeros(128)
    x[0] = 1.0  # the block max: s = 1, x/s = x
    x[1] = h  # tie between codes 7 (0) and 8
    x[2] = -1.0
    x[3] = -h  # tie between codes 6 (-0.0055) and 7 (0)
    x[4] = float(torch.tensor(h).nextafter(torch.tensor(0.0)))  # just below the tie
    packed, _ = dynamic.quantize_q4(x, True)
    assert packed[:3].tolist() == [(15 << 4) | 8, (0 << 4) | 7, (7 << 4) | 7]  # x[5] = 0: code 7
    y = torch.zeros(128)
    y[0] = 1.0
    y[1] = 0.01  # below 1/16
    y[2] = 3 / 32  # tie between 1/16 and 2/16
    y[3] = 1 - 1 / 32  # tie between 15/16 and 1
    packed, _ = dynamic.quantize_q4(y, False)
    assert packed[:2].tolist() == [(15 << 4) | 0, (1 << 4) | 15]


def test_q4_thresholds_give_torchaos_codes():
    """The Triton encode's signed q4 code (the number of ``q4_thresholds`` <= x/s) equals torchao's rule (the
    PyTorch path, through quantize_q4) on every fp32 within 4096 ulps of each threshold and map value, at -1, 0
    and 1, and on random x/s in [-1, 1]."""
    thresholds = torch.tensor(dynamic.Q4_SIGNED_THRESHOLDS)
    assert len(thresholds) == 15 and bool((thresholds[1:] > thresholds[:-1]).all())
    around = torch.tensor(dynamic.Q4_SIGNED_THRESHOLDS + dynamic.Q4_SIGNED_MAP + [-1.0, 0.0])
    bits = around.view(torch.int32)[:, None] + torch.arange(-4096, 4097, dtype=torch.int32)[None, :]
    near = bits.reshape(-1).view(torch.float32)
    gen = torch.Generator().manual_seed(7)
    r = torch.cat([near[near.abs() <= 1], torch.rand(100_000, generator=gen) * 2 - 1, torch.tensor([-1.0, 1.0])])
    blocks = torch.cat([torch.ones(r.numel(), 1), r[:, None].expand(-1, 127)], 1)  # s = 1 in every block: x/s = r
    packed, scale = dynamic.quantize_q4(blocks.reshape(-1), True)
    assert bool((scale == 1).all())
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1, 128)[:, 1].long()
    assert torch.equal(codes, (r[:, None] >= thresholds[None, :]).sum(1))


@pytest.mark.parametrize("numel", [1, 31, 33, 257])
def test_dynamic_partial_blocks(numel):
    gen = torch.Generator().manual_seed(100 + numel)
    for signed in (True, False):
        x = _heavy(numel, gen, positive=not signed)
        c8, a8 = dynamic.quantize_q8(x, signed)
        assert c8.shape == (numel,) and a8.shape == ((numel + 255) // 256,)
        pc, pa = dynamic.quantize_q8(torch.cat([x, torch.zeros(256 * a8.numel() - numel)]), signed)
        assert torch.equal(c8, pc[:numel]) and torch.equal(a8, pa)
        assert dynamic.dequantize_q8(c8, a8, signed).shape == (numel,)
        c4, s4 = dynamic.quantize_q4(x, signed)
        assert c4.shape == ((numel + 1) // 2,) and s4.shape == ((numel + 127) // 128,)
        pc4, ps4 = dynamic.quantize_q4(torch.cat([x, torch.zeros(128 * s4.numel() - numel)]), signed)
        assert torch.equal(c4, pc4[: c4.numel()]) and torch.equal(s4, ps4)
        d4 = dynamic.dequantize_q4(c4, s4, numel, signed)
        assert d4.shape == (numel,) and torch.equal(d4, dynamic.dequantize_q4(pc4, ps4, numel, signed))
        # in-place API
        cb, sb = torch.full_like(c4, 0xAB), torch.full_like(s4, float("nan"))
        dynamic.torch_encode_q4(x, cb, sb, signed)
        assert torch.equal(cb, c4) and torch.equal(sb, s4)
        assert torch.equal(dynamic.torch_decode_q4(cb, sb, numel, signed), d4)
        cb8, ab8 = torch.full((numel,), 0xAB, dtype=torch.uint8), torch.full_like(a8, float("nan"))
        dynamic.torch_encode_q8(x, cb8, ab8, signed)
        assert torch.equal(cb8, c8) and torch.equal(ab8, a8)


# ==========================================================================================================
# fp8
# ==========================================================================================================
def _fp8_inputs(gen: torch.Generator) -> torch.Tensor:
    n = 200_000
    mags = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 20, (n,), generator=gen).float())
    rnd_bits = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    # every fp8 midpoint and its fp32 neighbours (ties and near-ties), for both formats
    mids = []
    for fmt in ("e4m3fn", "e5m2"):
        v = fp8.fp8_value(torch.arange(256, dtype=torch.uint8), fmt)
        v = v[torch.isfinite(v)].sort().values.unique()
        m = (v[1:] + v[:-1]) / 2
        mids.append(torch.cat([m, torch.nextafter(m, torch.full_like(m, float("inf"))),
                               torch.nextafter(m, torch.zeros_like(m))]))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0, 464.0, 464.03125, 480.0,
                            -500.0, 57344.0, 61439.996, 61440.0, 65536.0, 1e-45, 2.0**-10, 2.0**-17, 2.0**-16 * 1.5,
                            2.0**-126, 2.0**-6, 2.0**-14])
    m_all = torch.cat(mids)
    return torch.cat([mags, rnd_bits, m_all, -m_all, special])


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_fp8_bits_match_torch_cast_and_float64(fmt):
    gen = torch.Generator().manual_seed(41)
    x = _fp8_inputs(gen)
    mine = fp8.fp8_bits(x, fmt)
    dtype = fp8.TORCH_DTYPES[fmt]
    # which overflow rule does the installed PyTorch follow? (2.13: e4m3fn saturates; before: NaN)
    torch_saturates = fmt == "e4m3fn" and not torch.isnan(torch.tensor([500.0]).to(dtype).float()).item()
    theirs = x.to(dtype).view(torch.uint8)
    ours_same_rule = mine if (torch_saturates or fmt == "e5m2") else fp8.fp8_bits(x, fmt, saturate=False)
    assert torch.equal(ours_same_rule, theirs), int((ours_same_rule != theirs).sum())
    # float64 reference (independent of PyTorch's cast)
    mant, bias, maxf = (3, 7, 448.0) if fmt == "e4m3fn" else (2, 15, 57344.0)
    ref = ref_fp8(x, mant, bias, maxf, saturate=fmt == "e4m3fn")
    got = fp8.fp8_value(mine, fmt).double()
    same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    assert same.all(), x[~same][:8]
    # signs, zeros and NaN patterns
    assert (torch.signbit(got[~torch.isnan(got)]) == torch.signbit(x[~torch.isnan(got)])).all()
    nan = torch.isnan(x)
    assert ((mine[nan] & 0x7F) == 0x7F).all() and torch.equal(mine[nan] >= 0x80, torch.signbit(x[nan]))
    if fmt == "e4m3fn":
        assert mine[x == float("inf")].tolist() == [0x7E] and mine[x == -float("inf")].tolist() == [0xFE]
        assert fp8.fp8_bits(torch.tensor([500.0, float("inf")]), fmt, saturate=False).tolist() == [0x7F, 0x7F]
    else:
        assert mine[x == float("inf")].tolist() == [0x7C]
    sub = (x.abs() < 2.0 ** (1 - bias)) & (x != 0) & (got != 0)
    assert sub.sum() > 1000  # subnormal results were exercised


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_fp8_decode_all_codes(fmt):
    bits = torch.arange(256, dtype=torch.uint8)
    mine = fp8.fp8_value(bits, fmt)
    theirs = bits.view(fp8.TORCH_DTYPES[fmt]).float()
    assert torch.equal(torch.isnan(mine), torch.isnan(theirs))
    ok = ~torch.isnan(mine)
    assert torch.equal(mine[ok].view(torch.int32), theirs[ok].view(torch.int32))
    assert torch.equal(fp8.fp8_bits(mine[ok], fmt), bits[ok])  # round trip


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_fp8_codec_scale(fmt):
    gen = torch.Generator().manual_seed(43)
    n = 1001
    x = _heavy(n, gen)
    scale = torch.tensor(0.0371, dtype=torch.float32)
    codes = torch.empty(n, dtype=fp8.TORCH_DTYPES[fmt])
    fp8.torch_encode(x, codes, scale, fmt)
    assert torch.equal(codes.view(torch.uint8), fp8.fp8_bits(x / scale, fmt))
    dec = fp8.torch_decode(codes, scale, fmt)
    ref = codes.float().double() * scale.double()
    assert ((dec.double() - ref).abs() <= 2.0**-24 * ref.abs()).all()
    # relative error bound in the normal range: half an ulp of the format (2^-4 e4m3fn, 2^-3 e5m2), plus
    # the rounding of x/s and of the product
    mant = 3 if fmt == "e4m3fn" else 2
    normal = (x / scale).abs() >= 2.0 ** (1 - (7 if mant == 3 else 15))
    normal &= (x / scale).abs() <= (448 if mant == 3 else 57344)
    rel = ((dec.double() - x.double()).abs() / x.double().abs())[normal]
    assert normal.sum() > n // 2 and rel.max() <= 2.0 ** -(mant + 1) * (1 + 2.0**-20)


# ==========================================================================================================
# torch.compile: the PyTorch paths trace without graph breaks
# ==========================================================================================================
def test_torch_paths_compile_fullgraph():
    """Dynamo traces the encode/decode functions in one graph (fullgraph: no graph break), even when the
    q8_dynamic / q4 tables are first needed inside the compiled region, and the result equals eager."""
    torch._dynamo.reset()
    dynamic._CACHE.clear()

    def roundtrip(x, qm, sm, qd, ad, q4, s4, f8, fs):
        q8.torch_encode(x, qm, sm, 32, "softsign")
        dynamic.torch_encode_q8(x, qd, ad, True)
        dynamic.torch_encode_q4(x.abs(), q4, s4, False)
        fp8.torch_encode(x, f8, fs, "e4m3fn")
        return (q8.torch_decode(qm, sm, 32, "softsign") + dynamic.torch_decode_q8(qd, ad, True)
                + dynamic.torch_decode_q4(q4, s4, x.numel(), False) + fp8.torch_decode(f8, fs, "e4m3fn"))

    gen = torch.Generator().manual_seed(51)
    n = 301
    x = _heavy(n, gen)

    def bufs():
        return (torch.zeros(n, dtype=torch.int8), torch.zeros(10, dtype=torch.float16),
                torch.zeros(n, dtype=torch.uint8), torch.zeros(2), torch.zeros(151, dtype=torch.uint8),
                torch.zeros(3), torch.zeros(n, dtype=torch.float8_e4m3fn), torch.tensor(0.05))

    eager_bufs, comp_bufs = bufs(), bufs()
    got = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x, *comp_bufs)  # first: empty cache
    assert len(dynamic._CACHE) == 2  # q8 signed, q4 linear
    expect = roundtrip(x, *eager_bufs)
    assert torch.equal(got, expect) and not torch.isnan(got).any()
    for a, b in zip(eager_bufs, comp_bufs):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ==========================================================================================================
# Triton (interpreter on the CPU, in a subprocess; in process on a GPU)
# ==========================================================================================================
KERNEL_TEMPLATE = '''
import triton
import triton.language as tl
{imports}



@triton.jit
def encode_kernel(x_ptr, {args}numel, ROWS: tl.constexpr, COLS: tl.constexpr):
    start = tl.program_id(0) * (ROWS * COLS)
    numel_here = numel
    offs = start + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    mask = offs < numel_here
    value = tl.load(x_ptr + offs, mask=mask, other=0.0)
    value = tl.where(mask, value, float("nan"))  # the codec must ignore masked lanes
{encode}


@triton.jit
def decode_kernel(out_ptr, {args}numel, ROWS: tl.constexpr, COLS: tl.constexpr):
    start = tl.program_id(0) * (ROWS * COLS)
    numel_here = numel
    offs = start + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    mask = offs < numel_here
{decode}
    tl.store(out_ptr + offs, value, mask=mask)
'''


def kernel_source(codec) -> str:
    """A test kernel pair built from the codec's Triton renderings (as a backend pastes them)."""
    names = [f"buf{i}" for i in range(len(codec.buffers()))]
    consts = [c[0] for c in getattr(codec, "constants", ())]
    enc = codec.triton_encode("value", names, "offs", "mask")
    dec = codec.triton_decode("value", names, "offs", "mask")
    return KERNEL_TEMPLATE.format(imports="\n".join(codec.imports), args="".join(f"{a}, " for a in names + consts),
                                  encode="\n".join("    " + ln for ln in enc),
                                  decode="\n".join("    " + ln for ln in dec))


def _alloc(codec, numel: int, device: str) -> list[torch.Tensor]:
    """The codec's buffers, filled with garbage so that every byte the encode must write is checked."""
    out = []
    for b in codec.buffers():
        dtype = getattr(torch, b.dtype)
        n = {"param": numel, "groups": (numel + codec.group_size - 1) // codec.group_size,
             "half": (numel + 1) // 2}.get(b.shape)
        t = torch.empty(() if b.shape == "scalar" else (n,), dtype=dtype, device=device)
        if b.shape == "scalar":
            t.fill_(0.03125)  # the fp8 scale (a power of two, so x/s is exact): read, never written
        else:
            t.view(torch.uint8).fill_(0xA5)
        out.append(t)
    return out


def run_triton_cases(cases: list[dict], workdir: Path, device: str) -> list[dict]:
    """For each case: encode x with the Triton renderings into garbage-filled buffers, decode them back."""
    import triton

    results = []
    modules: dict[str, object] = {}
    for k, case in enumerate(cases):
        codec = get_codec(case["name"], case["options"], "state", _fail)
        src = kernel_source(codec)
        if src not in modules:
            path = workdir / f"codec_kernel_{len(modules)}.py"
            path.write_text(src)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            modules[src] = mod
        mod = modules[src]
        x = case["x"].to(device)
        n = x.numel()
        bufs = _alloc(codec, n, device)
        consts = [eval(expr.format(device=repr(device)), {"dynamic": dynamic})  # the documented host expression
                  for _, expr in getattr(codec, "constants", ())]
        rows, cols = case["tile"]
        grid = (triton.cdiv(n, rows * cols),)
        mod.encode_kernel[grid](x, *bufs, *consts, n, ROWS=rows, COLS=cols, enable_fp_fusion=False)
        out = torch.full((n,), 12345.0, device=device)
        mod.decode_kernel[grid](out, *bufs, *consts, n, ROWS=rows, COLS=cols, enable_fp_fusion=False)
        results.append({"bufs": [b.cpu() for b in bufs], "out": out.cpu()})
    return results


def triton_cases() -> list[dict]:
    gen = torch.Generator().manual_seed(61)
    cases = []
    specs = [("q8_linear", {}), ("q8_softsign", {}), ("q8_softsign", {"group": 64}), ("q8_sqrt", {}),
             ("q8_sqrt", {"group": 256}), ("q8_linear", {"group": 128}), ("q8_dynamic", {}),
             ("q8_dynamic", {"signed": False}), ("q4_dynamic", {}), ("q4_linear", {}), ("fp8_e4m3_norm", {}),
             ("fp8_e5m2_norm", {})]
    for name, options in specs:
        positive = name in ("q8_sqrt", "q4_linear") or options.get("signed") is False
        group = _codec(name, **options).group_size
        tiles = [(2, 256), (1, 512)] + ([(4, 128)] if group <= 128 else [])
        for j, numel in enumerate([1, 31, 33, 257, 3001, 2048]):
            x = _heavy(numel, gen, positive=positive)
            if name.startswith("fp8"):
                x = x * 40.0 * torch.exp2(torch.randint(-12, 12, (numel,), generator=gen).float())
            if numel == 3001:  # special values: a NaN group, an inf group, a zero group, a tiny group
                x[40], x[300] = float("nan"), float("inf")
                x[512:768] = 0.0
                x[1024:1280] *= 1e-30
            cases.append({"name": name, "options": options, "x": x, "tile": tiles[j % len(tiles)]})
        cases.append({"name": name, "options": options, "x": _tie_values(name, options), "tile": tiles[0]})
        if name in ("q8_dynamic", "q4_dynamic", "q4_linear"):  # fp32 block scales whose reciprocal is subnormal
            x = _heavy(3 * group, gen, positive=positive)
            x = x / x.abs().max() * torch.tensor(_huge_scales()).repeat_interleave(group)
            cases.append({"name": name, "options": options, "x": x, "tile": tiles[0]})
    return cases


def _huge_scales() -> list[float]:
    """Three fp32 block maxima >= 2^126 (1/s subnormal) for which s·fp32(1/s) > 1, and FLT_MAX."""
    s = (torch.arange(2**12, dtype=torch.int32) * 97 + (253 << 23)).view(torch.float32)  # [2^126, 2^127)
    over = s[s * (torch.ones_like(s) / s) > 1.0]
    return [float(over[0]), float(over[-1]), float(torch.finfo(torch.float32).max)]


def _around(v: torch.Tensor, k: int = 2) -> torch.Tensor:
    """fp32 values v and their k nearest fp32 neighbours on each side."""
    v = v.float()
    out, up, down = [v], v, v
    for _ in range(k):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        out += [up, down]
    return torch.cat(out)


def _tie_values(name: str, options: dict) -> torch.Tensor:
    """Inputs on and next to every rounding boundary of the format, laid out so that each group/block has
    1.0 as its max (so x/s == x exactly, for fp8 s is a power of two): this is where a rounding-rule slip
    between backends would show."""
    k = torch.arange(1, 256, dtype=torch.float64) - 0.5
    codec = _codec(name, **options)
    if name in ("q8_linear", "q8_softsign"):
        y = torch.cat([k[:127] / 127, -k[:127] / 127])
        t = y / (2 - y.abs()) if name == "q8_softsign" else y
    elif name == "q8_sqrt":
        t = (k / 255) ** 2
    elif name == "q8_dynamic":
        t = dynamic.qmap_table(options.get("signed", True))[256:511]
    elif name.startswith("q4"):
        qmap = dynamic.q4_map(codec.signed)
        t = torch.cat([qmap[:-1] + (qmap[1:] - qmap[:-1]) * 0.5, qmap])  # torchao's fp32 tie points
    else:
        v = fp8.fp8_value(torch.arange(256, dtype=torch.uint8), codec.fmt)
        v = v[torch.isfinite(v)].unique()
        t = torch.cat([(v[1:] + v[:-1]) / 2, v]) * 0.03125  # midpoints and values, times the scale below
        return _around(t)
    t = _around(t.clamp(-1, 1))
    if name in ("q8_sqrt", "q4_linear") or options.get("signed") is False:
        t = t.abs()
    g = codec.group_size
    per = g - 1
    blocks = []
    for i in range(0, t.numel(), per):
        blocks.append(torch.cat([torch.ones(1), t[i: i + per]]))
    return torch.cat(blocks)


def torch_reference(case: dict) -> dict:
    codec = _codec(case["name"], **case["options"])
    x = case["x"]
    n = x.numel()
    bufs = _alloc(codec, n, "cpu")
    name = case["name"]
    if name.startswith("q8_") and name != "q8_dynamic":
        q8.torch_encode(x, *bufs, codec.group_size, codec.kind)
        out = q8.torch_decode(*bufs, codec.group_size, codec.kind)
    elif name == "q8_dynamic":
        dynamic.torch_encode_q8(x, *bufs, codec.signed)
        out = dynamic.torch_decode_q8(*bufs, codec.signed)
    elif name.startswith("q4_"):
        dynamic.torch_encode_q4(x, *bufs, codec.signed)
        out = dynamic.torch_decode_q4(*bufs, n, codec.signed)
    else:
        fp8.torch_encode(x, *bufs, codec.fmt)
        out = fp8.torch_decode(*bufs, codec.fmt)
    return {"bufs": bufs, "out": out}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN (payloads may differ)."""
    if a.dtype.is_floating_point and a.element_size() > 1:
        na, nb = torch.isnan(a), torch.isnan(b)
        if not torch.equal(na, nb):
            return False
        bits = {4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a[~na].view(bits), b[~nb].view(bits))
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    cases = triton_cases()
    return cases, case_results(__file__, cases, run_triton_cases, tmp_path_factory.mktemp("codec_kernels"))


def test_triton_matches_torch_bit_for_bit(triton_results):
    cases, results = triton_results
    assert len(results) == len(cases) > 0
    seen = set()
    for case, got in zip(cases, results):
        want = torch_reference(case)
        what = f"{case['name']} {case['options']} numel={case['x'].numel()} tile={case['tile']}"
        for i, (a, b) in enumerate(zip(got["bufs"], want["bufs"])):
            assert a.dtype == b.dtype and a.shape == b.shape, what
            assert _same_bits(a, b), f"{what}: buffer {i} differs at {(a.view(torch.uint8) != b.view(torch.uint8)).nonzero()[:5].flatten().tolist()}"
        assert _same_bits(got["out"], want["out"]), f"{what}: decoded values differ"
        if torch.isfinite(case["x"]).all():  # NaN only ever comes from a NaN/inf input
            assert not torch.isnan(got["out"]).any(), what
        else:
            assert torch.isnan(got["out"]).any(), what  # ... and then it shows
        seen.add(case["name"])
    assert seen == set(QUANT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a dense sweep, too slow for the interpreter")
@pytest.mark.parametrize("name", ["fp8_e4m3_norm", "fp8_e5m2_norm"])
def test_fp8_codec_on_the_gpu_matches_the_pytorch_path_everywhere(name, tmp_path):
    """The Triton fp8 encode and decode on the GPU (the hardware's conversions, see optgen.codecs.fp8) against
    the PyTorch path's integer arithmetic, bit for bit: every combination of sign, exponent and top 15 mantissa
    bits, with low bytes 0x00 (ties), 0x01 (just above one) and 0xFF (just below the next). A NaN input gives a
    NaN code; its sign may differ (the GPU's division returns a positive NaN, the CPU's keeps the input's sign)."""
    top = torch.arange(1 << 24, dtype=torch.int64) << 8
    bits = torch.cat([top, top | 0x01, top | 0xFF])
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    got = run_triton_cases([{"name": name, "options": {}, "x": x, "tile": (2, 256)}], tmp_path, "cuda")[0]
    want = torch_reference({"name": name, "options": {}, "x": x})
    a, b = got["bufs"][0].view(torch.uint8), want["bufs"][0].view(torch.uint8)
    nan = torch.isnan(x)
    assert ((a[nan] & 0x7F) == 0x7F).all() and ((b[nan] & 0x7F) == 0x7F).all()
    differ = (a != b) & ~nan
    assert not differ.any(), (int(differ.sum()), [(hex(int(v)), int(c), int(d)) for v, c, d in
                                                  zip(x.view(torch.int32)[differ][:6], a[differ][:6], b[differ][:6])])
    assert _same_bits(got["out"][~nan], want["out"][~nan])


if __name__ == "__main__" and FLAG in sys.argv:
    worker_main(run_triton_cases)
