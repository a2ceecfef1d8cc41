"""The step's log: each update's loss, metrics and gradient norm, the methods' diagnostics, and
the checks run on them after the step (``StepHealth``), before anything is committed.

The log is a plain dict written only outside of transforms; under ``vmap`` (``tasks=True``) a task's
log comes back as outputs of the vmapped function (``TaskLog``).
"""
from __future__ import annotations

import warnings

import torch

from .hypergrad.base import DivergenceError, DivergenceWarning
from .hypergrad.implicit import ConvergenceWarning
from .sharding import plain


class TaskLog(dict):
    """The log of one task's evaluation under ``vmap`` (``tasks=True``). Nothing can be written
    from inside the transform to a log outside it, so a task's method diagnostics (a CG residual)
    and loss health come back as outputs of the vmapped function (``task_outcome``) and are merged
    into the step's log (``merge_task_outcomes``); running statistics are not staged from it."""


def new_log() -> dict:
    return {"_finite": {}, "_reports": {}}


def task_log() -> TaskLog:
    return TaskLog(_finite={}, _reports={})


def task_outcome(log: TaskLog) -> dict:
    """What one task's evaluation reported, as tensors (an output of the vmapped function)."""
    return {"_finite": log["_finite"],
            "_reports": {lvl: {k: [torch.as_tensor(v) for v in vs] for k, vs in keys.items()}
                         for lvl, keys in log["_reports"].items()}}


def merge_task_outcomes(log, outcomes: dict):
    """Every task's reports and loss health (stacked over tasks by ``vmap``) into the step's
    log: a diagnostic is the worst over the tasks, so one task's diverged solve is caught."""
    if log is None:
        return
    for name, values in outcomes["_finite"].items():
        log["_finite"].setdefault(name, []).extend(values)
    for level, keys in outcomes["_reports"].items():
        for key, values in keys.items():
            for value in values:
                report(log, level, key, value.max())


def report(log, level: str, key: str, value):
    """A method's diagnostic (a CG residual) as the level's metric; every value of the step is
    kept for ``check_divergence`` (a block may run several times a step; the metric is the last)."""
    if log is None:
        return
    value = plain(_detached(value)) if isinstance(value, torch.Tensor) else value
    log[f"{level}/{key}"] = value
    log.setdefault("_reports", {}).setdefault(level, {}).setdefault(key, []).append(value)


def report_info(log, level: str, info: dict):
    """A method's diagnostics (``Runtime.solution``'s ``info``) as the level's metrics."""
    for key, value in info.items():
        report(log, level, key, value)


def _detached(x: torch.Tensor) -> torch.Tensor:
    """``x.detach()`` where it carries a graph (a kernel saved per logged value where it does not)."""
    return x.detach() if x.requires_grad else x


def grad_norm(grad: dict) -> torch.Tensor:
    """The norm of a gradient (detached): a NaN or Inf anywhere in it makes the norm non-finite."""
    if len(grad) == 1:
        return plain(torch.linalg.vector_norm(_detached(next(iter(grad.values())))))
    norms = [plain(torch.linalg.vector_norm(_detached(g))) for g in grad.values()]  # a slice's: all-reduced
    return torch.linalg.vector_norm(torch.stack(norms))


def record(log, name, loss, metrics, norm):
    """Write a level's loss, metrics and gradient norm to the log (outside of transforms only)."""
    if log is None:
        return
    loss = _detached(loss)
    # Checked once at the end of the step (``StepHealth.finite``): one reduction, not one per update.
    log["_finite"].setdefault(name, []).extend((loss, norm))
    _show(log, name, loss, metrics, norm)


def _show(log, name, loss, metrics, norm):
    """The level's entries in the step's row: its last update's loss, gradient norm and metrics."""
    log[name] = loss
    log[f"{name}/grad_norm"] = norm
    for k, v in metrics.items():
        log[f"{name}/{k}"] = _detached(v) if isinstance(v, torch.Tensor) else v


