"""Train a small byte-level model with FSDP2 (``fully_shard``) and any optgen optimizer; checkpoint with DCP.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --optimizer Lamb16 --steps 200        # CPU, gloo
    torchrun --nproc-per-node 8 examples/train_fsdp.py --optimizer FlashAdamW --device cuda   # GPUs, NCCL
    torchrun --nproc-per-node 2 examples/train_fsdp.py --checkpoint ckpt --steps 100          # save ...
    torchrun --nproc-per-node 1 examples/train_fsdp.py --checkpoint ckpt --resume --steps 50  # ... reshard

Data: the running Python's standard library source (*.py, tests left out), bytes as tokens; each rank
takes its own batches. The model predicts the next byte from the previous ``--context`` bytes (embedding,
MLP blocks, output layer), each block sharded with ``fully_shard`` over all ranks. The optimizer steps each
rank's shards in one launch per group; whole-tensor values (LAMB's norms) are all-reduced once per step.
Prints the loss and each rank's optimizer-state bytes; with ``--checkpoint`` saves model and optimizer with
``torch.distributed.checkpoint`` (``--resume`` loads first, at any world size).
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from optgen import optim


def corpus(limit: int) -> torch.Tensor:
    """The stdlib's source files (sorted, tests left out), concatenated as bytes, cut at ``limit``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "site-packages"} & set(path.parts):
            continue
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class ByteModel(nn.Module):
    """Next byte from the previous ``context`` bytes."""

    def __init__(self, context: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.inp = nn.Linear(16 * context, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.out = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(self.embed(x).flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="AdamW", help=f"one of {', '.join(optim.__all__)}")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--gradient-release", action="store_true", help="step each shard inside backward")
    parser.add_argument("--checkpoint", help="folder for a DCP checkpoint, written at the end")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint before training")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cls = getattr(optim, args.optimizer)
    # bf16 weights for specs whose parameter format is bf16 (FlashAdamW's bf16 + 8-bit correction)
    dtype = torch.float32 if "float32" in cls.variants[""].param_dtypes else torch.bfloat16

    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = ByteModel(args.context, args.width, args.layers).to(device=device, dtype=dtype)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = cls(model.parameters(), lr=args.lr)
    if args.resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if args.gradient_release:
        opt.attach_gradient_release(model)

    data = corpus(4_000_000).to(device)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own batches
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - args.context - 1, (args.batch_size,), generator=gen, device=device)
        idx = starts[:, None] + torch.arange(args.context + 1, device=device)
        window = data[idx]
        loss = nn.functional.cross_entropy(model(window[:, :-1]).float(), window[:, -1])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:5d}  loss {float(mean) / world:.4f} nats/byte", flush=True)

    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    params = sum(p.numel() for p in model.parameters())
    print(f"rank {rank}: optimizer states {state_bytes / 2**20:.2f} MiB here, "
          f"{state_bytes / (params / world):.2f} bytes per parameter of its shard", flush=True)
    if args.checkpoint:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint} (world size {world}; loads at any world size)")
    dist.barrier()  # no rank tears gloo down while another still has work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
