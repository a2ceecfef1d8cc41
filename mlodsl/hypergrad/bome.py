"""``BOME``: the dynamic barrier of Liu et al., NeurIPS 2022 ("BOME! Bilevel Optimization Made Easy:
A Simple First-Order Approach"), as a first-order hypergradient of the lower level."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import autodiff
from ..tree import tree_vdot
from .base import Method, Trajectory
from .penalty import in_place_allowed, moved
from .products import upper_gradient


def barrier_weight(v: dict, r: dict, eta: float) -> torch.Tensor:
    """BOME's λ = max(η‖r‖² - ⟨v, r⟩, 0) / ‖r‖² (0 where r = 0): the least weight on the barrier's
    gradient r for which the step -(v + λ r) decreases the barrier at rate η‖r‖²."""
    rr = tree_vdot(r, r)
    excess = torch.clamp_min(eta * rr - tree_vdot(v, r), 0.0)
    return excess / torch.where(rr == 0, torch.ones_like(rr), rr)  # r = 0 gives excess = 0: λ = 0


def barrier_step(gradient, z: dict, v: dict, upper: dict, lr: float, eta: float, owned: bool) -> dict:
    """z - lr (v + λ r), r = ∇_z L(z, θ_U) and λ its barrier weight; in place when ``owned`` and
    ``in_place_allowed`` (as ``penalty.moved``). r dies here: it is not alive while the next step's
    gradient is computed."""
    r = gradient(z, upper)
    lam = barrier_weight(v, r, eta)
    if owned and in_place_allowed(z, r, v):
        for k in z:
            z[k].add_(v[k], alpha=-lr).addcmul_(r[k], lam, value=-lr)
        return z
    return {k: torch.addcmul(torch.add(z[k], v[k], alpha=-lr), r[k], lam, value=-lr) for k in z}


@dataclass(frozen=True)
class BOME(Method):
    """vᵀ dθ_L*/dθ_U ≈ λ (∇_{θ_U} L(z, θ_U) - ∇_{θ_U} L(θ^T(z), θ_U)), with z moved by BOME's
    dynamic barrier: first-order, no Hessian or mixed product.

    BOME descends the upper loss f subject to the barrier q(z) = L(z) - L(θ^T(z)) ≤ 0, where θ^T(z)
    is ``value_iters`` gradient-descent steps of size ``value_lr`` on L from z (its estimate of
    the lower level's value function, held constant when q is differentiated, so ∇_z q = ∇_z L).
    A copy z of the lower parameters starts at θ_L^K and takes ``iters`` steps

        z ← z - lr (v + λ ∇_z q),    λ = max(η‖∇_z q‖² - ⟨v, ∇_z q⟩, 0) / ‖∇_z q‖²,

    the barrier weight λ chosen afresh at each step so that q falls at rate η = ``eta``: no
    penalty to schedule. v = ∂f_U/∂θ_L at θ_L^K is the upper loss linearized there (as in
    ``F2SA``). The estimate is λ ∇_{θ_U} q at the final z, with λ from that z.

    Where the inner products are taken: BOME's own λ takes them over (θ_U, θ_L) jointly, for a
    joint step of both. Here θ_U is the Program's to step, its partial ∂f_U/∂θ_U is not the
    method's to see, and λ is taken over the copy z alone. That is what makes the estimate the
    hypergradient: on a strongly convex lower loss the barrier's flow takes z to the solution
    along ∇_z L ∥ -v, where λ‖∇_z L‖ → ‖v‖ and the estimate tends to the implicit hypergradient.
    With a step ``lr``, z stops at a distance ~lr from the solution, where λ (growing like 1/lr)
    makes the step along the barrier's tangent unstable; the error falls with ``lr``, after
    ~1/(η·lr·μ) steps (μ: the least curvature of L), not monotonically in ``iters``, up to the
    truncation (1 - value_lr·μ)^value_iters of θ^T. The joint λ would give the θ_U-part of the
    projected joint gradient instead, which differs from the hypergradient by O(1) (measured in
    docs/hypergradients.md). λ is reported as the metric ``<lower>/barrier_weight``.

    Cost: ``iters`` + 1 + ``value_iters`` gradients of L in θ_L, 2 in θ_U; no backward of a
    backward. Memory: z and its gradient beside θ_L^K and v (z is updated in place eagerly, when
    nothing differentiates through the method).
    """

    iters: int
    lr: float
    value_lr: float
    value_iters: int = 10
    eta: float = 0.5

    keeps_path = False
    replays_updates = False  # the lower loss alone, not its optimizer's updates
    products_only = True     # derivatives of the loss at the block's end: one compiled region under compile
    second_order = False     # gradients of the lower loss only

    def __post_init__(self):
        for name in ("iters", "value_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"BOME({name}=...) must be an int >= 0, got {value!r}")
        for name in ("lr", "value_lr", "eta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BOME({name}=...) must be > 0, got {getattr(self, name)!r}")

    def weight_and_upper_gradient(self, traj: Trajectory, z: dict, v: dict) -> tuple:
        """(λ, ∇_{θ_U} L) at z, from one backward pass (∇_z L is not kept)."""
        r, g_z = autodiff.grad(lambda both: traj.loss(*both))((z, traj.upper))
        return barrier_weight(v, r, self.eta), g_z

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        v = cotangent[traj.level]
        gradient = autodiff.grad(traj.loss)
        z = traj.own(traj.final)
        for j in range(self.iters):  # z is this method's own copy after the first step
            z = barrier_step(gradient, z, v, traj.upper, self.lr, self.eta, owned=j > 0)
        lam, g_z = self.weight_and_upper_gradient(traj, z, v)
        traj.report("barrier_weight", lam)
        owned = self.iters > 0
        for _ in range(self.value_iters):  # θ^T(z); z itself is not kept (one θ_L-sized copy fewer)
            z, owned = moved(z, -self.value_lr, gradient(z, traj.upper), owned), True
        g_value = upper_gradient(traj, z)
        return {k: lam * (g_z[k] - g_value[k]) for k in g_z}
