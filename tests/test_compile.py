"""optimizer.step() inside torch.compile(fullgraph=True): no graph break, and a tensor lr changed every step
causes no recompilation. Runs on the CPU (fallback op; Triton op under the interpreter) and on a GPU."""

import math
import os

import pytest
import torch
from torch._dynamo.utils import counters

from optgen.optim import AdamW, AdamW8bit, Lion

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["eager"] + (["triton"] if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [AdamW, AdamW8bit], ids=lambda c: c.__name__)
def test_compiled_step_matches_eager_without_recompiles(cls, backend):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(DEVICE)

    model, ref_model = make(), make()
    opt = cls(model.parameters(), lr=torch.tensor(1e-2, device=DEVICE), backend=backend, min_quantized_size=4096)
    ref = cls(ref_model.parameters(), lr=1e-2, backend=backend, min_quantized_size=4096)

    @torch.compile(fullgraph=True)
    def opt_step():
        opt.step()

    x = torch.randn(32, 96, device=DEVICE)
    for step in range(5):
        lr = 1e-2 * math.cos(step / 5)
        opt.param_groups[0]["lr"].fill_(lr)
        ref.param_groups[0]["lr"] = lr
        for m in (model, ref_model):
            m(x).square().mean().backward()
        opt_step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        err = float((p - q).abs().max() / q.abs().max())
        assert err < 1e-6, err
    # one graph for the first step (state created), one for the later steps: changing lr recompiles nothing
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_with_number_hyperparameters(backend):
    """Lion's scalars do not depend on the step count: with a float lr they are all numbers, and the compiled
    step traces their host-to-device copy (which in eager goes through pinned memory) without a graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = [torch.randn(s, device=DEVICE) for s in [(64, 96), (64,), (5000,)]]
    params = [torch.nn.Parameter(x.clone()) for x in base]
    refs = [torch.nn.Parameter(x.clone()) for x in base]
    opt = Lion(params, lr=1e-3, weight_decay=0.1, backend=backend)
    ref = Lion(refs, lr=1e-3, weight_decay=0.1, backend=backend)
    step = torch.compile(opt.step, fullgraph=True)
    for _ in range(3):
        for p, q in zip(params, refs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        step()
        ref.step()
    for p, q in zip(params, refs):
        assert torch.equal(p, q)
