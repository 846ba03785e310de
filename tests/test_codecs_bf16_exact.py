"""The bf16-family codecs bit for bit: optgen.codecs.rng, .rounding, .bf16_sr, .ecc, .kahan.

Complements tests/test_codecs_bf16.py (which checks against torch's casts and test-local references). Here:
- rng: the torch hash (int64 emulation, products split into 16-bit halves) equals plain Python integer
  arithmetic on every sampled (seed, step, tensor, salt, index), incl. indices and steps near 2^32.
- rounding: torch_round_bf16 (nearest and stochastic, given the noise) equals bf16_sr.reference_round, a
  float64 rounding from frexp, on every non-NaN input of ~600k fp32 values (random bit patterns: subnormals,
  ±inf, NaNs; exact ties; the overflow boundary); every NaN becomes the canonical bf16 NaN 0x7FFF.
- bf16_sr through the codec path (rng, tensor index, salt): unbiased and P(up) = fractional part, within
  Bernstein bounds computed for each value (failure probability 1e-9 each, for an ideal random source; the
  hash is deterministic, so the outcome is fixed: nothing is flaky); reproducible from the key.
- ECC: stored narrow value equals the float64 RNE; codes equal ecc.reference_encode except at near-.5 ties
  (counted, each one step off); the codec's own error |reference_decode - x| <= ULP(p)/(4N) (float64 decode,
  so nothing else enters) and the fp32 decode within ULP(p)/(4N) + half an fp32 ulp.
- Kahan: p, c equal kahan.reference_encode; |decode - y| <= max(2^(E_p - 17), 2^-134); decode exact.
- Triton (on CPU under TRITON_INTERPRET=1, in this process: tests/conftest.py and the lines below set it
  before anything imports triton; on a GPU natively): small kernels over 2-D tiles (ROWS x COLS, numel not a
  multiple of the tile, masked lanes fed NaN) call the device functions; every stored buffer equals the
  PyTorch path bit for bit, subnormals and NaN payloads included (fp16 NaN payloads: NaN only). The
  interpreter's fp16 casts are checked against torch on every fp16 pattern and on ties and subnormals.
- The PyTorch functions trace under torch.compile(fullgraph=True) (dynamo, backend "eager").
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest

from optgen.codecs import bf16_sr, ecc, get_codec, kahan, rng, rounding
from optgen.errors import SpecError

try:
    import triton
    import triton.language as tl

    from optgen.codecs import bf16_sr as tl_bf16_sr  # module names the kernels below use
    from optgen.codecs import ecc as tl_ecc
    from optgen.codecs import kahan as tl_kahan
    from optgen.codecs import rng as tl_rng
    from optgen.codecs import rounding as tl_rounding
except ImportError:  # pragma: no cover
    triton = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = triton is not None and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs Triton on CUDA or TRITON_INTERPRET=1")
F64 = torch.float64
ECC = [("bf16+ecc8", "bf16", 127), ("bf16+ecc16", "bf16", 32767), ("fp16+ecc8", "fp16", 127)]
NARROW = {"bf16": (7, -126, torch.bfloat16), "fp16": (10, -14, torch.float16)}
L_1E9 = math.log(2 / 1e-9)  # Bernstein: P(|S - ES| >= t) <= 2 exp(-t^2 / (2 V + 2t/3)) = 1e-9


def bernstein(var: torch.Tensor) -> torch.Tensor:
    """t with 2 exp(-t^2 / (2 var + 2t/3)) = 1e-9, for a sum of independent [0, 1] variables of variance var."""
    return L_1E9 / 3 + torch.sqrt((L_1E9 / 3) ** 2 + 2 * var * L_1E9)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[x.element_size()])


def from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> fp32 with those bits."""
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers (float64 view), NaN only where the other is NaN."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def wide_fp32(gen: torch.Generator, n: int = 300_000) -> torch.Tensor:
    """Random bit patterns (every exponent: subnormals, ±inf, NaNs with any payload), log-uniform magnitudes,
    exact bf16 ties and their neighbours, and special values."""
    rnd = from_bits(torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64))
    mags = (torch.randn(n // 2, generator=gen, dtype=F64) * torch.exp2(torch.randint(-150, 128, (n // 2,),
                                                                                     generator=gen).double())).float()
    hi = torch.randint(0, 2**16, (n // 8,), generator=gen, dtype=torch.int64) << 16
    ties = torch.cat([hi | low for low in (0x8000, 0x7FFF, 0x8001)])
    special = from_bits(torch.tensor([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                                      0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7FFF0000, 0x7F7F7FFF, 0x7F7F8000,
                                      0x7F7FFFFF, 0xFF7F8000, 0x00000001, 0x80008000, 0x00018000, 0x007FFFFF]))
    return torch.cat([rnd, mags, from_bits(ties), special])


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 bf16 neighbours lo < hi with lo <= x <= hi (x == hi for a negative bf16 value, x == lo for a
    positive one) and the position f = (x - lo) / (hi - lo), from frexp."""
    a = x.double().abs()
    _, e = torch.frexp(a)
    q = torch.exp2((torch.clamp(e - 1, min=-126) - 7).double())
    lo = torch.floor(a / q) * q
    f = (a - lo) / q
    neg = x < 0
    return torch.where(neg, -(lo + q), lo), torch.where(neg, -lo, lo + q), torch.where(neg, 1 - f, f)


# ==========================================================================================================
# rng
# ==========================================================================================================
RNG_KEYS = [(12345, 1, 0, 7), (0, 0, 0, 0), (2**31 - 1, 2**32 - 1, 7, 2**31 - 1), (4242, 2**40 + 3, 2**20, 99),
            (-5, 17, 3, 123456789), (2**33 + 9, 10**12, 1, bf16_sr.salt_of("state_v"))]


def test_hash_equals_python_integers():
    gen = torch.Generator().manual_seed(201)
    idx = torch.cat([torch.arange(0, 300), torch.randint(0, 2**31, (700,), generator=gen), 2**32 - 1 - torch.arange(20)])
    for seed, step, tensor, salt in RNG_KEYS:
        key = rng.make_key(torch.tensor(seed), torch.tensor(step), tensor, salt)
        assert key.dtype == torch.int64 and key.dim() == 0
        assert torch.equal(rng.torch_key(torch.tensor([seed, step]), tensor, salt), key)
        got = rng.hash32(key, idx)
        want = torch.tensor([rng.reference_hash32(seed, step, tensor, salt, int(i)) for i in idx])
        assert torch.equal(got, want), f"key {(seed, step, tensor, salt)}: {int((got != want).sum())} hashes differ"
        assert int(got.min()) >= 0 and int(got.max()) < 2**32
        assert torch.equal(rng.torch_random16(key, 300), want[:300] & 0xFFFF)
    # mul32 on the extremes (the int64 emulation must not depend on signed overflow)
    x = torch.tensor([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 0xFFFF0000, 0x8000_0000, 0x7FFF_FFFF])
    for c in (rng.MIX_1, rng.MIX_2, rng.KEY_INDEX, rng.KEY_STEP, rng.KEY_TENSOR, 0xFFFFFFFF):
        assert rng.mul32(x, c).tolist() == [(int(v) * c) % 2**32 for v in x]


def test_hash_bits_uniform():
    """32-bit outputs of consecutive indices: every bit set half the time (Bernstein, 1e-9 per bit)."""
    key = rng.make_key(torch.tensor(77), torch.tensor(5), 2, 11)
    n = 1 << 18
    h = rng.hash32(key, torch.arange(n))
    for b in range(32):
        ones = float(((h >> b) & 1).sum())
        assert abs(ones - n / 2) <= float(bernstein(torch.tensor(n / 4))), f"bit {b}: {ones} of {n}"
    assert h.unique().numel() >= n - 20  # a bijection of the index per key: (near) no collisions


# ==========================================================================================================
# rounding against the float64 reference
# ==========================================================================================================
def test_round_bf16_equals_float64_reference():
    gen = torch.Generator().manual_seed(202)
    x = wide_fp32(gen, 200_000)
    nan = torch.isnan(x)
    assert int(nan.sum()) > 500 and int(((bits(x) & 0x7F800000) == 0).sum()) > 1000  # NaNs, subnormals
    noise = torch.randint(0, 2**16, x.shape, generator=gen)
    for nz in (None, noise, torch.zeros_like(noise), torch.full_like(noise, 0xFFFF)):
        got = rounding.torch_round_bf16(x, nz)
        assert got.dtype == torch.float32
        assert ((bits(got).long() & 0xFFFF) == 0).all()
        ref = bf16_sr.reference_round(x, nz)
        assert torch.equal(torch.isnan(got), nan)
        bad = got.double() != ref
        bad &= ~nan
        assert not bad.any(), f"{int(bad.sum())} differ from float64, e.g. x = {x[bad][:4].tolist()}"
    rne = rounding.torch_rne_bf16(x)
    assert rne.dtype == torch.bfloat16
    assert torch.equal(bits(rne)[~nan], bits(x.to(torch.bfloat16))[~nan])  # torch's cast, away from NaN


def test_nan_becomes_canonical():
    """Every NaN (either sign, any payload) rounds to 0x7FFF, nearest or stochastic: the GPU conversion's NaN."""
    u = torch.tensor([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7F80FFFF, 0x7FA50000, 0xFFFFFFFF])
    x = from_bits(u)
    for noise in (None, torch.full(u.shape, 0xFFFF)):
        got = rounding.torch_to_bf16(rounding.torch_round_bf16(x, noise))
        assert (bits(got).long() & 0xFFFF).tolist() == [0x7FFF] * u.numel()


# ==========================================================================================================
# bf16_sr statistics through the codec path
# ==========================================================================================================
def test_bf16_sr_unbiased_and_up_rate_equals_fraction():
    gen = torch.Generator().manual_seed(203)
    n, draws = 2048, 1024
    x = (torch.randn(n, generator=gen, dtype=F64) * torch.exp2(torch.randint(-135, 120, (n,), generator=gen)
                                                               .double())).float()
    x[:16] = x[:16].bfloat16().float()  # a few exact bf16 values: must never move
    lo, hi, f = neighbours(x)
    exact = (x.double() == lo) | (x.double() == hi)
    assert int(exact.sum()) >= 16 and int((x.abs() < 2.0**-126).sum()) > 20  # subnormals are in there
    salt = bf16_sr.salt_of("state_m")
    out = torch.empty(n, dtype=torch.bfloat16)
    ups = torch.zeros(n, dtype=F64)
    total = torch.zeros(n, dtype=F64)
    for step in range(1, draws + 1):
        bf16_sr.torch_encode(x, out, torch.tensor([987, step, 5]), 0, salt)
        v = out.double()
        assert ((v == lo) | (v == hi)).all(), "not a bf16 neighbour"
        ups += (v == hi).double()
        total += v
    # exact values never move (a negative one sits at hi: f = 1, always "up")
    assert torch.equal(ups[exact], draws * f[exact]) and torch.equal(total[exact] / draws, x[exact].double())
    # P(up) = f for every value: Bernstein bound on each count (variance draws*f(1-f))
    dev = (ups - draws * f).abs()
    bound = bernstein(draws * f * (1 - f))
    assert (dev <= bound).all(), f"{int((dev > bound).sum())} values round up at the wrong rate"
    # unbiased: the mean of the draws is x within (hi - lo) * bound / draws
    mean_err = (total / draws - x.double()).abs()
    assert (mean_err <= (hi - lo) * bound / draws * (1 + 1e-12)).all()
    # pooled: all 2M roundings together (variance sum f(1-f) draws), and by bins of f
    pooled = (ups - draws * f).sum()
    assert abs(float(pooled)) <= float(bernstein((draws * f * (1 - f)).sum()))
    for k in range(8):
        sel = (f >= k / 8) & (f < (k + 1) / 8) & ~exact
        assert int(sel.sum()) > 100
        assert abs(float((ups[sel] - draws * f[sel]).sum())) <= float(bernstein((draws * f * (1 - f))[sel].sum()))
    print(f"\nbf16_sr: {n} values x {draws} draws; worst |ups - draws*f| / bound {float((dev / bound).max()):.3f}, "
          f"pooled deviation {float(pooled):+.0f} of bound {float(bernstein((draws * f * (1 - f)).sum())):.0f}")


def test_bf16_sr_reproducible_and_keyed():
    gen = torch.Generator().manual_seed(204)
    x = torch.randn(20_000, generator=gen) * 3
    f = neighbours(x)[2]

    def enc(seed, step, tensor, salt):
        out = torch.empty(20_000, dtype=torch.bfloat16)
        bf16_sr.torch_encode(x, out, torch.tensor([seed, step, tensor]), 0, salt)
        return bits(out)

    a = enc(1, 2, 3, 4)
    assert torch.equal(a, enc(1, 2, 3, 4))
    # the stored bits are the float64 rounding with the hash's noise for flat index k
    noise = rng.hash32(rng.make_key(torch.tensor(1), torch.tensor(2), 3, 4), torch.arange(20_000)) & 0xFFFF
    assert torch.equal(bits(rounding.torch_to_bf16(bf16_sr.reference_round(x, noise).float())), a)
    # another seed / step / tensor / salt: independent draws differ at rate 2f(1-f)
    rate = (2 * f * (1 - f)).sum()
    for other in ((2, 2, 3, 4), (1, 3, 3, 4), (1, 2, 4, 4), (1, 2, 3, 5)):
        differ = float((enc(*other) != a).sum())
        assert abs(differ - float(rate)) <= float(bernstein(rate)), (other, differ, float(rate))
    # without rng: nearest even (the initial state)
    out = torch.empty(20_000, dtype=torch.bfloat16)
    bf16_sr.torch_encode(x, out, None, 0, 4)
    assert torch.equal(bits(out), bits(x.bfloat16()))


# ==========================================================================================================
# ECC
# ==========================================================================================================
def ecc_data(fmt: str, gen: torch.Generator, n: int = 80_000) -> torch.Tensor:
    """Every binade of the narrow format (subnormal narrow values and values that round to 0 included),
    both signs, values near 0, large magnitudes up to the largest finite narrow value."""
    e = torch.randint(-152, 128, (n,), generator=gen) if fmt == "bf16" else torch.randint(-30, 16, (n,), generator=gen)
    mag = (1 + torch.rand(n, generator=gen, dtype=F64)) * torch.exp2(e.double())
    x = torch.where(torch.rand(n, generator=gen) < 0.5, -mag, mag)
    x = torch.cat([x, torch.randn(10_000, generator=gen, dtype=F64) * 1e-4]).float()
    top = 3.3895313892515355e38 if fmt == "bf16" else 65504.0
    return x[(x.abs() <= top) & (x != 0)]


def ecc_encode(x: torch.Tensor, fmt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.full(x.shape, 7.0, dtype=NARROW[fmt][2])
    e = torch.full(x.shape, 99, dtype=torch.int8 if n == 127 else torch.int16)
    ecc.torch_encode(x, p, e, fmt, n)
    return p, e


@pytest.mark.parametrize("name,fmt,n", ECC, ids=[c[0] for c in ECC])
def test_ecc_against_float64_reference(name, fmt, n):
    gen = torch.Generator().manual_seed(205 + n)
    x = ecc_data(fmt, gen)
    p, e = ecc_encode(x, fmt, n)
    p_ref, rho_ref = ecc.reference_encode(x, fmt, n)
    assert torch.equal(p.double(), p_ref), "narrow value is not the float64 RNE"
    mant, emin, _ = NARROW[fmt]
    _, ex = torch.frexp(p_ref)
    exp = torch.where(p_ref == 0, emin, torch.clamp(ex - 1, min=emin))
    ulp = torch.exp2((exp - mant).double())
    # codes: equal, except one step off where z*N is within fp32 rounding of a .5 (z*N and z*N + 0.5 each
    # round once; |z*N| <= N, so each error is at most half an fp32 ulp of N + 1)
    zn = (x.double() - p_ref) / (ulp / 2) * n
    window = 2.0 ** (math.floor(math.log2(n + 1)) - 23)
    near = ((zn.abs() - zn.abs().floor()) - 0.5).abs() <= window
    diff = e.long() - rho_ref.long()
    assert int(diff.abs().max()) <= 1 and not ((diff != 0) & ~near).any()
    n_diff = int((diff != 0).sum())
    assert n_diff <= max(3, 4 * window * x.numel())  # the window's share of (spread) fractions, x2
    # the codec's own error (float64 decode of the stored codes): ULP(p)/(4N); codes one step off add 1/N of
    # half an ULP times the window, i.e. (1 + 2 window) of the bound
    err_codec = (ecc.reference_decode(p, e, fmt, n) - x.double()).abs()
    ratio = float((err_codec / (ulp / (4 * n))).max())
    assert ratio <= 1 + 2 * window
    # the fp32 decode adds at most half an fp32 ulp of the result (plus 2^-24 of the correction for rho/N)
    dec = ecc.torch_decode(p, e, fmt, n)
    assert dec.dtype == torch.float32 and torch.isfinite(dec).all()
    _, ed = torch.frexp(dec.double().abs())
    ulp32 = torch.exp2((torch.clamp(ed - 1, min=-126) - 23).double())
    err = (dec.double() - x.double()).abs()
    assert (err <= ulp / (4 * n) * (1 + 2 * window + 2.0**-23) + ulp32 / 2).all()
    normal = p_ref.abs() >= 2.0**emin
    rel = float((err / x.double().abs())[normal].max())
    rel_codec = float((err_codec / x.double().abs())[normal].max())
    assert int((~normal).sum()) > 1000 and int((p_ref == 0).sum()) > 50 and float(x.abs().max()) > 2.0 ** (14 if fmt == "fp16" else 126)
    print(f"\n{name}: max err/(ULP(p)/4N) {ratio:.5f} (codec, float64 decode); max relative error (normal p) codec "
          f"{rel_codec:.3e}, fp32 decode {rel:.3e}; {n_diff} of {x.numel()} codes one step off the float64 encode")


@pytest.mark.parametrize("name,fmt,n", ECC, ids=[c[0] for c in ECC])
def test_ecc_specials(name, fmt, n):
    big = 3.4e38 if fmt == "bf16" else 65520.0  # rounds to inf in the narrow format
    x = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), big, -big, 0.0, -0.0])
    p, e = ecc_encode(x, fmt, n)
    dec = ecc.torch_decode(p, e, fmt, n)
    assert torch.isnan(dec[:2]).all() and (e == 0).all()
    assert dec[2:6].tolist() == [math.inf, -math.inf, math.inf, -math.inf] and dec[6:].tolist() == [0.0, 0.0]
    if fmt == "bf16":  # the canonical NaN of optgen.codecs.rounding (torch's cast gives another)
        assert (bits(p[:2]).long() & 0xFFFF).tolist() == [0x7FFF, 0x7FFF]


