"""Optimisation of one registration pair: instance optimisation of a velocity field
(:mod:`mambamorph.optimize.instance`); affine pre-alignment lives in its own module beside it."""

from mambamorph.optimize.instance import IOConfig, IOResult, instance_optimise

__all__ = ["IOConfig", "IOResult", "instance_optimise"]
