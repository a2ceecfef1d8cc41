"""What a hypergradient method is handed: the trajectory a lower level's block took.

A hypergradient method is any object with

* ``keeps_path: bool`` -- whether the block must store every iterate (``Unroll`` does);
* ``products_only: bool`` (optional) -- whether ``vjp`` uses nothing of the trajectory but
  ``level``, ``final``, ``own``, ``upper``, ``loss`` and ``report`` (derivative products of the
  lower loss at the block's end: the implicit methods); under ``compile=True`` such a ``vjp`` is
  one compiled region;
* ``records_tape: bool`` (optional) -- whether the block should record its forward updates on the
  autograd tape when it can (``Trajectory.taped_vjp``; ``keeps_path`` is the fallback where it
  cannot: under ``torch.compile``, ``vmap``, or a level above differentiating through the block);
* ``replays_updates: bool`` (optional, True when absent) -- whether the method re-runs or
  differentiates the lower level's optimizer updates; only levels under methods that do not may
  use an in-place ``torch.optim`` optimizer (``ml.optim.torch``);
* ``diverged(diagnostics) -> str | None`` (optional) -- given the worst value in the step of each
  diagnostic the method reported (``trajectory.report``), what went wrong, or None; the Program
  checks it after the step, before committing anything, and raises ``DivergenceError`` (or warns,
  when the method's ``on_divergence`` is ``"warn"``);
* ``leaf_only: bool`` (optional) -- whether the method can differentiate only a lower level with
  no lower levels of its own (it uses ``Trajectory.update_split``); the Program refuses others;
* ``forward_over_reverse: bool`` (optional) -- whether it takes forward-over-reverse products of
  the lower loss (``autodiff.forward_over_reverse``); the Program takes one at build to check that
  every op of the loss has them;
* ``second_order: bool`` (optional, True when absent) -- whether the method differentiates the
  lower level's gradient (its updates, Hessian or Jacobian products): the lower loss is then
  differentiated twice, and mlodsl evaluates it under attention kernels that have a double
  backward (``mlodsl.kernels``); ``differentiates_twice`` reads it;
* ``vjp(trajectory, cotangent) -> dict`` -- given the cotangent ``v = ∂f_U/∂θ_L`` of the upper
  level's loss with respect to the lower level's final parameters, return the best-response
  vector-Jacobian product ``vᵀ dθ_L/dθ_U`` with respect to the upper level's parameters
  (a dict shaped like ``trajectory.upper``). ``cotangent`` maps level names to parameter
  cotangents: ``cotangent[trajectory.level]`` is v; when the upper's loss also takes a level
  deeper in the block (a classifier two levels down), its cotangent is there too, and a method
  that differentiates the whole block (``Unroll``, ``Forward``) carries it; a method that only
  linearizes the lower level's own optimality (the implicit ones) uses v alone.

The built-in methods use nothing more than the ``Trajectory`` below, so a user-defined method is a
small class with the same two members. Every product must be written with differentiable torch
operations (``torch.func.vjp``/``jvp``/``grad``), so that a level above can differentiate through it
in turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class DivergenceError(ArithmeticError):
    """An iterative hypergradient solve diverged or met a Hessian it cannot invert (see
    ``diverged``); the message names the level, the method and what to change. Raised after the
    step, before it is committed: the program's parameters and optimizer states are unchanged."""


class DivergenceWarning(RuntimeWarning):
    """``DivergenceError``'s message, for a method built with ``on_divergence="warn"``."""


def check_on_divergence(value: str) -> str:
    if value not in ("raise", "warn"):
        raise ValueError(f"on_divergence must be 'raise' or 'warn', got {value!r}")
    return value


def diverged(diagnostics: dict, growth_fix: str) -> str | None:
    """What the linear solvers' diagnostics (``linear.conjugate_gradient``, ``linear.neumann_series``;
    the worst value of each in the step) say went wrong, or None. ``growth_fix``: what to change
    when a Neumann-type iteration grows."""
    indefinite = diagnostics.get("cg_indefinite", 0.0)
    if indefinite > 0:
        return (f"met negative curvature pᵀHp < 0 in {int(indefinite)} conjugate-gradient iteration(s): the "
                f"lower loss's Hessian (plus damping) is not positive definite at the block's end (a non-convex "
                f"lower level, or one not at a minimum), while CG and the implicit hypergradient assume a "
                f"minimum there. Add damping= above the magnitude of H's most negative eigenvalue "
                f"(CG(iters, damping=...); see docs/hypergradients.md), or differentiate the updates (Unroll)")
    residual = diagnostics.get("cg_residual", 0.0)
    if residual > 1.0:
        return (f"did not converge: its final residual ‖r‖/‖v‖ = {residual:.3g} is above its initial "
                f"one (H is near-singular or badly conditioned). Add damping= (CG(iters, damping=...)), "
                f"or more iters=")
    growth = diagnostics.get("neumann_growth", 0.0)
    if growth > 1.0:
        return (f"diverged: its iterates grew by a factor {growth:.3g} (‖last term‖/‖v‖), so the series "
                f"does not converge. {growth_fix}")
    return None


SECOND_ORDER_DEFAULT = True  # a method that does not say is assumed to differentiate twice (the safe side)


def differentiates_twice(method) -> bool:
    """Whether ``method`` differentiates the lower loss's gradient (its ``second_order`` flag)."""
    return bool(getattr(method, "second_order", SECOND_ORDER_DEFAULT))


