"""Checks that need a CUDA device (skipped without one): the Triton backend against torch.optim. The
kernel-vs-fallback comparisons of test_triton_backend.py and the compiled step of test_compile.py also run
on the GPU."""

import pytest
import torch

from optgen import optim
from optgen.optim import SGD, Adam, AdamW, Lamb, Lamb16, Lion, StochasticAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(4096, 33), (1000,), (), (0, 3), (64, 64)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("ours, ref, kw", [
    (AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
], ids=["AdamW", "Adam", "SGD-momentum", "SGD-nesterov"])
def test_triton_matches_torch_optim(ours, ref, kw):
    torch.manual_seed(0)
    base = [torch.randn(s, device="cuda") for s in SHAPES]
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]
    oa, ob = ours(a, backend="triton", **kw), ref(b, **kw)
    for _ in range(50):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        assert _rel(x.detach(), y.detach()) < 1e-6


def test_lion_matches_float64_reference():
    torch.manual_seed(0)
    lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
    base = [torch.randn(s, device="cuda") for s in SHAPES]
    params = [torch.nn.Parameter(x.clone()) for x in base]
    ref = [x.double() for x in base]
    mom = [torch.zeros_like(x) for x in ref]
    opt = Lion(params, lr=lr, betas=(b1, b2), weight_decay=wd, backend="triton")
    for _ in range(50):
        for i, p in enumerate(params):
            g = torch.randn_like(p)
            p.grad = g
            c = b1 * mom[i] + (1 - b1) * g.double()
            ref[i] = ref[i] - lr * (torch.sign(c) + wd * ref[i])
            mom[i] = b2 * mom[i] + (1 - b2) * g.double()
        opt.step()
    for p, r in zip(params, ref):
        assert _rel(p.detach().double(), r) < 1e-6


@pytest.mark.parametrize("cls", [Lamb, Lamb16], ids=["Lamb", "Lamb16"])
def test_whole_tensor_sums_repeat_bit_for_bit(cls):
    """Two identical runs give identical bits: the norms add each tensor's per-program partial sums in a fixed
    order (float atomics did not: two Lamb16 runs on an H100 differed)."""
    torch.manual_seed(0)
    base = [torch.randn(s, device="cuda") for s in [(4096, 1024), (3000, 7), (1000,), (512, 512)]]
    grads = [[torch.randn_like(x) for x in base] for _ in range(5)]
    runs = []
    for _ in range(2):
        params = [torch.nn.Parameter(x.clone()) for x in base]
        opt = cls(params, lr=1e-2, weight_decay=0.01, backend="triton")
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for x, y in zip(pa, pb):
        assert torch.equal(x.detach().view(torch.int32), y.detach().view(torch.int32))
        for key, value in oa.state[x].items():
            other = ob.state[y][key]
            assert torch.equal(value.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), key


def _assert_enqueues_only(work) -> None:
    """Run ``work`` behind about a second of queued GPU time: it must neither call anything that synchronizes
    (sync debug mode raises, naming the call) nor return only once the queue has drained."""
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    torch.cuda.set_sync_debug_mode("error")
    try:
        work()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.cuda.current_stream().query(), "waited for the GPU"
    torch.cuda.synchronize()


@pytest.mark.parametrize("cls", [getattr(optim, name) for name in optim.__all__], ids=lambda c: c.__name__)
def test_step_does_not_wait_for_queued_gpu_work(cls):
    """``step()`` only enqueues: with a long kernel still queued, it returns before that kernel ends. A blocking
    host-to-device copy (the scalars, the rng tensor) would synchronize the stream, so in a training loop the
    host could not prepare the step while backward runs, nor, with gradient release, between the hooks."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cls.__name__.startswith(("Flash", "Stochastic")) else torch.float32
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in [(256, 64), (5000,), (100,)]]
    opt = cls(params, lr=1e-3, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # states created, kernels compiled, launch plans cached
    before = [p.detach().clone() for p in params]
    _assert_enqueues_only(opt.step)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before)), "the step did not run"


@pytest.mark.parametrize("lr_device", ["cpu", "cuda"])
def test_step_with_tensor_lr_does_not_wait(lr_device):
    """A tensor lr (an LR scheduler's, or one shared with a compiled step) in eager: the scalars built from it
    cross without a blocking copy, and the step equals one with the same lr as a number."""
    torch.manual_seed(0)
    base = [torch.randn(s, device="cuda") for s in [(256, 64), (100,)]]
    a, b = ([torch.nn.Parameter(x.clone()) for x in base] for _ in range(2))
    lr = torch.tensor(1e-3, device=lr_device)
    opt, ref = AdamW(a, lr=lr, backend="triton"), AdamW(b, lr=float(lr), backend="triton")
    for k in range(3):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        if k:
            _assert_enqueues_only(opt.step)
        else:
            opt.step()
        ref.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_gradient_release_does_not_stall_backward():
    """With gradient release each parameter is stepped in a hook during backward. More parameters than the
    launcher caches plans for (64): every hook builds its launch tables, and those copies must not wait either."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(40)]).cuda()  # 80 parameters
    opt = AdamW(model.parameters(), lr=1e-3, backend="triton")
    handle = opt.attach_gradient_release(model)
    x = torch.randn(8, 32, device="cuda")
    model(x).square().mean().backward()  # the first steps: states and kernels exist
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x).square().mean()
    _assert_enqueues_only(loss.backward)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    handle.remove()


def test_step_refuses_cuda_graph_capture():
    """A captured step would replay the first step's scalars (and read a recycled pinned block): refused."""
    p = torch.nn.Parameter(torch.randn(5000, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = AdamW([p], lr=1e-3, backend="triton")
    opt.step()  # warm: states and the kernel exist
    before = p.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), before)


def test_steps_enqueued_behind_gpu_work_equal_synchronized_steps():
    """Twenty steps enqueued while the GPU is still busy, lr changing at each: every step's scalars and rng
    tensor come from a pinned block freed as soon as its copy is enqueued, so a block reused too early would
    give a later step another step's values. The parameters must equal those of steps synchronized one by one."""
    torch.manual_seed(0)
    base = [torch.randn(s, device="cuda").bfloat16() for s in [(256, 64), (5000,)]]
    grads = [[torch.randn_like(x) for x in base] for _ in range(20)]
    runs = []
    for queued in (True, False):
        params = [torch.nn.Parameter(x.clone()) for x in base]
        opt = StochasticAdamW(params, lr=1e-3, backend="triton")
        torch.cuda.synchronize()
        if queued:
            torch.cuda._sleep(2_000_000_000)
        for k, gs in enumerate(grads):
            opt.param_groups[0]["lr"] = 1e-3 * (1 + k)
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
            if not queued:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
