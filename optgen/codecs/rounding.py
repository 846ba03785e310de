"""Bit-exact rounding of fp32 to bf16, identical in PyTorch and Triton (the random bits of stochastic rounding
come from optgen.codecs.rng).

Round to nearest even or stochastically, with integer arithmetic on the fp32 bit pattern u:
  nearest even:  (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
  stochastic:    (u + r) & 0xFFFF0000, r uniform in [0, 2^16): rounds away from zero with probability
                 low16(u) / 2^16, i.e. unbiased (torchastic's rounding)
A NaN becomes the canonical bf16 NaN 0x7FFF, what the GPU's own conversion (``cvt.rn.bf16.f32``) gives.
±inf stays; finite values above the largest bf16 round to inf as in torch.

Casts only where they are exact: under ``TRITON_INTERPRET=1`` Triton 3.9 converts fp32 -> bf16 by truncation
and mangles fp32/bf16 subnormals and low-payload NaNs in both directions (``interpreter._convert_float``).
So the interpreter rounds with the integer formula above, and bf16 values move between fp32 and bf16 as bits
(``tl_to_bf16`` packs the high 16 bits of a rounded fp32, ``tl_from_bf16`` / ``tl_load_bf16`` shift bf16 bits
up: exact). On the GPU, nearest-even rounding is the hardware conversion (one instruction per two values
instead of eight integer ones per value; equal to the formula on every fp32 pattern, checked on an H100 in
tests/test_codecs_bf16_exact.py). PyTorch's own bf16 -> fp32 cast is exact; its fp32 -> bf16 cast of a NaN
returns a canonical NaN that depends on the device (0xFFFF on CPU), so ``torch_to_bf16`` packs bits as well.
"""

from __future__ import annotations

import torch

from optgen.codecs.rng import MASK32

try:
    import triton
    import triton.language as tl

    from optgen.codecs.division import INTERPRETED
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None

CANONICAL_NAN = 0x7FFFFFFF  # its high 16 bits: bf16's canonical NaN


# ----------------------------------------------------------------------------------------------- PyTorch
def torch_round_bf16(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> the bf16 value as fp32 (low 16 bits clear): nearest even, or stochastic with ``noise``
    (int64 in [0, 2^16), one per element). NaN -> the canonical NaN 0x7FFF."""
    u = x.view(torch.int32).to(torch.int64) & MASK32
    r = ((u >> 16) & 1) + 0x7FFF if noise is None else noise
    bits = torch.where(torch.isnan(x), CANONICAL_NAN, u + r) & 0xFFFF0000
    bits = bits - ((bits >> 31) << 32)  # [0, 2^32) -> the int32 with the same bits
    return bits.to(torch.int32).view(torch.float32)


def torch_to_bf16(r: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor whose low 16 bits are clear (a ``torch_round_bf16`` result) -> bf16 with its bits."""
    return (r.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def torch_rne_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, round to nearest even (as torch's cast; NaN -> 0x7FFF)."""
    return torch_to_bf16(torch_round_bf16(x))


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:
    _CANONICAL_NAN = tl.constexpr(CANONICAL_NAN)

    @triton.jit
    def tl_round_bf16_f32(x, noise, STOCHASTIC: tl.constexpr):
        """fp32 tile -> the rounded bf16 values as an fp32 tile (low 16 bits clear), as torch_round_bf16."""
        if STOCHASTIC or INTERPRETED:
            u = x.to(tl.uint32, bitcast=True)
            if STOCHASTIC:
                r = noise
            else:
                r = ((u >> 16) & 1) + 0x7FFF
            bits = tl.where(x != x, _CANONICAL_NAN, u + r) & 0xFFFF0000  # noqa: PLR0124 (x != x: NaN)
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = tl_from_bf16(x.to(tl.bfloat16))  # the GPU's nearest-even conversion
        return out

    @triton.jit
    def tl_to_bf16(r):
        """fp32 tile with the low 16 bits clear -> bf16 tile with exactly its high 16 bits."""
        return (r.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def tl_round_bf16(x, noise, STOCHASTIC: tl.constexpr):
        """fp32 tile -> bf16 tile, nearest even or stochastic (``noise``: uint32 in [0, 2^16))."""
        if STOCHASTIC or INTERPRETED:
            out = tl_to_bf16(tl_round_bf16_f32(x, noise, STOCHASTIC))
        else:
            out = x.to(tl.bfloat16)
        return out

    @triton.jit
    def tl_from_bf16(b):
        """bf16 tile -> fp32 tile, exactly (subnormals and NaN payloads included)."""
        return (b.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def tl_load_bf16(ptrs, mask):
        """Load a bf16 tile as fp32 (0 where masked)."""
        return tl_from_bf16(tl.load(ptrs, mask=mask, other=0.0))


__all__ = ["torch_rne_bf16", "torch_round_bf16", "torch_to_bf16"]
if triton is not None:
    __all__ += ["tl_from_bf16", "tl_load_bf16", "tl_round_bf16", "tl_round_bf16_f32", "tl_to_bf16"]
