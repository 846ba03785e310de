"""Plain floating-point storage: the value is kept as one tensor and cast to/from fp32 (round to nearest even)."""

from __future__ import annotations

from optgen.codecs.base import Buffer, Codec


class PlainCodec(Codec):
    roles = frozenset({"param", "grad", "state"})
    dtype: str

    def buffers(self) -> list[Buffer]:
        return [Buffer("", self.dtype)]

    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        return [f"{out} = {refs[0]}.reshape(-1).float()"]

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        return [f"{refs[0]}.copy_({value}.view({refs[0]}.shape))"]

    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"{out} = tl.load({ptrs[0]} + {offs}, mask={mask}, other=0.0).to(tl.float32)"]

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        return [f"optgen_tl.store_rne({ptrs[0]} + {offs}, {value}, {mask})"]


class Native(PlainCodec):
    """Whatever floating dtype the parameter has (fp32, bf16 or fp16); math still runs in fp32."""

    name = "native"
    dtype = "param"
    param_dtypes = ("float32", "bfloat16", "float16")


class Fp32(PlainCodec):
    name = "fp32"
    dtype = "float32"
    param_dtypes = ("float32",)
    lossless = True


class Bf16(PlainCodec):
    name = "bf16"
    dtype = "bfloat16"
    param_dtypes = ("bfloat16",)


class Fp16(PlainCodec):
    name = "fp16"
    dtype = "float16"
    param_dtypes = ("float16",)
