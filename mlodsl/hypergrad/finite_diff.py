"""``FiniteDiff``: the DARTS approximation, a central difference of the mixed second derivative."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImplicitMethod, Solution, Trajectory, as_solution
from .linear import tree_axpy, tree_norm
from .products import upper_gradient


def mixed_difference(point: Solution | Trajectory, direction: dict, eps: float) -> dict:
    """-(∂²L/∂θ_U∂θ_L) d  by a central difference along d:

        -(∇_{θ_U} L(θ_L + ε'd, θ_U) - ∇_{θ_U} L(θ_L - ε'd, θ_U)) / (2ε'),   ε' = eps / ‖d‖.

    Two gradients of the lower loss in θ_U; exact (to rounding) when L is quadratic in θ_L, else the
    error is O(ε'²) times the third derivative. θ_L is the block's final point; nothing is mutated.
    A zero d gives zero. ``point``: a ``Solution`` (or a trajectory's).
    """
    sol = as_solution(point)
    own = sol.params
    scale = step_size(direction, eps)
    g_plus = upper_gradient(sol, tree_axpy(scale, direction, own))
    g_minus = upper_gradient(sol, tree_axpy(-scale, direction, own))
    return {k: -(g_plus[k] - g_minus[k]) / (2 * scale) for k in g_plus}


def step_size(direction: dict, eps: float) -> torch.Tensor:
    """ε' = eps / ‖d‖: the perturbation θ ± ε' d has norm ``eps`` (a zero d gives a finite ε')."""
    norm = tree_norm(direction)
    return eps / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)


@dataclass(frozen=True, repr=False)
class FiniteDiff(ImplicitMethod):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) v: the implicit hypergradient with the Hessian taken to be
    the identity (H⁻¹ ≈ I), the mixed product by a central difference (``mixed_difference``).

    This is Betty's ``darts`` (DARTS read as implicit differentiation, Liu et al. 2019). DARTS
    itself unrolls one SGD step, θ' = θ - ξ∇L, which multiplies the same product by the inner
    learning rate ξ; mlodsl, like Betty, does *not* scale by ξ (fold it into the upper level's
    learning rate). Its error against the implicit hypergradient is -(∂²L/∂θ_U∂θ_L)(I - H⁻¹) v:
    zero when H = I, a factor 1/c off when H = c·I. ``eps`` is the perturbation's norm, as Betty's
    ``darts_alpha``. Cost: two gradients of the lower loss in θ_U; memory O(d).
    """

    eps: float = 0.01

    second_order = False  # gradients of the lower loss only (the mixed product is a difference)

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"FiniteDiff(eps=...) must be > 0, got {self.eps!r}")

    def solution_vjp(self, solution: Solution, v: dict) -> dict:
        return mixed_difference(solution, v, self.eps)

    def source(self, me: str) -> list:
        return [f"scale = finite_diff.step_size(v, {self.eps!r})  # ε / ‖v‖",
                "g_plus = products.upper_gradient(solution, linear.tree_axpy(scale, v, solution.params))  "
                "# ∇_θU L(θ + ε v/‖v‖)",
                "g_minus = products.upper_gradient(solution, linear.tree_axpy(-scale, v, solution.params))  "
                "# ∇_θU L(θ - ε v/‖v‖)",
                "return {k: -(g_plus[k] - g_minus[k]) / (2 * scale) for k in g_plus}  # ≈ -(∂²L/∂θ_U∂θ) v"]
