"""Checkpoints: compressed state_dict size, fp32 export/import in torch.optim's layout, master weights."""

import io

import pytest
import torch

from optgen.codecs import ecc
from optgen.optim import SGD, AdamW, AdamW8bit, FlashAdamW, Lion

SHAPES = [(64, 96), (5000,)]  # above min_quantized_size: the compressed layouts are used


def _trained_torch_adamw(steps: int = 5):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls, dtype, m_tol, v_tol", [
    # bounds relative to the tensor's largest |m| and v: FlashOptim's 8-bit companded codes err by at most
    # s/127 (m) and about 2·s²/255 (v) per group (s <= the tensor max), plus the fp16 scale's rounding;
    # the dynamic 8-bit map's largest gap is below 1/64 of the block absmax.
    (FlashAdamW, torch.bfloat16, 1 / 120, 1 / 120),
    (AdamW8bit, torch.float32, 1 / 64, 1 / 64),
], ids=["FlashAdamW", "AdamW8bit"])
def test_torch_adamw_checkpoint_into_compressed_and_back(cls, dtype, m_tol, v_tol):
    params, ref = _trained_torch_adamw()
    saved = ref.state_dict()
    ours = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    opt = cls(ours, lr=1e-3)
    opt.load_torch_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.variant_of(ours[0]) == "" and opt.state[ours[0]]["m"].dtype in (torch.int8, torch.uint8)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    back.load_state_dict(opt.torch_state_dict())
    for i, p in enumerate(back.param_groups[0]["params"]):
        orig, got = saved["state"][i], back.state[p]
        assert float(got["step"]) == float(orig["step"]) == 5.0
        for key, tol in (("exp_avg", m_tol), ("exp_avg_sq", v_tol)):
            err = (got[key] - orig[key]).abs().max() / orig[key].abs().max()
            assert got[key].dtype == torch.float32 and err <= tol, (key, float(err))


def test_fp32_round_trip_through_torch_adamw_continues_identically():
    params, ref = _trained_torch_adamw()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW(ours, lr=1e-3)
    opt.load_torch_state_dict(ref.state_dict())
    for _ in range(5):
        for p, q in zip(params, ours):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ref.step()
        opt.step()
    for p, q in zip(params, ours):
        assert float((p - q).abs().max() / p.abs().max()) < 1e-6
    exported = opt.torch_state_dict()["state"]
    for i, p in enumerate(params):  # torch's lerp rounds differently from beta1*m + (1 - beta1)*g
        for key in ("exp_avg", "exp_avg_sq"):
            err = (exported[i][key] - ref.state[p][key]).abs().max() / ref.state[p][key].abs().max()
            assert err < 1e-6, (key, float(err))


def test_load_torch_state_dict_with_wrong_shapes_changes_nothing():
    _params, ref = _trained_torch_adamw()
    ours = [torch.nn.Parameter(torch.randn(3, 3).to(torch.bfloat16)), torch.nn.Parameter(torch.randn(5000).bfloat16())]
    opt = FlashAdamW(ours, lr=1e-3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_torch_state_dict(ref.state_dict())
    assert not opt.state and opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("kwargs", [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                    {"momentum": 0.9, "dampening": 0.3}], ids=["momentum", "nesterov", "dampening"])
def test_torch_sgd_state_continues_as_torch_sgd(kwargs):
    """torch.optim.SGD saves its momentum buffer and no step count. The buffer was made by a step, so the import
    must not apply the first step's rule (buffer = gradient) again: the run goes on as torch's own."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    ref = torch.optim.SGD(params, lr=1e-2, weight_decay=0.1, **kwargs)
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(6)]
    for step in grads[:3]:
        for p, g in zip(params, step):
            p.grad = g.clone()
        ref.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = SGD(ours, lr=1.0)
    opt.load_torch_state_dict(ref.state_dict())
    assert float(opt.state[ours[0]]["step"]) == 1.0
    for step in grads[3:]:
        for p, q, g in zip(params, ours, step):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    for p, q in zip(params, ours):
        assert float((p - q).abs().max() / p.abs().max()) < 1e-6


@pytest.mark.parametrize("case", ["AdamW into Lion", "AdamW into SGD", "amsgrad", "maximize"])
def test_load_torch_state_dict_of_another_optimizer_is_refused_and_changes_nothing(case):
    """torch.optim.AdamW's states are not Lion's nor SGD's, and optgen's AdamW has no amsgrad or maximize: each is
    refused, with the groups' hyper-parameters and the states as they were."""
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    flags = {"amsgrad": True} if case == "amsgrad" else {"maximize": True} if case == "maximize" else {}
    ref = torch.optim.AdamW(params, lr=3e-3, betas=(0.8, 0.99), **flags)
    for p in params:
        p.grad = torch.randn_like(p)
    ref.step()
    cls = {"AdamW into Lion": Lion, "AdamW into SGD": SGD}.get(case, AdamW)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(ours, lr=1e-4)
    groups = [dict(g) for g in opt.param_groups]
    match = f"was saved with {case}=True" if flags else "a state_dict of another optimizer"
    with pytest.raises(ValueError, match=match):
        opt.load_torch_state_dict(ref.state_dict())
    assert not opt.state and opt.param_groups == groups


@pytest.mark.parametrize("step", [-1.0, float("nan"), float("inf"), 0.5, "one"])
def test_load_torch_state_dict_with_a_bad_step_changes_nothing(step):
    """torch's step count is a whole number >= 0 (a Python number in old checkpoints, a tensor since); anything
    else is refused before any change (a negative one used to fail at the next step, after advancing it)."""
    params, ref = _trained_torch_adamw()
    opt = AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    saved = ref.state_dict()
    saved["state"][0]["step"] = step if isinstance(step, str) else torch.tensor(step)
    with pytest.raises(ValueError, match="state 'step' of parameter 0 must be a finite, non-negative whole number"):
        opt.load_torch_state_dict(saved)
    assert not opt.state and opt.param_groups[0]["lr"] == 1e-3


def test_master_weights_decode_the_ecc_term():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6000).bfloat16())
    opt = FlashAdamW([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    (master,) = opt.master_weights()
    reference = ecc.reference_decode(p.detach(), opt.state[p]["p_ecc"], "bf16", 127)
    # the master weight lies within half a bf16 ULP of the stored bf16 value (2^l, l = E - 8)
    _, e = torch.frexp(p.detach().double())
    assert master.dtype == torch.float32
    assert ((master.double() - p.detach().double()).abs() <= torch.pow(2.0, (e - 9).double())).all()
    assert float((master.double() - reference).abs().max()) <= float(reference.abs().max()) * 2**-23
    assert (master.double() != p.detach().double()).any()  # the correction carries information


def test_compressed_checkpoint_size_per_parameter():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(256, 1024).bfloat16())
    opt = FlashAdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    per_param = buffer.tell() / p.numel()
    # ECC int8 (1) + m int8 and fp16 scales per 32 (1.0625) + v the same (1.0625) = 3.125 bytes, plus the
    # pickle's fixed overhead; the bf16 weights themselves are in the model's state_dict (2 bytes).
    assert 3.125 <= per_param < 3.125 * 1.01, per_param
