"""Do the low-memory optimizers converge like their fp32 references?

    python benchmarks/convergence.py                         # CPU size: digits and LM, 3 seeds (writes benchmarks/)
    python benchmarks/convergence.py --gpu --tasks lm        # the GPU size on CUDA (longer runs, a larger LM)
    python benchmarks/convergence.py --pairs FlashAdamW,Lamb16 --tasks digits
    python benchmarks/convergence.py --tasks lamb16_claim    # Lamb16 vs AdamW (and Lamb) at batch 1024 on digits
    python benchmarks/convergence.py --tasks lamb16_clip     # how much of Lamb16's momentum sits at the fp8 clip

Each variant trains beside its reference with the same hyper-parameters (HPARAMS, per family) and, for each
seed, the same initial weights and batch order, on the digits CNN (examples/train_digits.py; metric: test loss)
and the byte-level LM (examples/train_lm.py; metric: validation loss). Variants that cannot store fp32 weights
(FlashAdamW, FlashSGD, FlashLion, StochasticAdamW) train a bf16 model (norm layers stay fp32); losses are
computed in fp32. Reported: the final metric (mean ± std over seeds), its difference to the reference in % and
in units of the pooled seed std σ = sqrt((σ_var² + σ_ref²)/2), and optimizer memory measured from the
optimizer's tensors (every tensor in optimizer.state, alone and with the parameters, per parameter; tensors
under 4096 elements keep fp32 states). The target: within 1 % of the reference, or within 2σ. Writes
<out>/convergence_<size>_<task>.md and .png per task (size: cpu, gpu or smoke).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import train_digits
import train_lm
from common import fit, lookup, markdown_table, plot_losses

# Hyper-parameters of each family, shared by a variant and its reference (the same for every size and batch).
HPARAMS: dict[str, dict[str, float]] = {
    "AdamW": {"lr": 3e-3, "weight_decay": 0.01},
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "Lion": {"lr": 3e-4},
    "Lamb": {"lr": 1e-2},
}
FAMILY = {"AdamW": "AdamW", "FlashAdamW": "AdamW", "StochasticAdamW": "AdamW", "AdamW8bit": "AdamW",
          "AdamW4bit": "AdamW", "SGD": "SGD", "FlashSGD": "SGD", "Lion": "Lion", "FlashLion": "Lion",
          "Lamb": "Lamb", "Lamb16": "Lamb", "Lamb16FP32": "Lamb"}
LAMB16_FP32 = str(ROOT / "examples" / "specs" / "lamb16_fp32.yaml")  # Lamb16's rule with fp32 states
# (variant, reference): the pairs, then Lamb16 against its own rule with fp32 states, which separates
# the fp8 storage from the difference between LAMB16's update rule and Lamb's.
PAIRS: list[tuple[str, str]] = [("FlashAdamW", "AdamW"), ("StochasticAdamW", "AdamW"), ("AdamW8bit", "AdamW"),
                                ("AdamW4bit", "AdamW"), ("FlashSGD", "SGD"), ("FlashLion", "Lion"),
                                ("Lamb16", "Lamb"), ("Lamb16", LAMB16_FP32)]
SIZES: dict[str, dict[str, dict[str, int]]] = {  # keyword arguments of train_digits.run / train_lm.run
    "cpu": {"digits": {"steps": 300, "batch_size": 64},
            "lm": {"steps": 300, "batch_size": 16, "context": 64, "layers": 2, "d": 128}},
    "gpu": {"digits": {"steps": 1000, "batch_size": 128},
            "lm": {"steps": 1000, "batch_size": 64, "context": 128, "layers": 4, "d": 256}},
    "smoke": {"digits": {"steps": 15, "batch_size": 32},
              "lm": {"steps": 5, "batch_size": 4, "context": 16, "layers": 1, "d": 32, "val_windows": 8}},
}
METRIC = {"digits": "test loss", "lm": "validation loss"}
CORPUS_BYTES = 4_000_000


def hparams(cls: type) -> dict[str, float]:
    """The hyper-parameters of ``cls``'s family."""
    return dict(HPARAMS[FAMILY[cls.__name__]])


