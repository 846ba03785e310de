"""The codec interface: how one logical fp32 tensor (a parameter, gradient or state) is stored.

A codec owns everything about its format: the physical buffers (dtype and shape), their bytes per
element, their initial value, and the code that decodes to fp32 and encodes from fp32 for each backend.
Backends never look inside a format; they paste the codec's snippets around the update math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from optgen.errors import SpecError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int16": 2}


@dataclass(frozen=True)
class Buffer:
    """One physical tensor of a stored value.

    ``suffix`` is appended to the state name ("" for the main buffer); ``dtype`` is a torch dtype name
    or "param" (the parameter's own dtype); the shape is the parameter's.
    """

    suffix: str
    dtype: str
    init: float = 0.0


class Codec:
    """Base class; subclasses set ``name`` and ``roles`` and implement the renderings."""

    name: ClassVar[str]
    roles: ClassVar[frozenset[str]]  # which of "param", "grad", "state" may use this format
    param_dtypes: ClassVar[tuple[str, ...]] = ("float32",)  # dtypes accepted when it stores a parameter

    def __init__(self, options: dict[str, Any], fail: Callable[[str], SpecError]) -> None:
        """Validate the spec's options for this format; ``fail(message)`` builds the error to raise."""
        if options:
            raise fail(f"storage '{self.name}' takes no options, got: {', '.join(options)}")

    def buffers(self) -> list[Buffer]:
        raise NotImplementedError

    def bytes_per_element(self, param_bytes: int = 4) -> float:
        """Bytes this format holds per element (``param_bytes`` sizes buffers of dtype "param")."""
        return sum(param_bytes if b.dtype == "param" else DTYPE_BYTES[b.dtype] for b in self.buffers())

    # --- PyTorch backend: ``refs`` are expressions naming this tensor's buffers, in ``buffers()`` order.
    def torch_decode(self, refs: list[str]) -> str:
        """An fp32 tensor expression for the stored value."""
        raise NotImplementedError

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        """Statements that store the fp32 tensor ``value`` into the buffers (in place)."""
        raise NotImplementedError
