"""The built-in optimizers, exported by class name: ``from optgen.optim import AdamW, FlashAdamW``.

Each comes from a committed module in generated/ (built from specs/ by ``optgen build``).
"""

from __future__ import annotations

import importlib
import pkgutil

import optgen.generated
from optgen.runtime import OptgenOptimizer

__all__: list[str] = []

for _info in sorted(pkgutil.iter_modules(optgen.generated.__path__), key=lambda m: m.name):
    _module = importlib.import_module(f"optgen.generated.{_info.name}")
    for _name, _value in vars(_module).items():
        if isinstance(_value, type) and issubclass(_value, OptgenOptimizer) and _value.__module__ == _module.__name__:
            globals()[_name] = _value
            __all__.append(_name)
