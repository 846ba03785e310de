"""Every built-in spec with compressed storage, against float64 references of the same quantized algorithm.

The specs are listed in ``SPECS`` (class name, fp32 counterpart, float64 reference, hyper-parameters, how
each tensor is stored). An entry whose class is not in ``optgen.optim`` yet is skipped with that reason,
so the file keeps working while specs are added (the FlashOptim family, StochasticAdamW, Lamb16).

What is checked:
1. ``test_step_matches_float64_reference``: 50 steps on both backends. Before every step the optimizer's
   stored state is decoded in float64 (decoders written here, from ALGORITHMS.md), the reference update
   runs in float64 from it and the same gradient, and what the optimizer stored is compared with it:
   - an fp32 parameter within 1e-6 of max|p| (as tests/test_reference.py); a bf16+ecc8 parameter: its
     bf16 part the nearest bf16 of the reference master weight (near-ties counted as below), and the
     decoded master weight within the codec's bound ULP(p)/(4·127) of the reference (one int8 correction
     step is only ~2^8 fp32 ulps, so a fraction of a percent of the corrections legitimately differ by a
     step: those are counted and printed, not limited);
   - every quantized code equal to the reference's encoding of the reference's new (unquantized) value,
     except at near-ties: the optimizer computes the new value in fp32 (a handful of roundings) and the
     reference in float64, so where a value lies within those rounding errors of a code boundary either
     side is right. Each state carries an uncertainty ``unc = 2^-20·(sum of |terms|)`` (16 fp32 ulps of
     the terms of its update; the fp32 hyper-parameters and the fp32 decode are within it); a differing
     code must lie between the reference codes of the corners (x ± unc, scale ± its uncertainty), must be
     exactly one step away, and such codes must be at most 1e-3 of all codes checked;
   - block scales (fp32 absmax, fp16 group scales) within the same uncertainty (plus fp16 rounding);
   - small tensors (100 elements) hold fp32 states, compared within ``unc``.
   The reference always restarts from the optimizer's own state (re-sync each step), so errors do not
   compound and a single wrong code or a wrong formula shows up in the step where it happens.
2. ``test_tracks_fp32_counterpart``: a 2-layer MLP regression, 200 full-batch steps from the same init on
   the same data: final loss within 1% of the fp32 counterpart's (AdamW, Adam, SGD, Lion). AdamW4bit does
   not (see its ``known_gap``): it is an expected failure, strict, with the measured ratio in the reason.
3. ``test_bytes_per_parameter``: the bytes held per element (state + parameter + gradient) equal
   ``cls.bytes_per_element`` and the number ``optgen list`` prints.
4. ``test_small_tensors_keep_fp32_states`` and ``test_fp32_variant_matches_float64``: the min_quantized_size
   threshold (4096 by default, configurable), the ``optgen_fp32_state`` mark, and the fp32-state variant
   against an independent float64 run of the same update order.
5. ``test_state_dict_round_trip``: save, load into a fresh optimizer, 3 more steps: bitwise equal.
6. ``test_nonfinite_gradient_adamw8bit``: bitsandbytes' behaviour for inf/NaN gradient elements.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from optgen import optim
from optgen.runtime import FP32_STATE_ATTR

F64 = torch.float64
FP32_MAX = 3.4028234663852886e38
UNC_REL = 2.0**-20  # uncertainty of an fp32-computed value: 16 ulps of the sum of |terms| of its update
ULP32 = 2.0**-23
REL = 1e-6  # fp32 parameters: max|ours - ref| <= REL * max|ref|
TIE_FRACTION = 1e-3  # at most this fraction of the codes checked may differ (each by one step, at a near-tie)
STEPS = 50


def need_interpreter() -> None:
    """These tests run the Triton kernel on CPU tensors, i.e. in Triton's interpreter. On a GPU machine
    test_triton_backend.py checks the kernel against the fallback instead (bit for bit)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU: see test_triton_backend.py)")


