"""Sharded parameters (FSDP2's DTensors): step each rank's local shard, with whole-tensor values kept global.

FSDP2 (``fully_shard``) gives DTensor parameters and gradients. The optimizer steps their local tensors
with the same single launch per group as on one device, and keeps its states as plain local tensors
shaped like the local shard (so per-rank optimizer memory is the total over the world size). What cannot
be computed from a shard alone goes through ``Sharding``: a spec's whole-tensor reductions (norms, sums,
maxima) are local partials, all-reduced once per reduction pass for all the tensors of a launch together,
and ``numel`` is the whole tensor's element count. Nothing here is a communication layer of its own: the
collectives are torch.distributed's, over the process groups of the parameters' device mesh.

Checkpoints (``state_dict_sharded`` / ``load_state_sharded``): DCP reshards DTensors, not plain local
tensors, so each state is saved as a DTensor placed like its parameter. Elementwise layouts (fp32, bf16,
fp8 codes, ECC and Kahan terms) are saved as they are stored and reshard exactly, with a per-tensor scale
(the same on every rank) saved as a plain tensor; group-wise codes (q8/q4 with per-group scales) are tied
to each rank's shard boundaries, so they are saved decoded to fp32 and re-encoded on the new shards.
fp8 codes are saved as their bytes (uint8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from optgen.runtime.transfer import to_device

if dist.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch built without distributed support: no parameter is a DTensor
    DTensor = type("DTensor", (), {})

if TYPE_CHECKING:
    from optgen.runtime.optimizer import Variant


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel steps: a DTensor's local shard (the attribute, not ``to_local()``: no autograd
    node per parameter per step), any other tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


def layout(p: torch.Tensor) -> tuple | None:
    """What parameters must share to be stepped together: device mesh and placements (None: not a DTensor)."""
    return (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None


def require_process_group() -> None:
    """A clear error instead of a hang or a cryptic one when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("these parameters are DTensors but the default process group is not initialised: "
                           "call torch.distributed.init_process_group() (e.g. run under torchrun) first")


@dataclass(frozen=True)
class Sharding:
    """The tensors of one launch are shards: whole-tensor element counts and the groups to reduce over."""

    numels: tuple[int, ...]  # elements of each whole tensor (the spec's ``numel``)
    groups: tuple[Any, ...]  # the process groups of the mesh dimensions the tensors are sharded over
    rank: int = 0  # this rank's shard: its index over the sharded mesh dimensions
    world: int = 1  # the number of shards

    @staticmethod
    def of(params: list[DTensor]) -> Sharding:
        """For DTensor parameters of one layout (see ``layout``)."""
        require_process_group()
        mesh, placements = params[0].device_mesh, params[0].placements
        groups = tuple(mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard() and mesh.size(d) > 1)
        coordinate, rank, world = mesh.get_coordinate(), 0, 1
        for d, pl in enumerate(placements):  # replicas (HSDP's replicate dimension) share their shard's index
            if pl.is_shard():
                rank, world = rank * mesh.size(d) + coordinate[d], world * mesh.size(d)
        return Sharding(tuple(p.numel() for p in params), groups, rank, world)

    def stream_ids(self, ids: list[int]) -> list[int]:
        """Stochastic rounding draws by element index within the tensor stepped, here a shard: each shard
        gets its own stream (``id * shards + shard index``; the id itself for one shard), or element j of
        every shard would round with the same random bits. Replicas of a shard draw the same bits."""
        return [i * self.world + self.rank for i in ids]

    @staticmethod
    def partials(n: int, kinds: list[str], device: torch.device) -> torch.Tensor:
        """[n, len(kinds)] accumulators at the identity of each reduction (an empty shard leaves it)."""
        return to_device([-math.inf if k == "max" else 0.0 for k in kinds], torch.float32, device).repeat(n, 1)

    def all_reduce(self, red: torch.Tensor, kinds: list[str], columns: list[int]) -> None:
        """Reduce ``red[:, columns]`` (local partials of every tensor) over the shards, in place: one
        collective per kind present (sum, max) and sharded mesh dimension, whatever the number of tensors."""
        for kind, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
            cols = [j for j in columns if kinds[j] == kind]
            if not cols or not self.groups:
                continue
            part = red[:, cols].contiguous()
            for group in self.groups:
                dist.all_reduce(part, op=op, group=group)
            red[:, cols] = part


