"""bf16 rounding (optgen.codecs.rounding), stochastic bf16 (``bf16_sr``) and the ECC master-weight split
(``bf16+ecc8``, ``bf16+ecc16``, ``fp16+ecc8``), against independent references.

What is checked, and against what:
- Round to nearest even: ``torch_round_bf16`` (no noise) against PyTorch's own ``.to(torch.bfloat16)`` on
  ~1.3M fp32 values over the whole range: random bit patterns (subnormals, NaNs with any payload), exact
  ties and their fp32 neighbours with even and odd bf16 parts, ±0, ±inf, the overflow boundary.
- Stochastic rounding (the PyTorch path; its Triton twin is checked bit for bit below): the result is
  always one of the two bf16 neighbours of x (computed here in float64 from frexp, not from bits); the
  probability of taking the upper one equals x's fractional position f between them (binomial bound per
  value, and pooled); the mean over many keys converges to x (5 standard errors); the same key gives the
  same bits and another step/tensor/salt/seed gives other noise; the 16 noise bits are uniform and
  uncorrelated between neighbouring elements, steps, tensors, salts and seeds. The hash is deterministic,
  so every statistical bound here either always passes or always fails: nothing is flaky.
- ECC: encode -> decode error against the fp32 input within ULP(p)/(4N) (ULP(p) from frexp in float64)
  plus half an fp32 ulp of the decoded value (the decode is itself fp32: for bf16+ecc16 a correction step
  is about one fp32 ulp, so that term is as large as the codec's own; measured: up to 2x ULP(p)/(4N),
  i.e. one fp32 ulp), on data spanning every binade incl. values near 0 and subnormal narrow values; the
  narrow part equals PyTorch's RNE cast; the codes equal a float64 reference encode except at near-.5
  ties inside the fp32 rounding window of z·N (each such code is one step off and counted);
  ``ecc.reference_decode`` against ``ecc.torch_decode``.
- Triton (interpreter on the CPU, in a subprocess: tests/triton_worker.py; in process on a GPU):
  ``tl_round_bf16`` / ``store_rne``, the ``bf16_sr`` and ECC renderings pasted into small kernels
  (tiles of several shapes, numel not a multiple of the tile) give the PyTorch path's bits exactly.

Under the interpreter, Triton's own fp32<->bf16 conversion (``interpreter._convert_float``) mangles subnormals
and low-payload NaNs; the codecs move bf16 as bits, so they give torch's bits there too
(test_triton_bf16_subnormals_and_nan_payloads).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see test_codecs_quant.py)
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from triton_worker import FLAG, case_results, worker_main

from optgen.codecs import bf16_sr, ecc, get_codec, rounding
from optgen.codecs.rng import torch_key, torch_random16
from optgen.errors import SpecError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
F64 = torch.float64
ECC_FORMATS = [("bf16+ecc8", "bf16", 127), ("bf16+ecc16", "bf16", 32767), ("fp16+ecc8", "fp16", 127)]
NARROW = {"bf16": (7, -126, torch.bfloat16), "fp16": (10, -14, torch.float16)}  # M, E_min, dtype


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> fp32 with those bit patterns."""
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(_bits(a[~na]), _bits(b[~nb]))


