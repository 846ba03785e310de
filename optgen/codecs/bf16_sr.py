"""``bf16_sr``: bf16 storage with stochastic rounding (torchastic's rounding, unbiased).

Each store adds 16 random bits to the fp32 bit pattern and clears the low 16 bits (optgen.codecs.rounding):
x rounds away from zero with probability low16(x) / 2^16, so E[stored] = x. The bits come from the
counter-based hash of optgen.codecs.rng over (seed, step, parameter id, salt, element index), computed
identically by the PyTorch fallback and the Triton kernel, so both backends store the same bits and a run is
reproducible from its seed.

``rng`` is the int64 tensor [seed, step, id_0, id_1, ...] (optgen.runtime.transfer.make_rng): tensor i of a call draws under the stable id
``rng[2 + i]`` (the optimizer gives each parameter its position among all its parameters), so the noise of a
parameter does not depend on the param group, on which other parameters have gradients, on gradient
release, or on how a launcher splits the tensors. ``rng`` is None for the initial state (rounded to nearest).

Salt: the crc32 of the buffer's name in the generated code ("param", "state_m", ...; the PyTorch rendering
gets ``state_m[i]`` and drops the subscript), so p, m and v of one tensor draw independent bits and both
renderings use the same salt. The renderings use the names the backends provide: ``rng`` and the index of
the tensor in the call (``i``) in the PyTorch fallback; seed, step and the tensor's id (``rng_seed``,
``rng_step``, ``rng_stream``: optgen.codecs.rng.tl_rng_args) in the kernel.

Public API:
  torch_encode(x, out, rng, i, salt) -> None                 (flat fp32 x -> bf16 ``out``, in place)
  triton_encode(x, ptrs, rng_seed, rng_step, rng_stream, offs, mask, SALT)   (@triton.jit, stores a tile)
  triton_decode(ptrs, mask) -> fp32 tile                      (@triton.jit; loads bf16 as bits)
  salt_of(name) -> int;  reference_round(x, noise) -> float64 (independent reference for tests)
"""

from __future__ import annotations

import zlib

import torch

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.rng import STREAM_NAMES, torch_key, torch_random16
from optgen.codecs.rounding import torch_round_bf16, torch_to_bf16

try:
    import triton
    import triton.language as tl

    from optgen.codecs.rng import tl_make_key, tl_random16
    from optgen.codecs.rounding import tl_load_bf16, tl_round_bf16
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None


def salt_of(name: str) -> int:
    """A stable 31-bit salt per buffer name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------- PyTorch
def torch_encode(x: torch.Tensor, out: torch.Tensor, rng: torch.Tensor | None, i: int, salt: int) -> None:
    """Store the flat fp32 ``x`` (tensor ``i`` of the call) into the bf16 tensor ``out``, stochastically rounded
    under the id ``rng[2 + i]`` (to nearest without rng)."""
    noise = None
    if rng is not None:
        noise = torch_random16(torch_key(rng, rng[2 + i], salt), x.numel(), x.device)
    out.copy_(torch_to_bf16(torch_round_bf16(x.reshape(-1), noise)).view(out.shape))


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def triton_encode(x, ptr, rng_seed, rng_step, rng_stream, offs, mask, SALT: tl.constexpr):
        """Store the fp32 tile ``x`` at ``ptr + offs``, with the noise of (seed, step, the tensor's stable id
        ``rng_stream``) (element k draws the bits of flat index k; optgen.codecs.rng.tl_rng_args gives the three)."""
        noise = tl_random16(tl_make_key(rng_seed, rng_step, rng_stream, SALT), offs)
        tl.store(ptr + offs, tl_round_bf16(x, noise, True), mask=mask)

    @triton.jit
    def triton_decode(ptrs, mask):
        """Load a bf16 tile as fp32 through its bits (exact under the interpreter too, subnormals included)."""
        return tl_load_bf16(ptrs, mask)


# ----------------------------------------------------------------------------------------------- codec
class Bf16SR(Codec):
    name = "bf16_sr"
    roles = frozenset({"param", "state"})
    param_dtypes = ("bfloat16",)
    needs_rng = True
    register_cap = 64
    imports = ("from optgen.codecs import bf16_sr",)

    def buffers(self) -> list[Buffer]:
        return [Buffer("", "bfloat16")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = {refs[0]}.reshape(-1).float()"]  # torch's bf16 -> fp32 cast is exact

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"bf16_sr.torch_encode({value}, {refs[0]}, rng, i, {salt_of(refs[0].split('[')[0])})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = bf16_sr.triton_decode({ptrs[0]} + {offs}, {mask})"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        streams = ", ".join(STREAM_NAMES)
        return [f"bf16_sr.triton_encode({value}, {ptrs[0]}, {streams}, {offs}, {mask}, {salt_of(ptrs[0])})"]


# ----------------------------------------------------------------------------------------------- reference
def reference_round(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference, from the definition rather than the bits: lo <= |x| <= hi are the bf16 neighbours
    of |x| (quantum 2^(max(E, -126) - 7), E the exponent of |x|, from frexp); with f = (|x| - lo) / (hi - lo),
    the magnitude rounds up iff f·2^16 + noise >= 2^16 (stochastic) or, without noise, iff f > 1/2 or
    f == 1/2 with lo odd (nearest even). Above the largest bf16, "up" is inf. NaN and ±inf stay."""
    x64 = x.double().reshape(-1)
    a = x64.abs()
    _, e = torch.frexp(a)
    q = torch.exp2((torch.clamp(e - 1, min=-126) - 7).double())
    steps = torch.floor(a / q)  # exact: a / q is a power-of-two scaling
    lo = steps * q
    f = (a - lo) / q  # exact: a - lo is a multiple of 2^-149 below q
    if noise is None:
        up = (f > 0.5) | ((f == 0.5) & (torch.remainder(steps, 2) == 1))
    else:
        up = f * 2.0**16 + noise.double().reshape(-1) >= 2.0**16
    hi = torch.where(lo + q >= 2.0**128, torch.inf, lo + q)
    mag = torch.where(up, hi, lo)
    out = torch.where(x64 < 0, -mag, mag)
    return torch.where(torch.isfinite(x64), out, x64)


__all__ = ["Bf16SR", "reference_round", "salt_of", "torch_encode"]
