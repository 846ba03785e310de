"""cast_model, stochastic bf16 gradient accumulation and the numerics guard."""

import pytest
import torch
from torch import nn

from optgen.optim import AdamW, FlashAdamW
from optgen.training import StochasticAccumulator, cast_model, check_numerics


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.emb(idx))))


def test_cast_model_keeps_norms_and_named_modules_in_fp32_and_ties():
    torch.manual_seed(0)
    model = cast_model(TinyLM(), torch.bfloat16, keep_fp32=["block.2"])
    assert model.emb.weight.dtype == torch.bfloat16 and model.head.weight is model.emb.weight
    assert model.block[0].weight.dtype == torch.bfloat16
    assert model.block[2].weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    out = model(torch.randint(0, 64, (4, 8)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_flash_adamw_steps_a_mixed_precision_model():
    """bf16 weights use bf16+ecc8 storage; the fp32 LayerNorm takes the fp32-state layout and follows AdamW."""
    torch.manual_seed(0)
    model = cast_model(TinyLM(), torch.bfloat16)
    opt = FlashAdamW(model.parameters(), lr=1e-2, weight_decay=0.0, min_quantized_size=0)
    assert opt.variant_of(model.norm.weight) == "native" and opt.variant_of(model.emb.weight) == ""
    ref_w = model.norm.weight.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([ref_w], lr=1e-2, weight_decay=0.0)
    idx = torch.randint(0, 64, (4, 8))
    for _ in range(5):
        model(idx).float().square().mean().backward()
        ref_w.grad = model.norm.weight.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    assert "p_ecc" in opt.state[model.emb.weight] and "p_ecc" not in opt.state[model.norm.weight]
    err = (model.norm.weight - ref_w).abs().max() / ref_w.abs().max()
    assert err < 1e-6, float(err)


def test_stochastic_accumulation_is_unbiased_and_beats_round_to_nearest():
    torch.manual_seed(0)
    n, micro = 4096, 256
    p_sr = nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    acc = StochasticAccumulator([p_sr], seed=7)
    grads = [(torch.randn(n) * 0.01 + 0.05).to(torch.bfloat16) for _ in range(micro)]
    exact = torch.stack([g.double() for g in grads]).sum(0)
    nearest = torch.zeros(n, dtype=torch.bfloat16)
    for g in grads:
        (p_sr * g).sum().backward()  # d/dp = g, accumulated by the hook
        nearest += g  # plain bf16 accumulation, round to nearest
    acc.reassign_grad_buffer()
    sr = p_sr.grad.double()
    err_sr = (sr - exact).abs().mean()
    err_rn = (nearest.double() - exact).abs().mean()
    bias_sr = (sr - exact).mean()
    # RNE stalls once the sum (~12.8) makes each 0.05 step smaller than half an ULP (0.03125): large error
    assert err_rn > 0.5, float(err_rn)
    # SR leaves a random walk (measured mean abs error 0.21), RNE a systematic stall (1.08)
    assert err_sr < err_rn / 3, (float(err_sr), float(err_rn))
    # unbiased: the mean error over 4096 elements is within 4 standard errors of 0
    assert abs(float(bias_sr)) < 4 * float((sr - exact).std()) / n**0.5, float(bias_sr)
    acc.remove()


def test_numerics_guard_warns_for_plain_bf16_weights_only():
    w = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match="below half an ULP"):
        assert check_numerics(AdamW([w], lr=1e-4))
    with pytest.raises(ValueError, match="below half an ULP"):
        check_numerics(AdamW([w], lr=1e-4), action="raise")
    assert check_numerics(AdamW([w], lr=1e-2)) == []
    assert check_numerics(FlashAdamW([nn.Parameter(torch.randn(64, dtype=torch.bfloat16))], lr=1e-4)) == []
