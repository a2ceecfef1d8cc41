"""``FiniteDiff``: the DARTS approximation, a central difference of the mixed second derivative."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImplicitMethod, Solution, Trajectory, as_solution
from .handover import Handed, claim
from .linear import tree_axpy, tree_norm
from .products import upper_gradient


def mixed_difference(point: Solution | Trajectory, direction: dict, eps: float) -> dict:
    """-(∂²L/∂θ_U∂θ_L) d  by a central difference along d:

        -(∇_{θ_U} L(θ_L + ε'd, θ_U) - ∇_{θ_U} L(θ_L - ε'd, θ_U)) / (2ε'),   ε' = eps / ‖d‖.

    Two gradients of the lower loss in θ_U; exact (to rounding) when L is quadratic in θ_L, else the
    error is O(ε'²) times the third derivative. θ_L is the block's final point; nothing is mutated
    but a d handed over by the step (``handover``), whose buffers then hold the perturbed points
    (θ_L - ε'd is formed as 2θ_L - (θ_L + ε'd), ``reflected``). A zero d gives zero.
    ``point``: a ``Solution`` (or a trajectory's).
    """
    sol = as_solution(point)
    scale = step_size(direction, eps)
    moved = perturbed(direction, scale, sol.params)
    g_plus = upper_gradient(sol, dict(moved))
    moved = reflected(moved, sol.params)
    g_minus = upper_gradient(sol, moved)
    return {k: -(g_plus[k] - g_minus[k]) / (2 * scale) for k in g_plus}


def perturbed(direction: dict, scale, own: dict) -> Handed:
    """θ + ε' d, in d's buffers when d is handed over and nothing else sees them
    (``handover.claim``), else in new ones; handed over in turn (to ``reflected``)."""
    direction, writable = claim(direction)
    if not writable:
        return Handed(tree_axpy(scale, direction, own))
    for k, t in direction.items():
        t.mul_(scale).add_(own[k])
    return Handed(direction)


def reflected(moved: dict, own: dict) -> dict:
    """2θ - moved: θ - ε' d from ``perturbed``'s θ + ε' d (exact but for the rounding of the
    subtraction: 2θ is exact), in ``moved``'s buffers when it may overwrite them."""
    moved, writable = claim(moved)
    if not writable:
        return {k: 2 * own[k] - t for k, t in moved.items()}
    for k, t in moved.items():
        t.neg_().add_(own[k], alpha=2)
    return moved


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

    consumes_cotangent = True  # its source reads v once: the perturbed points are built in v's buffers
    second_order = False  # gradients of the lower loss only (the mixed product is a difference)

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"FiniteDiff(eps=...) must be > 0, got {self.eps!r}")

    def solution_vjp(self, solution: Solution, v: dict) -> dict:
        return mixed_difference(solution, v, self.eps)

    def source(self, me: str) -> list:
        return [f"scale = finite_diff.step_size(v, {self.eps!r})  # ε / ‖v‖",
                "moved = finite_diff.perturbed(v, scale, solution.params)  # θ + ε v/‖v‖ (in v's buffers)",
                "g_plus = products.upper_gradient(solution, dict(moved))  # ∇_θU L(θ + ε v/‖v‖)",
                "moved = finite_diff.reflected(moved, solution.params)  # θ - ε v/‖v‖ = 2θ - (θ + ε v/‖v‖)",
                "g_minus = products.upper_gradient(solution, moved)  # ∇_θU L(θ - ε v/‖v‖)",
                "return {k: -(g_plus[k] - g_minus[k]) / (2 * scale) for k in g_plus}  # ≈ -(∂²L/∂θ_U∂θ) v"]
