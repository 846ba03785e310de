"""8-bit group-quantized states with FlashOptim's companding: ``q8_linear``, ``q8_softsign``, ``q8_sqrt``.

Layout: the flat tensor is cut into groups of ``G`` consecutive elements (32 by default; the last group may
be partial and its padding counts as 0). Each group keeps one fp16 scale (buffer suffix "scale", shape
"groups") and each element one 8-bit code (shape "param").

Encode, fp32 math, one group (``x`` its values, ``s`` computed in fp32, the codes use the fp32 ``s``;
``n = x·fp32(1/s)``: one division per group, not per element):

=========== ========= ============================== =====================================================
codec       code      s                              code
=========== ========= ============================== =====================================================
q8_linear   int8      max(max|x|, 1e-12)             q = floor(127·n + 0.5)
q8_softsign int8      max(max|x|, 1e-12)             y = 2n/(1+|n|); q = floor(127·y + 0.5)
q8_sqrt     uint8     max(max √x, 1e-12)             q = floor(255·n + 0.5) (on √x)
=========== ========= ============================== =====================================================

The stored scale is fp16(s) (round to nearest even: s < 2^-25 stores 0 and decodes its group to 0,
s > 65504 stores inf). Decode uses the stored scale ``S``:
    q8_linear:   x = (q·r127)·S            (r127 = fp32(1/127))
    q8_softsign: x = (q/(254 − |q|))·S     (= y/(2 − |y|) with y = q/127, rounded once)
    q8_sqrt:     x = ((q·r255)·S)²         (r255 = fp32(1/255))

Rounding, identical in both backends (the Triton and PyTorch paths produce the same bits):
- every division is correctly rounded (PyTorch divides tensor by tensor, never by a Python scalar: CUDA
  PyTorch turns ``x / c`` into ``x * (1/c)``); the Triton side takes 1/s, 2n/(1+|n|) and q/(254 − |q|) by the
  fast path of the GPU's own division without its slow-path call (``optgen.codecs.division.quotient``, exact
  for these inputs: checked on every fp32 s in [1e-12, 2^126], every n in [-1, 1] and every code on an H100,
  tests/test_exact_math.py; for |n| < 2^-101, where it may be off by an ulp, the code is 0 either way).
  Above 2^126, where 1/s would be subnormal (and fp16 stores the scale as inf), both sides take 1/s = 0;
  √ is correctly rounded
  (``tl.sqrt_rn``; PyTorch takes it in float64 and rounds to fp32, because its fp32 CPU ``sqrt`` is off by
  one ulp in ~17% of elements);
- ``floor(k·y + 0.5)`` (k = 127 or 255, |y| <= 1) is the same whether ``k·y + 0.5`` is rounded once
  (a contracted multiply-add, as the GPU compiler may emit) or twice: near a code boundary k·y and
  k·y + 0.5 lie in the same binade, so adding 0.5 to the rounded product is exact. Plain fp32 ops are
  therefore used on both sides (tests/test_codecs_quant.py checks this on every boundary).
- decode divides nothing but ``q/(254 − |q|)`` (exact small integers, correctly rounded).
Non-finite values: a group holding a NaN gets a NaN scale (so it decodes to NaN, visibly), and a code that
would come from a NaN is 0; ±inf gives an inf scale. Both backends agree on this too.

Decode error, per element of a group with fp32 scale s and stored S (|S − s| <= 2^-11·s while s is in
fp16's normal range [2^-14, 65504]; coarser for fp16-subnormal s), n̂ the decoded normalized value:
    q8_linear:   |x̂ − x| <= s·(0.5/127) + |n̂|·|S − s|
    q8_softsign: |x̂ − x| <= s·|f⁻¹(ŷ ± 0.5/127) − n̂| + |n̂|·|S − s|,  f⁻¹(y) = y/(2 − |y|): the first term
                 is ≈ s/507 for entries near 0 and at most s/127 near the group max
    q8_sqrt:     |√v̂ − √v| <= s·(0.5/255) + (q/255)·|S − s|, and |v̂ − v| = |√v̂ − √v|·(√v̂ + √v)
plus a few fp32 ulps (tests/test_codecs_quant.py checks these bounds element by element).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from optgen.codecs.base import Buffer, Codec
from optgen.runtime.torch_math import sqrt_rn

try:  # the module must import without Triton (then only the PyTorch path exists)
    import triton
    import triton.language as tl

    from optgen.codecs.division import nvidia_ptx, quotient, reciprocal_estimate
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None

SCALE_FLOOR = 1e-12  # s = max(absmax, SCALE_FLOOR), as FlashOptim
RECIPROCAL_MAX = 2.0**126  # 1/s for larger s would be subnormal: it is taken as 0 (see the docstring)
GROUP_SIZES = (32, 64, 128, 256)
KINDS = ("linear", "softsign", "sqrt")
# fp32 reciprocals used by decode, as exact Python floats (so torch and Triton multiply by the same value)
R127 = float(torch.tensor(1.0 / 127.0, dtype=torch.float32))
R255 = float(torch.tensor(1.0 / 255.0, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------------
# PyTorch: flat 1-D fp32 values; no .item(), no data-dependent branching (torch.compile friendly)
# ----------------------------------------------------------------------------------------------------------
def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[numel] -> [ceil(numel/group), group], the last group padded with zeros."""
    pad = (-x.numel()) % group
    return F.pad(x, (0, pad)).view(-1, group)


