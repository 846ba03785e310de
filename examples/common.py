"""Shared by the examples: optimizer lookup, the training loop's progress bar, and the report (PNG + table)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch

import optgen
import optgen.optim

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


def add_common_args(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--optimizer", default="AdamW", help="built-in class names, comma separated")
    parser.add_argument("--spec", default=None, help="a spec file (YAML) instead of --optimizer")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs")


def optimizer_classes(args: argparse.Namespace) -> list[type]:
    """The classes named by --spec or --optimizer."""
    names = [args.spec] if args.spec else [n.strip() for n in args.optimizer.split(",") if n.strip()]
    classes = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            classes.append(optgen.load(name))
        elif hasattr(optgen.optim, name):
            classes.append(getattr(optgen.optim, name))
        else:
            raise SystemExit(f"unknown optimizer {name!r}; built-ins: {', '.join(optgen.optim.__all__)}")
    return classes


def model_dtype(cls: type) -> torch.dtype:
    """bf16 for specs that store bf16 weights (FlashAdamW, StochasticAdamW), else fp32."""
    return getattr(torch, cls.param_dtypes[0])


def progress(steps: int, name: str) -> Iterable[int]:
    return tqdm(range(steps), desc=name, leave=False) if tqdm is not None else range(steps)


def show_loss(bar: Iterable[int], step: int, steps: int, name: str, loss: float) -> None:
    if tqdm is not None:
        bar.set_postfix(loss=f"{loss:.4f}")
    elif step % max(1, steps // 10) == 0:
        print(f"{name} step {step} loss {loss:.4f}")


def write_report(results: list[dict], out: Path, stem: str, columns: list[str]) -> None:
    """``<out>/<stem>.md`` (one row per result, the given columns) and ``<out>/<stem>_loss.png``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| optimizer | final train loss (mean of last 20) | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for r in results:
        tail = r["losses"][-20:]
        cells = " | ".join(f"{r[c]:.4f}" for c in columns)
        lines.append(f"| {r['name']} | {sum(tail) / len(tail):.4f} | {cells} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
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
    fig.savefig(out / f"{stem}_loss.png", dpi=120)
