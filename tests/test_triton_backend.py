"""The Triton kernel of every built-in spec against the PyTorch fallback (interpreter on the CPU, or a GPU).

The IR promises correctly rounded fp32 arithmetic on both backends, so one step from the same inputs must
give the same bits: the assertion is "at most 1 ulp" and the measured difference is 0.
"""

import os

import pytest
import torch

from optgen import optim
from optgen.runtime.launch import RngArgs
from optgen.runtime.optimizer import OptgenOptimizer
from optgen.runtime.transfer import make_rng

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")

CLASSES = [getattr(optim, name) for name in optim.__all__]
HYPER = {"lr": 1e-2, "weight_decay": 0.1, "momentum": 0.9, "nesterov": True}
SHAPES = [(5, 3), (), (2048,), (3001,), (17, 129), (0, 4)]  # 2048: whole tiles only (tiles hold 512 to 2048 elements); 3001 and 17*129 end in a partial one


def _kwargs(cls: type[OptgenOptimizer]) -> dict:
    names = {r.name for r in cls.hyperparam_rules}
    return {k: v for k, v in HYPER.items() if k in names}


def _random_state(cls: type[OptgenOptimizer], shapes, param_dtype=None, seed=0):
    """Lists of buffers for one op call, filled with fresh random data (states are positive where squared); the
    parameters in ``param_dtype``, by default the first the spec takes."""
    param_dtype = param_dtype or getattr(torch, cls.param_dtypes[0])
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for b in cls.buffers:
        dtype = b.torch_dtype(param_dtype)
        tensors = []
        for shape in shapes:
            x = torch.randn(b.shape_for(torch.empty(shape)), generator=gen)
            if not dtype.is_floating_point:  # codes: random over the whole code range
                info = torch.iinfo(dtype)
                x = torch.randint(info.min, info.max + 1, x.shape, generator=gen)
            elif b.key is not None:
                x = x.abs() * 0.01 if b.key.startswith("v") or b.shape == "groups" else x * 0.1
            tensors.append(x.to(dtype).to(DEVICE))
        lists.append(tensors)
    return lists


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float tensors of the same dtype."""
    if a.numel() == 0:
        return 0
    if not a.dtype.is_floating_point:  # quantization codes must be identical
        return 0 if torch.equal(a, b) else 1 << 30
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).long(), b.view(bits).long()
    # map sign-magnitude bit patterns to a monotonic integer line
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("count", [1, 3, 6])
def test_kernel_matches_fallback_one_step(cls, count):
    shapes = [SHAPES[i % len(SHAPES)] for i in range(count)]
    hp = {**{r.name: r.default for r in cls.hyperparam_rules}, **_kwargs(cls)}
    for t in (1, 7):
        scalars = torch.tensor(cls.host_scalars(hp, t), dtype=torch.float32, device=DEVICE)
        ref = _random_state(cls, shapes, seed=t)
        out = [[x.clone() for x in lst] for lst in ref]
        ids = [5 * k + 3 for k in range(count)]  # stable parameter ids, not the positions in the call
        rng = (make_rng(1234, t, ids, DEVICE),) if cls.variants[""].needs_rng else ()
        cls.fallback(*ref, scalars, *rng)
        cls.triton_step(*out, scalars, *rng)
        reduces = bool(__import__(cls.__module__, fromlist=["_launcher"])._launcher.slots)
        for b, lr, lo in zip(cls.buffers, ref, out):
            for x, y in zip(lr, lo):
                if reduces and x.dtype.is_floating_point and x.numel():
                    # Whole-tensor sums are added in another order (per-tile partial sums added in program order vs
                    # torch's cascade): a norm differs by a few fp32 ulps, and so does every element using it.
                    err = float((x.double() - y.double()).abs().max() / x.double().abs().max())
                    assert err <= 8 * torch.finfo(torch.float32).eps, f"{cls.__name__} {b.arg}: {err}"
                else:
                    assert _ulps(x, y) <= 1, f"{cls.__name__} buffer {b.arg} t={t}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_scalars_as_arguments_or_in_a_tensor_give_the_same_bits(cls):
    """An eager step passes the scalars (and the random streams' seed and step) as kernel arguments; a compiled
    graph passes them in tensors (SCALARS_TENSOR). The two forms of each kernel give the same bits."""
    shapes = [SHAPES[i % len(SHAPES)] for i in range(6)]
    hp = {**{r.name: r.default for r in cls.hyperparam_rules}, **_kwargs(cls)}
    values = cls.host_scalars(hp, 7)
    ids = [5 * k + 3 for k in range(len(shapes))]
    launcher = __import__(cls.__module__, fromlist=["_launcher"])._launcher
    numbers = _random_state(cls, shapes, seed=7)
    tensors = [[x.clone() for x in lst] for lst in numbers]
    rng = cls.variants[""].needs_rng
    launcher(*numbers, scalars=values,
             rng=RngArgs(1234, 7, torch.tensor(ids, device=DEVICE)) if rng else None)
    launcher(*tensors, scalars=torch.tensor(values, dtype=torch.float32, device=DEVICE),
             rng=make_rng(1234, 7, ids, DEVICE) if rng else None)
    for b, xs, ys in zip(cls.buffers, numbers, tensors):
        for x, y in zip(xs, ys):
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{cls.__name__} {b.arg}"


@pytest.mark.parametrize("cls", [optim.AdamW, optim.Lion, optim.FlashAdamW, optim.StochasticAdamW],
                         ids=lambda c: c.__name__)
def test_kernel_matches_fallback_bf16_params(cls):
    shapes = [(300,), (33, 65)]
    hp = {**{r.name: r.default for r in cls.hyperparam_rules}, **_kwargs(cls)}
    scalars = torch.tensor(cls.host_scalars(hp, 3), dtype=torch.float32, device=DEVICE)
    ref = _random_state(cls, shapes, param_dtype=torch.bfloat16)
    out = [[x.clone() for x in lst] for lst in ref]
    rng = (make_rng(99, 3, [4, 1], DEVICE),) if cls.variants[""].needs_rng else ()
    cls.fallback(*ref, scalars, *rng)
    cls.triton_step(*out, scalars, *rng)
    for lr, lo in zip(ref, out):
        for x, y in zip(lr, lo):
            assert _ulps(x, y) <= 1


def _count_launches(cls, monkeypatch) -> list:
    """The step kernel's launches (grid sizes): every one goes through ``MultiTensorLauncher._launch``, the first
    of each specialization through Triton's launch call and the later ones straight to the compiled kernel."""
    launches = []
    launcher = __import__(cls.__module__, fromlist=["_launcher"])._launcher
    launch = type(launcher)._launch

    def counting(self, args, n_blocks, *rest):
        if self is launcher:
            launches.append(n_blocks)
        return launch(self, args, n_blocks, *rest)

    monkeypatch.setattr(type(launcher), "_launch", counting)
    return launches


def test_one_launch_per_dtype_combination(monkeypatch):
    launches = _count_launches(optim.AdamW, monkeypatch)
    params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in range(1, 41)]
    opt = optim.AdamW(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(launches) == 1  # 40 tensors, one launch
    params16 = [torch.nn.Parameter(torch.randn(n, device=DEVICE, dtype=torch.bfloat16)) for n in (5, 70)]
    for p in params16:
        p.grad = torch.randn_like(p)
    opt.add_param_group({"params": params16})
    launches.clear()
    opt.step()
    assert len(launches) == 2  # one per group (here: one per dtype)
    if DEVICE == "cuda":  # the fp32 group's kernel was compiled by the first step: launched directly since
        launcher = __import__(optim.AdamW.__module__, fromlist=["_launcher"])._launcher
        assert len(launcher._compiled) >= 2


@pytest.mark.parametrize("cls,count", [(optim.AdamW, 8), (optim.AdamW, 40), (optim.Lamb, 9), (optim.Lamb16, 9)],
                         ids=["AdamW-8", "AdamW-40", "Lamb-9", "Lamb16-9"])
def test_a_split_launch_is_two_launches_whatever_the_tensor_count(cls, count, monkeypatch, step_whole_and_split):
    """A large group's launch runs in two parts (``MultiTensorLauncher.split_min_tensors``; its element threshold
    lowered here): two launches per pass for 8 tensors as for 40, every tensor's programs in exactly one, the bits
    of one launch over all of them. With whole-tensor reductions (Lamb, Lamb16) each part runs all its passes and
    sums its own tensors' partials: the same sums, in the same order."""
    launches = _count_launches(cls, monkeypatch)
    launcher = __import__(cls.__module__, fromlist=["_launcher"])._launcher
    passes = launcher.passes if launcher.slots else 1
    torch.manual_seed(0)
    size = 1100 if cls is optim.AdamW else 4200  # Lamb16's quantized states from 4096 elements
    base = [torch.randn(size - 9 * k, device=DEVICE) for k in range(count)]
    whole = cls([torch.nn.Parameter(x.clone()) for x in base], backend="triton")
    split = cls([torch.nn.Parameter(x.clone()) for x in base], backend="triton")
    for _ in range(2):
        launches.clear()
        step_whole_and_split(whole, split)
        assert len(launches) == 3 * passes  # one launch per pass, then two
        assert sum(launches[passes:]) == passes * sum(-(-len(x) // launcher.block) for x in base), launches


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_optimizer_triton_backend_matches_eager(cls):
    torch.manual_seed(0)
    shapes = [(7, 5), (3001,), ()]
    base = [torch.randn(s, device=DEVICE, dtype=getattr(torch, cls.param_dtypes[0])) for s in shapes]
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]
    oa = cls(a, backend="eager", **_kwargs(cls))
    ob = cls(b, backend="triton", **_kwargs(cls))
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    reduces = bool(__import__(cls.__module__, fromlist=["_launcher"])._launcher.slots)
    for x, y in zip(a, b):
        pairs = [(x, y)] + [(oa.state[x][k], ob.state[y][k]) for k in oa.state[x]]
        for u, w in pairs:
            if reduces and u.dtype.is_floating_point:  # sums in another order: see test above
                assert float((u.double() - w.double()).abs().max()) <= 8 * 1.2e-7 * float(u.double().abs().max())
            elif reduces:  # codes of values that moved by an ulp may differ by one step, rarely
                assert (u.view(torch.uint8).int() - w.view(torch.uint8).int()).abs().max() <= 1
                assert (u != w).float().mean() < 0.01
            else:
                assert torch.equal(u, w)


def test_strided_parameter_takes_the_fallback_in_place():
    base = torch.randn(6, 4, device=DEVICE)
    a = torch.nn.Parameter(base.clone().t())  # non-contiguous leaf
    b = torch.nn.Parameter(base.clone().t())
    oa, ob = optim.AdamW([a], backend="eager"), optim.AdamW([b], backend="triton")
    g = torch.randn_like(a)
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    assert torch.equal(a, b) and not b.is_contiguous()


def test_launch_table_bytes():
    """What the cached plan of one launch holds on the device: 8 bytes per pointer, numel pair, block-table
    entry and segment pair, and the tensors' positions (counted by offloading's memory budget)."""
    launcher = optim.AdamW.variants[""].triton_launcher
    launcher._plans.clear()
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(3000,), (5000, 3), (7,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    optim.AdamW(params, backend="triton").step()
    n, blocks = 3, sum(-(-p.numel() // launcher.block) for p in params)
    expected = 8 * (len(optim.AdamW.buffers) * n + 2 * n + blocks + 2 * n) + 8 * n
    assert launcher.table_bytes() == expected
