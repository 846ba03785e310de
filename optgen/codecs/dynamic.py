"""Map-based block quantization: ``q8_dynamic`` (bitsandbytes' 8-bit dynamic map) and the 4-bit torchao
formats ``q4_dynamic`` (signed 4-bit dynamic map) and ``q4_linear`` (unsigned linear map, no zero).

A block of B consecutive elements of the flat tensor (the last block may be partial; its padding counts as
0) keeps one fp32 scale s = max(max|x|, 1e-12) (NaN if the block holds a NaN); each element stores the
index of a value of a sorted map M (in [-1, 1]) for x/s, and decodes to M[code]·s.

The maps are built the way bitsandbytes' ``create_dynamic_map`` builds them (``dynamic_map`` below: fp32
``torch.linspace`` on the CPU, fp32 midpoints, times a power of ten), so they equal its table bit for bit:
- 8-bit signed: 127 negative values, 0, 127 positive values and 1.0 (no -1.0); smallest magnitude ≈ 5.5e-7.
- 8-bit unsigned: 0, 254 positive values from ≈ 3.25e-7, and 1.0.
- 4-bit signed (torchao ``create_dynamic_map(True, 3, 4)``): ±{0.0055, 0.0325, 0.0775, 0.2125, 0.4375,
  0.6625, 0.8875}, 0 and 1.0.
- 4-bit linear (torchao): {1/16, 2/16, ..., 1}, no zero.

Which code an element gets (all comparisons in fp32, on r = x·i, the same in both backends; one division
per block rather than per element): i = fp32(1/s), correctly rounded, for s <= 2^126; above, where 1/s is
subnormal, i = fp32(fp32(1/(s/4))/4). r is within about an fp32 ulp of x/s, and |r| <= 1 for s <= 2^126;
above, the block max may give |r| up to two ulps above 1, which still takes the top (bottom) code. The
references do not divide exactly either: bitsandbytes' CUDA kernel uses the approximate ``__fdividef`` per
element, torchao's compiled step Triton's approximate ``/``.
- q8_dynamic follows bitsandbytes: the nearest map value, decided against the 255 fp32 midpoints
  fp32(M[i] + M[i+1])·0.5; code = number of midpoints strictly below r, so a value exactly on a midpoint
  takes the LOWER code. This is what bitsandbytes' default (CPU) backend does (``torch.bucketize`` over the
  same midpoints); its CUDA ``quantize_2D`` sends an exact tie to whichever neighbour its binary-search
  pivot is, so at exact ties (and because it divides with ``__fdividef``) a CUDA bitsandbytes code can
  differ by one step. Signed map only: like bitsandbytes' 8-bit optimizers, a negative value whose nearest
  code is 0 takes the next code below (the smallest negative value), so a negative state never becomes 0.
- q4_*: torchao's rule: c = the largest index with M[c] <= r (0 below M[0]); then c + 1 if
  fp32(r − M[c]) >= fp32(M[c+1] − M[c])·0.5 ("ties up"; the top code stays). The Triton kernel gets the
  same signed code as the number of 15 precomputed fp32 thresholds <= r (``q4_thresholds``).
The block scale: bitsandbytes stores the raw absmax (0 for a zero block); here it is max(absmax, 1e-12)
as torchao does, so x/s is never 0/0. A NaN input makes its block's scale NaN (visible when decoded) and
its own code is that of 0.
Decode error: |x̂ − x| <= s·(half the gap between the code's map value and its neighbour on x/s's side),
plus for q8_dynamic signed the sign rule (at most the smallest magnitude, 5.5e-7·s) and for q4_linear,
which has no zero, up to s/16 for entries below s/16.
Padding: a partial last block is padded with zeros; for the 4-bit formats with an odd element count the
low nibble of the last byte holds the code of 0 (the even element sits in the high nibble).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.q8 import RECIPROCAL_MAX  # above it 1/s is subnormal: taken as (1/(s/4))/4 here

try:  # the module must import without Triton (then only the PyTorch path exists)
    import triton
    import triton.language as tl

    from optgen.codecs.division import nvidia_ptx, quotient, reciprocal_estimate
    from optgen.codecs.q8 import group_absmax, group_broadcast, group_view, load_group_values, store_group_values
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

SCALE_FLOOR = 1e-12
Q8_BLOCK = 256
Q4_BLOCK = 128


# ----------------------------------------------------------------------------------------------------------
# The maps
# ----------------------------------------------------------------------------------------------------------
def dynamic_map(signed: bool, exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """The dynamic map of bitsandbytes (Dettmers, "8-bit approximations"), as sorted Python floats.

    Decade i = 0..exponent_bits-1 covers magnitudes 10^(i+1-exponent_bits)·[0.1, 1]: split [0.1, 1] into
    2^i equal parts (2^(i+1) when unsigned: the sign bit becomes a fraction bit), take the midpoints
    of the parts, scale them by the decade's power of ten, and add their negatives when signed. Then 0
    and 1.0. All arithmetic is fp32 on the CPU, as bitsandbytes does it (``torch.linspace`` of fp32, fp32
    midpoints, a fp32 product with the power of ten), so every value equals its table entry exactly.
    """
    if exponent_bits != total_bits - 1:
        # bitsandbytes then adds a linear region; none of our formats uses it
        raise ValueError("only maps with exponent_bits == total_bits - 1 are supported")
    values: list[float] = []
    for i in range(exponent_bits):
        parts = 2 ** (i + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32, device="cpu")
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (i + 1 - exponent_bits)
        values += (decade * mids).tolist()
        if signed:
            values += (-decade * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2**total_bits
    return sorted(values)


def linear_map(levels: int = 16) -> list[float]:
    """torchao's unsigned 4-bit map: ``linspace(0, 1, levels + 1)[1:]`` in fp32, i.e. k/levels, no zero."""
    return torch.linspace(0.0, 1.0, levels + 1, dtype=torch.float32, device="cpu")[1:].tolist()


