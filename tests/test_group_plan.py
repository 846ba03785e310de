"""The prepared eager step (``optgen.runtime.group_plan``) against the general path, which it must equal bit for
bit: the same kernel runs either way. Every change the plan must notice is made to two optimizers, one stepping
with its plans and one whose plans are dropped before every step."""

import inspect
import os

import pytest
import torch

from optgen import optim
from optgen.runtime import group_plan
from optgen.runtime.launch import MultiTensorLauncher

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")

# 3001 and 2 are small enough for the fp32-state variant of the quantized specs: two launches per group
SHAPES = [(8, 8), (3001,), (5000,), (2,)]


@pytest.fixture(autouse=True, params=["whole", "split"])
def launches(request, monkeypatch):
    """Every test with each launch whole, and split as a large model's are (``split_min_tensors``), here with
    the launcher's thresholds lowered to these few small tensors: the largest tensor's programs first (5000 of
    SHAPES' 8067 elements), the other tensors' checks while they run."""
    if request.param == "split":
        monkeypatch.setattr(MultiTensorLauncher, "split_min_tensors", 2)
        monkeypatch.setattr(MultiTensorLauncher, "split_min_elements", 1)
    return request.param


class Twins:
    """Two optimizers over equal parameters: ``planned`` keeps its plans, ``general`` drops them every step."""

    def __init__(self, cls=optim.AdamW, shapes=SHAPES, dtype=torch.float32, group_per_param=False, **kwargs):
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
        self.a = [torch.nn.Parameter(x.clone()) for x in base]
        self.b = [torch.nn.Parameter(x.clone()) for x in base]
        accepted = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in {"seed": 3, **kwargs}.items() if k in accepted}

        def groups(params):  # per-layer learning rates: one group per parameter
            return [{"params": [p], "lr": 1e-3 * (k + 1)} for k, p in enumerate(params)] if group_per_param \
                else params
        self.planned = cls(groups(self.a), backend="triton", **kwargs)
        self.general = cls(groups(self.b), backend="triton", **kwargs)
        self.gen = gen
        self.general_path_calls = 0
        step_group = self.planned._step_group

        def counting(*args, **kw):
            self.general_path_calls += 1
            return step_group(*args, **kw)
        self.planned._step_group = counting

    def fresh_grads(self, in_place: bool = True) -> None:
        """New random gradients; ``in_place``: written into the existing ones, so their addresses stay."""
        for x, y in zip(self.a, self.b):
            g = torch.randn(x.shape, generator=self.gen).to(DEVICE, x.dtype)
            if in_place and x.grad is not None:
                x.grad.copy_(g)
                y.grad.copy_(g)
            else:
                x.grad, y.grad = g.clone(), g.clone()

    def run(self, steps: int = 1) -> None:
        """``steps`` steps of both, each with fresh gradients written in place."""
        for _ in range(steps):
            self.fresh_grads()
            self.step()

    def step(self) -> None:
        self.planned.step()
        self.general._plans.clear()
        self.general.step()

    def assert_equal(self) -> None:
        for x, y in zip(self.a, self.b):
            assert torch.equal(x, y)
            sa, sb = self.planned.state[x], self.general.state[y]
            assert sa.keys() == sb.keys()
            for k in sa:
                assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls", [optim.AdamW, optim.FlashAdamW, optim.StochasticAdamW, optim.AdamW8bit, optim.Lion,
                                 optim.Lamb, optim.Lamb16], ids=lambda c: c.__name__)
def test_planned_steps_equal_general_steps(cls):
    dtype = getattr(torch, cls.param_dtypes[0])
    twins = Twins(cls, dtype=dtype, min_quantized_size=4000)
    for _ in range(4):
        twins.fresh_grads()
        twins.step()
        twins.assert_equal()
    assert twins.general_path_calls == 1  # the first step; the other three ran the plan


def test_plan_follows_a_parameter_whose_storage_moved():
    twins = Twins()
    twins.run()
    for x, y in zip(twins.a[:2], twins.b[:2]):
        new = torch.randn(x.shape, generator=twins.gen).to(DEVICE)
        x.data, y.data = new.clone(), new.clone()
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == 2


