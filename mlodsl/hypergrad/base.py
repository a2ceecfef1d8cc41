"""The contract of a hypergradient method, and what a method is handed.

A hypergradient method differentiates a lower level's response for the levels above it: given the
cotangent ``v = ∂f_U/∂θ_L`` of an upper level's loss on the lower level's final parameters, it
returns the best-response vector-Jacobian product ``vᵀ dθ_L/dθ_U`` on the upper level's
parameters. A method is a small class implementing ``Method``: one abstract member, ``vjp``, and
the flags and hooks below, each declared here once with its default (a method overrides only the
ones that differ):

* ``keeps_path`` (False) -- the block must store its iterates (``Unroll`` replays them);
* ``records_tape`` (False) -- the block should record its forward updates on the autograd tape
  where it can (``Trajectory.taped_vjp``; ``keeps_path`` is the fallback where it cannot: under
  ``torch.compile``, ``vmap``, or a level above differentiating through the block);
* ``products_only`` (False) -- ``vjp`` uses nothing of the trajectory but its ``Solution`` (the
  derivative products of the lower loss at the block's end); under ``compile=True`` such a ``vjp``
  is one compiled region. ``ImplicitMethod`` sets it;
* ``replays_updates`` (True) -- the method re-runs or differentiates the lower level's optimizer
  updates; only levels under methods that do not may use an in-place ``torch.optim`` optimizer
  (``ml.optim.from_torch``);
* ``second_order`` (True) -- the method differentiates the lower level's gradient (its updates,
  Hessian or Jacobian products): the lower loss is then differentiated twice and evaluated under
  attention kernels that have a double backward (``mlodsl.kernels``);
* ``consumes_cotangent`` (False) -- the method reads v once (its ``source``, or its ``vjp`` where it
  has none): the generated step hands v over (``handover.take``) and reads it no more, so that
  the method may drop it or build its own vectors in its buffers (``handover.claim``);
* ``on_divergence`` (``"raise"``) -- what a step whose solve ``diverged`` does: raise
  ``DivergenceError`` before anything is committed, or ``"warn"`` and go on;
* ``diverged(diagnostics) -> str | None`` (None) -- given the worst value in the step of each
  diagnostic the method reported (``trajectory.report``), what went wrong, or None;
* ``unconverged(diagnostics) -> str | None`` (None) -- what a solve that stopped short without
  diverging should warn about (once per level; the step is taken): CG's residual above ``warn_residual``;
* ``path_stride(steps) -> int`` (1) -- with ``keeps_path``, keep every ``path_stride``-th iterate;
* ``workspace(state_bytes, param_bytes) -> int`` (0) -- the bytes of the method's other buffers,
  for ``prog.explain()``;
* ``source(me) -> list[str] | None`` (None) -- for a ``products_only`` method, its VJP written as
  the lines of Python the generated step runs (``prog.code`` shows the method's math, not a call
  into it), or None: the step calls ``vjp``;
* ``vjp(trajectory, cotangent) -> dict`` (abstract) -- ``cotangent`` maps level names to parameter
  cotangents: ``cotangent[trajectory.level]`` is v; when the upper's loss also takes a level deeper
  in the block (a classifier two levels down), its cotangent is there too, and a method that
  differentiates the whole block (``Unroll``, ``Forward``) carries it; a method that only;
      * ``update_split``: ``k ↦ (losses, scale, apply)``, the k-th update as ``apply(S_k, θ_U, g)``
        with the lower level's gradient ``g = Σ_m ∇_θ losses[m](θ_k, θ_U) / scale``
        (``Runtime.update_split``), for a lower level with no lower levels, else ``None``.
  linearizes the lower level's own optimality (the implicit ones) uses v alone.

An implicit method (``ImplicitMethod``) implements ``solution_vjp(solution, v)`` instead of
``vjp``: it is handed the narrow ``Solution`` (the level, its parameters at the block's end, the
upper level's parameters and the lower loss), as jaxopt's ``root_vjp(optimality_fun, sol, args,
cotangent, solve)`` is.

The built-in methods are frozen dataclasses whose fields are their settings; ``repr`` names every
setting that differs from its default (``prog.schedule`` prints it). A user-defined method
subclasses ``Method`` (or ``ImplicitMethod``) the same way. An object that does not, but has a
``vjp`` and any of the flags above, still works: ``as_method`` wraps it, reading each flag it lacks
from the defaults declared here. Every product must be written with differentiable torch
operations (``torch.func.vjp``/``jvp``/``grad``, or ``mlodsl.autodiff``), so that a level above can
differentiate through it in turn.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
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
    # a CG residual above 1 is not divergence: CG's residual is not monotone (its error in the H-norm
    # decreases at every iteration with positive curvature), so it is warned about (``unconverged``)
    growth = diagnostics.get("neumann_growth", 0.0)
    if growth > 1.0:
        return (f"diverged: its iterates grew by a factor {growth:.3g} (‖last term‖/‖v‖), so the series "
                f"does not converge. {growth_fix}")
    return None


def _show(value) -> str:
    """A setting as ``repr`` prints it: functions by name, ``functools.partial`` by its parts."""
    if isinstance(value, functools.partial):
        parts = [_show(value.func), *map(_show, value.args),
                 *(f"{k}={_show(v)}" for k, v in value.keywords.items())]
        return f"partial({', '.join(parts)})"
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return repr(value)


def settings_repr(obj) -> str:
    """``Name(field=value, ...)`` of a dataclass, naming every field that differs from its default
    (so ``eval(repr(m)) == m`` where the values print as Python)."""
    shown = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        shown.append(f"{f.name}={_show(value)}")
    return f"{type(obj).__name__}({', '.join(shown)})"


class Method(abc.ABC):
    """A hypergradient method (see the module docstring): ``vjp`` and the flags it overrides.

    Subclass it, preferably as a frozen dataclass whose fields are the method's settings::

        @dataclass(frozen=True, repr=False)
        class Scaled(ml.hypergrad.Method):
            scale: float = 1.0
            second_order = False                       # a flag: a plain class attribute

            def vjp(self, trajectory, cotangent):
                return {k: ... for k in trajectory.upper}
    """

    keeps_path: bool = False
    records_tape: bool = False
    products_only: bool = False
    replays_updates: bool = True
    second_order: bool = True  # a method that does not say is assumed to differentiate twice (the safe side)
    leaf_only: bool = False
    forward_over_reverse: bool = False
    consumes_cotangent: bool = False
    on_divergence: str = "raise"

    @abc.abstractmethod
    def vjp(self, trajectory: "Trajectory", cotangent: dict) -> dict:
        """``vᵀ dθ_L/dθ_U`` on ``trajectory.upper``, for the cotangents ``cotangent`` (by level)."""

    def diverged(self, diagnostics: dict) -> str | None:
        """What the step's worst diagnostics (by name) say went wrong, or None (the default: nothing)."""
        return None

    def unconverged(self, diagnostics: dict) -> str | None:
        """What the step's worst diagnostics say about a solve that stopped short without diverging
        (warned once per level, the step is taken), or None (the default: nothing)."""
        return None

    def path_stride(self, steps: int) -> int:
        """With ``keeps_path``: keep the iterate after every ``path_stride`` updates (and the last)."""
        return 1

    def workspace(self, state_bytes: int, param_bytes: int) -> int:
        """Bytes of the method's buffers besides kept iterates, for ``prog.explain()`` (default 0)."""
        return 0

    def source(self, me: str) -> list | None:
        """The body of this method's VJP in the generated step, or None (the default: the step
        calls ``vjp``). Only a ``products_only`` method's source is used. The lines run with
        ``solution`` (the ``Solution``), ``v`` (the cotangent on ``solution.params``) and ``info`` (a
        dict whose entries become the level's diagnostics, as ``solution.report`` writes them) in
        scope, may use the modules ``products`` and ``linear`` of ``mlodsl.hypergrad``, name this
        method ``me``, and end with ``return`` of the VJP on ``solution.upper``."""
        return None

    def __repr__(self) -> str:
        return settings_repr(self) if dataclasses.is_dataclass(self) else f"{type(self).__name__}()"


