"""Train a small CNN on scikit-learn's bundled digits images with one or more optgen optimizers.

    python examples/train_digits.py --optimizer AdamW,FlashAdamW,AdamW8bit --steps 300
    python examples/train_digits.py --spec my_spec.yaml --lr 3e-3

Every optimizer sees the same initial weights and the same batches (same --seed). Optimizers whose spec
stores bf16 weights (e.g. FlashAdamW) train a bf16 copy of the model; the loss is computed in fp32.
Writes <out>/digits_loss.png (loss curves) and <out>/digits.md (final test loss and accuracy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import optgen
import optgen.optim
import optgen.training

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


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


def optimizer_class(name: str) -> type:
    if name.endswith((".yaml", ".yml")):
        return optgen.load(name)
    if not hasattr(optgen.optim, name):
        raise SystemExit(f"unknown optimizer {name!r}; built-ins: {', '.join(optgen.optim.__all__)}")
    return getattr(optgen.optim, name)


def train(cls: type, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    model = make_model().to(args.device)
    dtype = getattr(torch, cls.param_dtypes[0])
    if dtype != torch.float32:
        model = optgen.training.cast_model(model, dtype)
    opt = cls(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    steps = range(args.steps)
    bar = tqdm(steps, desc=cls.__name__, leave=False) if tqdm is not None else steps
    for step in bar:
        idx = torch.randint(0, len(xtr), (args.batch_size,), generator=batches).to(args.device)
        loss = nn.functional.cross_entropy(model(xtr[idx].to(dtype)).float(), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tqdm is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elif step % max(1, args.steps // 10) == 0:
            print(f"{cls.__name__} step {step} loss {loss.item():.4f}")
    with torch.no_grad():
        logits = model(xte.to(dtype)).float()
        test_loss = nn.functional.cross_entropy(logits, yte).item()
        accuracy = (logits.argmax(1) == yte).float().mean().item()
    return {"name": cls.__name__, "losses": losses, "test_loss": test_loss, "accuracy": accuracy}


def write_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| optimizer | final train loss (mean of last 20) | test loss | test accuracy |", "|---|---|---|---|"]
    for r in results:
        tail = r["losses"][-20:]
        lines.append(f"| {r['name']} | {sum(tail) / len(tail):.4f} | {r['test_loss']:.4f} | {r['accuracy']:.4f} |")
    (out / "digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(r["losses"], label=r["name"], linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "digits_loss.png", dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="AdamW", help="built-in class names, comma separated")
    parser.add_argument("--spec", default=None, help="a spec file (YAML) instead of --optimizer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args(argv)
    names = [args.spec] if args.spec else [n.strip() for n in args.optimizer.split(",") if n.strip()]
    data = load_digits(torch.device(args.device), args.seed)
    results = [train(optimizer_class(name), args, data) for name in names]
    write_report(results, Path(args.out))
    return results


if __name__ == "__main__":
    main()