def test_plan_follows_replaced_and_reset_states():
    twins = Twins()
    twins.run(2)
    x, y = twins.a[1], twins.b[1]
    replacement = torch.rand(x.shape, generator=twins.gen).to(DEVICE)
    twins.planned.state[x]["v"] = replacement.clone()
    twins.general.state[y]["v"] = replacement.clone()
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == 2
    twins.planned.state[twins.a[0]] = {}  # a reset: the next step starts this parameter's state again
    twins.general.state[twins.b[0]] = {}
    twins.run()
    twins.assert_equal()
    assert float(twins.planned.state[twins.a[0]]["step"]) == 1.0
    assert twins.general_path_calls == 3


def test_plan_follows_gradients_that_move_or_go():
    twins = Twins()
    twins.run()
    twins.fresh_grads(in_place=False)  # new gradient tensors; on a GPU usually at the old addresses
    twins.step()
    twins.assert_equal()
    before = twins.a[2].detach().clone()
    twins.fresh_grads()
    twins.a[2].grad = twins.b[2].grad = None  # a parameter without gradient is not stepped
    twins.step()
    twins.assert_equal()
    assert torch.equal(twins.a[2], before)


def test_plan_notices_a_strided_gradient_at_the_same_address():
    twins = Twins()
    twins.run()
    calls = twins.general_path_calls
    for x, y in zip(twins.a[:1], twins.b[:1]):  # (8, 8): the transposed view starts where the gradient does
        x.grad, y.grad = x.grad.t(), y.grad.t()
        assert not x.grad.is_contiguous()
    twins.step()
    twins.assert_equal()
    assert twins.general_path_calls == calls + 1


def test_sparse_gradient_is_refused_before_any_change():
    twins = Twins()
    twins.run()
    x = twins.a[1]
    before = [p.detach().clone() for p in twins.a], {k: v.clone() for k, v in twins.planned.state[x].items()}
    x.grad = torch.sparse_coo_tensor([[0, 5]], [1.0, 2.0], x.shape, device=DEVICE)
    with pytest.raises(RuntimeError, match="sparse"):
        twins.planned.step()
    assert all(torch.equal(p, q) for p, q in zip(twins.a, before[0]))
    assert all(torch.equal(twins.planned.state[x][k], v) for k, v in before[1].items())


def test_plan_follows_a_step_count_set_by_hand():
    twins = Twins()
    twins.run(2)
    twins.planned.state[twins.a[0]]["step"].fill_(10.0)  # in place: the plan still holds, the counts differ
    twins.general.state[twins.b[0]]["step"].fill_(10.0)
    twins.run()
    twins.assert_equal()
    assert float(twins.planned.state[twins.a[0]]["step"]) == 11.0
    assert float(twins.planned.state[twins.a[1]]["step"]) == 3.0


@pytest.mark.parametrize("through_data", [False, True])
def test_plan_follows_every_step_count_set_by_hand_to_one_value(through_data):
    """Every count set by hand to one new value (the counts agree, but not with the plan's last step), in place or
    through ``.data`` (which bumps no version counter), must still be read: the planned step reads them all."""
    twins = Twins()
    twins.run(2)
    for opt, params in ((twins.planned, twins.a), (twins.general, twins.b)):
        for x in params:
            (opt.state[x]["step"].data if through_data else opt.state[x]["step"]).fill_(100.0)
    twins.run(2)
    twins.assert_equal()
    assert twins.general_path_calls == 1
    assert all(float(twins.planned.state[x]["step"]) == 102.0 for x in twins.a)


def test_plan_follows_a_step_count_replaced_by_another_tensor():
    twins = Twins()
    twins.run(2)
    twins.planned.state[twins.a[1]]["step"] = torch.tensor(7.0)  # a new object: the plan's packed count is stale
    twins.general.state[twins.b[1]]["step"] = torch.tensor(7.0)
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == 2
    assert float(twins.planned.state[twins.a[1]]["step"]) == 8.0
    assert float(twins.planned.state[twins.a[0]]["step"]) == 3.0


