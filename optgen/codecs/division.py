"""Correctly rounded fp32 quotients for the codecs, cheaper than ``tl.div_rn`` on the GPU.

``tl.div_rn`` compiles to the GPU's ``div.rn.f32``: a refined reciprocal, one fused correction of the
quotient, then a range check that calls a slow path (denormals, huge exponents). The check and the call cost
instructions and registers at every use. ``quotient`` is the fast path alone, from the same first estimate of
``1/b`` (``reciprocal_estimate``: the GPU's ``rcp.approx.ftz.f32``, within an ulp for normal ``b``; Triton's
own ``1.0 / b`` would be a range-checked ``div.full.f32``, nine instructions). It is only used where it has
been checked to be correctly rounded on every input its caller can pass: tests/test_exact_math.py compares
each caller's whole input set with correctly rounded division, bit for bit. Those checks count on the GPU. The
interpreter computes ``1.0 / b`` exactly, so a CPU run cannot catch a GPU failure. A new caller needs a new
exhaustive check on the GPU.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    from triton.language.target_info import cuda_capability_geq
    from triton.runtime.jit import constexpr_function
except ImportError:  # pragma: no cover - without Triton there is nothing to define
    triton = None

if triton is not None:
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # read when Triton reads it: at import

    @constexpr_function
    def nvidia_ptx(major: int = 0, minor: int = 0) -> bool:
        """Whether a kernel may use NVIDIA inline PTX that needs compute capability ``major.minor``: compiled (the
        interpreter has no inline assembly) for an NVIDIA GPU that has it. Elsewhere (the interpreter, older or
        other GPUs) the codecs take their portable path, which the interpreter tests."""
        return not INTERPRETED.value and cuda_capability_geq(major, minor)

    @triton.jit
    def reciprocal_estimate(b):
        """1/b within an ulp for normal b (the portable path, a division, gives it exactly)."""
        if nvidia_ptx():
            y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [b], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            y = 1.0 / b
        return y

    @triton.jit
    def quotient(a, b, y):
        """a/b from an estimate y of 1/b (a constant, or ``reciprocal_estimate(b)``) by one Newton step and one
        fused correction, as ``div.rn.f32`` does (exact on the callers' checked inputs only)."""
        neg_b = b * -1.0  # a negation the multiply-adds absorb (Triton's ``-b`` is ``0 - b``: an extra add)
        y = tl.fma(y, tl.fma(neg_b, y, 1.0), y)
        q = a * y
        return tl.fma(y, tl.fma(neg_b, q, a), q)
