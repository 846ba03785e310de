"""Master weights split as FlashOptim does: the narrow value the model computes with (bf16 or fp16) plus a
signed integer correction scaled by that value's own ULP: ``bf16+ecc8``, ``bf16+ecc16``, ``fp16+ecc8``, and
``narrow+ecc8`` (bf16+ecc8 or fp16+ecc8, whichever the parameter's dtype is).

Encode an fp32 master x (M mantissa bits of the narrow format, N = 127 or 32767):
  p = round_to_nearest_even(x);  E = unbiased exponent of p (1 - bias when p is 0 or subnormal)
  l = E - M - 1  (2^l is half an ULP of p);  e = x - p (exact)
  rho = round_half_away(e * 2^-l * N)  (|e * 2^-l| <= 1, as p is x rounded to nearest)
Decode: x = p + (rho / N) * 2^l. Error <= ULP(p) / (4N) plus half an fp32 ulp of x (the decode rounds to
fp32, which dominates for bf16+int16): about 1.5e-5 relative for bf16+int8, 1.2e-7 for
bf16+int16, 1.9e-6 for fp16+int8. Powers of two are built from the exponent bits of p: decode multiplies by
2^l = 2^E * 2^-(M+1), encode by 2^(1-E) (normal for every E) and then by the exact constant 2^M * N (2^-l
alone can overflow fp32); every product but the last is exact. A non-finite p keeps rho = 0. Both backends
run the same fp32 operations (the Triton launcher disables FMA contraction, which would change z*N + 0.5
near ties); bf16 moves as bits (optgen.codecs.rounding: the interpreter's bf16 casts mangle subnormals); the
interpreter's fp16 casts match torch (checked on every fp16 pattern and on ties/subnormals in
tests/test_codecs_bf16_exact.py).

The codes equal the float64 encode (``reference_encode``) except where the exact z*N lies within the fp32
rounding of z*N (and of z*N + 0.5) of a half-integer: there a code may be one step off (counted in tests).

Public API: torch_decode(p, ecc, fmt, n) -> flat fp32; torch_encode(x, p, ecc, fmt, n) -> None (in place);
triton_decode(p_ptr, e_ptr, offs, mask, MANT, EMIN, N) -> fp32 tile and triton_encode(x, p_ptr, e_ptr, offs,
mask, MANT, EMIN, N) (@triton.jit); reference_encode(x, fmt, n) -> (p, rho) and reference_decode(p, ecc, fmt,
n) in float64 for tests.
"""

from __future__ import annotations

import torch

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.rounding import torch_round_bf16, torch_to_bf16

try:
    import triton
    import triton.language as tl

    from optgen.codecs.division import quotient
    from optgen.codecs.rounding import tl_from_bf16, tl_load_bf16, tl_round_bf16
except ImportError:  # pragma: no cover - without Triton only the PyTorch functions exist
    triton = None

FORMATS = {"bf16": (7, -126), "fp16": (10, -14)}  # mantissa bits, exponent of the smallest normal
MAX_EXP = {"bf16": 127, "fp16": 15}  # exponent of the largest finite value


# ----------------------------------------------------------------------------------------------- PyTorch
def _exponent_bits(p32: torch.Tensor, fmt: str) -> torch.Tensor:
    """The exponent field of p32 (as int32 bits, mantissa 0), at least the narrow format's smallest normal's:
    the bits of 2^E, E the exponent the ULP of p32 in the narrow format is taken from."""
    return torch.clamp(p32.view(torch.int32) & 0x7F800000, min=(FORMATS[fmt][1] + 127) << 23)


def _half_ulp(p32: torch.Tensor, fmt: str) -> torch.Tensor:
    """2^(E - M - 1), half an ULP of p32 in the narrow format (finite, also for an inf or NaN p32)."""
    bits = torch.clamp(_exponent_bits(p32, fmt), max=0x7F000000)  # E <= 127 for an inf or NaN p32
    return bits.view(torch.float32) * 2.0 ** -(FORMATS[fmt][0] + 1)


def _inverse_exponent(p32: torch.Tensor, fmt: str) -> torch.Tensor:
    """2^(1 - E) (normal for every E in [-126, 127]; 0 for an inf or NaN p32)."""
    return (0x7F800000 - _exponent_bits(p32, fmt)).view(torch.float32)


