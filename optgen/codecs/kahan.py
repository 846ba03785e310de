"""``bf16+kahan``: a bf16 value plus a bf16 compensation holding what the rounding lost (optimi's Kahan
summation, as a storage format): x = fp32(p) + fp32(c); encode y as p = RNE_bf16(y), c = RNE_bf16(y - p).
16-bit mantissa in 4 bytes; the residual error is at most half a bf16 ULP of c, about 2^-17 relative to |y|.
"""

from __future__ import annotations

import torch

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.rounding import torch_round_bf16

try:
    import triton
    import triton.language as tl

    from optgen.codecs.rounding import tl_round_bf16
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None


def torch_decode(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1).float() + c.reshape(-1).float()


def torch_encode(y: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> None:
    hi = torch_round_bf16(y)
    p.copy_(hi.to(torch.bfloat16).view(p.shape))
    c.copy_(torch_round_bf16(y - hi).to(torch.bfloat16).view(c.shape))


if triton is not None:

    @triton.jit
    def triton_decode(p_ptr, c_ptr, offs, mask):
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return p + tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def triton_encode(y, p_ptr, c_ptr, offs, mask):
        hi = tl_round_bf16(y, 0, False)
        tl.store(p_ptr + offs, hi, mask=mask)
        tl.store(c_ptr + offs, tl_round_bf16(y - hi.to(tl.float32), 0, False), mask=mask)


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
