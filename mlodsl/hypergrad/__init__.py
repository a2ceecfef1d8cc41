"""Hypergradient methods: how a lower level's response is differentiated for the levels above.

Each method is set on the lower level (``@ml.level(..., hypergrad=ml.hypergrad.CG(iters=10))``) and
has the interface documented in ``mlodsl.hypergrad.base``.
"""
from .base import Trajectory
from .unroll import FirstOrder, Forward, Unroll

__all__ = ["Trajectory", "Unroll", "Forward", "FirstOrder"]