# ==========================================================================================================
# float64 codec references (independent of optgen.codecs)
# ==========================================================================================================
def create_dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map`` (and torchao's copy), for maps without a linear region: decade i
    holds the fp32 midpoints of an even split of [0.1, 1], times 10^(i + 1 - max_exponent_bits); then 0, 1."""
    assert max_exponent_bits == total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 2**total_bits
    return torch.tensor(sorted(data), dtype=torch.float32)


MAP8 = {s: create_dynamic_map(s, 7, 8).double() for s in (True, False)}
# bitsandbytes decides the nearest code against fp32 midpoints of neighbouring map values
MID8 = {s: ((create_dynamic_map(s, 7, 8)[:-1] + create_dynamic_map(s, 7, 8)[1:]) * 0.5).double() for s in (True, False)}
MAP4 = {True: create_dynamic_map(True, 3, 4).double(),
        False: torch.linspace(0, 1, 17, dtype=torch.float32)[1:].double()}


def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """Flat float64 -> [ceil(n/g), g], padded with zeros (padding never changes a max of magnitudes)."""
    n = x.numel()
    out = torch.zeros(-(-n // g) * g, dtype=F64)
    out[:n] = x
    return out.view(-1, g)


def _per_element(s: torch.Tensor, g: int, n: int) -> torch.Tensor:
    return s.repeat_interleave(g)[:n]


@dataclass
class Stats:
    """Codes checked and near-ties seen (per state), over a whole test."""

    checked: dict[str, int] = field(default_factory=dict)
    ties: dict[str, int] = field(default_factory=dict)
    unlimited: set[str] = field(default_factory=set)  # counted and reported, not limited to TIE_FRACTION

    def add(self, what: str, n: int, ties: int, limited: bool = True) -> None:
        what = re.sub(r"\[[^\]]*\]|\s*step \d+ tensor \d+", "", what)  # "X[eager] step 3 tensor 0.m" -> "X.m"
        self.checked[what] = self.checked.get(what, 0) + n
        self.ties[what] = self.ties.get(what, 0) + ties
        if not limited:
            self.unlimited.add(what)

    def summary(self) -> str:
        return ", ".join(f"{k}{' (not limited)' if k in self.unlimited else ''}: {self.ties[k]}/{self.checked[k]}"
                         for k in sorted(self.checked))


class BlockCodec:
    """A block/group-quantized state: codes + one scale per ``block`` consecutive flat elements.

    ``code_of(x, s)`` is the reference encoder (float64 x and per-element scale s -> int64 code), monotone
    non-decreasing in x; ``magnitude(x)`` is what the scale is the block max of.
    """

    block: int
    scale_dtype: torch.dtype

    def __init__(self, signed: bool = True) -> None:
        self.signed = signed

    def magnitude(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()

    def magnitude_bounds(self, x: torch.Tensor, unc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.abs() - unc).clamp(min=0), x.abs() + unc

    def scale(self, mag: torch.Tensor) -> torch.Tensor:
        return _groups(mag, self.block).max(dim=1).values.clamp(min=1e-12)

    def read_codes(self, codes: torch.Tensor, n: int) -> torch.Tensor:
        return codes.reshape(-1).long()

    def code_of(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value_of(self, code: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial(self, n: int) -> torch.Tensor:
        """The decoded encoding of an all-zero state (the scale is then its floor, 1e-12)."""
        s = torch.full((n,), 1e-12, dtype=F64)
        return self.value_of(self.code_of(torch.zeros(n, dtype=F64), s), s)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
        s = _per_element(scale.double(), self.block, n)
        return self.value_of(self.read_codes(codes, n), s)

    def check(self, codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, unc: torch.Tensor, what: str,
              stats: Stats) -> None:
        """The stored codes/scales against the reference encoding of x (float64, flat) within ``unc``."""
        n = x.numel()
        assert torch.isfinite(x).all(), f"{what}: the reference is not finite"
        assert codes.dtype == self.code_dtype, f"{what}: codes are {codes.dtype}, expected {self.code_dtype}"
        assert scale.dtype == self.scale_dtype, f"{what}: scales are {scale.dtype}, expected {self.scale_dtype}"
        stored_scale = scale.double().reshape(-1)
        assert torch.isfinite(stored_scale).all(), f"{what}: a stored scale is not finite"
        s_ref = self.scale(self.magnitude(x))
        mag_lo, mag_hi = self.magnitude_bounds(x, unc)
        s_lo = self.scale(mag_lo) * (1 - 2 * ULP32)
        s_hi = self.scale(mag_hi) * (1 + 2 * ULP32)
        if self.scale_dtype == torch.float16:  # the codes use the fp32 scale; fp16(scale) is stored
            lo, hi = s_lo.float().half().double(), s_hi.float().half().double()
        else:
            lo, hi = s_lo, s_hi
        bad = (stored_scale < lo) | (stored_scale > hi)
        assert not bad.any(), (f"{what}: block scale {stored_scale[bad][:4].tolist()} outside "
                               f"[{lo[bad][:4].tolist()}, {hi[bad][:4].tolist()}] (reference {s_ref[bad][:4].tolist()})")
        got = self.read_codes(codes, n)
        ref = self.code_of(x, _per_element(s_ref, self.block, n))
        corners = [self.code_of(xx, _per_element(ss, self.block, n))
                   for xx in (x - unc, x + unc) for ss in (s_lo, s_hi)]
        c_lo = torch.stack(corners).min(dim=0).values
        c_hi = torch.stack(corners).max(dim=0).values
        out = (got < c_lo) | (got > c_hi) | ((got - ref).abs() > 1)
        if out.any():
            i = out.nonzero()[0].item()
            raise AssertionError(f"{what}: element {i}: code {got[i].item()}, reference {ref[i].item()} "
                                 f"(allowed {c_lo[i].item()}..{c_hi[i].item()}); x = {x[i].item():.9e} "
                                 f"± {unc[i].item():.2e}, scale {s_ref[i // self.block].item():.9e}; "
                                 f"{int(out.sum())} such elements")
        stats.add(what, n, int((got != ref).sum()))


class Q8Dynamic(BlockCodec):
    """bitsandbytes 8-bit: blocks of 256, fp32 absmax, nearest map value decided against the fp32
    midpoints (a value exactly on a midpoint takes the lower code); signed map: a negative value whose
    nearest code is 0 takes the smallest negative code."""

    block = 256
    scale_dtype = torch.float32
    code_dtype = torch.uint8

    def code_of(self, x, s):
        r = x / s
        code = torch.searchsorted(MID8[self.signed], r, right=False)  # number of midpoints < r
        if self.signed:
            code = torch.where((r < 0) & (code == 127), code - 1, code)
        return code

    def value_of(self, code, s):
        return MAP8[self.signed][code] * s


class Q4(BlockCodec):
    """torchao 4-bit: blocks of 128, fp32 scale, two codes per byte (even element in the high nibble);
    c = largest index with M[c] <= x/s (0 below M[0]), then c + 1 if x/s - M[c] >= (M[c+1] - M[c])/2."""

    block = 128
    scale_dtype = torch.float32
    code_dtype = torch.uint8

    def read_codes(self, codes, n):
        b = codes.reshape(-1).long()
        assert b.numel() == (n + 1) // 2
        return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]

    def code_of(self, x, s):
        qmap = MAP4[self.signed]
        r = x / s
        down = torch.searchsorted(qmap[1:], r, right=True)  # number of M[1:] <= r
        up = (down + 1).clamp(max=15)
        return torch.where(r - qmap[down] >= (qmap[up] - qmap[down]) / 2, up, down)

    def value_of(self, code, s):
        return MAP4[self.signed][code] * s


class Q8Softsign(BlockCodec):
    """FlashOptim momentum: groups of 32, fp16 scale s = max(max|m|, 1e-12), n = m/s, y = 2n/(1+|n|),
    q = floor(127·y + 0.5) (int8); decode y = q/127, m = y/(2 - |y|)·S with S the stored fp16 scale."""

    block = 32
    scale_dtype = torch.float16
    code_dtype = torch.int8

    def code_of(self, x, s):
        n = x / s
        return torch.floor(127 * (2 * n / (1 + n.abs())) + 0.5).long()

    def value_of(self, code, s):
        y = code.double() / 127
        return y / (2 - y.abs()) * s


class Q8Sqrt(BlockCodec):
    """FlashOptim variance: groups of 32, fp16 scale s = max(max √v, 1e-12), q = floor(255·√v/s + 0.5)
    (uint8); decode v = (q/255·S)²."""

    block = 32
    scale_dtype = torch.float16
    code_dtype = torch.uint8

    def magnitude(self, x):
        return x.clamp(min=0).sqrt()

    def magnitude_bounds(self, x, unc):
        return (x - unc).clamp(min=0).sqrt(), (x + unc).clamp(min=0).sqrt()

    def code_of(self, x, s):
        return torch.floor(255 * x.clamp(min=0).sqrt() / s + 0.5).long()

    def value_of(self, code, s):
        return (code.double() / 255 * s) ** 2


class Fp8Norm:
    """LAMB16's fp8 states scaled by a per-tensor fp32 scalar: only the layout (dtypes) is described here;
    no float64 reference of the 3-phase update is written yet (its step test is skipped)."""

    def __init__(self, code_dtype: torch.dtype) -> None:
        self.code_dtype = code_dtype
        self.scale_dtype = torch.float32


# ------------------------------------------------------------------ the bf16 + int8 ECC master weight
def _bf16_exponent(p64: torch.Tensor) -> torch.Tensor:
    """Unbiased exponent E of bf16 values (as float64); -126 for zero and subnormals."""
    _, e = torch.frexp(p64)  # p = f·2^e, f in [0.5, 1)
    return torch.where(p64 == 0, torch.full_like(e, -126), (e - 1).clamp(min=-126)).double()


def decode_bf16_ecc(p: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """x = fp32(p) + (ρ/127)·2^ℓ, ℓ = E - 8 (2^ℓ is half an ULP of p), in float64."""
    p64 = p.reshape(-1).double()
    return p64 + rho.reshape(-1).double() / 127 * torch.exp2(_bf16_exponent(p64) - 8)


def bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to bf16, nearest, ties to even (through fp32: a double rounding can only differ from
    the direct one within 2^-24 relative of a bf16 midpoint, which the checks treat as a near-tie anyway;
    both roundings are monotone, which is what the window checks rely on)."""
    return x.float().bfloat16().double()


def ecc_code_of(x: torch.Tensor, p64: torch.Tensor) -> torch.Tensor:
    """ρ = round_half_away(clamp((x - p)·2^-ℓ, -1, 1)·127) for the given bf16 value p."""
    e = ((x - p64) * torch.exp2(8 - _bf16_exponent(p64))).clamp(-1, 1) * 127
    return (torch.sign(e) * torch.floor(e.abs() + 0.5)).long()


def check_bf16_ecc(p: torch.Tensor, rho: torch.Tensor, x: torch.Tensor, unc: torch.Tensor, what: str,
                   stats: Stats, exclude: torch.Tensor | None = None) -> None:
    """The stored bf16 value and int8 correction against the reference master weight x (float64)."""
    assert p.dtype == torch.bfloat16 and rho.dtype == torch.int8, f"{what}: dtypes {p.dtype}, {rho.dtype}"
    keep = torch.ones_like(x, dtype=torch.bool) if exclude is None else ~exclude
    p64, r = p.reshape(-1).double()[keep], rho.reshape(-1).long()[keep]
    x, unc = x[keep], unc[keep]
    assert torch.isfinite(x).all() and torch.isfinite(p64).all(), f"{what}: not finite"
    # bf16 part: the nearest bf16 of x, except where x is within its uncertainty of a bf16 midpoint
    ref_p = bf16_rne(x)
    lo_p, hi_p = bf16_rne(x - unc), bf16_rne(x + unc)
    bad = (p64 < lo_p) | (p64 > hi_p)
    assert not bad.any(), f"{what}: bf16 value {p64[bad][:4].tolist()} is not a rounding of {x[bad][:4].tolist()}"
    stats.add(f"{what}.bf16", x.numel(), int((p64 != ref_p).sum()))
    # the correction: one ρ step is 2^ℓ/127 ≈ 2^-15·|x|, only ~2^8 fp32 ulps of x, so the optimizer's fp32 x
    # lands on the other side of a ρ boundary for a fraction of a percent of the elements (more for x near
    # 0, where x's rounding error is that of the larger terms it came from). Those are counted, not
    # limited; what is asserted is the decoded master weight, within the codec's bound ULP(p)/(4·127) =
    # 2^ℓ/254 of the reference (plus x's uncertainty): a wrong or missing correction exceeds it.
    same = p64 == ref_p
    stats.add(f"{what}.ecc", int(same.sum()), int((same & (r != ecc_code_of(x, p64))).sum()), limited=False)
    xh = p64 + r.double() / 127 * torch.exp2(_bf16_exponent(p64) - 8)
    bound = torch.exp2(_bf16_exponent(p64) - 8) / 254 * (1 + 1e-9) + unc
    err = (xh - x).abs()
    assert (err <= bound).all(), f"{what}: decoded master off by {(err / bound).max().item():.3f}x the ECC bound"


# ==========================================================================================================
# float64 reference updates (ALGORITHMS.md): (state before, g, hyper-parameters, t) -> new values, the sum
# of |terms| of each (its fp32 uncertainty is UNC_REL times that), and elements too ill-conditioned to compare
# ==========================================================================================================
Ref = Callable[[dict, torch.Tensor, dict, int], tuple[dict, dict, torch.Tensor | None]]


def ref_adamw8bit(x, g, hp, t):
    """bitsandbytes 8-bit AdamW: Adam step from the unquantized moments, then p ·= 1 - lr·wd; an element
    with a non-finite gradient keeps p and restarts m, v at 0."""
    (b1, b2), lr, eps, wd = hp["betas"], hp["lr"], hp["eps"], hp["weight_decay"]
    finite = g.abs() <= FP32_MAX
    g = torch.where(finite, g, 0.0)
    m = torch.where(finite, b1 * x["m"] + (1 - b1) * g, 0.0)
    v = torch.where(finite, b2 * x["v"] + (1 - b2) * g * g, 0.0)
    den = v.sqrt() / math.sqrt(1 - b2**t) + eps
    p = torch.where(finite, (x["p"] - lr / (1 - b1**t) * m / den) * (1 - lr * wd), x["p"])
    mag = {"m": b1 * x["m"].abs() + (1 - b1) * g.abs(), "v": b2 * x["v"] + (1 - b2) * g * g}
    mag["p"] = x["p"].abs() + lr / (1 - b1**t) * mag["m"] / den  # m's own uncertainty carried into p
    return {"p": p, "m": m, "v": v}, mag, None


def ref_adamw_decay_first(x, g, hp, t):
    """torchao / torch AdamW order: p ·= 1 - lr·wd, then the Adam step (AdamW4bit, FlashAdamW)."""
    (b1, b2), lr, eps, wd = hp["betas"], hp["lr"], hp["eps"], hp["weight_decay"]
    m = b1 * x["m"] + (1 - b1) * g
    v = b2 * x["v"] + (1 - b2) * g * g
    den = v.sqrt() / math.sqrt(1 - b2**t) + eps
    p = x["p"] * (1 - lr * wd) - lr / (1 - b1**t) * m / den
    mag = {"m": b1 * x["m"].abs() + (1 - b1) * g.abs(), "v": b2 * x["v"] + (1 - b2) * g * g}
    mag["p"] = x["p"].abs() + lr / (1 - b1**t) * mag["m"] / den
    return {"p": p, "m": m, "v": v}, mag, None


def ref_flash_adam(x, g, hp, t):
    """FlashAdam: L2 decay folded into the gradient (g += wd·θ), no decoupled decay."""
    (b1, b2), lr, eps, wd = hp["betas"], hp["lr"], hp["eps"], hp["weight_decay"]
    ga = g.abs() + wd * x["p"].abs()
    g = g + wd * x["p"]
    m = b1 * x["m"] + (1 - b1) * g
    v = b2 * x["v"] + (1 - b2) * g * g
    den = v.sqrt() / math.sqrt(1 - b2**t) + eps
    mag = {"m": b1 * x["m"].abs() + (1 - b1) * ga, "v": b2 * x["v"] + (1 - b2) * ga * ga}
    mag["p"] = x["p"].abs() + lr / (1 - b1**t) * mag["m"] / den
    return {"p": x["p"] - lr / (1 - b1**t) * m / den, "m": m, "v": v}, mag, None


def ref_flash_sgd(x, g, hp, t):
    """FlashSGD: g += wd·θ; m = μm + (1 - dampening)g (dampening from the first step); θ -= lr·(g + μm)
    with Nesterov, else θ -= lr·m."""
    lr, mu, damp, wd = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
    ga = g.abs() + wd * x["p"].abs()
    g = g + wd * x["p"]
    m = mu * x["m"] + (1 - damp) * g
    mm = mu * x["m"].abs() + abs(1 - damp) * ga
    d, dm = (g + mu * m, ga + mu * mm) if hp["nesterov"] else (m, mm)
    return {"p": x["p"] - lr * d, "m": m}, {"m": mm, "p": x["p"].abs() + lr * dm}, None


def ref_flash_lion(x, g, hp, t):
    """FlashLion: u = sign(β1·m + (1-β1)·g) (sign(0) = 0); m = β2·m + (1-β2)·g; θ ·= 1 - lr·wd; θ -= lr·u.
    Elements where β1·m + (1-β1)·g is within fp32 rounding of 0 may take either sign: not compared."""
    (b1, b2), lr, wd = hp["betas"], hp["lr"], hp["weight_decay"]
    c = b1 * x["m"] + (1 - b1) * g
    fragile = c.abs() <= UNC_REL * (b1 * x["m"].abs() + (1 - b1) * g.abs())
    m = b2 * x["m"] + (1 - b2) * g
    p = x["p"] * (1 - lr * wd) - lr * torch.sign(c)
    return {"p": p, "m": m}, {"m": b2 * x["m"].abs() + (1 - b2) * g.abs(), "p": x["p"].abs() + lr}, fragile


# ==========================================================================================================
# The table of specs with compressed storage
# ==========================================================================================================
@dataclass(frozen=True)
class SpecEntry:
    cls: str
    counterpart: str | None  # fp32 class in optgen.optim tracked in the regression test
    ref: Ref | None
    kwargs: dict[str, Any]  # hyper-parameters of the step test
    states: dict[str, BlockCodec]  # the main layout's quantized states
    param_dtype: torch.dtype = torch.float32
    param_codec: str = "native"  # or "bf16+ecc8"
    reg_kwargs: dict[str, Any] = field(default_factory=dict)  # regression: shared by both optimizers
    why_no_ref: str = ""
    known_gap: str = ""  # the regression test's 1% is known not to hold: why (the test then xfails, strictly)
    big: int = 5000  # a quantized tensor's size: a partial last block, where the formats allow one

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Three tensors: a 2-D one of whole blocks, ``big`` and a small one (fp32 states)."""
        return [(64, 96), (self.big,), (100,)]

    def __str__(self) -> str:
        return self.cls


_ADAM_STEP = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
_FLASH_STATES = {"m": Q8Softsign(), "v": Q8Sqrt()}
SPECS = [
    SpecEntry("AdamW8bit", "AdamW", ref_adamw8bit, _ADAM_STEP,
              {"m": Q8Dynamic(signed=True), "v": Q8Dynamic(signed=False)}, reg_kwargs={"lr": 1e-2}),
    SpecEntry("AdamW4bit", "AdamW", ref_adamw_decay_first, _ADAM_STEP,
              {"m": Q4(signed=True), "v": Q4(signed=False)}, reg_kwargs={"lr": 1e-2},
              big=5120,  # torchao quantizes whole blocks only: 5000 elements keep fp32 states
              known_gap="4-bit states (torchao's format, reproduced step for step by the reference test) end "
                        "37-47% above AdamW here (seeds 123, 1, 2; 13-110% at other lr/noise); simulated "
                        "in plain PyTorch, the 4-bit m alone costs +40%, the 4-bit v alone +12%"),
    SpecEntry("FlashAdamW", "AdamW", ref_adamw_decay_first, _ADAM_STEP, _FLASH_STATES,
              torch.bfloat16, "bf16+ecc8", reg_kwargs={"lr": 1e-2}),
    SpecEntry("FlashAdam", "Adam", ref_flash_adam, _ADAM_STEP, _FLASH_STATES,
              torch.bfloat16, "bf16+ecc8", reg_kwargs={"lr": 1e-2, "weight_decay": 1e-2}),
    SpecEntry("FlashSGD", "SGD", ref_flash_sgd,
              {"lr": 5e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1, "nesterov": False},
              {"m": Q8Softsign()}, torch.bfloat16, "bf16+ecc8",
              reg_kwargs={"lr": 5e-2, "momentum": 0.9}),  # dampening 0: torch's first step is then the same
    SpecEntry("FlashLion", "Lion", ref_flash_lion, {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
              {"m": Q8Softsign()}, torch.bfloat16, "bf16+ecc8", reg_kwargs={"lr": 1e-3}),
    SpecEntry("StochasticAdamW", None, None, {}, {}, torch.bfloat16, "bf16_sr",
              why_no_ref="stochastic rounding: no float64 reference written here yet"),
    SpecEntry("Lamb16", None, None, {}, {"m": Fp8Norm(torch.float8_e4m3fn), "v": Fp8Norm(torch.float8_e5m2)},
              why_no_ref="whole-tensor fp8 scales (3 phases): no float64 reference written here yet"),
]


def spec_class(entry: SpecEntry) -> type:
    cls = getattr(optim, entry.cls, None)
    if cls is None:
        pytest.skip(f"{entry.cls} is not in optgen.optim yet (its spec is not built)")
    return cls


def need_ref(entry: SpecEntry) -> None:
    if entry.ref is None:
        pytest.skip(f"{entry.cls}: {entry.why_no_ref}")


# ==========================================================================================================
# Reading an optimizer's state in float64, and checking a step
# ==========================================================================================================
def _side_key(state_keys, name: str) -> str:
    keys = [k for k in state_keys if k.startswith(name + "_")]
    assert len(keys) == 1, f"expected one side buffer of state '{name}', found {keys}"
    return keys[0]


def ecc_key(opt, p: torch.Tensor, entry: SpecEntry) -> str:
    """The state key of the parameter's int8 correction: the variant's one buffer that is not a state's."""
    keys = [b.key for b in opt.variants[opt.variant_of(p)].buffers if b.key is not None
            and b.key not in entry.states and not any(b.key.startswith(n + "_") for n in entry.states)]
    assert len(keys) == 1, f"{entry.cls}: cannot tell the ECC buffer among {keys}"
    return keys[0]


def decode_all(opt, p: torch.Tensor, entry: SpecEntry) -> dict[str, torch.Tensor]:
    """The optimizer's current master weight and states as flat float64 (initial values before step 1)."""
    n = p.numel()
    state = opt.state[p]
    out = {}
    if entry.param_codec == "bf16+ecc8":
        rho = state[ecc_key(opt, p, entry)] if state else torch.zeros(n, dtype=torch.int8)
        out["p"] = decode_bf16_ecc(p.detach(), rho)
    else:
        out["p"] = p.detach().reshape(-1).double()
    for name, codec in entry.states.items():
        if not state:  # every state starts as the encoding of 0 (q4_linear has no 0: it decodes to 1e-12/16)
            out[name] = torch.zeros(n, dtype=F64) if opt.variant_of(p) == "fp32" else codec.initial(n)
        elif opt.variant_of(p) == "fp32":
            assert state[name].dtype == torch.float32
            out[name] = state[name].reshape(-1).double()
        else:
            out[name] = codec.decode(state[name], state[_side_key(state, name)], n)
    return out


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL) -> None:
    """max|ours - ref| <= rel·max|ref|; everything finite (a NaN never passes)."""
    assert torch.isfinite(ours).all(), f"{what}: not finite"
    assert torch.isfinite(ref).all(), f"{what}: reference not finite"
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: all-zero reference"
    err = (ours.double() - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g}·max|ref| = {rel * scale:.3e}"


