"""Pure functional optimizers, in the manner of optax.

An optimizer is a pair of pure functions over dicts of tensors::

    state = opt.init(params)
    new_params, new_state = opt.update(params, grads, state, reads)

Nothing is mutated, so an update is differentiable when a hypergradient method unrolls it.
``state`` is a plain dict of tensors; ``state["count"]`` is the number of updates taken so far.

A hyperparameter (``lr``, ``momentum``, ``weight_decay``, ...) is a number or a callable:

* ``lr=lambda step: 0.1 * 0.99 ** step`` -- a schedule: a function of the update count (1 at the
  first update; a 0-dim float tensor in the parameters' precision, float64 for a float64 level);
* ``lr=lambda outer: outer.log_lr.exp()`` -- a function of the levels the optimizer's level
  reads (by name), so an upper level learns it by differentiating through the updates.

``reads`` maps level names to their current parameters; only callables use it.

**Parameter groups.** ``groups=`` gives parts of the module their own hyperparameters, each a
number or a callable as above (so an upper level may learn each group's learning rate)::

    ml.optim.sgd(lr=0.1, weight_decay=5e-4,
                 groups={"features": dict(lr=0.01),                  # a module prefix
                         "classifier": dict(lr=lambda outer: outer.log_lr.exp()),
                         "*.bias": dict(weight_decay=0.0)})          # a glob

A key is a parameter name as ``module.named_parameters()`` spells it: it matches that name, every
parameter under it when it is a module prefix (``"features"`` matches ``features.0.weight``, not
``features2.weight``), or, when it holds ``*``, ``?`` or ``[``, the names it matches as a glob
(``fnmatch``). A parameter takes the optimizer's hyperparameters, replaced by those of every group
that matches it (``classifier.bias`` above takes the classifier's ``lr`` and the biases'
``weight_decay``). Two groups that set the same hyperparameter of one parameter, and a group that
matches no parameter, are errors when the ``Program`` is built. This is torch.optim's
``param_groups`` addressed by name, since a level's optimizer is given before its parameters are
collected.

**Maximizing.** ``maximize=True`` ascends the level's loss (as torch.optim's ``maximize=True``: the
gradient is negated before weight decay and momentum), for min-max and adversarial levels. The
hypergradient methods of such a level linearize the objective it minimizes, the negated loss, so
that the implicit ones see a positive definite Hessian at a maximum; a user-defined optimizer that
ascends says so with ``maximize = True``.

A gradient may be ``None``: the parameter does not reach the level's loss (torch.optim sees
``p.grad is None`` there). The built-in optimizers then leave that parameter and its state (momentum
buffer, Adam moments) exactly as they were, as torch.optim does; the Program decides which
parameters these are once, when it is built, so the update stays static. A user-defined optimizer
gets None only when it says it takes it (``absent_grads = True``), else zeros.

**A level solved by your own solver.** ``solver(fn)`` is an optimizer whose one update returns
``fn``'s solution of the level (a closed form, Newton, L-BFGS); the level is then differentiated
implicitly from its optimality condition (JAXopt's ``custom_root``); see ``solver``.

A user-defined optimizer is an ``Optimizer`` built from its two functions (``reads``: the level
names its hyperparameters need; ``in_place`` and ``absent_grads`` as below, False unless given), or
any object with the same ``init``/``update`` and any of those attributes: ``as_optimizer`` turns it
into an ``Optimizer``, with the declared defaults for the attributes it lacks. The built-ins use
nothing more.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch

from .param_groups import ParamGroups, check_groups

Params = dict  # name -> Tensor


class Optimizer(NamedTuple):
    """A functional optimizer: ``init``, ``update`` and what the Program must know about them."""

    name: str
    init: Callable[[Params], dict]
    update: Callable[..., tuple[Params, dict]]
    hyperparams: dict
    reads: tuple  # level names that callable hyperparameters take
    in_place: bool = False  # True for ml.optim.from_torch: nothing may differentiate its updates
    # update() accepts grads[k] = None for a parameter the loss does not reach (and leaves it and its
    # state alone); a user-defined optimizer without this flag gets zeros there instead
    absent_grads: bool = False
    # True: update() ascends the loss; the hypergradient methods then linearize the negated loss
    maximize: bool = False
    # True for ml.optim.solver: update() returns the level's solution, takes batch=, and is
    # differentiated only implicitly (from the optimality condition at what it returns)
    solves: bool = False
    # True: a non-finite gradient makes the parameters it updates non-finite (θ − η·(an expression of
    # g) propagates NaN and Inf), so a run of updates ends at finite parameters only if every gradient
    # in it was finite; the step then checks a block's end instead of each update's gradient
    carries_nonfinite: bool = False
    # the update without its count: (params, grads, state, reads) -> (new params, state with its count
    # as it was), for an update that reads no count (plain SGD); the step then advances the count once
    # per block of updates, by their number (``LevelPlan.counted_at_end``), instead of at every update
    uncounted: Callable | None = None

    def __repr__(self) -> str:
        return f"{self.name}({_show_hyperparams(self.hyperparams)})"


def _show(value) -> str:
    """A hyperparameter as the schedule prints it: a callable as ``name(its arguments)``."""
    if callable(value):
        return f"{getattr(value, '__name__', type(value).__name__)}({', '.join(_argnames(value))})"
    if isinstance(value, dict):  # groups: {key: {hyperparameter: value}}
        return "{" + ", ".join(f"{k!r}: dict({_show_hyperparams(v)})" for k, v in value.items()) + "}"
    return repr(value)


def _show_hyperparams(hyperparams: dict) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in hyperparams.items())


class _Wrapped(Optimizer):
    """An optimizer object that is not an ``Optimizer`` (see ``as_optimizer``); prints as that object."""

    __slots__ = ()

    def __repr__(self) -> str:
        return self.name


def as_optimizer(optimizer) -> Optimizer:
    """``optimizer`` as an ``Optimizer``: itself when it is one, else its ``init`` and ``update``
    with the attributes it has among ``reads``, ``in_place``, ``absent_grads``, ``maximize``, ``solves`` and
    ``carries_nonfinite`` (the declared defaults for the others)."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    flags = ("reads", "in_place", "absent_grads", "maximize", "solves", "carries_nonfinite")
    declared = {f: getattr(optimizer, f) for f in flags if hasattr(optimizer, f)}
    return _Wrapped(repr(optimizer), optimizer.init, optimizer.update, {},
                    **{**declared, "reads": tuple(declared.get("reads", ()))})