# ==========================================================================================================
# Kahan
# ==========================================================================================================
def test_kahan_against_float64_reference():
    gen = torch.Generator().manual_seed(206)
    y = ecc_data("bf16", gen, 100_000)
    p = torch.full(y.shape, 3.0, dtype=torch.bfloat16)
    c = torch.full(y.shape, 5.0, dtype=torch.bfloat16)
    kahan.torch_encode(y, p, c)
    p_ref, c_ref = kahan.reference_encode(y)
    assert torch.equal(p.double(), p_ref) and torch.equal(c.double(), c_ref)
    dec = kahan.torch_decode(p, c)
    assert torch.equal(dec.double(), kahan.reference_decode(p, c)), "the fp32 decode is not exact"
    _, ep = torch.frexp(p_ref)
    exp_p = torch.where(p_ref == 0, -126, torch.clamp(ep - 1, min=-126))
    bound = torch.maximum(torch.exp2((exp_p - 17).double()), torch.tensor(2.0**-134, dtype=F64))
    err = (dec.double() - y.double()).abs()
    assert (err <= bound).all(), f"{int((err > bound).sum())} exceed 2^(E_p-17)"
    fine = p_ref.abs() >= 2.0**-117  # where 2^(E_p-17) >= 2^-134 (below, c's subnormal grid sets the bound)
    rel = float((err / y.double().abs())[fine].max())
    assert rel <= 2.0**-17 / (1 - 2.0**-9)
    # no error exactly where y - p fits in bf16 (c = y - p), an error everywhere else
    exact = c_ref == y.double() - p_ref
    assert (err[exact] == 0).all() and (err[~exact] > 0).all() and int(exact.sum()) > 1000
    print(f"\nbf16+kahan: max relative error (|p| >= 2^-117) {rel:.3e} (2^-17 = {2.0**-17:.3e}); "
          f"{float(exact.double().mean()):.1%} exact")


