"""Implicit differentiation of a lower level's stationarity, with the linear solver as a parameter.

At a solution of the lower level, ∇_{θ_L} L(θ_L*(θ_U), θ_U) = 0. Differentiating this identity
(the implicit function theorem, as in jaxopt's ``root_vjp``):

    H dθ_L*/dθ_U = -∂²L/∂θ_L∂θ_U,    H = ∂²L/∂θ_L²,

so the best-response VJP with the upper level's cotangent v = ∂f_U/∂θ_L is

    vᵀ dθ_L*/dθ_U = -(∂²L/∂θ_U∂θ_L) x,    where  H x = v    (H symmetric).

Only the linear solve differs between methods: ``solve(matvec, v) -> x`` with ``matvec(w) = H w``.
Both products are taken at the block's final point θ_L^K, which stands in for θ_L*; the levels
below the lower level are held where the block ended, and a cotangent on them (an upper loss that
also takes a deeper level) is not used (Betty's choice; see docs/hypergradients.md). The block's start, even when it
depends on θ_U (``start_from=<upper>``), does not enter: at a true solution it does not matter.
"""
from __future__ import annotations

from typing import Callable

from .base import Trajectory, check_on_divergence, diverged
from .linear import solve_with_info
from .products import linearize, negate


class ConvergenceWarning(RuntimeWarning):
    """An implicit method's linear solve stopped before it converged (``CG``'s residual above its
    ``warn_residual``): the hypergradient is that of a partial solve. Warned once per level, after
    the step (which is taken); the residual stays in the level's metrics (``<level>/cg_residual``)."""


def implicit_vjp(traj: Trajectory, v: dict, solve: Callable, damping: float = 0.0) -> dict:
    """-(∂²L/∂θ_U∂θ_L) x with (H + damping·I) x = v solved by ``solve(matvec, v)``."""
    hessian_matvec, cross_vjp = linearize(traj, damping)
    x = solve_with_info(solve, hessian_matvec, v, traj.report)
    return negate(cross_vjp(x))


class Implicit:
    """The implicit hypergradient with any linear solver ``solve(matvec, b) -> x`` (see ``linear``).

    ``Implicit(my_solver)`` is a complete method; ``CG`` and ``Neumann`` are this class with the
    solvers of ``mlodsl.hypergrad.linear``. A solver that writes the diagnostics of those solvers
    into its ``info`` (``cg_indefinite``, ``cg_residual``, ``neumann_growth``) is checked for
    divergence after the step (``base.diverged``; ``on_divergence="warn"`` warns instead of raising).
    """

    keeps_path = False
    replays_updates = False  # uses the loss alone, not the updates
    products_only = True  # products of the loss at the final point: one compiled region under compile=True
    second_order = True  # Hessian and mixed products of the lower loss

    # what to change when a Neumann-type solve grows (the subclasses name their own options)
    growth_fix = "Use a solver that converges on this system, or add damping="

    def __init__(self, solve: Callable, damping: float = 0.0, on_divergence: str = "raise"):
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        self.solve, self.damping = solve, damping
        self.on_divergence = check_on_divergence(on_divergence)

    def diverged(self, diagnostics: dict) -> str | None:
        """What the solver's diagnostics say went wrong (``base.diverged``), or None."""
        return diverged(diagnostics, self.growth_fix)

    def __repr__(self) -> str:
        return f"Implicit({getattr(self.solve, '__name__', self.solve)!r}, damping={self.damping})"

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        return implicit_vjp(traj, cotangent[traj.level], self.solve, self.damping)
