"""``CG``: implicit differentiation with H x = v solved by conjugate gradient (iMAML, Rajeswaran et al. 2019)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import check_on_divergence
from .implicit import LinearSystemMethod, check_damping
from .linear import cg_solver


@dataclass(frozen=True, repr=False)
class CG(LinearSystemMethod):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) x, (H + damping·I) x = v by ``iters`` steps of conjugate gradient.

    Exact after d iterations on a d-parameter lower level when H + damping·I is positive definite
    (to rounding). ``tol``: stop once ‖r‖ ≤ tol (one host synchronisation per iteration).
    ``damping`` > 0 regularizes an indefinite or ill-conditioned H (the solution then has a bias).
    A step whose solve meets pᵀHp < 0 or ends with a residual above the initial one raises
    ``DivergenceError`` (``on_divergence="warn"``: warns and goes on).
    Cost: ``iters`` Hessian-vector products, one mixed VJP and two linearizations; memory O(d).
    """

    iters: int
    tol: float | None = None
    damping: float = 0.0
    on_divergence: str = "raise"

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"CG(iters=...) must be a positive int, got {self.iters!r}")
        check_damping(self.damping)
        check_on_divergence(self.on_divergence)

    def solver(self) -> Callable:
        return cg_solver(self.iters, self.tol)