def record_block(log, name, losses: list, metrics, grad: dict, state: dict):
    """Write a block of level ``name`` whose gradients its end checks (``LevelPlan.checked_at_end``):
    every update's loss, the last update's metrics and gradient norm, and the smallest and largest
    of the parameters it ended at, for ``StepHealth.finite``. Its optimizer carries a non-finite
    gradient into the parameters, and a NaN or Inf there stays in every later update: the block's
    gradients were all finite if its end is."""
    if log is None:
        return
    last = losses[-1]
    norm = grad_norm(grad)
    with torch.no_grad():  # values for the log, off any tape the block recorded; one vector, one kernel
        ends = [x for p in state[name]["params"].values() if p.numel() for x in torch.aminmax(p)]
        log["_finite"].setdefault(name, []).append(torch.stack([*losses, norm, *ends]))  # aminmax is NaN where a NaN is
    _show(log, name, _detached(last), metrics, norm)


def _all_finite(values: list) -> torch.Tensor:
    """Whether every element of ``values`` (a level's logged losses and gradient norms: scalars,
    or vectors from a compiled loop or the tasks' vmap) is finite, as a 0-d bool tensor."""
    if all(x.dim() == 0 for x in values):
        flat = torch.stack(values)
    else:
        flat = torch.cat([x if x.dim() == 1 else x.reshape(-1) for x in values])
    return torch.isfinite(flat).all()


class StepHealth:
    """The checks of one step's log: every loss and gradient finite, no hypergradient solve
    diverged (``Method.diverged``), and a warning, once per level, for a solve that stopped short
    (``Method.unconverged``)."""

    def __init__(self, methods: dict, loss_scales: dict):
        self.methods, self.loss_scales = methods, loss_scales
        self.warned_unconverged: set = set()  # levels whose method's solve has been said not to converge

    def finite(self, log) -> dict:
        """``{level: True when every loss and gradient it logged in the step was finite}``; pops them.
        First raises ``DivergenceError`` when a hypergradient solve in the step diverged (not in an
        fp16 step that overflowed: the Program skips that one and backs its loss scale off)."""
        values = log.pop("_finite")
        every = [x for vs in values.values() for x in vs]
        if every and len({x.device for x in every}) == 1 and bool(_all_finite(every)):
            finite = dict.fromkeys(values, True)  # the usual answer: one reduction, one synchronization
        else:
            finite = {n: bool(_all_finite(v)) for n, v in values.items()}
        reports = log.pop("_reports", {})
        if all(finite.values()) or not self.loss_scales:
            self.check_divergence(reports)
        return finite

    def check_divergence(self, reports: dict):
        """Raise ``DivergenceError`` (or warn, for a method with ``on_divergence="warn"``) when a
        method's diagnostics in this step say its solve diverged (the method's ``diverged``). Runs
        after the step, outside every transform and before anything is committed."""
        for level, values in reports.items():
            method = self.methods.get(level)
            if method is None:
                continue
            # every diagnostic is "larger is worse"; a few scalars per step (one per hypergradient)
            worst = {k: max(float(v) for v in vs) for k, vs in values.items()}
            problem = method.diverged(worst)
            if problem is None:
                self.warn_unconverged(level, method, worst)
                continue
            message = f"level '{level}': the hypergradient by {method!r} {problem}."
            if method.on_divergence == "warn":
                warnings.warn(message + " The step is taken all the same (on_divergence='warn').",
                              DivergenceWarning, stacklevel=4)
            else:
                raise DivergenceError(message + " The program's parameters and optimizer states are unchanged "
                                      "(on_divergence='warn' on the method warns and goes on instead).")

    def warn_unconverged(self, level: str, method, worst: dict):
        """Warn, once per level, when the method's solve stopped short of converging (its
        ``unconverged(diagnostics)``, optional: ``CG``'s residual above ``warn_residual``)."""
        if level in self.warned_unconverged:
            return
        note = method.unconverged(worst)
        if note is not None:
            self.warned_unconverged.add(level)
            warnings.warn(f"level '{level}': the hypergradient by {method!r} {note}. The step is taken; "
                          f"this warning is given once for this level (the residual is its metric "
                          f"'{level}/cg_residual' in the history).", ConvergenceWarning, stacklevel=5)