def test_kahan_specials():
    y = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38, 0.0, -0.0, 1.0 + 2.0**-20])
    p = torch.empty(8, dtype=torch.bfloat16)
    c = torch.empty(8, dtype=torch.bfloat16)
    kahan.torch_encode(y, p, c)
    dec = kahan.torch_decode(p, c)
    assert torch.isnan(dec[0]) and dec[1:5].tolist() == [math.inf, -math.inf, math.inf, -math.inf]
    assert (c[:5] == 0).all() and dec[5:].tolist() == [0.0, 0.0, 1.0 + 2.0**-20]


# ==========================================================================================================
# renderings and torch.compile
# ==========================================================================================================
def _fail(msg: str) -> SpecError:
    return SpecError(msg, field="param.storage")


def test_renderings():
    sr = get_codec("bf16_sr", {}, "state", _fail)
    assert sr.needs_rng and sr.imports == ("from optgen.codecs import bf16_sr",)
    assert sr.torch_encode("v", ["state_m[i]"]) == [f"bf16_sr.torch_encode(v, state_m[i], rng, i, {bf16_sr.salt_of('state_m')})"]
    assert sr.triton_encode("v", ["state_m"], "offs", "mask") == [
        f"bf16_sr.triton_encode(v, state_m, rng_seed, rng_step, rng_stream, offs, mask, {bf16_sr.salt_of('state_m')})"]
    for name, fmt, n in ECC:
        codec = get_codec(name, {}, "param", _fail)
        mant, emin, _ = NARROW[fmt]
        assert [(b.suffix, b.dtype) for b in codec.buffers()] == [("", str(NARROW[fmt][2])[6:]),
                                                                   ("ecc", "int8" if n == 127 else "int16")]
        assert codec.torch_decode("x", ["p[i]", "e[i]"]) == [f"x = ecc.torch_decode(p[i], e[i], {fmt!r}, {n})"]
        assert codec.triton_encode("x", ["p", "e"], "offs", "mask") == [
            f"ecc.triton_encode(x, p, e, offs, mask, {mant}, {emin}, {n})"]
    k = get_codec("bf16+kahan", {}, "param", _fail)
    assert [(b.suffix, b.dtype) for b in k.buffers()] == [("", "bfloat16"), ("kahan", "bfloat16")]
    assert k.torch_encode("x", ["p[i]", "c[i]"]) == ["kahan.torch_encode(x, p[i], c[i])"]
    assert k.triton_decode("x", ["p", "c"], "offs", "mask") == ["x = kahan.triton_decode(p, c, offs, mask)"]


