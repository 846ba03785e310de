"""``bf16_sr``: bf16 storage with stochastic rounding (torchastic's rounding, unbiased).

Each store adds 16 random bits to the fp32 bit pattern and truncates. The bits come from a counter-based
hash of (seed, step, tensor index in the launch, buffer salt, element index), computed identically by the
PyTorch fallback and the Triton kernel (optgen.codecs.rounding), so both backends round the same way and a
run is reproducible from its seed. The salt is derived from the buffer's name, so p, m and v draw
independent bits. Without an ``rng`` (the initial state) values are rounded to nearest.
"""

from __future__ import annotations

import zlib

import torch

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.rounding import torch_key, torch_random16, torch_round_bf16

try:
    import triton
    import triton.language as tl

    from optgen.codecs.rounding import tl_key, tl_random16, tl_round_bf16
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None


def salt_of(name: str) -> int:
    """A stable 31-bit salt per buffer name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def torch_encode(x: torch.Tensor, out: torch.Tensor, rng: torch.Tensor | None, tensor_index: int, salt: int) -> None:
    """Store the flat fp32 ``x`` into the bf16 tensor ``out``, stochastically rounded (nearest without rng)."""
    noise = None
    if rng is not None:
        noise = torch_random16(torch_key(rng, tensor_index, salt), x.numel(), x.device)
    out.copy_(torch_round_bf16(x, noise).to(torch.bfloat16).view(out.shape))


if triton is not None:

    @triton.jit
    def triton_encode(x, ptr, rng, tensor, offs, mask, SALT: tl.constexpr):
        noise = tl_random16(tl_key(rng, tensor, SALT), offs)
        tl.store(ptr + offs, tl_round_bf16(x, noise, True), mask=mask)


class Bf16SR(Codec):
    name = "bf16_sr"
    roles = frozenset({"param", "state"})
    param_dtypes = ("bfloat16",)
    needs_rng = True
    imports = ("from optgen.codecs import bf16_sr",)

    def buffers(self) -> list[Buffer]:
        return [Buffer("", "bfloat16")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = {refs[0]}.reshape(-1).float()"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"bf16_sr.torch_encode({value}, {refs[0]}, rng, i, {salt_of(refs[0].split('[')[0])})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = tl.load({ptrs[0]} + {offs}, mask={mask}, other=0.0).to(tl.float32)"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"bf16_sr.triton_encode({value}, {ptrs[0]}, rng, tensor, {offs}, {mask}, {salt_of(ptrs[0])})"]