# ==========================================================================================================
# float64 references (frexp, no bit tricks)
# ==========================================================================================================
def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values lo <= x <= hi next to each finite fp32 x (lo == hi when x is a bf16 value), in
    float64: quantum 2^(E-7) with E the exponent of |x| (E >= -126: bf16 shares fp32's subnormal step)."""
    a = x.double().abs()
    _, e = torch.frexp(a)  # a = f·2^e, f in [0.5, 1)
    q = torch.exp2((torch.clamp(e - 1, min=-126) - 7).double())
    down = torch.floor(a / q) * q  # a / q is exact (a power-of-two scaling)
    up = torch.ceil(a / q) * q
    neg = x < 0
    return torch.where(neg, -up, down), torch.where(neg, -down, up)


def narrow_ulp(p: torch.Tensor, fmt: str) -> torch.Tensor:
    """ULP of the narrow value p (float64): 2^(E-M), E its unbiased exponent, E_min for 0 and subnormals."""
    mant, emin, _ = NARROW[fmt]
    p64 = p.double()
    _, e = torch.frexp(p64)
    exp = torch.where(p64 == 0, torch.full_like(e, emin), torch.clamp(e - 1, min=emin))
    return torch.exp2((exp - mant).double())


def ref_rho(x: torch.Tensor, p: torch.Tensor, fmt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ECC code for fp32 x given its narrow value p: round_half_away(clamp((x-p)/2^l, -1, 1)·N)
    with 2^l = ULP(p)/2; also returns z·N (float64)."""
    zn = ((x.double() - p.double()) / (narrow_ulp(p, fmt) / 2)).clamp(-1, 1) * n
    return torch.sign(zn) * torch.floor(zn.abs() + 0.5), zn


def ulp32(v: torch.Tensor) -> torch.Tensor:
    """fp32 ulp of |v| (float64), 2^-149 in the subnormal range."""
    _, e = torch.frexp(v.double().abs())
    return torch.exp2((torch.clamp(e - 1, min=-126) - 23).double())


# ==========================================================================================================
# data
# ==========================================================================================================
def wide_fp32(gen: torch.Generator, n_random: int = 600_000) -> torch.Tensor:
    """~1.3M fp32 values over the whole range: random bit patterns (all exponents: subnormals, ±inf and NaNs
    with random payloads), random normal magnitudes, every kind of tie, and special values."""
    rnd = _from_bits(torch.randint(0, 2**32, (n_random,), generator=gen, dtype=torch.int64))
    mags = (torch.randn(200_000, generator=gen, dtype=F64)
            * torch.exp2(torch.randint(-140, 128, (200_000,), generator=gen).double())).float()
    hi = torch.randint(0, 2**16, (100_000,), generator=gen, dtype=torch.int64)  # bf16 patterns, even and odd
    ties = torch.cat([(hi << 16) | low for low in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF)])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1.0, -1.0,
                            3.3895313892515355e38, 3.4028234663852886e38, 1.1754943508222875e-38, 1e-45,
                            -1e-45, 2.0**-133, 2.0**-134, 3 * 2.0**-134])
    boundary = _from_bits(torch.tensor([0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0xFF7F8000, 0x007F8000, 0x007FFFFF,
                                        0x00008000, 0x00018000, 0x80008000, 0x7F800001, 0x7F808000, 0xFFFF0001]))
    return torch.cat([rnd, mags, _from_bits(ties), special, boundary])


def _interpreter_safe(x: torch.Tensor) -> torch.Tensor:
    """Where the Triton interpreter's fp32<->bf16 conversion is exact: not a subnormal fp32, and NaNs only
    with a payload bit in the upper 16 bits (see the module docstring: the rest is the documented bug)."""
    b = _bits(x).to(torch.int64) & 0x7FFFFFFF
    subnormal = (b < 0x00800000) & (b != 0)
    low_payload_nan = (b > 0x7F800000) & ((b & 0x007F0000) == 0)
    return ~subnormal & ~low_payload_nan


# ==========================================================================================================
# 1. round to nearest even: torch_round_bf16 == PyTorch's cast
# ==========================================================================================================
def test_round_bf16_nearest_equals_torch_cast():
    gen = torch.Generator().manual_seed(101)
    x = wide_fp32(gen)
    assert x.numel() > 1_000_000
    got = rounding.torch_round_bf16(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(got), nan), "NaN must stay NaN (and nothing else becomes NaN)"
    assert ((_bits(got[~nan]).to(torch.int64) & 0xFFFF) == 0).all(), "low 16 bits not cleared"
    ours = got.to(torch.bfloat16)  # exact: the low 16 bits are zero
    theirs = x.to(torch.bfloat16)
    bad = _bits(ours) != _bits(theirs)
    bad &= ~nan
    assert not bad.any(), f"{int(bad.sum())} values round differently from torch, e.g. {x[bad][:4].tolist()}"
    # the kinds of input really were there
    b = _bits(x).to(torch.int64) & 0xFFFFFFFF
    assert int(nan.sum()) > 1000 and int(((b & 0x7F800000) == 0).sum()) > 1000  # NaNs, zeros/subnormals
    assert int(((b & 0xFFFF) == 0x8000).sum()) > 100_000  # exact ties
    assert torch.isinf(got[x == 3.4028234663852886e38]).all()  # rounds above bf16's max: inf, as torch


# ==========================================================================================================
# 2. stochastic rounding (PyTorch path)
# ==========================================================================================================
SR_COPIES = 4096
SR_KEYS = [(12345, 1, 0, 7), (12345, 2, 0, 7), (12345, 3, 3, 11), (999, 1, 0, 7), (999, 40, 1, 7),
           (2**31 - 1, 10**6, 5, 2**31 - 1), (0, 0, 0, 0), (77, 123456789, 2**20, 99)]  # seed, step, tensor, salt


def _sr_values(gen: torch.Generator) -> torch.Tensor:
    """64 fp32 values with known fractional positions low16/2^16 (exact, f in {0, 1/2^16 .. 1/2, 3/4, ...})
    in many binades and both signs, a few of them subnormal and a few exact bf16 values."""
    fracs = [0, 0, 0x0001, 0x0100, 0x1000, 0x2AAB, 0x4000, 0x5555, 0x8000, 0x8000, 0xAAAA, 0xC000, 0xE000,
             0xFF00, 0xFFFF, 0x3C1F]
    out = []
    for k, low in enumerate(fracs * 4):
        sign = (k % 2) << 31
        exp = [1, 20, 60, 100, 120, 127, 130, 140, 200, 250][torch.randint(0, 10, (), generator=gen).item()]
        if k in (5, 21):
            exp = 0  # fp32 subnormal (bf16 subnormal neighbours)
        mant = torch.randint(0, 128, (), generator=gen).item()
        out.append(sign | (exp << 23) | (mant << 16) | low)
    return _from_bits(torch.tensor(out, dtype=torch.int64))


def _sr_draws(values: torch.Tensor) -> torch.Tensor:
    """Each value repeated SR_COPIES times (interleaved, so copies sit at unrelated element indices),
    stochastically rounded under every key: [keys, copies, values] as float64."""
    x = values.repeat(SR_COPIES)
    out = []
    for seed, step, tensor, salt in SR_KEYS:
        noise = torch_random16(torch_key(torch.tensor([seed, step]), tensor, salt), x.numel(), "cpu")
        assert noise.dtype == torch.int64 and int(noise.min()) >= 0 and int(noise.max()) < 2**16
        out.append(rounding.torch_round_bf16(x, noise).double())
    return torch.stack(out).view(len(SR_KEYS), SR_COPIES, values.numel())


def test_sr_result_is_a_neighbour_and_unbiased():
    gen = torch.Generator().manual_seed(102)
    values = _sr_values(gen)
    lo, hi = bf16_neighbours(values)
    draws = _sr_draws(values)
    x64 = values.double()
    # always one of the two neighbours; an exact bf16 value never moves; the stored value is a bf16
    assert ((draws == lo) | (draws == hi)).all(), "stochastic rounding produced a value that is not a neighbour"
    exact = lo == hi
    assert int(exact.sum()) >= 8 and (draws[:, :, exact] == x64[exact]).all()
    assert torch.equal(draws.float().bfloat16().double(), draws)
    # the fractional position, independently of the bits: must be low16 / 2^16
    f = torch.where(exact, 0.0, (x64 - lo) / (hi - lo))
    low16 = (_bits(values).to(torch.int64) & 0xFFFF).double() / 2**16
    assert torch.equal(torch.where(values < 0, torch.where(exact, 0.0, 1 - low16), low16), f)
    n = draws.shape[0] * draws.shape[1]
    up = ((draws == hi) & ~exact).double().sum(dim=(0, 1)) / n  # for an exact value lo == hi: never "up"
    # binomial: P(up) = f, within 5 standard deviations (exact where f is 0 or 1)
    sd = torch.sqrt(f * (1 - f) / n)
    dev = (up - f).abs()
    worst = (dev / sd.clamp(min=1e-300)).max().item()
    assert (dev <= 5 * sd).all(), f"P(round up) off by up to {worst:.2f} standard deviations"
    # the mean converges to x: 5 standard errors from the empirical p (floored at 1/n, so that a value
    # with f = 2^-16, which may never round up in n draws, is not held to a zero-width bound)
    mean = draws.mean(dim=(0, 1))
    p_emp = up
    se = (hi - lo) * torch.sqrt(torch.clamp(p_emp * (1 - p_emp), min=1.0 / n) / n)
    err = (mean - x64).abs()
    assert (err[exact] == 0).all()
    ratio = (err[~exact] / se[~exact]).max().item()
    assert (err <= 5 * se).all(), f"mean off by up to {ratio:.2f} standard errors"
    # pooled over all values: the total number of round-ups against sum(f), in standard deviations
    pooled = ((up - f) * n).sum() / torch.sqrt((f * (1 - f) * n).sum())
    assert abs(pooled.item()) <= 5, f"pooled bias {pooled.item():.2f} standard deviations"
    print(f"\nSR: {n} draws per value, {values.numel()} values; worst |P(up) - f| {worst:.2f} sd, worst |mean - x| "
          f"{ratio:.2f} se, pooled {pooled.item():+.2f} sd")


def test_sr_reproducible_and_keyed():
    gen = torch.Generator().manual_seed(103)
    n = 1 << 18
    x = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 20, (n,), generator=gen).float()))
    rng = torch.tensor([4242, 17], dtype=torch.int64)
    salt = bf16_sr.salt_of("state_m")

    def enc(r, tensor=0, s=salt):
        out = torch.empty(n, dtype=torch.bfloat16)
        # the codec reads the tensor's id from rng = [seed, step, id]
        bf16_sr.torch_encode(x, out, None if r is None else torch.cat([r, torch.tensor([tensor])]), 0, s)
        return out

    a, b = enc(rng), enc(rng.clone())
    assert torch.equal(_bits(a), _bits(b)), "same (seed, step, tensor, salt) gave different bits"
    # rng=None: round to nearest (the initial state), i.e. torch's cast
    assert torch.equal(_bits(enc(None)), _bits(x.to(torch.bfloat16)))
    # another step / tensor index / salt / seed: other noise for (nearly) every element, and rounded
    # results that differ at the rate 2f(1-f) of two independent draws (5 standard deviations)
    lo, hi = bf16_neighbours(x)
    f = torch.where(lo == hi, 0.0, (x.double() - lo) / (hi - lo))
    rate = (2 * f * (1 - f)).sum().item()
    sd = math.sqrt((2 * f * (1 - f) * (1 - 2 * f * (1 - f))).sum().item())
    key0 = torch_key(rng, 0, salt)
    noise0 = torch_random16(key0, n, "cpu")
    others = {"step": (torch.tensor([4242, 18]), 0, salt), "tensor": (rng, 1, salt),
              "salt": (rng, 0, bf16_sr.salt_of("state_v")), "seed": (torch.tensor([4243, 17]), 0, salt)}
    for what, (r, t, s) in others.items():
        noise = torch_random16(torch_key(r, t, s), n, "cpu")
        same = (noise == noise0).float().mean().item()
        assert same <= 4 * 2.0**-16, f"another {what}: {same:.2e} of the noise values repeat"
        differ = (_bits(enc(r, t, s)) != _bits(a)).double().sum().item()
        assert abs(differ - rate) <= 5 * sd, f"another {what}: {differ} results differ, expected {rate:.0f} ± {sd:.0f}"
    # the salts of the three buffers of a spec are distinct
    assert len({bf16_sr.salt_of(k) for k in ("param", "state_m", "state_v")}) == 3


def test_noise_uniform_and_uncorrelated():
    n = 1 << 20
    rng = torch.tensor([31337, 5], dtype=torch.int64)
    base = torch_random16(torch_key(rng, 2, 77), n, "cpu")
    # uniform 16 bits: chi-square of the high and the low byte (255 degrees of freedom: mean 255, sd 22.6),
    # every bit set about half the time
    for what, byte in (("high", base >> 8), ("low", base & 255)):
        counts = torch.bincount(byte, minlength=256).double()
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
        assert chi2 < 255 + 6 * math.sqrt(2 * 255), f"{what} byte: chi-square {chi2:.1f}"
    for bit in range(16):
        ones = ((base >> bit) & 1).double().mean().item()
        assert abs(ones - 0.5) <= 5 * 0.5 / math.sqrt(n), f"bit {bit} set in {ones:.4f} of the draws"
    centred = base.double() - 32767.5

    def corr(a, b):
        a, b = a.double() - 32767.5, b.double() - 32767.5
        return ((a * b).mean() / torch.sqrt((a * a).mean() * (b * b).mean())).item()

    bound = 5 / math.sqrt(n)
    assert abs(corr(base[1:], base[:-1])) <= bound, "neighbouring elements are correlated"
    assert abs(corr(base[2:], base[:-2])) <= bound
    assert abs(centred.mean().item()) <= 5 * 65536 / math.sqrt(12 * n)
    for what, (r, t, s) in {"step": (torch.tensor([31337, 6]), 2, 77), "tensor": (rng, 3, 77),
                            "salt": (rng, 2, 78), "seed": (torch.tensor([31338, 5]), 2, 77)}.items():
        other = torch_random16(torch_key(r, t, s), n, "cpu")
        c = corr(other, base)
        assert abs(c) <= bound, f"the noise of the next {what} is correlated ({c:.2e})"


# ==========================================================================================================
# 3. ECC (PyTorch path)
# ==========================================================================================================
def ecc_data(fmt: str, gen: torch.Generator, n: int = 400_000) -> torch.Tensor:
    """Fresh fp32 values over the narrow format's whole finite range: every binade (incl. fp32 subnormals
    for bf16, fp16 subnormals and values below fp16's smallest subnormal), both signs, plus values near 0."""
    if fmt == "bf16":
        e = torch.randint(-150, 127, (n,), generator=gen)
    else:
        e = torch.randint(-32, 16, (n,), generator=gen)
    mag = (1 + torch.rand(n, generator=gen, dtype=F64)) * torch.exp2(e.double())
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -mag, mag)
    near0 = torch.randn(20_000, generator=gen, dtype=F64) * 1e-3
    x = torch.cat([x, near0]).float()
    top = 3.3895313892515355e38 if fmt == "bf16" else 65504.0  # the largest finite narrow value
    x = x[(x.abs() <= top) & (x != 0)]
    return x


def _encode(x: torch.Tensor, fmt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.full((x.numel(),), 7.0, dtype=NARROW[fmt][2])  # garbage: every element must be written
    e = torch.full((x.numel(),), 99 if n == 127 else 12345, dtype=torch.int8 if n == 127 else torch.int16)
    ecc.torch_encode(x, p, e, fmt, n)
    return p, e


@pytest.mark.parametrize("name,fmt,n", ECC_FORMATS, ids=[f[0] for f in ECC_FORMATS])
def test_ecc_roundtrip_error_bound(name, fmt, n):
    gen = torch.Generator().manual_seed(104 + n)
    x = ecc_data(fmt, gen)
    p, e = _encode(x, fmt, n)
    # the narrow part is PyTorch's round-to-nearest-even cast
    assert torch.equal(_bits(p), _bits(x.to(NARROW[fmt][2]))), "narrow part is not torch's RNE cast"
    assert int(e.abs().max()) <= n
    dec = ecc.torch_decode(p, e, fmt, n)
    assert dec.dtype == torch.float32 and dec.shape == x.shape and torch.isfinite(dec).all()
    x64, d64 = x.double(), dec.double()
    codec_bound = narrow_ulp(p, fmt) / (4 * n)
    err = (d64 - x64).abs()
    # + the fp32 rounding of the decode itself (half an ulp of the result; the fp32 quotient rho/N adds
    # at most 2^-24 of the correction, inside the factor)
    bound = codec_bound * (1 + 2.0**-22) + ulp32(d64) / 2
    ratio_codec = (err / codec_bound).max().item()
    mant, emin, _ = NARROW[fmt]
    normal = p.double().abs() >= 2.0**emin  # narrow value in the normal range: relative error meaningful
    rel = (err / x64.abs())[normal].max().item()
    rel_bound = 2.0 ** -(mant + 1) / (2 * n) + 2.0**-24
    msg = (f"{name}: max |x̂-x| / (ULP(p)/4N) = {ratio_codec:.5f}, max relative error (normal p) {rel:.4e} "
           f"(bound {rel_bound:.4e})")
    print("\n" + msg)
    assert (err <= bound).all(), f"{msg}; {int((err > bound).sum())} elements exceed ULP(p)/4N + ulp32/2"
    assert rel <= rel_bound, msg
    # the subnormal range of the narrow format was exercised (values near 0 included)
    assert int((~normal & (x != 0)).sum()) > 1000 and int((p == 0).sum()) > 100
    # the correction is needed: without it the error is ~ULP(p)/4 on average
    assert (d64 != p.double()).float().mean() > 0.9


@pytest.mark.parametrize("name,fmt,n", ECC_FORMATS, ids=[f[0] for f in ECC_FORMATS])
def test_ecc_codes_equal_float64_reference(name, fmt, n):
    gen = torch.Generator().manual_seed(105 + n)
    x = ecc_data(fmt, gen)
    p, e = _encode(x, fmt, n)
    rho, zn = ref_rho(x, p, fmt, n)
    diff = e.long() - rho.long()
    bad = diff != 0
    # fp32 computes z·N (and |z·N| + 0.5) with a rounding each; |z·N| <= N, so both stay within one
    # fp32 ulp of N + 1 of the exact values: only codes whose exact |z·N| lies that close to a .5 may differ
    window = ulp32(torch.tensor(float(n + 1))).item()
    near = ((zn.abs() - zn.abs().floor()) - 0.5).abs() <= window
    assert diff.abs().max() <= 1, f"{name}: a code differs from float64 by more than one step"
    assert not (bad & ~near).any(), f"{name}: codes differ away from a .5 tie: x = {x[bad & ~near][:4].tolist()}"
    limit = max(2, int(2 * window * x.numel()))  # the window's share of uniformly spread fractions
    assert int(bad.sum()) <= limit, f"{name}: {int(bad.sum())} codes differ from float64 (limit {limit})"
    print(f"\n{name}: {int(bad.sum())} of {x.numel()} codes differ from the float64 encode at near-.5 ties "
          f"(window {window:.1e})")


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_narrow_ecc8_is_the_format_of_the_parameter(fmt):
    """``narrow+ecc8`` (fmt "param") encodes and decodes a bf16 parameter as bf16+ecc8 and an fp16 one as fp16+ecc8,
    bit for bit."""
    gen = torch.Generator().manual_seed(107)
    x = ecc_data(fmt, gen)
    p, e = _encode(x, fmt, 127)
    q, r = torch.empty_like(p), torch.empty_like(e)
    ecc.torch_encode(x, q, r, "param", 127)
    assert torch.equal(_bits(p), _bits(q)) and torch.equal(e, r)
    assert _same_bits(ecc.torch_decode(q, r, "param", 127), ecc.torch_decode(p, e, fmt, 127))


@pytest.mark.parametrize("name,fmt,n", ECC_FORMATS, ids=[f[0] for f in ECC_FORMATS])
def test_ecc_reference_decode_matches_torch_decode(name, fmt, n):
    gen = torch.Generator().manual_seed(106 + n)
    x = ecc_data(fmt, gen)
    p, e = _encode(x, fmt, n)
    # reference_decode mis-decodes p == 0 with rho != 0 (see test_reference_decode_at_zero): compared elsewhere
    keep = p.double() != 0
    ours = ecc.torch_decode(p, e, fmt, n).double()[keep]
    ref = ecc.reference_decode(p, e, fmt, n)[keep]
    assert ref.dtype == F64
    corr = (ref - p.double()[keep]).abs()
    # fp32 rounding: of rho/N (2^-24 of the correction), of the correction where it is an fp32 subnormal
    # (p near 2^-125: at most 2^-150), then of the sum (half an ulp of the result)
    bound = 2.0**-24 * corr + 2.0**-150 + ulp32(ref) / 2
    err = (ours - ref).abs()
    worst = (err / bound).max().item()
    assert (err <= bound).all(), f"{name}: torch_decode off reference_decode by {worst:.3f}x fp32 rounding"


def test_reference_decode_at_zero():
    """p == 0 with a nonzero correction (|x| below half the smallest subnormal): the reference decodes it with
    the smallest exponent, rho/N·2^l_min (frexp's exponent of 0 must not be taken as E = -1)."""
    x = torch.tensor([2.0**-140, -3 * 2.0**-141, 2.0**-136])
    p, e = _encode(x, "bf16", 127)
    assert (p.double() == 0).all() and (e != 0).all()
    ours = ecc.torch_decode(p, e, "bf16", 127).double()
    assert ((ours - x.double()).abs() <= 2.0**-133 / 508 + 2.0**-150).all()  # torch_decode is right
    ref = ecc.reference_decode(p, e, "bf16", 127)
    assert torch.allclose(ref, ours, rtol=2.0**-20, atol=2.0**-149), (ref.tolist(), ours.tolist())


@pytest.mark.parametrize("name,fmt,n", ECC_FORMATS, ids=[f[0] for f in ECC_FORMATS])
def test_ecc_nonfinite_and_zero(name, fmt, n):
    big = 3.4e38 if fmt == "bf16" else 65520.0  # rounds to inf in the narrow format
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big, 0.0, -0.0, 1.5])
    p, e = _encode(x, fmt, n)
    dec = ecc.torch_decode(p, e, fmt, n)
    assert torch.isnan(p[0].float()) and torch.isnan(dec[0]), "NaN must stay NaN"
    assert torch.equal(dec[1:5], torch.tensor([float("inf"), -float("inf"), float("inf"), -float("inf")]))
    assert (e[:5] == 0).all() and (e[5:] == 0).all()  # a value lost to overflow keeps rho = 0
    assert dec[5] == 0 and dec[6] == 0 and dec[7] == 1.5


