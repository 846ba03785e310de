"""Test set-up shared by all modules.

Without a GPU, Triton kernels run in Triton's interpreter. ``triton.jit`` reads TRITON_INTERPRET when a
kernel is defined, i.e. when a generated module is first imported, so it is set here, before any test
module imports optgen.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