def check_step(opt, p: torch.Tensor, before: dict, g: torch.Tensor, t: int, entry: SpecEntry, what: str,
               stats: Stats) -> None:
    """Run the float64 reference from ``before`` and compare with what the optimizer stored in this step."""
    hp = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
    new, mag, fragile = entry.ref(before, g.reshape(-1).double(), hp, t)
    state = opt.state[p]
    assert float(state["step"]) == t
    if fragile is not None:
        stats.add(f"{what}:fragile", p.numel(), int(fragile.sum()))
    keep = slice(None) if fragile is None else ~fragile
    unc_p = UNC_REL * mag["p"]
    if entry.param_codec == "bf16+ecc8":
        check_bf16_ecc(p.detach(), state[ecc_key(opt, p, entry)], new["p"], unc_p, f"{what}.p", stats,
                       exclude=fragile)
    else:
        assert p.dtype == torch.float32
        assert_rel(p.detach().reshape(-1)[keep], new["p"][keep], f"{what}.p")
    for name, codec in entry.states.items():
        unc = UNC_REL * mag[name]
        if opt.variant_of(p) == "fp32":
            stored = state[name]
            assert stored.dtype == torch.float32, f"{what}.{name}: {stored.dtype}"
            err = (stored.reshape(-1).double() - new[name]).abs()
            bound = unc + ULP32 * new[name].abs()
            assert torch.isfinite(stored).all() and (err <= bound).all(), \
                f"{what}.{name} (fp32 state): off by {(err / bound).max().item():.2f}x fp32 rounding"
        else:
            codec.check(state[name], state[_side_key(state, name)], new[name], unc, f"{what}.{name}", stats)


