"""``F2SA``: a fully first-order hypergradient from a penalized copy of the lower level
(the value-function penalty of Kwon et al., ICML 2023, "A Fully First-Order Method for Stochastic
Bilevel Optimization", and Chen et al., 2024, F2BA).

With g the lower loss and f the upper one, the penalized problem min_z g(x, z) + f(x, z)/λ has a
solution z_λ*(x) = y*(x) + O(1/λ), and

    λ (∇_x g(x, z_λ*) - ∇_x g(x, y*))  →  -(∂²g/∂x∂y) H⁻¹ ∇_y f        as λ → ∞,

the implicit hypergradient's second term, from gradients of g alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import autodiff
from ..optim import schedule_step
from ..tree import tree_vdot
from .base import Method, Trajectory
from .products import upper_gradient


def descend(traj: Trajectory, start: dict, iters: int, lr: float, tilt: dict | None = None,
            scale=1.0) -> dict:
    """``iters`` gradient-descent steps from ``start`` on the lower loss plus a linear term,

        z ← z - lr ∇_z (L(z, θ_U) + scale·⟨tilt, z⟩),

    with θ_U held at ``traj.upper``: one gradient of L per step (the tilt's gradient is
    ``scale·tilt``, added by autograd into the same buffer). ``start`` is not written."""
    def tilted(own, upper):
        loss = traj.loss(own, upper)
        return loss if tilt is None else loss + scale * tree_vdot(tilt, own)

    gradient = autodiff.grad(tilted)
    z = start
    for j in range(iters):
        z = moved(z, -lr, gradient(z, traj.upper), owned=j > 0)
    return z


def in_place_allowed(*trees) -> bool:
    """Whether a method may overwrite the tensors of its own copies: on the autograd tape (no
    ``torch.func`` transform or ``torch.compile`` trace) and with no graph on them (no level above
    differentiating through the method, whose graph may have saved them)."""
    return autodiff.on_tape() and not any(t.requires_grad for tree in trees for t in tree.values())


def moved(z: dict, alpha, g: dict, owned: bool) -> dict:
    """z + alpha·g. When ``owned`` (z is the method's own copy, referenced nowhere else) and
    ``in_place_allowed``, z's tensors are overwritten: at 100M parameters that is one θ_L-sized
    buffer fewer at the peak. Else a new tree; the start (θ_L^K, the block's) is never written."""
    if owned and in_place_allowed(z, g):
        for k in z:
            z[k].add_(g[k], alpha=alpha)
        return z
    return {k: torch.add(z[k], g[k], alpha=alpha) for k in z}


def penalty_at(penalty, traj: Trajectory):
    """λ: ``penalty`` itself, or ``penalty(step)`` for a schedule, where step is the lower level's
    update count at the block's end (its optimizer state's ``count``), as a 0-d tensor of the lower
    parameters' dtype."""
    if not callable(penalty):
        return penalty
    opt = traj.final[traj.level]["opt"]
    if not isinstance(opt, dict) or "count" not in opt:
        raise ValueError(f"level '{traj.level}': F2SA(penalty=<schedule>) reads the step from the lower "
                         f"optimizer's state['count'], which this optimizer does not keep; give a number "
                         f"as penalty=, or keep a 'count' in the optimizer's state")
    return penalty(schedule_step(traj.own(traj.final), opt["count"]))  # float64 in a float64 program


@dataclass(frozen=True, repr=False)
class F2SA(Method):
    """vᵀ dθ_L*/dθ_U ≈ λ (∇_{θ_U} L(z, θ_U) - ∇_{θ_U} L(y, θ_U)): first-order, no Hessian or mixed
    product, so the lower loss is only ever differentiated once.

    From the lower level's solution θ_L^K two copies take ``iters`` gradient-descent steps of size
    ``lr``: z on the penalized problem L(z, θ_U) + ⟨v, z⟩/λ, and (``paired=True``) y on L alone. The
    upper loss enters through its gradient v = ∂f_U/∂θ_L at θ_L^K, the cotangent every method is
    handed: F2SA's f(x, z) linearized at the lower solution (its partial in θ_U is the Program's
    own term, taken at θ_L^K).

    For a lower loss strongly convex in θ_L, z - y = -(α Σ_{j<iters} (I - αH)^j) v/λ + O(1/λ²), so
    the estimate is the implicit hypergradient with H⁻¹ by a Neumann series of ``iters`` terms of
    step α = ``lr``, plus a bias O(1/λ) from the curvature of ∇_{θ_U} L in θ_L between y and z (zero
    where ∇_{θ_U} L is affine in θ_L). Running y alongside z (``paired``) cancels the
    lower level's own optimization error to first order; with ``paired=False`` the reference is
    θ_L^K itself (one copy less: memory and half the gradients), and a residual gradient r at
    θ_L^K adds ≈ -λ B H⁻¹ r (λ times the lower level's error), so it needs ‖r‖ ≪ ‖v‖/λ.

    ``penalty``: λ, or a schedule ``lambda step: ...`` of the lower level's update count (its
    optimizer's ``count``, as its own schedules see), as F2SA raises λ along the run: the bias
    falls like 1/λ, while in float arithmetic the difference of the two gradients loses
    log10(λ) digits (float32: keep λ ≲ 1e3). λ is reported as the metric ``<lower>/penalty``.

    Cost: ``iters`` gradients of L in θ_L for z (as many again for y when paired), 2 in θ_U; no
    backward of a backward. Memory: two θ_L-sized copies (z and its gradient) beside θ_L^K and v;
    the copies run one after the other.
    """

    iters: int
    lr: float
    penalty: float | Callable = 100.0
    paired: bool = True

    keeps_path = False
    replays_updates = False  # the lower loss alone, not its optimizer's updates
    products_only = True     # derivatives of the loss at the block's end: one compiled region under compile
    second_order = False     # gradients of the lower loss only

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"F2SA(iters=...) must be a positive int, got {self.iters!r}")
        if not self.lr > 0:
            raise ValueError(f"F2SA(lr=...) must be > 0, got {self.lr!r}")
        if not callable(self.penalty) and not self.penalty > 0:
            raise ValueError(f"F2SA(penalty=...) must be > 0 or a schedule step -> penalty, got {self.penalty!r}")

    def __repr__(self) -> str:  # a schedule by its name, not its address (the plan prints this)
        penalty = f"{getattr(self.penalty, '__name__', 'fn')}(step)" if callable(self.penalty) else repr(self.penalty)
        return f"F2SA(iters={self.iters}, lr={self.lr!r}, penalty={penalty}, paired={self.paired})"

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        v = cotangent[traj.level]
        lam = penalty_at(self.penalty, traj)
        traj.report("penalty", lam)
        y = traj.own(traj.final)
        z = descend(traj, y, self.iters, self.lr, v, 1.0 / lam)
        g_z = upper_gradient(traj, z)
        del z  # the copies run one after the other: one θ_L-sized copy at a time
        ref = descend(traj, y, self.iters, self.lr) if self.paired else y
        g_ref = upper_gradient(traj, ref)
        return {k: lam * (g_z[k] - g_ref[k]) for k in g_z}
