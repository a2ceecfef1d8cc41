"""``Neumann``: implicit differentiation with H⁻¹v by a truncated Neumann series (Lorraine et al. 2020)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import check_on_divergence
from .implicit import LinearSystemMethod, check_damping
from .linear import neumann_solver


@dataclass(frozen=True, repr=False)
class Neumann(LinearSystemMethod):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) x,  x = α Σ_{j=0}^{iters} (I - αH)^j v  ≈ H⁻¹ v
    (H + damping·I in place of H with ``damping``).

    Converges as iters → ∞ when 0 < α < 2/λ_max(H) (H positive definite); the error of x is
    (I - αH)^{iters+1} H⁻¹ v, so it shrinks like (1 - α λ_min)^{iters}. With α the lower level's
    SGD learning rate this is the gradient of ``iters`` + 1 unrolled steps taken at the solution.
    A step whose terms grow (‖(I - αH)^{iters} v‖ > ‖v‖: α too large, or H not positive definite)
    raises ``DivergenceError`` (``on_divergence="warn"``: warns and goes on).
    Cost: ``iters`` Hessian-vector products, one mixed VJP; memory O(d).
    """

    iters: int
    alpha: float
    damping: float = 0.0
    on_divergence: str = "raise"

    growth_fix = ("Use a smaller alpha= (below 2/λ_max(H)), or, for a non-convex lower level, "
                  "damping= above the magnitude of H's most negative eigenvalue")

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"Neumann(iters=...) must be an int >= 0, got {self.iters!r}")
        if not self.alpha > 0:
            raise ValueError(f"Neumann(alpha=...) must be > 0, got {self.alpha!r}")
        check_damping(self.damping)
        check_on_divergence(self.on_divergence)

    def solver(self) -> Callable:
        return neumann_solver(self.iters, self.alpha)

    def solve_source(self, me: str) -> str:
        return f"linear.neumann_series(hessian_vp, v, iters={self.iters}, alpha={self.alpha!r}, info=info)"
