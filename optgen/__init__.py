"""optgen: a compiler for memory-efficient PyTorch optimizers.

``optgen.load("my_spec.yaml")`` builds a spec in-process and returns its optimizer class; the built-in
optimizers are in ``optgen.optim``; ``optgen.offloaded(cls)`` is ``cls`` with its states in pinned CPU memory
or paged under a GPU budget (``optgen.runtime.offload``).
"""

from optgen.build import load
from optgen.errors import SpecError
from optgen.runtime.offload import offloaded

__all__ = ["SpecError", "load", "offloaded"]
__version__ = "0.1.0"
