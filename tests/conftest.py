"""Test set-up shared by all modules.

Without a GPU, Triton kernels run in Triton's interpreter. ``triton.jit`` reads TRITON_INTERPRET when a
kernel is defined, i.e. when a generated module is first imported, so it is set here, before any test
module imports optgen.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def step_whole_and_split(monkeypatch):
    """``step(whole, split)``: one step of two optimizers over equal parameters (one group each), with the same
    fresh gradients, ``whole`` at the default split threshold (one launch, for these small tensors) and ``split``
    with it lowered (``MultiTensorLauncher.split_min_elements``); then every parameter and state is bit-equal."""
    from optgen.runtime.launch import MultiTensorLauncher

    def step(whole: torch.optim.Optimizer, split: torch.optim.Optimizer) -> None:
        pairs = list(zip(whole.param_groups[0]["params"], split.param_groups[0]["params"]))
        for x, y in pairs:
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        monkeypatch.setattr(MultiTensorLauncher, "split_min_elements", 1 << 20)
        whole.step()
        monkeypatch.setattr(MultiTensorLauncher, "split_min_elements", 1000)
        split.step()
        for x, y in pairs:
            assert torch.equal(x, y)
            for key, value in whole.state[x].items():
                assert torch.equal(value, split.state[y][key]), key

    return step
