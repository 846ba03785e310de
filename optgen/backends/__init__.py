"""Backends: sympy printers that turn the IR into code (host scalars, PyTorch fallback, Triton kernel)."""