# ==========================================================================================================
# 4. Triton: the kernels and renderings against the PyTorch path, bit for bit
# ==========================================================================================================
RNE_KERNEL = '''
import triton
import triton.language as tl
from optgen.codecs.rounding import tl_round_bf16
from optgen.runtime import triton_math as optgen_tl


@triton.jit
def rne_kernel(x_ptr, out_ptr, out2_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl_round_bf16(x, 0, False), mask=mask)
    optgen_tl.store_rne(out2_ptr + offs, x, mask)
'''

CODEC_KERNEL = '''
import triton
import triton.language as tl
from optgen.codecs.rng import tl_make_key, tl_random16, tl_rng_args
{imports}



@triton.jit
def encode_kernel(x_ptr, {args}rng, tensor_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
    offs = tl.program_id(0) * (ROWS * COLS) + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    mask = offs < numel
    tensor = tl.load(tensor_ptr)
    rng_seed, rng_step, rng_stream = tl_rng_args(rng, 0, 0, tensor, True)  # rng = [seed, step, id_0, ...]
    value = tl.load(x_ptr + offs, mask=mask, other=0.0)
    value = tl.where(mask, value, float("nan"))  # the codec must ignore masked lanes
{encode}


@triton.jit
def decode_kernel(out_ptr, {args}numel, ROWS: tl.constexpr, COLS: tl.constexpr):
    offs = tl.program_id(0) * (ROWS * COLS) + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    mask = offs < numel
{decode}
    tl.store(out_ptr + offs, value, mask=mask)


@triton.jit
def noise_kernel(out_ptr, rng, tensor_ptr, numel, SALT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tensor = tl.load(tensor_ptr)
    key = tl_make_key(tl.load(rng), tl.load(rng + 1), tensor, SALT)
    tl.store(out_ptr + offs, tl_random16(key, offs).to(tl.int32), mask=offs < numel)
'''