def params_view(params: dict) -> SimpleNamespace:
    """Attribute access to a dict of parameters: ``view.log_lr``, ``view.layer.weight``."""
    root: dict = {}
    for name, value in params.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value

    def build(node):
        return SimpleNamespace(**{k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

    return build(root)


def _argnames(value) -> tuple:
    return tuple(inspect.signature(value).parameters) if callable(value) else ()


def level_reads(hyperparams: dict) -> tuple:
    """Level names that callable hyperparameters take (every argument except ``step``)."""
    names = []
    for value in hyperparams.values():
        if isinstance(value, dict):  # groups: each group's callables read levels too
            for name in level_reads({f"{k}.{h}": v for k, group in value.items() for h, v in group.items()}):
                names += [name] if name not in names else []
            continue
        names += [n for n in _argnames(value) if n != "step" and n not in names]
    return tuple(names)


def resolve(value, count, reads):
    """The value of a hyperparameter at update ``count`` given the levels it reads."""
    if not callable(value):
        return value
    kwargs = {}
    for name in _argnames(value):
        if name == "step":
            kwargs[name] = count
        elif reads is not None and name in reads:
            kwargs[name] = params_view(reads[name])
        else:
            known = sorted(reads or {})
            raise NameError(f"optimizer hyperparameter {value} takes '{name}', which is neither 'step' "
                            f"nor a level this optimizer's level reads (known: {known})")
    return value(**kwargs)


def _count(state):
    return state["count"] + 1


def _hyperparameters(plan: ParamGroups, hyperparams: dict, groups: dict):
    """``(params, count, reads) -> {parameter: {hyperparameter: value}}`` for an update. Without
    groups or callables every parameter shares the constants, handed back without resolving them
    at each update (the eager step pays this once per update of every level)."""
    if not groups and not any(callable(v) for v in hyperparams.values()):
        constant = dict(hyperparams)
        return lambda params, count, reads: dict.fromkeys(params, constant)
    return lambda params, count, reads: plan.values(params, lambda v: resolve(v, schedule_step(params, count), reads))


def schedule_step(params: dict, count: torch.Tensor) -> torch.Tensor:
    """The update count as a schedule receives it: a float in the parameters' precision, at least
    float32 (a bf16 count would round from 257 on). The integer count would make
    ``0.1 * 0.99 ** step`` a float32 tensor (torch's default dtype) in a float64 program."""
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
    return count.to(torch.promote_types(dtype, torch.float32))


def _zero_count(params: dict) -> torch.Tensor:
    """The update counter, on the parameters' device (a factory without device= follows torch's default)."""
    return torch.zeros((), dtype=torch.int64, device=next(iter(params.values())).device)


def _is_zero(value) -> bool:
    """A hyperparameter that is the plain number 0 (a tensor, even a zero one, is not: it may be learned)."""
    return isinstance(value, (int, float)) and value == 0


def _check_maximize(name, maximize):
    if not isinstance(maximize, bool):
        raise TypeError(f"{name}: maximize must be True or False, got {maximize!r}")


def _make(name, init, update, hyperparams, groups: dict, maximize: bool, uncounted=None):
    shown = dict(hyperparams)
    if groups:
        shown["groups"] = groups
    if maximize:
        shown["maximize"] = True
    return Optimizer(name, init, update, shown, level_reads(shown), absent_grads=True, maximize=maximize,
                     carries_nonfinite=True, uncounted=uncounted)


def _grouped_init(groups: ParamGroups, init):
    """``init`` that first checks the groups against the parameters (errors at build, not mid-step)."""
    def checked(params):
        groups.assign(params)
        return init(params)
    return checked


def sgd(lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0, *, maximize=False,
        groups=None) -> Optimizer:
    """SGD with optional momentum, Nesterov momentum and L2 weight decay (as torch.optim.SGD).

    g ← ±∇ + λθ (−∇ with ``maximize``);  b ← μ b + (1-τ) g (b = g at the first update);
    θ ← θ - η (g + μ b if Nesterov else b)

    ``groups`` (see the module docstring) may set ``lr``, ``momentum`` and ``weight_decay`` per group.
    """
    _check_maximize("sgd", maximize)
    groups = check_groups("sgd", groups, ("lr", "momentum", "weight_decay"))
    hp = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    momenta = [momentum] + [g["momentum"] for g in groups.values() if "momentum" in g]
    if nesterov and any(not callable(m) and m <= 0 for m in momenta):
        raise ValueError("sgd: nesterov=True needs momentum > 0 (in every group)")
    use_momentum = any(callable(m) or m != 0 for m in momenta)
    plan = ParamGroups("sgd", hp, groups)
    values_of = _hyperparameters(plan, hp, groups)

    def init(params):
        state = {"count": _zero_count(params)}
        if use_momentum:
            state["momentum"] = {k: torch.zeros_like(p) for k, p in params.items()}
        return state

    # plain SGD (constant lr, nothing else): θ ← θ - η g, with none of the per-parameter lookups
    # of the general update below, which computes the same (the eager step pays them every update)
    plain = not groups and not use_momentum and not callable(lr) and _is_zero(weight_decay) and not maximize

    def plain_uncounted(params, grads, state, reads=None):  # the count is all of its state
        return {k: p if grads[k] is None else p - lr * grads[k] for k, p in params.items()}, state

    def plain_update(params, grads, state, reads=None):
        return plain_uncounted(params, grads, state)[0], {"count": _count(state)}

    def update(params, grads, state, reads=None):
        count = _count(state)
        values = values_of(params, count, reads)
        new_params, new_state = {}, {"count": count}
        if use_momentum:
            new_state["momentum"] = {}
        first = None
        for k, p in params.items():
            eta, mu, wd = values[k]["lr"], values[k]["momentum"], values[k]["weight_decay"]
            g = grads[k]
            if g is None or _is_zero(mu):  # no momentum here: its buffer (if any) stays as it is
                if use_momentum:
                    new_state["momentum"][k] = state["momentum"][k]
            if g is None:  # not reached by the loss: no decay, no momentum (torch.optim skips it)
                new_params[k] = p
                continue
            if maximize:
                g = -g
            if not _is_zero(wd):
                g = g + wd * p
            if use_momentum and not _is_zero(mu):
                if dampening == 0.0:  # b = g at the first update: the buffer starts at zero
                    b = mu * state["momentum"][k] + g
                else:  # the first update takes g undamped (torch.optim.SGD), without a branch
                    first = (state["count"] == 0).to(p.dtype) if first is None else first
                    b = first * g + (1 - first) * (mu * state["momentum"][k] + (1 - dampening) * g)
                new_state["momentum"][k] = b
                g = g + mu * b if nesterov else b
            new_params[k] = p - eta * g
        return new_params, new_state

    return _make("sgd", _grouped_init(plan, init), plain_update if plain else update, hp, groups, maximize,
                 plain_uncounted if plain else None)


def _adam(name, lr, betas, eps, weight_decay, decoupled, eps_root, maximize, groups):
    _check_maximize(name, maximize)
    groups = check_groups(name, groups, ("lr", "betas", "eps", "weight_decay"))
    hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    plan = ParamGroups(name, hp, groups)
    values_of = _hyperparameters(plan, hp, groups)

    def init(params):
        return {"count": _zero_count(params),
                "m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(params, grads, state, reads=None):
        count = _count(state)
        values = values_of(params, count, reads)
        new_params, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            eta, (b1, b2), e, wd = (values[k][h] for h in ("lr", "betas", "eps", "weight_decay"))
            g = grads[k]
            if g is None:  # not reached by the loss: no decay, moments unchanged (torch.optim skips it)
                new_params[k], m_new[k], v_new[k] = p, state["m"][k], state["v"][k]
                continue
            if maximize:
                g = -g
            if not decoupled and not _is_zero(wd):
                g = g + wd * p
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            t = count.to(p.dtype)
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            # eps_root inside the sqrt keeps the update differentiable at v = 0 (d sqrt(0) = inf).
            step = m_hat / (torch.sqrt(v_hat + eps_root) + e)
            if decoupled:
                p = p * (1 - eta * wd)
            new_params[k] = p - eta * step
            m_new[k], v_new[k] = m, v
        return new_params, {"count": count, "m": m_new, "v": v_new}

    return _make(name, _grouped_init(plan, init), update, hp, groups, maximize)


def adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, eps_root=1e-16, *, maximize=False,
         groups=None) -> Optimizer:
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as torch.optim.Adam.

    ``eps_root`` is added under the square root so that unrolled updates stay differentiable.
    ``maximize=True`` ascends the loss; ``groups`` (see the module docstring) may set ``lr``,
    ``betas``, ``eps`` and ``weight_decay`` per group.
    """
    return _adam("adam", lr, betas, eps, weight_decay, False, eps_root, maximize, groups)


def adamw(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, eps_root=1e-16, *, maximize=False,
          groups=None) -> Optimizer:
    """AdamW (Loshchilov & Hutter): decoupled weight decay θ ← θ(1 - ηλ), as torch.optim.AdamW.

    ``maximize`` and ``groups`` as for ``adam``.
    """
    return _adam("adamw", lr, betas, eps, weight_decay, True, eps_root, maximize, groups)


class _TorchOptimizer:
    """The torch.optim instance behind ``ml.optim.from_torch``; its leaves share storage with the params."""

    def __init__(self, cls, params: dict, kwargs: dict, groups: ParamGroups):
        self.leaves = {k: torch.nn.Parameter(v.detach(), requires_grad=True) for k, v in params.items()}
        self.optimizer = cls(groups.torch_groups(self.leaves), **kwargs)

    def __deepcopy__(self, memo):  # checkpoints and copies keep the same live optimizer
        return self


def from_torch(cls, *, groups=None, **kwargs) -> Optimizer:
    """A ``torch.optim`` optimizer (``ml.optim.from_torch(torch.optim.AdamW, lr=1e-3)``), updating in place.

    For big models: no second copy of the parameters or of the optimizer state per update. Nothing
    may differentiate through its updates, so a level may use it only when it is a top level or every
    level above it differentiates it with a method that does not replay updates (CG, Neumann,
    FiniteDiff, FirstOrder); the Program checks this at build time. Its update checks its gradient
    first and leaves the parameters untouched when it is not finite; a non-finite value *elsewhere*
    in the same step cannot undo an in-place update that already happened.

    ``groups`` are named as for the functional optimizers (see the module docstring) and become
    torch.optim's param groups; their values must be plain numbers, since nothing differentiates
    these updates. ``maximize=True`` is passed on to torch.optim.
    """
    name = f"from_torch:{cls.__name__}"
    groups = check_groups(name, groups, None)
    for key, group in groups.items():
        learned = [h for h, v in group.items() if callable(v)]
        if learned:
            raise TypeError(f"{name}: group {key!r} sets {learned} to a function; a torch.optim optimizer takes "
                            f"numbers (nothing differentiates its updates). Use ml.optim.sgd/adam/adamw to learn them")
    plan = ParamGroups(name, dict(kwargs), groups)
    hp = dict(kwargs, **({"groups": groups} if groups else {}))

    def init(params):
        return {"count": _zero_count(params), "torch": _TorchOptimizer(cls, params, kwargs, plan)}

    def update(params, grads, state, reads=None):
        handle = state["torch"]
        if not all(bool(torch.isfinite(g).all()) for g in grads.values() if g is not None):
            return params, state  # the Program sees the non-finite gradient and raises or skips
        with torch.no_grad():
            for k, leaf in handle.leaves.items():
                if leaf.data_ptr() != params[k].data_ptr():
                    leaf.copy_(params[k])
                leaf.grad = None if grads[k] is None else grads[k].detach()
        handle.optimizer.step()
        return {k: leaf.detach() for k, leaf in handle.leaves.items()}, {"count": state["count"] + 1,
                                                                        "torch": handle}

    return Optimizer(name, init, update, hp, (), in_place=True, absent_grads=True,
                     maximize=bool(kwargs.get("maximize", False)))


def solver(fn: Callable) -> Optimizer:
    """A level solved by ``fn`` in each update, differentiated implicitly (JAXopt's ``custom_root``).

    ``fn(params, batch, **levels) -> params`` returns the level's solution: a minimizer of its loss
    on ``batch`` given the levels it reads, computed any way (a closed form, a few Newton steps,
    ``torch.optim.LBFGS``, a sklearn-like solver). ``params`` (the current parameters, by name) is
    a warm start; every argument after ``batch`` without a default is named after a level whose
    parameters it takes, as attribute access (``def fn(params, batch, outer): ... outer.log_l2.exp() ...``). ``fn`` runs
    under ``torch.no_grad()``; its result must have the same names, shapes and dtypes as ``params``.

    Nothing differentiates ``fn``: the level's hypergradient method differentiates the optimality
    condition ∇_θ L(θ*, θ_U) = 0 at the returned θ*, so it must be an implicit one (``CG``, the
    default, with one iteration per parameter up to 100; ``Implicit`` with a dense solve;
    ``Neumann``, ``Nystrom``). ``fn`` must return a minimizer of the level's own loss (the function
    the level is written as): the implicit hypergradient is that of this minimizer. A method that
    replays or differentiates the updates (``Unroll``, ``Forward``, ``MixedUnroll``, ``FixedPoint``,
    ``ZeroOrder``, ``SAMA``), on this level or on a level above whose updates run it, is refused
    when the ``Program`` is built, as are ``tasks=True``, ``grad_accum`` > 1 and a solved level
    with lower levels of its own. Use ``steps=1``: one update solves. Under ``compile=True`` the
    level's update runs eagerly.
    """
    if not callable(fn):
        raise TypeError(f"ml.optim.solver: fn must be a function (params, batch, **levels) -> params, got {fn!r}")
    arguments = _argnames(fn)
    if len(arguments) < 2:
        raise TypeError(f"ml.optim.solver: {getattr(fn, '__name__', fn)} must take (params, batch, ...levels it "
                        f"reads), got arguments {arguments}")
    # the levels it reads: its arguments after batch, except those with a default (its own settings)
    signature = inspect.signature(fn).parameters
    reads = tuple(a for a in arguments[2:] if signature[a].default is inspect.Parameter.empty)

    def init(params):
        return {"count": _zero_count(params)}

    def update(params, grads, state, reads_=None, batch=None):
        levels = {n: params_view({k: v.detach() for k, v in (reads_ or {})[n].items()}) for n in reads}
        with torch.no_grad():
            solution = fn({k: v.detach() for k, v in params.items()}, batch, **levels)
        _check_solution(fn, params, solution)
        return {k: solution[k].detach() for k in params}, {"count": state["count"] + 1}

    return Optimizer("solver", init, update, {"fn": fn}, reads, absent_grads=True, solves=True)


def _check_solution(fn, params: dict, solution) -> None:
    """``solution`` names, shapes and dtypes as ``params`` (else an error before anything is committed)."""
    who = getattr(fn, "__name__", fn)
    if not isinstance(solution, dict) or set(solution) != set(params):
        got = sorted(solution) if isinstance(solution, dict) else type(solution).__name__
        raise TypeError(f"ml.optim.solver: {who} must return a dict with the level's parameter names "
                        f"{sorted(params)}, got {got}")
    bad = [k for k, p in params.items() if not isinstance(solution[k], torch.Tensor)
           or solution[k].shape != p.shape or solution[k].dtype != p.dtype]
    if bad:
        raise TypeError(f"ml.optim.solver: {who} returned {bad} with another shape or dtype than the parameters")
    nonfinite = [k for k in params if not bool(torch.isfinite(solution[k]).all())]
    if nonfinite:  # checked here: the solution would otherwise be committed as the level's parameters
        raise FloatingPointError(f"ml.optim.solver: {who} returned non-finite values in {nonfinite}; nothing "
                                 f"was updated. Check the solver's conditioning (add regularization)")
