"""What generated optimizer modules import: the base class, its layout records and host math."""

from optgen.runtime import hostmath
from optgen.runtime.optimizer import FP32_STATE_ATTR, Buffer, HyperParamRule, OptgenOptimizer, Variant

__all__ = ["FP32_STATE_ATTR", "Buffer", "HyperParamRule", "OptgenOptimizer", "Variant", "hostmath"]