# The members a method may override: the flags, then the hooks (read by ``as_method`` alone).
FLAGS = ("keeps_path", "records_tape", "products_only", "replays_updates", "second_order", "leaf_only",
         "forward_over_reverse", "consumes_cotangent", "on_divergence")
HOOKS = ("diverged", "unconverged", "path_stride", "workspace", "source")
SECOND_ORDER_DEFAULT = Method.second_order


class DuckTypedMethod(Method):
    """A method object that does not subclass ``Method``: its ``vjp``, the flags and hooks it has,
    and the declared defaults for the others. Prints as the object it wraps."""

    def __init__(self, method):
        self.method = method
        for name in FLAGS + HOOKS:  # an instance attribute overrides the class's default
            if hasattr(method, name):
                setattr(self, name, getattr(method, name))

    def vjp(self, trajectory, cotangent):
        return self.method.vjp(trajectory, cotangent)

    def __repr__(self) -> str:
        return repr(self.method)


def as_method(method) -> Method:
    """``method`` as a ``Method``: itself when it is one, else wrapped in a ``DuckTypedMethod``."""
    return method if isinstance(method, Method) else DuckTypedMethod(method)


def differentiates_twice(method: Method) -> bool:
    """Whether ``method`` differentiates the lower loss's gradient (its ``second_order`` flag)."""
    return bool(method.second_order)


