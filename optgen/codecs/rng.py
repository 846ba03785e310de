"""Counter-based random bits for stochastic rounding, identical in PyTorch and Triton.

Nothing is stateful: the bits of element ``idx`` of a buffer are a pure function of (seed, step, tensor
index, salt, idx), so a run is reproducible from its seed, both backends draw the same bits, and tiles can
be processed in any order.

    key     = make_key(seed, step, tensor_index, salt)
            = mix32((seed mod 2^32) ^ mix32((step*KEY_STEP + tensor_index*KEY_TENSOR + salt) mod 2^32))
    hash32  = mix32(((idx * KEY_INDEX) mod 2^32) ^ key)          (uniform on [0, 2^32))
    random16 = hash32 & 0xFFFF                                   (uniform on [0, 2^16))

``mix32`` is Chris Wellons' ``lowbias32`` integer mixer (a bijection of uint32). All arithmetic is
modulo 2^32. Triton computes it in uint32/uint64 (wrap-around is defined there). PyTorch has no uint32
arithmetic, so it holds uint32 values in int64 and multiplies in two 16-bit halves: each partial product
is below 2^48, so nothing relies on signed int64 overflow (undefined in C++, and Inductor emits C++).

Salts: each buffer that is stochastically rounded takes its own salt (``bf16_sr`` uses the crc32 of the
buffer's name, e.g. "param", "state_m"), so the buffers of one tensor draw independent bits. The
(seed, step) pair travels at the head of an int64 tensor ``rng`` on the device (no host sync), or, in an eager
step, as two int32 kernel arguments; bf16_sr puts each parameter's stable id after it (``tl_rng_args``).
Everything here is torch.compile-friendly: no ``.item()``, no branching on data.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None

MASK32 = 0xFFFFFFFF
MIX_1 = 0x7FEB352D  # lowbias32's multipliers
MIX_2 = 0x846CA68B
KEY_STEP = 0x85EBCA77  # odd constants that decorrelate step, tensor index and element index
KEY_TENSOR = 0xC2B2AE3D
KEY_INDEX = 0x9E3779B1
# The kernel's names for the seed, the step and the tensor's stable id (``tl_rng_args``), which codecs render
STREAM_NAMES = ("rng_seed", "rng_step", "rng_stream")


# ----------------------------------------------------------------------------------------------- PyTorch
def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 ``x`` holding a value in [0, 2^32) and a constant c in [0, 2^32).

    Split into 16-bit halves so that no int64 product overflows: x*c = hi*c*2^16 + lo*c, hi, lo < 2^16.
    """
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (result in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = mul32(x, MIX_1)
    x = x ^ (x >> 15)
    x = mul32(x, MIX_2)
    return x ^ (x >> 16)


def make_key(seed: torch.Tensor | int, step: torch.Tensor | int, tensor_index: torch.Tensor | int,
             salt: int) -> torch.Tensor:
    """The 32-bit key of one (seed, step, tensor, buffer) as an int64 tensor in [0, 2^32).

    ``seed`` and ``step`` are usually 0-d int64 tensors (any integers: only their low 32 bits count),
    ``tensor_index`` an int or int64 tensor, ``salt`` an int in [0, 2^31).
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=seed.device)
    index = torch.as_tensor(tensor_index, dtype=torch.int64, device=seed.device)
    inner = (mul32(step & MASK32, KEY_STEP) + mul32(index & MASK32, KEY_TENSOR) + salt) & MASK32
    return mix32((seed & MASK32) ^ mix32(inner))


def torch_key(rng: torch.Tensor, tensor_index: torch.Tensor | int, salt: int) -> torch.Tensor:
    """``make_key`` with (seed, step) read from the head of the int64 tensor ``rng``."""
    return make_key(rng[0], rng[1], tensor_index, salt)


def hash32(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) for each element index ``idx`` (int64, >= 0) under ``key``."""
    return mix32(mul32(idx & MASK32, KEY_INDEX) ^ key)


def torch_random16(key: torch.Tensor, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """16 random bits (int64 in [0, 2^16)) for the element indices 0..n-1 under ``key``."""
    idx = torch.arange(n, device=key.device if device is None else device, dtype=torch.int64)
    return hash32(key, idx) & 0xFFFF


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _mul32(x, c: tl.constexpr):
        """x * c mod 2^32 (the product is formed in uint64 and truncated)."""
        return (x.to(tl.uint64) * c).to(tl.uint32)

    @triton.jit
    def tl_mix32(x):
        """lowbias32 on uint32 (constants written out: a @jit function reads only constexpr globals)."""
        x = x ^ (x >> 16)
        x = _mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32(x, 0x846CA68B)
        return x ^ (x >> 16)

    @triton.jit
    def tl_make_key(seed, step, tensor_index, salt: tl.constexpr):
        """Same as ``make_key``: integer scalars (any width; only the low 32 bits count) -> uint32."""
        inner = _mul32(step.to(tl.uint32), 0x85EBCA77) + _mul32(tensor_index.to(tl.uint32), 0xC2B2AE3D) + salt
        return tl_mix32(seed.to(tl.uint32) ^ tl_mix32(inner.to(tl.uint32)))

    @triton.jit
    def tl_rng_args(rng, rng_seed, rng_step, tensor, IN_TENSOR: tl.constexpr):
        """(seed, step, stable id) of tensor ``tensor`` of a launch: all three from the int64 tensor ``rng`` =
        [seed, step, id_0, ...] (a compiled graph makes it on the device), or seed and step from the kernel's
        int32 arguments (an eager step passes them so, with nothing to copy to the device first) and the id from
        ``rng`` = [id_0, ...]."""
        if IN_TENSOR:
            return tl.load(rng), tl.load(rng + 1), tl.load(rng + 2 + tensor)
        else:
            return rng_seed, rng_step, tl.load(rng + tensor)

    @triton.jit
    def tl_hash32(key, idx):
        """Same as ``hash32``: uint32 bits for a tile of element indices ``idx`` (>= 0)."""
        return tl_mix32(_mul32(idx.to(tl.uint32), 0x9E3779B1) ^ key)

    @triton.jit
    def tl_random16(key, idx):
        """Same as ``torch_random16``: 16 random bits (uint32 in [0, 2^16)) per element index."""
        return tl_hash32(key, idx) & 0xFFFF


def reference_hash32(seed: int, step: int, tensor_index: int, salt: int, idx: int) -> int:
    """Plain Python integers, written from the formula above (for tests): the 32 bits of element idx."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * MIX_1) % 2**32
        x ^= x >> 15
        x = (x * MIX_2) % 2**32
        return x ^ (x >> 16)

    key = mix((seed % 2**32) ^ mix((step * KEY_STEP + tensor_index * KEY_TENSOR + salt) % 2**32))
    return mix(((idx * KEY_INDEX) % 2**32) ^ key)


__all__ = ["STREAM_NAMES", "hash32", "make_key", "mix32", "mul32", "reference_hash32", "torch_key", "torch_random16"]
