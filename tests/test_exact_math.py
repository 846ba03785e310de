"""The codecs' quotients by optgen.codecs.division.quotient (the GPU division's fast path without its
slow-path call) against correctly rounded fp32 division, bit for bit: q8's softsign and inverse softsign,
its scale reciprocal 1/s and q8_dynamic's block reciprocal (on the CPU, under Triton's interpreter, on a
large sample; on a GPU on every fp32 |n| <= 1 and every s >= 1e-12) and every code over its N of the ecc
decode (rho/N, N = 127 and 32767), on both."""

import pytest
import torch
import triton
import triton.language as tl

from optgen.codecs import dynamic, q8
from optgen.codecs.division import quotient

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@triton.jit
def _apply(x_ptr, y_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr, N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if OP == 0:
        y = q8.softsign(x)
    elif OP == 1:
        y = q8.inverse_softsign(x)
    elif OP == 2:
        y = quotient(x, N * 1.0, 1.0 / N)  # as in optgen.codecs.ecc.triton_decode
    elif OP == 3:
        y = q8.scale_reciprocal(x)
    else:
        y = dynamic.block_reciprocal(x)
    tl.store(y_ptr + offs, y, mask=mask)


def apply(x: torch.Tensor, op: int, n: int = 0) -> torch.Tensor:
    y = torch.full_like(x, float("nan"))
    block = 4096 if CUDA else 1 << 16
    _apply[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), OP=op, BLOCK=block, N=n, enable_fp_fusion=False)
    return y


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))


def check_softsign(r: torch.Tensor) -> None:
    got = apply(r, 0)
    ref = (2.0 * r) / (1.0 + r.abs())  # correctly rounded fp32 division
    exact = r.abs() >= 2.0**-101
    assert same_bits(got, ref)[exact].all()
    codes, ref_codes = torch.floor(got * 127.0 + 0.5), torch.floor(ref * 127.0 + 0.5)  # the codes, everywhere
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0, equal_nan=True)


def test_softsign_quotient():
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(1 << 20, generator=gen) * 2 - 1
    tiny = torch.ldexp(torch.rand(1 << 16, generator=gen), torch.randint(-149, -90, (1 << 16,), generator=gen))
    one = torch.arange(0x3F800000 - 8, 0x3F800000 + 5, dtype=torch.int32).view(torch.float32)  # n = x·(1/s) may pass 1
    r = torch.cat([u, u * 1e-20, tiny, -tiny, one, -one, torch.tensor([0.0, -0.0, float("nan")])])
    check_softsign(r.to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_softsign_every_input_on_gpu():
    top = int(torch.tensor(1.0).view(torch.int32)) + 4
    for part in torch.arange(0, top + 1, device="cuda", dtype=torch.int32).split(1 << 28):
        r = part.view(torch.float32)
        check_softsign(r)
        check_softsign(-r)


def check_scale_reciprocal(s: torch.Tensor) -> None:
    got = apply(s, 3)
    exact = s <= q8.RECIPROCAL_MAX
    assert same_bits(got, torch.ones_like(s) / s)[exact].all()
    assert (got[~exact] == 0).all()  # above 2^126, inf and NaN: 0 (the PyTorch side does the same)
    # q8_dynamic's block reciprocal: the PyTorch formula's bits for every finite s (inf and NaN give NaN there)
    finite = torch.isfinite(s)
    got = apply(s, 4)
    assert same_bits(got, dynamic.reciprocal(s))[finite].all() and torch.isnan(got[~finite]).all()


def test_scale_reciprocal():
    gen = torch.Generator().manual_seed(2)
    s = torch.exp2(torch.rand(1 << 20, generator=gen) * 140 - 40)  # 2^-40 (< 1e-12) .. 2^100
    edges = torch.tensor([q8.SCALE_FLOOR, 1.0, 2.0**126, 2.0**127, 3e38, float("inf"), float("nan")])
    check_scale_reciprocal(torch.cat([s, edges, torch.nextafter(edges[2:3], edges[3:4])]).to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_scale_reciprocal_every_input_on_gpu():
    first = int(torch.tensor(q8.SCALE_FLOOR).view(torch.int32))
    last = int(torch.tensor(float("inf")).view(torch.int32))
    for part in torch.arange(first, last + 1, device="cuda", dtype=torch.int32).split(1 << 28):
        check_scale_reciprocal(part.view(torch.float32))


def test_inverse_softsign_every_code():
    q = torch.arange(-127, 128, dtype=torch.float32, device=DEVICE)
    assert same_bits(apply(q, 1), q / (254.0 - q.abs())).all()


@pytest.mark.parametrize("n", [127, 32767])
def test_ecc_decode_quotient_every_code(n):
    rho = torch.arange(-n, n + 1, dtype=torch.float32, device=DEVICE)
    assert same_bits(apply(rho, 2, n), rho / torch.full((), float(n), device=DEVICE)).all()
