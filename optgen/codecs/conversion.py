"""Integer codes to fp32 on the GPU's arithmetic pipe rather than its conversion unit.

On sm_90 a conversion of an 8- or 16-bit integer to fp32 (``I2F``) runs on the same narrow unit as the
reciprocals, square roots and fp32-to-integer conversions (16 per clock per SM, against 128 fp32 adds), of
which a q8 kernel needs several per element. ``int_to_float`` widens the code to 32 bits and converts that by
``cvt.rn.f32.s32``, which ptxas compiles to the full-rate ``I2FP.F32.S32``: a plain ``.to(tl.float32)`` of an
int8 is folded by LLVM into an 8-bit conversion (``I2F.S16``). The value is the same (every |q| < 2^24 is
exact in fp32); the interpreter, which runs no inline assembly, takes the plain conversion.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    from optgen.codecs.division import INTERPRETED
except ImportError:  # pragma: no cover - without Triton there is nothing to define
    triton = None

if triton is not None:

    @triton.jit
    def int_to_float(q):
        """fp32(q) for an integer tile (exact: |q| < 2^24)."""
        if INTERPRETED:
            y = q.to(tl.float32)
        else:
            y = tl.inline_asm_elementwise("cvt.rn.f32.s32 $0, $1;", "=r,r", [q.to(tl.int32)], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return y
