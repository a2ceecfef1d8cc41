"""The build-time evaluation of every level's loss: errors surface when the Program is built, named.

Besides running each loss once at the initial parameters, it checks with autograd that the loss
has a path from the parameters its level learns from: its own, or those of a level it depends on
(whose solution it goes through). Without one, the level's gradient is zero or undefined, which at
run time is a raw autograd error or, worse, training that silently does nothing. The usual causes
are a forgotten ``depends_on`` (the loss calls a lower level's module that it only *reads*) and a
detached loss.
"""
from __future__ import annotations

import torch

from .graph import ProgramError
from .runtime import split_output


def _loss(pl, params: dict, batch, trainable) -> tuple:
    """The loss with the parameters of the levels in ``trainable`` as fresh leaves that require grad."""
    leaves = {n: {k: v.detach().requires_grad_(n in trainable) for k, v in p.items()} for n, p in params.items()}
    with torch.enable_grad():
        return split_output(pl.level.name, pl.traced(leaves, batch))[0], leaves


def _learns_through(levels: dict, name: str) -> set:
    """``name`` and every level below it: its gradient flows through the solutions of the levels it
    depends on, and through theirs in turn (a top level learns through a bottom one it only reads)."""
    seen, todo = {name}, [name]
    while todo:
        for dep in levels[todo.pop()].level.depends_on_names:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def check_losses(levels: dict, params: dict, batches: dict):
    """Evaluate every level's loss (``levels``: name -> ProgramLevel) at ``params`` on ``batches``
    (one batch per level); raise ``ProgramError`` naming the level when one fails or has no gradient."""
    for name, pl in levels.items():
        try:
            loss, _ = _loss(pl, params, batches[name], _learns_through(levels, name))
        except Exception as err:
            raise ProgramError(f"level '{name}' failed when evaluated at its initial parameters: "
                               f"{type(err).__name__}: {err}") from err
        if loss.requires_grad:
            continue
        # No path from what it learns from: find which levels' parameters the loss does reach.
        loss, leaves = _loss(pl, params, batches[name], set(params))
        if not loss.requires_grad:
            raise ProgramError(f"level '{name}': its loss does not require grad, so no gradient reaches its "
                               f"parameters: it was detached (.detach(), .data, .item(), torch.no_grad(), "
                               f"state_dict(), a new tensor made from its value); return the loss as computed "
                               f"from the level's modules")
        flat = [(n, x) for n, p in leaves.items() for x in p.values()]
        grads = torch.autograd.grad(loss, [x for _, x in flat], allow_unused=True)
        read = sorted({n for (n, _), g in zip(flat, grads) if g is not None})
        deps = ", ".join(read)
        raise ProgramError(f"level '{name}': its loss has no path from its own parameters, only from those of "
                           f"{read} (levels it reads, taking their parameters as constants), so '{name}' gets "
                           f"no gradient; it probably needs depends_on=[{deps}] (its loss then goes through "
                           f"{deps}'s solution and '{name}' learns through its response), or the loss was "
                           f"detached from '{name}''s parameters")


def check_hypergradient_paths(levels: dict) -> None:
    """Refuse a level whose gradient would be zero at every step: its loss reaches neither its own
    parameters nor a level below it whose solution moves with them.

    ``check_losses`` asks for a path from the parameters a level learns from, which a loss through
    a lower level's solution has; but that solution moves with the upper level only where the lower
    loss (or its optimizer's hyperparameters, or its start) takes the upper's parameters as values
    with a gradient. ``outer.lam.item()``, ``float(outer.lam)`` or ``outer.lam.detach()`` in the lower
    loss cut that path, and the hypergradient would be an exact, silent zero. Which parameters each
    loss reaches is what the build's probe found on the autograd tape (``TracedLevel.reads``); a level
    whose reads are unknown (empty) counts as reaching everything."""
    reads = {n: set(pl.traced.reads) if pl.traced.reads else set(levels) for n, pl in levels.items()}
    for upper, pl in levels.items():
        if not any(p.requires_grad for p in pl.level.module.parameters()):
            continue
        below = _learns_through(levels, upper) - {upper}
        if upper in reads[upper] or not below:
            continue
        moving = set()  # levels below whose solution moves with the upper level's parameters
        grew = True
        while grew:
            grew = False
            for lower in below - moving:
                lvl = levels[lower].level
                start = getattr(lvl.start_from, "name", lvl.start_from)
                if upper in reads[lower] or upper in lvl.optimizer.reads or start == upper or reads[lower] & moving:
                    moving.add(lower)
                    grew = True
        if reads[upper] & moving:
            continue
        through = sorted(reads[upper] & below)
        raise ProgramError(
            f"level '{upper}' would get a zero gradient at every step: its loss reaches its parameters only "
            f"through {through}'s solution, and no level below it takes '{upper}''s parameters as values "
            f"with a gradient (read with .item(), float(), .detach(), under torch.no_grad(), or not at all), "
            f"so that solution does not move with '{upper}'. Use '{upper}''s parameters as tensors in the "
            f"lower loss (`outer.lam`, not `outer.lam.item()`).")
