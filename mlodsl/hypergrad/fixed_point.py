"""``FixedPoint``: implicit differentiation through the fixed point of the lower level's update map."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import autodiff
from .base import Method, Trajectory, check_on_divergence, diverged
from .linear import neumann_solver, solve_with_info


def fixed_point_vjp(traj: Trajectory, v: dict, solve: Callable) -> dict:
    """vᵀ dθ_L*/dθ_U at a fixed point θ_L* = Φ(θ_L*, θ_U) of the update map Φ (``traj.update_map``).

    Differentiating the fixed point:  dθ*/dθ_U = (I - A)⁻¹ ∂Φ/∂θ_U  with  A = ∂Φ/∂θ_L, so

        vᵀ dθ*/dθ_U = (∂Φ/∂θ_U)ᵀ w,   (I - Aᵀ) w = v.

    The solver gets ``matvec(w) = w - Aᵀw`` (one VJP of Φ in θ_L, "Aᵀw = (wᵀA)ᵀ"); the default,
    Richardson with step 1, is the iteration w ← v + Aᵀ w. For SGD, Φ = θ - η∇L, A = I - ηH and
    this is exactly the implicit hypergradient with H⁻¹ by a Neumann series of step η. For Adam or
    momentum, Φ uses the optimizer state where the block ended (so the moments are held fixed).
    """
    own = traj.own(traj.final)
    _, pull_own = autodiff.vjp_fn(lambda o: traj.update_map(o, traj.upper), own)
    _, pull_upper = autodiff.vjp_fn(lambda u: traj.update_map(own, u), traj.upper)

    def matvec(w):
        aw = pull_own(w)[0]
        return {k: w[k] - aw[k] for k in w}

    return pull_upper(solve_with_info(solve, matvec, v, traj.report))[0]


@dataclass(frozen=True, repr=False)
class FixedPoint(Method):
    """vᵀ dθ_L*/dθ_U through the fixed point of the lower level's optimizer update (see
    ``fixed_point_vjp``). ``iters`` iterations of w ← v + (∂Φ/∂θ_L)ᵀ w from w = v; they converge
    when the update is a contraction (SGD: learning rate below 2/λ_max(H)); the error of w after
    ``iters`` iterations is Aᵀ^{iters+1} (I - Aᵀ)⁻¹ v. ``solve`` replaces the iteration with any
    solver ``solve(matvec, v)`` of (I - Aᵀ) w = v (note that I - Aᵀ is not symmetric for Adam).
    An iteration whose iterates grow (an expansive update map: the learning rate above 2/λ_max, or
    a lower loss that is not convex there) raises ``DivergenceError`` (``on_divergence="warn"``:
    warns and goes on).
    Cost: ``iters`` VJPs of the update map (each one Hessian-vector product), one VJP in θ_U.
    """

    iters: int
    solve: Callable | None = None
    on_divergence: str = "raise"

    replays_updates = True  # re-runs or differentiates the optimizer updates
    second_order = True  # VJPs of the update map, which contains the lower gradient

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"FixedPoint(iters=...) must be an int >= 0, got {self.iters!r}")
        check_on_divergence(self.on_divergence)

    def solver(self) -> Callable:
        """``solve``, or Richardson's iteration with step 1 (``iters`` terms of a Neumann series)."""
        return self.solve if self.solve is not None else neumann_solver(self.iters, 1.0)

    def diverged(self, diagnostics: dict) -> str | None:
        """What the solver's diagnostics say went wrong (``base.diverged``), or None."""
        return diverged(diagnostics, "The lower level's update map is expansive at the block's end: use a "
                                     "smaller learning rate (alpha) in its optimizer, or a solver of "
                                     "(I - ∂Φ/∂θᵀ) w = v that does not iterate the map (solve=), or "
                                     "CG(iters, damping=...) for a non-convex lower level")

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        return fixed_point_vjp(traj, cotangent[traj.level], self.solver())
