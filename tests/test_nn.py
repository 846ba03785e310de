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


def test_the_fp32_mark_survives_meta_init_and_an_assigning_load():
    """``to_empty()`` after meta-device init and ``load_state_dict(assign=True)`` put a new Parameter in the
    weight's place: it is marked too, so AdamW8bit still keeps fp32 state for it."""
    with torch.device("meta"):
        emb = StableEmbedding(1000, 64)
    emb.to_empty(device="cpu")
    assigned = StableEmbedding(1000, 64)
    assigned.load_state_dict({k: v.clone() for k, v in StableEmbedding(1000, 64).state_dict().items()}, assign=True)
    for module in (emb, assigned):
        opt = AdamW8bit(module.parameters(), lr=1e-3)
        assert opt.variant_of(module.weight) == "fp32"
