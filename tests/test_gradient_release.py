"""Gradient release: parameters stepped inside backward equal the plain step, and gradients never pile up."""

import pytest
import torch
from torch import nn

from optgen.optim import SGD, AdamW, AdamW8bit, Lion


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 32, generator=g), torch.randn(16, 4, generator=g)


def _plain_step_and_released_backward(plain: nn.Module, opt_plain, released: nn.Module, step: int) -> None:
    """One step of the usual loop on ``plain``, and the backward of ``released`` (whose hooks step it), on the same
    batch: every gradient of ``released`` is consumed during backward."""
    x, y = _data(step)
    nn.functional.mse_loss(plain(x), y).backward()
    opt_plain.step()
    opt_plain.zero_grad()
    nn.functional.mse_loss(released(x), y).backward()
    assert all(p.grad is None for p in released.parameters())


@pytest.mark.parametrize("cls, kw", [(AdamW, {"lr": 1e-2, "weight_decay": 0.1}), (SGD, {"lr": 0.1, "momentum": 0.9}),
                                     (Lion, {"lr": 1e-3}), (AdamW8bit, {"lr": 1e-2, "min_quantized_size": 1024})],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_release_equals_plain_step_with_scheduler(cls, kw):
    plain, released = _model(0), _model(0)
    opt_a, opt_b = cls(plain.parameters(), **kw), cls(released.parameters(), **kw)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1 / (1 + s))
    handle = opt_b.attach_gradient_release(released)
    for step in range(5):
        _plain_step_and_released_backward(plain, opt_a, released, step)
        opt_b.step()  # a no-op while release is attached
        opt_b.zero_grad()
        sched_a.step()
        sched_b.step()
    for p, q in zip(plain.parameters(), released.parameters()):
        assert torch.equal(p, q)
    handle.remove()
    x, y = _data(99)  # after remove(): gradients stay until step() again
    nn.functional.mse_loss(released(x), y).backward()
    assert all(p.grad is not None for p in released.parameters())


def _peak_grad_bytes(model: nn.Module, release: bool) -> tuple[int, int]:
    """Largest total of gradient bytes alive at any hook call, and the total of all gradient bytes."""
    opt = AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    peak = 0

    def count(_p: torch.Tensor) -> None:
        nonlocal peak
        peak = max(peak, sum(q.grad.nbytes for q in params if q.grad is not None))

    # registered first, so it runs before the release hook frees the gradient
    handles = [p.register_post_accumulate_grad_hook(count) for p in params]
    if release:
        opt.attach_gradient_release(model)
    x, y = _data(1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    for h in handles:
        h.remove()
    return peak, sum(p.nbytes for p in params)


def test_release_keeps_at_most_one_gradient_alive():
    peak_plain, total = _peak_grad_bytes(_model(0), release=False)
    peak_release, _ = _peak_grad_bytes(_model(0), release=True)
    largest = max(p.nbytes for p in _model(0).parameters())
    assert peak_plain == total  # without release, every gradient is alive at the end of backward
    assert peak_release <= largest < total  # with release, at most one gradient at a time


def test_release_refuses_a_closure_and_a_second_attach():
    model = _model(0)
    opt = AdamW(model.parameters())
    opt.attach_gradient_release(model)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(RuntimeError, match="already attached"):
        opt.attach_gradient_release(model)


def test_a_gradient_release_did_not_take_is_refused():
    """A gradient left from before attaching would be added into the first released step; a parameter frozen
    when release was attached has no hook, so once unfrozen its gradient would pile up unstepped. Both are
    refused (attach, then step()), and zero_grad() clears gradients while attached, as torch's does."""
    model = _model(0)
    opt = AdamW(model.parameters(), lr=1e-2)
    x, y = _data(1)
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="holds a gradient that gradient release did not take"):
        opt.attach_gradient_release(model)
    assert opt._release is None and all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    handle = opt.attach_gradient_release()
    frozen.requires_grad_(True)  # unfrozen after attaching: no hook
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"step\(\): parameter 0 \(shape \(64, 32\)\) holds a gradient"):
        opt.step()
    assert torch.equal(frozen, before[0]) and not torch.equal(model[2].weight, before[2])  # the hooked ones stepped
    opt.zero_grad()
    assert frozen.grad is None
    handle.remove()
    opt.attach_gradient_release(model)  # attached again: the unfrozen parameter is hooked now
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert not torch.equal(frozen, before[0]) and frozen.grad is None


def test_release_refuses_a_model_with_parameters_outside_the_optimizer():
    model = _model(0)
    opt = AdamW(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="would keep their gradients"):
        opt.attach_gradient_release(model)


def test_release_follows_the_groups_after_load_state_dict_and_add_param_group():
    """``load_state_dict`` replaces the param group dicts: the hooks take the current ones (an lr set after the
    load is the one used); a group added while attached is stepped in backward too. Both as the plain step."""
    plain, released = _model(0), _model(0)
    pa, pb = list(plain.parameters()), list(released.parameters())
    opt_a, opt_b = AdamW(pa[:4], lr=1e-2), AdamW(pb[:4], lr=1e-2)
    opt_b.attach_gradient_release()
    saved = AdamW(pa[:4], lr=1e-2).state_dict()
    for opt in (opt_a, opt_b):
        opt.load_state_dict(saved)
        opt.param_groups[0]["lr"] = 0.05
        opt.add_param_group({"params": (pa if opt is opt_a else pb)[4:], "lr": 0.02})
    for step in range(3):  # every parameter consumed during backward, the added ones too
        _plain_step_and_released_backward(plain, opt_a, released, step)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    assert float(opt_b.state[pb[-1]]["step"]) == 3.0