def _round_narrow(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """RNE to the narrow format, as an fp32 tensor (torch's fp16 cast is RNE with subnormals)."""
    return torch_round_bf16(x) if fmt == "bf16" else x.to(torch.float16).float()


NARROW_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def ecc8_dtype(dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of ``narrow+ecc8``'s correction for a parameter of ``dtype``: int8 codes, for fp16 their
    bits in a uint8 tensor. A correction made for one format is then refused, not read in the other, when the
    parameter's dtype changes between bf16 and fp16 or a checkpoint of the other is loaded (the state checks
    compare dtypes)."""
    return torch.uint8 if dtype == torch.float16 else torch.int8


def _codes(ecc: torch.Tensor) -> torch.Tensor:
    """The signed codes of a correction buffer (a uint8 one holds int8 bits)."""
    return ecc.view(torch.int8) if ecc.dtype == torch.uint8 else ecc


def _format(p: torch.Tensor, fmt: str) -> str:
    """``fmt``, or the format of the narrow tensor ``p`` itself where ``fmt`` is "param" (``narrow+ecc8``)."""
    return NARROW_FORMATS[p.dtype] if fmt == "param" else fmt


def torch_decode(p: torch.Tensor, ecc: torch.Tensor, fmt: str, n: int) -> torch.Tensor:
    """The fp32 master weight (flat) from the narrow value and its correction."""
    fmt = _format(p, fmt)
    p32 = p.reshape(-1).float()
    frac = _codes(ecc).reshape(-1).float() / torch.full((), float(n), device=p32.device)
    return p32 + frac * _half_ulp(p32, fmt)


def torch_encode(x: torch.Tensor, p: torch.Tensor, ecc: torch.Tensor, fmt: str, n: int) -> None:
    """Store the fp32 master x (flat) as narrow value + correction, in place."""
    fmt = _format(p, fmt)
    p32 = _round_narrow(x, fmt)
    z = (x - p32) * _inverse_exponent(p32, fmt) * float(2 ** FORMATS[fmt][0] * n)  # |z| <= n: p32 is x rounded
    rho = torch.sign(z) * torch.floor(torch.abs(z) + 0.5)
    rho = torch.where(torch.isfinite(p32), rho, 0.0)  # x inf or NaN gives p32 inf or NaN
    p.copy_((torch_to_bf16(p32) if fmt == "bf16" else p32.to(torch.float16)).view(p.shape))
    codes = _codes(ecc)
    codes.copy_(rho.to(codes.dtype).view(codes.shape))


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def _exponent_bits_tl(p32, EMIN: tl.constexpr):
        return tl.maximum(p32.to(tl.int32, bitcast=True) & 0x7F800000, (EMIN + 127) << 23)

    @triton.jit
    def triton_decode(p_ptr, e_ptr, offs, mask, MANT: tl.constexpr, EMIN: tl.constexpr, N: tl.constexpr):
        if MANT == 7:
            p32 = tl_load_bf16(p_ptr + offs, mask)
        else:
            p32 = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rho = tl.load(e_ptr + offs, mask=mask, other=0)
        if e_ptr.dtype.element_ty == tl.uint8:  # int8 codes kept in a uint8 tensor (an fp16 parameter's)
            rho = rho.to(tl.int8, bitcast=True)
        rho = rho.to(tl.float32)
        exponent = tl.minimum(_exponent_bits_tl(p32, EMIN), 0x7F000000).to(tl.float32, bitcast=True)
        # rho/N: an integer |rho| <= N <= 32767 over N, correctly rounded (every code checked in tests)
        return p32 + quotient(rho, N * 1.0, 1.0 / N) * (exponent * (0.5 ** (MANT + 1)))

    @triton.jit
    def triton_encode(x, p_ptr, e_ptr, offs, mask, MANT: tl.constexpr, EMIN: tl.constexpr, N: tl.constexpr):
        if MANT == 7:
            narrow = tl_round_bf16(x, 0, False)
            p32 = tl_from_bf16(narrow)
        else:
            narrow = x.to(tl.float16)
            p32 = narrow.to(tl.float32)
        inverse = (0x7F800000 - _exponent_bits_tl(p32, EMIN)).to(tl.float32, bitcast=True)
        z = (x - p32) * inverse * ((2**MANT) * N)
        # |z| <= N (p32 is x rounded to nearest) where p32 is finite; p32 is not finite exactly where x is not
        # finite or rounds to inf, and there rho = 0
        z = tl.where(tl.abs(p32) < float("inf"), z, 0.0)
        # half away from zero: truncate z + copysign(0.5, z), the same float as sign(z) * floor(|z| + 0.5)
        half = ((z.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F000000).to(tl.float32, bitcast=True)
        rho = (z + half).to(tl.int32)
        tl.store(p_ptr + offs, narrow, mask=mask)
        if e_ptr.dtype.element_ty == tl.uint8:
            tl.store(e_ptr + offs, rho.to(tl.int8).to(tl.uint8, bitcast=True), mask=mask)
        else:
            tl.store(e_ptr + offs, rho.to(e_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def triton_decode_narrow(p_ptr, e_ptr, offs, mask, N: tl.constexpr):
        """``triton_decode`` in the format of ``p_ptr``'s elements (bf16 or fp16), known when the kernel compiles."""
        if p_ptr.dtype.element_ty == tl.float16:
            out = triton_decode(p_ptr, e_ptr, offs, mask, 10, -14, N)
        else:
            out = triton_decode(p_ptr, e_ptr, offs, mask, 7, -126, N)
        return out

    @triton.jit
    def triton_encode_narrow(x, p_ptr, e_ptr, offs, mask, N: tl.constexpr):
        """``triton_encode`` in the format of ``p_ptr``'s elements (bf16 or fp16)."""
        if p_ptr.dtype.element_ty == tl.float16:
            triton_encode(x, p_ptr, e_ptr, offs, mask, 10, -14, N)
        else:
            triton_encode(x, p_ptr, e_ptr, offs, mask, 7, -126, N)


# ----------------------------------------------------------------------------------------------- codecs
class EccCodec(Codec):
    """Narrow parameter (suffix "") + integer correction (suffix "ecc"), see the module docstring."""

    roles = frozenset({"param"})
    imports = ("from optgen.codecs import ecc",)
    fmt: str
    narrow_dtype: str
    ecc_dtype: str
    n: int

    def buffers(self) -> list[Buffer]:
        return [Buffer("", self.narrow_dtype), Buffer("ecc", self.ecc_dtype)]

    def _args(self) -> str:
        mant, emin = FORMATS[self.fmt]
        return f"{mant}, {emin}, {self.n}"

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = ecc.torch_decode({refs[0]}, {refs[1]}, {self.fmt!r}, {self.n})"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"ecc.torch_encode({value}, {refs[0]}, {refs[1]}, {self.fmt!r}, {self.n})"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = ecc.triton_decode({ptrs[0]}, {ptrs[1]}, {offs}, {mask}, {self._args()})"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"ecc.triton_encode({value}, {ptrs[0]}, {ptrs[1]}, {offs}, {mask}, {self._args()})"]


