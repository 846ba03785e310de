"""Offloaded and paged states on a GPU: the Triton kernel on staging slots, copies on side streams, and
the plain on-GPU step as the reference (bit-identical), plus the GPU memory bound of the staging slots."""

from __future__ import annotations

import pytest
import torch

from optgen import offloaded
from optgen.optim import AdamW, AdamW4bit, AdamW8bit, FlashAdamW, Lamb, Lamb16, StochasticAdamW
from optgen.runtime.offload import MiB

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(1024, 768), (33,), (768,), (3000, 7), (512, 1024), (4099,), (256, 256), (1000, 300), (700, 1024),
          (1024, 640), (900, 800), (1024, 700)]
# Lamb and Lamb16 too: their whole-tensor norms add per-program partial sums in a fixed order, and a tensor's
# programs are the same whether it is stepped with the others or in its chunk.
SPECS = [(AdamW, torch.float32), (FlashAdamW, torch.bfloat16), (AdamW8bit, torch.float32),
         (AdamW4bit, torch.float32), (StochasticAdamW, torch.bfloat16), (Lamb, torch.float32),
         (Lamb16, torch.float32)]


def make_params(shapes, dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda").to(dtype)) for s in shapes]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(copies, step: int, skip: int | None = None) -> None:
    g = torch.Generator(device="cuda").manual_seed(1000 + step)
    for k, p0 in enumerate(copies[0]):
        grad = None if k == skip else torch.randn(p0.shape, generator=g, device="cuda").to(p0.dtype)
        for params in copies:
            params[k].grad = None if grad is None else grad.clone()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def assert_same(a, pa, b, pb) -> None:
    torch.cuda.synchronize()  # the last copies back to pinned memory run on a side stream after step()
    for x, y in zip(pa, pb):
        assert torch.equal(bits(x), bits(y))
        assert set(a.state[x]) == set(b.state[y])
        for key, value in a.state[x].items():
            other = b.state[y][key]
            assert value.dtype == other.dtype and value.shape == other.shape, key
            assert torch.equal(bits(value), bits(other)), key


def chunk_mib_for(cls, params) -> float:
    probe = offloaded(cls)(clone(params), chunk_mib=4096)
    return 1.05 * max(probe._state_bytes(p) for p in probe.param_groups[0]["params"]) / MiB


@pytest.mark.parametrize("cls,dtype", SPECS, ids=[c.__name__ for c, _ in SPECS])
@pytest.mark.parametrize("budget_chunks", [None, 4.0], ids=["offload", "paged"])
def test_bit_identical_to_gpu_step(cls, dtype, budget_chunks):
    base = make_params(SHAPES, dtype, 0)
    pa, pb = clone(base), clone(base)
    kw = {"seed": 11} if cls is StochasticAdamW else {}
    chunk = chunk_mib_for(cls, base)
    plain = cls([{"params": pa[:5], "lr": 2e-3}, {"params": pa[5:]}], **kw)
    opt = offloaded(cls)([{"params": pb[:5], "lr": 2e-3}, {"params": pb[5:]}], chunk_mib=chunk,
                         gpu_budget_mib=None if budget_chunks is None else budget_chunks * chunk, **kw)
    side = torch.cuda.Stream()
    for step in range(5):
        set_grads([pa, pb], step, skip=3 if step == 2 else None)
        plain.step()
        if step == 3:  # a step issued on a non-default stream orders its copies after that stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt.step()
            torch.cuda.current_stream().wait_stream(side)
        else:
            opt.step()
        assert_same(plain, pa, opt, pb)
    assert len(opt._chunks) > 3 and any(c.gpu is None for c in opt._chunks)
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step" and value.device.type == "cpu":
                assert value.is_pinned()
    # state_dict straight after a step (the copies back must be complete) into a plain GPU optimizer
    pc = clone(pb)
    plain2 = cls([{"params": pc[:5], "lr": 2e-3}, {"params": pc[5:]}], **kw)
    plain2.load_state_dict(opt.state_dict())
    set_grads([pa, pb, pc], 9)
    for o in (plain, opt, plain2):
        o.step()
    assert_same(plain, pa, opt, pb)
    assert_same(plain, pa, plain2, pc)


def test_gpu_memory_bounded_by_staging_slots():
    """Peak GPU memory of an offloaded FlashAdamW step beyond parameters and gradients: the three staging
    slots, the launch tables of the chunks (8 bytes per program of 512 parameters) and scalars, whatever the number of
    parameters."""
    shapes = [(2048, 2048)] * 32  # 134M parameters: 400 MiB of FlashAdamW state, 8.3x the staging slots
    params = make_params(shapes, torch.bfloat16, 1)
    set_grads([params], 0)
    torch.cuda.synchronize()
    launchers = [v.triton_launcher for v in FlashAdamW.variants.values()]
    for launcher in launchers:
        launcher._plans.clear()  # other tests' plans
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()  # parameters and gradients
    opt = offloaded(FlashAdamW)(params, chunk_mib=16)
    extra = 0
    for step in range(3):
        set_grads([params], step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        extra = max(extra, torch.cuda.max_memory_allocated() - base)
    slots = 3 * 16 * MiB
    assert opt.gpu_state_bytes() == slots
    tables = sum(launcher.table_bytes() for launcher in launchers)
    assert tables < 0.1 * slots
    assert slots <= extra <= slots + tables + MiB, (extra / MiB, tables / MiB)
    assert sum(c.nbytes for c in opt._chunks) > 8 * slots


@pytest.mark.parametrize("cls,dtype", [(AdamW, torch.float32), (FlashAdamW, torch.bfloat16),
                                       (AdamW8bit, torch.float32), (AdamW4bit, torch.float32)],
                         ids=["AdamW", "FlashAdamW", "AdamW8bit", "AdamW4bit"])
@pytest.mark.parametrize("staging_buffers", [2, 3])
def test_pieces_bit_identical_to_gpu_step(cls, dtype, staging_buffers):
    """Tensors larger than a chunk, streamed in group-aligned pieces (odd sizes included)."""
    shapes = [(1000, 512), (3001, 1001), (33,), (4099, 257), (2048, 1024)]
    base = make_params(shapes, dtype, 2)
    pa, pb = clone(base), clone(base)
    plain = cls(pa)
    probe = offloaded(cls)(clone(base), chunk_mib=4096)
    chunk = probe._state_bytes(base[0]) * 1.1 / MiB
    opt = offloaded(cls)(pb, chunk_mib=chunk, staging_buffers=staging_buffers)
    for step in range(4):
        set_grads([pa, pb], step)
        plain.step()
        opt.step()
        assert_same(plain, pa, opt, pb)
    split = [c for c in opt._chunks if c.pieces is not None]
    assert len(split) == 3 and all(len(c.pieces) >= 2 for c in split)
    assert opt.gpu_state_bytes() == staging_buffers * opt.chunk_bytes