Q8_SIGNED_MAP = dynamic_map(True)
Q8_UNSIGNED_MAP = dynamic_map(False)
Q4_SIGNED_MAP = dynamic_map(True, 3, 4)
Q4_LINEAR_MAP = linear_map(16)


def _ordered(x: torch.Tensor) -> int:
    """An fp32 scalar as an integer in the order of the values (-0.0 and 0.0 both give 0)."""
    bits = int(x.view(torch.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_ordered(k: int) -> torch.Tensor:
    return torch.tensor(k if k >= 0 else -k - 2**31, dtype=torch.int32).view(torch.float32)


def q4_thresholds(qmap: list[float]) -> list[float]:
    """The 15 fp32 values at which torchao's rule moves to the next code: T[c] is the least fp32 r in
    [M[c], M[c+1]] with fp32(r - M[c]) >= fp32(M[c+1] - M[c])·0.5 (M[c+1] itself passes). As fp32(r - M[c])
    never decreases with r, the rule's code is the number of thresholds <= r (0 below M[0], 15 from 1.0 up).
    Found by binary search over the fp32 values of the interval, in order."""
    m = torch.tensor(qmap, dtype=torch.float32)
    out = []
    for c in range(15):
        half = (m[c + 1] - m[c]) * 0.5
        lo, hi = _ordered(m[c]), _ordered(m[c + 1])
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if bool(_from_ordered(mid) - m[c] >= half) else (mid + 1, hi)
        out.append(float(_from_ordered(lo)))
    return out


Q4_SIGNED_THRESHOLDS = q4_thresholds(Q4_SIGNED_MAP)

# The q8 encode finds its code in one step: the top KEY_BITS bits of x/s (sign, exponent, 7 mantissa bits) pick a
# bucket of fp32 values, which holds at most one midpoint of either map (checked when the table is built).
KEY_SHIFT = 16
KEY_BITS = 32 - KEY_SHIFT


def _bucket_bases(mids: torch.Tensor) -> torch.Tensor:
    """Per bucket of KEY_SHIFT-bit-aligned fp32 bit patterns: the number of midpoints below all of its values in
    [-1, 1], as bytes (fp32 words of 4). An x/s in the bucket has that many midpoints below it, plus one if the
    next midpoint is below it too: no bucket holds two midpoints, which this checks."""
    first = torch.arange(2**KEY_BITS, dtype=torch.int64) << KEY_SHIFT
    ends = torch.stack([first, first + (1 << KEY_SHIFT) - 1]).to(torch.int32).view(torch.float32)  # same bits
    low, high = ends.amin(0), ends.amax(0)  # negative buckets run downwards
    inside = (low <= 1.0) & (high >= -1.0)  # the buckets x/s (in [-1, 1]) can fall in; the others are never read
    base = torch.where(inside, torch.bucketize(low.clamp(-1.0, 1.0), mids), 0)
    if int((torch.bucketize(high.clamp(-1.0, 1.0), mids) - base)[inside].max()) > 1:
        raise AssertionError("a bucket of the q8 table holds two midpoints: lower KEY_SHIFT")
    return base.to(torch.uint8).view(torch.float32)


def _q8_table_cpu(signed: bool) -> torch.Tensor:
    values = torch.tensor(Q8_SIGNED_MAP if signed else Q8_UNSIGNED_MAP, dtype=torch.float32)
    mids = (values[:-1] + values[1:]) * 0.5  # fp32, as bitsandbytes ((a + b)·0.5f in CUDA, (a + b)/2 on CPU)
    return torch.cat([values, mids, torch.tensor([float("inf")]), _bucket_bases(mids)]).contiguous()


# the CPU tables, built once at import; device copies are made on first use and cached (also when that
# first use is inside torch.compile: Dynamo records the cache insertion as a side effect)
_SOURCE = {("q8", True): _q8_table_cpu(True), ("q8", False): _q8_table_cpu(False),
           ("q4", True): torch.tensor(Q4_SIGNED_MAP, dtype=torch.float32),
           ("q4", False): torch.tensor(Q4_LINEAR_MAP, dtype=torch.float32)}
_CACHE: dict[tuple[str, bool, torch.device], torch.Tensor] = {}


def _table(kind: str, signed: bool, device: torch.device | str) -> torch.Tensor:
    key = (kind, signed, torch.device(device))
    t = _CACHE.get(key)
    if t is None:
        t = _SOURCE[(kind, signed)].to(key[2])
        _CACHE[key] = t
    return t


def qmap_table(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The q8_dynamic kernel constant on ``device`` (cached): fp32 entries 0..255 the map values in ascending
    order, 256..510 the midpoints between neighbours, 511 = +inf, then from entry 512 on one byte per bucket
    of x/s values (``_bucket_bases``)."""
    return _table("q8", signed, device)


def q4_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values of the 4-bit map (signed dynamic, or linear) as fp32 on ``device`` (cached)."""
    return _table("q4", signed, device)


# ----------------------------------------------------------------------------------------------------------
# PyTorch: flat 1-D fp32 values; no .item(), no data-dependent branching (torch.compile friendly)
# ----------------------------------------------------------------------------------------------------------
def reciprocal(s: torch.Tensor) -> torch.Tensor:
    """The blocks' i (see the module docstring): fp32(1/s) for s <= 2^126, fp32(fp32(1/(s/4))/4) above."""
    small = s <= RECIPROCAL_MAX
    a = torch.where(small, s, s * 0.25)
    inv = torch.ones_like(a) / a
    return torch.where(small, inv, inv * 0.25)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized blocks r = x·i ([nblocks, block], padded with zeros, NaN -> 0) and the scales s."""
    x = x.reshape(-1).float()
    g = F.pad(x, (0, (-x.numel()) % block)).view(-1, block)
    s = g.abs().amax(dim=1).clamp_min(SCALE_FLOOR)  # amax propagates NaN
    r = g * reciprocal(s)[:, None]  # one division per block, as the kernel
    return torch.where(torch.isnan(r), torch.zeros_like(r), r), s


def _expand(scale: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return scale.reshape(-1).float().repeat_interleave(block)[:n]


def quantize_q8(x: torch.Tensor, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``x`` -> (codes uint8 [numel], absmax fp32 [ceil(numel/256)])."""
    n = x.numel()
    r, s = _blocks(x, Q8_BLOCK)
    mids = qmap_table(signed, x.device)[256:511]
    code = torch.bucketize(r, mids, out_int32=True)  # number of midpoints < r: ties take the lower code
    if signed:
        code = torch.where((r < 0) & (code == 127), code - 1, code)  # 127 is the code of 0
    return code.reshape(-1)[:n].to(torch.uint8), s


def dequantize_q8(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True) -> torch.Tensor:
    n = codes.numel()
    values = qmap_table(signed, codes.device)[:256]
    return values[codes.reshape(-1).to(torch.int64)] * _expand(absmax, Q8_BLOCK, n)


def quantize_q4(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``x`` -> (packed uint8 [ceil(numel/2)], scale fp32 [ceil(numel/128)])."""
    n = x.numel()
    r, s = _blocks(x, Q4_BLOCK)
    qmap = q4_map(signed, x.device)
    down_i = torch.bucketize(r, qmap[1:], right=True)  # number of map values M[1:] <= r
    up_i = (down_i + 1).clamp(max=15)
    down, up = qmap[down_i], qmap[up_i]
    code = torch.where((r - down) >= (up - down) * 0.5, up_i, down_i)
    code = code.reshape(-1)[: n + n % 2].to(torch.uint8)  # blocks are even, so the pad element exists
    return (code[0::2] << 4) | code[1::2], s


def dequantize_q4(packed: torch.Tensor, scale: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    b = packed.reshape(-1)
    code = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:numel].to(torch.int64)
    return q4_map(signed, packed.device)[code] * _expand(scale, Q4_BLOCK, numel)


def torch_encode_q8(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> None:
    c, s = quantize_q8(x, signed)
    codes.copy_(c.view(codes.shape))
    absmax.copy_(s)


def torch_decode_q8(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    return dequantize_q8(codes, absmax, signed)


def torch_encode_q4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, signed: bool) -> None:
    c, s = quantize_q4(x, signed)
    packed.copy_(c)
    scale.copy_(s)


def torch_decode_q4(packed: torch.Tensor, scale: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    return dequantize_q4(packed, scale, numel, signed)


# ----------------------------------------------------------------------------------------------------------
# Triton: 2-D fp32 tiles [ROWS, COLS], COLS a multiple of the block
# ----------------------------------------------------------------------------------------------------------
if triton is not None:
    _KEY_SHIFT = tl.constexpr(KEY_SHIFT)
    _RECIPROCAL_MAX = tl.constexpr(RECIPROCAL_MAX)
    _Q4T = [tl.constexpr(v) for v in Q4_SIGNED_THRESHOLDS]
    (_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7, _T8, _T9, _T10, _T11, _T12, _T13, _T14) = _Q4T

    @triton.jit
    def block_reciprocal(s):
        """``reciprocal(s)`` without ``tl.div_rn``'s slow path: by the division fast path, exact for every divisor
        in [1e-12, 2^126] (checked on every one on a GPU, tests/test_exact_math.py), as both divisors are there.
        NaN for an inf or NaN s (PyTorch gives 0 for inf): either way every code of the block is that of 0."""
        small = s <= _RECIPROCAL_MAX
        a = tl.where(small, s, s * 0.25)
        inv = quotient(1.0, a, reciprocal_estimate(a))
        return tl.where(small, inv, inv * 0.25)

    @triton.jit
    def _normalized(x, mask, B: tl.constexpr):
        x = tl.where(mask, x, 0.0)
        s = group_absmax(x, B)
        r = x * group_broadcast(block_reciprocal(s), x, B)
        return tl.where(r == r, r, 0.0), s  # noqa: PLR0124 (r != r: NaN)

    # Gathers as elementwise inline assembly: a ``tl.load`` whose addresses Triton cannot see to be contiguous gets
    # a one-element layout of its own, and every tile around it moved through shared memory to meet it (the
    # q8_dynamic kernel flattened its tile for them, and still could not take the ``aligned`` hint; q4's byte
    # loads and joins did the same). An elementwise op keeps its operands' layout. (The interpreter, which has no
    # inline assembly, and GPUs other than NVIDIA's, load.)
    @triton.jit
    def gather_f32(ptrs):
        """The fp32 at each of ``ptrs``, all inside a read-only table."""
        if nvidia_ptx():
            v = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            v = tl.load(ptrs)
        return v

    @triton.jit
    def gather_u8(ptrs):
        """The byte at each of ``ptrs``, all inside a read-only table, as int32."""
        if nvidia_ptx():
            v = tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            v = tl.load(ptrs).to(tl.int32)
        return v

    @triton.jit
    def load_u8(ptrs, mask):
        """The byte at each of ``ptrs`` where ``mask`` holds (0 elsewhere, where nothing is read), as int32."""
        if nvidia_ptx():
            v = tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; "
                                          "@p ld.global.u8 $0, [$1]; }", "=r,l,r", [ptrs, mask.to(tl.int32)],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            v = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        return v

    @triton.jit
    def store_u8(ptrs, value, mask):
        """Store the low byte of each int32 ``value`` at ``ptrs`` where ``mask`` holds."""
        if nvidia_ptx():
            tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.u8 [$1], $2; "
                                      "mov.b32 $0, 0; }", "=r,l,r,r", [ptrs, value, mask.to(tl.int32)],
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.store(ptrs, value.to(tl.uint8), mask=mask)

    @triton.jit
    def triton_encode_q8(x, q_ptr, s_ptr, table_ptr, offs, mask, start, count, SIGNED: tl.constexpr):
        """Store the tile ``x``: codes at ``q_ptr`` (uint8), block absmax at ``s_ptr`` (fp32); ``table_ptr``
        is ``qmap_table(SIGNED, device)``. The code counts the midpoints (entries 256..510) below x/s: those
        below x/s's whole bucket (a byte of the table, picked by x/s's top bits) plus the next one if it is
        below x/s too (two independent gathers, where a binary search took eight dependent ones)."""
        r, s = _normalized(x, mask, 256)
        bases = (table_ptr + 512).to(tl.pointer_type(tl.uint8))
        below = gather_u8(bases + (r.to(tl.uint32, bitcast=True) >> _KEY_SHIFT)).to(tl.int32)
        c = below + (gather_f32(table_ptr + 256 + below) < r).to(tl.int32)
        if SIGNED:
            c = tl.where((r < 0) & (c == 127), c - 1, c)
        tl.store(q_ptr + offs, c.to(tl.uint8), mask=mask)
        store_group_values(s_ptr, s, start, count, x, 256)

    @triton.jit
    def triton_decode_q8(q_ptr, s_ptr, table_ptr, offs, mask, start, count):
        c = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        s = load_group_values(s_ptr, start, count, offs, 256)
        value = gather_f32(table_ptr + c)
        return tl.where(mask, value * s, 0.0)

    @triton.jit
    def _q4_value(c, SIGNED: tl.constexpr, table=None):
        """M[c]: the signed map from ``table`` (``q4_map(True)``, a kernel constant), the linear one computed."""
        if SIGNED:
            v = gather_f32(table + c)
        else:
            v = (c + 1).to(tl.float32) * 0.0625  # the linear map: M[c] = (c + 1)/16, exact in fp32
        return v

    @triton.jit
    def _q4_code(r, SIGNED: tl.constexpr):
        """torchao's code for x/s = r: the number of thresholds <= r (``q4_thresholds``) for the signed map; for
        the linear one (j + 1)/16 <= r  <=>  j <= 16r - 1 (16r is exact) picks M[down], then the rule."""
        if SIGNED:  # a binary search over the sorted thresholds: four comparisons, not fifteen
            b3 = r >= _T7
            b2 = r >= tl.where(b3, _T11, _T3)
            b1 = r >= tl.where(b3, tl.where(b2, _T13, _T9), tl.where(b2, _T5, _T1))
            b0 = r >= tl.where(b3, tl.where(b2, tl.where(b1, _T14, _T12), tl.where(b1, _T10, _T8)),
                               tl.where(b2, tl.where(b1, _T6, _T4), tl.where(b1, _T2, _T0)))
            c = b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
        else:
            down_i = tl.minimum(tl.maximum(tl.floor(r * 16.0).to(tl.int32) - 1, 0), 15)
            up_i = tl.minimum(down_i + 1, 15)
            down = _q4_value(down_i, SIGNED)
            up = _q4_value(up_i, SIGNED)
            c = tl.where((r - down) >= (up - down) * 0.5, up_i, down_i)
        return c

    @triton.jit
    def _packed_bytes(offs, mask):
        """The tile's bytes of packed codes: (byte offset, live) per (even, odd) element pair; a byte is live
        iff its even element is (tiles start at even offsets)."""
        first, _ = tl.split(group_view(offs, 2))
        live, _ = tl.split(group_view(mask.to(tl.int32), 2))
        return first // 2, live != 0

    @triton.jit
    def triton_encode_q4(x, q_ptr, s_ptr, offs, mask, start, count, SIGNED: tl.constexpr):
        """Store the tile ``x``: packed codes at ``q_ptr`` (uint8, byte k holds elements 2k (high nibble)
        and 2k+1), block scales at ``s_ptr`` (fp32)."""
        r, s = _normalized(x, mask, 128)
        c = _q4_code(r, SIGNED)
        hi, lo = tl.split(group_view(c, 2))  # (even, odd) element pairs
        byte, live = _packed_bytes(offs, mask)
        store_u8(q_ptr + byte, (hi << 4) | lo, live)
        store_group_values(s_ptr, s, start, count, x, 128)

    @triton.jit
    def triton_decode_q4(q_ptr, s_ptr, offs, mask, start, count, SIGNED: tl.constexpr, table=None):
        b = load_u8(q_ptr + offs // 2, mask)  # each element loads its own byte (an L1 hit for the odd one)
        c = (b >> ((1 - (offs & 1)) * 4)) & 15  # the even element in the high nibble
        s = load_group_values(s_ptr, start, count, offs, 128)
        return tl.where(mask, _q4_value(c, SIGNED, table) * s, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Codecs
# ----------------------------------------------------------------------------------------------------------
class Q8Dynamic(Codec):
    """bitsandbytes-style 8-bit dynamic map, blocks of 256, fp32 absmax per block (1.015625 B/element).

    Option ``signed`` (default true): the signed map for states that can be negative (m); false picks the
    unsigned map (v, which must be >= 0: a negative value takes code 0).

    Kernel constant. Besides this state's two buffers the Triton code reads one table (the 256 map values,
    the 255 midpoints, and a byte per bucket of x/s): ``dynamic.qmap_table(signed, device)``, a module-level tensor
    cached per device. ``constants`` lists it as (kernel argument name, host expression with ``{device}``):
    a backend adds one pointer argument of that name per distinct entry to the kernel (shared by every
    q8_dynamic tensor with the same map) and passes the tensor at launch; the Triton renderings refer to
    it by that name. The PyTorch renderings need nothing: they fetch the cached table themselves.
    """

    name = "q8_dynamic"
    register_cap = 56
    roles = frozenset({"state"})
    group_size = Q8_BLOCK
    imports = ("from optgen.codecs import dynamic",)

    def __init__(self, options: dict[str, Any], fail) -> None:
        signed = self.signed = self._bool_option(options, "signed", True, fail)
        self.table_arg = "qmap_signed" if signed else "qmap_unsigned"
        self.constants = ((self.table_arg, f"dynamic.qmap_table({signed}, {{device}})"),)

    def buffers(self) -> list[Buffer]:
        return [Buffer("", "uint8"), Buffer("absmax", "float32", 0.0, "groups")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = dynamic.torch_decode_q8({refs[0]}, {refs[1]}, {self.signed})"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"dynamic.torch_encode_q8({value}, {refs[0]}, {refs[1]}, {self.signed})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [(f"{out} = dynamic.triton_decode_q8({ptrs[0]}, {ptrs[1]}, {self.table_arg}, {offs}, {mask}, "
                f"start, numel_here)")]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [(f"dynamic.triton_encode_q8({value}, {ptrs[0]}, {ptrs[1]}, {self.table_arg}, {offs}, {mask}, "
                 f"start, numel_here, {self.signed})")]


class Q4Codec(Codec):
    """torchao-style 4-bit state: blocks of 128, fp32 scale per block, two codes per byte, the even element
    in the high nibble (codes buffer shape "half"; 0.53125 B/element).

    The PyTorch decode needs the element count (an odd count leaves a pad nibble) and the interface gives
    it none, so the rendering names it: ``numel_expr`` (default ``param[i].numel()``, the PyTorch
    backend's expression for the parameter of the tensor being decoded; every state has its shape).
    """

    roles = frozenset({"state"})
    group_size = Q4_BLOCK
    # No register cap: since its codes load as bytes (cee3e6a) the kernel takes 78 registers without spilling, and
    # uncapped it steps faster than at 64 (H100, eighteenth session, AdamW4bit back to back, three runs: large set
    # 1.704-1.738 against 1.807-1.841 ms, GPT-2 set 0.720-0.728 against 0.753-0.759).
    imports = ("from optgen.codecs import dynamic",)
    signed: bool
    numel_expr = "param[i].numel()"

    def __init__(self, options: dict[str, Any], fail) -> None:
        """Option ``whole_groups`` (default false): quantize only tensors whose size is a multiple of the block, as
        torchao does (a tensor of another size keeps fp32 states; torchao's keep the parameter's dtype)."""
        self.whole_groups = self._bool_option(options, "whole_groups", False, fail)

    def buffers(self) -> list[Buffer]:
        return [Buffer("", "uint8", 0.0, "half"), Buffer("scale", "float32", 0.0, "groups")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = dynamic.torch_decode_q4({refs[0]}, {refs[1]}, {self.numel_expr}, {self.signed})"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"dynamic.torch_encode_q4({value}, {refs[0]}, {refs[1]}, {self.signed})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        table = ", qmap4_signed" if self.signed else ""
        return [(f"{out} = dynamic.triton_decode_q4({ptrs[0]}, {ptrs[1]}, {offs}, {mask}, start, numel_here, "
                f"{self.signed}{table})")]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [(f"dynamic.triton_encode_q4({value}, {ptrs[0]}, {ptrs[1]}, {offs}, {mask}, start, numel_here, "
                f"{self.signed})")]


class Q4Dynamic(Q4Codec):
    """Signed 4-bit dynamic map (torchao's first moment): ±{0.0055 ... 0.8875}, 0, 1.0. Its Triton decode reads
    the 16 values from the kernel constant ``dynamic.q4_map(True, device)`` (as ``Q8Dynamic`` reads its table)."""

    name = "q4_dynamic"
    signed = True
    constants = (("qmap4_signed", "dynamic.q4_map(True, {device})"),)


class Q4Linear(Q4Codec):
    """Unsigned 4-bit linear map {1/16, ..., 1} without zero (torchao's second moment; for x >= 0)."""

    name = "q4_linear"
    signed = False
