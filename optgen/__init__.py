"""optgen: a compiler for memory-efficient PyTorch optimizers.

``optgen.load("my_spec.yaml")`` builds a spec in-process and returns its optimizer class; the built-in
optimizers are in ``optgen.optim``.
"""

from optgen.build import load
from optgen.errors import SpecError
from optgen.runtime.offload import offloaded

__all__ = ["SpecError", "load", "offloaded"]
__version__ = "0.1.0"
