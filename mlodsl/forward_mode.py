"""How a level's Hessian products are taken, decided once at build: a method's ``low_memory`` setting.

A method with a ``low_memory`` field (``CG``) takes its products either from one linearization of
the gradient kept through the solve (reverse over reverse), or afresh by reverse over forward
(``autodiff.reverse_over_forward``), which holds no gradient graph between products but needs a
forward-mode derivative of every op of the loss. ``low_memory=None`` (the default) leaves the
choice to the build; ``True`` or ``False`` is the user's and wins.

The build chooses reverse over forward where it pays and is known to work: the level has at least
``LOW_MEMORY_FROM`` parameters (below that the linearization's graph is small, and forward mode's
per-op cost outweighs it: on a 20-parameter logistic regression, CG(3) by reverse over forward
took 5 ms more per step), its products are taken eagerly on the autograd tape and by nothing
around them, and one product by reverse over forward at the initial parameters, on the first
batch, succeeded (``kernels.forward_mode_failures``). A level's traced graph runs the same ops at
every evaluation, so an op without a forward-mode derivative is met there (a later batch of
another shape could still route a composite op to another kernel: torch then raises naming it, an
error and never a wrong number); an opaque level, whose function may take other branches later,
keeps the linearization. ``low_memory=True`` where that
product fails is refused at build, naming the level, the op and the fix. The decision is recorded
in the plan (``LevelPlan.afresh``, the "products" column of ``print(prog.plan)``) and the step is
written from it (``planned``).
"""
from __future__ import annotations

import contextlib
import dataclasses

from .graph import ProgramError

LOW_MEMORY_FROM = 1 << 22  # parameters (16 MiB in fp32) from which the build chooses reverse over forward


def has_choice(method) -> bool:
    """Whether ``method`` has a ``low_memory`` setting (a dataclass field)."""
    return dataclasses.is_dataclass(method) and "low_memory" in {f.name for f in dataclasses.fields(method)}


def planned(method, afresh: bool | None):
    """``method`` with its ``low_memory`` as the build decided it (``afresh``; None: no decision)."""
    return method if afresh is None or not has_choice(method) else dataclasses.replace(method, low_memory=afresh)


def differentiated_again(name: str, plan, levels: dict, methods: dict) -> bool:
    """Whether the products of lower level ``name``'s method may themselves be differentiated: its
    block is shared or unrolled with others, or an update that uses its hypergradient is replayed by
    a level above (a method that differentiates updates), or runs under ``vmap`` (tasks)."""
    grouped = {n for group in plan.groups.values() for m in group for n in plan.subtree[m]}
    if name in grouped or name in plan.hosts:
        return True
    level = plan.parent[name]
    while level is not None:
        method = methods.get(level)
        if levels[level].tasks or level in grouped:
            return True
        if method is not None and (not method.products_only or method.replays_updates):
            return True
        level = plan.parent[level]
    return False


def eligible(name: str, plan, levels: dict, methods: dict, *, params: dict, compiled: set, sharded: set,
             data_parallel: bool, opaque: bool) -> bool:
    """Whether the build may choose reverse over forward for ``name`` (before the probe): large
    enough, eager, on one process, unsharded, not batched over tasks, its graph traced, its products
    differentiated by nothing around them. Elsewhere the linearization, which every one of those
    paths is tested with, stays the default."""
    size = sum(t.numel() for t in params.values())
    return (size >= LOW_MEMORY_FROM and name not in compiled and name not in sharded and not data_parallel
            and not levels[name].tasks and not opaque and not differentiated_again(name, plan, levels, methods))


def decisions(methods: dict, choose: dict, failures: dict, sharded=()) -> dict:
    """``{level: whether its method takes its products by reverse over forward}`` for every method
    with a ``low_memory`` setting: the user's ``True`` or ``False``, else ``choose[level]`` (whether
    the build may) and a probe that worked. ``failures`` maps levels to ``(error, culprit)`` of
    their probe (None: it worked); a ``True`` whose probe failed is refused (``sharded``: the
    levels whose parameters are slices, which the message names as the cause)."""
    out = {}
    for name, method in methods.items():
        if not has_choice(method):
            continue
        failed = failures.get(name)
        if method.low_memory is True and failed is not None:
            raise refusal(name, method, *failed, sharded=name in sharded)
        out[name] = method.low_memory if method.low_memory is not None else bool(choose.get(name)) and not failed
    return out


def refusal(name: str, method, err: Exception, culprit: str, sharded: bool = False) -> ProgramError:
    """Why ``low_memory=True`` cannot be built for level ``name``, and the fix."""
    first = (str(err).strip().splitlines() or [""])[0]
    what = (f"its parameters are sharded (shard=True: DTensor slices, which torch's forward mode does not take; "
            f"here {culprit} failed)" if sharded else f"{culprit} of its loss has no forward-mode derivative")
    return ProgramError(
        f"level '{name}': {method!r} takes its Hessian products by reverse over forward (low_memory=True), but "
        f"{what} ({type(err).__name__}: {first}). Fix: "
        f"low_memory=False (the same numbers from one linearization of the gradient, kept through the "
        f"solve: about one parameter size more), or write the loss with ops that have a forward-mode "
        f"derivative (a custom autograd.Function needs a jvp staticmethod).")


def settle(runtime, plan, levels: dict, methods: dict, *, params: dict, batches: dict, modules: dict,
           sharded: set, data_parallel: bool, context=None) -> dict:
    """``decisions`` for this program's methods, probing the levels that leave ``low_memory`` to
    the build and are ``eligible``, and those that ask for it (``low_memory=True``: probed under
    ``torch.func`` too where the level compiles or is batched over tasks). ``params``: every
    level's parameters; ``batches``: level -> its first batch; ``context``: what a probe runs in (a
    sharded program's collectives)."""
    from .kernels import forward_mode_failures
    compiled = {n for n in levels if runtime.compiler.compiles(n)}
    choose, asked = {}, []
    for name, method in methods.items():
        if not has_choice(method) or method.low_memory is False:
            continue
        if method.low_memory is True:
            asked.append(name)
        else:
            choose[name] = eligible(name, plan, levels, methods, params=params[name], compiled=compiled,
                                    sharded=sharded, data_parallel=data_parallel,
                                    opaque=getattr(runtime.traced[name], "opaque", True))
    probed = asked + [n for n, ok in choose.items() if ok]
    failures = {}
    if probed:
        transformed = {n for n in asked if n in compiled or levels[n].tasks}
        with context() if context is not None else contextlib.nullcontext():
            failures = forward_mode_failures(runtime, probed, params, {n: batches[n] for n in probed}, modules,
                                             transformed)
    return decisions(methods, choose, failures, sharded)