class Bf16Ecc8(EccCodec):
    name, fmt, narrow_dtype, ecc_dtype, n = "bf16+ecc8", "bf16", "bfloat16", "int8", 127
    param_dtypes = ("bfloat16",)


class Bf16Ecc16(EccCodec):
    name, fmt, narrow_dtype, ecc_dtype, n = "bf16+ecc16", "bf16", "bfloat16", "int16", 32767
    param_dtypes = ("bfloat16",)


class Fp16Ecc8(EccCodec):
    name, fmt, narrow_dtype, ecc_dtype, n = "fp16+ecc8", "fp16", "float16", "int8", 127
    param_dtypes = ("float16",)


class NarrowEcc8(EccCodec):
    """The parameter's own 16-bit format, bf16 or fp16, + int8 correction: FlashOptim's choice per parameter
    (bf16+ecc8 for a bf16 parameter, fp16+ecc8 for an fp16 one), in one layout."""

    name, fmt, narrow_dtype, ecc_dtype, n = "narrow+ecc8", "param", "param", "ecc8", 127
    param_dtypes = ("bfloat16", "float16")

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = ecc.triton_decode_narrow({ptrs[0]}, {ptrs[1]}, {offs}, {mask}, {self.n})"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"ecc.triton_encode_narrow({value}, {ptrs[0]}, {ptrs[1]}, {offs}, {mask}, {self.n})"]


def _reference_rne(x64: torch.Tensor, fmt: str) -> torch.Tensor:
    """float64 round to nearest even into the narrow format, from frexp (not bits); overflow gives inf."""
    mant, emin = FORMATS[fmt]
    a = x64.abs()
    _, e = torch.frexp(a)
    q = torch.exp2((torch.clamp(e - 1, min=emin) - mant).double())  # the ULP at |x|
    steps = torch.floor(a / q)
    f = a / q - steps  # exact (power-of-two scaling of a value with at most 53 bits)
    up = (f > 0.5) | ((f == 0.5) & (torch.remainder(steps, 2) == 1))
    mag = (steps + up.double()) * q
    mag = torch.where(mag >= 2.0 ** (MAX_EXP[fmt] + 1), torch.inf, mag)
    return torch.where(torch.isfinite(x64), torch.where(x64 < 0, -mag, mag), x64)


def reference_encode(x: torch.Tensor, fmt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 encode for tests, from the definition: (p, rho) as float64 tensors (flat)."""
    mant, emin = FORMATS[fmt]
    x64 = x.double().reshape(-1)
    p = _reference_rne(x64, fmt)
    _, e = torch.frexp(p)
    exp = torch.where(p == 0, emin, torch.clamp(e - 1, min=emin))
    half_ulp = torch.exp2((exp - mant - 1).double())
    zn = torch.clamp((x64 - p) / half_ulp, -1.0, 1.0) * n
    rho = torch.sign(zn) * torch.floor(zn.abs() + 0.5)
    rho = torch.where(torch.isfinite(p) & torch.isfinite(x64), rho, 0.0)
    return p, rho


def reference_decode(p: torch.Tensor, ecc: torch.Tensor, fmt: str, n: int) -> torch.Tensor:
    """float64 decode for tests, written from the definition (frexp, not bit tricks)."""
    mant, emin = FORMATS[fmt]
    p64 = p.double().reshape(-1)
    _, e = torch.frexp(p64)  # p = f * 2^e with f in [0.5, 1): unbiased exponent E = e - 1
    exp = torch.where(p64 == 0, emin, torch.clamp(e - 1, min=emin))  # frexp(0) gives exponent 0
    return p64 + ecc.double().reshape(-1) / n * torch.pow(2.0, (exp - mant - 1).double())


__all__ = ["Bf16Ecc8", "Bf16Ecc16", "Fp16Ecc8", "reference_decode", "reference_encode", "torch_decode",
           "torch_encode"]