def make_params(gen: torch.Generator, shapes, dtype: torch.dtype) -> list[torch.Tensor]:
    """Fresh random leaves of typical weight scale (never zeros)."""
    return [(0.1 * torch.randn(s, generator=gen)).to(dtype).requires_grad_() for s in shapes]


def fresh_grad(gen: torch.Generator, p: torch.Tensor) -> torch.Tensor:
    """Heavy-ish tailed gradient with a per-step scale, so block maxima and code ranges vary; ~1% of the
    elements are 1e-3..1e-8 times smaller (the bottom of the maps, the signed map's sign rule) and ~0.2%
    are 30x outliers (blocks whose other elements are small relative to their scale). Never zero."""
    scale = math.exp(0.7 * torch.randn((), generator=gen).item())
    g = torch.randn(p.shape, generator=gen) * torch.exp(0.5 * torch.randn(p.shape, generator=gen)) * scale
    u = torch.rand(p.shape, generator=gen)
    tiny = torch.pow(10.0, -3 - 5 * torch.rand(p.shape, generator=gen))
    g = torch.where(u < 0.01, g * tiny, torch.where(u > 0.998, 30 * g, g))
    return g.to(p.dtype)


def run_reference_trace(entry: SpecEntry, backend: str, shapes, steps: int, seed: int,
                        grads: Callable | None = None) -> Stats:
    cls = spec_class(entry)
    gen = torch.Generator().manual_seed(seed)
    params = make_params(gen, shapes, entry.param_dtype)
    opt = cls(params, backend=backend, **entry.kwargs)
    stats = Stats()
    for t in range(1, steps + 1):
        before = {}
        for p in params:
            p.grad = fresh_grad(gen, p) if grads is None else grads(gen, p, t)
            before[p] = decode_all(opt, p, entry)
        opt.step()
        for i, p in enumerate(params):
            check_step(opt, p, before[p], p.grad, t, entry, f"{entry.cls}[{backend}] step {t} tensor {i}",
                       stats)
    for p in params:  # the layout chosen: quantized for the large tensors, fp32 states for the small one
        small = p.numel() < 4096 and "fp32" in cls.variants
        assert opt.variant_of(p) == ("fp32" if small else "")
    return stats


