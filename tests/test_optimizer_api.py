"""The optimizer classes as ``torch.optim.Optimizer``s: validation, groups, closures, schedulers, checkpoints.

Numerical checks compare with ``torch.optim`` on fresh random data: ``max|ours - ref| <= 1e-6 * max|ref|``
per tensor, NaN/inf failing (``assert_rel``). Checkpoint round trips are compared bitwise.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch

import optgen
from optgen.optim import SGD, Adam, AdamW, Lion

ROOT = Path(__file__).resolve().parent.parent
REL = 1e-6


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert ours.shape == ref.shape, what
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all(), f"{what}: not finite"
    if ref.numel() == 0:
        return
    scale = ref.double().abs().max().item()
    assert scale > 0, f"{what}: all-zero reference"
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= REL * scale, f"{what}: max abs error {err:.3e} > {REL:g} * {scale:.3e}"


# Where a test of the Triton backend puts its tensors: the GPU where there is one, else the CPU (the interpreter)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def rand_params(seed: int, shapes=((3, 4), (5,), ()), dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


def clones(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def give_grads(gen: torch.Generator, *param_lists: list[torch.Tensor]) -> None:
    for same in zip(*param_lists):
        g = torch.randn(same[0].shape, generator=gen).to(same[0].device, same[0].dtype)
        for p in same:
            p.grad = g.clone()


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """Everything an optimizer holds (params, grads, states, hyper-parameters), deep-copied."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else (p.grad.layout, p.grad.to_dense().clone()) for p in params],
        "state": [
            {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None for p in params
        ],
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "group_params": [[id(p) for p in g["params"]] for g in opt.param_groups],
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    """Bitwise equal, dtypes included."""
    assert a["group_params"] == b["group_params"]
    assert a["groups"] == b["groups"]
    for x, y in zip(a["params"], b["params"], strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or (
            x[0] == y[0] and x[1].dtype == y[1].dtype and torch.equal(x[1], y[1])
        )
    for x, y in zip(a["state"], b["state"], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------ constructor checks
@pytest.mark.parametrize(
    "cls, kwargs, fragment",
    [
        (AdamW, {"lr": -1e-3}, "lr"),
        (AdamW, {"lr": float("nan")}, "lr"),
        (AdamW, {"lr": torch.tensor(float("nan"))}, "lr"),
        (AdamW, {"lr": -math.inf}, "lr"),
        (AdamW, {"betas": (1.0, 0.999)}, "betas"),
        (AdamW, {"betas": (0.9, 1.0)}, "betas"),
        (AdamW, {"betas": (-0.1, 0.999)}, "betas"),
        (AdamW, {"betas": (0.9, -0.1)}, "betas"),
        (AdamW, {"betas": (0.9,)}, "betas"),
        (AdamW, {"eps": -1e-8}, "eps"),
        (AdamW, {"weight_decay": -0.1}, "weight_decay"),
        (AdamW, {"lr": "0.1"}, "lr"),
        (Adam, {"lr": -1e-3}, "lr"),
        (Adam, {"betas": (0.9, 1.0)}, "betas"),
        (Adam, {"eps": -1.0}, "eps"),
        (Lion, {"lr": -1e-4}, "lr"),
        (Lion, {"betas": (1.0, 0.99)}, "betas"),
        (Lion, {"betas": (0.9, -0.1)}, "betas"),
        (SGD, {"lr": -0.1}, "lr"),
        (SGD, {"momentum": -0.9}, "momentum"),
        (SGD, {"nesterov": 1}, "nesterov"),
        (SGD, {"nesterov": "yes"}, "nesterov"),
        (SGD, {"nesterov": True, "momentum": 0.0}, "Nesterov"),  # the spec's check
        (SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov"),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_constructor_rejects_bad_hyperparameters(cls, kwargs, fragment):
    p = rand_params(0)
    before = [x.detach().clone() for x in p]
    with pytest.raises(ValueError, match=fragment):
        cls(p, **kwargs)
    for x, y in zip(p, before):
        assert torch.equal(x, y) and x.grad is None


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(3, dtype=torch.int64),
        torch.ones(3, dtype=torch.int32),
        torch.randn(3, dtype=torch.complex64, requires_grad=True),
    ],
    ids=["int64", "int32", "complex64"],
)
def test_constructor_rejects_integer_and_complex_parameters(bad):
    with pytest.raises(ValueError, match=str(bad.dtype).removeprefix("torch.")):
        AdamW([rand_params(1)[0], bad])


def test_parameter_listed_twice():
    p, q = rand_params(2, shapes=((3,), (4,)))
    with pytest.raises(ValueError, match="twice"):
        AdamW([p, q, p])
    with pytest.raises(ValueError, match="more than one parameter group"):
        AdamW([{"params": [p]}, {"params": [q, p]}])


def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty"):
        SGD([])


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        AdamW(rand_params(3), backend="cuda")


@pytest.mark.parametrize(
    "group, fragment",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": float("nan")}, "eps"),
        ({"params_dtype": torch.int64}, "int64"),
        ({"duplicate": True}, "more than one parameter group"),
        ({"twice": True}, "twice"),
        ({"maximize": True}, "does not implement torch.optim's 'maximize' option"),
        ({"amsgrad": True}, "does not implement torch.optim's 'amsgrad' option"),
    ],
)
def test_add_param_group_is_validated(group, fragment):
    group = dict(group)
    params = rand_params(4)
    opt = AdamW(params[:2], lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    give_grads(gen, params[:2])
    opt.step()
    before = snapshot(opt)
    new = rand_params(5, shapes=((2,),))
    if group.pop("params_dtype", None) is not None:
        new = [torch.ones(2, dtype=torch.int64)]
    if group.pop("duplicate", False):
        new = [params[0]]
    if group.pop("twice", False):
        new = [params[2], params[2]]
    with pytest.raises(ValueError, match=fragment):
        opt.add_param_group({"params": new, **group})
    assert len(opt.param_groups) == 1
    assert_same_snapshot(snapshot(opt), before)


def test_named_parameters_numpy_scalars_and_sets_as_torch_takes_them():
    """``model.named_parameters()`` keeps the names in the group (and the state_dict), numpy scalars are numbers,
    and a param group holding a set of parameters (no stable order) is refused, as in torch.optim."""
    np = pytest.importorskip("numpy")
    model = torch.nn.Linear(3, 2)
    opt = AdamW(model.named_parameters(), lr=np.float32(1e-2), betas=(np.float64(0.9), 0.99))
    ref = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == ["weight", "bias"]
    assert opt.param_groups[0]["params"] == list(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    with pytest.raises(TypeError, match="sets will change between runs"):
        AdamW([{"params": set(model.parameters())}])


# ------------------------------------------------------------------------------------ sparse gradients
def test_sparse_gradient_is_rejected_and_changes_nothing():
    p, q = rand_params(6, shapes=((4, 3), (5,)))
    opt = AdamW([{"params": [q]}, {"params": [p], "lr": 0.1}])
    gen = torch.Generator().manual_seed(6)
    give_grads(gen, [p, q])
    opt.step()  # states exist
    give_grads(gen, [p, q])
    p.grad = p.grad.to_sparse()  # the second group's gradient is sparse; the first group's is fine
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_same_snapshot(snapshot(opt), before)


def test_sparse_gradient_before_any_state():
    (p,) = rand_params(7, shapes=((4, 3),))
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(4, 3).to_sparse()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before)
    assert not opt.state.get(p)


@pytest.mark.parametrize("change", ["cut", "complex", "bool"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_gradient_changed_through_data_is_refused_and_changes_nothing(backend, change):
    """``p.grad.data = x`` skips torch's checks of a gradient's shape and dtype; the kernels take addresses and
    would read past the end of a cut one, and load no complex or bool values. The second group's gradient is
    changed: nothing is stepped, not even the first group."""
    p, q = rand_params(6, shapes=((4, 3), (5,)), device=device_for(backend))
    opt = AdamW([{"params": [q]}, {"params": [p], "lr": 0.1}], backend=backend)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):  # the second step is a planned one on the Triton backend
        give_grads(gen, [p, q])
        opt.step()
    give_grads(gen, [p, q])
    if change == "cut":
        p.grad.data = p.grad.data.reshape(-1)[:5].clone()
        match = rf"the gradient of parameter 1 is a torch.float32 tensor of shape \(5,\) on {p.device}, the parameter"
    else:
        p.grad.data = p.grad.data.to(torch.complex64 if change == "complex" else torch.bool)
        match = f"the gradient of parameter 1 is a torch.{'complex64' if change == 'complex' else 'bool'} tensor"
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_same_snapshot(snapshot(opt), before)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_parameter_changed_to_a_dtype_the_spec_does_not_store_is_refused(backend):
    """The constructor refuses a float64 parameter for AdamW; one made float64 through ``p.data`` later is refused
    by the step, before any change."""
    p, q = rand_params(33, shapes=((4, 3), (5,)), device=device_for(backend))
    opt = AdamW([p, q], lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(33)
    for _ in range(2):
        give_grads(gen, [p, q])
        opt.step()
    q.data = q.data.double()
    give_grads(gen, [p, q])
    before = snapshot(opt)
    with pytest.raises(ValueError, match="stores parameters as bfloat16 or float16 or float32; got a float64 parameter"):
        opt.step()
    assert_same_snapshot(snapshot(opt), before)


def test_triton_backend_without_a_gpu_or_the_interpreter_is_refused_before_any_change(monkeypatch):
    (p,) = rand_params(34, shapes=((4, 3),))
    opt = AdamW([p], lr=1e-2, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    give_grads(torch.Generator().manual_seed(34), [p])
    before = p.detach().clone()
    for _ in range(2):  # refused each time, the step count never advanced
        with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
            opt.step()
    assert torch.equal(p, before) and not opt.state.get(p)


@pytest.mark.parametrize("key, bad", [("lr", "0.001"), ("lr", None), ("lr", torch.tensor([1e-3, 2e-3])),
                                      ("betas", (0.9,))], ids=["str", "None", "2-element", "1-beta"])
@pytest.mark.parametrize("prepared", [False, True], ids=["general", "prepared"])
def test_a_hyperparameter_set_badly_between_steps_is_refused_before_any_change(key, bad, prepared):
    """As a scheduler writes ``group["lr"]``: the second group's value cannot be used; the first group is not
    stepped either (the general path checks every group first, a prepared step makes every group's scalars
    before its first launch)."""
    p, q = rand_params(32, shapes=((4, 3), (5,)), device=TRITON_DEVICE)
    opt = AdamW([{"params": [p]}, {"params": [q]}], lr=1e-2, backend="triton")
    gen = torch.Generator().manual_seed(32)
    for _ in range(2 if prepared else 0):
        give_grads(gen, [p, q])
        opt.step()
    give_grads(gen, [p, q])
    opt.param_groups[1][key] = bad
    before = {**snapshot(opt), "groups": None}  # (a tensor of two values cannot be compared with ==)
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.step()
    assert_same_snapshot({**snapshot(opt), "groups": None}, before)
    assert opt.param_groups[1][key] is bad


# ------------------------------------------------------------------------------------ states set by hand
def _bad_state(state: dict, change: str) -> None:
    m = state["m"]
    if change == "dtype":  # another dtype, same shape (a float32 state where int8 codes belong, or float64)
        state["m"] = m.to(torch.float64 if m.dtype == torch.float32 else torch.float32)
    elif change == "view":  # the same storage seen as another dtype: the same address
        m.data = m.data.view(torch.int32 if m.dtype == torch.float32 else torch.uint8)
    elif change == "smaller":  # the kernels would write past its end
        state["m"] = m.reshape(-1)[: m.numel() // 2].clone()
    elif change == "missing":
        del state["m"]
    else:  # not a tensor
        state["m"] = m.tolist()


@pytest.mark.parametrize("change", ["dtype", "view", "smaller", "missing", "list"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("spec", ["AdamW", "FlashAdamW"])
def test_a_state_set_by_hand_that_does_not_fit_is_refused_before_any_change(spec, backend, change):
    """The Triton kernels take the states' addresses: a state that does not fit its parameter would be read as
    garbage or written past its end. Every step (planned ones too) refuses it with the key and the parameter's
    index, before anything changes."""
    from optgen import optim

    cls = getattr(optim, spec)
    dtype = getattr(torch, cls.param_dtypes[0])
    params = rand_params(30, shapes=((64, 80), (96,)), dtype=dtype, device=device_for(backend))
    opt = cls([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.1}], lr=1e-2, backend=backend,
              min_quantized_size=64)
    gen = torch.Generator().manual_seed(30)
    for _ in range(2):  # the second step is a planned one on the Triton backend
        give_grads(gen, params)
        opt.step()
    give_grads(gen, params)
    _bad_state(opt.state[params[1]], change)
    before = [(p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()})
              for p in params]
    with pytest.raises(ValueError, match=r"state 'm' of parameter 1: expected a torch\.(float32|int8) tensor of "
                                         rf"shape \(96,\) on {params[1].device}, got "):
        opt.step()
    for p, (value, state) in zip(params, before):
        assert torch.equal(p, value) and state.keys() == opt.state[p].keys()
        for k, v in state.items():
            assert torch.equal(v, opt.state[p][k]) if isinstance(v, torch.Tensor) else v == opt.state[p][k]


def test_a_state_made_for_another_layout_is_refused_until_it_is_started_afresh():
    """``min_quantized_size`` chooses a parameter's layout when its state is made: raised afterwards, it makes the
    existing 8-bit state the wrong one, which the step refuses; a state deleted starts again in the new layout."""
    from optgen.optim import FlashAdamW

    (p,) = rand_params(31, shapes=((64, 80),), dtype=torch.bfloat16)
    opt = FlashAdamW([p], lr=1e-2, min_quantized_size=64)
    gen = torch.Generator().manual_seed(31)
    give_grads(gen, [p])
    opt.step()
    assert opt.state[p]["m"].dtype == torch.int8
    opt.min_quantized_size = 10**6
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"state 'm' of parameter 0: expected a torch\.float32 tensor of shape "
                                         r"\(64, 80\) on cpu, got a torch\.int8 tensor"):
        opt.step()
    assert_same_snapshot(snapshot(opt), before)
    del opt.state[p]
    opt.step()
    assert opt.state[p]["m"].dtype == torch.float32 and float(opt.state[p]["step"]) == 1.0


# ------------------------------------------------------------------------------------ groups and steps
def test_param_groups_take_defaults_and_per_group_values():
    a, b = rand_params(8), rand_params(9)
    opt = AdamW([{"params": a}, {"params": b, "lr": 0.1, "betas": (0.8, 0.9)}], lr=1e-2, weight_decay=0.05)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["betas"] == (0.8, 0.9)
    assert opt.param_groups[1]["weight_decay"] == 0.05
    ra, rb = clones(a), clones(b)
    ref = torch.optim.AdamW(
        [{"params": ra}, {"params": rb, "lr": 0.1, "betas": (0.8, 0.9)}],
        lr=1e-2,
        weight_decay=0.05,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(8)
    for _ in range(10):
        give_grads(gen, a + b, ra + rb)
        opt.step()
        ref.step()
    for x, y in zip(a + b, ra + rb):
        assert_rel(x.detach(), y.detach())


def test_add_param_group_mid_training_matches_torch():
    a, b = rand_params(10), rand_params(11, shapes=((6,), (2, 2)))
    ra, rb = clones(a), clones(b)
    opt = Adam(a, lr=1e-2)
    ref = torch.optim.Adam(ra, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(10)
    for step in range(8):
        if step == 3:
            opt.add_param_group({"params": b, "lr": 3e-2, "weight_decay": 0.1})
            ref.add_param_group({"params": rb, "lr": 3e-2, "weight_decay": 0.1})
        params, refs = (a, ra) if step < 3 else (a + b, ra + rb)
        give_grads(gen, params, refs)
        opt.step()
        ref.step()
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)  # the defaults fill the new group
    for x, y in zip(a + b, ra + rb):
        assert_rel(x.detach(), y.detach())


def test_closure_is_called_once_and_its_loss_returned():
    gen = torch.Generator().manual_seed(12)
    x, target = torch.randn(16, 3, generator=gen), torch.randn(16, generator=gen)
    w = torch.randn(3, generator=gen, requires_grad=True)
    rw = w.detach().clone().requires_grad_()
    opt, ref = AdamW([w], lr=0.05), torch.optim.AdamW([rw], lr=0.05, foreach=False)
    calls, returned = [], {}

    def make_closure(weight, optimizer, tag):
        def closure():
            calls.append(tag)
            optimizer.zero_grad()
            loss = ((x @ weight - target) ** 2).mean()
            loss.backward()
            returned[tag] = loss
            return loss

        return closure

    for _ in range(5):
        loss = opt.step(make_closure(w, opt, "ours"))
        ref_loss = ref.step(make_closure(rw, ref, "ref"))
        assert loss is returned["ours"]  # step returns the closure's own loss
        assert_rel(loss.detach(), ref_loss.detach(), "loss")
        assert_rel(w.detach(), rw.detach())
    assert calls.count("ours") == 5
    assert opt.step() is None  # no closure: returns None


def test_zero_grad_and_parameters_without_gradient():
    p, q = rand_params(13, shapes=((4,), (3,)))
    opt = SGD([p, q], lr=0.1, momentum=0.9)
    p.grad, q.grad = torch.randn(4), torch.randn(3)
    opt.zero_grad()
    assert p.grad is None and q.grad is None
    p.grad, q.grad = torch.randn(4), torch.randn(3)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(4)) and torch.equal(q.grad, torch.zeros(3))
    opt.zero_grad()
    q_before = q.detach().clone()
    p_before = p.detach().clone()
    g = torch.randn(4)
    p.grad = g.clone()
    opt.step()  # q has no gradient: untouched, and gets no state
    assert torch.equal(q, q_before) and not opt.state.get(q)
    assert_rel(p.detach(), p_before - 0.1 * g)  # first SGD step: the momentum buffer is the gradient


def test_parameters_at_different_step_counts_match_torch():
    """Parameters that missed steps have smaller step counts (bias corrections): they are stepped in their own
    launch, and the cached grouping of a group's parameters follows which of them have gradients."""
    params = rand_params(15, shapes=((3, 4), (5,), (2, 3), ()))
    refs = clones(params)
    opt = AdamW(params, lr=0.02, weight_decay=0.1)
    ref = torch.optim.AdamW(refs, lr=0.02, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(15)
    for k in range(8):
        give_grads(gen, params, refs)
        if k in (1, 2, 5):  # some parameters miss this step
            for x, y in list(zip(params, refs))[k % 2::2]:
                x.grad = y.grad = None
        opt.step()
        ref.step()
        for x, y in zip(params, refs):
            assert_rel(x.detach(), y.detach())
    counts = {float(opt.state[x]["step"]) for x in params}
    assert len(counts) > 1 and counts == {float(ref.state[y]["step"]) for y in refs}


def test_layout_follows_the_fp32_mark_after_a_reload():
    """Which layout a parameter takes is derived again when what decides it changes: here a parameter marked
    for fp32 state after its first step, its state then loaded from an optimizer that holds it in fp32. The
    next steps use the fp32 layout and equal that optimizer's."""
    from optgen.optim import AdamW8bit

    gen = torch.Generator().manual_seed(16)
    p = torch.nn.Parameter(torch.randn(8192, generator=gen))
    opt = AdamW8bit([p], lr=1e-2)
    p.grad = torch.randn(8192, generator=gen)
    opt.step()
    assert "m_absmax" in opt.state[p]  # the 8-bit layout
    p.optgen_fp32_state = True
    q = torch.nn.Parameter(p.detach().clone())
    q.optgen_fp32_state = True
    ref = AdamW8bit([q], lr=1e-2)
    q.grad = torch.randn(8192, generator=gen)
    ref.step()
    opt.load_state_dict(ref.state_dict())
    with torch.no_grad():
        p.copy_(q)
    for _ in range(2):
        p.grad = torch.randn(8192, generator=gen)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert "m_absmax" not in opt.state[p] and opt.state[p]["m"].dtype == torch.float32
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("scheduler", ["step", "lambda"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_lr_schedulers_match_torch(scheduler, tensor_lr):
    params = rand_params(14)
    refs = clones(params)
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    ref_lr = torch.tensor(0.02) if tensor_lr else 0.02
    opt = AdamW(params, lr=lr, weight_decay=0.1)
    ref = torch.optim.AdamW(refs, lr=ref_lr, weight_decay=0.1, foreach=False)

    def make(o):
        if scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        return torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch) ** 2)

    sched, ref_sched = make(opt), make(ref)
    gen = torch.Generator().manual_seed(14)
    lrs = []
    for _ in range(8):
        give_grads(gen, params, refs)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
        assert float(opt.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"])
        for x, y in zip(params, refs):
            assert_rel(x.detach(), y.detach())
    assert len(set(lrs)) >= 4  # the schedule really changed lr
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr


def test_tensor_lr_matches_float_lr_reference():
    params = rand_params(15)
    refs = clones(params)
    opt = Lion(params, lr=torch.tensor(1e-2), betas=(0.9, 0.99), weight_decay=0.1)
    lr64 = float(torch.tensor(1e-2))  # the fp32 value the tensor holds
    gen = torch.Generator().manual_seed(15)
    ms = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    ref64 = [p.detach().double() for p in refs]
    for _ in range(10):
        give_grads(gen, params)
        for i, p in enumerate(params):
            g = p.grad.double()
            c = 0.9 * ms[i] + 0.1 * g
            ref64[i] = ref64[i] - lr64 * (torch.sign(c) + 0.1 * ref64[i])
            ms[i] = 0.99 * ms[i] + 0.01 * g
        opt.step()
    for x, y in zip(params, ref64):
        assert_rel(x.detach(), y)


# ------------------------------------------------------------------------------------ checkpoints
def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _through_disk(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CHECKPOINT_CASES = [
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1}, torch.float32),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1}, torch.bfloat16),
    (SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, torch.float32),
    (Lion, {"lr": 1e-3}, torch.bfloat16),
    (Adam, {"lr": 1e-2}, torch.float16),
]


@pytest.mark.parametrize(
    "cls, hp, dtype",
    CHECKPOINT_CASES,
    ids=lambda x: x.__name__ if isinstance(x, type) else str(x).removeprefix("torch."),
)
def test_state_dict_round_trip_is_exact(cls, hp, dtype):
    """Save after k steps, load into a fresh optimizer over cloned params, continue both: bitwise equal."""
    params = rand_params(16, dtype=dtype)
    extra = rand_params(17, shapes=((2, 5),), dtype=dtype)
    opt = cls([{"params": params}, {"params": extra, "lr": hp["lr"] * 3}], **hp)
    gen = torch.Generator().manual_seed(16)
    _train(opt, params + extra, gen, 3)
    sd = _through_disk(opt.state_dict())
    assert sd["optgen"]["spec"] == cls.spec_name
    params2, extra2 = clones(params), clones(extra)
    opt2 = cls([{"params": params2}, {"params": extra2}], **hp)  # the saved group lr must come back
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lr"] == hp["lr"] * 3
    for p in params2 + extra2:
        for key, value in opt2.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32, f"state {key} was cast to {value.dtype}"
    gen_a, gen_b = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    _train(opt, params + extra, gen_a, 4)
    _train(opt2, params2 + extra2, gen_b, 4)
    assert_same_snapshot({**snapshot(opt), "group_params": None}, {**snapshot(opt2), "group_params": None})
    assert opt.state[params[0]]["step"].item() == 7


def test_load_state_dict_keeps_fp32_states_with_bf16_params():
    """torch's own loader casts floating states to the parameter's dtype; optgen's must not."""
    params = rand_params(18, dtype=torch.bfloat16)
    opt = AdamW(params, lr=1e-2)
    _train(opt, params, torch.Generator().manual_seed(18), 2)
    sd = _through_disk(opt.state_dict())
    plain = AdamW(clones(params), lr=1e-2)
    torch.optim.Optimizer.load_state_dict(plain, sd)  # what the base class alone would do
    assert {v.dtype for s in plain.state.values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
    fresh_params = clones(params)
    fresh = AdamW(fresh_params, lr=1e-2)
    fresh.load_state_dict(sd)
    for p, q in zip(params, fresh_params):
        for key in ("m", "v"):
            assert fresh.state[q][key].dtype == torch.float32
            assert torch.equal(fresh.state[q][key], opt.state[p][key])


def test_state_dict_round_trip_in_memory():
    params = rand_params(19)
    opt = AdamW(params, lr=1e-2)
    _train(opt, params, torch.Generator().manual_seed(19), 3)
    params2 = clones(params)
    opt2 = AdamW(params2, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    _train(opt, params, torch.Generator().manual_seed(5), 2)
    _train(opt2, params2, torch.Generator().manual_seed(5), 2)
    assert opt.state[params[0]]["step"].item() == 5
    assert_same_snapshot({**snapshot(opt), "group_params": None}, {**snapshot(opt2), "group_params": None})


def _corrupt(kind: str, sd: dict) -> dict:
    sd = copy.deepcopy(sd)
    state0 = sd["state"][0]
    if kind == "shape":
        state0["m"] = torch.randn(7)
    elif kind == "dtype":
        state0["v"] = state0["v"].double()
    elif kind == "dtype_bf16":
        state0["m"] = state0["m"].to(torch.bfloat16)
    elif kind == "missing_key":
        del state0["v"]
    elif kind == "extra_key":
        state0["exp_avg"] = state0["m"].clone()
    elif kind == "renamed_key":
        state0["exp_avg_sq"] = state0.pop("v")
    elif kind == "group_count":
        sd["param_groups"] = sd["param_groups"][:1]
    elif kind == "param_count":
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:-1]
    elif kind == "unknown_index":
        sd["state"][42] = copy.deepcopy(state0)
    elif kind == "bad_hyperparameter":
        sd["param_groups"][0]["lr"] = -1.0
    elif kind == "missing_hyperparameter":
        del sd["param_groups"][0]["betas"]
    elif kind == "other_spec":
        sd["optgen"]["spec"] = "lion"
    elif kind == "step_not_a_tensor":
        state0["step"] = 2
    elif kind == "step_nan":
        state0["step"] = torch.tensor(float("nan"))
    elif kind == "step_shape":  # one element, but not 0-d: every count would become a list
        state0["step"] = state0["step"].reshape(1)
    elif kind == "step_fraction":
        state0["step"] = torch.tensor(2.5)
    elif kind == "not_a_state_dict":
        sd = {"weights": sd["state"]}
    return sd


CORRUPTIONS = [
    "shape",
    "dtype",
    "dtype_bf16",
    "missing_key",
    "extra_key",
    "renamed_key",
    "group_count",
    "param_count",
    "unknown_index",
    "bad_hyperparameter",
    "missing_hyperparameter",
    "other_spec",
    "not_a_state_dict",
    "step_not_a_tensor",
    "step_nan",
    "step_shape",
    "step_fraction",
]


def _trained_adamw(seed: int):
    params, extra = rand_params(seed), rand_params(seed + 1, shapes=((2, 2), (3,)))
    opt = AdamW([{"params": params}, {"params": extra, "lr": 0.1}], lr=1e-2)
    _train(opt, params + extra, torch.Generator().manual_seed(seed), 2)
    return opt


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_load_state_dict_rejects_mismatch_and_changes_nothing(kind):
    good = _through_disk(_trained_adamw(20).state_dict())
    target = _trained_adamw(30)  # a trained optimizer with different values: nothing of it may change
    before = snapshot(target)
    with pytest.raises(ValueError):
        target.load_state_dict(_corrupt(kind, good))
    assert_same_snapshot(snapshot(target), before)
    target.load_state_dict(good)  # the uncorrupted one loads (so the failure above was the corruption)
    assert torch.equal(target.state[target.param_groups[0]["params"][0]]["m"], good["state"][0]["m"])


@pytest.mark.parametrize("top_level", [True, False], ids=["whole", "as-DCP-gives-it"])
def test_load_state_dict_from_another_spec_is_rejected(top_level):
    """SGD and Lion both keep one fp32 state 'm' per parameter: only the spec name tells them apart. DCP's
    ``get_optimizer_state_dict`` keeps only 'state' and 'param_groups': each group names the spec too."""
    params = rand_params(21)
    sgd = SGD(params, lr=0.1, momentum=0.9)
    _train(sgd, params, torch.Generator().manual_seed(21), 2)
    lion_params = clones(params)
    lion = Lion(lion_params, lr=1e-3)
    _train(lion, lion_params, torch.Generator().manual_seed(22), 1)
    before = snapshot(lion)
    saved = sgd.state_dict()
    if not top_level:
        del saved["optgen"]
    with pytest.raises(ValueError, match="sgd"):
        lion.load_state_dict(_through_disk(saved))
    assert_same_snapshot(snapshot(lion), before)


def test_the_seed_is_restored_from_a_state_dict_as_dcp_gives_it():
    """StochasticAdamW's rounding bits come from its seed: a state_dict without its top-level 'optgen' entry
    (DCP's) still restores it, so the resumed step is the same step, bit for bit."""
    from optgen.optim import StochasticAdamW

    params = rand_params(25, shapes=((8, 8), (8,)), dtype=torch.bfloat16)
    opt = StochasticAdamW(params, lr=1e-2, seed=123)
    gen = torch.Generator().manual_seed(25)
    _train(opt, params, gen, 1)
    saved = _through_disk(opt.state_dict())
    del saved["optgen"]
    resumed_params = clones(params)
    resumed = StochasticAdamW(resumed_params, lr=1e-2, seed=999)
    resumed.load_state_dict(saved)
    assert resumed.seed == 123 and "optgen" not in resumed.param_groups[0]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    for p, q, g in zip(params, resumed_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))


def test_load_state_dict_hooks_run_as_torch_runs_them():
    """A pre-hook runs before anything is checked (it may convert the dict) and what it changes is loaded; a
    post-hook sees the states as loaded, in their saved dtypes (FlashAdamW's int8 codes, not torch's cast)."""
    from optgen.optim import FlashAdamW

    params = rand_params(26, shapes=((64, 80),), dtype=torch.bfloat16)
    opt = FlashAdamW(params, lr=1e-2, min_quantized_size=64)
    _train(opt, params, torch.Generator().manual_seed(26), 2)
    saved = _through_disk(opt.state_dict())
    renamed = {**saved, "state": {i: {("moment" if k == "m" else k): v for k, v in s.items()}
                                  for i, s in saved["state"].items()}}

    def convert(optimizer, state_dict):  # a user's converter from another layout
        state_dict["state"] = {i: {("m" if k == "moment" else k): v for k, v in s.items()}
                               for i, s in state_dict["state"].items()}
        state_dict["param_groups"][0]["lr"] = 0.5

    seen = {}
    target = FlashAdamW(clones(params), lr=1e-2, min_quantized_size=64)
    target.register_load_state_dict_pre_hook(convert)
    target.register_load_state_dict_post_hook(
        lambda optimizer: seen.update({k: v.dtype for k, v in optimizer.state[optimizer.param_groups[0]["params"][0]].items()}))
    target.load_state_dict(renamed)
    assert target.param_groups[0]["lr"] == 0.5 and seen["m"] == torch.int8 and seen["v"] == torch.uint8
    assert torch.equal(target.state[target.param_groups[0]["params"][0]]["m"], saved["state"][0]["m"])


def test_a_never_stepped_parameter_with_an_empty_state_entry_round_trips():
    """Reading ``optimizer.state[p]`` (a defaultdict) files an empty dict for a parameter never stepped; torch
    saves and loads it, and so does optgen. Its own exports do not file one."""
    params = rand_params(27)
    opt = AdamW(params, lr=1e-2)
    _train(opt, params[:2], torch.Generator().manual_seed(27), 1)
    params[2].grad = None
    opt.master_weights()
    opt.torch_state_dict()
    assert params[2] not in opt.state
    assert opt.state[params[2]] == {}
    saved = _through_disk(opt.state_dict())
    assert saved["state"][2] == {}
    target = AdamW(clones(params), lr=1e-2)
    target.load_state_dict(saved)
    assert sorted(target.state[target.param_groups[0]["params"][0]]) == ["m", "step", "v"]


def test_load_torch_adamw_state_dict_is_rejected():
    """A torch.optim.AdamW checkpoint has other state keys (exp_avg, ...): a clear error, nothing changed."""
    params = rand_params(23)
    ref = torch.optim.AdamW(clones(params), lr=1e-2)
    _train(ref, ref.param_groups[0]["params"], torch.Generator().manual_seed(23), 1)
    opt = AdamW(params, lr=1e-2)
    _train(opt, params, torch.Generator().manual_seed(24), 1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(ref.state_dict())
    assert_same_snapshot(snapshot(opt), before)


# ------------------------------------------------------------------------------------ optgen.load, sizes
def test_optgen_load_of_a_renamed_adamw_spec_matches_torch(tmp_path):
    text = (ROOT / "specs" / "adamw.yaml").read_text()
    assert "name: adamw\n" in text and "class: AdamW\n" in text
    spec = tmp_path / "my_adamw.yaml"
    spec.write_text(
        text.replace("name: adamw\n", "name: my_adamw\n").replace("class: AdamW\n", "class: MyAdamW\n")
    )
    cls = optgen.load(spec)
    assert cls.__name__ == "MyAdamW" and issubclass(cls, torch.optim.Optimizer)
    assert optgen.load(spec) is cls  # loading twice: the same class (and one registered op)
    assert optgen.load(str(spec)) is cls
    params = rand_params(25, shapes=((4, 3), (), (0, 2)))
    refs = clones(params)
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(25)
    for _ in range(20):
        give_grads(gen, params, refs)
        opt.step()
        ref.step()
    for x, y in zip(params, refs):
        assert_rel(x.detach(), y.detach())


@pytest.mark.parametrize(
    "cls, dtype, expected",
    [
        (AdamW, torch.float32, 16),
        (AdamW, torch.bfloat16, 12),
        (Adam, torch.float32, 16),
        (SGD, torch.float32, 12),
        (Lion, torch.float32, 12),
        (Lion, torch.float16, 8),
    ],
)
def test_bytes_per_element_matches_memory_held(cls, dtype, expected):
    """Bytes per element = (param + grad + every per-element state tensor).nbytes / numel.

    The 0-d ``step`` counter (4 bytes per parameter *tensor*, not per element) is left out. ``moved``
    (bytes one step reads + writes) is checked by observing which buffers a step actually changes.
    """
    (p,) = rand_params(26, shapes=((8, 16),), dtype=dtype)
    opt = cls([p], lr=1e-3)
    gen = torch.Generator().manual_seed(26)
    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step()
    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    held = {"param": p, "grad": p.grad, **{k: v for k, v in opt.state[p].items() if k != "step"}}
    for k, v in held.items():
        assert v.shape == p.shape, k
    total = sum(t.element_size() * t.numel() for t in held.values())
    assert cls.bytes_per_element(dtype) == total / p.numel() == expected
    before = {k: v.detach().clone() for k, v in held.items()}
    opt.step()
    written = [k for k in held if not torch.equal(before[k], held[k])]
    assert "param" in written and "grad" not in written
    moved = total + sum(held[k].element_size() * held[k].numel() for k in written)
    assert cls.bytes_per_element(dtype, moved=True) == moved / p.numel()


def test_state_named_like_a_local_of_the_generated_code(tmp_path):
    """A state may be called ``n`` (Adan's name for its third moment): the generated init must not shadow it."""
    spec = tmp_path / "nstate.yaml"
    spec.write_text("""name: nstate
class: NState
hyperparams:
  lr: {default: 1.0e-3, range: "[0, inf)"}
param: {storage: native}
grad: {storage: native}
state:
  n: {storage: q8_softsign}
update: |
  n = 0.5*n + g
  p = p - lr*n
""")
    cls = optgen.load(spec)
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    p.grad = torch.randn(5000, generator=gen)
    want = p.detach().double() - 0.1 * p.grad.double()  # n starts at 0: the first step moves p by lr*g
    cls([p], lr=0.1).step()
    assert float((p.detach().double() - want).abs().max()) <= 0.1 * float(p.grad.abs().max()) / 127


def test_step_hooks_run_as_torch_runs_them():
    """Instance and global step hooks run once per step, in torch's order, with (optimizer, args, kwargs); a
    pre-hook may replace the arguments; torch does not wrap the step a second time."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = rand_params(11)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamW(params, lr=1e-2)
    assert type(opt).step is optgen.runtime.optimizer.OptgenOptimizer.step  # not re-wrapped by torch
    calls, losses = [], []

    def closure():
        losses.append(1.0)
        return torch.tensor(3.0)

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", o, a[1:], k))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o, a[1:], k)) or ((a[0], closure), k)),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o, a[1:], k))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", o, a[1:], k))),
    ]
    try:
        before = [p.detach().clone() for p in params]
        loss = opt.step()
    finally:
        for h in handles:
            h.remove()
    assert [c[0] for c in calls] == ["global pre", "pre", "post", "global post"]
    assert all(c[1] is opt for c in calls)
    assert calls[0][2] == () and calls[2][2] == (closure,)  # the post hooks see the replaced arguments
    assert losses == [1.0] and float(loss) == 3.0  # the step ran the closure the pre-hook put in
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    opt.step()
    assert len(calls) == 4  # removed hooks stay removed


def test_step_is_labelled_for_the_profiler():
    params = rand_params(12)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = AdamW(params, lr=1e-2)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#AdamW.step" for e in prof.events())


def test_step_hooks_run_once_through_a_subclass_step():
    """A subclass's own step() is wrapped by torch, which runs the hooks; the step it calls must not run them
    again."""

    class Subclassed(AdamW):
        def step(self, closure=None):
            return super().step(closure)

    params = rand_params(13)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Subclassed(params, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(how):
    """copy.deepcopy and pickle keep the settings (backend, seed, min_quantized_size) and the states; the copy
    then steps exactly as the original does."""
    from optgen.optim import StochasticAdamW

    gen = torch.Generator().manual_seed(14)
    params = [torch.randn(s, generator=gen).to(torch.bfloat16).requires_grad_() for s in ((64, 80), (33,))]
    opt = StochasticAdamW(params, lr=1e-2, backend="eager", seed=123, min_quantized_size=0)
    grads = [[torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params] for _ in range(3)]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert (twin.backend, twin.seed, twin.min_quantized_size) == ("eager", 123, 0)
    for step_grads in grads[1:]:
        for p, q, g in zip(params, twin_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], twin.state[q][k]), k
