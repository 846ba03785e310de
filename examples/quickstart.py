"""Build an optimizer from a spec and train a small model with it, beside torch.optim.AdamW.

    python examples/quickstart.py [--spec specs/adamw.yaml] [--steps 300]

The data is a fixed random "teacher" network (no download): the student MLP learns to reproduce it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import optgen

ROOT = Path(__file__).resolve().parent.parent


def make_data(seed: int = 0, n: int = 2048, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        x = torch.randn(n, dim, generator=g)
        return x, teacher(x)


def train(opt_factory, steps: int, seed: int = 1) -> list[float]:
    torch.manual_seed(seed)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.GELU(), nn.Linear(128, 1))
    opt = opt_factory(model.parameters())
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(nn.functional.mse_loss(model(x), y).item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", default=str(ROOT / "specs" / "adamw.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    Optimizer = optgen.load(args.spec)  # spec -> generated module -> optimizer class, in-process
    print(f"built {Optimizer.__name__} from {args.spec}")
    ours = train(lambda params: Optimizer(params, lr=args.lr), args.steps)
    ref = train(lambda params: torch.optim.AdamW(params, lr=args.lr), args.steps)
    for step in (0, args.steps // 4, args.steps // 2, args.steps - 1):
        print(f"step {step:4d}  loss {Optimizer.__name__} {ours[step]:.4f}   torch.optim.AdamW {ref[step]:.4f}")
    print(f"final full-data loss: {Optimizer.__name__} {ours[-1]:.5f}, torch.optim.AdamW {ref[-1]:.5f}")


if __name__ == "__main__":
    main()