def _fail(msg: str) -> SpecError:
    return SpecError(msg, field="param.storage")


def codec_kernel_source(name: str, buf: str) -> str:
    """Kernels built from the codec's Triton renderings, pasted as a backend pastes them (buffer names as in
    the generated kernels, so bf16_sr's salt is that of ``buf``)."""
    codec = get_codec(name, {}, "param", _fail)
    names = [buf] + [f"{buf}_{b.suffix}" for b in codec.buffers()[1:]]
    enc = codec.triton_encode("value", names, "offs", "mask")
    dec = codec.triton_decode("value", names, "offs", "mask")
    return CODEC_KERNEL.format(imports="\n".join(codec.imports), args="".join(f"{a}, " for a in names),
                               encode="\n".join("    " + ln for ln in enc), decode="\n".join("    " + ln for ln in dec))


def _load(src: str, workdir: Path, stem: str):
    path = workdir / f"{stem}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def triton_cases() -> dict:
    gen = torch.Generator().manual_seed(107)
    x_rne = wide_fp32(gen)
    sr = []
    keys = [((12345, 1), 0), ((12345, 2), 3), ((2**31 - 1, 10**9), 1000), ((0, 0), 1), ((77, 2**33 + 5), 2)]
    for j, numel in enumerate([1, 31, 4096, 5000, 12345, 70_001]):
        x = torch.randn(numel, generator=gen) * torch.exp2(torch.randint(-30, 30, (numel,), generator=gen).float())
        (seed, step), tensor = keys[j % len(keys)]
        buf = ["param", "state_m", "state_v"][j % 3]
        # rng = [seed, step, id of tensor 0 of the call]: the codec reads the id from rng[2 + index]
        sr.append({"x": x, "rng": torch.tensor([seed, step, tensor], dtype=torch.int64), "tensor": tensor, "buf": buf,
                   "tile": [(16, 256), (2, 64), (4, 128)][j % 3]})
    eccs = []
    for name, fmt, n in ECC_FORMATS:
        x = ecc_data(fmt, gen, 60_000)
        x = torch.cat([x, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                                        3.4e38 if fmt == "bf16" else 65520.0])])
        eccs.append({"name": name, "fmt": fmt, "n": n, "x": x, "tile": (16, 256)})
        eccs.append({"name": name, "fmt": fmt, "n": n, "x": x[-3001:], "tile": (2, 64)})  # the specials too
    return {"rne": x_rne, "sr": sr, "ecc": eccs}


