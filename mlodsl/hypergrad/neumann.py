"""``Neumann``: implicit differentiation with H⁻¹v by a truncated Neumann series (Lorraine et al. 2020)."""
from __future__ import annotations

from .implicit import Implicit
from .linear import neumann_solver


class Neumann(Implicit):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) x,  x = α Σ_{j=0}^{iters} (I - αH)^j v  ≈ H⁻¹ v
    (H + damping·I in place of H with ``damping``).

    Converges as iters → ∞ when 0 < α < 2/λ_max(H) (H positive definite); the error of x is
    (I - αH)^{iters+1} H⁻¹ v, so it shrinks like (1 - α λ_min)^{iters}. With α the lower level's
    SGD learning rate this is the gradient of ``iters`` + 1 unrolled steps taken at the solution.
    A step whose terms grow (‖(I - αH)^{iters} v‖ > ‖v‖: α too large, or H not positive definite)
    raises ``DivergenceError`` (``on_divergence="warn"``: warns and goes on).
    Cost: ``iters`` Hessian-vector products, one mixed VJP; memory O(d).
    """

    growth_fix = ("Use a smaller alpha= (below 2/λ_max(H)), or, for a non-convex lower level, "
                  "damping= above the magnitude of H's most negative eigenvalue")

    def __init__(self, iters: int, alpha: float, damping: float = 0.0, on_divergence: str = "raise"):
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"Neumann(iters=...) must be an int >= 0, got {iters!r}")
        if not alpha > 0:
            raise ValueError(f"Neumann(alpha=...) must be > 0, got {alpha!r}")
        super().__init__(neumann_solver(iters, alpha), damping, on_divergence)
        self.iters, self.alpha = iters, alpha

    def __repr__(self) -> str:
        return f"Neumann(iters={self.iters}, alpha={self.alpha}" + (
            f", damping={self.damping})" if self.damping else ")")
