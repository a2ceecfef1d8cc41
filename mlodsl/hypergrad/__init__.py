"""Hypergradient methods: how a lower level's response is differentiated for the levels above.

Each method is set on the lower level (``@ml.level(..., hypergrad=ml.hypergrad.CG(iters=10))``) and
has the interface documented in ``mlodsl.hypergrad.base``. Costs and measured errors of each are in
``docs/hypergradients.md``.
"""
from .base import DivergenceError, DivergenceWarning, Trajectory
from .cg import CG
from .finite_diff import FiniteDiff
from .fixed_point import FixedPoint
from .implicit import ConvergenceWarning, Implicit
from .linear import cg_solver, neumann_solver
from .neumann import Neumann
from .nystrom import Nystrom, nystrom_solver
from .sama import SAMA
from .unroll import FirstOrder, Forward, Unroll
from .zero_order import ZeroOrder

__all__ = ["Trajectory", "DivergenceError", "DivergenceWarning", "ConvergenceWarning", "Unroll", "Forward",
           "FirstOrder", "Implicit", "CG", "Neumann", "FixedPoint", "FiniteDiff", "SAMA", "ZeroOrder",
           "Nystrom", "cg_solver", "neumann_solver", "nystrom_solver"]
