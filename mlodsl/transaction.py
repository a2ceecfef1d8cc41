"""A step as a transaction: run, then commit only what is finite.

The generated step is a pure function ``(state, batches) -> (new state, log)``: running it changes
no state. ``Transaction.step`` runs it, and commits its result (running statistics, loss scales,
the user's modules pointed at the new parameters) only when every loss and gradient in it is
finite; otherwise the step is skipped or raises ``NonFiniteError``, with everything as it was. The
queries about the next step (``hypergradient``, ``loss_after_lowers``) run the same generated
code and commit nothing.
"""
from __future__ import annotations

import torch

from .graph import ProgramError


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or Inf; the program's state is as it was before the step."""


def write_back(modules: dict, state: dict, skip=()) -> None:
    """Point every module's parameters at ``state``'s (no copy, no second footprint), except the
    levels in ``skip`` (batched over tasks: one module cannot hold every task's parameters; sharded:
    a rank holds a slice only)."""
    with torch.no_grad():
        for name, module in modules.items():
            if name in skip:
                continue
            new = state[name]["params"]
            for k, p in module.named_parameters():
                if k in new:
                    p.data = new[k]


def _slot(module, path: str) -> tuple:
    """``(submodule, attribute)`` that holds parameter ``path`` of ``module``."""
    prefix, _, attr = path.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), attr


