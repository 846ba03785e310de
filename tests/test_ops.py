"""Each built-in optimizer registers ``optgen::<name>_step`` with torch.library; ``opcheck`` passes on it.

Arguments are realistic: the states come from a few real optimizer steps on random data, the lists mix a
0-d, a 1-d, a non-contiguous 2-d and an empty tensor, and the scalars are the class's own
``host_scalars(group, t)``. The mutated arguments the schema declares must be exactly the ones a call
changes.
"""

from __future__ import annotations

import pytest
import torch

from optgen.optim import SGD, Adam, AdamW, Lion

CASES = [
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1}, torch.float32),
    (AdamW, {"lr": 1e-2, "weight_decay": 0.1}, torch.bfloat16),
    (Adam, {"lr": 1e-2, "weight_decay": 0.1}, torch.float32),
    (SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, torch.float32),
    (SGD, {"lr": 1e-2}, torch.float16),
    (Lion, {"lr": 1e-3, "weight_decay": 0.1}, torch.float32),
]
IDS = [f"{c.__name__}-{str(d).removeprefix('torch.')}" for c, _, d in CASES]


def op_arguments(cls, hp: dict, dtype: torch.dtype, seed: int = 0) -> tuple[list, torch.Tensor]:
    """(lists in the op's argument order, scalars) after 3 real steps on random data."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.randn((), generator=gen),
        torch.randn(37, generator=gen),
        torch.randn(6, 5, generator=gen).t(),
        torch.randn(0, 3, generator=gen),
    ]
    params = [p.to(dtype).requires_grad_() for p in params]
    opt = cls(params, **hp)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    group = opt.param_groups[0]
    t = int(opt.state[params[0]]["step"].item()) + 1
    scalars = torch.tensor(cls.host_scalars(group, t), dtype=torch.float32)
    lists = []
    for b in cls.buffers:
        if b.key is not None:
            lists.append([opt.state[p][b.key].clone() for p in params])
        elif b.arg == "param":
            lists.append([p.detach().clone() for p in params])
        else:
            lists.append([p.grad.clone() for p in params])
    for tensors in lists:
        for x in tensors:
            assert torch.isfinite(x.float()).all()
    return lists, scalars


@pytest.mark.parametrize("cls, hp, dtype", CASES, ids=IDS)
def test_opcheck(cls, hp, dtype):
    lists, scalars = op_arguments(cls, hp, dtype)
    assert lists[0][2].is_contiguous() is False  # the transposed parameter keeps its layout
    torch.library.opcheck(cls.op, (*lists, scalars))  # every default test utility


@pytest.mark.parametrize("cls", [AdamW, Adam, SGD, Lion], ids=lambda c: c.__name__)
def test_op_is_registered_under_the_spec_name(cls):
    packet = getattr(torch.ops.optgen, f"{cls.spec_name}_step")
    assert packet.default._name == cls.op._opoverload._name == f"optgen::{cls.spec_name}_step"


@pytest.mark.parametrize("cls, hp, dtype", CASES, ids=IDS)
def test_declared_mutations_are_exactly_the_changed_arguments(cls, hp, dtype):
    lists, scalars = op_arguments(cls, hp, dtype, seed=1)
    schema = cls.op._opoverload._schema
    args = schema.arguments
    assert [a.name for a in args] == [b.arg for b in cls.buffers] + ["scalars"]
    declared = {a.name for a in args if a.alias_info is not None and a.alias_info.is_write}
    before = [[x.clone() for x in tensors] for tensors in lists]
    scalars_before = scalars.clone()
    cls.op(*lists, scalars)
    changed = set()
    for b, old, new in zip(cls.buffers, before, lists):
        if any(o.numel() and not torch.equal(o, n) for o, n in zip(old, new)):
            changed.add(b.arg)
    assert torch.equal(scalars, scalars_before)
    assert "param" in changed and "grad" not in changed
    assert changed == declared
