"""Offloaded and paged optimizer states, on the CPU: the chunking, paging and scheduling code runs with
CPU-to-CPU "transfers" (staging_device='cpu', eager backend) and must match the plain optimizer bit for bit.
The same checks on a GPU, with the Triton kernel and real side-stream copies, are in test_offload_gpu.py."""

from __future__ import annotations

import io

import pytest
import torch

from optgen import offloaded
from optgen.optim import AdamW, AdamW4bit, AdamW8bit, FlashAdamW, Lamb, Lamb16, StochasticAdamW
from optgen.runtime.offload import MiB, OffloadedOptimizer

# quantized tensors (>= 4096 elements), small ones (fp32-state variant), odd sizes, an empty one
SHAPES = [(64, 96), (33,), (80, 70), (4099,), (7, 5), (128, 40), (0, 3), (96, 64), (50, 100), (4100,), (72, 64),
          (60, 90)]
SPECS = [(AdamW, torch.float32), (FlashAdamW, torch.bfloat16), (AdamW8bit, torch.float32),
         (StochasticAdamW, torch.bfloat16), (Lamb, torch.float32), (Lamb16, torch.float32)]


def chunk_mib(cls: type, params: list[torch.Tensor]) -> float:
    """1.2x the largest tensor's state: one or two tensors per chunk, so every run has several chunks."""
    probe = offloaded(cls)(clone(params), chunk_mib=1000, staging_device="cpu")
    return 1.2 * max(probe._state_bytes(p) for p in probe.param_groups[0]["params"]) / MiB


