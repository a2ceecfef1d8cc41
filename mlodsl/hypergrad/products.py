"""Derivative products of a lower level's loss L(θ_L, θ_U) at the end of its block.

Shared by the implicit and finite-difference methods. Every product goes through
``mlodsl.autodiff`` (``torch.func`` under a transform, the autograd tape otherwise), reverse over reverse (``jvp`` of ``grad`` of some losses hits pytorch#123996), so it stays
differentiable for a level above; no Hessian or Jacobian is ever formed. ``L`` is
``traj.loss``: the lower level's loss on its last batch, with every other level held where the
block ended.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import autodiff
from .base import Trajectory


def hessian_matvec(traj: Trajectory, damping: float = 0.0) -> Callable:
    """``w ↦ (H + damping·I) w`` with H = ∂²L/∂θ_L² at (θ_L*, θ_U).

    One linearization of ∇_{θ_L} L (a forward and a backward pass), then one backward of the
    backward per product: H is symmetric, so the VJP wᵀH is H w.
    """
    def stationarity(own):
        return autodiff.grad(traj.loss)(own, traj.upper)

    _, pullback = autodiff.vjp_fn(stationarity, traj.own(traj.final))
    if damping == 0.0:
        return lambda w: pullback(w)[0]
    return lambda w: {k: hw + damping * w[k] for k, hw in pullback(w)[0].items()}


def cross_vjp(traj: Trajectory, x: dict) -> dict:
    """``(∂²L/∂θ_U∂θ_L) x``, shaped like θ_U: the VJP of θ_U ↦ ∇_{θ_L} L(θ_L*, θ_U) with cotangent x."""
    own = traj.own(traj.final)
    _, pullback = autodiff.vjp_fn(lambda upper: autodiff.grad(traj.loss)(own, upper), traj.upper)
    return pullback(x)[0]


def upper_gradient(traj: Trajectory, own: dict) -> dict:
    """``∇_{θ_U} L(own, θ_U)``: the lower loss's partial gradient in the upper level's parameters."""
    return autodiff.grad(traj.loss, argnums=1)(own, traj.upper)


def negate(tree: dict) -> dict:
    return {k: -v for k, v in tree.items()}