def test_plan_follows_load_state_dict_and_backend():
    twins = Twins()
    twins.run()
    saved_a, saved_b = twins.planned.state_dict(), twins.general.state_dict()
    twins.run(2)
    twins.planned.load_state_dict(saved_a)
    twins.general.load_state_dict(saved_b)
    assert not twins.planned._plans.plans  # the plans held the replaced states
    twins.run()
    twins.assert_equal()
    calls = twins.general_path_calls
    twins.planned.backend = twins.general.backend = "eager"
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == calls + 1


def test_planned_step_bumps_version_counters():
    twins = Twins()
    twins.run()
    x = twins.a[0]
    versions = x._version, twins.planned.state[x]["m"]._version
    twins.fresh_grads()
    twins.planned.step()
    assert x._version > versions[0] and twins.planned.state[x]["m"]._version > versions[1]
    assert twins.general_path_calls == 1


def test_plan_reads_hyperparameters_and_groups_at_every_step():
    """A scheduler's new lr reaches the planned step; a second param group (its state added to the shared
    table) takes its own plan, and the first group's plan is rebuilt once."""
    twins = Twins(shapes=[(8, 8), (3001,)])
    twins.run()
    for opt in (twins.planned, twins.general):
        opt.param_groups[0]["lr"] = 3e-2
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == 1
    extra = torch.randn(40, generator=twins.gen).to(DEVICE)
    for opt, params in ((twins.planned, twins.a), (twins.general, twins.b)):
        params.append(torch.nn.Parameter(extra.clone()))
        opt.add_param_group({"params": [params[-1]], "lr": 1e-2})
    for _ in range(3):
        twins.fresh_grads()
        twins.step()
        twins.assert_equal()
    assert twins.general_path_calls == 1 + 1  # the new group's first step: the first group's plan still holds


@pytest.mark.parametrize("count", [0.0, 41.0, 2.0**24 - 1, 2.0**24, 2.0**24 + 2, 3.0e7])
def test_next_count_adds_one_as_the_fp32_step_tensor_does(count):
    from optgen.runtime.group_plan import next_count

    assert next_count(count) == int(torch.tensor(count, dtype=torch.float32).add_(1))


def test_one_group_per_parameter():
    """Each group takes its own plan; the shared state table is checked once per step, not once per group."""
    twins = Twins(shapes=[(k + 1, 3) for k in range(12)], group_per_param=True)
    for _ in range(3):
        twins.fresh_grads()
        twins.step()
        twins.assert_equal()
    assert twins.general_path_calls == 12  # the first step, once per group
    del twins.planned.state[twins.a[5]], twins.general.state[twins.b[5]]  # a dropped state: fresh again
    twins.run()
    twins.assert_equal()
    assert float(twins.planned.state[twins.a[5]]["step"]) == 1.0
    assert twins.general_path_calls == 24  # a table changed other than by new states drops every plan


def test_groups_with_a_tensor_lr_or_their_own_counts_beside_planned_ones():
    """The planned groups' scalars go to the device in one tensor, a view per group; a group with a tensor lr
    gets its own; each group keeps its own lr and step count."""
    twins = Twins(shapes=[(k + 1, 3) for k in range(6)], group_per_param=True)
    twins.run(2)
    for opt, params in ((twins.planned, twins.a), (twins.general, twins.b)):
        opt.param_groups[1]["lr"] = torch.tensor(0.02)
        opt.state[params[3]]["step"].fill_(40.0)
    twins.run(2)
    twins.assert_equal()
    assert float(twins.planned.state[twins.a[3]]["step"]) == 42.0
    assert float(twins.planned.state[twins.a[2]]["step"]) == 4.0
    for opt in (twins.planned, twins.general):
        opt.param_groups[1]["lr"].fill_(0.005)
        opt.param_groups[4]["lr"] = 0.03
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == 6  # the first step, once per group: every later step was planned


