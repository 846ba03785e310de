"""Correctly rounded fp32 quotients for the codecs, cheaper than ``tl.div_rn`` on the GPU.

``tl.div_rn`` compiles to the GPU's ``div.rn.f32``: a refined reciprocal, one fused correction of the
quotient, then a range check that calls a slow path (denormals, huge exponents). The check and the call cost
instructions and registers at every use. ``quotient`` is the fast path alone: correctly rounded wherever the
slow path is never needed. Each caller keeps to inputs where that holds and a test checks every one of them
bit for bit against correctly rounded division, on the GPU and under the interpreter
(tests/test_exact_math.py).
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
        """a/b, correctly rounded where |a| >= 2^-100 (or a = 0) and b is in [1, 2^15]."""
        y = 1.0 / b
        y = tl.fma(y, tl.fma(-b, y, 1.0), y)
        q = a * y
        return tl.fma(y, tl.fma(-b, q, a), q)