def task_runner(task: str, size: dict[str, int], device: str) -> Callable[[type, int], dict]:
    """``run(cls, seed)`` for one task: loads its data once."""
    if task == "digits":
        data = train_digits.load_digits(device)
        return lambda cls, seed: train_digits.run(cls, data, seed=seed, device=device, **size, **hparams(cls))
    corpus = train_lm.load_corpus(CORPUS_BYTES)
    return lambda cls, seed: train_lm.run(cls, corpus, seed=seed, device=device, **size, **hparams(cls))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(task: str, runs: dict[str, list[dict]], pairs: list[tuple[type, type]]) -> list[list[str]]:
    """One table row per (variant, reference) from the runs of every optimizer (a list over seeds each)."""
    rows = []
    for variant, reference in pairs:
        v, r = runs[variant.__name__], runs[reference.__name__]
        (mv, sv), (mr, sr) = (mean_std([x[METRIC[task]] for x in xs]) for xs in (v, r))
        delta, sigma = mv - mr, math.sqrt((sv * sv + sr * sr) / 2)
        z = delta / sigma if sigma > 0 else math.copysign(math.inf, delta) if delta else 0.0
        mark = f"**no** ({'worse' if delta > 0 else 'better'})" if abs(delta) > 0.01 * abs(mr) and abs(z) > 2 else "yes"
        extra = []
        if task == "digits":
            extra = [" / ".join(f"{mean_std([x['test accuracy'] for x in xs])[0]:.4f}" for xs in (v, r))]
        mem = [f"{v[0][k]:.2f} / {r[0][k]:.2f}" for k in ("state B/param", "state+param B/param")]
        rows.append([variant.__name__, reference.__name__, f"{hparams(reference)['lr']:g}", f"{mv:.4f} ± {sv:.4f}",
                     f"{mr:.4f} ± {sr:.4f}", f"{100 * delta / mr:+.2f} %", f"{z:+.1f}", *extra, *mem, mark])
    return rows


def convergence(args: argparse.Namespace, size: str, task: str) -> str:
    """Run every available pair on one task over ``args.seeds`` seeds; returns the markdown section."""
    wanted = [v.strip() for v in args.pairs.split(",")] if args.pairs else [v for v, _ in PAIRS]
    classes = {n: lookup(n) for v, r in PAIRS if v in wanted for n in (r, v)}  # notes missing ones
    pairs = [(classes[v], classes[r]) for v, r in PAIRS if v in wanted and classes[v] and classes[r]]
    names = {cls.__name__: cls for pair in pairs for cls in reversed(pair)}
    header = ["variant", "reference", "lr", f"final {METRIC[task]} (mean ± std, {args.seeds} seeds)", "reference",
              "Δ", "Δ/σ", *(["test accuracy (var / ref)"] if task == "digits" else []),
              "state B/param (var / ref)", "state+param B/param (var / ref)", "within 1 % or 2σ"]
    run = task_runner(task, SIZES[size][task], args.device)
    runs = {name: [run(cls, seed) for seed in range(args.seeds)] for name, cls in names.items()}
    table = markdown_table(header, compare(task, runs, pairs))
    print(f"\n{task}: {SIZES[size][task]}\n{table}")
    png = f"convergence_{size}_{task}{args.suffix}.png"
    plot_losses({f"{v.__name__} vs {r.__name__}": {r.__name__: [x["losses"] for x in runs[r.__name__]],
                                                   v.__name__: [x["losses"] for x in runs[v.__name__]]}
                 for v, r in pairs}, Path(args.out) / png)
    return f"## {task}: {METRIC[task]}, {SIZES[size][task]}\n\n{table}\n![{task} training loss]({png})\n"


def lamb16_claim(args: argparse.Namespace, size: str) -> str:
    """LAMB16's claim: at batch 1024 on digits, Lamb16 reaches at least AdamW's test accuracy in as many epochs.
    Each optimizer runs at every lr of ``args.claim_lrs`` (the rest of its family's hyper-parameters)."""
    data = train_digits.load_digits(args.device)
    batch = 1024 if size != "smoke" else 256
    steps = math.ceil(args.epochs * len(data[0]) / batch)
    lrs = [float(x) for x in args.claim_lrs.split(",")]
    rows, curves, best = [], {}, {}
    for name in ("AdamW", "Lamb16", "Lamb"):
        cls = lookup(name)
        if cls is None:
            return f"{name} is not available: claim not tested\n"
        for lr in lrs:
            hp = {**hparams(cls), "lr": lr}
            runs = [train_digits.run(cls, data, steps, batch, seed, args.device, **hp) for seed in range(args.seeds)]
            acc, loss = (mean_std([r[k] for r in runs]) for k in ("test accuracy", "test loss"))
            best[name] = max(best.get(name, (0.0, 0.0, 0.0)), (*acc, lr))
            curves[f"{name} lr {lr:g}"] = [r["losses"] for r in runs]
            rows.append([name, f"{lr:g}", f"{acc[0]:.4f} ± {acc[1]:.4f}", f"{loss[0]:.4f} ± {loss[1]:.4f}",
                         ", ".join(f"{r['test accuracy']:.4f}" for r in runs)])
    png = f"convergence_{size}_lamb16_claim{args.suffix}.png"
    plot_losses({f"digits, batch {batch}, {name}": {k: v for k, v in curves.items() if k.startswith(name + " ")}
                 for name in best}, Path(args.out) / png)
    table = markdown_table(["optimizer", "lr", f"test accuracy (mean ± std, {args.seeds} seeds)", "test loss",
                            "accuracy per seed"], rows)
    verdict = []
    for name in ("AdamW", "Lamb"):
        holds = best["Lamb16"][0] >= best[name][0]
        verdict.append(f"- Best Lamb16 (lr {best['Lamb16'][2]:g}: {best['Lamb16'][0]:.4f}) "
                       f"{'reaches' if holds else 'does not reach'} the best {name} (lr {best[name][2]:g}: "
                       f"{best[name][0]:.4f}) mean test accuracy.")
    return (f"## LAMB16 claim: batch {batch} on digits, {args.epochs} epochs ({steps} steps)\n\n{table}\n"
            + "\n".join(verdict) + f"\n\n![loss]({png})\n")


