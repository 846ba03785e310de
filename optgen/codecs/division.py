"""Correctly rounded fp32 quotients for the codecs, cheaper than ``tl.div_rn`` on the GPU.

``tl.div_rn`` compiles to the GPU's ``div.rn.f32``: a refined reciprocal, one fused correction of the
quotient, then a range check that calls a slow path (denormals, huge exponents). The check and the call cost
instructions and registers at every use. ``quotient`` is the fast path alone. It is only used where it has
been checked to be correctly rounded on every input its caller can pass: tests/test_exact_math.py compares
each caller's whole input set with correctly rounded division, bit for bit. Those checks count on the GPU. The
interpreter computes ``1.0 / b`` exactly, so a CPU run cannot catch a GPU failure. A new caller needs a new
exhaustive check on the GPU.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - without Triton there is nothing to define
    triton = None

if triton is not None:

    @triton.jit
    def quotient(a, b):
        """a/b by the refined reciprocal and one fused correction (exact on the callers' checked inputs only)."""
        y = 1.0 / b
        y = tl.fma(y, tl.fma(-b, y, 1.0), y)
        q = a * y
        return tl.fma(y, tl.fma(-b, q, a), q)
