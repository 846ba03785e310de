"""Launch one generated Triton kernel over many tensors: one launch per dtype combination, not per tensor.

Each buffer list becomes a table of data pointers, and a block table maps every program to its tensor and the
first element of its tile (one int64: tensor << 40 | first element). The launch plan (tables included) is
cached by the tensors' addresses, so a training loop builds it once.

The kernel assumes 16-byte aligned, contiguous buffers (so loads are vectorised); any tensor that is not
goes through the PyTorch fallback instead, in place (in a sharded launch, through an aligned copy the plan keeps).

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
from dataclasses import dataclass, field
from typing import Any

import torch

from optgen.runtime.distributed import Sharding
from optgen.runtime.transfer import host_to_device, to_device

try:
    import triton
    import triton.language as tl
    from triton.compiler import CompiledKernel as _CompiledKernel

    # A compiled kernel is launched directly (see _launch) with every argument, constexprs included, as Triton's
    # own launch passes them from 3.6 on (read in 3.6 and 3.9); older versions launch through Triton's call.
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        _CompiledKernel = None
except ImportError:  # pragma: no cover - without Triton only the PyTorch fallback runs
    tl = _CompiledKernel = None


Scalars = torch.Tensor | list[float]  # the step's scalars: a tensor on the device, or their values


@dataclass(frozen=True)
class RngArgs:
    """An eager step's random streams, for the kernel's arguments: seed and step go as numbers, and ``streams``
    (each tensor's stable id, int64 on the device) as a tensor that stays the same from step to step. (The other
    form of ``rng``, for compiled graphs, is the int64 tensor [seed, step, id_0, ...].)"""

    seed: int
    step: int
    streams: torch.Tensor

    def as_tensor(self) -> torch.Tensor:
        """The [seed, step, id_0, ...] tensor of the PyTorch fallback."""
        return torch.cat([to_device([self.seed, self.step], torch.int64, self.streams.device), self.streams])


def _int32(x: int) -> int:
    """The low 32 bits of ``x`` (all the random streams use of seed and step) as a signed int32: an argument that
    Triton always types as int32 (a launch of the compiled kernel with an int64 there would misread it)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


