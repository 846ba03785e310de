"""Whole-tensor reductions (norm, sum, max): LAMB against a float64 transcription of cybertronai/pytorch-lamb,
on both backends, and a custom spec that uses sum, max and numel."""

import inspect
import itertools
import os
import re
import sys

import pytest
import torch

import optgen
from optgen.optim import Lamb

BACKENDS = ["eager"] + (["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lamb_reference(p, g, m, v, lr, b1, b2, eps, wd, t, bias_correction=False):
    """One LAMB step in float64, as pytorch_lamb/lamb.py (trust = min(|p|, 10) / |adam_step|, 1 if either is 0)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
    w = p.norm().clamp(0, 10)
    a = mh / (vh.sqrt() + eps) + wd * p
    r = a.norm()
    trust = 1.0 if (w == 0 or r == 0) else w / r
    return p - lr * trust * a, m, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_lamb_matches_float64_reference(backend, bias_correction):
    torch.manual_seed(0)
    shapes = [(64, 33), (5000,), (), (7, 3)]
    hp = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "bias_correction": bias_correction}
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    ms = [torch.zeros_like(r) for r in ref]
    vs = [torch.zeros_like(r) for r in ref]
    opt = Lamb(params, backend=backend, **hp)
    steps = 20 if backend == "eager" else 8
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p)
            ref[i], ms[i], vs[i] = lamb_reference(ref[i], p.grad.double(), ms[i], vs[i], hp["lr"], 0.9, 0.999, 1e-6,
                                                  0.01, t, bias_correction)
        opt.step()
        for p, r in zip(params, ref):
            err = (p.detach().double() - r).abs().max() / r.abs().max()
            assert err < 1e-6, (t, float(err))


def test_lamb_trust_is_one_for_a_zero_parameter():
    p = torch.nn.Parameter(torch.zeros(300))  # |p| = 0: trust ratio 1, so the step is lr * adam step
    opt = Lamb([p], lr=0.1, backend="eager")
    p.grad = torch.randn(300)
    g = p.grad.double()
    m, v = 0.1 * g, 0.001 * g * g
    opt.step()
    expected = -0.1 * m / (v.sqrt() + 1e-6)
    assert torch.allclose(p.detach().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_nan_gradient_spreads_over_the_tensor_as_in_the_reference(backend):
    """pytorch-lamb takes trust = 1 only where a norm is 0: a NaN element makes |a| NaN, so the trust ratio and
    every element of that tensor become NaN (the other tensors step as usual)."""
    torch.manual_seed(3)
    hit, other = (torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in ((500,), (300,)))
    before = other.detach().clone()
    opt = Lamb([hit, other], lr=0.1, backend=backend)
    hit.grad, other.grad = torch.randn_like(hit), torch.randn_like(other)
    hit.grad[7] = float("nan")
    opt.step()
    assert hit.isnan().all()
    assert other.isfinite().all() and not torch.equal(other.detach(), before)


SPEC = """
name: clipped_sgd
class: ClippedSGD
doc: SGD whose step is scaled so that its largest element is at most `cap`, with a mean-centred gradient.
hyperparams:
  lr:  {default: 0.1, range: "[0, inf)"}
  cap: {default: 0.01, range: "(0, inf)"}
param: {storage: native}
grad:  {storage: native}
state:
  count: {storage: fp32}
update: |
  gc = g - sum(g)/numel
  biggest = max(abs(lr*gc))
  scale = where(biggest > cap, cap/biggest, 1)
  p = p - lr*scale*gc
  count = count + 1
"""


def _load(tmp_path, spec: str) -> type:
    """The optimizer class of a spec given as text (written to a file, as optgen.load reads one)."""
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    return optgen.load(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_max_numel_in_a_custom_spec(tmp_path, backend):
    cls = _load(tmp_path, SPEC)
    torch.manual_seed(1)
    shapes = [(3001,), (40, 50), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    before = [p.detach().double().clone() for p in params]
    opt = cls(params, lr=0.5, cap=0.02, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, b in zip(params, before):
        g = p.grad.double()
        gc = g - g.mean()
        biggest = (0.5 * gc).abs().max()
        scale = 0.02 / biggest if biggest > 0.02 else 1.0
        expected = b - 0.5 * scale * gc
        assert torch.allclose(p.detach().double(), expected, rtol=0, atol=1e-6 * float(b.abs().max()))
        assert float((p.detach().double() - b).abs().max()) <= 0.02 * (1 + 1e-5)
        assert torch.equal(opt.state[p]["count"], torch.ones_like(p))


TWO_LEVEL_SPEC = """
name: two_level_probe
class: TwoLevelProbe
doc: m is final in the first pass, u (which needs norm(m)) in the second; both are stored where they are computed.
hyperparams:
  lr: {default: 0.1, range: "[0, inf)"}
param: {storage: native}
grad:  {storage: native}
state:
  m: {storage: fp32}
  u: {storage: fp32}
update: |
  m = 0.5*m + g
  a = norm(m)
  u = u + g*g/(a + 1)
  b = norm(u)
  p = p - lr*m*u/(a + b + 1)
"""


EARLY_SPEC = """
name: early_store_probe
class: EarlyStoreProbe
doc: Two fp32 states that the reduction pass computes; the update also reads m's old value.
hyperparams:
  lr: {default: 0.1, range: "[0, inf)"}
param: {storage: native}
grad:  {storage: native}
state:
  m: {storage: fp32}
  u: {storage: fp32}
update: |
  m0 = m
  m = 0.5*m + g
  u = u + g*g
  n = norm(m) + norm(u)
  p = p - lr*(m + m0)/(n + 1)
"""


def _first_passes(cls, count: int) -> list[str]:
    """The generated tile function's first ``count`` passes, as text."""
    source = inspect.getsource(sys.modules[cls.__module__])
    ends = [source.index(f"PASS == {k}:") for k in range(1, count + 2)]
    return [source[a:b] for a, b in itertools.pairwise(ends)]


def _three_steps_against_float64(cls, backend, seed, step64):
    """Three steps of a spec with fp32 states m and u and lr 0.1 on three shapes (one ends in a partial tile),
    against ``step64(p, m, u, g) -> (p, m, u)`` in float64."""
    torch.manual_seed(seed)
    shapes = [(3001,), (40, 50), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    ref = [(p.detach().double().cpu().clone(), torch.zeros(s, dtype=torch.float64),
            torch.zeros(s, dtype=torch.float64)) for p, s in zip(params, shapes)]
    opt = cls(params, lr=0.1, backend=backend)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref = [step64(*r, g.double().cpu()) for r, g in zip(ref, grads)]
    for p, (p64, m, u) in zip(params, ref):
        assert torch.allclose(p.detach().double().cpu(), p64, rtol=1e-6, atol=1e-7)
        assert torch.allclose(opt.state[p]["m"].double().cpu(), m, rtol=1e-6, atol=1e-7)
        assert torch.allclose(opt.state[p]["u"].double().cpu(), u, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_stores_over_two_reduction_levels(tmp_path, backend):
    """m is stored by the first pass, u (computed from the first level's norm) by the second; the last pass reads
    both back. Three steps against float64."""
    cls = _load(tmp_path, TWO_LEVEL_SPEC)
    passes = _first_passes(cls, 2)
    assert "state_m + offs, m_1" in passes[0] and "state_u + offs, u_1" in passes[1]

    def step64(p, m, u, g):
        m = 0.5 * m + g
        a = m.norm()
        u = u + g * g / (a + 1)
        return p - 0.1 * m * u / (a + u.norm() + 1), m, u

    _three_steps_against_float64(cls, backend, 4, step64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_store_only_where_no_later_pass_reads_the_old_value(tmp_path, backend):
    """The first pass stores u (fp32, its new value computed there, its old value read nowhere after) but not m,
    whose old value the last pass still reads; three steps match float64 on both backends."""
    cls = _load(tmp_path, EARLY_SPEC)
    first_pass = _first_passes(cls, 1)[0]
    assert "store_rne(state_u + offs" in first_pass and "state_m + offs, m_1" not in first_pass

    def step64(p, m, u, g):
        m_new, u_new = 0.5 * m + g, u + g * g
        return p - 0.1 * (m_new + m) / (m_new.norm() + u_new.norm() + 1), m_new, u_new

    _three_steps_against_float64(cls, backend, 3, step64)


FIXED_SCALE_SPEC = """
name: fixed_scale_probe
class: FixedScaleProbe
hyperparams:
  lr: {default: 1.0e-2, range: "[0, inf)"}
param: {storage: native}
grad: {storage: native}
state:
  m: {storage: fp8_e4m3_norm}
update: |
  m = 0.9*m + g
  m_scale = 4*lr
  p = p - lr*m
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_scale_from_scalars_alone(tmp_path, backend):
    """An fp8-norm scale set from hyper-parameters alone (no reduction) is staged like a computed one: the
    Triton kernel stores its scalar, not a tile (which failed to compile), and both backends agree with a
    float64 transcription that rounds m to e4m3 at scale 4*lr."""
    cls = _load(tmp_path, FIXED_SCALE_SPEC)
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(3001,), (40, 50)]]
    opt = cls(params, lr=0.01, backend=backend, min_quantized_size=0)
    ref_p = [p.detach().double().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in ref_p]
    for _ in range(3):
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p)
            m = 0.9 * ref_m[i] + p.grad.double()
            ref_p[i] = ref_p[i] - 0.01 * m  # the update reads the new m before it is stored
            scale = torch.tensor(4 * 0.01, dtype=torch.float32).double()
            ref_m[i] = (m / scale).float().to(torch.float8_e4m3fn).double() * scale
        opt.step()
    for p, rp, rm in zip(params, ref_p, ref_m):
        assert torch.allclose(p.detach().double(), rp, rtol=1e-6, atol=1e-6)
        stored = opt.state[p]["m"].view(torch.float8_e4m3fn).double() * opt.state[p]["m_scale"].double()
        assert float(opt.state[p]["m_scale"]) == pytest.approx(0.04, rel=1e-7)
        assert float((stored.reshape(-1) - rm.reshape(-1)).abs().max()) <= 0.04 * 2 ** -6


SUM_OF_A_SUM_SPEC = """\
name: sum_of_sum
class: SumOfSum
hyperparams:
  lr: {default: 0.1}
param: {storage: fp32}
update: |
  s = sum(g)
  p = p - lr*sum(s)/numel
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sum_of_a_per_tensor_temporary_is_over_every_element(tmp_path, backend):
    """``s = sum(g)`` holds one value per tensor; ``sum(s)`` adds it once per element (numel * s), on both backends:
    the fallback used to sum the 0-d tensor (s) while the kernel summed a tile of it."""
    cls = _load(tmp_path, SUM_OF_A_SUM_SPEC)
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(3001,), (40, 50)]]
    ref = [p.detach().double().clone() for p in params]
    opt = cls(params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, r in zip(params, ref):
        expected = r - 0.1 * p.grad.double().sum()  # numel * sum(g) / numel
        assert torch.allclose(p.detach().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend (CUDA, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("spec", [SPEC, TWO_LEVEL_SPEC], ids=["sum-max", "two-levels"])
def test_a_split_launch_reduces_each_part_as_one_launch(tmp_path, spec, step_whole_and_split, monkeypatch):
    """A launch split in two parts (``MultiTensorLauncher.split_min_tensors``; thresholds lowered here) runs every
    pass of its first part, then of the other: a maximum (atomic, from its identity) and sums over two levels give
    the bits of one launch over all the tensors, over two steps. Fresh float memory is poisoned (1e30), so that an
    accumulator read before it is set shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(1e30) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", poisoned)
    cls = _load(tmp_path, spec)
    torch.manual_seed(5)
    base = [torch.randn(1500 + 37 * k, device=DEVICE) for k in range(9)]
    whole = cls([torch.nn.Parameter(x.clone()) for x in base], lr=0.1, backend="triton")
    split = cls([torch.nn.Parameter(x.clone()) for x in base], lr=0.1, backend="triton")
    eager = cls([torch.nn.Parameter(x.clone()) for x in base], lr=0.1, backend="eager")
    for _ in range(2):
        step_whole_and_split(whole, split)
        for x, y in zip(eager.param_groups[0]["params"], whole.param_groups[0]["params"]):
            x.grad = y.grad.clone()
        eager.step()
    assert any(plan.parts is not None for plan in sys.modules[cls.__module__]._launcher._plans.values())
    for x, y in zip(eager.param_groups[0]["params"], split.param_groups[0]["params"]):  # sums in another order
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Lamb", "Lamb16"])
def test_bytes_moved_count_every_pass(name):
    """A whole-tensor reduction must be complete before any element is stored, so LAMB reads its tensors twice.
    The bytes a step moves count every pass: each buffer as often as the generated kernel's passes load it
    (counted here in its source), plus one write per written buffer."""
    cls = getattr(optgen.optim, name)
    source = inspect.getsource(sys.modules[cls.__module__])
    for variant in cls.variants.values():
        kernel = variant.triton_launcher.kernel.fn.__name__  # <spec>_step[_<layout>]_kernel, its tile function first
        tile = source[source.index(f"def {kernel.removesuffix('_kernel')}_tile("):source.index(f"def {kernel}(")]
        sections = tile.split("PASS == ")[1:]
        for b in variant.buffers:
            if b.shape == "scalar":  # a per-tensor number (0 bytes per element)
                continue
            loaded = re.compile(rf"(tl\.load\(|triton_decode\w*\(){b.arg}\b")
            assert b.reads == sum(bool(loaded.search(s)) for s in sections), (name, b.arg)
    # fp32 LAMB: the first pass reads p, g, m, v (16 B) and stores the new m and v (8 B), which the second reads
    # back with p (12 B) before storing p (4 B). LAMB16 (fp8 m and v, whose new per-tensor scales the first pass
    # computes): the first pass reads p, g, m, v (4 + 4 + 1 + 1 B); the second reads them again and stores p, m, v.
    expected = {"Lamb": 16 + 8 + 12 + 4, "Lamb16": 10 + 10 + 6}[name]
    assert cls.bytes_per_element(torch.float32, moved=True) == expected
    assert cls.bytes_per_element(torch.float32) == {"Lamb": 16, "Lamb16": 10}[name]
