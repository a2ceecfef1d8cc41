"""``ZeroOrder``: an evolution-strategies estimate of the best-response VJP, from lower-level runs only."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Trajectory
from .linear import tree_axpy, tree_scale
from ..tree import tree_add, tree_vdot, tree_zeros_like


def response(traj: Trajectory, cotangent: dict, upper: dict) -> torch.Tensor:
    """g(θ_U) = Σ_levels <v, θ^K(θ_U)>: the cotangents against the block's final parameters when the
    block is re-run from its start under θ_U (every update of the block, deeper levels included)."""
    final = traj.run(upper)
    return tree_vdot(cotangent, {name: final[name]["params"] for name in cotangent})


def es_gradient(fn, x: dict, samples: int, sigma: float, antithetic: bool = True) -> dict:
    """Gaussian-smoothing estimate of ∇fn(x), u ~ N(0, I) from torch's global generator:

        antithetic:  (1/(2σn)) Σ_i (fn(x + σu_i) - fn(x - σu_i)) u_i      (2n evaluations)
        otherwise:   (1/(σn))   Σ_i (fn(x + σu_i) - fn(x)) u_i            (n + 1 evaluations)

    Unbiased for the gradient of the smoothed E_u fn(x + σu) (for fn linear or quadratic: of fn).
    Per coordinate, the variance of one antithetic sample of a linear fn with gradient a is
    ‖a‖² + a_j²; the estimate averages n of them.
    """
    total = tree_zeros_like(x)
    base = None if antithetic else fn(x)
    for _ in range(samples):
        u = {k: torch.randn_like(t) for k, t in x.items()}
        plus = fn(tree_axpy(sigma, u, x))
        minus = fn(tree_axpy(-sigma, u, x)) if antithetic else base
        total = tree_add(total, tree_scale(plus - minus, u))
    return tree_scale(1.0 / ((2.0 if antithetic else 1.0) * sigma * samples), total)


@dataclass(frozen=True, repr=False)
class ZeroOrder(Method):
    """vᵀ dθ^K/dθ_U estimated by evolution strategies on g(θ_U) = <v, θ^K(θ_U)> (``response``),
    where θ^K(θ_U) re-runs the lower level's block: no derivative of the lower level is taken, so it
    serves lower levels that cannot be differentiated (its own lower levels' methods still run).

    It estimates the total derivative of the block's ``steps`` updates (what ``Unroll`` computes
    exactly), smoothed at scale ``sigma``; the cotangents of deeper levels are carried too.
    The estimate is random: it draws from torch's global generator (``torch.manual_seed`` or
    ``Program(seed=...)`` make it repeatable), and its standard error falls like 1/√samples
    (see ``es_gradient``). Cost: 2·samples re-runs of the block (samples + 1 without antithetic
    pairs), no backward pass; memory O(d). Differentiating through it (a level above) sees the
    sampled directions as constants.
    """

    samples: int
    sigma: float
    antithetic: bool = True

    replays_updates = True  # re-runs or differentiates the optimizer updates
    second_order = False  # re-runs the block; no derivative of it

    def __post_init__(self):
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"ZeroOrder(samples=...) must be a positive int, got {self.samples!r}")
        if not self.sigma > 0:
            raise ValueError(f"ZeroOrder(sigma=...) must be > 0, got {self.sigma!r}")

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        return es_gradient(lambda upper: response(traj, cotangent, upper), traj.upper,
                           self.samples, self.sigma, self.antithetic)
