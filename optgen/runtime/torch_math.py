"""PyTorch functions the generated fallback calls where torch's own op does not round the way the IR promises.

The IR promises correctly rounded fp32 division and square root (the Triton kernel uses ``tl.div_rn`` and
``tl.sqrt_rn``). torch's CPU ``sqrt`` is vectorised and not always correctly rounded, so on the CPU it is
taken in float64 and rounded once (exact for sqrt: 53 >= 2*24 + 2 bits). CUDA's ``sqrt`` is already exact.
"""

from __future__ import annotations

import torch


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root."""
    if x.device.type == "cuda":
        return torch.sqrt(x)
    return torch.sqrt(x.double()).float()


def rsqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(x), each step correctly rounded (as the Triton kernel computes it)."""
    return 1.0 / sqrt_rn(x)


def tensor_max(x: torch.Tensor) -> torch.Tensor:
    """The maximum over the whole tensor (-inf for an empty one, where torch.max raises)."""
    return torch.amax(x) if x.numel() else torch.tensor(float("-inf"), device=x.device)