def run_triton_cases(cases: dict, workdir: Path, device: str) -> dict:
    import triton

    rne = _load(RNE_KERNEL, workdir, "rne_kernel")
    x = cases["rne"].to(device)
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=device)
    out2 = torch.empty_like(out)
    rne.rne_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, out2, x.numel(), BLOCK=4096, enable_fp_fusion=False)
    results = {"rne": out.cpu(), "rne_store": out2.cpu(), "sr": [], "noise": [], "ecc": []}
    mods: dict[str, object] = {}

    def module(name: str, buf: str):
        src = codec_kernel_source(name, buf)
        if src not in mods:
            mods[src] = _load(src, workdir, f"codec_kernel_{len(mods)}")
        return mods[src]

    for case in cases["sr"]:
        mod = module("bf16_sr", case["buf"])
        x = case["x"].to(device)
        n = x.numel()
        rows, cols = case["tile"]
        out = torch.full((n,), 7.0, dtype=torch.bfloat16, device=device)
        rng = case["rng"].to(device)
        tensor = torch.tensor([case["tensor"]], dtype=torch.int64, device=device)
        index = torch.zeros(1, dtype=torch.int64, device=device)  # tensor 0 of the call
        mod.encode_kernel[(triton.cdiv(n, rows * cols),)](x, out, rng, index, n, ROWS=rows, COLS=cols, enable_fp_fusion=False)
        dec = torch.full((n,), 12345.0, device=device)
        mod.decode_kernel[(triton.cdiv(n, rows * cols),)](dec, out, n, ROWS=rows, COLS=cols, enable_fp_fusion=False)
        noise = torch.empty(n, dtype=torch.int32, device=device)
        mod.noise_kernel[(triton.cdiv(n, 1024),)](noise, rng, tensor, n, SALT=bf16_sr.salt_of(case["buf"]), BLOCK=1024, enable_fp_fusion=False)
        results["sr"].append({"out": out.cpu(), "dec": dec.cpu()})
        results["noise"].append(noise.cpu())
    for case in cases["ecc"]:
        mod = module(case["name"], "param")
        x = case["x"].to(device)
        n = x.numel()
        rows, cols = case["tile"]
        p = torch.full((n,), 7.0, dtype=NARROW[case["fmt"]][2], device=device)
        e = torch.full((n,), 99, dtype=torch.int8 if case["n"] == 127 else torch.int16, device=device)
        dummy = torch.zeros(2, dtype=torch.int64, device=device)
        grid = (triton.cdiv(n, rows * cols),)
        mod.encode_kernel[grid](x, p, e, dummy, dummy, n, ROWS=rows, COLS=cols, enable_fp_fusion=False)
        dec = torch.full((n,), 12345.0, device=device)
        mod.decode_kernel[grid](dec, p, e, n, ROWS=rows, COLS=cols, enable_fp_fusion=False)
        results["ecc"].append({"p": p.cpu(), "e": e.cpu(), "dec": dec.cpu()})
    return results


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    cases = triton_cases()
    return cases, case_results(__file__, cases, run_triton_cases, tmp_path_factory.mktemp("bf16_kernels"))