# ---------------------------------------------------------------- checkpoints
def _elementwise(variant: Variant) -> dict[str | None, bool]:
    """Per state (torch name; None for the parameter's own side buffers): stored elementwise, so that its
    buffers reshard exactly? Group-wise buffers ("groups", "half") follow one rank's shard boundaries."""
    out: dict[str | None, bool] = {}
    for b in variant.buffers:
        if b.key is not None:
            out[b.state] = out.get(b.state, True) and b.shape in ("param", "scalar")
    return out


def exact_keys(variant: Variant) -> tuple[list[str], list[str]]:
    """(buffer keys saved as stored, torch names of the states saved decoded to fp32) for a sharded parameter."""
    elementwise = _elementwise(variant)
    if not elementwise.get(None, True):
        raise NotImplementedError("a parameter format with group-wise side buffers cannot be resharded")
    keys = [b.key for b in variant.buffers if b.key is not None and elementwise[b.state]]
    return keys, [name for name, ok in elementwise.items() if name is not None and not ok]


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp8 codes are saved as their bytes: gloo cannot gather float8 (a full state dict gathers). Plain
    parameters' states are saved the same way, so that DCP, which copies a checkpoint's values into the
    loading side's tensors, copies bytes into bytes between a sharded model and an unwrapped one."""
    return torch.uint8 if dtype in FP8 else dtype


def as_stored(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A saved state in the dtype its buffer stores: fp8 codes saved as their bytes are viewed as fp8 again."""
    return value.view(dtype) if dtype in FP8 and value.dtype == torch.uint8 else value


def as_dtensor(value: torch.Tensor, p: DTensor) -> DTensor:
    """A local tensor shaped like ``p``'s shard, as a DTensor placed like ``p`` (uneven shards included)."""
    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def state_dict_sharded(variant: Variant, p: DTensor, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The saved form of one DTensor parameter's state (see the module docstring)."""
    exact, decoded = exact_keys(variant)
    shapes = {b.key: b.shape for b in variant.buffers}
    # copies: DCP loads into the tensors of a state_dict in place, and a load must change nothing until
    # the optimizer has checked it
    out: dict[str, Any] = {"step": state["step"].clone()}
    for key in exact:
        value = state[key].clone().view(saved_dtype(state[key].dtype))
        out[key] = value if shapes[key] == "scalar" else as_dtensor(value, p)
    if decoded:
        values = variant.export_state(local(p).detach(), state)
        for name in decoded:
            out[name] = as_dtensor(values[name], p)
    return out


def expected_sharded(variant: Variant, p: DTensor) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
    """Key -> (shape, dtype, is a DTensor) of every entry ``state_dict_sharded`` gives for ``p``."""
    exact, decoded = exact_keys(variant)
    out = {}
    for b in variant.buffers:
        if b.key in exact:
            shape = () if b.shape == "scalar" else tuple(p.shape)
            out[b.key] = (shape, saved_dtype(b.torch_dtype(p.dtype)), b.shape != "scalar")
    for name in decoded:
        out[name] = (tuple(p.shape), torch.float32, True)
    return out


def load_state_sharded(variant: Variant, p: DTensor, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Local state buffers of ``p`` from its saved form (already checked against ``expected_sharded``):
    exact buffers copied, fp32 states encoded on this rank's shard."""
    exact, decoded = exact_keys(variant)
    p_local = local(p).detach()
    values = {name: local(saved[name]) for name in decoded}
    state = variant.import_state(p_local, values)  # every buffer, the decoded states encoded here
    for key in exact:
        state[key] = local(saved[key]).detach().to(device=p_local.device, copy=True).view(state[key].dtype)
    return state
