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

import abc
from dataclasses import dataclass
from typing import Callable

from .base import ImplicitMethod, Solution, Trajectory, as_solution, check_on_divergence, diverged
from .linear import solve_with_info
from .products import linearize, negate


class ConvergenceWarning(RuntimeWarning):
    """An implicit method's linear solve stopped before it converged (``CG``'s residual above its
    ``warn_residual``): the hypergradient is that of a partial solve. Warned once per level, after
    the step (which is taken); the residual stays in the level's metrics (``<level>/cg_residual``)."""


def implicit_vjp(point: Solution | Trajectory, v: dict, solve: Callable, damping: float = 0.0) -> dict:
    """-(∂²L/∂θ_U∂θ_L) x with (H + damping·I) x = v solved by ``solve(matvec, v)``, at the
    ``Solution`` ``point`` (or a trajectory's)."""
    sol = as_solution(point)
    hessian_matvec, cross_vjp = linearize(sol, damping)
    x = solve_with_info(solve, hessian_matvec, v, sol.report)
    return negate(cross_vjp(x))


def check_damping(damping: float) -> float:
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    return damping


def residual_note(residual, threshold: float, silence: str) -> str | None:
    """The warning for a CG solve whose final ‖r‖/‖v‖ is above ``threshold``, or None. ``silence``:
    how the method turns the warning off."""
    if residual is None or not residual > threshold:
        return None
    return (f"did not converge: its final residual ‖r‖/‖v‖ = {residual:.3g} is above {threshold:g}, so the "
            f"hypergradient is that of a partial solve of (H + damping·I) x = v (H near-singular or badly "
            f"conditioned: LoRA adapters, a lower level far from its minimum or with a vanishing penalty). "
            f"Above 1 is not divergence: CG's residual is not monotone, while its error in the H-norm still "
            f"fell at every iteration. Add damping= (about 1/(lr·steps) of the lower level's SGD matches the "
            f"horizon its own updates cover), or more iters={silence}")


class LinearSystemMethod(ImplicitMethod):
    """The implicit hypergradient with the linear solve ``solver()`` of (H + ``damping``·I) x = v.

    A solver that writes the diagnostics of ``mlodsl.hypergrad.linear``'s solvers into its
    ``info`` (``cg_indefinite``, ``cg_residual``, ``neumann_growth``) is checked for divergence
    after the step (``base.diverged``; ``on_divergence="warn"`` warns instead of raising); a CG
    residual above 1 is warned about (``unconverged``)."""

    second_order = True  # Hessian and mixed products of the lower loss
    damping: float = 0.0
    # what to change when a Neumann-type solve grows (the subclasses name their own options)
    growth_fix = "Use a solver that converges on this system, or add damping="

    @abc.abstractmethod
    def solver(self) -> Callable:
        """``solve(matvec, b) -> x`` (see ``mlodsl.hypergrad.linear``)."""

    def solution_vjp(self, solution: Solution, v: dict) -> dict:
        return implicit_vjp(solution, v, self.solver(), self.damping)

    def solve_source(self, me: str) -> str:
        """The expression of x in the generated step, from ``hessian_vp`` and ``v``."""
        return f"linear.solve_with_info({me}.solver(), hessian_vp, v, info.__setitem__)"

    def source(self, me: str) -> list:
        """``implicit_vjp`` written out: one linearization of ∇_θ L, the solve, the mixed product."""
        damping = f", damping={self.damping!r}" if self.damping else ""
        return [f"hessian_vp, cross_vjp = products.linearize(solution{damping})  # w ↦ (∂²L/∂θ² + λI) w;  "
                f"x ↦ (∂²L/∂θ_U∂θ) x",
                f"x = {self.solve_source(me)}  # (∂²L/∂θ² + λI) x = v",
                "return products.negate(cross_vjp(x))"]

    def diverged(self, diagnostics: dict) -> str | None:
        """What the solver's diagnostics say went wrong (``base.diverged``), or None."""
        return diverged(diagnostics, self.growth_fix)

    def unconverged(self, diagnostics: dict) -> str | None:
        """A conjugate-gradient solve that ended with ‖r‖/‖v‖ above 1: a partial solve (warned)."""
        return residual_note(diagnostics.get("cg_residual"), 1.0, "")


@dataclass(frozen=True, repr=False)
class Implicit(LinearSystemMethod):
    """The implicit hypergradient with any linear solver ``solve(matvec, b) -> x`` (see ``linear``).

    ``Implicit(my_solver)`` is a complete method; ``CG``, ``Neumann`` and ``Nystrom`` are this
    method with the solvers of ``mlodsl.hypergrad.linear`` and ``nystrom``.
    """

    solve: Callable
    damping: float = 0.0
    on_divergence: str = "raise"

    def __post_init__(self):
        check_damping(self.damping)
        check_on_divergence(self.on_divergence)

    def solver(self) -> Callable:
        return self.solve
