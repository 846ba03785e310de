"""Launch one generated Triton kernel over many tensors: one launch per dtype combination, not per tensor.

Each buffer list becomes a table of data pointers, and a block table maps every program to (tensor, first
element). Tables are cached by the tensors' addresses, so a training loop builds them once.

Why an opaque ``torch.library.custom_op`` around this and not ``triton_op``: pointer tables built from
``data_ptr()`` cannot be traced inside a ``triton_op`` (pytorch/pytorch#136271), and a kernel with a fixed
number of tensor slots would launch once per few tensors. The step kernel is already fully fused, so
Inductor loses nothing by not seeing into it, and ``torch.compile(fullgraph=True)`` works through the op.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
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
                 cols: int, num_warps: int = 8) -> None:
        self.kernel = kernel
        self.fallback = fallback
        self.dtype_args = dtype_args  # constexpr name -> index of the list whose dtype it takes
        self.rows = rows
        self.cols = cols
        self.num_warps = num_warps
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()

    @property
    def block(self) -> int:
        return self.rows * self.cols

    def _build_tables(self, lists: list[list[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, tuple, int]:
        """One int64 device tensor holding the pointer tables, numels and the (tensor, start) block table."""
        n = len(lists[0])
        pointers = torch.tensor([[t.data_ptr() for t in lst] for lst in lists], dtype=torch.int64)
        numels = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
        per_tensor = (numels + self.block - 1) // self.block
        tensor_of_block = torch.repeat_interleave(torch.arange(n), per_tensor)
        first_block = torch.cumsum(per_tensor, 0) - per_tensor
        starts = (torch.arange(len(tensor_of_block)) - first_block[tensor_of_block]) * self.block
        blocks = torch.stack([tensor_of_block, starts], 1)
        packed = torch.cat([pointers.flatten(), numels, blocks.flatten()]).to(device)
        return packed, pointers.shape, len(tensor_of_block)

    def _tables_for(self, lists: list[list[torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, tuple, int]:
        key = tuple((t.data_ptr(), t.numel()) for lst in lists for t in lst)
        if key in self._tables:
            self._tables.move_to_end(key)
            return self._tables[key]
        tables = self._build_tables(lists, device)
        self._tables[key] = tables
        if len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return tables

    def __call__(self, *lists: list[torch.Tensor], scalars: torch.Tensor) -> None:
        n = len(lists[0])
        irregular = [i for i in range(n) if not all(lst[i].is_contiguous() for lst in lists)]
        if irregular:  # strided views: the fallback handles them in place
            self.fallback(*[[lst[i] for i in irregular] for lst in lists], scalars)
        skip = set(irregular)
        by_dtypes: dict[tuple, list[int]] = {}
        for i in range(n):
            if i not in skip and lists[0][i].numel() > 0:
                dtypes = tuple(lists[k][i].dtype for k in self.dtype_args.values())
                by_dtypes.setdefault(dtypes, []).append(i)
        for dtypes, idx in by_dtypes.items():
            sub = [[lst[i] for i in idx] for lst in lists]
            device = sub[0][0].device
            packed, (n_lists, count), n_blocks = self._tables_for(sub, device)
            tables = [packed[k * count:(k + 1) * count] for k in range(n_lists)]
            numels = packed[n_lists * count:(n_lists + 1) * count]
            blocks = packed[(n_lists + 1) * count:]
            constexprs = {name: getattr(tl, str(d).removeprefix("torch.")) for name, d in zip(self.dtype_args, dtypes)}
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                self.kernel[(n_blocks,)](*tables, numels, blocks, scalars, **constexprs, ROWS=self.rows,
                                         COLS=self.cols, num_warps=self.num_warps)

