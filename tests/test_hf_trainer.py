"""An optgen optimizer handed to Hugging Face ``Trainer`` (examples/hf_trainer.py): Trainer steps our optimizer
(its quantized states exist and change), the cosine schedule reaches it, and the byte-level GPT-2 learns.
Skipped when transformers or accelerate is not installed."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import hf_trainer

import optgen.optim


@pytest.mark.parametrize("name", ["AdamW8bit", "FlashAdamW"])
def test_trainer_steps_our_optimizer(name, tmp_path):
    trainer, losses = hf_trainer.run(name, steps=12, batch_size=8, block=64, out=str(tmp_path))
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    assert type(opt) is getattr(optgen.optim, name)
    codes = [s for state in opt.state.values() for k, s in state.items() if s.dtype in (torch.uint8, torch.int8)]
    assert codes, "no quantized state: the optimizer Trainer stepped is not ours"
    assert all(int(state["step"]) == 12 for state in opt.state.values())
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(float(lr) < 2e-3 * 0.1 for lr in lrs)  # the cosine schedule ran to its end
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