class MultiTensorLauncher:
    """Callable ``(*lists, scalars)`` that runs ``kernel`` over every tensor of the lists."""

    # Launch plans kept (tables on the device, a few KiB each): one per distinct set of buffers, e.g. one per
    # chunk of an offloaded optimizer; with fewer than its chunks, every chunk rebuilt its tables each step.
    cache_size = 64
    # A plan over at least ``split_min_tensors`` tensors launches in two parts: first the programs of its largest
    # tensors, at least ``split_fraction`` of its elements (and ``split_min_elements``), then the rest, each part
    # with all its passes (per-tensor reductions need only their own tensor's programs). The caller checks that
    # the rest are where the plan has them while the first part runs (``optgen.runtime.group_plan``): only the
    # first part's checks come before the GPU starts. A smaller first part has fewer checks before it, but must
    # keep the GPU busy while the host checks the rest: on an H100, interleaved in one process, 0.2 (GPT-2 set: the
    # embedding alone; large set: 4 of 56 tensors) stepped 10-50 µs sooner than 0.5 (11-12 and 10 tensors), and a
    # single 4096² tensor first ran dry on the large set (FlashAdamW 1.578 against 1.500 ms; eighteenth session).
    split_min_tensors = 8
    split_min_elements = 1 << 20
    split_fraction = 0.2

    def __init__(self, kernel: Any, fallback: Callable[..., None], dtype_args: dict[str, int], *, scalar_count: int,
                 rows: int, cols: int, num_warps: int = 8, aligned: bool = False, slice_rows: int | None = None,
                 max_registers: int | None = None,
                 constants: Callable[[torch.device], tuple[torch.Tensor, ...]] | None = None,
                 slots: tuple[str, ...] = (), passes: int = 1, levels: tuple[int, ...] = (),
                 written: tuple[int, ...] = ()) -> None:
        self.kernel = kernel
        self.fallback = fallback
        self.dtype_args = dtype_args  # constexpr name -> index of the list whose dtype it takes
        self.scalar_count = scalar_count  # the kernel's scalar arguments (after ``scalars``)
        self.rows = rows
        self.cols = cols
        self.num_warps = num_warps
        self.aligned = aligned  # the kernel may assume tiles start at multiples of rows * cols (vector loads)
        self.slice_rows = slice_rows  # rows per slice of a tensor's partial last tile (the kernel's SLICE); None: whole
        self.max_registers = max_registers  # a cap per thread (Triton's maxnreg): more programs fit on an SM
        self.constants = constants  # read-only tables (e.g. a quantization map) passed after the scalars
        # Per-tensor slots (whole-tensor reductions filled in extra passes, staged scales) and
        # the number of kernel passes (PASS = 1 .. passes) when there are slots.
        self.slots = tuple(slots)
        self.passes = passes
        self.levels = tuple(levels)  # the pass (1, 2, ...) that computes each reduction slot
        # per pass k (index k - 1): the sum slots it fills, as a bit mask for _sum_partials
        self._sum_masks = tuple(sum(1 << j for j, (kind, lv) in enumerate(zip(self.slots, self.levels))
                                    if kind == "sum" and lv == k) for k in range(1, passes + 1))
        self.written = tuple(written)  # the lists the kernel writes (staged copies are copied back)
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._compiled: dict[tuple, tuple[Any, list[Any]]] = {}  # see _launch

    @property
    def block(self) -> int:
        return self.rows * self.cols

    def table_bytes(self) -> int:
        """Device bytes held by the cached launch plans (tables, staged copies): about 8 bytes per program."""
        storages = {}
        for plan in self._plans.values():
            for tables, _, _, _, rng_rows, rows, segments in plan.launches:
                for t in (*tables, rng_rows, rows, segments):
                    if t is not None:
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            for *_, buffer in plan.staged:
                storages[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
        return sum(storages.values())

    def _build_tables(self, lists: list[list[torch.Tensor]], device: torch.device, whole: list[int],
                      head: tuple[int, ...] = ()) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, tuple | None]:
        """Pointer tables (one per buffer list), numels (each tensor's here and its ``whole`` tensor's, which
        differ for shards) and the block table (tensor << 40 | first element, per program), on ``device``; each
        tensor's (first program, number of programs), where its partial sums lie; and with a ``head`` (tensors
        whose programs come first), the two parts, head and rest (None without one): each part's block table and,
        with slots, its tensors' (first program in the part, number of programs; 0 for the other part's)."""
        n = len(lists[0])
        pointers = torch.tensor([[t.data_ptr() for t in lst] for lst in lists], dtype=torch.int64)
        numels = torch.tensor([t.numel() for t in lists[0]], dtype=torch.int64)
        if n >= 2**23 or int(numels.max()) >= 2**40:  # what the block table's packing can address
            raise ValueError(f"one launch takes fewer than 2**23 tensors of fewer than 2**40 elements each, got {n} "
                             f"tensors of up to {int(numels.max())}")
        both = torch.stack([numels, torch.tensor(whole, dtype=torch.int64)], 1)
        # an empty shard of a non-empty tensor gets one masked program: its per-tensor outputs (scales)
        per_tensor = ((numels + self.block - 1) // self.block).clamp_min(1)
        chosen = set(head)
        order = torch.tensor([*head, *(i for i in range(n) if i not in chosen)], dtype=torch.int64)
        counts = per_tensor[order]  # the programs of each tensor, in the order they run
        tensor_of_block = torch.repeat_interleave(order, counts)
        first = torch.cumsum(counts, 0) - counts
        starts = (torch.arange(len(tensor_of_block)) - torch.repeat_interleave(first, counts)) * self.block
        blocks = (tensor_of_block << 40) | starts  # 8 bytes per program (starts < 2^40, fewer than 2^23 tensors)
        first_block = torch.empty_like(first).index_copy_(0, order, first)
        head_blocks = int(counts[:len(head)].sum())
        # the rest's part starts 16 bytes into the table as the head's does (one pad entry if need be): both
        # parts specialize the kernel as the whole table does
        pad = torch.zeros(head_blocks % 2 if head else 0, dtype=torch.int64)
        blocks = torch.cat([blocks[:head_blocks], pad, blocks[head_blocks:]])
        segments = [first_block, per_tensor]
        if head and self.slots:  # each part sums its own tensors' partials, numbered from its first program
            in_head = torch.zeros(n, dtype=torch.bool)
            in_head[list(head)] = True
            segments += [first_block, torch.where(in_head, per_tensor, 0),
                         first_block - head_blocks, torch.where(in_head, 0, per_tensor)]
        packed = host_to_device(torch.cat([pointers.flatten(), both.flatten(), blocks, *segments]), device)
        table_end = (len(lists) + 2) * n + len(blocks)
        table = packed[(len(lists) + 2) * n:table_end]
        segments = packed[table_end:].view(-1, 2 * n)  # the whole launch's, then each part's with slots
        parts = None
        if head:
            per_part = tuple(segments[1:]) if self.slots else (None, None)
            parts = ((table[:head_blocks], per_part[0]), (table[head_blocks + len(pad):], per_part[1]))
        return ((*packed[:len(lists) * n].view(len(lists), n), packed[len(lists) * n:(len(lists) + 2) * n],
                 table), segments[0], parts)

    def _head(self, numels: list[int]) -> tuple[int, ...]:
        """The tensors of the first part of a split launch (see ``split_min_tensors``), largest first; none where
        there are too few tensors or elements to be worth a second launch."""
        total = sum(numels)
        if len(numels) < self.split_min_tensors or total < 2 * self.split_min_elements:
            return ()
        head, covered = [], 0
        for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
            if covered >= max(self.split_fraction * total, self.split_min_elements):
                break
            head.append(i)
            covered += numels[i]
        return tuple(head) if len(head) < len(numels) else ()

    def _plan(self, lists: tuple[list[torch.Tensor], ...], with_rng: bool, whole: tuple[int, ...] | None) -> _Plan:
        """Split the tensors into kernel launches (one per dtype combination) and fallback cases. With an
        ``rng`` tensor [seed, step, id_0, ...], each part gets the positions of its own ids in it.

        ``whole``: the element counts of the whole tensors, when these are shards (FSDP2). Then irregular
        buffers (FSDP2's gradients are views at any offset of its reduce-scatter output) are staged through
        aligned copies kept in the plan, so that every tensor takes part in the launch and its collectives.
        """
        n = len(lists[0])
        sharded = whole is not None
        whole = whole or tuple(t.numel() for t in lists[0])
        irregular = [i for i in range(n) if not all(_regular(lst[i]) for lst in lists)]
        staged = []
        if sharded and irregular:
            lists = tuple(list(lst) for lst in lists)
            for i in irregular:
                for k, lst in enumerate(lists):
                    if not _regular(lst[i]):
                        staged.append((k, i, torch.empty(lst[i].shape, dtype=lst[i].dtype, device=lst[i].device)))
                        lst[i] = staged[-1][2]
            irregular = []
        skip = set(irregular)
        by_dtypes: dict[tuple, list[int]] = {}
        for i in range(n):
            if i not in skip and whole[i] > 0 and (lists[0][i].numel() > 0 or (sharded and self.slots)):
                dtypes = tuple(lists[k][i].dtype for k in self.dtype_args.values())
                by_dtypes.setdefault(dtypes, []).append(i)
        launches = []
        # one launch of every tensor (the usual case) may run in two parts
        head = self._head([t.numel() for t in lists[0]]) if len(by_dtypes) == 1 and not irregular and not staged \
            and not sharded and sum(map(len, by_dtypes.values())) == n else ()
        parts = None
        for dtypes, idx in by_dtypes.items():
            sub = [[lst[i] for i in idx] for lst in lists]
            device = sub[0][0].device
            tables, segments, parts = self._build_tables(sub, device, [whole[i] for i in idx], head)
            n_blocks = tables[-1].numel()
            constexprs = {name: getattr(tl, str(d).removeprefix("torch.")) for name, d in zip(self.dtype_args, dtypes)}
            launches.append((tables, n_blocks, constexprs, device, _rng_rows(idx, with_rng, device),
                             to_device(idx, torch.int64, device), segments))
        return _Plan(launches, irregular, _rng_rows(irregular, with_rng and bool(irregular), lists[0][0].device),
                     staged, head, parts)

    def __call__(self, *lists: list[torch.Tensor], scalars: Scalars, rng: torch.Tensor | RngArgs | None = None,
                 shard: Sharding | None = None) -> None:
        """Step every tensor. ``scalars``: the fp32 tensor of the step's scalars, or (eager) their values, which
        the kernel then takes as arguments: no copy to the device before the launch. With ``shard`` the tensors
        are shards: ``numel`` is the whole tensor's, the partial reductions of all tensors are all-reduced
        together between the passes, and irregular buffers are staged (no fallback, whose tensors would miss the
        collectives)."""
        self.run_plan(self.plan_for(lists, rng is not None, shard), lists, scalars, rng, shard)

    def plan_for(self, lists: tuple[list[torch.Tensor], ...], with_rng: bool, shard: Sharding | None) -> _Plan:
        """The launch plan of these tensors, from the cache when they are where they were."""
        # The plan depends on where every buffer lives, the parameters' shapes, every buffer's layout and the
        # dtypes its kernels are specialized for (a tensor viewed as another dtype stays where it was).
        whole = None if shard is None else shard.numels
        key = (tuple(map(torch.Tensor.data_ptr, itertools.chain(*lists))), tuple(map(torch.Tensor.size, lists[0])),
               tuple(map(torch.Tensor.is_contiguous, itertools.chain(*lists))), whole,
               tuple(t.dtype for k in self.dtype_args.values() for t in lists[k]))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(lists, with_rng, whole)
            if len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def run_plan(self, plan: _Plan, lists: tuple[list[torch.Tensor], ...], scalars: Scalars,
                 rng: torch.Tensor | RngArgs | None, shard: Sharding | None = None, part: int | None = None) -> None:
        """Step the tensors of ``lists`` with ``plan``, which the caller knows to be theirs (``plan_for``).
        ``part``: of a split plan (``plan.head``), 0 steps the head's tensors and 1 the rest; None, all."""
        if part is not None:
            self._run(plan, len(lists[0]), scalars, rng, shard, part)
            return
        if plan.irregular:  # strided or unaligned views: the fallback handles them in place
            device = lists[0][plan.irregular[0]].device
            self.fallback(*[[lst[i] for i in plan.irregular] for lst in lists],
                          scalars if isinstance(scalars, torch.Tensor) else to_device(scalars, torch.float32, device),
                          *(() if rng is None else
                            ((rng if isinstance(rng, torch.Tensor) else rng.as_tensor())[plan.irregular_rng],)))
        for k, i, buffer in plan.staged:
            buffer.copy_(lists[k][i])
        for one in (0, 1) if plan.parts else (None,):
            self._run(plan, len(lists[0]), scalars, rng, shard, one)
        for k, i, buffer in plan.staged:
            if k in self.written:
                lists[k][i].copy_(buffer)

    def _run(self, plan: _Plan, n: int, scalars: Scalars, rng: torch.Tensor | RngArgs | None,
             shard: Sharding | None, part: int | None = None) -> None:
        """Every launch of the plan, pass by pass; with ``shard``, an all-reduce after each reduction pass.
        ``part`` (0 or 1): the programs of that part of a split plan's one launch (``_Plan.parts``)."""
        in_tensor = isinstance(scalars, torch.Tensor)
        if isinstance(rng, RngArgs) and in_tensor:  # the kernel reads both from tensors, or both as arguments
            rng = rng.as_tensor()
        elif isinstance(rng, torch.Tensor) and not in_tensor:
            raise TypeError("the scalars as numbers take the random streams as RngArgs, not as a tensor")
        # the tensor and the values in the kernel's argument order: placeholders for the form not taken
        scalar_args = [scalars, *[0.0] * self.scalar_count] if in_tensor else [None, *map(float, scalars)]
        runs = []
        for tables, n_blocks, constexprs, device, rng_rows, rows, segments in plan.launches:
            if rng is None:
                rng_args = ()
            elif isinstance(rng, torch.Tensor):  # the ids of this launch's tensors after seed and step
                rng_args = (rng[rng_rows], 0, 0)
            else:  # all the tensors (one launch, the usual case) take the streams as they are
                rng_args = (rng.streams if rows.shape[0] == n else rng.streams[rows], _int32(rng.seed),
                            _int32(rng.step))
            args = [*tables, *scalar_args, *rng_args, *(self.constants(device) if self.constants is not None else ())]
            if part is not None:  # that part of the block table (the last of the tables), its programs and sums
                args[len(tables) - 1], segments = plan.parts[part]
                n_blocks = args[len(tables) - 1].numel()
            red = partials = None
            if self.slots:
                # every tensor's sums are stored before they are read; a maximum (atomic) needs its identity first,
                # and so does a shard's row of an empty shard (all-reduced)
                red = Sharding.partials(len(rows), list(self.slots), device) if shard is not None or "max" in \
                    self.slots else torch.empty((len(rows), len(self.slots)), dtype=torch.float32, device=device)
                partials = torch.empty((n_blocks, len(self.slots)), dtype=torch.float32, device=device)
                args += [red, partials]
            runs.append((args, n_blocks, constexprs, device, partials, segments, rows, red))
        # With the scalars as numbers, every tensor argument specializes the kernel the same way at every step:
        # the plan's own tables, and the random streams, constants and reduction buffers, each an allocation of
        # its own (16-byte aligned, fixed dtype). So the plan keeps each launch's compiled kernel.
        runners = None if in_tensor else plan.runners
        if not self.slots:
            for i, (args, n_blocks, constexprs, device, *_) in enumerate(runs):
                self._launch(args, n_blocks, constexprs, device, {"SCALARS_TENSOR": in_tensor}, runners,
                             (i, 1, part))
            return
        reduce_passes = max(self.levels, default=0) if shard is not None else 0
        whole_red = Sharding.partials(n, list(self.slots), scalars.device) if reduce_passes else None
        for k, sums in enumerate(self._sum_masks, 1):
            for i, (args, n_blocks, constexprs, device, partials, segments, rows, red) in enumerate(runs):
                self._launch(args, n_blocks, constexprs, device,
                             {"SCALARS_TENSOR": in_tensor, "PASS": k, "NRED": len(self.slots)}, runners, (i, k, part))
                if sums:  # every tensor's partial sums, added in program order: the same bits on every run
                    with _on(device):
                        _sum_partials[(len(rows), len(self.slots))](partials, segments, red, len(rows),
                                                                     NRED=len(self.slots), SUMS=sums, CHUNK=1024)
            if k <= reduce_passes:  # every tensor's partials (empty shards: none) in one all-reduce
                for *_, rows, red in runs:
                    whole_red.index_copy_(0, rows, red)
                shard.all_reduce(whole_red, list(self.slots), [j for j, lv in enumerate(self.levels) if lv == k])
                for *_, rows, red in runs:
                    red.copy_(whole_red.index_select(0, rows))

    def tile_constexprs(self) -> dict[str, Any]:
        """The kernel's tile constexprs: ROWS, COLS, ALIGNED, and SLICE where the partial tile runs in slices."""
        named = {"ROWS": self.rows, "COLS": self.cols, "ALIGNED": self.aligned}
        if self.slice_rows is not None:
            named["SLICE"] = min(self.slice_rows, self.rows)  # tune_tile may shrink the tile below a slice
        return named

    def compile_options(self) -> dict[str, Any]:
        """Triton's compile options for the kernel. No FMA contraction: the kernel must round like PyTorch's
        separate multiply and add. A register cap is an NVIDIA option (Triton's AMD backend rejects it)."""
        cap = {} if self.max_registers is None or torch.version.hip else {"maxnreg": self.max_registers}
        return {"num_warps": self.num_warps, "enable_fp_fusion": False, **cap}

    def _launch(self, args: list[Any], n_blocks: int, constexprs: dict[str, Any], device: torch.device,
                extra: dict[str, int], runners: dict[tuple, Any] | None, slot: tuple[int, int, int | None]) -> None:
        """Launch the kernel. ``runners``: where a plan keeps, under ``slot`` (launch, pass, part), Triton's launcher of
        the compiled kernel on its grid and the constexprs, for arguments that specialize it the same way every
        step; then a launch on the current device skips the specialization key below."""
        found = None if runners is None else runners.get(slot)
        if found is not None and device.index == torch.cuda.current_device():
            runner, tail = found
            runner(*args, *tail)
            return
        with _on(device):
            # Triton's launch call binds and specializes every argument and looks the kernel up in its cache:
            # tens of µs of host time before the GPU starts. The kernel it compiled is launched directly after
            # the first call, under the same constexprs and the same dtype and 16-byte alignment of every tensor
            # argument (what its specialization depends on; None and floats specialize on their type alone), and
            # the same tile and compile options (tune_tile sets them).
            key = (device, self.rows, self.cols, self.num_warps, self.max_registers, self.aligned, self.slice_rows,
                   *constexprs.values(), *extra.values(),
                   *((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else type(a) for a in args))
            direct = self._compiled.get(key)
            if direct is not None:
                compiled, tail = direct
                runner = compiled[(n_blocks, 1, 1)]
                if runners is not None:
                    runners[slot] = (runner, tail)
                runner(*args, *tail)
                return
            named = {**constexprs, **extra, **self.tile_constexprs()}
            compiled = self.kernel[(n_blocks,)](*args, **named, **self.compile_options())
            tail = self.kernel.arg_names[len(args):]  # the constexprs follow the arguments in every kernel
            if _CompiledKernel is not None and isinstance(compiled, _CompiledKernel) and set(tail) == set(named):
                self._compiled[key] = (compiled, [named[name] for name in tail])


if tl is not None:

    @triton.jit
    def _sum_partials(part, segments, red, n, NRED: tl.constexpr, SUMS: tl.constexpr, CHUNK: tl.constexpr):
        """red[t, j] = the sum of the partials part[b, j] of tensor t's programs b (sum slots j of this pass,
        the bits of SUMS), in a fixed order: unlike atomic adds, the same bits on every run. A tensor with no
        programs here (in the other part of a split launch) keeps its row."""
        t = tl.program_id(0)
        j = tl.program_id(1)
        first = tl.load(segments + t)
        count = tl.load(segments + n + t)
        if ((SUMS >> j) & 1) != 0 and count > 0:
            acc = tl.zeros((CHUNK,), tl.float32)
            for k in range(0, count, CHUNK):
                i = k + tl.arange(0, CHUNK)
                acc += tl.load(part + (first + i) * NRED + j, mask=i < count, other=0.0)
            tl.store(red + t * NRED + j, tl.sum(acc))


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rng_rows(idx: list[int], with_rng: bool, device: torch.device) -> torch.Tensor | None:
    """Rows of ``rng`` = [seed, step, id_0, ...] for the tensors ``idx``: [0, 1, 2 + idx...] on ``device``."""
    return to_device([0, 1, *(2 + i for i in idx)], torch.int64, device) if with_rng else None


@dataclass(frozen=True)
class _Plan:
    # per launch: tables, number of programs, dtype constexprs, device, rows of rng (None without rng), the
    # positions of its tensors in the lists, and each tensor's (first program, programs) as [2 * tensors]
    launches: list[tuple[tuple[torch.Tensor, ...], int, dict[str, Any], torch.device, torch.Tensor | None,
                         torch.Tensor, torch.Tensor]]
    irregular: list[int]  # tensors the fallback steps
    irregular_rng: torch.Tensor | None
    staged: list[tuple[int, int, torch.Tensor]]  # (list, tensor, aligned copy the kernel steps instead)
    # a split launch (MultiTensorLauncher.split_min_tensors): the tensors whose programs run first, and for each
    # part (head, rest), launched one after the other, its view of the block table (the whole table may hold a pad
    # entry between them) and, with slots, its own segments; () and None where the plan's launches run whole
    head: tuple[int, ...] = ()
    parts: tuple[tuple[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    runners: dict[tuple[int, int, int | None], Any] = field(default_factory=dict)  # see MultiTensorLauncher._launch


def _regular(t: torch.Tensor) -> bool:
    """What the kernel can take: contiguous and 16-byte aligned (vectorised loads)."""
    return t.is_contiguous() and t.data_ptr() % 16 == 0
