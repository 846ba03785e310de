"""FSDP2 at world size 1 under NCCL on one GPU (skipped without CUDA): the DTensor parameters' local shards
reach the fused Triton kernel (never the PyTorch fallback), and the run matches the unsharded one.

Run: ``pytest -q tests/test_distributed_gpu.py`` on a machine with one CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from optgen import optim

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = ["AdamW", "FlashAdamW", "AdamW8bit", "Lamb", "Lamb16"]


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory):
    store = Path(tmp_path_factory.mktemp("nccl")) / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = torch.nn.Linear(256, 1024, device="cuda", dtype=dtype)
        self.b = torch.nn.Linear(1024, 130, device="cuda", dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_ws1_runs_the_triton_kernel(group: None, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cls = getattr(optim, name)
    dtype = torch.float32 if "float32" in cls.variants[""].param_dtypes else torch.bfloat16
    torch.manual_seed(0)
    model, ref = _Net(dtype), _Net(dtype)
    ref.load_state_dict(model.state_dict())
    mesh = init_device_mesh("cuda", (1,))
    fully_shard(model.a, mesh=mesh)
    fully_shard(model.b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    launcher = cls.variants[""].triton_launcher

    def no_fallback(*args, **kwargs):
        raise AssertionError("a DTensor shard went to the PyTorch fallback")

    monkeypatch.setattr(launcher, "fallback", no_fallback)
    opt = cls(model.parameters(), lr=1e-3, min_quantized_size=0)
    ref_opt = cls(ref.parameters(), lr=1e-3, min_quantized_size=0)
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    launches = []
    launch = launcher._launch

    def counted(*args, **kwargs):
        launches.append(1)
        return launch(*args, **kwargs)

    launcher._plans.clear()
    for _ in range(5):
        x = torch.randn(64, 256, device="cuda", dtype=dtype)
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).float().square().mean().backward()
            monkeypatch.setattr(launcher, "_launch", counted if o is opt else launch)
            o.step()
            o.zero_grad()
    # one launch per kernel pass for the whole group (4 tensors of one dtype), as on one device
    assert len(launches) == 5 * (launcher.passes if launcher.slots else 1), len(launches)
    for p, q in zip(model.parameters(), ref.parameters()):
        a, b = p.to_local().float(), q.detach().float()
        # the same kernel on the same numbers (gradients through FSDP2's reduce-scatter)
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), name