def test_torch_functions_trace_fullgraph():
    gen = torch.Generator().manual_seed(207)
    x = torch.randn(4099, generator=gen) * torch.exp2(torch.randint(-130, 100, (4099,), generator=gen).float())

    def step(x, r, sr, p8, e8, p16, e16, kp, kc):
        bf16_sr.torch_encode(x, sr, r, 1, 12345)
        ecc.torch_encode(x, p8, e8, "bf16", 127)
        ecc.torch_encode(x, p16, e16, "fp16", 127)
        kahan.torch_encode(x, kp, kc)
        return ecc.torch_decode(p8, e8, "bf16", 127), ecc.torch_decode(p16, e16, "fp16", 127), kahan.torch_decode(kp, kc)

    def buffers():
        return (torch.empty(4099, dtype=torch.bfloat16), torch.empty(4099, dtype=torch.bfloat16),
                torch.empty(4099, dtype=torch.int8), torch.empty(4099, dtype=torch.float16),
                torch.empty(4099, dtype=torch.int8), torch.empty(4099, dtype=torch.bfloat16),
                torch.empty(4099, dtype=torch.bfloat16))

    r = torch.tensor([31, 7, 5, 3])  # seed, step, ids of tensors 0 and 1
    a, b = buffers(), buffers()
    torch._dynamo.reset()
    out_a = step(x, r, *a)
    out_b = torch.compile(step, backend="eager", fullgraph=True)(x, r, *b)
    for u, v in zip(a + out_a, b + out_b):
        assert torch.equal(bits(u), bits(v))


