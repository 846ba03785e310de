"""optgen.codecs.conversion.int_to_float (inline assembly on the GPU) against torch's conversion, bit for bit,
on every 8- and 16-bit integer. The check counts on a GPU; the interpreter runs the plain conversion."""

import pytest
import torch
import triton
import triton.language as tl

from optgen.codecs.conversion import int_to_float

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@triton.jit
def _to_float(q_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, int_to_float(tl.load(q_ptr + offs, mask=mask, other=0)), mask=mask)


def launch(kernel, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    block = 4096 if CUDA else 1 << 16
    kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    return out


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_int_to_float_every_value(dtype):
    info = torch.iinfo(dtype)
    q = torch.arange(info.min, info.max + 1, dtype=torch.int32).to(dtype).to(DEVICE)
    got = launch(_to_float, q, torch.full(q.shape, float("nan"), device=DEVICE))
    assert torch.equal(got.view(torch.int32), q.float().view(torch.int32))
