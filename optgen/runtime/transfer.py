"""Small launch arguments (the scalars, the ``rng`` tensor, reduction accumulators, launch tables) sent to the
device without waiting for the GPU.

A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory, and PyTorch synchronizes the
stream after such a copy: every ``step()`` (and, with gradient release, every parameter's hook during
backward) would wait for all queued GPU work before it could enqueue its own. From pinned memory the copy is
asynchronous, ordered on the current stream before the kernel that reads it; PyTorch's pinned-memory
allocator keeps the block until the copy has run.
"""

from __future__ import annotations

from typing import Any

import torch


def refuse_graph_capture() -> None:
    """Raise if the current CUDA stream is capturing a graph: a step's scalars (lr, bias corrections, the step
    count) are computed on the host at every step, so a replayed step would reuse the captured ones."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("an optgen step cannot be captured in a CUDA graph: its scalars (lr, bias corrections, "
                           "the step count) are computed on the host at every step; use torch.compile without "
                           "CUDA graphs, or step outside the graph")


def _async_to(device: torch.device) -> bool:
    """Whether a copy to ``device`` goes through pinned memory: eager, to a GPU."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    refuse_graph_capture()  # a replay would copy whatever then lies in the recycled pinned block
    return True


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)`` for a CPU tensor ``t`` that does not synchronize a CUDA stream. Traced by torch.compile,
    a plain copy (the compiled graph orders it)."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if _async_to(device) else t.to(device)


def to_device(values: list[Any], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` that does not synchronize a CUDA stream (built in
    pinned memory: one host op fewer than ``host_to_device``, which counts on a slow host)."""
    device = torch.device(device)
    if _async_to(device):
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype).to(device)


def make_rng(seed: int, step: int | torch.Tensor, ids: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``rng`` tensor [seed, step, *ids] of optgen.codecs.rng as int64 on ``device`` (ids: the stable id of
    each tensor of the call). A tensor ``step`` (torch.compile) stays a tensor."""
    if isinstance(step, torch.Tensor):
        head = torch.tensor([seed], dtype=torch.int64)
        return host_to_device(torch.cat([head, step.detach().reshape(1).cpu().to(torch.int64),
                                         torch.tensor(ids, dtype=torch.int64)]), device)
    return to_device([seed, step, *ids], torch.int64, device)
