"""Train a small GPT-style byte-level language model on the Python standard library's own source.

    python examples/train_lm.py --optimizer AdamW,FlashAdamW --steps 300
    python examples/train_lm.py --spec my_spec.yaml --device cuda --steps 2000 --layers 4

The corpus is every *.py file under the running Python's stdlib folder (tests and site-packages left out),
sorted by path; every tenth file goes to validation, the rest to training. Tokens are bytes. Every optimizer
starts from the same weights and sees the same batches (same --seed). Reports the validation loss (nats per
byte, on fixed windows spread over the validation files) and writes <out>/lm.md and <out>/lm_loss.png.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, bytes_per_param, cross_entropy, fit, optimizer_classes, prepare, write_report


def load_corpus(limit_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte tensors from the stdlib's source files, each cut at ``limit_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not {"test", "tests", "site-packages"} & set(p.parts)]
    splits = (bytearray(), bytearray())
    for i, path in enumerate(files):
        split = splits[i % 10 == 0]
        if len(split) < limit_bytes:
            split += path.read_bytes()
    return tuple(torch.frombuffer(s[:limit_bytes], dtype=torch.uint8).long() for s in splits)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, context: int = 128, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        self.head.weight = self.tok.weight  # tied
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)  # GPT-2's init: small initial logits

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def windows(data: torch.Tensor, starts: torch.Tensor, context: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets of the ``context``-long windows at ``starts``."""
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].to(device)
    return chunk[:, :-1], chunk[:, 1:]


def run(cls: type, corpus: tuple[torch.Tensor, torch.Tensor], steps: int, batch_size: int, seed: int,
        device: str = "cpu", context: int = 128, layers: int = 2, d: int = 128, val_windows: int = 256,
        **hparams: object) -> dict:
    """Train a fresh model with ``cls(params, **hparams)``; returns its losses, validation loss and memory."""
    train, val = corpus
    torch.manual_seed(seed)
    model, _ = prepare(ByteGPT(context, d, layers), cls, device)
    opt = cls(model.parameters(), **hparams)
    order = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        return windows(train, torch.randint(0, len(train) - context - 1, (batch_size,), generator=order), context, device)

    losses = fit(model, opt, next_batch, steps, cls.__name__)
    starts = torch.linspace(0, len(val) - context - 2, val_windows).long()  # the same for every run
    with torch.no_grad():
        val_loss = sum(cross_entropy(model(x), y).item() * len(x) for x, y in
                       (windows(val, s, context, device) for s in starts.split(batch_size))) / val_windows
    return {"name": cls.__name__, "losses": losses, "validation loss": val_loss, **bytes_per_param(opt)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=300, batch_size=32, lr=2e-3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of each split to load")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    corpus = load_corpus(args.corpus_bytes)
    results = [run(cls, corpus, args.steps, args.batch_size, args.seed, args.device, args.context, args.layers,
                   lr=args.lr) for cls in optimizer_classes(args)]
    write_report(results, args.out, "lm", ["validation loss"])
    return results


if __name__ == "__main__":
    main()
