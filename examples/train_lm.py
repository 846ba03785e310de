"""Train a small GPT-style byte-level language model on the Python standard library's own source.

    python examples/train_lm.py --optimizer AdamW,FlashAdamW --steps 300
    python examples/train_lm.py --spec my_spec.yaml --device cuda --steps 2000

The corpus is every *.py file under the running Python's stdlib folder, sorted by path; files go to
train or validation by a hash of their path (about 10 % validation), so the split never changes. Every
optimizer sees the same initial weights and batches. Reports validation loss (nats per byte) and writes
<out>/lm_loss.png and <out>/lm.md.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import zlib
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, model_dtype, optimizer_classes, progress, show_loss, write_report  # noqa: E402

from optgen.training import cast_model  # noqa: E402


def load_corpus(limit_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) from the stdlib's source files, each at most ``limit_bytes``."""
    train, val = bytearray(), bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        target = val if zlib.crc32(str(path.name).encode()) % 10 == 0 else train
        if len(target) < limit_bytes:
            target += path.read_bytes()
    as_tensor = lambda b: torch.frombuffer(bytes(b[:limit_bytes]), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self, context: int, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(n, device=idx.device))
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=idx.device), 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def batch(data: torch.Tensor, size: int, context: int, gen: torch.Generator, device: str):
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=gen)
    x = torch.stack([data[s:s + context] for s in starts]).to(device)
    y = torch.stack([data[s + 1:s + context + 1] for s in starts]).to(device)
    return x, y


def train(cls: type, args: argparse.Namespace, corpus: tuple[torch.Tensor, torch.Tensor]) -> dict:
    train_data, val_data = corpus
    torch.manual_seed(args.seed)
    dtype = model_dtype(cls)
    model = cast_model(ByteGPT(args.context).to(args.device), dtype)
    opt = cls(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    bar = progress(args.steps, cls.__name__)
    for step in bar:
        x, y = batch(train_data, args.batch_size, args.context, gen, args.device)
        loss = nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        show_loss(bar, step, args.steps, cls.__name__, losses[-1])
    val_gen = torch.Generator().manual_seed(12345)  # the same validation batches for every optimizer
    with torch.no_grad():
        val = [nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
               for x, y in (batch(val_data, args.batch_size, args.context, val_gen, args.device) for _ in range(8))]
    return {"name": cls.__name__, "losses": losses, "validation loss": sum(val) / len(val)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, steps=300, batch_size=32, lr=2e-3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of each split to load")
    args = parser.parse_args(argv)
    corpus = load_corpus(args.corpus_bytes)
    results = [train(cls, args, corpus) for cls in optimizer_classes(args)]
    write_report(results, Path(args.out), "lm", ["validation loss"])
    return results


if __name__ == "__main__":
    main()
