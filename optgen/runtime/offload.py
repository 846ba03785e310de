"""Optimizer state off the GPU: CPU offload and paged states, for every optgen optimizer.

``offloaded(FlashAdamW)`` is FlashAdamW whose states (ECC terms of narrow+ecc8 parameters included: they are
state entries) live in *chunks*: flat byte buffers, each holding the states of whole tensors of one param
group, and every state tensor in ``optimizer.state`` is a view into its chunk. A chunk lives either in
pinned CPU memory or on the GPU ("resident").

A step streams each CPU chunk through a GPU staging slot: copy in on one side stream, run the same fused
kernel as the plain optimizer on the staging views (the kernel takes lists of tensors, so a chunk is just
another list), copy out on another side stream. Slots rotate (three by default): chunk k+1 comes in and
chunk k-1 goes out while chunk k is stepped; the third slot keeps the next copy in from waiting for the
kernel. Parameters and gradients never move, so GPU memory for offloaded states is the staging slots,
whatever the model size. Results are bit-identical to the plain step: the same kernel sees the same bytes,
and the stochastic-rounding stream of a tensor depends only on its id.

Paged states (``gpu_budget_mib``): chunks stay resident while all states fit the budget; beyond it, chunks
are paged out to pinned CPU memory (and back in when the budget allows, e.g. after ``set_gpu_budget``),
with explicit copies, never CUDA managed memory.

Chunks hold whole tensors. A tensor whose states exceed one chunk gets a chunk of its own that is streamed
in pieces: flat views of the parameter, gradient and states at offsets aligned to every quantization group,
which is exact only for element- or group-wise updates. Specs with whole-tensor values (LAMB's trust ratio,
Lamb16's per-tensor scales) or stochastic rounding (random bits by element index) refuse such a tensor at
construction, naming the ``chunk_mib`` that fits.

Why this design and not stepping on the CPU (torchao's CPUOffloadOptimizer): see benchmarks/offload_bench.py,
which measures both. Streaming moves the compressed states both ways at once; a CPU step moves the gradient
down and then the parameter up, one after the other, with a CPU step in between that for a quantized spec
is orders of magnitude slower than the bandwidth-bound GPU kernel; and streaming keeps the GPU step's result
bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from optgen.runtime.optimizer import OptgenOptimizer, _param_list, _tensors_of
from optgen.runtime.transfer import make_rng, refuse_graph_capture

ALIGN = 256  # bytes: every state view starts on this boundary (the kernels need 16 for vector loads)
MiB = 2**20


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


@dataclass(frozen=True)
class _Entry:
    """One state tensor of one parameter inside a chunk (``kind`` and ``group`` as in ``Buffer.shape``)."""

    param: torch.Tensor
    key: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str
    group: int

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def byte_range(self, a: int, b: int) -> tuple[int, int]:
        """The bytes of this state that hold the parameter's elements [a, b) (a is group-aligned)."""
        per = {"param": 1, "groups": self.group, "half": 2}[self.kind]
        return a // per * self.itemsize, -(-b // per) * self.itemsize


@dataclass(eq=False)
class _Chunk:
    """States of whole tensors in one flat buffer: on the host (``host``) or resident (``gpu``)."""

    entries: list[_Entry]
    nbytes: int
    pieces: list[tuple[int, int]] | None = None  # element ranges of a one-tensor chunk larger than a slot
    host: torch.Tensor | None = None
    gpu: torch.Tensor | None = None
    d2h_done: Any = None  # CUDA event of the last copy back to ``host``
    staged: dict[tuple[int, int | None], tuple[list[tuple[int, int, int]], dict[torch.Tensor, dict[str, torch.Tensor]]]] = \
        field(default_factory=dict)  # (slot, piece) -> (copies, views)

    def views(self, flat: torch.Tensor) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for e in self.entries:
            out.setdefault(e.param, {})[e.key] = e.view(flat)
        return out

    def staging(self, slot: torch.Tensor, piece: int | None
                ) -> tuple[list[tuple[int, int, int]], dict[torch.Tensor, dict[str, torch.Tensor]]]:
        """What one unit (the whole chunk, or piece ``piece``) copies between host and ``slot`` as (slot offset,
        host offset, bytes), and the state views the kernel gets in the slot (1-d for a piece)."""
        if piece is None:
            return [(0, 0, self.nbytes)], self.views(slot)
        a, b = self.pieces[piece]
        copies, views, offset = [], {}, 0
        for e in self.entries:
            lo, hi = e.byte_range(a, b)
            copies.append((offset, e.offset + lo, hi - lo))
            views.setdefault(e.param, {})[e.key] = slot[offset:offset + hi - lo].view(e.dtype)
            offset += _align(hi - lo)
        return copies, views