def test_triton_round_bf16_nearest(triton_results):
    cases, res = triton_results
    x = cases["rne"]
    want = x.to(torch.bfloat16)
    # under the interpreter: fp32 subnormals and low-payload NaNs are the documented interpreter bug
    # (test_triton_bf16_subnormals_and_nan_payloads); on a GPU every value is compared
    keep = _interpreter_safe(x) if INTERPRETED else torch.ones_like(x, dtype=torch.bool)
    assert int(keep.sum()) > 1_000_000
    for what in ("rne", "rne_store"):
        got = res[what]
        assert got.dtype == torch.bfloat16
        assert _same_bits(got[keep], want[keep]), f"{what}: {int((_bits(got) != _bits(want))[keep].sum())} differ"


def test_triton_sr_bit_identical(triton_results):
    cases, res = triton_results
    for case, got, noise in zip(cases["sr"], res["sr"], res["noise"]):
        what = f"bf16_sr numel={case['x'].numel()} tile={case['tile']} buf={case['buf']} key={case['rng'].tolist()}"
        salt = bf16_sr.salt_of(case["buf"])
        # the torch rendering names the buffer "state_m[i]": the same salt as the Triton rendering's
        codec = get_codec("bf16_sr", {}, "param", _fail)
        assert f", {salt})" in codec.torch_encode("v", [f"{case['buf']}[i]"])[0]
        assert f", {salt})" in codec.triton_encode("v", [case["buf"]], "offs", "mask")[0]
        want_noise = torch_random16(torch_key(case["rng"], case["tensor"], salt), case["x"].numel(), "cpu")
        assert torch.equal(noise.long(), want_noise), f"{what}: noise differs"
        out = torch.full((case["x"].numel(),), 7.0, dtype=torch.bfloat16)
        bf16_sr.torch_encode(case["x"], out, case["rng"], 0, salt)
        assert torch.equal(_bits(got["out"]), _bits(out)), f"{what}: {int((_bits(got['out']) != _bits(out)).sum())} differ"
        assert torch.equal(got["dec"], out.float()), f"{what}: decode"
        if case["x"].numel() > 1000:  # it really was stochastic: not all equal to nearest
            assert (_bits(out) != _bits(case["x"].to(torch.bfloat16))).float().mean() > 0.2