def make_params(dtype: torch.dtype, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(groups: list[list[torch.nn.Parameter]], step: int, skip: int | None = None) -> None:
    """The same fresh random gradients on every copy; parameter ``skip`` gets none this step."""
    g = torch.Generator().manual_seed(1000 + step)
    for k, p0 in enumerate(groups[0]):
        grad = None if k == skip else torch.randn(p0.shape, generator=g).to(p0.dtype)
        for params in groups:
            params[k].grad = None if grad is None else grad.clone()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer,
                pb: list[torch.Tensor]) -> None:
    """Parameters and every state tensor identical in dtype, shape and bits."""
    for opt in (a, b):
        if isinstance(opt, OffloadedOptimizer):
            opt.synchronize()  # the last copies back run late (as on a GPU's side stream)
    for x, y in zip(pa, pb):
        assert x.dtype == y.dtype and torch.equal(bits(x), bits(y))
        sa, sb = a.state[x], b.state[y]
        assert set(sa) == set(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
            assert torch.equal(bits(sa[key]), bits(sb[key])), key


def assert_in_chunks(opt: OffloadedOptimizer) -> None:
    """Every state tensor but the step count is a view into a chunk's buffer."""
    storages = {c.host.untyped_storage().data_ptr() if c.gpu is None else c.gpu.untyped_storage().data_ptr()
                for c in opt._chunks}
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.untyped_storage().data_ptr() in storages


def off(cls, params, budget_chunks: float | None = None, **kw) -> OffloadedOptimizer:
    """Offloaded ``cls`` on CPU-to-CPU transfers; a GPU budget of ``budget_chunks`` chunks (None: offload all)."""
    chunk = chunk_mib(cls, [p for g in params for p in g["params"]] if isinstance(params[0], dict) else params)
    budget = None if budget_chunks is None else budget_chunks * chunk
    return offloaded(cls)(params, chunk_mib=chunk, gpu_budget_mib=budget, staging_device="cpu", **kw)


@pytest.mark.parametrize("cls,dtype", SPECS, ids=[c.__name__ for c, _ in SPECS])
@pytest.mark.parametrize("budget", [None, 4.0, 1000.0], ids=["offload", "paged", "resident"])
def test_bit_identical_to_plain_step(cls, dtype, budget):
    base = make_params(dtype, 0)
    pa, pb = clone(base), clone(base)
    kw = {"seed": 7} if cls is StochasticAdamW else {}
    groups_a = [{"params": pa[:4], "lr": 3e-3}, {"params": pa[4:], "lr": 1e-3}]
    groups_b = [{"params": pb[:4], "lr": 3e-3}, {"params": pb[4:], "lr": 1e-3}]
    plain = cls(groups_a, **kw)
    opt = off(cls, groups_b, budget, **kw)
    for step in range(4):
        set_grads([pa, pb], step, skip=2 if step == 1 else None)
        plain.step()
        opt.step()
        assert_same(plain, pa, opt, pb)
    assert len(opt._chunks) > 4
    assert_in_chunks(opt)
    paged = [c for c in opt._chunks if c.gpu is None]
    if budget is None:
        assert len(paged) == len(opt._chunks) and opt.gpu_state_bytes() == 3 * opt.chunk_bytes
    elif budget == 1000.0:
        assert not paged and opt.gpu_state_bytes() == sum(c.nbytes for c in opt._chunks)
    else:  # some resident, some paged, all within the budget
        assert 0 < len(paged) < len(opt._chunks)
        assert opt.gpu_state_bytes() <= opt.gpu_budget_bytes


def test_paging_in_and_out_between_steps():
    base = make_params(torch.bfloat16, 1)
    pa, pb = clone(base), clone(base)
    plain, opt = FlashAdamW(pa), off(FlashAdamW, pb, 1000.0)
    chunk = opt.chunk_bytes / MiB
    for step, budget in enumerate([1000.0, 4.0, None, 1.0, 1000.0, 2.0, None]):
        opt.set_gpu_budget(None if budget is None else budget * chunk)
        set_grads([pa, pb], step)
        plain.step()
        opt.step()
        assert_same(plain, pa, opt, pb)
        assert_in_chunks(opt)
        resident = sum(c.gpu is not None for c in opt._chunks)
        if budget == 1000.0:
            assert resident == len(opt._chunks)
        elif budget == 4.0:
            assert 0 < resident < len(opt._chunks)
        else:  # None (3 slots), or a budget taken up by the staging slots: one slot for 1 chunk, two for 2
            assert resident == 0 and len(opt._slots) == (3 if budget is None else budget)
        assert budget is None or opt.gpu_state_bytes() <= opt.gpu_budget_bytes


def test_budget_exceeded_by_new_parameters_pages_out():
    """States that no longer fit (a new param group) move to CPU memory; the step stays identical."""
    base = make_params(torch.float32, 2)
    pa, pb = clone(base), clone(base)
    plain = AdamW8bit(pa[:2])
    opt = offloaded(AdamW8bit)(pb[:2], chunk_mib=chunk_mib(AdamW8bit, base), staging_device="cpu")
    opt.set_gpu_budget(4 * opt.chunk_bytes / MiB)
    for step in range(5):
        if step == 2:
            plain.add_param_group({"params": pa[2:], "lr": 5e-4})
            opt.add_param_group({"params": pb[2:], "lr": 5e-4})
        n = 2 if step < 2 else len(pa)
        set_grads([pa[:n], pb[:n]], step)
        plain.step()
        opt.step()
        assert_same(plain, pa[:n], opt, pb[:n])
        if step < 2:
            assert all(c.gpu is not None for c in opt._chunks)
    assert any(c.gpu is None for c in opt._chunks) and opt.gpu_state_bytes() <= opt.gpu_budget_bytes


@pytest.mark.parametrize("cls,dtype", [(FlashAdamW, torch.bfloat16), (StochasticAdamW, torch.bfloat16),
                                       (AdamW8bit, torch.float32)], ids=["FlashAdamW", "StochasticAdamW", "AdamW8bit"])
def test_state_dict_round_trip(cls, dtype):
    """offloaded -> bytes -> plain and -> a fresh offloaded optimizer, and plain -> offloaded: every copy
    continues bit-identically, and the saved dtypes survive (uint8 codes stay uint8)."""
    base = make_params(dtype, 3)
    p_plain, p_off, p_back, p_fromplain = clone(base), clone(base), clone(base), clone(base)
    plain, opt = cls(p_plain), off(cls, p_off, 4.0)
    for step in range(3):
        set_grads([p_plain, p_off], step)
        plain.step()
        opt.step()
    state, weights = opt.state_dict(), [p.detach().clone() for p in p_off]
    set_grads([p_off], 99)
    opt.step()  # the saved state_dict holds copies: the step count (advanced in place) too
    assert all(float(s["step"]) == 3.0 for s in state["state"].values())
    opt.load_state_dict(state)  # and back, so that both continue from step 3
    for p, w in zip(p_off, weights):
        p.data.copy_(w)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    for k, p in enumerate(p_back):
        p.data.copy_(p_off[k].detach())
        p_fromplain[k].data.copy_(p_plain[k].detach())
    plain2 = cls(p_back)
    plain2.load_state_dict(saved)
    opt2 = off(cls, p_fromplain)
    opt2.load_state_dict(plain.state_dict())
    assert_same(plain, p_plain, opt2, p_fromplain)
    assert_in_chunks(opt2)
    for step in range(3, 6):
        set_grads([p_plain, p_off, p_back, p_fromplain], step)
        for o in (plain, opt, plain2, opt2):
            o.step()
        assert_same(plain, p_plain, opt, p_off)
        assert_same(plain, p_plain, plain2, p_back)
        assert_same(plain, p_plain, opt2, p_fromplain)


@pytest.mark.parametrize("load", ["load_state_dict", "load_torch_state_dict"])
def test_a_load_keeps_each_chunk_to_one_param_group(load):
    """A chunk is stepped once per param group: states loaded into chunks are packed group by group, as the
    first step packs them (a chunk of two groups would cross the bus twice per step)."""
    base, plain_params = make_params(torch.float32, 5), make_params(torch.float32, 5)
    plain = AdamW([{"params": plain_params[:2]}, {"params": plain_params[2:], "lr": 0.1}])
    set_grads([plain_params], 0)
    plain.step()
    opt = offloaded(AdamW)([{"params": base[:2]}, {"params": base[2:], "lr": 0.1}], chunk_mib=1000,
                           staging_device="cpu")
    saved = plain.state_dict() if load == "load_state_dict" else plain.torch_state_dict()
    getattr(opt, load)(saved)
    group_of = {p: k for k, g in enumerate(opt.param_groups) for p in g["params"]}
    assert [sorted({group_of[e.param] for e in c.entries}) for c in opt._chunks] == [[0], [1]]


@pytest.mark.parametrize("corruption", ["float codes", "meta"])
def test_bad_state_dict_changes_nothing(corruption):
    """Refused by the plain and the offloaded loader alike, before either changes anything (the offloaded one
    loads the groups and drops its chunks before it copies the saved states in)."""
    base = make_params(torch.float32, 9)
    pa, pb = clone(base), clone(base)
    plain, opt = AdamW8bit(pa), off(AdamW8bit, pb, 4.0)
    set_grads([pa, pb], 0)
    plain.step()
    opt.step()
    bad = opt.state_dict()
    bad["param_groups"][0]["lr"] = 0.5
    if corruption == "float codes":  # uint8 codes saved as float
        bad["state"][0]["m"] = bad["state"][0]["m"].float()
        match = "state 'm' of parameter 0"
    else:  # a state that holds no values
        bad["state"][0]["m"] = bad["state"][0]["m"].to("meta")
        match = "state 'm' of parameter 0 is on the meta device"
    for target in (plain, opt):
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert target.param_groups[0]["lr"] == 1e-3
    assert_in_chunks(opt)
    set_grads([pa, pb], 1)
    plain.step()
    opt.step()
    assert_same(plain, pa, opt, pb)


@pytest.mark.parametrize("budget", [None, 100.0], ids=["paged", "resident"])
@pytest.mark.parametrize("change", ["state set by hand", "parameter grown"])
def test_a_state_or_parameter_that_no_longer_fits_its_chunk_is_refused(budget, change):
    """The kernels step the chunks: a state replaced by hand (which a resident chunk's kernel would take, and
    write past its end) or a parameter resized through ``.data`` (whose kernel would step past its entries, into
    the next tensor's states) is refused before anything changes."""
    params = make_params(torch.float32, 10)
    opt = off(AdamW8bit, params, budget)
    set_grads([params], 0)
    opt.step()
    opt.synchronize()
    if change == "state set by hand":
        opt.state[params[0]]["m"] = torch.zeros(4, dtype=torch.uint8)
        match = "state 'm' of parameter 0 is no longer the view of its chunk"
    else:
        params[2].data = torch.randn(90, 70)
        match = r"parameter 2 \(shape \(90, 70\), torch.float32\) no longer fits its state 'm'"
    set_grads([params], 1)
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    with pytest.raises(ValueError, match=match):
        opt.step()
    opt.synchronize()
    for p, (value, state) in zip(params, before):
        assert torch.equal(bits(p), bits(value))
        assert all(torch.equal(bits(v), bits(opt.state[p][k])) for k, v in state.items())


def test_torch_layout_export_and_import():
    base = make_params(torch.bfloat16, 4)
    pa, pb = clone(base), clone(base)
    plain, opt = FlashAdamW(pa), off(FlashAdamW, pb)
    for step in range(2):
        set_grads([pa, pb], step)
        plain.step()
        opt.step()
    exported, ours = plain.torch_state_dict(), opt.torch_state_dict()
    assert exported["state"].keys() == ours["state"].keys()
    for index, values in exported["state"].items():
        for key, value in values.items():
            assert torch.equal(bits(value), bits(ours["state"][index][key])), key
    for x, y in zip(plain.master_weights(), opt.master_weights()):
        assert torch.equal(bits(x), bits(y))
    pc = clone(base)
    opt3 = off(FlashAdamW, pc, 4.0)
    plain3 = FlashAdamW(clone(base))
    opt3.load_torch_state_dict(exported)
    plain3.load_torch_state_dict(exported)
    assert_same(plain3, plain3.param_groups[0]["params"], opt3, pc)
    assert_in_chunks(opt3)


def test_lr_scheduler_and_closure():
    base = make_params(torch.float32, 5)
    pa, pb = clone(base), clone(base)
    plain, opt = AdamW(pa, lr=1e-2), off(AdamW, pb, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (plain, opt)]
    for step in range(3):
        set_grads([pa, pb], step)
        assert plain.step(lambda: 1.0) == opt.step(lambda: 1.0) == 1.0
        for s in scheds:
            s.step()
        assert_same(plain, pa, opt, pb)
    assert opt.param_groups[0]["lr"] == plain.param_groups[0]["lr"] == 1e-2 / 8


# ------------------------------------------------------------------ bad input: clear errors at construction
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_offload_without_gpu_is_refused():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        offloaded(AdamW)(make_params(torch.float32, 0))


def test_budget_smaller_than_a_chunk_is_refused():
    params = make_params(torch.float32, 0)
    with pytest.raises(ValueError, match="smaller than one chunk"):
        offloaded(AdamW)(params, chunk_mib=1, gpu_budget_mib=0.5, staging_device="cpu")
    opt = offloaded(AdamW)(params, chunk_mib=1, gpu_budget_mib=1.5, staging_device="cpu")
    for bad in (0.99, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="at least one chunk"):
            opt.set_gpu_budget(bad)
    assert opt.gpu_budget_bytes == 1.5 * MiB


@pytest.mark.parametrize("cls,dtype", [(AdamW, torch.float32), (FlashAdamW, torch.bfloat16),
                                       (AdamW8bit, torch.float32), (AdamW4bit, torch.float32)],
                         ids=["AdamW", "FlashAdamW", "AdamW8bit", "AdamW4bit"])
@pytest.mark.parametrize("budget", [None, 6.0], ids=["offload", "paged"])
def test_tensor_larger_than_a_chunk_streams_in_pieces(cls, dtype, budget):
    """A tensor whose states exceed a chunk is stepped in pieces at group-aligned offsets (elementwise and
    group-wise specs only): still bit-identical, the pieces of odd-sized tensors included."""
    shapes = [(33,), (64, 96), (300, 170), (4099, 5), (4100,)]
    if cls.quantized_multiple > 1:  # AdamW4bit quantizes whole blocks only (as torchao): sizes of whole blocks
        shapes = [(33,), (64, 96), (300, 128), (4096, 5), (4224,)]
    g = torch.Generator().manual_seed(8)
    base = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    pa, pb = clone(base), clone(base)
    plain = cls(pa)
    probe = offloaded(cls)(clone(base), chunk_mib=1000, staging_device="cpu")
    chunk = probe._state_bytes(base[1]) * 1.2 / MiB  # (300, 170) and (4099, 5) need several pieces
    opt = offloaded(cls)(pb, chunk_mib=chunk, gpu_budget_mib=None if budget is None else budget * chunk,
                         staging_device="cpu")
    for step in range(3):
        set_grads([pa, pb], step)
        plain.step()
        opt.step()
        assert_same(plain, pa, opt, pb)
    split = [c for c in opt._chunks if c.pieces is not None]
    assert len(split) == 2 and all(len(c.pieces) >= 3 for c in split)
    assert all(c.gpu is None for c in split)  # each is larger than the resident room
    assert (opt._chunks[0].gpu is not None) == (budget is not None)
    assert_in_chunks(opt)


@pytest.mark.parametrize("cls,dtype,match", [(Lamb, torch.float32, "whole-tensor values"),
                                             (Lamb16, torch.float32, "whole-tensor values"),
                                             (StochasticAdamW, torch.bfloat16, "element index")],
                         ids=["Lamb", "Lamb16", "StochasticAdamW"])
def test_tensor_larger_than_a_chunk_is_refused_when_it_cannot_be_split(cls, dtype, match):
    big = torch.nn.Parameter(torch.randn(4000, 10).to(dtype))
    with pytest.raises(ValueError, match=f"cannot be stepped in pieces: .*{match}.*raise chunk_mib to at least 1"):
        offloaded(cls)([big], chunk_mib=0.05, staging_device="cpu")
    opt = offloaded(cls)(make_params(dtype, 0), chunk_mib=0.05, staging_device="cpu")
    with pytest.raises(ValueError, match="more than one chunk"):
        opt.add_param_group({"params": [big]})
    assert len(opt.param_groups) == 1


def test_unsplittable_layouts_are_refused():
    strided = torch.nn.Parameter(torch.randn(4000, 10).t())  # not contiguous: no flat views of it
    with pytest.raises(ValueError, match="not contiguous"):
        offloaded(AdamW)([strided], chunk_mib=0.05, staging_device="cpu")
    big = torch.nn.Parameter(torch.randn(40000))  # AdamW8bit: a piece is 4096 elements (16 blocks of 256)
    with pytest.raises(ValueError, match="one quantization group"):
        offloaded(AdamW8bit)([big], chunk_mib=0.005, staging_device="cpu")


@pytest.mark.parametrize("kw,match", [({"chunk_mib": 0}, "chunk_mib"), ({"chunk_mib": float("nan")}, "chunk_mib"),
                                      ({"gpu_budget_mib": "1"}, "gpu_budget_mib"),
                                      ({"staging_device": "meta"}, "staging_device")])
def test_invalid_options(kw, match):
    kw = {"staging_device": "cpu", **kw}
    with pytest.raises(ValueError, match=match):
        offloaded(AdamW)(make_params(torch.float32, 0), **kw)


def test_misuse_is_refused():
    with pytest.raises(TypeError, match="optgen optimizer class"):
        offloaded(torch.optim.AdamW)
    opt = off(AdamW, make_params(torch.float32, 0))
    with pytest.raises(RuntimeError, match="gradient release"):
        opt.attach_gradient_release()
    for copy in (__import__("copy").deepcopy, lambda o: torch.save(o, io.BytesIO())):  # a copy would not work
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            copy(opt)
    assert offloaded(AdamW) is type(opt) and isinstance(opt, AdamW)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU file runs the real kernel")
@pytest.mark.parametrize("cls,dtype", [(FlashAdamW, torch.bfloat16), (Lamb, torch.float32)], ids=["FlashAdamW", "Lamb"])
def test_triton_kernel_on_staging_views(cls, dtype):
    """The Triton launcher (interpreted on the CPU) on staging views: its launch plans are cached by buffer
    address, and every chunk passes through the same two slots."""
    shapes = [(64, 80), (4100,), (40,), (96, 48), (0, 3), (70, 64)]
    g = torch.Generator().manual_seed(6)
    base = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    pa, pb = clone(base), clone(base)
    plain = cls(pa, backend="triton")
    opt = offloaded(cls)(pb, backend="triton", chunk_mib=chunk_mib(cls, base), staging_device="cpu")
    for step in range(3):
        set_grads([pa, pb], step)
        plain.step()
        opt.step()
        assert_same(plain, pa, opt, pb)
    assert len(opt._chunks) > 2 and all(c.gpu is None for c in opt._chunks)


def test_sharded_parameters_are_refused():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="sharded"):
            offloaded(AdamW)([p], staging_device="cpu")
    finally:
        dist.destroy_process_group()


def test_training_loop_is_unchanged():
    """A real loop (forward, backward, step, zero_grad, LR schedule) gives the same losses and weights, with
    one chunk resident, one streamed whole and one tensor streamed in pieces."""
    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 128),
                                   torch.nn.GELU(), torch.nn.Linear(128, 10))

    ma, mb = model(0), model(0)
    plain = AdamW8bit(ma.parameters(), lr=1e-2)
    opt = offloaded(AdamW8bit)(mb.parameters(), lr=1e-2, chunk_mib=0.05, staging_buffers=1, staging_device="cpu")
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6) for o in (plain, opt)]
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        losses = []
        for m, o, s in zip((ma, mb), (plain, opt), scheds):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            o.zero_grad()
            s.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
        if step == 0:  # room for the first chunk beside the one staging slot
            opt.set_gpu_budget((opt.chunk_bytes + opt._chunks[0].nbytes) / MiB)
    assert_same(plain, list(ma.parameters()), opt, list(mb.parameters()))
    assert [c.gpu is not None for c in opt._chunks] == [True, False, False]
    assert [c.pieces is not None for c in opt._chunks] == [False, True, False]
