"""Math for host scalars that works on Python floats and on 0-d tensors alike (a tensor lr stays a tensor)."""

from __future__ import annotations

import math
from typing import Any

import torch


def _is_tensor(*xs: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in xs)


def sqrt(x: Any) -> Any:
    return torch.sqrt(x) if _is_tensor(x) else math.sqrt(x)


def rsqrt(x: Any) -> Any:
    return torch.rsqrt(x) if _is_tensor(x) else 1.0 / math.sqrt(x)


def exp(x: Any) -> Any:
    return torch.exp(x) if _is_tensor(x) else math.exp(x)


def log(x: Any) -> Any:
    return torch.log(x) if _is_tensor(x) else math.log(x)


def sign(x: Any) -> Any:
    return torch.sign(x) if _is_tensor(x) else float((x > 0) - (x < 0))


def minimum(a: Any, b: Any) -> Any:
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b)) if _is_tensor(a, b) else min(a, b)


def maximum(a: Any, b: Any) -> Any:
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b)) if _is_tensor(a, b) else max(a, b)


def where(cond: Any, a: Any, b: Any) -> Any:
    return torch.where(torch.as_tensor(cond), a, b) if _is_tensor(cond, a, b) else (a if cond else b)


def flag(cond: Any) -> Any:
    """A condition as 1.0 / 0.0 (a float64 tensor when the condition is a tensor)."""
    return cond.to(torch.float64) if _is_tensor(cond) else float(cond)
