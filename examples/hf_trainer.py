"""Hand an optgen optimizer to Hugging Face ``Trainer``: a small GPT-2 (random init, byte vocabulary) learns the
Python standard library's source, with AdamW8bit (or any built-in) and a cosine schedule.

    pip install transformers accelerate
    python examples/hf_trainer.py [--optimizer AdamW8bit] [--steps 60] [--device cpu]

Trainer takes ``optimizers=(optimizer, scheduler)``: it then uses them as given (no ``optim=`` string needed).
Optimizers that store bf16 weights (FlashAdamW, StochasticAdamW) get the model cast to bf16 (norms stay fp32).
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch

import optgen.optim
from optgen.training import cast_model


def stdlib_bytes(limit: int = 2_000_000) -> bytes:
    """The first ``limit`` bytes of the standard library's .py files, in a fixed order (no download)."""
    out = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


class ByteBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``block`` bytes; the labels are the inputs (the model shifts them)."""

    def __init__(self, data: bytes, block: int) -> None:
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.blocks = ids[: len(ids) // block * block].view(-1, block)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def run(optimizer: str = "AdamW8bit", steps: int = 60, lr: float = 2e-3, batch_size: int = 16, block: int = 128,
        device: str = "cpu", out: str = "runs/hf_trainer", seed: int = 0) -> tuple[object, list[float]]:
    """Train with Trainer and return (the trainer, the logged training losses)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=block, n_embd=128, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config).to(device)
    cls = getattr(optgen.optim, optimizer)
    if "float32" not in cls.param_dtypes:
        model = cast_model(model, getattr(torch, cls.param_dtypes[0]))
    data = stdlib_bytes()
    split = len(data) * 9 // 10
    train, valid = ByteBlocks(data[:split], block), ByteBlocks(data[split:split + 256 * block], block)
    opt = cls(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=steps // 10, num_training_steps=steps)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                             per_device_eval_batch_size=batch_size, logging_steps=max(1, steps // 10),
                             save_strategy="no", report_to=[], seed=seed, use_cpu=device == "cpu",
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid, optimizers=(opt, sched))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="AdamW8bit", help=f"one of {', '.join(optgen.optim.__all__)}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args()
    trainer, losses = run(args.optimizer, args.steps, args.lr, args.batch_size, device=args.device, out=args.out)
    print(f"{args.optimizer}: training loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"validation loss {trainer.evaluate()['eval_loss']:.3f}")


if __name__ == "__main__":
    main()
