"""``SAMA``: the finite-difference hypergradient preconditioned by the lower level's Adam update
(Choe et al., NeurIPS 2023, "Making Scalable Meta Learning Practical")."""
from __future__ import annotations

import torch

from .. import autodiff
from .base import Trajectory
from .finite_diff import mixed_difference


def adam_direction(g, m, v, count, betas, eps, eps_root):
    """Adam's update direction u(g) = m̂/(√(v̂ + eps_root) + eps) for the next update from (m, v, count)."""
    b1, b2 = betas
    t = (count + 1).to(g.dtype)
    m_hat = (b1 * m + (1 - b1) * g) / (1 - b1 ** t)
    v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2 ** t)
    return m_hat / (torch.sqrt(v_hat + eps_root) + eps)


def adam_preconditioned(traj: Trajectory, v: dict, betas, eps, eps_root) -> dict:
    """D v with D = ∂u/∂g, the (diagonal) Jacobian of Adam's next update direction in the gradient,
    at g = ∇_{θ_L} L(θ_L^K) and the block's final Adam state: one ``jvp`` of the elementwise u.

    Without bias correction and eps this is Betty's ``precondition_adam`` up to its learning rate:
    D = ((1-β₁)β₂ v_old - β₁(1-β₂) g m_old) / (√v + ε)³ elementwise.
    """
    opt = traj.final[traj.level]["opt"]
    own = traj.own(traj.final)
    g = autodiff.grad(traj.loss)(own, traj.upper)
    out = {}
    for k in v:
        def u(gk, k=k):
            return adam_direction(gk, opt["m"][k], opt["v"][k], opt["count"], betas, eps, eps_root)
        # u is elementwise in g, so its Jacobian is diagonal: the jvp along v is the vjp with v
        # (through mlodsl.autodiff: the tape where it can, which sharded tensors need)
        (out[k],), _ = autodiff.vjp(u, (g[k],), v[k])
    return out


class SAMA:
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) D v: ``FiniteDiff`` along the direction D v, where D is the
    Jacobian of the lower optimizer's update direction in the gradient (``adam_preconditioned``).

    Reading: one unrolled optimizer step θ' = θ - η u(∇L) has dθ'/dθ_U = -η D ∂²L/∂θ_L∂θ_U, and
    SAMA keeps that product with H⁻¹ ≈ I. When the lower level's final optimizer state has no Adam
    moments (plain SGD) D = I and SAMA equals ``FiniteDiff(eps)``. mlodsl leaves out the learning
    rate η for every optimizer (Betty multiplies by it for Adam but not for SGD), so switching the
    lower optimizer does not rescale the hypergradient by η.

    ``betas``, ``adam_eps`` and ``eps_root`` must be those of the lower level's ``ml.optim.adam``
    (a trajectory carries the optimizer's state, not its hyperparameters); Adam's weight decay is
    left out of g. Cost: two gradients of the lower loss in θ_U plus one in θ_L; memory O(d).
    """

    keeps_path = False
    replays_updates = True  # re-runs or differentiates the optimizer updates
    products_only = True  # products of the loss at the final point: one compiled region under compile=True
    second_order = False  # gradients of the lower loss only: the jvp is of Adam's direction in g

    def __init__(self, eps: float = 0.01, betas=(0.9, 0.999), adam_eps: float = 1e-8, eps_root: float = 1e-16):
        if not eps > 0:
            raise ValueError(f"SAMA(eps=...) must be > 0, got {eps!r}")
        self.eps, self.betas, self.adam_eps, self.eps_root = eps, tuple(betas), adam_eps, eps_root

    def __repr__(self) -> str:
        return f"SAMA(eps={self.eps})"

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        v = cotangent[traj.level]
        opt = traj.final[traj.level]["opt"]
        if "m" in opt and "v" in opt:
            v = adam_preconditioned(traj, v, self.betas, self.adam_eps, self.eps_root)
        return mixed_difference(traj, v, self.eps)