# ==========================================================================================================
# Triton
# ==========================================================================================================
if triton is not None:

    @triton.jit
    def _tile(ROWS: tl.constexpr, COLS: tl.constexpr):
        return tl.program_id(0) * (ROWS * COLS) + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]

    @triton.jit
    def round_kernel(x_ptr, noise_ptr, rne_ptr, sr_ptr, back_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        noise = tl.load(noise_ptr + offs, mask=mask, other=0).to(tl.uint32)
        tl.store(rne_ptr + offs, tl_rounding.tl_round_bf16(x, 0, False), mask=mask)
        tl.store(sr_ptr + offs, tl_rounding.tl_round_bf16(x, noise, True), mask=mask)
        # bf16 -> fp32 (the stored rne values, loaded back as bits)
        tl.store(back_ptr + offs, tl_rounding.tl_from_bf16(tl_rounding.tl_round_bf16(x, 0, False)), mask=mask)

    @triton.jit
    def load_kernel(b_ptr, out_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tl.store(out_ptr + offs, tl_rounding.tl_load_bf16(b_ptr + offs, mask), mask=mask)

    @triton.jit
    def f16_kernel(h_ptr, x_ptr, h_out_ptr, x_out_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tl.store(x_out_ptr + offs, tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32), mask=mask)
        tl.store(h_out_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float16), mask=mask)

    @triton.jit
    def hash_kernel(out_ptr, out16_ptr, rng_ptr, rng32_ptr, tensor_ptr, numel, SALT: tl.constexpr,
                    ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tensor = tl.load(tensor_ptr)
        key = tl_rng.tl_make_key(tl.load(rng32_ptr), tl.load(rng32_ptr + 1), tensor, SALT)  # int32 inputs
        tl.store(out_ptr + offs, tl_rng.tl_hash32(key, offs).to(tl.int32, bitcast=True), mask=mask)
        key64 = tl_rng.tl_make_key(tl.load(rng_ptr), tl.load(rng_ptr + 1), tensor, SALT)  # int64 inputs
        tl.store(out16_ptr + offs, tl_rng.tl_random16(key64, offs).to(tl.int32), mask=mask)

    @triton.jit
    def sr_encode_kernel(x_ptr, out_ptr, rng_ptr, tensor_ptr, numel, SALT: tl.constexpr, ROWS: tl.constexpr,
                         COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tensor = tl.load(tensor_ptr)
        x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0), float("nan"))  # masked lanes: ignored
        seed, step, stream = tl_rng.tl_rng_args(rng_ptr, 0, 0, tensor, True)  # rng = [seed, step, id_0, ...]
        tl_bf16_sr.triton_encode(x, out_ptr, seed, step, stream, offs, mask, SALT)

    @triton.jit
    def sr_decode_kernel(b_ptr, out_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tl.store(out_ptr + offs, tl_bf16_sr.triton_decode(b_ptr + offs, mask), mask=mask)

    @triton.jit
    def ecc_encode_kernel(x_ptr, p_ptr, e_ptr, numel, MANT: tl.constexpr, EMIN: tl.constexpr, N: tl.constexpr,
                          ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0), float("nan"))
        tl_ecc.triton_encode(x, p_ptr, e_ptr, offs, mask, MANT, EMIN, N)

    @triton.jit
    def ecc_decode_kernel(p_ptr, e_ptr, out_ptr, numel, MANT: tl.constexpr, EMIN: tl.constexpr, N: tl.constexpr,
                          ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tl.store(out_ptr + offs, tl_ecc.triton_decode(p_ptr, e_ptr, offs, mask, MANT, EMIN, N), mask=mask)

    @triton.jit
    def kahan_encode_kernel(x_ptr, p_ptr, c_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        x = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0), float("nan"))
        tl_kahan.triton_encode(x, p_ptr, c_ptr, offs, mask)

    @triton.jit
    def kahan_decode_kernel(p_ptr, c_ptr, out_ptr, numel, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs = _tile(ROWS, COLS)
        mask = offs < numel
        tl.store(out_ptr + offs, tl_kahan.triton_decode(p_ptr, c_ptr, offs, mask), mask=mask)


TILES = [(16, 256), (4, 64)]  # (ROWS, COLS); the second on a slice whose numel is not a multiple of 256


def _launch(kernel, numel, tile, *args, **meta):
    """Launch as optgen's launcher does: without FMA contraction (on a GPU, a contracted ``p + corr·2^l``
    rounds once where torch rounds twice, one ulp apart where the correction is an fp32 subnormal)."""
    rows, cols = tile
    kernel[(triton.cdiv(numel, rows * cols),)](*args, numel, **meta, ROWS=rows, COLS=cols, enable_fp_fusion=False)


def _cases(x: torch.Tensor):
    """(slice, tile): the whole array in big tiles, and an odd-sized slice in 4x64 tiles."""
    return [(x, TILES[0]), (x[-3001:], TILES[1])]


@needs_triton
def test_triton_rounding_bit_identical():
    gen = torch.Generator().manual_seed(208)
    x = wide_fp32(gen, 120_000)
    assert x.numel() % 256 != 0
    noise = torch.randint(0, 2**16, x.shape, generator=gen, dtype=torch.int32)
    for xs, tile in _cases(x):
        nz = noise[-xs.numel():]
        n = xs.numel()
        rne = torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEVICE)
        sr, back = torch.empty_like(rne), torch.full((n,), 7.0, device=DEVICE)
        _launch(round_kernel, n, tile, xs.to(DEVICE), nz.to(DEVICE), rne, sr, back)
        want_rne = rounding.torch_to_bf16(rounding.torch_round_bf16(xs))
        want_sr = rounding.torch_to_bf16(rounding.torch_round_bf16(xs, nz.long()))
        assert torch.equal(bits(rne.cpu()), bits(want_rne)), f"RNE: {int((bits(rne.cpu()) != bits(want_rne)).sum())} differ"
        assert torch.equal(bits(sr.cpu()), bits(want_sr)), f"SR: {int((bits(sr.cpu()) != bits(want_sr)).sum())} differ"
        assert torch.equal(bits(back.cpu()), bits(want_rne.float()))
    # every bf16 pattern loads exactly (subnormals, NaN payloads)
    allb = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    out = torch.empty(65536, device=DEVICE)
    _launch(load_kernel, 65536, TILES[0], allb.to(DEVICE), out)
    assert torch.equal(bits(out.cpu()), torch.arange(65536, dtype=torch.int32) << 16)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_gpu_rounding_every_fp32():
    """On the GPU, nearest-even rounding is the hardware conversion: equal to the integer formula (the PyTorch
    path) on every one of the 2^32 fp32 patterns, NaNs included."""
    n = 1 << 28
    noise = torch.zeros(n, dtype=torch.int32, device="cuda")
    rne, sr, back = (torch.empty(n, dtype=torch.bfloat16, device="cuda"), torch.empty(n, dtype=torch.bfloat16,
                     device="cuda"), torch.empty(n, device="cuda"))
    for start in range(0, 2**32, n):
        u = torch.arange(start, start + n, dtype=torch.int64, device="cuda")
        x = (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)
        _launch(round_kernel, n, TILES[0], x, noise, rne, sr, back)
        want = rounding.torch_to_bf16(rounding.torch_round_bf16(x))
        assert torch.equal(bits(rne), bits(want)), f"from {start:#x}: {int((bits(rne) != bits(want)).sum())} differ"
        assert torch.equal(bits(back), bits(want.float()))


@needs_triton
def test_triton_fp16_casts_match_torch():
    """ecc's fp16 path uses Triton's own fp16 casts: check them against torch, also under the interpreter."""
    gen = torch.Generator().manual_seed(209)
    allh = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = allh[torch.isfinite(allh)].double()
    up = torch.nextafter(h.half(), torch.tensor(math.inf).half()).double()
    mid = ((h + up) / 2)[torch.isfinite(up)].float()  # exact fp16 ties (subnormal ones included)
    x = torch.cat([mid, torch.nextafter(mid, torch.tensor(math.inf)), torch.nextafter(mid, torch.tensor(-math.inf)),
                   (torch.randn(100_000, generator=gen) * torch.exp2(torch.randint(-30, 18, (100_000,), generator=gen)
                                                                      .float())), torch.tensor([math.nan, 65520.0])])
    n = max(x.numel(), 65536)
    hin = torch.cat([allh, torch.zeros(n - 65536, dtype=torch.float16)])
    xin = torch.cat([x, torch.zeros(n - x.numel())])
    h_out = torch.empty(n, dtype=torch.float16, device=DEVICE)
    x_out = torch.empty(n, device=DEVICE)
    _launch(f16_kernel, n, TILES[0], hin.to(DEVICE), xin.to(DEVICE), h_out, x_out)
    assert same_values(x_out.cpu()[:65536], allh.float())
    assert torch.equal(bits(x_out.cpu()[:65536])[~torch.isnan(allh)], bits(allh.float())[~torch.isnan(allh)])
    want = xin.to(torch.float16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(h_out.cpu()), nan) and torch.equal(bits(h_out.cpu())[~nan], bits(want)[~nan])


@needs_triton
def test_triton_hash_bit_identical():
    n = 20_001
    for seed, step, tensor, salt in RNG_KEYS[2:]:
        out = torch.empty(n, dtype=torch.int32, device=DEVICE)
        out16 = torch.empty_like(out)
        r64 = torch.tensor([seed, step], dtype=torch.int64)
        r32 = (r64 & 0xFFFFFFFF)
        r32 = torch.where(r32 >= 2**31, r32 - 2**32, r32).to(torch.int32)  # same low 32 bits
        t = torch.tensor([tensor], dtype=torch.int64, device=DEVICE)
        _launch(hash_kernel, n, TILES[0], out, out16, r64.to(DEVICE), r32.to(DEVICE), t, SALT=salt)
        key = rng.make_key(torch.tensor(seed), torch.tensor(step), tensor, salt)
        want = rng.hash32(key, torch.arange(n))
        assert torch.equal(out.cpu().long() & 0xFFFFFFFF, want), (seed, step, tensor, salt)
        assert torch.equal(out16.cpu().long(), want & 0xFFFF)


@needs_triton
def test_triton_bf16_sr_bit_identical():
    gen = torch.Generator().manual_seed(210)
    x = wide_fp32(gen, 60_000)
    for (xs, tile), (seed, step, tensor, salt) in zip(_cases(x) + _cases(x[:40_000]), RNG_KEYS):
        n = xs.numel()
        r = torch.tensor([seed, step, tensor], dtype=torch.int64)  # the id of tensor 0 of the call
        out = torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEVICE)
        _launch(sr_encode_kernel, n, tile, xs.to(DEVICE), out, r.to(DEVICE),
                torch.tensor([0], device=DEVICE), SALT=salt)
        want = torch.full((n,), 7.0, dtype=torch.bfloat16)
        bf16_sr.torch_encode(xs, want, r, 0, salt)
        got = out.cpu()
        assert torch.equal(bits(got), bits(want)), f"key {(seed, step, tensor, salt)}: {int((bits(got) != bits(want)).sum())} differ"
        dec = torch.full((n,), 5.0, device=DEVICE)
        _launch(sr_decode_kernel, n, tile, out, dec)
        assert torch.equal(bits(dec.cpu()), bits(want.float()))
        assert float((bits(want) != bits(xs.bfloat16())).double().mean()) > 0.2  # really stochastic


