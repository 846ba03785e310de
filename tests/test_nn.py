"""StableEmbedding: Xavier init, LayerNorm output, and fp32 optimizer state under 8-bit optimizers."""

import torch
from torch import nn

from optgen.nn import StableEmbedding
from optgen.optim import AdamW8bit


def test_stable_embedding_keeps_fp32_state_beside_8bit_states():
    torch.manual_seed(0)
    emb = StableEmbedding(1000, 64)  # 64000 elements: would be quantized if it were not marked
    head = nn.Linear(64, 1000)  # 64000 elements: quantized
    bound = (6 / (1000 + 64)) ** 0.5
    assert emb.weight.abs().max() <= bound and emb.weight.std() > bound / 3  # Xavier-uniform
    out = emb(torch.randint(0, 1000, (8, 16)))
    assert torch.allclose(out.mean(-1), torch.zeros(8, 16), atol=1e-5)  # LayerNorm on the output
    opt = AdamW8bit(list(emb.parameters()) + list(head.parameters()), lr=1e-3)
    head(out).logsumexp(-1).mean().backward()
    opt.step()
    assert opt.variant_of(emb.weight) == "fp32" and opt.state[emb.weight]["m"].dtype == torch.float32
    assert opt.variant_of(head.weight) == "" and opt.state[head.weight]["m"].dtype == torch.uint8
