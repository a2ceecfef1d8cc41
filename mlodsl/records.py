"""What a lower level's block did, for the methods that differentiate it: its record
(``BlockRecord``, viewed as a ``Trajectory`` toward one upper) and the autograd tape its updates
may be recorded on."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import autodiff, steplog
from .hypergrad.base import Trajectory
from .loops import StackedPath, UpdateLoop
from .states import params_of
from .tree import detached


@dataclass
class BlockRecord:
    """What a lower level's block did; ``toward(upper)`` views it as a ``Trajectory`` for one upper."""

    level: str
    steps: int
    start: dict
    final: dict
    path: list | None
    up: dict                       # parameters of every level outside the block, as the block saw them
    advance: Callable              # (state, up, k) -> state
    last_batch: object
    runtime: object                # the Runtime: the level's loss and optimizer, for toward()
    begin: Callable | None = None  # up -> start state, when the block restarts each time it runs
    log: dict | None = None        # where methods' diagnostics go (None inside transforms)
    update_vjp: Callable | None = None  # (state, up, upper name, k, λ) -> (λ, upper cotangent)
    tape: dict | None = None       # upper name -> the leaves the block's updates were recorded from
    loop: UpdateLoop | None = None  # the level's update loop as compiled regions (mlodsl.loops)
    batches: list | None = None    # the block's batches, one per update (for the loop's reverse pass)

    def reverse_vjp(self, upper_name: str) -> Callable | None:
        """``(first, λ_K, total) -> (λ_first, total + Σ ∂S_{k+1}/∂θ_U ᵀ λ_{k+1}) | None``: Unroll's
        reverse pass as one compiled loop, when the forward pass ran as one (``StackedPath``)."""
        if self.loop is None or not isinstance(self.path, StackedPath):
            return None
        up = self.up

        def reverse(first, lam, total):
            return self.loop.reverse(self.path, up, upper_name, self.batches, first, lam, total)

        return reverse

    def taped_vjp(self, upper_name: str) -> Callable | None:
        """``v ↦ vᵀ dθ_K/dθ_U`` by one backward pass over the tape the block's forward updates
        recorded (``Runtime.tape``), or None when they recorded none for ``upper_name``."""
        if self.tape is None or upper_name not in self.tape:
            return None
        return lambda cotangent: tape_vjp((self.final, self.tape), upper_name, cotangent)

    def toward(self, upper_name: str) -> Trajectory:
        rt, level, up = self.runtime, self.level, self.up
        final_params = params_of(self.final)

        def advance(state, upper, k):
            return self.advance(state, {**up, upper_name: upper}, k)

        loss = rt.lower_loss(level, upper_name, up, final_params, self.last_batch)

        def update_map(own, upper):
            g = autodiff.grad(loss)(own, upper)
            reads = {**up, **final_params, level: own, upper_name: upper}
            new = rt.optimizers[level].update(own, rt.mark_absent(level, g), self.final[level]["opt"], reads)[0]
            return rt.projections[level](new) if level in rt.projections else new

        def begin(upper):
            return self.start if self.begin is None else self.begin({**up, upper_name: upper})

        from_upper = rt.starts.get(level) == upper_name
        advance_vjp = None
        if self.update_vjp is not None:
            def advance_vjp(state, k, lam):
                return self.update_vjp(state, up, upper_name, k, lam)

        def report(key, value):
            steplog.report(self.log, level, key, value)

        update_split = None
        if self.batches is not None:  # a level with no lower levels: its k-th update's batch is known
            def update_split(k):
                return rt.update_split(level, up, upper_name, self.batches[k])

        return Trajectory(level, self.steps, self.start, self.final, self.path, upper_name,
                          up[upper_name], advance, rt.minimized(level, loss), update_map, begin, from_upper,
                          report, advance_vjp,
                          self.taped_vjp(upper_name), self.reverse_vjp(upper_name), update_split)


def tape_gradient(loss: torch.Tensor, leaves: dict) -> dict:
    """∇ loss in ``leaves``, by one backward pass over the tape."""
    return dict(zip(leaves, autodiff.tape_grads([loss], list(leaves.values()), None, create_graph=False)))


def tape_vjp(taped: tuple, upper_name: str, cotangent: dict) -> dict:
    """``vᵀ dθ_K/dθ_U`` by one backward pass over the tape a block recorded: ``taped`` is the
    block's ``(final state, tape)``, ``cotangent`` maps levels to cotangents on their final
    parameters."""
    final, tape = taped
    leaves = tape[upper_name]
    pairs = [(final[n]["params"][k], c) for n, ct in cotangent.items() for k, c in ct.items()
             if final[n]["params"][k].requires_grad]
    if not pairs:
        return {k: torch.zeros_like(v) for k, v in leaves.items()}
    grads = autodiff.tape_grads([o for o, _ in pairs], list(leaves.values()), [c for _, c in pairs],
                                create_graph=False, retain_graph=len(tape) > 1)  # other uppers need it
    return dict(zip(leaves, grads))


def recording(tape):
    """The context the block's updates run in: while a tape is recorded, every product inside
    them is built with ``create_graph`` (even where its own inputs carry no graph yet, as at
    the first update), as for the updates an enclosing product differentiates."""
    return autodiff.evaluating() if tape is not None else contextlib.nullcontext()


def untaped(state: dict, tape) -> dict:
    """The block's final state as the rest of the step sees it: values, off the tape."""
    return state if tape is None else detached(state)