def test_triton_ecc_bit_identical(triton_results):
    cases, res = triton_results
    seen = set()
    for case, got in zip(cases["ecc"], res["ecc"]):
        x = case["x"]
        keep = _interpreter_safe(x) if INTERPRETED and case["fmt"] == "bf16" else torch.ones_like(x, dtype=torch.bool)
        p, e = _encode(x, case["fmt"], case["n"])
        dec = ecc.torch_decode(p, e, case["fmt"], case["n"])
        what = f"{case['name']} tile={case['tile']}"
        assert got["p"].dtype == p.dtype and got["e"].dtype == e.dtype
        assert _same_bits(got["p"][keep], p[keep]), f"{what}: narrow part differs"
        assert torch.equal(got["e"][keep], e[keep]), f"{what}: {int((got['e'] != e)[keep].sum())} corrections differ"
        # on a GPU, a subnormal correction term (|p| < 2^-118) may differ by 2^-149 units (test_codecs_bf16_exact)
        gpu_bf16 = DEVICE == "cuda" and p.dtype == torch.bfloat16
        tiny = (p.float().abs() < 2.0**-118) & (e != 0) if gpu_bf16 else torch.zeros_like(keep)
        assert _same_bits(got["dec"][keep & ~tiny], dec[keep & ~tiny]), f"{what}: decoded values differ"
        assert ((got["dec"][tiny].double() - dec[tiny].double()).abs() <= 4 * 2.0**-149).all()
        assert torch.isnan(got["dec"][torch.isnan(x)]).all()
        seen.add(case["name"])
    assert seen == {f[0] for f in ECC_FORMATS}


