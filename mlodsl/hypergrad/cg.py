"""``CG``: implicit differentiation with H x = v solved by conjugate gradient (iMAML, Rajeswaran et al. 2019)."""
from __future__ import annotations

from .implicit import Implicit
from .linear import cg_solver


class CG(Implicit):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) x, (H + damping·I) x = v by ``iters`` steps of conjugate gradient.

    Exact after d iterations on a d-parameter lower level when H + damping·I is positive definite
    (to rounding). ``tol``: stop once ‖r‖ ≤ tol (one host synchronisation per iteration).
    ``damping`` > 0 regularizes an indefinite or ill-conditioned H (the solution then has a bias).
    A step whose solve meets pᵀHp < 0 or ends with a residual above the initial one raises
    ``DivergenceError`` (``on_divergence="warn"``: warns and goes on).
    Cost: ``iters`` Hessian-vector products, one mixed VJP and two linearizations; memory O(d).
    """

    def __init__(self, iters: int, tol: float | None = None, damping: float = 0.0, on_divergence: str = "raise"):
        if not isinstance(iters, int) or iters < 1:
            raise ValueError(f"CG(iters=...) must be a positive int, got {iters!r}")
        super().__init__(cg_solver(iters, tol), damping, on_divergence)
        self.iters, self.tol = iters, tol

    def __repr__(self) -> str:
        extra = (f", tol={self.tol}" if self.tol is not None else "") + \
                (f", damping={self.damping}" if self.damping else "")
        return f"CG(iters={self.iters}{extra})"
