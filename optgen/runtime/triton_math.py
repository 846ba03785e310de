"""Triton device functions the generated kernels call: math that must round exactly like PyTorch."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    from optgen.codecs.rounding import tl_round_bf16
except ImportError:  # pragma: no cover - no Triton on this platform; the PyTorch fallback still works
    triton = None

if triton is not None:

    @triton.jit
    def rsqrt_rn(x):
        """1/sqrt(x) from correctly rounded sqrt and division (tl.rsqrt is approximate on the GPU)."""
        return tl.div_rn(1.0, tl.sqrt_rn(x))

    @triton.jit
    def scalar_arg(value, scalars, k: tl.constexpr, SCALARS_TENSOR: tl.constexpr):
        """Scalar ``k`` of the step: read from the fp32 tensor ``scalars`` (a compiled graph computes the scalars on
        the device), or the kernel argument ``value`` (an eager step passes them as arguments, with no copy to the
        device before the launch). The cast makes the Triton interpreter's Python float an fp32, as on the GPU."""
        if SCALARS_TENSOR:
            return tl.load(scalars + k)
        else:
            return tl.cast(value, tl.float32)

    @triton.jit
    def sign(x):
        """-1, 0 or 1 like torch.sign (NaN stays NaN)."""
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x * 0.0))

    @triton.jit
    def minimum(a, b):
        return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def maximum(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def store_rne(ptr, value, mask):
        """Store fp32 ``value`` in the pointer's element type, rounding to nearest even.

        bf16 is rounded with integer arithmetic on the fp32 bits: the Triton interpreter truncates on
        ``.to(tl.bfloat16)``; on the GPU both agree with torch.
        """
        ty = ptr.dtype.element_ty
        if ty == tl.bfloat16:
            tl.store(ptr, tl_round_bf16(value, 0, False), mask=mask)
        else:
            tl.store(ptr, value.to(ty), mask=mask)

    @triton.jit
    def pow(x, y):
        """x**y for a non-integer exponent, through float64 exp2/log2 and one rounding to fp32.

        (libdevice.pow is missing from the Triton interpreter; float64 keeps the result within an ulp.)
        """
        r = tl.exp2(y.to(tl.float64) * tl.log2(x.to(tl.float64))).to(tl.float32)
        return tl.where(y == 0, 1.0, r)