def test_triton_bf16_subnormals_and_nan_payloads(triton_results):
    """The inputs left out above: fp32 subnormals and NaNs with a low-16-bit payload, which the interpreter's
    own conversion mangles. ``tl_round_bf16`` and the bf16 loads move bf16 as bits, so they match torch."""
    cases, res = triton_results
    x = cases["rne"]
    rest = ~_interpreter_safe(x)
    assert int(rest.sum()) > 1000
    got, want = res["rne"][rest], x[rest].to(torch.bfloat16)
    ok = _same_bits(got, want)
    bad_ecc = 0
    for case, r in zip(cases["ecc"], res["ecc"]):
        if case["fmt"] != "bf16":
            continue
        sub = ~_interpreter_safe(case["x"])
        p, e = _encode(case["x"], case["fmt"], case["n"])
        bad_ecc += int((_bits(r["p"]) != _bits(p))[sub].sum()) + int((r["e"] != e)[sub].sum())
    n_bad = int((~((_bits(got) == _bits(want)) | (torch.isnan(got.float()) & torch.isnan(want.float())))).sum())
    assert ok and bad_ecc == 0, f"{n_bad} of {int(rest.sum())} values differ from torch, {bad_ecc} ECC codes differ"


if __name__ == "__main__" and FLAG in sys.argv:
    worker_main(run_triton_cases)
