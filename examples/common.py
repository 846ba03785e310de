"""Shared by the examples and benchmarks/convergence.py: arguments, optimizer lookup, the training loop (with a
progress bar), optimizer memory, and the report (markdown table + PNG of the loss curves)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import optgen
import optgen.optim
from optgen.training import cast_model

try:
    from tqdm import tqdm
except ImportError:  # the loop prints instead
    tqdm = None

Batch = tuple[torch.Tensor, torch.Tensor]


def add_common_args(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--optimizer", action="append", default=[],
                        help="built-in class name; repeat it or give a comma list to compare (default AdamW)")
    parser.add_argument("--spec", action="append", default=[], help="a spec file (YAML); may be repeated")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr, help="the same for every optimizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    parser.add_argument("--out", default="runs", help="folder for the PNG and the markdown table")


def lookup(name: str) -> type | None:
    """A built-in optimizer class by name, or the class built from a spec file; None (with a note) if absent."""
    if name.endswith((".yaml", ".yml")):
        return optgen.load(name)
    cls = getattr(optgen.optim, name, None)
    if cls is None:
        print(f"note: no built-in optimizer {name!r} in this optgen (has {', '.join(optgen.optim.__all__)}); skipped")
    return cls


def optimizer_classes(args: argparse.Namespace) -> list[type]:
    """The classes named by every --optimizer (comma lists allowed) and --spec, in order, missing ones skipped."""
    names = [n.strip() for value in args.optimizer for n in value.split(",") if n.strip()] + args.spec
    found = [lookup(name) for name in names or ["AdamW"]]
    return [cls for cls in found if cls is not None]


def prepare(model: nn.Module, cls: type, device: str | torch.device) -> tuple[nn.Module, torch.dtype]:
    """Move the model to ``device``; if ``cls`` cannot store fp32 weights (FlashAdamW, StochasticAdamW), cast it
    to the first dtype it lists (bf16; norm layers stay fp32). Returns the model and the input dtype."""
    model = model.to(device)
    if "float32" in cls.param_dtypes:
        return model, torch.float32
    dtype = getattr(torch, cls.param_dtypes[0])
    return cast_model(model, dtype), dtype


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 over every position ((..., classes) logits)."""
    return nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def fit(model: nn.Module, opt: torch.optim.Optimizer, next_batch: Callable[[], Batch], steps: int,
        name: str) -> list[float]:
    """Train for ``steps`` on ``next_batch()`` (inputs, targets); returns the training loss of every step."""
    losses = []
    bar = tqdm(range(steps), desc=name, leave=False) if tqdm else range(steps)
    for step in bar:
        x, y = next_batch()
        loss = cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if step % 10 == 0 and tqdm:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elif step % max(1, steps // 10) == 0 and not tqdm:
            print(f"{name} step {step}/{steps} loss {loss.item():.4f}")
    return torch.stack(losses).tolist()


def bytes_per_param(opt: torch.optim.Optimizer) -> dict[str, float]:
    """Measured memory: bytes of every tensor in ``opt.state``, alone and with the parameters, per parameter."""
    params = {id(p): p for group in opt.param_groups for p in group["params"]}.values()
    count = sum(p.numel() for p in params)
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"state B/param": state / count, "state+param B/param": (state + sum(p.nbytes for p in params)) / count}


def plot_losses(panels: dict[str, dict[str, list[list[float]]]], path: Path, ylabel: str = "training loss") -> None:
    """One subplot per panel, one line per name in it: the smoothed mean over its runs (seeds) with the
    min-max band. Writes ``path`` (prints a note instead if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no plot")
        return
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        for name, runs in curves.items():
            window = max(1, len(runs[0]) // 50)
            kernel = torch.ones(window) / window
            smooth = torch.stack([torch.tensor(r) for r in runs]).unfold(1, window, 1) @ kernel
            line, = ax.plot(smooth.mean(0), label=name, linewidth=1)
            if len(runs) > 1:
                ax.fill_between(range(smooth.shape[1]), smooth.min(0).values, smooth.max(0).values,
                                color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="step", ylabel=ylabel, yscale="log")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_report(results: list[dict], out: str | Path, stem: str, metrics: list[str]) -> None:
    """Print and write ``<out>/<stem>.md`` (one row per optimizer) and ``<out>/<stem>_loss.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["final train loss (last 10 %)", *metrics, "state B/param", "state+param B/param"]
    rows = []
    for r in results:
        tail = r["losses"][-max(1, len(r["losses"]) // 10):]
        values = [sum(tail) / len(tail), *(r[c] for c in columns[1:])]
        rows.append([r["name"], *(f"{v:.4g}" for v in values)])
    table = markdown_table(["optimizer", *columns], rows)
    (out / f"{stem}.md").write_text(table)
    print(table)
    plot_losses({stem: {r["name"]: [r["losses"]] for r in results}}, out / f"{stem}_loss.png")