def assert_few_ties(stats: Stats, label: str) -> None:
    print(f"\n{label}: near-ties (codes differing by one step) {stats.summary()}")
    for what, n in stats.checked.items():
        if what in stats.unlimited:
            continue
        limit = TIE_FRACTION * n
        assert stats.ties[what] <= limit, f"{label} {what}: {stats.ties[what]} of {n} codes differ (> {limit:g})"


# ==========================================================================================================
# 1. every step against the float64 reference, both backends
# ==========================================================================================================
@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_step_matches_float64_reference_eager(entry):
    need_ref(entry)
    t0 = time.perf_counter()
    stats = run_reference_trace(entry, "eager", entry.shapes, STEPS, seed=1)
    assert_few_ties(stats, f"{entry.cls} eager ({time.perf_counter() - t0:.1f}s)")


@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_step_matches_float64_reference_triton(entry):
    need_ref(entry)
    cls = spec_class(entry)
    if cls.variants[""].triton_step is None:
        pytest.skip(f"{entry.cls} has no Triton kernel")
    need_interpreter()
    t0 = time.perf_counter()
    # the interpreter is slow: one tensor that is not a multiple of the blocks (where allowed), the small fp32 one
    stats = run_reference_trace(entry, "triton", entry.shapes[1:], STEPS, seed=2)
    assert_few_ties(stats, f"{entry.cls} triton ({time.perf_counter() - t0:.1f}s)")


