"""The helpers the generated step calls: evaluating a level's loss and its partial derivatives,
applying an optimizer update, recording metrics, and packaging a block's trajectory.

Everything here is a pure function of tensors (the log is written only outside of transforms), so
the generated step stays differentiable and traceable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import autodiff
from .hypergrad.base import Trajectory
from .tree import all_finite


class LevelError(RuntimeError):
    """An error raised while running a level; the message names the level."""


def split_output(name: str, out):
    """A level function returns ``loss`` or ``(loss, metrics)``."""
    metrics = {}
    if isinstance(out, (tuple, list)):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise LevelError(f"level '{name}' must return a scalar loss or (loss, metrics_dict); "
                             f"got a {type(out).__name__} of length {len(out)}")
        out, metrics = out
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LevelError(f"level '{name}' must return a scalar loss tensor (reduce it with .mean() or "
                         f".sum()); got {shape}")
    return out, metrics


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
    runtime: "Runtime"
    begin: Callable | None = None  # up -> start state, when the block restarts each time it runs

    def toward(self, upper_name: str) -> Trajectory:
        rt, level, up = self.runtime, self.level, self.up
        final_params = params_of(self.final)

        def advance(state, upper, k):
            return self.advance(state, {**up, upper_name: upper}, k)

        def loss(own, upper):
            params = {**up, **final_params, level: own, upper_name: upper}
            return split_output(level, rt.traced[level](params, self.last_batch))[0]

        def update_map(own, upper):
            g = torch.func.grad(loss)(own, upper)
            reads = {**up, **final_params, level: own, upper_name: upper}
            return rt.optimizers[level].update(own, g, self.final[level]["opt"], reads)[0]

        def begin(upper):
            return self.start if self.begin is None else self.begin({**up, upper_name: upper})

        from_upper = rt.starts.get(level) == upper_name
        return Trajectory(level, self.steps, self.start, self.final, self.path, upper_name,
                          up[upper_name], advance, loss, update_map, begin, from_upper)


def params_of(state: dict) -> dict:
    """``{level: params}`` from a state ``{level: {"params", "opt"}}``."""
    return {name: s["params"] for name, s in state.items()}


def restrict(state: dict, names) -> dict:
    return {n: state[n] for n in names}


def outside(state: dict, up: dict, names) -> dict:
    """Parameters of every level seen from a block over ``names``: ``up`` plus the rest of ``state``."""
    return {**up, **{n: s["params"] for n, s in state.items() if n not in names}}


class Runtime:
    """Binds the program's traced losses, optimizers and methods for the generated step."""

    def __init__(self, traced: dict, optimizers: dict, methods: dict, starts: dict | None = None,
                 init_params: dict | None = None, projections: dict | None = None):
        self.traced, self.optimizers, self.methods = traced, optimizers, methods
        self.starts = starts or {}            # level -> None | "init" | upper level name
        self.init_params = init_params or {}  # level -> its initial parameters
        self.projections = projections or {}  # level -> params -> params, after each update
        self.restrict, self.outside, self.params_of = restrict, outside, params_of

    def partials(self, name: str, params: dict, batch, wrt: tuple):
        """Loss of level ``name`` and its partial gradients w.r.t. the levels in ``wrt``.

        Levels in ``wrt`` that the loss does not take get zero gradients.
        """
        traced = self.traced[name]
        taken = {lvl for lvl, _ in traced.inputs.values()}
        diff = {w: params[w] for w in wrt if w in taken}

        def loss_fn(diff_params):
            loss, metrics = split_output(name, traced({**params, **diff_params}, batch))
            return loss, (loss, metrics)

        grads, (loss, metrics) = autodiff.grad_with_aux(loss_fn, diff)
        for w in wrt:
            if w not in grads:
                grads[w] = {k: torch.zeros_like(v) for k, v in params[w].items()}
        return loss, metrics, grads

    def apply_update(self, name: str, sub: dict, up: dict, grad: dict) -> dict:
        """One optimizer update of level ``name`` inside a block state."""
        reads = {**up, **params_of(sub)}
        p, o = self.optimizers[name].update(sub[name]["params"], grad, sub[name]["opt"], reads)
        if name in self.projections:
            p = self.projections[name](p)
        return {**sub, name: {"params": p, "opt": o}}

    def begin(self, name: str, s: dict, up: dict) -> dict:
        """The state a block of ``name`` starts from: as it is (warm start), its initial values
        (``start_from="init"``), or the upper level's parameters (``start_from=<upper>``, MAML)."""
        how = self.starts.get(name)
        if how is None:
            return s
        params = (self.init_params[name] if how == "init"
                  else {k: up[how][k] for k in s[name]["params"]})
        return {**s, name: {"params": params, "opt": self.optimizers[name].init(params)}}

    def block(self, level, steps, start, final, path, up, advance, last_batch, begin=None) -> BlockRecord:
        return BlockRecord(level, steps, start, final, path, up, advance, last_batch, self, begin)

    @staticmethod
    def new_log() -> dict:
        return {"_finite": {}}

    @staticmethod
    def record(log, name, loss, metrics, grad):
        """Write a level's loss and metrics to the log (outside of transforms only)."""
        if log is None:
            return
        ok = torch.isfinite(loss) & all_finite(grad)
        prev = log["_finite"].get(name)
        log["_finite"][name] = ok if prev is None else prev & ok
        log[name] = loss.detach()
        log[f"{name}/grad_norm"] = torch.sqrt(sum((g.detach() ** 2).sum() for g in grad.values()))
        for k, v in metrics.items():
            log[f"{name}/{k}"] = v.detach() if isinstance(v, torch.Tensor) else v

    @staticmethod
    def mean_over_tasks(g: dict) -> dict:
        return {k: v.mean(0) for k, v in g.items()}

    @staticmethod
    def add(a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}
