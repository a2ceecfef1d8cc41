"""Derivative products of a lower level's loss L(θ_L, θ_U) at the end of its block.

Shared by the implicit and finite-difference methods. Every product goes through
``mlodsl.autodiff`` (``torch.func`` under a transform, the autograd tape otherwise), reverse over
reverse (``jvp`` of ``grad`` of some losses hits pytorch#123996), so it stays differentiable for a
level above; no Hessian or Jacobian is ever formed. ``L`` is
``Solution.loss``: the lower level's loss on its last batch, with every other level held where the
block ended.
"""
from __future__ import annotations

import torch

from .. import autodiff
from .base import Solution, Trajectory, as_solution


def linearize(point: Solution | Trajectory, damping: float = 0.0) -> tuple:
    """``(hessian_matvec, cross_vjp)`` from one linearization of the stationarity
    (θ_L, θ_U) ↦ ∇_{θ_L} L at (θ_L*, θ_U) (a forward and a backward pass):

    * ``hessian_matvec(w) = (H + damping·I) w``, H = ∂²L/∂θ_L²: one backward of the backward in
      θ_L (H is symmetric, so the VJP wᵀH is H w);
    * ``cross_vjp(x) = (∂²L/∂θ_U∂θ_L) x``, shaped like θ_U: one backward of the backward in θ_U.

    ``point``: a ``Solution`` (or a trajectory's).
    """
    pullback = _linearized(as_solution(point))

    def hessian_matvec(w):
        (hw,) = pullback(w, argnums=(0,))
        return hw if damping == 0.0 else {k: v + damping * w[k] for k, v in hw.items()}

    def cross_vjp(x):
        return pullback(x, argnums=(1,))[0]

    return hessian_matvec, cross_vjp


def joint_products(point: Solution | Trajectory, damping: float = 0.0, fresh: bool = False):
    """``w ↦ ((H + damping·I) w, (∂²L/∂θ_U∂θ_L) w)``: ``linearize``'s two products of one vector
    from one backward pass (the pullback in θ_L and θ_U at once), for a solver that applies the
    mixed product to every direction it takes (``conjugate_gradient(readout=...)``).

    ``fresh``: each product is taken afresh by reverse over forward (``autodiff.reverse_over_forward``:
    a forward pass with tangent (w, 0) and the backward pass of the directional derivative ∇L·w,
    whose gradient in (θ_L, θ_U) is the joint Hessian's product (H w, B w)) instead of by one
    linearization kept for every product: nothing is held between products (the linearization
    holds its gradient graph, about one parameter size for a weight-decayed loss), for one forward
    pass more per product."""
    sol = as_solution(point)
    if fresh:
        def product(w):
            return autodiff.reverse_over_forward(sol.loss, (sol.params, sol.upper), (w, None))
    else:
        product = _linearized(sol)

    def both(w):
        hw, bw = product(w)
        return (hw if damping == 0.0 else {k: v + damping * w[k] for k, v in hw.items()}), bw

    return both


def upper_zeros(point: Solution | Trajectory) -> dict:
    """Zeros shaped like θ_U (where a sum of mixed products starts)."""
    return {k: torch.zeros_like(t) for k, t in as_solution(point).upper.items()}


def _linearized(sol: Solution):
    """The pullback of the stationarity (θ_L, θ_U) ↦ ∇_{θ_L} L at (θ_L*, θ_U); the gradient itself is
    not kept (the pullback starts from its place in the graph)."""
    def stationarity(own, upper):
        return autodiff.grad(sol.loss)(own, upper)

    return autodiff.vjp_fn(stationarity, sol.params, sol.upper)[1]


def upper_gradient(point: Solution | Trajectory, own: dict) -> dict:
    """``∇_{θ_U} L(own, θ_U)``: the lower loss's partial gradient in the upper level's parameters."""
    sol = as_solution(point)
    return autodiff.grad(sol.loss, argnums=1)(own, sol.upper)


def negate(tree: dict) -> dict:
    return {k: -v for k, v in tree.items()}