def round_half_up(y: torch.Tensor, k: float) -> torch.Tensor:
    """floor(k·y + 0.5) in fp32 (the same with or without a fused multiply-add, see the module docstring)."""
    return torch.floor(y * k + 0.5)


def quantize(x: torch.Tensor, group: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``x`` -> (codes [numel] int8 (uint8 for "sqrt"), scales [ceil(numel/group)] fp16)."""
    n = x.numel()
    x = x.reshape(-1).float()
    if kind == "sqrt":
        x = sqrt_rn(x)
    g = _groups(x, group)
    s = g.abs().amax(dim=1).clamp_min(SCALE_FLOOR)  # amax propagates NaN
    inv = torch.where(s <= RECIPROCAL_MAX, torch.ones_like(s) / s, torch.zeros_like(s))  # as scale_reciprocal
    r = g * inv[:, None]  # one division per group, as the kernel
    if kind == "softsign":
        r = (2.0 * r) / (1.0 + r.abs())
    q = round_half_up(r, 255.0 if kind == "sqrt" else 127.0)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    codes = q.reshape(-1)[:n].to(torch.uint8 if kind == "sqrt" else torch.int8)
    return codes, s.to(torch.float16)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group: int, kind: str) -> torch.Tensor:
    """Codes (any shape, numel elements) and fp16 scales -> flat fp32 values."""
    n = codes.numel()
    q = codes.reshape(-1).float()
    s = scale.reshape(-1).float().repeat_interleave(group)[:n]
    if kind == "softsign":
        return (q / (254.0 - q.abs())) * s
    if kind == "sqrt":
        w = (q * R255) * s
        return w * w
    return (q * R127) * s


def torch_encode(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group: int, kind: str) -> None:
    """Store the flat fp32 ``x`` into ``codes`` (parameter-shaped) and ``scale`` in place."""
    q, s = quantize(x, group, kind)
    codes.copy_(q.view(codes.shape))
    scale.copy_(s)


def torch_decode(codes: torch.Tensor, scale: torch.Tensor, group: int, kind: str) -> torch.Tensor:
    return dequantize(codes, scale, group, kind)


# ----------------------------------------------------------------------------------------------------------
# Triton: 2-D fp32 tiles [ROWS, COLS]; groups are G consecutive elements of a row (COLS % G == 0)
# ----------------------------------------------------------------------------------------------------------
if triton is not None:
    _R127 = tl.constexpr(R127)
    _R255 = tl.constexpr(R255)

    _RECIPROCAL_MAX = tl.constexpr(RECIPROCAL_MAX)
    _FLOOR_BITS = tl.constexpr(int(torch.tensor(SCALE_FLOOR, dtype=torch.float32).view(torch.int32)))

    # Grouped tiles have COLS == G (one group per row, see optgen.build): then a group is a row, and every
    # per-group step below is a plain row reduction or broadcast, with no reshape (a reshape makes Triton
    # move the tile through shared memory). Other tiles (COLS a multiple of G) take the reshaping path.
    @triton.jit
    def group_view(x, G: tl.constexpr):
        """[ROWS, COLS] -> [ROWS*COLS/G, G]: one group per row."""
        if x.shape[1] != G:
            x = tl.reshape(x, (x.shape[0] * x.shape[1] // G, G))
        return x

    @triton.jit
    def group_broadcast(s, like, G: tl.constexpr):
        """Per-group values [ROWS*COLS/G] -> a tile shaped like ``like`` (each value repeated G times)."""
        if like.shape[1] == G:
            out = tl.broadcast_to(s[:, None], like.shape)
        else:
            out = tl.reshape(tl.broadcast_to(s[:, None], (like.shape[0] * like.shape[1] // G, G)), like.shape)
        return out

    @triton.jit
    def group_absmax(x, G: tl.constexpr):
        """max(max|x|, 1e-12) per group; NaN if the group holds a NaN. One integer reduction: the bit
        patterns of |x| order like the values and every NaN lies above inf (a float max may drop NaN)."""
        u = group_view(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, G)
        a = tl.maximum(tl.max(u, axis=1), _FLOOR_BITS)
        return tl.where(a > 0x7F800000, float("nan"), a.to(tl.float32, bitcast=True))

    @triton.jit
    def tile_groups(start, count, like, G: tl.constexpr):
        """The tile's groups: (index of each group in the tensor, live mask), vectors of ROWS*COLS/G. Per-group
        loads and stores go through these (a plain row vector when COLS == G) rather than a per-element
        ``offs // G``, whose column-major access made Triton shuffle every tile through shared memory."""
        groups = start // G + tl.arange(0, like.shape[0] * like.shape[1] // G)
        return groups, groups * G < count

    @triton.jit
    def load_group_values(ptr, start, count, like, G: tl.constexpr):
        """The tile's per-group values (one per group at ``ptr + group index``) as an fp32 tile shaped like
        ``like``, each repeated over its group (0 for groups past the end)."""
        groups, live = tile_groups(start, count, like, G)
        return group_broadcast(tl.load(ptr + groups, mask=live, other=0.0).to(tl.float32), like, G)

    @triton.jit
    def store_group_values(ptr, s, start, count, like, G: tl.constexpr):
        """Store the per-group values ``s`` (a vector of ROWS*COLS/G) at ``ptr + group index``, live groups only."""
        groups, live = tile_groups(start, count, like, G)
        tl.store(ptr + groups, s, mask=live)

    @triton.jit
    def scale_reciprocal(s):
        """1/s for a group scale s >= 1e-12: correctly rounded up to 2^126 (checked on every such s on an H100),
        0 above (its fp16 scale is inf: the group is lost anyway) and for NaN (every code is 0 then)."""
        return tl.where(s <= _RECIPROCAL_MAX, quotient(1.0, s, reciprocal_estimate(s)), 0.0)

    @triton.jit
    def softsign(r):
        """2r/(1 + |r|) for |r| <= 1, as the correctly rounded quotient where |r| >= 2^-101; below, where it may
        be off, every value gives code 0 all the same (checked on every fp32 r in [-1, 1] on an H100)."""
        d = 1.0 + tl.abs(r)
        return quotient(2.0 * r, d, reciprocal_estimate(d))

    @triton.jit
    def inverse_softsign(q):
        """q/(254 - |q|) for the integer codes q in [-127, 127], correctly rounded (checked on all of them;
        q = 0 gives 0)."""
        d = 254.0 - tl.abs(q)
        return quotient(q, d, reciprocal_estimate(d))

    @triton.jit
    def floor_code(y):
        """floor(y) as an int32 code, 0 for NaN: on an NVIDIA GPU one ``cvt.rmi.s32.f32`` (PTX converts NaN to 0),
        in place of a floor, a NaN test and a conversion (the interpreter and other GPUs run those three)."""
        if nvidia_ptx():
            code = tl.inline_asm_elementwise("cvt.rmi.s32.f32 $0, $1;", "=r,r", [y], dtype=tl.int32, is_pure=True,
                                             pack=1)
        else:
            q = tl.floor(y)
            code = tl.where(q == q, q, 0.0).to(tl.int32)  # noqa: PLR0124
        return code

    @triton.jit
    def _encode(x, q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr, KIND: tl.constexpr):
        # KIND: 0 linear, 1 softsign, 2 sqrt
        x = tl.where(mask, x, 0.0)
        if KIND == 2:
            x = tl.sqrt_rn(x)
        s = group_absmax(x, G)
        r = x * group_broadcast(scale_reciprocal(s), x, G)
        if KIND == 1:
            r = softsign(r)
        if KIND == 2:
            tl.store(q_ptr + offs, floor_code(r * 255.0 + 0.5).to(tl.uint8), mask=mask)
        else:
            tl.store(q_ptr + offs, floor_code(r * 127.0 + 0.5).to(tl.int8), mask=mask)
        store_group_values(s_ptr, s.to(tl.float16), start, count, x, G)

    @triton.jit
    def _decode(q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr, KIND: tl.constexpr):
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        s = load_group_values(s_ptr, start, count, q, G)
        if KIND == 1:
            out = inverse_softsign(q) * s
        elif KIND == 2:
            w = (q * _R255) * s
            out = w * w
        else:
            out = (q * _R127) * s
        return out

    @triton.jit
    def triton_encode_linear(x, q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr):
        _encode(x, q_ptr, s_ptr, offs, mask, start, count, G, 0)

    @triton.jit
    def triton_encode_softsign(x, q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr):
        _encode(x, q_ptr, s_ptr, offs, mask, start, count, G, 1)

    @triton.jit
    def triton_encode_sqrt(x, q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr):
        _encode(x, q_ptr, s_ptr, offs, mask, start, count, G, 2)

    @triton.jit
    def triton_decode_linear(q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr):
        return _decode(q_ptr, s_ptr, offs, mask, start, count, G, 0)

    @triton.jit
    def triton_decode_softsign(q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr):
        return _decode(q_ptr, s_ptr, offs, mask, start, count, G, 1)

    @triton.jit
    def triton_decode_sqrt(q_ptr, s_ptr, offs, mask, start, count, G: tl.constexpr):
        return _decode(q_ptr, s_ptr, offs, mask, start, count, G, 2)


# ----------------------------------------------------------------------------------------------------------
# Codecs
# ----------------------------------------------------------------------------------------------------------
class Q8Grouped(Codec):
    """Base of the three FlashOptim 8-bit formats; option ``group`` (32, 64, 128 or 256, default 32)."""

    roles = frozenset({"state"})
    imports = ("from optgen.codecs import q8",)
    kind: str
    code_dtype: str

    def __init__(self, options: dict[str, Any], fail) -> None:
        unknown = sorted(set(options) - {"group"})
        if unknown:
            raise fail(f"storage '{self.name}' takes only the option 'group', got: {', '.join(unknown)}")
        group = options.get("group", 32)
        if isinstance(group, bool) or group not in GROUP_SIZES:
            raise fail(f"storage '{self.name}': group must be one of {', '.join(map(str, GROUP_SIZES))}, "
                       f"got {group!r}")
        self.group_size = int(group)  # instance attributes shadow the ClassVar defaults
        self.aligned_hint = self.group_size < 128  # measured with groups of 32 (FlashAdamW: 1.7x); 128, 256 without

    def buffers(self) -> list[Buffer]:
        return [Buffer("", self.code_dtype), Buffer("scale", "float16", 0.0, "groups")]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = q8.torch_decode({refs[0]}, {refs[1]}, {self.group_size}, {self.kind!r})"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"q8.torch_encode({value}, {refs[0]}, {refs[1]}, {self.group_size}, {self.kind!r})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [(f"{out} = q8.triton_decode_{self.kind}({ptrs[0]}, {ptrs[1]}, {offs}, {mask}, start, numel_here, "
                f"{self.group_size})")]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [(f"q8.triton_encode_{self.kind}({value}, {ptrs[0]}, {ptrs[1]}, {offs}, {mask}, start, numel_here, "
                f"{self.group_size})")]


class Q8Linear(Q8Grouped):
    """int8 codes, linear: q = floor(127·x/s + 0.5), fp16 absmax scale per group (1.0625 B/element)."""

    name = "q8_linear"
    kind = "linear"
    code_dtype = "int8"


class Q8Softsign(Q8Grouped):
    """int8 codes, FlashOptim momentum companding y = 2n/(1+|n|) of n = x/absmax (1.0625 B/element)."""

    name = "q8_softsign"
    kind = "softsign"
    code_dtype = "int8"


class Q8Sqrt(Q8Grouped):
    """uint8 codes of √x / max √x, FlashOptim variance companding; for non-negative states (1.0625 B/element)."""

    name = "q8_sqrt"
    kind = "sqrt"
    code_dtype = "uint8"