@dataclass(frozen=True)
class Solution:
    """What an implicit method is handed: lower level ``level`` at the end of its block.

    * ``params``: θ_L*, the level's parameters there (they stand in for the solution);
    * ``upper``: θ_U, the parameters of the level being differentiated;
    * ``loss(own, upper)``: the lower level's loss on its last batch as a function of its own
      parameters and θ_U, every other level held where the block ended (jaxopt's optimality
      function is its gradient in ``own``);
    * ``opt_state``: the level's optimizer state there (``SAMA`` reads Adam's moments);
    * ``report(name, value)``: a diagnostic scalar (a CG residual) for the level's metrics.
    """

    level: str
    params: dict
    upper: dict
    loss: Callable
    opt_state: dict
    report: Callable = lambda key, value: None


class ImplicitMethod(Method):
    """A method that uses only the lower level's ``Solution``: it implements
    ``solution_vjp(solution, v)`` with ``v`` the cotangent on ``solution.params`` (deeper levels'
    cotangents are not used), and ``vjp`` hands it ``trajectory.solution()``. Such a method takes
    products of the lower loss alone (``products_only``: one compiled region under
    ``compile=True``) and does not replay the updates (``replays_updates = False``)."""

    products_only = True
    replays_updates = False

    @abc.abstractmethod
    def solution_vjp(self, solution: Solution, v: dict) -> dict:
        """``vᵀ dθ_L*/dθ_U`` on ``solution.upper`` for the cotangent ``v`` on ``solution.params``."""

    def vjp(self, trajectory: "Trajectory", cotangent: dict) -> dict:
        return self.solution_vjp(trajectory.solution(), cotangent[trajectory.level])


def as_solution(point) -> Solution:
    """A ``Solution``, or a ``Trajectory``'s (for product helpers called with either)."""
    return point.solution() if isinstance(point, Trajectory) else point


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
      upper (a method with ``records_tape`` asks for that), else ``None``;
      * ``update_split``: ``k ↦ (losses, scale, apply)``, the k-th update as ``apply(S_k, θ_U, g)``
        with the lower level's gradient ``g = Σ_m ∇_θ losses[m](θ_k, θ_U) / scale``
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

    def solution(self) -> Solution:
        """The narrow view an implicit method takes: the block's end, θ_U and the loss."""
        return Solution(self.level, self.own(self.final), self.upper, self.loss,
                        self.final[self.level].get("opt", {}), self.report)


def state_vjp(update: Callable, state: dict, upper: dict, lam: list) -> tuple:
    """The VJP of ``S' = update(S, θ_U)`` with cotangent ``lam`` on the floating leaves of S'
    (``tree.split_differentiable``; integer step counters are constants):
    ``(∂S'/∂S ᵀ λ, ∂S'/∂θ_U ᵀ λ)``."""
    from .. import autodiff
    from ..tree import split_differentiable
    floats, join = split_differentiable(state)

    def floating_update(state_floats, upper_):
        return split_differentiable(update(join(state_floats), upper_))[0]

    return autodiff.vjp(floating_update, (floats, upper), lam, output=False)[0]