# ==========================================================================================================
# 2. the regression problem: track the fp32 counterpart
# ==========================================================================================================
def _regression_data():
    gen = torch.Generator().manual_seed(123)
    d_in, d_teacher, d_out, n = 40, 24, 4, 4096  # 16384 targets for 5764 weights: no interpolation
    X = torch.randn(n, d_in, generator=gen)
    T1 = torch.randn(d_teacher, d_in, generator=gen) / math.sqrt(d_in)
    T2 = torch.randn(d_out, d_teacher, generator=gen) / math.sqrt(d_teacher)
    Y = torch.tanh(X @ T1.T) @ T2.T + 0.2 * torch.randn(n, d_out, generator=gen)
    hidden = 128  # W1: 128 x 40 = 5120 elements (quantized), W2 512, biases: fp32 states
    init = [torch.randn(hidden, d_in, generator=gen) / math.sqrt(d_in), 0.1 * torch.randn(hidden, generator=gen),
            torch.randn(d_out, hidden, generator=gen) / math.sqrt(hidden), 0.1 * torch.randn(d_out, generator=gen)]
    return X, Y, init


def _loss(params, X, Y) -> torch.Tensor:
    W1, b1, W2, b2 = (q.float() for q in params)
    return ((torch.tanh(X @ W1.T + b1) @ W2.T + b2 - Y) ** 2).mean()


def _train(cls, dtype, kwargs, X, Y, init, steps=200) -> tuple[float, float, Any, list]:
    params = [w.to(dtype, copy=True).requires_grad_() for w in init]
    opt = cls(params, **kwargs)
    first = _loss(params, X, Y).item()
    for _ in range(steps):
        opt.zero_grad()
        _loss(params, X, Y).backward()
        opt.step()
    with torch.no_grad():
        return first, _loss(params, X, Y).item(), opt, params


@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_tracks_fp32_counterpart(entry):
    cls = spec_class(entry)
    if entry.counterpart is None:
        pytest.skip(f"{entry.cls}: no fp32 counterpart to track in the issue's list")
    ref_cls = getattr(optim, entry.counterpart)
    X, Y, init = _regression_data()
    init = [w.to(entry.param_dtype).float() for w in init]  # the same starting point for both
    first, loss_q, opt, params = _train(cls, entry.param_dtype, {**entry.reg_kwargs, "backend": "eager"}, X, Y, init)
    _, loss_ref, _, _ = _train(ref_cls, torch.float32, entry.reg_kwargs, X, Y, init)
    W1 = params[0]
    assert W1.numel() >= 4096 and opt.variant_of(W1) == ""
    for name, codec in entry.states.items():  # W1's states really are quantized
        assert opt.state[W1][name].dtype == codec.code_dtype
    if "fp32" in cls.variants:
        assert opt.variant_of(params[1]) == "fp32"  # b1: 128 elements
    print(f"\n{entry.cls} vs {entry.counterpart}: loss {first:.5f} -> {loss_q:.6f} vs {loss_ref:.6f} "
          f"(ratio {loss_q / loss_ref:.5f})")
    assert math.isfinite(loss_q) and math.isfinite(loss_ref)
    assert loss_ref < 0.5 * first, "the problem must actually be learned for the comparison to mean anything"
    if entry.known_gap:
        assert abs(loss_q - loss_ref) > 0.01 * loss_ref, f"{entry.cls} now tracks within 1%: drop known_gap"
        pytest.xfail(f"{entry.cls}: loss ratio {loss_q / loss_ref:.4f}: {entry.known_gap}")
    assert abs(loss_q - loss_ref) <= 0.01 * loss_ref


# ==========================================================================================================
# 3. bytes per parameter: held == claimed == `optgen list`
# ==========================================================================================================
def _listed_bytes(capsys) -> dict[str, float]:
    from optgen.cli import main

    capsys.readouterr()
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["spec", "class", "bytes/param"], header
    return {row.split()[1]: row.split()[2] for row in lines[1:]}


@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_bytes_per_parameter(entry, capsys):
    cls = spec_class(entry)
    gen = torch.Generator().manual_seed(3)
    (p,) = make_params(gen, [(64, 128)], entry.param_dtype)  # 8192: a multiple of every block, no padding
    opt = cls([p], backend="eager", **entry.kwargs)
    p.grad = fresh_grad(gen, p)
    opt.step()
    assert opt.variant_of(p) == ""
    scalars = {b.key for b in cls.variants[""].buffers if b.shape == "scalar"}
    state = opt.state[p]
    for k in scalars:  # per-tensor scalars (e.g. fp8 scales): a constant per tensor, 0 bytes per element
        assert state[k].dim() == 0
    state_bytes = sum(v.nbytes for k, v in state.items() if k != "step" and k not in scalars)
    held = (state_bytes + p.nbytes + p.grad.nbytes) / p.numel()
    claimed = cls.bytes_per_element(p.dtype, p.grad.dtype)
    assert held == claimed, f"{entry.cls}: holds {held} bytes per element, bytes_per_element says {claimed}"
    # `optgen list` counts a parameter stored in its own dtype as fp32 where the format takes fp32 (else at its
    # 16-bit size), and a native gradient in the parameter's dtype
    listed_expected = held
    if next(b for b in cls.buffers if b.arg == "param").dtype == "param" and "float32" in cls.param_dtypes:
        listed_expected += (4 - p.element_size()) + (4 - p.grad.element_size())
    listed = _listed_bytes(capsys)
    assert entry.cls in listed, f"`optgen list` has no row for {entry.cls}"
    assert float(listed[entry.cls]) == listed_expected, (
        f"`optgen list` prints {listed[entry.cls]} bytes/param for {entry.cls}; the optimizer holds "
        f"{listed_expected!r} per element (fp32 parameters and gradients where native)")


# ==========================================================================================================
# 4. small tensors keep fp32 states; the threshold and the mark are respected
# ==========================================================================================================
def _state_dtypes(opt, p) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in opt.state[p].items() if k != "step"}


