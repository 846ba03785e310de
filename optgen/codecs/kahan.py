"""``bf16+kahan``: a bf16 value plus a bf16 compensation holding what the rounding lost (optimi's Kahan
summation, as a storage format): x = fp32(p) + fp32(c); encode y as p = RNE_bf16(y), c = RNE_bf16(y - p).
16-bit mantissa in 4 bytes; the residual error is at most half a bf16 ULP of c, about 2^-17 relative to |y|.
Precisely: y - p is exact in fp32 (at most 16 significant bits on y's grid); c = y - p exactly when that
has at most 8 bits, otherwise |y - p| < 2^(E-8) (E the exponent of p) and c is off by at most half its
ULP, <= 2^(E-17) (2^-134 where c is a bf16 subnormal); the decode p + c is exact in fp32 (c is on y's
fp32 grid). If p overflows to inf (or y is NaN/inf), c = 0, so the value decodes to ±inf (NaN) rather
than inf - inf. Rounding is bit arithmetic (optgen.codecs.rounding) and bf16 moves as bits in Triton, so
the interpreter, the GPU and PyTorch store the same bits.

Public API: torch_decode(p, c) -> flat fp32; torch_encode(y, p, c) -> None (in place); triton_decode(p_ptr,
c_ptr, offs, mask) -> fp32 tile and triton_encode(y, p_ptr, c_ptr, offs, mask) (@triton.jit);
reference_encode(y) -> (p, c) float64 and reference_decode(p, c) -> float64 for tests.
"""

from __future__ import annotations

import torch

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.bf16_sr import reference_round
from optgen.codecs.rounding import torch_round_bf16, torch_to_bf16

try:
    import triton
    import triton.language as tl

    from optgen.codecs.rounding import tl_load_bf16, tl_round_bf16, tl_round_bf16_f32, tl_to_bf16
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None


def torch_decode(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1).float() + c.reshape(-1).float()


def torch_encode(y: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> None:
    hi = torch_round_bf16(y)
    rest = torch.where(torch.isfinite(hi), y - hi, 0.0)  # exact; 0 when y is NaN/inf or overflowed to inf
    p.copy_(torch_to_bf16(hi).view(p.shape))
    c.copy_(torch_to_bf16(torch_round_bf16(rest)).view(c.shape))


if triton is not None:

    @triton.jit
    def triton_decode(p_ptr, c_ptr, offs, mask):
        return tl_load_bf16(p_ptr + offs, mask) + tl_load_bf16(c_ptr + offs, mask)

    @triton.jit
    def triton_encode(y, p_ptr, c_ptr, offs, mask):
        hi = tl_round_bf16_f32(y, 0, False)
        rest = tl.where(tl.abs(hi) < float("inf"), y - hi, 0.0)
        tl.store(p_ptr + offs, tl_to_bf16(hi), mask=mask)
        tl.store(c_ptr + offs, tl_round_bf16(rest, 0, False), mask=mask)


class Bf16Kahan(Codec):
    name = "bf16+kahan"
    roles = frozenset({"param", "state"})
    param_dtypes = ("bfloat16",)
    imports = ("from optgen.codecs import kahan",)

    def buffers(self) -> list[Buffer]:
        return [Buffer("", "bfloat16"), Buffer("kahan", "bfloat16")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = kahan.torch_decode({refs[0]}, {refs[1]})"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"kahan.torch_encode({value}, {refs[0]}, {refs[1]})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = kahan.triton_decode({ptrs[0]}, {ptrs[1]}, {offs}, {mask})"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"kahan.triton_encode({value}, {ptrs[0]}, {ptrs[1]}, {offs}, {mask})"]


def reference_encode(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 encode for tests (nearest-even bf16 from frexp, not bits): p = bf16(y), c = bf16(y - p) with
    y - p formed in float64 (exact; its conversion to fp32 is exact too), c = 0 where p is not finite."""
    y64 = y.double().reshape(-1)
    p = reference_round(y64.float())
    c = torch.where(torch.isfinite(p), reference_round(torch.where(torch.isfinite(p), y64 - p, 0.0).float()), 0.0)
    return p, c


def reference_decode(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float64 decode for tests: the exact sum of the two stored values."""
    return p.double().reshape(-1) + c.double().reshape(-1)