@needs_triton
@pytest.mark.parametrize("name,fmt,n", ECC, ids=[c[0] for c in ECC])
def test_triton_ecc_bit_identical(name, fmt, n):
    gen = torch.Generator().manual_seed(211 + n)
    x = torch.cat([ecc_data(fmt, gen, 60_000), wide_fp32(gen, 20_000)])
    mant, emin, dt = NARROW[fmt]
    et = torch.int8 if n == 127 else torch.int16
    for xs, tile in _cases(x):
        size = xs.numel()
        p = torch.full((size,), 7.0, dtype=dt, device=DEVICE)
        e = torch.full((size,), 99, dtype=et, device=DEVICE)
        _launch(ecc_encode_kernel, size, tile, xs.to(DEVICE), p, e, MANT=mant, EMIN=emin, N=n)
        p_want, e_want = ecc_encode(xs, fmt, n)
        nan = torch.isnan(p_want.float())
        if fmt == "bf16":  # bf16 moves as bits: NaNs too
            assert torch.equal(bits(p.cpu()), bits(p_want)), f"{name}: {int((bits(p.cpu()) != bits(p_want)).sum())} differ"
        else:
            assert torch.equal(torch.isnan(p.cpu().float()), nan) and torch.equal(bits(p.cpu())[~nan], bits(p_want)[~nan])
        assert torch.equal(e.cpu(), e_want), f"{name}: {int((e.cpu() != e_want).sum())} corrections differ"
        dec = torch.full((size,), 5.0, device=DEVICE)
        _launch(ecc_decode_kernel, size, tile, p, e, dec, MANT=mant, EMIN=emin, N=n)
        want = ecc.torch_decode(p_want, e_want, fmt, n)
        dnan = torch.isnan(want)
        assert torch.equal(torch.isnan(dec.cpu()), dnan) and torch.equal(bits(dec.cpu())[~dnan], bits(want)[~dnan]), (
            _first_differences(dec.cpu(), want, p_want, e_want))


