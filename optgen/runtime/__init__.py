"""What generated optimizer modules import: the base class, its layout records and host math."""

from optgen.runtime import hostmath
from optgen.runtime.optimizer import Buffer, HyperParamRule, OptgenOptimizer

__all__ = ["Buffer", "HyperParamRule", "OptgenOptimizer", "hostmath"]