@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_small_tensors_keep_fp32_states(entry):
    cls = spec_class(entry)
    if "fp32" not in cls.variants:
        pytest.skip(f"{entry.cls} has no fp32-state layout")
    gen = torch.Generator().manual_seed(4)
    fp32_keys = {b.key for b in cls.variants["fp32"].buffers if b.key is not None}
    main_keys = {b.key for b in cls.variants[""].buffers if b.key is not None}

    def assert_fp32(opt, p, what):
        assert opt.variant_of(p) == "fp32", what
        assert set(_state_dtypes(opt, p)) == fp32_keys, what
        for name in entry.states:
            assert opt.state[p][name].dtype == torch.float32, what
            assert opt.state[p][name].shape == p.shape, what

    def assert_quantized(opt, p, what):
        assert opt.variant_of(p) == "", what
        assert set(_state_dtypes(opt, p)) == main_keys, what
        for name, codec in entry.states.items():
            assert opt.state[p][name].dtype == codec.code_dtype, what

    def step(opt, params):
        for q in params:
            q.grad = fresh_grad(gen, q)
        opt.step()

    below, at = make_params(gen, [(4095,), (64, 64)], entry.param_dtype)  # 4095 and 4096 elements
    marked, small = make_params(gen, [(64, 128), (200,)], entry.param_dtype)
    setattr(marked, FP32_STATE_ATTR, True)
    opt = cls([below, at, marked, small], backend="eager", **entry.kwargs)
    assert opt.min_quantized_size == 4096
    step(opt, [below, at, marked, small])
    assert_fp32(opt, below, "4095 elements (< 4096)")
    assert_quantized(opt, at, "4096 elements")
    assert_fp32(opt, marked, "optgen_fp32_state = True on a large parameter")
    assert_fp32(opt, small, "200 elements")
    # a lower threshold
    (small2,) = make_params(gen, [(256,)], entry.param_dtype)
    (tiny,) = make_params(gen, [(99,)], entry.param_dtype)
    opt2 = cls([small2, tiny], backend="eager", min_quantized_size=100, **entry.kwargs)
    step(opt2, [small2, tiny])
    assert_quantized(opt2, small2, "256 elements with min_quantized_size=100")
    assert_fp32(opt2, tiny, "99 elements with min_quantized_size=100")
    if cls.quantized_multiple > 1:  # whole blocks only (AdamW4bit, as torchao): a partial one keeps fp32 states
        (partial,) = make_params(gen, [(4096 + cls.quantized_multiple // 2,)], entry.param_dtype)
        opt3 = cls([partial], backend="eager", **entry.kwargs)
        step(opt3, [partial])
        assert_fp32(opt3, partial, f"{partial.numel()} elements, not a multiple of {cls.quantized_multiple}")


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_fp32_variant_matches_float64(entry, backend):
    """The fp32-state layout over 30 steps against an independent float64 run (not re-synced) of the
    spec's own update order (for AdamW8bit: the step, then the decay, as bitsandbytes)."""
    if backend == "triton":
        need_interpreter()
    cls = spec_class(entry)
    need_ref(entry)
    if "fp32" not in cls.variants:
        pytest.skip(f"{entry.cls} has no fp32-state layout")
    if entry.param_codec != "native":
        pytest.skip(f"{entry.cls}: a {entry.param_codec} parameter is re-quantized every step; "
                    "test_step_matches_float64_reference checks it step by step")
    gen = torch.Generator().manual_seed(5)
    small, marked = make_params(gen, [(4095,), (5000,)], torch.float32)
    setattr(marked, FP32_STATE_ATTR, True)
    opt = cls([small, marked], backend=backend, **entry.kwargs)
    ref = {p: {"p": p.detach().reshape(-1).double(), **{k: torch.zeros(p.numel(), dtype=F64) for k in entry.states}}
           for p in (small, marked)}
    other_order = ref_adamw_decay_first if entry.ref is ref_adamw8bit else None
    max_order_gap = 0.0
    hp = opt.param_groups[0]
    for t in range(1, 31):
        for p in (small, marked):
            p.grad = fresh_grad(gen, p)
        opt.step()
        for i, p in enumerate((small, marked)):
            g = p.grad.reshape(-1).double()
            if other_order is not None:  # how far the other decay order would be: must exceed the tolerance
                alt, _, _ = other_order(ref[p], g, hp, t)
            ref[p], _, _ = entry.ref(ref[p], g, hp, t)
            assert opt.variant_of(p) == "fp32"
            what = f"{entry.cls}[{backend}] fp32 layout step {t} tensor {i}"
            assert_rel(p.detach().reshape(-1), ref[p]["p"], f"{what}.p")
            for k in entry.states:
                assert_rel(opt.state[p][k].reshape(-1), ref[p][k], f"{what}.{k}")
            if other_order is not None:
                gap = (alt["p"] - ref[p]["p"]).abs().max().item() / ref[p]["p"].abs().max().item()
                max_order_gap = max(max_order_gap, gap)
    if other_order is not None:
        assert max_order_gap > 10 * REL, f"decay order not distinguishable here ({max_order_gap:.2e})"


# ==========================================================================================================
# 5. state_dict round trip
# ==========================================================================================================
@pytest.mark.parametrize("entry", SPECS, ids=str)
def test_state_dict_round_trip(entry):
    cls = spec_class(entry)
    gen = torch.Generator().manual_seed(6)
    a = make_params(gen, entry.shapes, entry.param_dtype)
    opt_a = cls(a, backend="eager", **entry.kwargs)
    for _ in range(3):
        for p in a:
            p.grad = fresh_grad(gen, p)
        opt_a.step()
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = cls(b, backend="eager", **entry.kwargs)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for pa, pb in zip(a, b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for k in sa:
            assert sb[k].dtype == sa[k].dtype, f"{k}: loaded as {sb[k].dtype}, saved {sa[k].dtype}"
            assert sb[k].shape == sa[k].shape and torch.equal(sb[k], sa[k]), k
            assert sb[k].data_ptr() != sa[k].data_ptr()
        if opt_b.variant_of(pb) == "":
            for name, codec in entry.states.items():
                assert sb[name].dtype == codec.code_dtype
                assert sb[_side_key(sb, name)].dtype == codec.scale_dtype
    quantized = [pb for pb in b if opt_b.variant_of(pb) == ""]
    assert len(quantized) == (2 if "fp32" in cls.variants else 3)
    for _ in range(3):
        for pa, pb in zip(a, b):
            pa.grad = fresh_grad(gen, pa)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for k in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k]), k
            assert opt_a.state[pa][k].dtype == opt_b.state[pb][k].dtype
    assert float(opt_b.state[b[0]]["step"]) == 6


# ==========================================================================================================
# 6. AdamW8bit: a non-finite gradient element keeps its parameter and restarts its moments at 0
# ==========================================================================================================
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_nonfinite_gradient_adamw8bit(backend):
    if backend == "triton":
        need_interpreter()
    entry = next(e for e in SPECS if e.cls == "AdamW8bit")
    cls = spec_class(entry)
    gen = torch.Generator().manual_seed(7)
    (p,) = make_params(gen, [(5000,)], torch.float32)
    opt = cls([p], backend=backend, **entry.kwargs)
    for _ in range(3):
        p.grad = fresh_grad(gen, p)
        opt.step()
    before = decode_all(opt, p, entry)
    assert (before["m"] != 0).all() and (before["v"] != 0).all()
    bad = torch.zeros(5000, dtype=torch.bool)
    bad[torch.randperm(5000, generator=gen)[:30]] = True
    g = fresh_grad(gen, p)
    idx = bad.nonzero().reshape(-1)
    g[idx[:10]] = float("inf")
    g[idx[10:20]] = float("-inf")
    g[idx[20:]] = float("nan")
    p_before = p.detach().clone()
    p.grad = g
    opt.step()
    assert torch.equal(p.detach()[bad], p_before[bad]), "a parameter with a non-finite gradient changed"
    assert torch.isfinite(p).all() and (p.detach()[~bad] != p_before[~bad]).all()
    after = decode_all(opt, p, entry)
    assert (after["m"][bad] == 0).all() and (after["v"][bad] == 0).all(), "moments not restarted at 0"
    for name in ("m", "v"):  # the block scales stay finite: the rest of each block is unharmed
        assert torch.isfinite(opt.state[p][f"{name}_absmax"]).all()
    stats = Stats()
    check_step(opt, p, before, g, 4, entry, f"AdamW8bit[{backend}] non-finite", stats)  # the rest is exact
    assert_few_ties(stats, f"AdamW8bit {backend} non-finite step")
    # the next (finite) step starts the restarted moments from 0
    before = decode_all(opt, p, entry)
    p.grad = fresh_grad(gen, p)
    opt.step()
    check_step(opt, p, before, p.grad, 5, entry, f"AdamW8bit[{backend}] after non-finite", stats)
    m_new = decode_all(opt, p, entry)["m"]
    assert (m_new[bad] != 0).all()


# ==========================================================================================================
# 7. FlashSGD without momentum ignores dampening, as FlashOptim and torch.optim.SGD do
# ==========================================================================================================
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_flash_sgd_without_momentum_ignores_dampening(backend):
    """momentum=0: FlashOptim steps p -= lr·(g + wd·p) whatever the dampening (it keeps no momentum buffer);
    a dampening of 0.5 must not halve the step. Same bits as dampening 0, and the step of a float64 transcription
    to within the 24-bit master weight's precision."""
    if backend == "triton":
        need_interpreter()
    gen = torch.Generator().manual_seed(11)
    (p0,) = make_params(gen, [(5000,)], torch.bfloat16)
    runs = {}
    for damp in (0.0, 0.5):
        p = p0.detach().clone().requires_grad_()
        opt = optim.FlashSGD([p], lr=0.05, momentum=0.0, dampening=damp, weight_decay=0.1, backend=backend)
        g_gen = torch.Generator().manual_seed(12)
        ref = p0.detach().double()
        for _ in range(3):
            p.grad = fresh_grad(g_gen, p).to(torch.bfloat16)
            ref = ref - 0.05 * (p.grad.double() + 0.1 * ref)
            opt.step()
        runs[damp] = opt.master_weights()[0].double()
        assert (runs[damp] - ref).abs().max() <= 2e-5 * ref.abs().max(), damp
    assert torch.equal(runs[0.0], runs[0.5])


# ==========================================================================================================
# 8. Flash specs on fp16 parameters: fp16 + int8 correction, as FlashOptim
# ==========================================================================================================
FLASH = ["FlashAdamW", "FlashAdam", "FlashSGD", "FlashLion"]


@pytest.mark.parametrize("name", FLASH)
def test_flash_fp16_parameters_keep_a_correction_term(name):
    """FlashOptim splits an fp16 parameter as it does a bf16 one (fp16 value + int8 correction, companded
    states): steps below half an fp16 ulp still move the weights (weights in [1, 1.5), ulp 2^-10, lr 2e-4). The
    stored fp16 value is within half an ulp of the master weight, and both backends store the same bits."""
    need_interpreter()
    gen = torch.Generator().manual_seed(13)
    w0 = (1 + 0.5 * torch.rand(5000, generator=gen)).half()
    runs = {}
    for backend in ("eager", "triton"):
        p = w0.clone().requires_grad_()
        opt = getattr(optim, name)([p], lr=2e-4, backend=backend)
        g_gen = torch.Generator().manual_seed(14)
        for _ in range(12):
            p.grad = (1 + 0.1 * torch.rand(5000, generator=g_gen)).half()
            opt.step()
        assert opt.variant_of(p) == "" and opt.state[p]["p_ecc"].dtype == torch.uint8  # int8 codes, fp16's form
        master, stored = opt.master_weights()[0], p.detach().float()
        half_ulp = torch.exp2(torch.floor(torch.log2(stored.abs())) - 11)  # of the fp16 value (10 mantissa bits)
        assert ((master - stored).abs() <= half_ulp).all()
        assert (master < w0.float()).all()  # every weight moved down, by about 12 steps of 2e-4
        runs[backend] = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    for a, b in zip(*runs.values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_flash_adamw_fp16_tracks_float64_adamw(backend):
    """FlashAdamW on fp16 parameters against float64 AdamW (no quantization): 20 steps of lr 2e-4 move each
    weight by ~4e-3 (four fp16 ulps); the master weight follows within 3 % of that movement (the companded
    8-bit moments' error; 1.6 % measured)."""
    if backend == "triton":
        need_interpreter()
    gen = torch.Generator().manual_seed(15)
    w0 = (1 + 0.5 * torch.rand(5000, generator=gen)).half()
    p = w0.clone().requires_grad_()
    lr, wd, (b1, b2), eps = 2e-4, 0.01, (0.9, 0.999), 1e-8
    opt = optim.FlashAdamW([p], lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps, backend=backend)
    ref, m, v = w0.double(), torch.zeros(5000, dtype=F64), torch.zeros(5000, dtype=F64)
    for t in range(1, 21):
        p.grad = (1 + 0.1 * torch.rand(5000, generator=gen)).half()
        opt.step()
        g = p.grad.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    moved = (ref - w0.double()).abs().max()
    assert (opt.master_weights()[0].double() - ref).abs().max() <= 0.03 * moved


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_flash_correction_made_for_bf16_is_refused_for_fp16(backend):
    """A correction term is read in its parameter's format: a bf16 parameter cast to fp16 between steps, or a bf16
    model's checkpoint loaded into the model cast to fp16, is refused before anything changes (it was read in
    fp16's ulp, 8x finer, moving the master weights silently)."""
    if backend == "triton":
        need_interpreter()
    gen = torch.Generator().manual_seed(16)
    (p,) = make_params(gen, [(8192,)], torch.bfloat16)
    opt = optim.FlashAdamW([p], lr=1e-4, backend=backend)
    for _ in range(3):
        p.grad = fresh_grad(gen, p).to(torch.bfloat16)
        opt.step()
    saved = opt.state_dict()
    before = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    p.data = p.data.to(torch.float16)
    p.grad = fresh_grad(gen, p).to(torch.float16)
    with pytest.raises(ValueError, match="p_ecc"):
        opt.step()
    with pytest.raises(ValueError, match="p_ecc"):  # nor is it decoded in the other format
        opt.master_weights()
    after = [p.detach().to(torch.bfloat16)] + list(opt.state[p].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    q = p.detach().clone().requires_grad_()  # the model cast to fp16, and the bf16 model's checkpoint
    fresh = optim.FlashAdamW([q], lr=1e-4, backend=backend)
    with pytest.raises(ValueError, match="p_ecc"):
        fresh.load_state_dict(saved)
    assert not fresh.state
