"""A whole training step (forward, ``loss.backward()``, ``opt.step()``, ``opt.zero_grad()``) compiled as one graph
with ``fullgraph=True`` through optgen.training.compile_training_step. It must give the parameters of the same
step run eagerly, under a cosine LR schedule (torch's LambdaLR updating a tensor lr in place) that recompiles
nothing: one graph for the first step (which creates the states), one for every later step.

The graph runs with ``aot_eager`` (the same aten ops as eager: bit-identical) for several specs and with Inductor
(close) for AdamW; on a GPU the step in the graph is the Triton kernel.
"""

import math
import os

import pytest
import torch
from torch._dynamo.utils import counters

from optgen import optim
from optgen.training import compile_training_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["eager"] + (["triton"] if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else [])
pytestmark = pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                                reason="this torch cannot trace backward() (no trace_autograd_ops)")
STEPS = 6
# the optimizer cannot record inside the graph that step() ran, so LambdaLR's first step() warns about the order
pytestmark = [pytestmark, pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")]


def _train(cls: type, backend: str, compile_backend: str | None) -> tuple[list[torch.Tensor], list[float]]:
    """STEPS steps of a small MLP from fixed weights and data; returns the parameters and the losses."""
    dtype = torch.float32 if "float32" in cls.param_dtypes else torch.bfloat16
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.GELU(), torch.nn.Linear(80, 8)).to(DEVICE, dtype)
    opt = cls(model.parameters(), lr=torch.tensor(3e-3, device=DEVICE), backend=backend, min_quantized_size=64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.cos(math.pi * s / (2 * STEPS)))

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    if compile_backend is not None:
        step = compile_training_step(step, backend=compile_backend)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, y = torch.randn(32, 48, generator=gen), torch.randn(32, 8, generator=gen)
        losses.append(float(step(x.to(DEVICE, dtype), y.to(DEVICE))))
        sched.step()
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran inside the graph
    return [p.detach().float().cpu() for p in model.parameters()], losses


def _compiled(cls: type, backend: str, compile_backend: str) -> tuple[list[torch.Tensor], list[float]]:
    torch._dynamo.reset()
    counters.clear()
    out = _train(cls, backend, compile_backend)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # first step, then every later one
    assert not counters["graph_break"], dict(counters["graph_break"])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [optim.AdamW, optim.AdamW8bit, optim.FlashAdamW, optim.Lamb16, optim.StochasticAdamW],
                         ids=lambda c: c.__name__)
def test_compiled_training_step_is_the_eager_step(cls, backend):
    (got, got_loss), (want, want_loss) = _compiled(cls, backend, "aot_eager"), _train(cls, backend, None)
    assert got_loss == want_loss
    assert want_loss[-1] < want_loss[0]  # it trains
    for p, q in zip(got, want):
        assert torch.equal(p, q)


def test_inductor_training_step():
    """Inductor reorders the forward's and backward's float arithmetic, so the result is close, not equal
    (fp32 AdamW: within 1e-5 relative). The step in the graph is the Triton kernel on a GPU."""
    backend = "triton" if DEVICE == "cuda" else "eager"
    (got, got_loss), (want, want_loss) = _compiled(optim.AdamW, backend, "inductor"), _train(optim.AdamW, backend, None)
    assert want_loss[-1] < want_loss[0]
    for a, b in zip(got_loss, want_loss):
        assert abs(a - b) <= 1e-4 * abs(b)
    for p, q in zip(got, want):
        assert float((p - q).abs().max() / q.abs().max()) < 1e-5


def test_old_torch_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch._dynamo.config, "trace_autograd_ops", raising=False)
    with pytest.raises(RuntimeError, match="trace_autograd_ops"):
        compile_training_step(lambda: None)


def test_a_parameter_that_starts_late_is_refused_in_a_compiled_step():
    """A compiled step gives a param group one step count; a parameter unfrozen after two steps is at count 0
    when the others are at 2, and would take their bias correction (a silently wrong first update). The graph
    refuses it before any count advances; the eager step handles it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 4)).to(DEVICE)
    opt = optim.AdamW(model.parameters(), lr=torch.tensor(1e-2, device=DEVICE))

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    compiled = compile_training_step(step, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 24, generator=gen).to(DEVICE), torch.randn(16, 4, generator=gen).to(DEVICE))
            for _ in range(3)]
    model[2].requires_grad_(False)
    for x, y in data[:2]:
        compiled(x, y)
    model[2].requires_grad_(True)
    counts = [float(opt.state[p]["step"]) for p in model[0].parameters()]
    with pytest.raises(RuntimeError, match="different counts"):
        compiled(*data[2])
    assert [float(opt.state[p]["step"]) for p in model[0].parameters()] == counts == [2.0, 2.0]
