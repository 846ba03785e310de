"""Launch one generated Triton kernel over many tensors: one launch per dtype combination, not per tensor.

Each buffer list becomes a table of data pointers, and a block table maps every program to (tensor, first
element). The launch plan (tables included) is cached by the tensors' addresses, so a training loop builds it once.

The kernel assumes 16-byte aligned, contiguous buffers (so loads are vectorised); any tensor that is not
goes through the PyTorch fallback instead, in place.

Why an opaque ``torch.library.custom_op`` around this and not ``triton_op``: pointer tables built from
``data_ptr()`` cannot be traced inside a ``triton_op`` (pytorch/pytorch#136271), and a kernel with a fixed
number of tensor slots would launch once per few tensors. The step kernel is already fully fused, so
Inductor loses nothing by not seeing into it, and ``torch.compile(fullgraph=True)`` works through the op.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - without Triton only the PyTorch fallback runs
    tl = None


class MultiTensorLauncher:
    """Callable ``(*lists, scalars)`` that runs ``kernel`` over every tensor of the lists."""

    cache_size = 8

    def __init__(self, kernel: Any, fallback: Callable[..., None], dtype_args: dict[str, int], *, rows: int,
                 cols: int, num_warps: int = 8,
                 constants: Callable[[torch.device], tuple[torch.Tensor, ...]] | None = None,
                 slots: tuple[str, ...] = (), passes: int = 1) -> None:
        self.kernel = kernel
        self.fallback = fallback
        self.dtype_args = dtype_args  # constexpr name -> index of the list whose dtype it takes
        self.rows = rows
        self.cols = cols
        self.num_warps = num_warps
        self.constants = constants  # read-only tables (e.g. a quantization map) passed after the scalars
        # Per-tensor slots (whole-tensor reductions filled by atomics in extra passes, staged scales) and
        # the number of kernel passes (PASS = 1 .. passes) when there are slots.
        self.slots = tuple(slots)
        self.passes = passes
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()

    @property
    def block(self) -> int:
        return self.rows * self.cols

    def _build_tables(self, lists: list[list[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, ...]:
        """Pointer tables (one per buffer list), numels and the (tensor, start) block table, on ``device``."""
        n = len(lists[0])
        pointers = torch.tensor([[t.data_ptr() for t in lst] for lst in lists], dtype=torch.int64)
        numels = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
        per_tensor = (numels + self.block - 1) // self.block
        tensor_of_block = torch.repeat_interleave(torch.arange(n), per_tensor)
        first_block = torch.cumsum(per_tensor, 0) - per_tensor
        starts = (torch.arange(len(tensor_of_block)) - first_block[tensor_of_block]) * self.block
        blocks = torch.stack([tensor_of_block, starts], 1)
        packed = torch.cat([pointers.flatten(), numels, blocks.flatten()]).to(device)
        return (*packed[:len(lists) * n].view(len(lists), n), packed[len(lists) * n:(len(lists) + 1) * n],
                packed[(len(lists) + 1) * n:])

    def _plan(self, lists: tuple[list[torch.Tensor], ...], with_rng: bool) -> _Plan:
        """Split the tensors into kernel launches (one per dtype combination) and fallback cases. With an
        ``rng`` tensor [seed, step, id_0, ...], each part gets the positions of its own ids in it."""
        n = len(lists[0])
        irregular = [i for i in range(n) if not all(t.is_contiguous() and t.data_ptr() % 16 == 0
                                                      for t in (lst[i] for lst in lists))]
        skip = set(irregular)
        by_dtypes: dict[tuple, list[int]] = {}
        for i in range(n):
            if i not in skip and lists[0][i].numel() > 0:
                dtypes = tuple(lists[k][i].dtype for k in self.dtype_args.values())
                by_dtypes.setdefault(dtypes, []).append(i)
        launches = []
        for dtypes, idx in by_dtypes.items():
            sub = [[lst[i] for i in idx] for lst in lists]
            tables = self._build_tables(sub, sub[0][0].device)
            n_blocks = tables[-1].numel() // 2
            constexprs = {name: getattr(tl, str(d).removeprefix("torch.")) for name, d in zip(self.dtype_args, dtypes)}
            launches.append((tables, n_blocks, constexprs, sub[0][0].device, _rng_rows(idx, with_rng, sub[0][0].device)))
        return _Plan(launches, irregular, _rng_rows(irregular, with_rng and bool(irregular), lists[0][0].device))

    def __call__(self, *lists: list[torch.Tensor], scalars: torch.Tensor, rng: torch.Tensor | None = None) -> None:
        # The plan depends on where every buffer lives, the parameters' shapes and the gradients' layout.
        key = (tuple(map(torch.Tensor.data_ptr, itertools.chain(*lists))), tuple(map(torch.Tensor.size, lists[0])),
               tuple(map(torch.Tensor.is_contiguous, lists[1])))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(lists, rng is not None)
            if len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        if plan.irregular:  # strided or unaligned views: the fallback handles them in place
            self.fallback(*[[lst[i] for i in plan.irregular] for lst in lists], scalars,
                          *(() if rng is None else (rng[plan.irregular_rng],)))
        for tables, n_blocks, constexprs, device, rng_rows in plan.launches:
            args = [*tables, scalars, *(() if rng is None else (rng[rng_rows],)),
                    *(self.constants(device) if self.constants is not None else ())]
            passes = [{}]
            if self.slots:
                n = tables[-2].numel()
                init = torch.tensor([float("-inf") if kind == "max" else 0.0 for kind in self.slots])
                args.append(init.to(device).repeat(n, 1))
                passes = [{"PASS": k + 1, "NRED": len(self.slots)} for k in range(self.passes)]
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                for extra in passes:
                    # No FMA contraction: the kernel must round like PyTorch's separate multiply and add.
                    self.kernel[(n_blocks,)](*args, **constexprs, **extra, ROWS=self.rows, COLS=self.cols,
                                             num_warps=self.num_warps, enable_fp_fusion=False)


def _rng_rows(idx: list[int], with_rng: bool, device: torch.device) -> torch.Tensor | None:
    """Rows of ``rng`` = [seed, step, id_0, ...] for the tensors ``idx``: [0, 1, 2 + idx...] on ``device``."""
    return torch.tensor([0, 1, *(2 + i for i in idx)], device=device) if with_rng else None


@dataclass(frozen=True)
class _Plan:
    # per launch: tables, number of programs, dtype constexprs, device, rows of rng (None without rng)
    launches: list[tuple[tuple[torch.Tensor, ...], int, dict[str, Any], torch.device, torch.Tensor | None]]
    irregular: list[int]  # tensors the fallback steps
    irregular_rng: torch.Tensor | None