@dataclass(frozen=True)
class Trajectory:
    """The block of lower level ``level``: ``steps`` updates from ``start`` to ``final``.

    States are dicts ``{level: {"params": {...}, "opt": {...}}}`` over the block's levels (the
    lower level and everything below it). ``upper`` is the parameter dict of the level being
    differentiated (``θ_U``), and:

    * ``advance(state, upper, k)``: the block's k-th update as a pure function of the state and θ_U;
    * ``path``: the states ``[S_0, ..., S_K]`` when the method keeps them, else ``None``;
    * ``loss(own, upper)``: the lower level's loss at its last update's batch, as a function of its
      own parameters and θ_U, with every other level held where the block ended;
    * ``update_map(own, upper)``: one optimizer update of the lower level from ``own`` with its final
      optimizer state (the map whose fixed point the lower level converges to);
    * ``begin(upper)``: the block's start as a function of θ_U (it depends on θ_U when the lower
      level starts from the upper's parameters, MAML's ``start_from=<upper>``);
      ``start_vjp(v)`` is vᵀ ∂θ_L^0/∂θ_U for a cotangent v on the lower level's start parameters;
    * ``report(name, value)``: a diagnostic scalar (a CG residual) for the lower level's metrics;
    * ``update_vjp(S_k, k, λ)``: the VJP of one update (what ``Unroll``'s reverse loop calls);
    * ``reverse_vjp``: ``(first, λ_K, total) -> (λ_first, total + Σ_k ∂S_{k+1}/∂θ_U ᵀ λ_{k+1})``
      over updates K-1..first as one compiled loop, where the block ran as one (else ``None``, or
      a call that returns ``None``: then the loop of ``update_vjp`` it stands for);
    * ``taped_vjp``: ``v ↦ vᵀ dθ_K/dθ_U`` (v: cotangents on the final parameters, by level) by one
      backward pass, when the block's forward updates were recorded on the autograd tape for this
      upper (a method with ``records_tape = True`` asks for that), else ``None``;
    * ``update_split``: ``k ↦ (losses, scale, apply)``, the k-th update as ``apply(S_k, θ_U, g)``
      with the lower level's gradient g = Σ_m ∇_θ losses[m](θ_k, θ_U) / scale
      (``Runtime.update_split``), for a lower level with no lower levels, else ``None``.
    """

    level: str
    steps: int
    start: dict
    final: dict
    path: list | None
    upper_name: str
    upper: dict
    advance: Callable
    loss: Callable
    update_map: Callable
    begin: Callable
    starts_from_upper: bool = False
    report: Callable = lambda key, value: None  # (name, scalar) -> the level's metrics, e.g. a CG residual
    advance_vjp: Callable | None = None  # (S_k, k, λ_{k+1}) -> (λ_k, upper cotangent), on floating leaves
    taped_vjp: Callable | None = None  # v -> vᵀ dθ_K/dθ_U over the recorded tape
    reverse_vjp: Callable | None = None  # (first, λ_K, total) -> (λ_first, total') | None, one compiled loop
    update_split: Callable | None = None  # k -> (losses, scale, apply): the k-th update split at its gradient

    def update_vjp(self, state: dict, k: int, lam: list) -> tuple:
        """The VJP of the k-th update at state S_k with cotangent λ_{k+1} on its floating leaves
        (``tree.split_differentiable``): ``(∂S_{k+1}/∂S_k ᵀ λ, ∂S_{k+1}/∂θ_U ᵀ λ)``. The block's own
        (compiled, under ``compile=True``) VJP when it has one, else a VJP of ``advance``."""
        if self.advance_vjp is not None:
            return self.advance_vjp(state, k, lam)
        return state_vjp(lambda s, upper: self.advance(s, upper, k), state, self.upper, lam)

    def run(self, upper: dict, state: dict | None = None, first: int = 0) -> dict:
        """Re-run updates ``first..steps-1`` from ``state`` (default: ``begin(upper)``) under ``upper``."""
        s = self.begin(upper) if state is None else state
        for k in range(first, self.steps):
            s = self.advance(s, upper, k)
        return s

    def start_vjp(self, cotangent: dict) -> dict:
        """vᵀ ∂θ_L^0/∂θ_U: how the start depends on the upper level (zero for warm starts)."""
        if not self.starts_from_upper:
            return {k: torch.zeros_like(v) for k, v in self.upper.items()}
        from .. import autodiff
        (ct,), _ = autodiff.vjp(lambda up: self.begin(up)[self.level]["params"], (self.upper,), cotangent)
        return ct

    def own(self, state: dict) -> dict:
        """The lower level's parameters in a block state."""
        return state[self.level]["params"]


def state_vjp(update: Callable, state: dict, upper: dict, lam: list) -> tuple:
    """The VJP of ``S' = update(S, θ_U)`` with cotangent ``lam`` on the floating leaves of S'
    (``tree.split_differentiable``; integer step counters are constants):
    ``(∂S'/∂S ᵀ λ, ∂S'/∂θ_U ᵀ λ)``."""
    from .. import autodiff
    from ..tree import split_differentiable
    floats, join = split_differentiable(state)

    def floating_update(state_floats, upper_):
        return split_differentiable(update(join(state_floats), upper_))[0]

    return autodiff.vjp(floating_update, (floats, upper), lam)[0]
