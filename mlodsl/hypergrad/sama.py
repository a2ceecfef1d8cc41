"""``SAMA``: the finite-difference hypergradient preconditioned by the lower level's Adam update
(Choe et al., NeurIPS 2023, "Making Scalable Meta Learning Practical")."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import autodiff
from .base import ImplicitMethod, Solution, Trajectory, as_solution
from .finite_diff import mixed_difference


def adam_direction(g, m, v, count, betas, eps, eps_root):
    """Adam's update direction u(g) = m̂/(√(v̂ + eps_root) + eps) for the next update from (m, v, count)."""
    b1, b2 = betas
    t = (count + 1).to(g.dtype)
    m_hat = (b1 * m + (1 - b1) * g) / (1 - b1 ** t)
    v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2 ** t)
    return m_hat / (torch.sqrt(v_hat + eps_root) + eps)


def adam_preconditioned(point: Solution | Trajectory, v: dict, betas, eps, eps_root) -> dict:
    """D v with D = ∂u/∂g, the (diagonal) Jacobian of Adam's next update direction in the gradient,
    at g = ∇_{θ_L} L(θ_L^K) and the block's final Adam state: one ``jvp`` of the elementwise u.

    Without bias correction and eps this is Betty's ``precondition_adam`` up to its learning rate:
    D = ((1-β₁)β₂ v_old - β₁(1-β₂) g m_old) / (√v + ε)³ elementwise. ``point``: a ``Solution``
    (or a trajectory's).
    """
    sol = as_solution(point)
    opt = sol.opt_state
    g = autodiff.grad(sol.loss)(sol.params, sol.upper)
    out = {}
    for k in v:
        def u(gk, k=k):
            return adam_direction(gk, opt["m"][k], opt["v"][k], opt["count"], betas, eps, eps_root)
        # u is elementwise in g, so its Jacobian is diagonal: the jvp along v is the vjp with v
        # (through mlodsl.autodiff: the tape where it can, which sharded tensors need)
        (out[k],), _ = autodiff.vjp(u, (g[k],), v[k], output=False)
    return out


@dataclass(frozen=True, repr=False)
class SAMA(ImplicitMethod):
    """vᵀ dθ_L*/dθ_U ≈ -(∂²L/∂θ_U∂θ_L) D v: ``FiniteDiff`` along the direction D v, where D is the
    Jacobian of the lower optimizer's update direction in the gradient (``adam_preconditioned``).

    Reading: one unrolled optimizer step θ' = θ - η u(∇L) has dθ'/dθ_U = -η D ∂²L/∂θ_L∂θ_U, and
    SAMA keeps that product with H⁻¹ ≈ I. When the lower level's final optimizer state has no Adam
    moments (plain SGD) D = I and SAMA equals ``FiniteDiff(eps)``. mlodsl leaves out the learning
    rate η for every optimizer (Betty multiplies by it for Adam but not for SGD), so switching the
    lower optimizer does not rescale the hypergradient by η.

    ``betas``, ``adam_eps`` and ``eps_root`` must be those of the lower level's ``ml.optim.adam``
    (a solution carries the optimizer's state, not its hyperparameters); Adam's weight decay is
    left out of g. Cost: two gradients of the lower loss in θ_U plus one in θ_L; memory O(d).
    """

    eps: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    eps_root: float = 1e-16

    replays_updates = True  # reads the lower optimizer's state (an in-place torch.optim one has none it knows)
    second_order = False  # gradients of the lower loss only: the jvp is of Adam's direction in g

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"SAMA(eps=...) must be > 0, got {self.eps!r}")
        object.__setattr__(self, "betas", tuple(self.betas))  # a list prints and compares as the tuple

    def solution_vjp(self, solution: Solution, v: dict) -> dict:
        opt = solution.opt_state
        if "m" in opt and "v" in opt:
            v = adam_preconditioned(solution, v, self.betas, self.adam_eps, self.eps_root)
        return mixed_difference(solution, v, self.eps)
