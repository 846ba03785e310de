"""The built-in optimizers against independent references, over 50 steps with fresh random gradients.

SGD, Adam and AdamW are compared with ``torch.optim`` (single-tensor implementation); Lion with a float64
implementation of the paper's update written below. "Within 1e-6 relative" means, for every tensor,
``max|ours - ref| <= 1e-6 * max|ref|`` (see ``assert_rel``); a NaN or inf anywhere fails. Every
parameter set holds a 0-d tensor, a non-contiguous leaf (a transposed view) and an empty tensor, split
over two param groups with different hyper-parameters.

The differences that remain are fp32 rounding (e.g. torch fuses ``p + alpha*g`` where optgen rounds
twice, and optgen's sqrt is correctly rounded); an algorithmic mistake shows up as a difference of the
order of ``lr * g`` (>= 1e-3 relative here), three orders of magnitude above the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from optgen.optim import SGD, Adam, AdamW, Lion

STEPS = 50
REL = 1e-6


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = REL) -> None:
    """``max|ours - ref| <= rel * max|ref|`` for one tensor (same shape; all values finite)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: not finite: {ours}"
    assert torch.isfinite(ref).all(), f"{what}: reference not finite"
    if ref.numel() == 0:
        return
    ours64, ref64 = ours.double(), ref.double()
    scale = ref64.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would be meaningless"
    err = (ours64 - ref64).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel:g} * max|ref| = {rel * scale:.3e}"