class Transaction:
    """Runs the generated step and its queries against a program's state.

    Args:
        step: the generated step, ``(state, batches) -> (new state, log)``.
        hypergradient: the generated ``(name, state, batches[, log]) -> (hypergradient, loss)``.
        runtime: the step's ``Runtime`` (its loss health, its divergence checks).
        buffers: the running statistics a step stages (``trace.BufferState``).
        modules: ``{level: the user's module}``, written back after each committed step.
        scalers: ``{level: LossScaler}`` of the fp16 levels.
        distributed: the data-parallel group (``mlodsl.distributed``), or None.
        sharding: the sharded levels (``mlodsl.sharding``), or None.
        tasks: ``{level: task count}`` of the levels batched over tasks.
        tasked: the levels whose batches lead with the task axis.
        nonfinite: ``"raise"`` or ``"skip"``.
    """

    def __init__(self, step, hypergradient, runtime, buffers, modules: dict, scalers: dict, distributed,
                 sharding, tasks: dict, tasked: set, nonfinite: str):
        self.run_step, self.run_hypergradient, self.runtime = step, hypergradient, runtime
        self.buffers, self.modules, self.scalers = buffers, modules, scalers
        self.distributed, self.sharding, self.tasks, self.tasked = distributed, sharding, tasks, tasked
        self.nonfinite = nonfinite
        self.unwritten = set(tasks) | (set(sharding.levels) if sharding is not None else set())
        # each written module's parameters, listed once: the step replaces their data, never the
        # objects, and walking the modules costs more than the writes at every step of a small program
        self.targets = [(name, [(k, p) for k, p in module.named_parameters()])
                        for name, module in modules.items() if name not in self.unwritten]
        # where each listed parameter sits (submodule, attribute): a user may put another there
        self.slots = {name: [_slot(modules[name], k) for k, _ in params] for name, params in self.targets}

    def adopt_replaced(self, state: dict) -> dict:
        """``state`` with the parameters a user has replaced since the build (``net.weight =
        nn.Parameter(w)``, which the modules' own ``load_state_dict`` does not do but user code does)
        taken from the module, like values copied in place: the step reads them and writes its
        updates into them. One of another shape, dtype or device is refused (``ProgramError``): the
        optimizer state and the graphs are the old one's."""
        for name, params in self.targets:
            for i, ((k, p), (sub, attr)) in enumerate(zip(params, self.slots[name])):
                now = sub._parameters.get(attr)
                if now is p:
                    continue
                if not isinstance(now, torch.Tensor) or (now.shape, now.dtype, now.device) != (p.shape, p.dtype,
                                                                                                 p.device):
                    got = "nothing" if now is None else (f"a tensor of shape {tuple(now.shape)}, {now.dtype}, "
                                                         f"{now.device}" if isinstance(now, torch.Tensor) else
                                                         type(now).__name__)
                    raise ProgramError(
                        f"level '{name}': its module's parameter '{k}' was replaced after the Program was built, by "
                        f"{got} (it was {tuple(p.shape)}, {p.dtype}, {p.device}); the Program's optimizer state and "
                        f"graphs are built for the old one. Copy values in place (`with torch.no_grad(): "
                        f"net.weight.copy_(w)`) or build the Program again.")
                params[i] = (k, now)
                state = {**state, name: {**state[name], "params": {**state[name]["params"], k: now.detach()}}}
        return state

    def share_examples(self, batches: dict):
        """Data parallel: every rank's examples in these batches, which weigh the ranks' losses
        (``mlodsl.distributed``); levels batched over tasks are averaged unweighted."""
        if self.distributed is not None:
            self.distributed.share_examples({n: b for n, b in batches.items() if n not in self.tasked})

    def write_back(self, state: dict):
        """Point the user's modules at ``state``'s parameters (``write_back``)."""
        with torch.no_grad():
            for name, params in self.targets:
                new = state[name]["params"]
                for k, p in params:
                    if k in new:
                        p.data = new[k]

    def _log_scales(self, row):
        for n, sc in self.scalers.items():
            row[f"{n}/loss_scale"] = sc.scale

    def step(self, state: dict, batches: dict, number: int) -> tuple[dict | None, dict]:
        """Run step ``number`` on ``batches``: ``(the new state, its log row)`` when committed,
        ``(None, row)`` when skipped (``row["skipped"] == 1``)."""
        self.share_examples(batches)
        self.buffers.begin()
        new_state, log = self.run_step(state, batches)
        finite = self.runtime.finite(log)
        if self.distributed is not None:  # the ranks' mean losses; a step is bad if it is bad anywhere
            log, finite = self.distributed.mean_log(log, finite)
        bad = [n for n, ok in finite.items() if not ok]
        row = {"step": number}
        if bad and any(n in self.scalers for n in bad):  # fp16 overflow: skip, back the scales off
            for n in bad:
                if n in self.scalers:
                    self.scalers[n].update(overflowed=True)
            self._log_scales(row)
            row["skipped"] = 1
            return None, row
        if bad:
            if self.nonfinite == "raise":
                raise NonFiniteError(f"non-finite loss or gradient at level '{bad[0]}' in step "
                                     f"{number}" + (f" (also {bad[1:]})" if bad[1:] else "")
                                     + "; the program's parameters and optimizer states are unchanged")
            row["skipped"] = 1
            return None, row
        self.buffers.commit(self.modules)
        for sc in self.scalers.values():
            sc.update(overflowed=False)
        self._log_scales(row)
        self.write_back(new_state)
        row.update({k: float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in log.items()})
        return new_state, row

    def hypergradient(self, name: str, state: dict, batches: dict) -> dict:
        """The total gradient of level ``name`` that a step on ``batches`` would apply; commits nothing."""
        self.share_examples(batches)
        self.buffers.begin()  # nothing this computes is committed: buffers stay as they are
        log = self.runtime.new_log()
        try:
            g, _ = self.run_hypergradient(name, state, batches, log)
        finally:
            self.buffers.begin()
        # A diverged solve raises here as in step(), rather than returning its huge or NaN result.
        self.runtime.check_divergence(log["_reports"])
        if self.distributed is not None:
            g = self.distributed.reduce(g)
        if self.sharding is not None and name in self.sharding.levels:
            g = self.sharding.full(name, g)
        return {k: v.detach() for k, v in g.items()}

    def loss_after_lowers(self, name: str, state: dict, batches: dict) -> torch.Tensor:
        """Level ``name``'s loss at its next update on ``batches``, its lower levels re-solved;
        commits nothing."""
        self.share_examples(batches)
        with torch.no_grad():
            self.buffers.begin()
            _, loss = self.run_hypergradient(name, state, batches)
        if self.distributed is not None:
            loss = self.distributed.mean_log({"loss": loss}, {})[0]["loss"]
        return loss.detach()
