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

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int16": 2, "int32": 4,
               "float8_e4m3fn": 1, "float8_e5m2": 1, "ecc8": 1}


@dataclass(frozen=True)
class Buffer:
    """One physical tensor of a stored value.

    ``suffix`` is appended to the state name ("" for the main buffer); ``dtype`` is a torch dtype name,
    "param" (the parameter's own dtype) or "ecc8" (int8 codes for a bf16 parameter, the same bits as uint8 for an
    fp16 one: a correction term is read in its parameter's format only, and the dtype says which). ``shape`` is
    "param" (the parameter's shape), "groups" (1-D, one element per ``group_size`` elements, rounded up), "half" (1-D, ceil(numel / 2): two 4-bit
    codes per byte) or "scalar" (0-d, one value for the whole tensor).
    """

    suffix: str
    dtype: str
    init: float = 0.0
    shape: str = "param"


class Codec:
    """Base class; subclasses set ``name`` and ``roles`` and implement the renderings."""

    name: ClassVar[str]
    roles: ClassVar[frozenset[str]]  # which of "param", "grad", "state" may use this format
    param_dtypes: ClassVar[tuple[str, ...]] = ("float32",)  # dtypes accepted when it stores a parameter
    group_size: ClassVar[int] = 1  # elements per scale group (Triton tiles are rows of a multiple of it)
    needs_rng: ClassVar[bool] = False  # stochastic rounding: the renderings use the random streams (see below)
    lossless: ClassVar[bool] = False  # decode(encode(x)) == x for every fp32 x (a kernel may store it early)
    # Quantizes whole groups only: a tensor whose size is not a multiple of group_size keeps fp32 states (an option
    # of the formats that take it)
    whole_groups: bool = False
    # Triton register cap per thread its kernels were measured faster with (optgen.build.formats_register_cap)
    register_cap: ClassVar[int | None] = None
    # Whether a kernel holding this grouped format may tell Triton its tiles are aligned (vector loads), as measured
    # on its built-in spec (optgen.build.tile_config)
    aligned_hint: ClassVar[bool] = True
    imports: ClassVar[tuple[str, ...]] = ()  # import lines the generated module needs for the snippets
    # Read-only tables the Triton snippets use: (kernel argument name, host expression with {device}).
    constants: tuple[tuple[str, str], ...] = ()

    def __init__(self, options: dict[str, Any], fail: Callable[[str], SpecError]) -> None:
        """Validate the spec's options for this format; ``fail(message)`` builds the error to raise."""
        if options:
            raise fail(f"storage '{self.name}' takes no options, got: {', '.join(options)}")

    def _bool_option(self, options: dict[str, Any], name: str, default: bool,
                     fail: Callable[[str], SpecError]) -> bool:
        """The value of the format's one option ``name``, a boolean (``default`` where the spec leaves it out)."""
        unknown = sorted(set(options) - {name})
        if unknown:
            raise fail(f"storage '{self.name}' takes only the option '{name}', got: {', '.join(unknown)}")
        value = options.get(name, default)
        if not isinstance(value, bool):
            raise fail(f"storage '{self.name}': {name} must be true or false, got {value!r}")
        return value

    def buffers(self) -> list[Buffer]:
        raise NotImplementedError

    @property
    def quantized(self) -> bool:
        """Integer or fp8 codes: small tensors then keep fp32 states instead (see the "fp32" layout)."""
        return any(b.dtype not in ("param", "float32", "bfloat16", "float16") for b in self.buffers())

    def bytes_per_element(self, param_bytes: int = 4) -> float:
        """Bytes this format holds per element (``param_bytes`` sizes buffers of dtype "param")."""
        total = 0.0
        for b in self.buffers():
            size = param_bytes if b.dtype == "param" else DTYPE_BYTES[b.dtype]
            total += {"param": size, "groups": size / self.group_size, "half": size / 2, "scalar": 0.0}[b.shape]
        return total

    # --- PyTorch backend. ``refs`` are expressions naming this tensor's buffers, in ``buffers()`` order
    # (e.g. ``state_m[i]``, ``state_m_scale[i]``). Values in the update are flat 1-D fp32 tensors.
    def torch_decode(self, out: str, refs: list[str]) -> list[str]:
        """Statements that set ``out`` to the stored value as a flat fp32 tensor."""
        raise NotImplementedError

    def torch_encode(self, value: str, refs: list[str]) -> list[str]:
        """Statements that store the flat fp32 tensor ``value`` into the buffers, in place."""
        raise NotImplementedError

    # --- Triton backend. The kernel works on 2-D tiles: ``offs`` holds the tile's element offsets in the
    # flat tensor (shape [ROWS, COLS]; each row is COLS consecutive elements, COLS a multiple of every
    # codec's group_size, a row starts at a multiple of COLS), ``mask`` is ``offs < numel``, and ``ptrs``
    # are typed pointers to the first element of each buffer of this tensor. Values are fp32 tiles.
    # ``start`` (the tile's first offset, a multiple of ROWS * COLS) and ``numel_here`` (the number of elements
    # here: the local shard's under FSDP2) are in scope too: grouped codecs address their per-group values with them
    # (one vector per tile).
    # A codec with ``needs_rng`` may also use ``rng_seed``, ``rng_step`` and ``rng_stream`` (the tensor's stable id),
    # see optgen.codecs.rng.tl_rng_args.
    def triton_decode(self, out: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        """Statements that set ``out`` to the stored value as an fp32 tile (0 where masked)."""
        raise NotImplementedError

    def triton_encode(self, value: str, ptrs: list[str], offs: str, mask: str) -> list[str]:
        """Statements that store the fp32 tile ``value`` (masked elements are ignored)."""
        raise NotImplementedError