class _CudaQueues:
    """Side streams, events and asynchronous copies on the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def main(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def synchronize(self, stream: torch.cuda.Stream) -> None:
        stream.synchronize()


class _DeferredEvent:
    def __init__(self, queue: _DeferredQueue | None) -> None:
        self.queue = queue
        self.done = queue is None  # the main "stream" runs everything at once


class _DeferredQueue:
    """A side "stream" of the CPU stand-in: operations wait in order until something needs their result."""

    def __init__(self) -> None:
        self.ops: list[Callable[[], None]] = []

    def run(self, until: _DeferredEvent | None = None) -> None:
        while self.ops and not (until is not None and until.done):
            self.ops.pop(0)()


class _DeferredQueues:
    """The CPU stand-in for ``_CudaQueues`` (``staging_device='cpu'``): kernels run at once, copies on the side
    queues run as late as possible, only when a wait or a synchronize needs them. A missing dependency between
    copies and kernels then shows as a wrong result in the CPU tests, as it would on a GPU."""

    def stream(self) -> _DeferredQueue:
        return _DeferredQueue()

    def main(self) -> None:
        return None

    @staticmethod
    def _force(event: _DeferredEvent) -> None:
        if not event.done:
            event.queue.run(until=event)

    def copy(self, stream: _DeferredQueue | None, dst: torch.Tensor, src: torch.Tensor) -> None:
        if stream is None:
            dst.copy_(src)
        else:
            stream.ops.append(lambda: dst.copy_(src))

    def record(self, stream: _DeferredQueue | None) -> _DeferredEvent:
        event = _DeferredEvent(stream)
        if stream is not None:
            stream.ops.append(lambda: setattr(event, "done", True))
        return event

    def wait(self, stream: _DeferredQueue | None, event: _DeferredEvent) -> None:
        if stream is None:
            self._force(event)
        else:
            stream.ops.append(lambda: self._force(event))

    def synchronize(self, stream: _DeferredQueue) -> None:
        stream.run()


class OffloadedOptimizer(OptgenOptimizer):
    """Base of ``offloaded(cls)``: the optimizer ``cls`` with its states in chunks (see the module doc)."""

    def __init__(self, params: Iterable[Any], *args: Any, chunk_mib: float = 64, gpu_budget_mib: float | None = None,
                 staging_buffers: int = 3, staging_device: str | torch.device | None = None, **kwargs: Any) -> None:
        if isinstance(staging_buffers, bool) or not isinstance(staging_buffers, int) or staging_buffers < 1:
            raise ValueError(f"Invalid staging_buffers: {staging_buffers!r} (an int >= 1)")
        if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, (int, float)) or not chunk_mib > 0 or \
                not math.isfinite(chunk_mib):
            raise ValueError(f"Invalid chunk_mib: {chunk_mib!r} (a positive number of MiB)")
        if gpu_budget_mib is not None:
            if isinstance(gpu_budget_mib, bool) or not isinstance(gpu_budget_mib, (int, float)) or \
                    not math.isfinite(gpu_budget_mib):
                raise ValueError(f"Invalid gpu_budget_mib: {gpu_budget_mib!r} (a number of MiB, or None)")
            if gpu_budget_mib < chunk_mib:
                raise ValueError(f"gpu_budget_mib={gpu_budget_mib} is smaller than one chunk (chunk_mib={chunk_mib}): "
                                 f"paged states need at least one chunk of GPU memory to step in")
        if staging_device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("optimizer state offload needs a CUDA GPU and none is available "
                                   "(staging_device='cpu' runs the same chunking CPU-to-CPU, for tests)")
        elif torch.device(staging_device).type != "cpu":
            raise ValueError(f"Invalid staging_device: {staging_device!r} (None for the parameters' GPU, or 'cpu' "
                             f"for CPU-to-CPU tests)")
        self._testing_cpu = staging_device is not None
        self.chunk_bytes = int(chunk_mib * MiB)
        self.staging_buffers = staging_buffers
        self.gpu_budget_bytes = None if gpu_budget_mib is None else int(gpu_budget_mib * MiB)
        self._device: torch.device | None = None
        self._chunks: list[_Chunk] = []
        self._chunk_of: dict[torch.Tensor, _Chunk] = {}
        self._slots: list[torch.Tensor] = []
        self._slot_free: list[Any] = []  # CUDA event per slot: its last copy out
        self._queues: _CudaQueues | _DeferredQueues | None = None
        self._streams: tuple[Any, Any] | None = None  # (copy in, copy out) side streams
        super().__init__(params, *args, **kwargs)

    # ------------------------------------------------------------------ validation
    def _state_layout(self, p: torch.Tensor) -> list[tuple[str, torch.dtype, tuple[int, ...], str, int]]:
        """(key, dtype, shape, shape kind, group) of every state tensor of ``p`` except the step count."""
        return [(b.key, b.torch_dtype(p.dtype), b.shape_for(p), b.shape, b.group)
                for b in self.variants[self.variant_of(p)].buffers if b.key is not None]

    def _state_bytes(self, p: torch.Tensor) -> int:
        return sum(_align(math.prod(s) * torch.empty((), dtype=d).element_size()) for _, d, s, _, _ in self._state_layout(p))

    def _unsplittable(self, p: torch.Tensor) -> str | None:
        """Why ``p``'s states cannot be stepped in pieces (None if they can): pieces are views of the flattened
        tensor at group-aligned offsets, which is exact only for an update that is element- (or group-) wise."""
        v = self.variants[self.variant_of(p)]
        if v.needs_rng:
            return "its stochastic rounding draws random bits by element index within the tensor"
        if getattr(v, "global_values", True) or any(b.shape == "scalar" for b in v.buffers):
            return "the update needs whole-tensor values (a reduction, a per-tensor scale or the element count)"
        if not p.is_contiguous():
            return "the parameter is not contiguous"
        return None

    def _pieces(self, p: torch.Tensor) -> list[tuple[int, int]] | None:
        """Element ranges of ``p`` whose states fit one staging slot each, starting on multiples of every
        quantization group (and of 16 elements, so every view stays 16-byte aligned); None if none fits."""
        layout = self._state_layout(p)
        quantum = math.lcm(16, *(16 * g if kind == "groups" else 32 if kind == "half" else 16
                                 for _, _, _, kind, g in layout))
        per_quantum = sum(quantum // {"param": 1, "groups": g, "half": 2}[kind] *
                          torch.empty((), dtype=d).element_size() for _, d, _, kind, g in layout)
        quanta = (self.chunk_bytes - ALIGN * len(layout)) // per_quantum
        if quanta < 1:
            return None
        step, n = quanta * quantum, p.numel()
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Also check, before anything is stored, that every parameter is on the one offload device and that
        its states fit one chunk or can be stepped in pieces."""
        if isinstance(param_group, dict):
            param_group = {**param_group, "params": _param_list(param_group["params"])}
            tensors = _tensors_of(param_group["params"])
            self._validate_params(tensors)
            device = self._device
            for p in tensors:
                if _is_dtensor(p):
                    raise ValueError(f"{type(self).__name__}: sharded (DTensor) parameters cannot have offloaded "
                                     f"states")
                if p.device.type != ("cpu" if self._testing_cpu else "cuda"):
                    need = "CPU parameters (staging_device='cpu')" if self._testing_cpu else "parameters on a CUDA GPU"
                    raise ValueError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} is on {p.device}; "
                                     f"offloaded states need {need}")
                if device is not None and p.device != device:
                    raise ValueError(f"{type(self).__name__}: parameters on {device} and {p.device}; "
                                     f"offload works with one device")
                device = p.device
                need_bytes = self._state_bytes(p)
                if need_bytes > self.chunk_bytes:
                    why = self._unsplittable(p) or (None if self._pieces(p) else "one quantization group's "
                                                    "states do not fit a chunk")
                    if why is not None:
                        raise ValueError(f"{type(self).__name__}: the states of a parameter of shape {tuple(p.shape)} "
                                         f"take {need_bytes / MiB:.2f} MiB, more than one chunk "
                                         f"({self.chunk_bytes / MiB:.2f} MiB), and cannot be stepped in pieces: {why}; "
                                         f"raise chunk_mib to at least {math.ceil(need_bytes / MiB)}")
            super().add_param_group(param_group)
            self._device = device
        else:
            super().add_param_group(param_group)  # the base class refuses it

    def attach_gradient_release(self, model: torch.nn.Module | None = None) -> Any:
        raise RuntimeError("gradient release is not supported with offloaded states: each parameter's step would "
                           "move its whole chunk across the bus")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} cannot be copied or pickled: its states live in pinned host chunks "
                        f"and CUDA streams. Save its state_dict() and load it into a new optimizer")

    # ------------------------------------------------------------------ placement
    def _alloc_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=not self._testing_cpu)

    def _point(self, chunk: _Chunk, flat: torch.Tensor) -> None:
        """Make every state tensor of the chunk a view into ``flat``."""
        for e in chunk.entries:
            self.state[e.param][e.key] = e.view(flat)

    def _place(self, values: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Pack the given parameters' states (key -> tensor, any device) into new host chunks, in order, then
        rebalance. A chunk holds whole tensors of one param group, at most ``chunk_bytes``, or the states of one
        larger tensor, which is then streamed in pieces."""
        pending: list[torch.Tensor] = []
        size = 0

        def close(pieces: list[tuple[int, int]] | None = None) -> None:
            nonlocal size
            if not pending:
                return
            entries, offset = [], 0
            for p in pending:
                for key, dtype, shape, kind, group in self._state_layout(p):
                    entries.append(_Entry(p, key, offset, dtype, shape, kind, group))
                    offset += _align(entries[-1].nbytes)
            chunk = _Chunk(entries, offset, pieces, host=self._alloc_host(offset))
            for e in entries:
                value = values[e.param][e.key]
                if value.dtype != e.dtype or tuple(value.shape) != e.shape:
                    raise RuntimeError(f"state '{e.key}' has dtype {value.dtype} and shape {tuple(value.shape)}, "
                                       f"the spec's layout says {e.dtype} and {e.shape}")
                e.view(chunk.host).copy_(value)
                self._chunk_of[e.param] = chunk
            self._point(chunk, chunk.host)
            self._chunks.append(chunk)
            pending.clear()
            size = 0

        group_of = {p: k for k, g in enumerate(self.param_groups) for p in g["params"]}
        last_group = None
        for p in values:  # (a chunk is stepped once per param group: it never mixes two)
            need = self._state_bytes(p)
            if size + need > self.chunk_bytes or group_of[p] != last_group:
                close()
            last_group = group_of[p]
            pending.append(p)
            size += need
            if need > self.chunk_bytes:
                close(self._pieces(p))
        close()
        self._rebalance()

    def _drop_chunks(self) -> None:
        self.synchronize()
        self._chunks.clear()
        self._chunk_of.clear()

    def _slot_count(self) -> int:
        """``staging_buffers`` slots, or as many as the budget has room for."""
        if self.gpu_budget_bytes is None:
            return self.staging_buffers
        return max(1, min(self.staging_buffers, self.gpu_budget_bytes // self.chunk_bytes))

    def _rebalance(self) -> None:
        """Page chunks in or out so that resident states + staging slots fit the budget."""
        self.synchronize()
        total = sum(c.nbytes for c in self._chunks)
        resident: set[int] = set()
        if self.gpu_budget_bytes is not None:
            room = self.gpu_budget_bytes if total <= self.gpu_budget_bytes else \
                self.gpu_budget_bytes - self._slot_count() * self.chunk_bytes
            for k, c in enumerate(self._chunks):
                if c.nbytes > room:
                    break
                resident.add(k)
                room -= c.nbytes
        device = self._staging_device()
        for k, c in enumerate(self._chunks):  # out first: it frees GPU memory for what comes in
            if k not in resident and c.gpu is not None:
                c.host = self._alloc_host(c.nbytes)
                c.host.copy_(c.gpu)
                self._point(c, c.host)
                c.gpu = None
        for k, c in enumerate(self._chunks):
            if k in resident and c.gpu is None:
                c.gpu = torch.empty(c.nbytes, dtype=torch.uint8, device=device)
                c.gpu.copy_(c.host)
                self._point(c, c.gpu)
                c.host, c.d2h_done = None, None
        if len(resident) == len(self._chunks):
            self._slots = []
            for c in self._chunks:
                c.staged.clear()

    def _staging_device(self) -> torch.device:
        return torch.device("cpu") if self._testing_cpu else self._device

    def set_gpu_budget(self, gpu_budget_mib: float | None) -> None:
        """Change the GPU memory budget for states (None: every state in pinned CPU memory); chunks page in or
        out now. A budget below one chunk is refused and changes nothing."""
        if gpu_budget_mib is not None and (isinstance(gpu_budget_mib, bool) or
                                           not isinstance(gpu_budget_mib, (int, float)) or
                                           not math.isfinite(gpu_budget_mib) or
                                           not gpu_budget_mib * MiB >= self.chunk_bytes):
            raise ValueError(f"Invalid gpu_budget_mib: {gpu_budget_mib!r} (None, or at least one chunk: "
                             f"{self.chunk_bytes / MiB} MiB)")
        self.gpu_budget_bytes = None if gpu_budget_mib is None else int(gpu_budget_mib * MiB)
        if self._chunks:
            self._rebalance()

    def gpu_state_bytes(self) -> int:
        """GPU bytes held for optimizer states now: resident chunks and staging slots."""
        return sum(c.nbytes for c in self._chunks if c.gpu is not None) + sum(s.numel() for s in self._slots)

    def synchronize(self) -> None:
        """Wait for the copies of states back to pinned memory. ``step()`` returns without waiting (the last
        copies overlap what follows); ``state_dict()`` and the other checkpoint methods call this first, and
        code that reads ``optimizer.state`` on the CPU right after a step should too."""
        if self._streams is not None:
            self._queues.synchronize(self._streams[1])

    # ------------------------------------------------------------------ step
    def _check_states(self, params: list[torch.Tensor], ids: list[int], layouts: Any) -> None:
        """Raise ValueError unless every parameter still fits the chunk entries its states were packed into (one
        resized through ``.data`` would have the kernels step past them, into the next tensor's states) and each of
        its states in ``optimizer.state`` is still its chunk's view (a resident chunk's kernels take those
        tensors; one set by hand would be stepped in place of the chunk, or written past its end)."""
        index = dict(zip(params, ids))
        for chunk in {id(c): c for c in map(self._chunk_of.get, params) if c is not None}.values():
            flat = chunk.gpu if chunk.gpu is not None else chunk.host
            wants: dict[torch.Tensor, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
            for e in chunk.entries:
                if e.param not in index:
                    continue
                if e.param not in wants:
                    wants[e.param] = {key: (dtype, shape) for key, dtype, shape, _, _ in self._state_layout(e.param)}
                want, value = wants[e.param].get(e.key), self.state[e.param].get(e.key)
                if want != (e.dtype, e.shape):
                    raise ValueError(f"parameter {index[e.param]} (shape {tuple(e.param.shape)}, {e.param.dtype}) no "
                                     f"longer fits its state '{e.key}' ({e.dtype}, shape {e.shape}): its size or "
                                     f"dtype changed after its states were placed")
                if not isinstance(value, torch.Tensor) or value.dtype != e.dtype or tuple(value.shape) != e.shape \
                        or (e.nbytes and value.data_ptr() != flat.data_ptr() + e.offset):  # (empty views: no address)
                    raise ValueError(f"state '{e.key}' of parameter {index[e.param]} is no longer the view of its "
                                     f"chunk that this optimizer made: offloaded states cannot be set by hand (load "
                                     f"them with load_state_dict)")

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor], ids: list[int], counts: None = None,
                    layouts: Any = None) -> None:
        """The base class's step of one group, with each state list made of chunk views (no plans here, so no
        ``counts``; ``layouts``, the base class's, is derived again by ``_buckets``)."""
        if torch.compiler.is_compiling():
            raise RuntimeError("an offloaded optimizer's step cannot be compiled: it schedules copies on side "
                               "streams (call step() outside torch.compile)")
        refuse_graph_capture()  # before any state changes
        new = [p for p in params if not self.state[p]]
        if new:
            init = {}
            for p in new:  # fresh states built on the CPU, one parameter at a time: no GPU spike
                init[p] = self.variants[self.variant_of(p)].init_state(p.detach().to("cpu", copy=True))
                self.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
            self._place(init)
        states = [self.state[p] for p in params]
        device = params[0].device
        calls: dict[_Chunk, list[tuple[str, list[int], torch.Tensor, tuple[torch.Tensor, ...]]]] = {}
        scalars: dict[Any, torch.Tensor] = {}
        # Host work first (step counts, scalars, rng tensors: small copies on the current stream, which the
        # kernels run on), so that the pipeline below only enqueues copies and kernels.
        for key, idx in self._buckets(params, states).items():
            t, variant = key[1], key[2]  # (device, step count, variant, ...)
            if t not in scalars:
                scalars[t] = self._scalars(group, t, device)
            by_chunk: dict[_Chunk, list[int]] = {}
            for i in idx:
                by_chunk.setdefault(self._chunk_of[params[i]], []).append(i)
            for chunk, sub in by_chunk.items():
                rng = (make_rng(self.seed, t, [ids[i] for i in sub], device),) \
                    if self.variants[variant].needs_rng else ()
                calls.setdefault(chunk, []).append((variant, sub, scalars[t], rng))

        def compute(chunk: _Chunk, views: dict[torch.Tensor, dict[str, torch.Tensor]], piece: int | None) -> None:
            span = None if piece is None else chunk.pieces[piece]

            def part(t: torch.Tensor) -> torch.Tensor:
                """A whole tensor, or (one tensor streamed in pieces) the flat view of this piece's elements."""
                return t if span is None else t.reshape(-1)[span[0]:span[1]]

            for variant, sub, sc, rng in calls[chunk]:
                lists = []
                for buf in self.variants[variant].buffers:
                    if buf.key is not None:
                        lists.append([views[params[i]][buf.key] for i in sub])
                    else:
                        lists.append([part(params[i] if buf.arg == "param" else params[i].grad) for i in sub])
                self._kernel(device, variant)(*lists, sc, *rng)

        order = sorted(calls, key=self._chunks.index)
        self._run([c for c in order if c.gpu is not None], [c for c in order if c.gpu is None], compute)

    def _run(self, resident: list[_Chunk], paged: list[_Chunk],
             compute: Callable[[_Chunk, dict[torch.Tensor, dict[str, torch.Tensor]], int | None], None]) -> None:
        """Step resident chunks in place and stream the paged ones (whole, or piece by piece) through the
        staging slots, unit k in slot k mod n.

        Copies in go on one side stream, copies out on another, kernels on the current stream; events order
        them: a slot is refilled only after its last copy out, a chunk is copied in only after its previous
        copy out, a unit is stepped only after its copy in and copied out only after its step. With three
        slots, a unit comes in while the one before it is stepped and the one before that goes out, with no
        wait on the kernel in between.
        """
        n_slots = self._slot_count()
        if paged and len(self._slots) != n_slots:
            self.synchronize()
            self._slots = [torch.empty(self.chunk_bytes, dtype=torch.uint8, device=self._staging_device())
                           for _ in range(n_slots)]
            self._slot_free = [None] * n_slots
            for c in self._chunks:
                c.staged.clear()
        if self._queues is None:
            self._queues = _DeferredQueues() if self._testing_cpu else _CudaQueues(self._device)
        q = self._queues
        if paged and self._streams is None:
            self._streams = (q.stream(), q.stream())
        main = q.main()
        units = [(c, j) for c in paged for j in ([None] if c.pieces is None else range(len(c.pieces)))]
        loaded: list[Any] = [None] * len(units)
        slot_free = self._slot_free

        def staging(k: int) -> tuple[list[tuple[int, int, int]], dict[torch.Tensor, dict[str, torch.Tensor]]]:
            chunk, piece = units[k]
            key = (k % n_slots, piece)
            if key not in chunk.staged:
                chunk.staged[key] = chunk.staging(self._slots[k % n_slots], piece)
            return chunk.staged[key]

        def load(k: int) -> None:
            chunk, slot, stream = units[k][0], self._slots[k % n_slots], self._streams[0]
            for event in (slot_free[k % n_slots], chunk.d2h_done):
                if event is not None:
                    q.wait(stream, event)
            for at, src, n in staging(k)[0]:
                q.copy(stream, slot[at:at + n], chunk.host[src:src + n])
            loaded[k] = q.record(stream)

        for k in range(min(n_slots, len(units))):
            load(k)
        for chunk in resident:
            compute(chunk, {p: self.state[p] for p in {e.param for e in chunk.entries}}, None)
        for k, (chunk, piece) in enumerate(units):
            s, stream = k % n_slots, self._streams[1]
            copies, views = staging(k)
            q.wait(main, loaded[k])
            compute(chunk, views, piece)
            q.wait(stream, q.record(main))
            for at, dst, n in copies:
                q.copy(stream, chunk.host[dst:dst + n], self._slots[s][at:at + n])
            chunk.d2h_done = slot_free[s] = q.record(stream)
            if k + n_slots < len(units):
                load(k + n_slots)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """As the base class, but each state tensor is a copy (on the device its chunk is on now): the live
        states are views of different dtypes into one buffer, which ``torch.save`` refuses (and the step count,
        which the next step advances in place)."""
        self.synchronize()
        sd = super().state_dict()
        sd["state"] = {index: {k: v.clone() for k, v in state.items()} for index, state in sd["state"].items()}
        return sd

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        """Load groups and seed, then copy the saved states straight into new chunks (the base loader would
        first rebuild every state on the GPU)."""
        self.synchronize()
        super()._load_checked({**state_dict, "state": {}})
        self._drop_chunks()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        values = {}
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index)
            if saved:
                step = saved["step"]
                self.state[p]["step"] = step.detach().to(device="cpu", dtype=step.dtype, copy=True).reshape(step.shape)
                values[p] = {k: v for k, v in self._as_stored(p, saved).items() if k != "step"}
        self._place(values)

    def load_torch_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As the base class (which builds the imported states on the parameters' device), then into chunks."""
        self.synchronize()
        super().load_torch_state_dict(state_dict)
        values = {p: {k: v for k, v in s.items() if k != "step"} for p, s in self.state.items() if s}
        self._drop_chunks()
        self._place(values)

    def _export(self, p: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """export_state of one parameter, its states brought to the parameter's device one tensor at a time; a state
        that no longer fits the parameter (``_check_states``) is refused."""
        self._check_states([p], [index], None)
        layout = self.variants[self.variant_of(p)]
        state = self.state.get(p) or layout.init_state(p.detach())
        local = {k: v if k == "step" else v.to(p.device) for k, v in state.items()}
        return layout.export_state(p.detach(), local)

    def master_weights(self) -> list[torch.Tensor]:
        self.synchronize()
        return [self._export(p, i)["master"] for i, p in enumerate(p for g in self.param_groups for p in g["params"])]

    def torch_state_dict(self) -> dict[str, Any]:
        """As the base class, with the fp32 states on the CPU (the full fp32 state need not fit the GPU)."""
        self.synchronize()
        sd = torch.optim.Optimizer.state_dict(self)
        state = {}
        for index, p in enumerate(p for g in self.param_groups for p in g["params"]):
            if self.state.get(p):
                values = self._export(p, index)
                values.pop("master")
                state[index] = {"step": self.state[p]["step"].clone(), **{k: v.cpu() for k, v in values.items()}}
        return {"state": state, "param_groups": sd["param_groups"]}


_CLASSES: dict[type, type] = {}


def offloaded(cls: type[OptgenOptimizer]) -> type[OptgenOptimizer]:
    """The optimizer class ``cls`` with its states offloaded: ``offloaded(FlashAdamW)(params, lr=1e-3,
    chunk_mib=64, gpu_budget_mib=None, staging_buffers=3)``.

    ``chunk_mib``: size of one chunk and of each GPU staging slot. ``gpu_budget_mib``: None keeps every state
    in pinned CPU memory; a number keeps states on the GPU while they fit it (staging slots included) and
    pages chunks out beyond it. ``staging_buffers``: number of staging slots (fewer if the budget is smaller).
    ``staging_device='cpu'`` (tests only) runs everything CPU-to-CPU.
    """
    if not isinstance(cls, type) or not issubclass(cls, OptgenOptimizer) or issubclass(cls, OffloadedOptimizer):
        raise TypeError(f"offloaded() takes an optgen optimizer class, got {cls!r}")
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Offloaded{cls.__name__}", (OffloadedOptimizer, cls),
                             {"__module__": __name__, "__doc__": f"{cls.__name__} with offloaded states. "
                                                                 f"{offloaded.__doc__}"})
    return _CLASSES[cls]
