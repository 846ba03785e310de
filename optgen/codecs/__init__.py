"""Storage formats. ``get_codec`` looks one up by the name a spec uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optgen.codecs.base import Buffer, Codec
from optgen.codecs.bf16_sr import Bf16SR
from optgen.codecs.dynamic import Q4Dynamic, Q4Linear, Q8Dynamic
from optgen.codecs.ecc import Bf16Ecc8, Bf16Ecc16, Fp16Ecc8, NarrowEcc8
from optgen.codecs.fp8 import Fp8E4M3Norm, Fp8E5M2Norm
from optgen.codecs.kahan import Bf16Kahan
from optgen.codecs.plain import Bf16, Fp16, Fp32, Native
from optgen.codecs.q8 import Q8Linear, Q8Softsign, Q8Sqrt
from optgen.errors import SpecError

CODECS: dict[str, type[Codec]] = {c.name: c for c in (Native, Fp32, Bf16, Fp16)}
CODECS.update({c.name: c for c in (Q8Linear, Q8Softsign, Q8Sqrt, Q8Dynamic, Q4Dynamic, Q4Linear,
                                    Fp8E4M3Norm, Fp8E5M2Norm, Bf16SR, Bf16Ecc8, Bf16Ecc16, Fp16Ecc8, NarrowEcc8,
                                    Bf16Kahan)})


def get_codec(name: str, options: dict[str, Any], role: str, fail: Callable[[str], SpecError]) -> Codec:
    """Instantiate the codec ``name`` for ``role``; ``fail(message)`` builds an error naming the field."""
    if name not in CODECS:
        raise fail(f"unknown storage '{name}' (known: {', '.join(sorted(CODECS))})")
    cls = CODECS[name]
    if role not in cls.roles:
        raise fail(f"storage '{name}' cannot hold the {role}")
    return cls(options, fail)


__all__ = ["CODECS", "Buffer", "Codec", "get_codec"]
