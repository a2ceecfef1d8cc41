"""``CG``: implicit differentiation with H x = v solved by conjugate gradient (iMAML, Rajeswaran et al. 2019)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .base import Solution, check_on_divergence
from .implicit import LinearSystemMethod, check_damping, residual_note
from .linear import cg_solver, conjugate_gradient
from .products import joint_products, negate, upper_zeros

WARN_RESIDUAL = 0.5  # CG(warn_residual=...)'s default: the solve has not even halved ‖v - Hx‖


@dataclass(frozen=True, repr=False)
class CG(LinearSystemMethod):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) x, (H + damping·I) x = v by ``iters`` steps of conjugate gradient.

    Exact after d iterations on a d-parameter lower level when H + damping·I is positive definite
    (to rounding). ``tol``: stop once ‖r‖ ≤ tol (one host synchronisation per iteration).
    ``damping`` > 0 regularizes an indefinite or ill-conditioned H (the solution then has a bias).
    A step whose solve meets pᵀHp < 0 raises ``DivergenceError`` (``on_divergence="warn"``: warns
    and goes on). A step whose solve ends with ‖r‖/‖v‖ above ``warn_residual`` (default 0.5) has
    not converged: the hypergradient is that of a partial solve, and the Program warns once per
    level (``ConvergenceWarning``, with the residual and the fix: ``damping=``, more ``iters=``);
    ``warn_residual=None`` never warns. A residual above 1 is warned about too, not raised: with
    positive curvature CG's error in the H-norm falls at every iteration while its residual need not.
    Cost: ``iters`` products of one linearization, each giving a Hessian-vector product and the
    mixed product of the same direction; memory O(d): r, p and A p (x is not formed: the mixed
    products are summed as CG goes, ``conjugate_gradient(readout=...)``; in the step, r and p
    reuse the cotangent's buffers). ``low_memory=True`` takes each product afresh by reverse over
    forward (``products.joint_products(fresh=True)``): the same numbers, without holding the
    linearized gradient's graph through the solve and with smaller transients, for one more forward
    pass per iteration; every op of the loss needs a forward-mode derivative (a Program refuses it at
    build, naming the op, where one has none). ``low_memory=False`` keeps the linearization.
    ``low_memory=None`` (the default) lets the Program choose at build (``mlodsl.forward_mode``):
    reverse over forward for a level of at least ``forward_mode.LOW_MEMORY_FROM`` parameters whose
    products are taken eagerly on one process and whose loss passed a forward-mode probe, the
    linearization otherwise; ``print(prog.plan)`` shows the choice (its "products" column). Outside
    a Program (``solution_vjp`` called directly), None is the linearization.
    """

    consumes_cotangent = True  # its source reads v once: conjugate_gradient builds r and p in v's buffers

    iters: int
    tol: float | None = None
    damping: float = 0.0
    on_divergence: str = "raise"
    warn_residual: float | None = WARN_RESIDUAL
    low_memory: bool | None = None

    def unconverged(self, diagnostics: dict) -> str | None:
        """What to warn about when the step's worst residual ‖r‖/‖v‖ is above ``warn_residual``, or None."""
        if self.warn_residual is None:
            return None
        return residual_note(diagnostics.get("cg_residual"), self.warn_residual,
                             "; CG(..., warn_residual=None) silences this")

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"CG(iters=...) must be a positive int, got {self.iters!r}")
        if self.warn_residual is not None and not self.warn_residual > 0:
            raise ValueError(f"CG(warn_residual=...) must be > 0 or None, got {self.warn_residual!r}")
        check_damping(self.damping)
        check_on_divergence(self.on_divergence)

    def solver(self) -> Callable:
        return cg_solver(self.iters, self.tol)

    def solution_vjp(self, solution: Solution, v: dict) -> dict:
        """-(∂²L/∂θ_U∂θ_L) x = -Σₖ αₖ (∂²L/∂θ_U∂θ_L) pₖ over CG's directions pₖ (``implicit_vjp`` with
        ``solver()``, to rounding, without the vector x)."""
        info: dict = {}
        products = joint_products(solution, self.damping, bool(self.low_memory))
        bx = conjugate_gradient(products, v, iters=self.iters, tol=self.tol, info=info,
                                readout=upper_zeros(solution))
        for key, value in info.items():
            solution.report(key, value)
        return negate(bx)

    def source(self, me: str) -> list:
        """``solution_vjp`` as the lines of the generated step (``Method.source``)."""
        damping = f", damping={self.damping!r}" if self.damping else ""
        tol = f", tol={self.tol!r}" if self.tol is not None else ""
        fresh = ", fresh=True" if self.low_memory else ""
        how = "by reverse over forward, afresh" if self.low_memory else "one backward pass"
        return ["# -(∂²L/∂θ_U∂θ) x, (∂²L/∂θ² + λI) x = v by CG, as Σ_k α_k (∂²L/∂θ_U∂θ) p_k: x is never formed",
                f"joint_vp = products.joint_products(solution{damping}{fresh})  # w ↦ ((∂²L/∂θ² + λI) w, "
                f"(∂²L/∂θ_U∂θ) w): {how}",
                f"return products.negate(linear.conjugate_gradient(joint_vp, v, iters={self.iters}{tol}, info=info, "
                f"readout=products.upper_zeros(solution)))"]