def _first_differences(got: torch.Tensor, want: torch.Tensor, *inputs: torch.Tensor) -> str:
    """The first few elements whose bits differ (NaNs equal), with the inputs that produced them."""
    differ = (bits(got) != bits(want)) & ~(torch.isnan(got) & torch.isnan(want))
    idx = differ.nonzero().flatten()[:4].tolist()
    rows = [f"[{i}] got {got[i].item()!r} want {want[i].item()!r} from {[t[i].item() for t in inputs]}" for i in idx]
    return f"{int(differ.sum())} differ: " + "; ".join(rows)


@needs_triton
def test_triton_kahan_bit_identical():
    gen = torch.Generator().manual_seed(212)
    x = torch.cat([ecc_data("bf16", gen, 60_000), wide_fp32(gen, 20_000)])
    for xs, tile in _cases(x):
        size = xs.numel()
        p = torch.full((size,), 7.0, dtype=torch.bfloat16, device=DEVICE)
        c = torch.full((size,), 7.0, dtype=torch.bfloat16, device=DEVICE)
        _launch(kahan_encode_kernel, size, tile, xs.to(DEVICE), p, c)
        p_want, c_want = torch.empty(size, dtype=torch.bfloat16), torch.empty(size, dtype=torch.bfloat16)
        kahan.torch_encode(xs, p_want, c_want)
        assert torch.equal(bits(p.cpu()), bits(p_want)) and torch.equal(bits(c.cpu()), bits(c_want))
        dec = torch.full((size,), 5.0, device=DEVICE)
        _launch(kahan_decode_kernel, size, tile, p, c, dec)
        want = kahan.torch_decode(p_want, c_want)
        # NaN payloads are not compared: a GPU's fp32 add returns the canonical NaN, the CPU keeps the payload
        dnan = torch.isnan(want)
        assert torch.equal(torch.isnan(dec.cpu()), dnan) and torch.equal(bits(dec.cpu())[~dnan], bits(want)[~dnan]), (
            _first_differences(dec.cpu(), want, p_want, c_want))
