"""fp8 states scaled by a per-tensor fp32 scalar: ``fp8_e4m3_norm`` and ``fp8_e5m2_norm`` (LAMB16).

The value x is stored as fp8(x / s) with s a per-tensor fp32 scale (buffer suffix "scale", shape "scalar",
initially 1.0) and decodes to fp32(code)·s. Computing s (LAMB16: a clipped norm of the whole updated
tensor) is a whole-tensor reduction that the IR does before the encode; the codec only reads it.

fp32 -> fp8 is done with integer arithmetic on the fp32 bits in PyTorch and under Triton's interpreter (which
casts differently near the subnormal range, so no Triton fp8 cast is used), rounding to nearest, ties to even,
subnormals included. On a GPU that has them (sm_89 and later) the kernel converts with the hardware's own
instructions instead (``cvt.rn.satfinite.e4m3x2.f32`` / ``.e5m2x2``, inline PTX, then e5m2's overflow and both
formats' NaN fixed up to the rules below): the same bits (tests/test_codecs_quant.py checks every sign, exponent
and top 15 mantissa bits on the GPU) for a fraction of the instructions; LAMB16's step took 41 % less time on an
H100 with this and the per-program staging of its scales (benchmarks/RESULTS.md, fifteenth session). Out of
range, it follows PyTorch 2.13's ``.to(torch.float8_e4m3fn)`` /
``.to(torch.float8_e5m2)`` (c10 ``fp8e4m3fn_from_fp32_value`` / ``fp8e5m2_from_fp32_value``; CUDA builds use
``__nv_cvt_float_to_fp8`` with SATFINITE / NOSAT, the same results):
- e4m3fn (bias 7, 3 mantissa bits, no infinity, max 448) saturates: values that round above 448
  (|x| > 464) and ±inf give ±448 (0x7E | sign); NaN gives 0x7F | sign. PyTorch releases before the
  change of April 2026 (pytorch#178817; 2.11 on the CPU) give NaN instead of ±448 there:
  ``fp8_bits(..., saturate=False)`` reproduces that, the codec always saturates.
- e5m2 (bias 15, 2 mantissa bits, IEEE-like, max 57344): values that round above 57344 (|x| >= 61440)
  give ±inf (0x7C | sign), NaN gives 0x7F | sign.
- magnitudes up to half the smallest subnormal (2^-10 for e4m3fn, 2^-17 for e5m2) give ±0.
fp8 -> fp32 is exact (by integer arithmetic, or on the GPU through ``cvt.rn.f16x2.e4m3x2`` / ``.e5m2x2``: every
fp8 value is an fp16 one; the kernel's fp8 pointers are re-typed as uint8, so no fp8 type is touched in Triton).
"""

from __future__ import annotations

from typing import Any

import torch

from optgen.codecs.base import Buffer, Codec

try:  # the module must import without Triton (then only the PyTorch path exists)
    import triton
    import triton.language as tl

    from optgen.codecs.division import nvidia_ptx
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

# per format: (mantissa bits M, exponent bias B, |x| bits from which the result is out of range (480.0,
# 65536.0), the code of an out-of-range finite value or inf (448 saturated, inf))
FORMATS = {
    "e4m3fn": (3, 7, 0x43F00000, 0x7E),
    "e5m2": (2, 15, 0x47800000, 0x7C),
}
TORCH_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


