"""Bit-exact rounding of fp32 to bf16 and a counter-based hash, identical in PyTorch and Triton.

The Triton interpreter truncates on ``.to(tl.bfloat16)``, so both backends round with integer arithmetic
on the fp32 bit pattern: round to nearest even, or stochastically (add 16 random bits, then truncate:
rounds away from zero with probability low16 / 2^16, so the result is unbiased). NaN stays NaN.

The hash (``lowbias32``, Chris Wellons' integer mixer) uses uint32 arithmetic; PyTorch emulates it in int64
and masks to 32 bits after every multiply (the low 32 bits of a wrapped int64 product are exact).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None

MASK32 = 0xFFFFFFFF
KEY_STEP = 0x85EBCA77  # odd constants that decorrelate step, tensor index and element index
KEY_TENSOR = 0xC2B2AE3D
KEY_INDEX = 0x9E3779B1


# ----------------------------------------------------------------------------------------------- PyTorch
def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def torch_key(rng: torch.Tensor, tensor_index: int, salt: int) -> torch.Tensor:
    """The per-(seed, step, tensor, buffer) key: ``rng`` is the int64 pair (seed, step)."""
    seed, step = rng[0], rng[1]
    return mix32((seed ^ mix32((step * KEY_STEP + tensor_index * KEY_TENSOR + salt) & MASK32)) & MASK32)


def torch_random16(key: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """16 random bits per element 0..n-1 (int64), from the key and the element index."""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    return mix32(((idx * KEY_INDEX) & MASK32) ^ key) & 0xFFFF


def torch_round_bf16(x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> the bf16 value (as fp32 with the low 16 bits clear): nearest even, or stochastic with noise."""
    u = x.view(torch.int32).to(torch.int64)
    r = ((u >> 16) & 1) + 0x7FFF if noise is None else noise
    rounded = ((u + r) & 0xFFFF0000).to(torch.int64)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _mul32(x, c: tl.constexpr):
        """x * c mod 2^32 (whatever width Triton gives the literal, the low 32 bits are kept)."""
        return (x.to(tl.uint64) * c).to(tl.uint32)

    @triton.jit
    def tl_mix32(x):
        x = x ^ (x >> 16)
        x = _mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32(x, 0x846CA68B)
        return x ^ (x >> 16)

    # (the KEY_* constants are written out: a @jit function may only read constexpr globals)
    @triton.jit
    def tl_key(rng_ptr, tensor_index, salt: tl.constexpr):
        """Same as torch_key: rng_ptr points at the int64 pair (seed, step)."""
        seed = tl.load(rng_ptr).to(tl.uint32)
        step = tl.load(rng_ptr + 1).to(tl.uint32)
        inner = _mul32(step, 0x85EBCA77) + _mul32(tensor_index.to(tl.uint32), 0xC2B2AE3D) + salt
        return tl_mix32(seed ^ tl_mix32(inner.to(tl.uint32)))

    @triton.jit
    def tl_random16(key, offs):
        return tl_mix32(_mul32(offs.to(tl.uint32), 0x9E3779B1) ^ key) & 0xFFFF

    @triton.jit
    def tl_round_bf16(x, noise, STOCHASTIC: tl.constexpr):
        """fp32 tile -> bf16 tile (exact conversion of the rounded fp32 value)."""
        u = x.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            r = noise
        else:
            r = ((u >> 16) & 1) + 0x7FFF
        rounded = ((u + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded).to(tl.bfloat16)