def make_tensors(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    """Two groups of fresh random leaf tensors: 0-d, 1-d, 2-d, a transposed (non-contiguous) view, empty.

    The 0-d value is drawn from [1, 2) so that its relative error stays well defined (a random value
    can land arbitrarily close to zero, where any relative measure blows up).
    """
    group1 = [
        (torch.rand((), generator=gen) + 1.0),
        torch.randn(7, generator=gen),
        torch.randn(6, 4, generator=gen).t(),  # a (4, 6) view with strides (1, 4)
        torch.randn(0, 4, generator=gen),
    ]
    group2 = [
        torch.randn(5, 3, generator=gen),
        torch.randn(2, 3, 4, generator=gen),
    ]
    out = []
    for group in (group1, group2):
        out.append([t.to(dtype) for t in group])
    return out


def leaves(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Independent leaf copies with the same shapes *and strides* (clone keeps the transposed layout)."""
    return [[t.clone().detach().requires_grad_() for t in group] for group in groups]


def set_grads(gen: torch.Generator, *param_sets: list[list[torch.Tensor]], scale: float = 1.0) -> None:
    """The same fresh random gradient for the matching parameter of each set."""
    for group_tensors in zip(*param_sets):
        for same in zip(*group_tensors):
            g = (scale * torch.randn(same[0].shape, generator=gen, dtype=torch.float32)).to(same[0].dtype)
            for p in same:
                p.grad = g.clone()


def flat(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p for group in groups for p in group]


def check_layout(params: list[torch.Tensor], originals: list[torch.Tensor]) -> None:
    """Updated in place: same shapes and strides as before (the transposed view stays non-contiguous)."""
    for p, o in zip(params, originals):
        assert p.shape == o.shape and p.stride() == o.stride()


def run_against_torch(
    ours_cls,
    torch_cls,
    hps: list[dict],
    state_keys: dict[str, str],
    backend: str,
    seed: int,
    grad_scale: float = 1.0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    init = make_tensors(gen)
    a, b = leaves(init), leaves(init)
    opt_a = ours_cls([{"params": ps, **hp} for ps, hp in zip(a, hps)], backend=backend)
    opt_b = torch_cls([{"params": ps, **hp} for ps, hp in zip(b, hps)], foreach=False)
    for step in range(1, STEPS + 1):
        set_grads(gen, a, b, scale=grad_scale)
        opt_a.step()
        opt_b.step()
        for i, (pa, pb) in enumerate(zip(flat(a), flat(b))):
            assert_rel(pa.detach(), pb.detach(), f"step {step}, param {i} {tuple(pa.shape)}")
    check_layout(flat(a), flat(init))
    for i, (pa, pb) in enumerate(zip(flat(a), flat(b))):
        for ours_key, torch_key in state_keys.items():
            if torch_key in opt_b.state[pb]:
                assert_rel(
                    opt_a.state[pa][ours_key], opt_b.state[pb][torch_key], f"param {i} state {ours_key}"
                )
        assert opt_a.state[pa]["step"].item() == STEPS


SGD_CASES = [
    {"momentum": momentum, "dampening": dampening, "weight_decay": wd}
    for momentum in (0.0, 0.9)
    for dampening in (0.0, 0.1)
    for wd in (0.0, 0.01)
] + [{"momentum": 0.9, "nesterov": True, "weight_decay": wd} for wd in (0.0, 0.01)]


@pytest.mark.parametrize("hp", SGD_CASES, ids=lambda hp: ",".join(f"{k}={v}" for k, v in hp.items()))
def test_sgd_matches_torch(hp):
    # the second group changes lr and weight decay (and keeps the momentum settings)
    hps = [dict(lr=0.01, **hp), dict(hp, lr=0.03, weight_decay=hp.get("weight_decay", 0) + 0.02)]
    run_against_torch(SGD, torch.optim.SGD, hps, {"m": "momentum_buffer"}, "eager", seed=1)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_matches_torch(weight_decay):
    hps = [
        {"lr": 1e-2, "weight_decay": weight_decay},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    ]
    run_against_torch(Adam, torch.optim.Adam, hps, {"m": "exp_avg", "v": "exp_avg_sq"}, "eager", seed=2)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_matches_torch(weight_decay):
    hps = [
        {"lr": 1e-2, "weight_decay": weight_decay},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    ]
    run_against_torch(AdamW, torch.optim.AdamW, hps, {"m": "exp_avg", "v": "exp_avg_sq"}, "eager", seed=3)


@pytest.mark.parametrize(
    "cls, torch_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"]
)
def test_adam_eps_matters_with_tiny_gradients(cls, torch_cls):
    """Gradients of size ~1e-7: eps (1e-8, 1e-7) is a sizeable part of the denominator, so a mistake in
    where or how eps enters the update shows (with unit gradients it is invisible in fp32)."""
    hps = [{"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.01}, {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-7}]
    run_against_torch(
        cls, torch_cls, hps, {"m": "exp_avg", "v": "exp_avg_sq"}, "eager", seed=8, grad_scale=1e-7
    )


@pytest.mark.slow  # ~14 s with a cold Inductor cache on 2 CPU cores (two compiles: 4- and 2-tensor lists)
def test_adamw_inductor_matches_torch():
    hps = [
        {"lr": 1e-2, "weight_decay": 0.05},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    ]
    run_against_torch(AdamW, torch.optim.AdamW, hps, {"m": "exp_avg", "v": "exp_avg_sq"}, "inductor", seed=4)


# ---------------------------------------------------------------------------------------------- Lion
def lion_reference_step(
    p: torch.Tensor, m: torch.Tensor, g: torch.Tensor, lr: float, beta1: float, beta2: float, wd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's update (Chen et al. 2023, Algorithm 2), float64:
    c = b1*m + (1-b1)*g;  p <- p - lr*(sign(c) + wd*p);  m <- b2*m + (1-b2)*g."""
    c = beta1 * m + (1 - beta1) * g
    return p - lr * (torch.sign(c) + wd * p), beta2 * m + (1 - beta2) * g


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_lion_matches_paper(backend):
    """Free-running 50 steps against the float64 reference (params and momentum within 1e-6 relative).

    sign(c) is discontinuous at 0: were some |c| within fp32 rounding of 0, fp32 and float64 could pick
    different signs. On random data that has probability ~1e-7 per element and step; the test asserts
    that no |c| came that close (so a failure there would be reported as such, not hidden).
    """
    gen = torch.Generator().manual_seed(6)
    hps = [
        {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1},
        {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.0},
    ]
    init = make_tensors(gen)
    params = leaves(init)
    opt = Lion([{"params": ps, **hp} for ps, hp in zip(params, hps)], backend=backend)
    ref_p = [[t.double() for t in group] for group in init]
    ref_m = [[torch.zeros_like(t) for t in group] for group in ref_p]
    smallest_c = float("inf")
    for step in range(1, STEPS + 1):
        set_grads(gen, params)
        for gi, hp in enumerate(hps):
            beta1, beta2 = hp["betas"]
            for j, p in enumerate(params[gi]):
                g = p.grad.double()
                c = beta1 * ref_m[gi][j] + (1 - beta1) * g
                if c.numel():
                    smallest_c = min(smallest_c, c.abs().min().item())
                ref_p[gi][j], ref_m[gi][j] = lion_reference_step(
                    ref_p[gi][j], ref_m[gi][j], g, hp["lr"], beta1, beta2, hp["weight_decay"]
                )
        opt.step()
        for i, (p, r) in enumerate(zip(flat(params), flat(ref_p))):
            assert_rel(p.detach(), r, f"step {step}, param {i} {tuple(p.shape)}")
    assert smallest_c > 1e-5, "a |c| came within rounding of 0: sign(c) is ill-conditioned for this seed"
    check_layout(flat(params), flat(init))
    for i, (p, m) in enumerate(zip(flat(params), flat(ref_m))):
        assert opt.state[p]["m"].dtype == torch.float32
        assert_rel(opt.state[p]["m"], m, f"param {i} state m")


# ---------------------------------------------------------------------------------------------- bf16
def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each float64 value (equal when x is exactly representable)."""
    r = x.to(torch.bfloat16)  # round to nearest even
    above = r.double() >= x
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.full_like(r, float("-inf")))
    lo = torch.where(above & (r.double() != x), down, r)
    hi = torch.where(above, r, up)
    return lo, hi


def test_adamw_bf16_params_one_step_at_a_time():
    """bf16 parameters and gradients, fp32 states: every one of 50 steps against float64 math.

    At each step the reference starts from the optimizer's own current values (bf16 p, fp32 m and v),
    applies AdamW in float64 and rounds p to bf16 (nearest even). Asserted, per step and element:
      * m and v (fp32) are within 1e-6 relative of the float64 values (per tensor, as above);
      * p equals the float64 result rounded to bf16, except where that result lies within 1e-6
        relative of a tie between two bf16 neighbours: there fp32 rounding of the intermediate math may
        tip the rounding either way, and p must be one of the two neighbours (one bf16 ulp at most).
    Feeding the reference the optimizer's own values each step keeps a one-ulp decision at one step
    from being carried into the next (a bf16 ulp is 2**-8 relative, far above any fp32 effect).
    """
    gen = torch.Generator().manual_seed(7)
    lr, beta1, beta2, eps, wd = 0.05, 0.9, 0.999, 1e-8, 0.1
    params = flat(leaves(make_tensors(gen, torch.bfloat16)))
    opt = AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    ties = 0
    for t in range(1, STEPS + 1):
        before = [
            (
                p.detach().double(),
                opt.state[p]["m"].double() if opt.state[p] else torch.zeros_like(p, dtype=torch.float64),
                opt.state[p]["v"].double() if opt.state[p] else torch.zeros_like(p, dtype=torch.float64),
            )
            for p in params
        ]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        opt.step()
        for i, (p, (p0, m0, v0)) in enumerate(zip(params, before)):
            g = p.grad.double()
            m = beta1 * m0 + (1 - beta1) * g
            v = beta2 * v0 + (1 - beta2) * g * g
            exact = p0 * (1 - lr * wd) - (lr / (1 - beta1**t)) * m / (v.sqrt() / (1 - beta2**t) ** 0.5 + eps)
            assert p.dtype == torch.bfloat16 and opt.state[p]["m"].dtype == torch.float32
            assert opt.state[p]["v"].dtype == torch.float32
            assert_rel(opt.state[p]["m"], m, f"step {t} param {i} m")
            assert_rel(opt.state[p]["v"], v, f"step {t} param {i} v")
            got = p.detach()
            assert torch.isfinite(got.float()).all()
            rounded = exact.to(torch.bfloat16)
            differ = got != rounded
            if differ.any():
                lo, hi = bf16_neighbours(exact[differ])
                midpoint = (lo.double() + hi.double()) / 2
                near_tie = (exact[differ] - midpoint).abs() <= 1e-6 * exact[differ].abs()
                assert near_tie.all(), f"step {t} param {i}: bf16 result differs away from a rounding tie"
                is_neighbour = (got[differ] == lo) | (got[differ] == hi)
                assert is_neighbour.all(), f"step {t} param {i}: more than one bf16 ulp off"
                ties += int(differ.sum())
    # a handful of tie cases at most on ~4000 element-steps; many would mean a systematic rounding error
    assert ties <= 5
