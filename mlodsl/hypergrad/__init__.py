"""Hypergradient methods: how a lower level's response is differentiated for the levels above.

Each method is set on the lower level (``@ml.level(..., hypergrad=ml.hypergrad.CG(iters=10))``) and
implements ``Method`` (``ImplicitMethod`` for those that use the lower level's ``Solution`` alone),
documented in ``mlodsl.hypergrad.base``. Costs and measured errors of each are in
``docs/hypergradients.md``.
"""
from .base import DivergenceError, DivergenceWarning, ImplicitMethod, Method, Solution, Trajectory
from .bome import BOME
from .cg import CG
from .finite_diff import FiniteDiff
from .fixed_point import FixedPoint
from .implicit import ConvergenceWarning, Implicit
from .linear import cg_solver, neumann_solver
from .mixed import MixedUnroll
from .neumann import Neumann
from .nystrom import Nystrom, nystrom_solver
from .penalty import F2SA
from .sama import SAMA
from .unroll import FirstOrder, Forward, Unroll
from .zero_order import ZeroOrder

__all__ = ["Method", "ImplicitMethod", "Trajectory", "Solution", "DivergenceError", "DivergenceWarning",
           "ConvergenceWarning",
           "Unroll", "MixedUnroll", "Forward", "FirstOrder", "Implicit", "CG", "Neumann", "FixedPoint",
           "FiniteDiff", "SAMA", "ZeroOrder", "F2SA", "BOME", "Nystrom", "cg_solver", "neumann_solver",
           "nystrom_solver"]
