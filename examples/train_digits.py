"""Train a small CNN on scikit-learn's bundled digits images with one or more optgen optimizers.

    python examples/train_digits.py --optimizer AdamW,FlashAdamW,AdamW8bit --steps 300
    python examples/train_digits.py --spec my_spec.yaml --lr 3e-3

Every optimizer sees the same initial weights and the same batches (same --seed). Optimizers whose spec
stores bf16 weights (e.g. FlashAdamW) train a bf16 copy of the model; the loss is computed in fp32.
Writes <out>/digits_loss.png (loss curves) and <out>/digits.md (final test loss and accuracy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, model_dtype, optimizer_classes, progress, show_loss, write_report  # noqa: E402

from optgen.training import cast_model  # noqa: E402


def load_digits(device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """The 1797 8x8 digits bundled with scikit-learn, scaled to [0, 1], split 80/20 (fixed by the seed)."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.GELU(), nn.Linear(128, 10))


def train(cls: type, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    dtype = model_dtype(cls)
    model = cast_model(make_model().to(args.device), dtype)
    opt = cls(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    bar = progress(args.steps, cls.__name__)
    for step in bar:
        idx = torch.randint(0, len(xtr), (args.batch_size,), generator=batches).to(args.device)
        loss = nn.functional.cross_entropy(model(xtr[idx].to(dtype)).float(), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        show_loss(bar, step, args.steps, cls.__name__, losses[-1])
    with torch.no_grad():
        logits = model(xte.to(dtype)).float()
        test_loss = nn.functional.cross_entropy(logits, yte).item()
        accuracy = (logits.argmax(1) == yte).float().mean().item()
    return {"name": cls.__name__, "losses": losses, "test loss": test_loss, "test accuracy": accuracy}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=300, batch_size=64, lr=2e-3)
    args = parser.parse_args(argv)
    data = load_digits(torch.device(args.device), args.seed)
    results = [train(cls, args, data) for cls in optimizer_classes(args)]
    write_report(results, Path(args.out), "digits", ["test loss", "test accuracy"])
    return results


if __name__ == "__main__":
    main()