def test_planned_groups_pass_their_scalars_as_numbers():
    """A planned step hands the kernel its scalars as arguments (no tensor to copy to the device before the
    launch); a group with a tensor hyper-parameter gets them as an fp32 tensor, as the general path does. The
    other tests compare the planned steps (numbers) with the general path (a tensor) bit for bit."""
    params = [torch.nn.Parameter(torch.randn(k + 2, 3).to(DEVICE)) for k in range(2)]
    opt = optim.Lion([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": torch.tensor(2e-3)}],
                     backend="triton")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    plans = [opt._plans.plans[id(g)] for g in opt.param_groups]
    prepared = opt._planned_scalars(list(zip(opt.param_groups, plans)))
    device = params[0].device
    numbers, tensor = (prepared[id(plan)][1][device] for plan in plans)
    assert numbers == opt.host_scalars(opt.param_groups[0], 3) and all(isinstance(v, float) for v in numbers)
    hp = {**opt.param_groups[1], "lr": 2e-3}
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert torch.equal(tensor.cpu(), torch.tensor(opt.host_scalars(hp, 3), dtype=torch.float32))


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton's compiled kernels (the interpreter launches no compiled kernel)")
@pytest.mark.parametrize("cls", [optim.AdamW, optim.StochasticAdamW, optim.Lamb], ids=lambda c: c.__name__)
def test_planned_launches_keep_their_compiled_kernel(cls, monkeypatch):
    """A planned step launches the compiled kernel that its first launch found, without Triton's call or the
    launcher's specialization key; one pass per reduction pass (Lamb), with the random streams (StochasticAdamW)."""
    dtype = getattr(torch, cls.param_dtypes[0])
    twins = Twins(cls, dtype=dtype)
    twins.run(2)
    (launch,) = {id(stage.launch): stage.launch
                 for stage in twins.planned._plans.plans[id(twins.planned.param_groups[0])].stages}.values()
    launcher = launch.launcher
    assert len(launch.plan.runners) == launcher.passes * (2 if launch.plan.parts else 1)  # a runner per part
    twins.fresh_grads()
    kernel, compiled = launcher.kernel, dict(launcher._compiled)
    monkeypatch.setattr(launcher, "kernel", None)  # any launch other than the kept one fails
    launcher._compiled.clear()
    twins.planned.step()
    monkeypatch.setattr(launcher, "kernel", kernel)
    launcher._compiled.update(compiled)
    twins.general._plans.clear()
    twins.general.step()
    twins.assert_equal()
    assert twins.general_path_calls == 1


def test_planned_random_streams_with_the_fallback_beside_the_launch():
    """StochasticAdamW's planned step passes seed and step as kernel arguments and keeps the tensors' ids on the
    device. With a strided parameter among them (the PyTorch fallback steps it, the kernel the others: the
    launch takes a subset of the ids), both still draw the general path's bits."""
    twins = Twins(optim.StochasticAdamW, shapes=[(8, 8), (3001,), (6, 5), (40,)], dtype=torch.bfloat16,
                  seed=2**31 - 1)
    for params in (twins.a, twins.b):
        params[2].data = params[2].data.t()
    twins.run(3)
    twins.assert_equal()
    assert twins.general_path_calls == 1 and not twins.a[2].is_contiguous()


def test_plan_follows_a_parameter_reshaped_at_the_same_address():
    """Parameters and gradients stay where they were; only sizes and strides change."""
    for change in ("transpose", "square transpose"):
        twins = Twins(shapes=[(4, 6), (6, 6), (3001,)])
        twins.fresh_grads()
        twins.step()
        for params in (twins.a, twins.b):
            if change == "transpose":  # (6, 4), not contiguous; its gradient viewed as (6, 4) in place
                params[0].data = params[0].data.t()
                params[0].grad = params[0].grad.view(6, 4)
            else:  # same shape, not contiguous
                params[1].data = params[1].data.t()
        twins.fresh_grads()
        twins.step()
        twins.assert_equal()
        assert twins.general_path_calls == 2, change


def test_a_parameter_cut_at_the_same_address_is_refused_before_any_change():
    """Fewer elements than its states were made for: both paths refuse the step, as torch.optim does (its states
    would no longer match the parameter), and nothing changes."""
    twins = Twins(shapes=[(4, 6), (6, 6), (3001,)])
    twins.fresh_grads()
    twins.step()
    for params in (twins.a, twins.b):
        params[2].data = params[2].data[:2000]
        params[2].grad = params[2].grad[:2000]
    twins.fresh_grads()
    before = [(x.detach().clone(), {k: v.clone() for k, v in twins.planned.state[x].items()}) for x in twins.a]
    for opt in (twins.planned, twins.general):
        with pytest.raises(ValueError, match=r"state 'm' of parameter 2: expected a torch.float32 tensor of shape "
                                             r"\(2000,\) on .*, got a torch.float32 tensor of shape \(3001,\)"):
            opt.step()
    for x, (value, state) in zip(twins.a, before):
        assert torch.equal(x, value)
        assert state.keys() == twins.planned.state[x].keys()
        assert all(torch.equal(v, twins.planned.state[x][k]) for k, v in state.items())


def test_plan_follows_state_storage_swapped_in_place():
    twins = Twins()
    twins.run()
    x, y = twins.a[1], twins.b[1]
    new = torch.rand(x.shape, generator=twins.gen).to(DEVICE)
    twins.planned.state[x]["m"].data = new.clone()  # same tensor object, new storage
    twins.general.state[y]["m"].data = new.clone()
    twins.run()
    twins.assert_equal()
    assert twins.general_path_calls == 2


def test_plan_follows_a_state_dict_filed_under_another_parameter():
    twins = Twins()
    twins.run()
    for opt, params in ((twins.planned, twins.a), (twins.general, twins.b)):
        other = torch.nn.Parameter(torch.zeros(params[-1].shape, device=DEVICE))  # e.g. a replacement parameter
        opt.state[other] = opt.state.pop(params[-1])  # the last entry, re-filed: the same dicts in the same order
    twins.run()
    twins.assert_equal()
    assert float(twins.planned.state[twins.a[-1]]["step"]) == 1.0  # a fresh state for the parameter
    assert twins.general_path_calls == 2


def test_plan_follows_the_stream_ids_when_an_earlier_group_grows():
    """Stochastic rounding draws per parameter id (its position among all parameters): ids that shift must
    reach the planned step."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16) for s in [(300,), (5000,), (77,)]]
    opts = []
    for _ in range(2):
        ps = [torch.nn.Parameter(x.clone()) for x in base]
        opts.append((ps, optim.StochasticAdamW([{"params": ps[:1]}, {"params": ps[1:2]}], backend="triton",
                                                seed=3)))
    for k in range(3):
        grads = [torch.randn(x.shape, generator=gen).to(DEVICE, torch.bfloat16) for x in base]
        for ps, opt in opts:
            for p, g in zip(ps, grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            if k == 1:
                opt.param_groups[0]["params"].append(ps[2])  # the second group's parameter moves to id 2
        opts[0][1].step()
        opts[1][1]._plans.clear()
        opts[1][1].step()
        for p, q in zip(opts[0][0], opts[1][0]):
            assert torch.equal(p, q)


def test_no_plan_for_step_counts_that_are_not_fp32():
    twins = Twins()
    twins.run()
    for opt in (twins.planned, twins.general):
        sd = opt.state_dict()
        for state in sd["state"].values():
            state["step"] = torch.tensor(256.0, dtype=torch.bfloat16)  # 256 + 1 rounds back to 256 in bf16
        opt.load_state_dict(sd)
    for _ in range(2):
        twins.fresh_grads()
        twins.step()
        twins.assert_equal()
    assert twins.general_path_calls == 3 and not twins.planned._plans.plans


def test_plan_of_a_removed_group_is_dropped():
    twins = Twins(shapes=[(8, 8), (3001,)], group_per_param=True)
    twins.run()
    removed = twins.planned.param_groups.pop(1)
    twins.general.param_groups.pop(1)
    twins.run()
    assert id(removed) not in twins.planned._plans.plans and len(twins.planned._plans.plans) == 1


def log_stages(plan, monkeypatch) -> list:
    """The checks of ``plan``'s stages (by index) and the launches, in the order they happen."""
    events = []
    holds, run_plan = group_plan.Placement.holds, MultiTensorLauncher.run_plan

    def logged_holds(self, grads):
        events.append(("holds", next(k for k, stage in enumerate(plan.stages) if stage.placement is self)))
        return holds(self, grads)

    def logged_run(self, launch_plan, lists, *args, part=None, **kwargs):
        events.append(("launch", part, len(lists[0])))
        return run_plan(self, launch_plan, lists, *args, part=part, **kwargs)
    monkeypatch.setattr(group_plan.Placement, "holds", logged_holds)
    monkeypatch.setattr(MultiTensorLauncher, "run_plan", logged_run)
    return events


def test_split_launch_checks_the_rest_while_its_head_runs(launches, monkeypatch):
    """The order of a split step: the head's checks, its launch, the rest's checks, the rest's launch; with a
    parameter of the rest moved, the rest takes the general path after the head's launch, each stepped once."""
    if launches == "whole":
        pytest.skip("a split launch")
    twins = Twins()
    twins.run()
    plan = twins.planned._plans.plans[id(twins.planned.param_groups[0])]
    assert [(stage.part, stage.positions) for stage in plan.stages] == [(0, [2]), (1, [0, 1, 3])]
    events = log_stages(plan, monkeypatch)
    twins.fresh_grads()
    twins.planned.step()
    assert events == [("holds", 0), ("launch", 0, 4), ("holds", 1), ("launch", 1, 4)]
    twins.general._plans.clear()
    twins.general.step()
    twins.assert_equal()
    events.clear()
    new = torch.randn(twins.a[1].shape, generator=twins.gen).to(DEVICE)
    twins.a[1].data, twins.b[1].data = new.clone(), new.clone()
    calls = twins.general_path_calls
    twins.fresh_grads()
    twins.planned.step()
    assert events == [("holds", 0), ("launch", 0, 4), ("holds", 1), ("launch", None, 3)]
    assert twins.general_path_calls == calls + 1
    twins.general._plans.clear()
    twins.general.step()
    twins.assert_equal()
    assert all(float(twins.planned.state[x]["step"]) == 3.0 for x in twins.a)
    assert id(twins.planned.param_groups[0]) not in twins.planned._plans.plans  # made again at the next step
    twins.run()
    twins.assert_equal()
    assert len(twins.planned._plans.plans[id(twins.planned.param_groups[0])].stages) == 2


@pytest.mark.parametrize("moved", [None, 0, 2], ids=["none", "first-stage", "last-stage"])
def test_each_launch_runs_once_its_own_tensors_are_checked(launches, monkeypatch, moved):
    """A group of two launches (quantized states for the large tensor, fp32 states for the small ones): each
    launch's checks come right before it, so the checks of a later launch run while the earlier ones do. With a
    parameter of one stage moved (``moved``: its index among the stages), the stages before it are stepped from
    the plan and the rest take the general path, each parameter stepped once, as the general path steps them."""
    twins = Twins(optim.FlashAdamW, dtype=torch.bfloat16, min_quantized_size=4000)
    twins.run()
    plan = twins.planned._plans.plans[id(twins.planned.param_groups[0])]
    assert len(plan.stages) == (2 if launches == "whole" else 3)
    assert sorted(i for stage in plan.stages for i in stage.positions) == [0, 1, 2, 3]
    events = log_stages(plan, monkeypatch)
    if moved is not None:
        stage = plan.stages[moved if moved == 0 else len(plan.stages) - 1]
        i = stage.positions[0]
        new = torch.randn(twins.a[i].shape, generator=twins.gen).to(DEVICE, torch.bfloat16)
        twins.a[i].data, twins.b[i].data = new.clone(), new.clone()
    calls = twins.general_path_calls
    twins.fresh_grads()
    twins.planned.step()
    if moved is None:
        assert events == [e for k, stage in enumerate(plan.stages)
                          for e in (("holds", k), ("launch", stage.part, len(stage.launch.lists[0])))]
        assert twins.general_path_calls == calls
    elif moved == 0:  # the first stage's checks fail before any launch: the whole group takes the general path
        assert events[0] == ("holds", 0) and ("holds", 1) not in events
        assert twins.general_path_calls == calls + 1
    else:
        last = len(plan.stages) - 1
        assert events[:2 * last + 1] == [e for k, stage in enumerate(plan.stages[:last])
                                         for e in (("holds", k), ("launch", stage.part,
                                                                       len(stage.launch.lists[0])))] + [("holds", last)]
        assert twins.general_path_calls == calls + 1
    twins.general._plans.clear()
    twins.general.step()
    twins.assert_equal()
    assert all(float(twins.planned.state[x]["step"]) == 2.0 for x in twins.a)


@pytest.mark.parametrize("where", ["first-stage", "last-stage"])
def test_a_state_that_no_longer_fits_is_refused_by_the_stage_that_holds_it(launches, where):
    """A state viewed as another dtype at the same address (the kernels would read its bytes as their own dtype):
    the plan notices it in its stage's checks and the general path refuses it with a ValueError. In the first
    stage nothing has been stepped; in a later one, the stages before it have (documented in the README)."""
    twins = Twins(optim.FlashAdamW, dtype=torch.bfloat16, min_quantized_size=4000)
    twins.run()
    plan = twins.planned._plans.plans[id(twins.planned.param_groups[0])]
    stage = plan.stages[0 if where == "first-stage" else -1]
    i = stage.positions[0]
    m = twins.planned.state[twins.a[i]]["m"]
    m.data = m.data.view(torch.uint8 if m.dtype == torch.int8 else torch.int32)
    twins.fresh_grads()
    def held(j):  # the parameter's value, its states (the bf16 value alone may not move in one step), its count
        state = twins.planned.state[twins.a[j]]
        return [twins.a[j].detach().clone()] + [state[k].clone() for k in sorted(state) if k != "step"], \
            float(state["step"])
    before = {j: held(j) for j in range(4)}
    with pytest.raises(ValueError, match=f"state 'm' of parameter {i}: expected a torch.(int8|float32) tensor"):
        twins.planned.step()
    stepped = {j for s in plan.stages[:plan.stages.index(stage)] for j in s.positions}
    assert i not in stepped and (stepped == set() if where == "first-stage" else stepped)
    for j, (values, count) in before.items():
        now, now_count = held(j)
        same = all(torch.equal(x, y) for x, y in zip(now, values))
        assert (now_count, same) == ((count + 1, False) if j in stepped else (count, True)), j


def test_a_parameter_viewed_as_another_dtype_is_stepped_as_that_dtype():
    """``p.data = p.data.view(torch.float16)`` on a bf16 parameter (and its gradient) keeps every address and
    element count: the plan and the launcher's cached launch tables must still notice, and step the fp16 values
    as the PyTorch fallback does."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES] for _ in range(3)]
    stepped = {}
    for backend in ("triton", "eager"):
        ps = [torch.nn.Parameter(x.clone()) for x in base]
        opt = optim.AdamW(ps, backend=backend)
        for k in range(3):
            if k == 2:
                ps[1].data, ps[1].grad.data = ps[1].data.view(torch.float16), ps[1].grad.data.view(torch.float16)
            for p, g in zip(ps, grads[k]):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.copy_(g)
            opt.step()
        stepped[backend] = ps
    assert stepped["triton"][1].dtype == torch.float16
    for x, y in zip(stepped["triton"], stepped["eager"]):
        torch.testing.assert_close(x.float(), y.float(), rtol=2**-10, atol=0)