def lamb16_clip(args: argparse.Namespace, size: str) -> str:
    """Why Lamb16 differs from its own rule with fp32 states: the fraction of its stored momentum that sits at
    the fp8 codec's clip, ±15·m_scale, where m_scale = ||m||/numel (not /sqrt(numel)) is tiny, after training
    the LM (seed 0, the task's size) with Lamb16."""
    cls = lookup("Lamb16")
    if cls is None:
        return "Lamb16 is not available\n"
    corpus = train_lm.load_corpus(CORPUS_BYTES)
    kwargs = {k: v for k, v in SIZES[size]["lm"].items() if k != "val_windows"}
    torch.manual_seed(0)
    model = train_lm.ByteGPT(kwargs["context"], kwargs["d"], kwargs["layers"]).to(args.device)
    opt = cls(model.parameters(), **hparams(cls))
    order = torch.Generator().manual_seed(0)
    context, batch = kwargs["context"], kwargs["batch_size"]
    train = corpus[0]
    fit(model, opt, lambda: train_lm.windows(train, torch.randint(0, len(train) - context - 1, (batch,),
                                                                   generator=order), context, args.device),
        kwargs["steps"], "Lamb16")
    exported = opt.torch_state_dict()["state"]
    rows, total, clipped = [], 0, 0.0
    for index, (name, p) in enumerate(model.named_parameters()):
        if opt.variant_of(p) != "":  # small tensors keep fp32 states: no clip
            continue
        m, limit = exported[index]["exp_avg"], 15 * opt.state[p]["m_scale"].float()
        at_clip = (m.abs() >= limit * (1 - 1e-3)).float().sum().item()
        total, clipped = total + m.numel(), clipped + at_clip
        rows.append([name, str(m.numel()), f"{limit.item():.3g}", f"{m.abs().max().item():.3g}",
                     f"{m.pow(2).mean().sqrt().item():.3g}", f"{at_clip / m.numel():.3f}"])
    table = markdown_table(["tensor", "elements", "clip 15·m_scale", "max abs m", "rms m", "fraction at the clip"], rows)
    return (f"## Lamb16's momentum at the fp8 clip, LM after {kwargs['steps']} steps (seed 0)\n\n{table}\n"
            f"Over all quantized tensors, {clipped / total:.3f} of the stored momentum sits at ±15·m_scale.\n")


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU size, on cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny size for tests")
    parser.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pairs", default="", help="variants to run, comma separated (default: all of "
                        f"{', '.join(dict.fromkeys(v for v, _ in PAIRS))})")
    parser.add_argument("--tasks", default="digits,lm", help="digits, lm, lamb16_claim, lamb16_clip (comma separated)")
    parser.add_argument("--epochs", type=int, default=50, help="for lamb16_claim")
    parser.add_argument("--claim-lrs", default="0.001,0.003,0.01,0.03,0.1", help="for lamb16_claim: the lrs of each optimizer")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    parser.add_argument("--suffix", default="", help="appended to the output file names (e.g. for a --pairs subset)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    size = "smoke" if args.smoke else "gpu" if args.gpu else "cpu"
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    written = {}
    for task in args.tasks.split(","):
        start = time.perf_counter()
        tasks = {"lamb16_claim": lamb16_claim, "lamb16_clip": lamb16_clip}
        body = tasks[task](args, size) if task in tasks else convergence(args, size, task)
        path = Path(args.out) / f"convergence_{size}_{task}{args.suffix}.md"
        written[task] = (f"# Convergence: {task} ({size} size)\n\n`{command.strip()}` on {device}, torch "
                         f"{torch.__version__}: {time.perf_counter() - start:.0f} s for this task. Seeds "
                         f"0..{args.seeds - 1}; each seed gives every optimizer the same initial weights and batch "
                         f"order. Hyper-parameters shared by each family: {HPARAMS}.\n\n{body}")
        path.write_text(written[task])
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
