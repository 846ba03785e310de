"""Train a small CNN on scikit-learn's bundled 8x8 digits with one or more optgen optimizers.

    python examples/train_digits.py --optimizer AdamW,FlashAdamW --optimizer AdamW8bit --steps 300
    python examples/train_digits.py --spec my_spec.yaml --lr 3e-3

Every optimizer starts from the same weights and sees the same batches (same --seed). Optimizers that store
bf16 weights (FlashAdamW, StochasticAdamW) train a bf16 copy of the model; the loss is computed in fp32.
Writes <out>/digits.md (test loss and accuracy, optimizer bytes per parameter) and <out>/digits_loss.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, bytes_per_param, cross_entropy, fit, optimizer_classes, prepare, write_report


def load_digits(device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): the 1797 images scaled to [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:int(0.8 * len(x))], order[int(0.8 * len(x)):]
    return tuple(t.to(device) for t in (x[train], y[train], x[test], y[test]))


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.GELU(), nn.Linear(128, 10))


def run(cls: type, data: tuple[torch.Tensor, ...], steps: int, batch_size: int, seed: int,
        device: str = "cpu", **hparams: object) -> dict:
    """Train a fresh model with ``cls(params, **hparams)``; returns its losses, test metrics and memory."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model, dtype = prepare(make_model(), cls, device)
    opt = cls(model.parameters(), **hparams)
    order = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(xtr), (batch_size,), generator=order).to(xtr.device)
        return xtr[idx].to(dtype), ytr[idx]

    losses = fit(model, opt, next_batch, steps, cls.__name__)
    with torch.no_grad():
        logits = model(xte.to(dtype))
    return {"name": cls.__name__, "losses": losses, "test loss": cross_entropy(logits, yte).item(),
            "test accuracy": (logits.argmax(1) == yte).float().mean().item(), **bytes_per_param(opt)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=300, batch_size=64, lr=2e-3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    data = load_digits(args.device)
    results = [run(cls, data, args.steps, args.batch_size, args.seed, args.device, lr=args.lr)
               for cls in optimizer_classes(args)]
    write_report(results, args.out, "digits", ["test loss", "test accuracy"])
    return results


if __name__ == "__main__":
    main()