# ----------------------------------------------------------------------------------------------------------
# PyTorch (int32 arithmetic on the bits; no data-dependent branching)
# ----------------------------------------------------------------------------------------------------------
def _encode_bits(x: torch.Tensor, mant: int, bias: int, special: int, over: int) -> torch.Tensor:
    u = x.float().view(torch.int32)
    a = u & 0x7FFFFFFF
    sign = (u >> 24) & 0x80
    # normal range: re-bias the exponent, round the dropped 23-M bits to nearest even (carries may bump
    # the exponent, which is the correct result)
    drop = 23 - mant
    normal = (a + (((bias - 127) << 23) + (1 << (drop - 1)) - 1) + ((a >> drop) & 1)) >> drop
    # subnormal range: round |x| / 2^(1-bias-mant) (= mantissa >> sh) to nearest even
    e = a >> 23
    m = (a & 0x7FFFFF) | 0x800000
    # >= 24-M where used; 25 already gives 0 for any m; the lower clamp only keeps unused lanes defined
    sh = torch.clamp((151 - bias - mant) - e, min=1, max=25)
    q = m >> sh
    rem = m & ((1 << sh) - 1)
    half = 1 << (sh - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(torch.int32)
    sub = torch.where(e == 0, torch.zeros_like(q), q)  # fp32 zeros and subnormals -> 0
    # out of range: NaN stays NaN (0x7F), the rest gives ``over``; the normal path can round up to 0x7F
    # (e4m3fn's NaN) or 0x7C (e5m2's inf) only, which min() turns into ``over``
    big = torch.where(a > 0x7F800000, torch.full_like(a, 0x7F), torch.full_like(a, over))
    min_normal = (128 - bias) << 23
    out = torch.where(a >= special, big, torch.where(a < min_normal, sub, torch.clamp(normal, max=over)))
    return (out | sign).to(torch.uint8)


def _decode_bits(b: torch.Tensor, mant: int, bias: int) -> torch.Tensor:
    b = b.to(torch.int32)
    ebits = 7 - mant
    e = (b >> mant) & ((1 << ebits) - 1)
    m = b & ((1 << mant) - 1)
    # |value| = (e ? 2^M + m : m) · 2^(max(e,1) - bias - M), the power of two built from its bits
    frac = torch.where(e == 0, m, m + (1 << mant)).float()
    p2 = ((torch.clamp(e, min=1) - bias - mant + 127) << 23).view(torch.float32)
    mag = frac * p2
    top = (1 << ebits) - 1
    if mant == 3:  # e4m3fn: only S.1111.111 is NaN, no inf
        mag = torch.where((b & 0x7F) == 0x7F, torch.full_like(mag, float("nan")), mag)
    else:
        special = torch.where(m == 0, torch.full_like(mag, float("inf")), torch.full_like(mag, float("nan")))
        mag = torch.where(e == top, special, mag)
    return (mag.view(torch.int32) | ((b >> 7) * -(2**31))).view(torch.float32)  # the sign bit, -0.0 included


def fp8_bits(x: torch.Tensor, fmt: str, saturate: bool = True) -> torch.Tensor:
    """fp32 -> fp8 bit patterns (uint8), bit-identical to ``x.to(torch.float8_<fmt>).view(torch.uint8)``
    (PyTorch 2.13; ``saturate=False`` gives e4m3fn's older NaN-on-overflow instead)."""
    mant, bias, special, over = FORMATS[fmt]
    return _encode_bits(x, mant, bias, special, over if saturate or fmt != "e4m3fn" else 0x7F)


def fp8_value(bits: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp8 bit patterns (uint8) -> their exact fp32 values."""
    mant, bias, _, _ = FORMATS[fmt]
    return _decode_bits(bits, mant, bias)


def torch_encode(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fmt: str, clip: float | None = None) -> None:
    """codes (fp8, parameter-shaped) := fp8(x / scale), in place; ``scale`` is the 0-d fp32 buffer.

    ``clip`` clamps x / scale to [-clip, clip] before rounding (LAMB16 clamps m / s_m to ±15)."""
    y = x.reshape(-1).float() / scale  # tensor / tensor: correctly rounded everywhere
    bits = fp8_bits(y if clip is None else torch.clamp(y, -clip, clip), fmt)
    codes.view(torch.uint8).copy_(bits.view(codes.shape))


def torch_decode(codes: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    return fp8_value(codes.reshape(-1).view(torch.uint8), fmt) * scale


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def encode_bits(x, MANT: tl.constexpr, BIAS: tl.constexpr, SPECIAL: tl.constexpr, OVER: tl.constexpr):
        """fp32 tile -> fp8 bit patterns (int32 tile in [0, 256)), as ``_encode_bits``."""
        u = x.to(tl.int32, bitcast=True)
        a = u & 0x7FFFFFFF
        sign = (u >> 24) & 0x80
        DROP: tl.constexpr = 23 - MANT
        normal = (a + (((BIAS - 127) << 23) + (1 << (DROP - 1)) - 1) + ((a >> DROP) & 1)) >> DROP
        e = a >> 23
        m = (a & 0x7FFFFF) | 0x800000
        sh = tl.minimum(tl.maximum((151 - BIAS - MANT) - e, 1), 25)
        q = m >> sh
        rem = m & ((1 << sh) - 1)
        half = 1 << (sh - 1)
        q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        sub = tl.where(e == 0, 0, q)
        big = tl.where(a > 0x7F800000, 0x7F, OVER)
        MIN_NORMAL: tl.constexpr = (128 - BIAS) << 23
        out = tl.where(a >= SPECIAL, big, tl.where(a < MIN_NORMAL, sub, tl.minimum(normal, OVER)))
        return out | sign

    @triton.jit
    def decode_bits(b, MANT: tl.constexpr, BIAS: tl.constexpr):
        """fp8 bit patterns (int32 tile) -> exact fp32 values, as ``_decode_bits``."""
        EBITS: tl.constexpr = 7 - MANT
        e = (b >> MANT) & ((1 << EBITS) - 1)
        m = b & ((1 << MANT) - 1)
        frac = tl.where(e == 0, m, m + (1 << MANT)).to(tl.float32)
        p2 = ((tl.maximum(e, 1) - BIAS - MANT + 127) << 23).to(tl.float32, bitcast=True)
        mag = frac * p2
        if MANT == 3:
            mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
        else:
            mag = tl.where(e == (1 << EBITS) - 1, tl.where(m == 0, float("inf"), float("nan")), mag)
        # the sign as a bit: Triton 3.6 computes -x as 0 - x, which loses the sign of -0.0
        return (mag.to(tl.int32, bitcast=True) | ((b >> 7) * -2147483648)).to(tl.float32, bitcast=True)

    @triton.jit
    def convert_bits(x, MANT: tl.constexpr, SPECIAL: tl.constexpr, OVER: tl.constexpr):
        """``encode_bits`` by the GPU's own conversion (``cvt.rn.satfinite``: to nearest, ties to even,
        subnormals included, finite overflow and ±inf to ±max, which is e4m3fn's rule), then e5m2's rule
        (from 61440, the first value that rounds past its max: ±inf) and NaN as 0x7F | sign in both formats."""
        if MANT == 3:
            hw = tl.inline_asm_elementwise("{ .reg .b16 h; cvt.rn.satfinite.e4m3x2.f32 h, $1, $1; "
                                           "cvt.u32.u16 $0, h; }", "=r,r", [x], dtype=tl.int32, is_pure=True,
                                           pack=1)
            FIRST_OUT: tl.constexpr = SPECIAL
        else:
            hw = tl.inline_asm_elementwise("{ .reg .b16 h; cvt.rn.satfinite.e5m2x2.f32 h, $1, $1; "
                                           "cvt.u32.u16 $0, h; }", "=r,r", [x], dtype=tl.int32, is_pure=True,
                                           pack=1)
            FIRST_OUT: tl.constexpr = 0x47700000  # 61440.0
        u = x.to(tl.int32, bitcast=True)
        a = u & 0x7FFFFFFF
        return tl.where(a >= FIRST_OUT, tl.where(a > 0x7F800000, 0x7F, OVER) | ((u >> 24) & 0x80), hw & 0xFF)

    @triton.jit
    def widen_bits(b, MANT: tl.constexpr):
        """``decode_bits`` by the GPU's own conversion to fp16 (exact: every fp8 value is an fp16 one), then to
        fp32 (exact)."""
        if MANT == 3:
            v = tl.inline_asm_elementwise("{ .reg .b16 h, lo, hi; .reg .b32 r; cvt.u16.u32 h, $1; "
                                          "cvt.rn.f16x2.e4m3x2 r, h; mov.b32 {lo, hi}, r; cvt.f32.f16 $0, lo; }",
                                          "=r,r", [b], dtype=tl.float32, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise("{ .reg .b16 h, lo, hi; .reg .b32 r; cvt.u16.u32 h, $1; "
                                          "cvt.rn.f16x2.e5m2x2 r, h; mov.b32 {lo, hi}, r; cvt.f32.f16 $0, lo; }",
                                          "=r,r", [b], dtype=tl.float32, is_pure=True, pack=1)
        return v

    @triton.jit
    def _encode(x, q_ptr, s_ptr, offs, mask, MANT: tl.constexpr, BIAS: tl.constexpr, SPECIAL: tl.constexpr,
                OVER: tl.constexpr, CLIP: tl.constexpr):
        s = tl.load(s_ptr)
        y = tl.div_rn(x, s)
        if CLIP > 0:
            y = tl.minimum(tl.maximum(y, -CLIP), CLIP)  # NaN stays NaN (like torch.clamp)
        if nvidia_ptx(8, 9):  # the fp8 conversions came with sm_89
            bits = convert_bits(y, MANT, SPECIAL, OVER)
        else:
            bits = encode_bits(y, MANT, BIAS, SPECIAL, OVER)
        tl.store(q_ptr.to(tl.pointer_type(tl.uint8)) + offs, bits.to(tl.uint8), mask=mask)

    @triton.jit
    def _decode(q_ptr, s_ptr, offs, mask, MANT: tl.constexpr, BIAS: tl.constexpr):
        b = tl.load(q_ptr.to(tl.pointer_type(tl.uint8)) + offs, mask=mask, other=0).to(tl.int32)
        if nvidia_ptx(8, 9):
            v = widen_bits(b, MANT)
        else:
            v = decode_bits(b, MANT, BIAS)
        return v * tl.load(s_ptr)

    @triton.jit
    def triton_encode_e4m3fn(x, q_ptr, s_ptr, offs, mask, CLIP: tl.constexpr = 0.0):
        _encode(x, q_ptr, s_ptr, offs, mask, 3, 7, 0x43F00000, 0x7E, CLIP)

    @triton.jit
    def triton_decode_e4m3fn(q_ptr, s_ptr, offs, mask):
        return _decode(q_ptr, s_ptr, offs, mask, 3, 7)

    @triton.jit
    def triton_encode_e5m2(x, q_ptr, s_ptr, offs, mask, CLIP: tl.constexpr = 0.0):
        _encode(x, q_ptr, s_ptr, offs, mask, 2, 15, 0x47800000, 0x7C, CLIP)

    @triton.jit
    def triton_decode_e5m2(q_ptr, s_ptr, offs, mask):
        return _decode(q_ptr, s_ptr, offs, mask, 2, 15)


# ----------------------------------------------------------------------------------------------------------
# Codecs
# ----------------------------------------------------------------------------------------------------------
class Fp8Norm(Codec):
    """fp8 codes (shape "param") of x / s, with s the per-tensor fp32 "scale" buffer (0-d, init 1.0).

    The codec never writes the scale: the spec assigns it by name (``m_scale = ...``, LAMB16: s = Nh(x) + eps,
    a whole-tensor reduction) and the generated code stores it before the encode. Option ``clip`` clamps
    x / s to [-clip, clip] (LAMB16 clamps m / s_m to ±15); other clamps belong to the spec's math.
    Decode is fp32(code)·s.
    """

    roles = frozenset({"state"})
    imports = ("from optgen.codecs import fp8",)
    fmt: str
    dtype: str

    def buffers(self) -> list[Buffer]:
        return [Buffer("", self.dtype), Buffer("scale", "float32", 1.0, "scalar")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = fp8.torch_decode({refs[0]}, {refs[1]}, {self.fmt!r})"]

    def __init__(self, options: dict[str, Any], fail) -> None:
        unknown = sorted(set(options) - {"clip"})
        if unknown:
            raise fail(f"storage '{self.name}' takes only the option 'clip', got: {', '.join(unknown)}")
        clip = options.get("clip")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise fail(f"storage '{self.name}': clip must be a positive number, got {clip!r}")
        self.clip = None if clip is None else float(clip)

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        clip = "" if self.clip is None else f", clip={self.clip!r}"
        return [f"fp8.torch_encode({value}, {refs[0]}, {refs[1]}, {self.fmt!r}{clip})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = fp8.triton_decode_{self.fmt}({ptrs[0]}, {ptrs[1]}, {offs}, {mask})"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        clip = "" if self.clip is None else f", {self.clip!r}"
        return [f"fp8.triton_encode_{self.fmt}({value}, {ptrs[0]}, {ptrs[1]}, {offs}, {mask}{clip})"]


class Fp8E4M3Norm(Fp8Norm):
    name = "fp8_e4m3_norm"
    fmt = "e4m3fn"
    dtype = "float8_e4m3fn"


class Fp8E5M2Norm(Fp8Norm):
    name = "fp8_e5m2_norm"
    fmt = "e5m2"
    dtype = "float8_e5m2"
