"""`Program`: builds a multilevel program through the pipeline and runs its generated step.

    trace (trace.py) → analyze (graph.py) → plan (plan.py) → generate (codegen.py) → run (here)

The step is a pure function ``(state, batches) -> (new state, log)``; the Program owns the state
and hands the work to one module each: ``build`` (the build-time decisions and the step),
``feeder`` (the batches), ``transaction`` (a step committed only when finite, written back into the
user's modules), ``trainer`` (``fit``), ``explain`` and ``draw`` (inspection) and ``checkpoint``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import build, checkpoint, distributed, forward_mode, sharding, trainer
from .baked import Baked
from .binding import ProgramModules
from .compiled import Compiler
from .draw import LevelDiagram
from .explain import measure
from .feeder import Feeder, example
from .graph import ProgramError, build_graph, collect_levels
from .kernels import check_second_order, second_order_levels
from .losscheck import check_hypergradient_paths, check_losses
from .plan import make_plan
from .precision import Autocast, LossScaler, check as check_precision
from .squares import squares_as_products
from .trace import BufferState, trace_level
from .transaction import NonFiniteError, Transaction, write_back  # noqa: F401 - NonFiniteError: ml.NonFiniteError
from .tree import tree_leaves, tree_map

class Program:
    """A multilevel program built from its top level(s); see docs/design.md.

    Args:
        *tops: the top levels; every level reachable from them is included.
        compile: ``True`` (or a dict of ``torch.compile`` keyword arguments) compiles the regions the
            step repeats (``mlodsl.compiled``): each bottom level's K updates as one compiled loop (and
            Unroll's reverse pass as another; one update and its VJP where the loop cannot run), every
            level's partial gradients, and the implicit methods' products. Same numbers as eager; a
            region that cannot be compiled warns (``CompileWarning``) and runs eagerly.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast around every level's loss (a level's
            own ``precision=`` overrides it); fp16 levels get a dynamic loss scale each, and a step in
            which one overflows is skipped with every state unchanged and that scale backed off.
        grad_accum: every update of a level that draws its data (an iterable or a callable) draws
            ``grad_accum`` micro-batches and averages their gradients (one backward each): the update
            of one ``grad_accum``-times batch for mean losses. Fixed batches are drawn once.
        seed: seeds torch's generator before the program is built.
        nonfinite: ``"raise"`` (default) raises ``NonFiniteError`` naming the level and step;
            ``"skip"`` drops such steps (counted in ``history`` as ``skipped``).
    """

    def __init__(self, *tops, compile=False, precision="fp32", grad_accum=1, seed=None, nonfinite="raise"):
        if not tops:
            raise ProgramError("Program needs at least one top level")
        compile_options, max_ops = build.compile_options(compile)
        check_precision(precision, "Program")
        if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive int, got {grad_accum!r}")
        self.grad_accum = grad_accum
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if seed is not None:
            torch.manual_seed(seed)
        self.nonfinite = nonfinite
        levels = collect_levels(tops)
        self.graph = build_graph(levels)
        methods = build.methods(levels, self.graph)
        build.check_in_place(levels, self.graph, methods)
        build.check_solvers(levels, self.graph, methods, grad_accum)
        self.plan = make_plan(levels, self.graph, methods)
        build.check_leaf_only(self.plan, methods)
        self.schedule = self.plan.schedule
        self._feeder = Feeder({n: lvl.data for n, lvl in levels.items()}, self.plan.updates_per_step,
                              build.batch_every(levels, self.plan), grad_accum)
        self._tasked_batches = build.tasked_levels(levels, self.plan)  # levels whose batches carry tasks
        if grad_accum > 1 and self._tasked_batches:
            raise ProgramError(f"grad_accum={grad_accum} is not built for levels batched over tasks "
                               f"({sorted(self._tasked_batches)}); use grad_accum=1")
        first = self._feeder.peek()
        self._buffers = BufferState()  # running statistics: staged by a step, committed with it
        self.levels = self._trace(levels, first)
        # Python values the graphs froze, compared before every step (mlodsl.baked)
        self._baked = Baked.of({n: pl.traced for n, pl in self.levels.items()})
        build.add_unnamed_reads(self.graph, self.levels)
        self._state = build.initial_state(levels)
        starts = build.starts(levels, self.graph, self._state)
        self.tasks = {}
        for name in self._tasked_batches:
            if levels[name].tasks:
                self.tasks[name] = build.task_count(name, first[name][0])
                self._state[name] = tree_map(lambda x: x.expand(self.tasks[name], *x.shape).clone(),
                                             self._state[name])
        check_losses(self.levels, self._one_task_params(), self._examples(first, self.levels))
        check_hypergradient_paths(self.levels)
        # Systems (mlodsl.precision, mlodsl.distributed): handed to the step, never branched on in it.
        devices = {n: next(iter(s["params"].values())).device.type for n, s in self._state.items()}
        self.precision = {n: lvl.precision or precision for n, lvl in levels.items()}
        self.scalers = {n: LossScaler() for n, p in self.precision.items() if p == "fp16"}
        self.distributed = distributed.setup(next(iter(devices.values())))
        sharded = sharding.check(levels, self.plan.lowers, methods, compile_options is not None)
        modules = {n: lvl.module for n, lvl in levels.items()}
        if self.distributed is not None:  # every rank starts from rank 0's state, as DDP does
            self.distributed.broadcast_([x for x in tree_leaves(self._state) if isinstance(x, torch.Tensor)])
            write_back(modules, self._state, skip=self.tasks)
        # shard=True: each rank keeps its slice of those levels' state from here on (mlodsl.sharding)
        self.sharding = sharding.setup({n: levels[n] for n in sharded}, self._state, self.distributed,
                                       distributed.DistributedError)
        dp = self.distributed
        twice = second_order_levels(self.plan, methods)
        step = build.make_step(
            f"Program({', '.join(t.name for t in tops)})", self.plan, levels, methods,
            self._traced_for_step(twice),
            ({n: lvl.optimizer for n, lvl in levels.items()}, methods, starts,
             {n: dict(s["params"]) for n, s in self._state.items()},
             {n: lvl.project for n, lvl in levels.items() if lvl.project is not None}),
            dict(autocast={n: Autocast(p, devices[n]) for n, p in self.precision.items() if p != "fp32"},
                 loss_scales=self.scalers,
                 reduce=dp and dp.reduce, replicate=dp and dp.replicate,
                 weigh=dp and dp.weigh,
                 clip={n: lvl.clip_grad_norm for n, lvl in levels.items() if lvl.clip_grad_norm},
                 compiler=Compiler(compile_options, build.eager_levels(self.levels, compile_options, max_ops,
                                                                       dp is not None, set(self.scalers))),
                 lowers=self.plan.lowers,
                 second_order=twice),
            self._buffers, sharded=sharded, precision=self.precision, data_parallel=dp is not None,
            wrap=self.sharding and self.sharding.wrap,
            resolve=lambda runtime: forward_mode.settle(
                runtime, self.plan, levels, methods, params=self._one_task_params(),
                batches=self._examples(first, methods), modules=modules, sharded=set(sharded),
                data_parallel=dp is not None, context=self.sharding and self.sharding.running))
        self._step = step
        self.plan = step.plan  # with every level's decisions: what the step was written from
        self._runtime, self.code, self.code_filename = step.runtime, step.code, step.filename
        self.compiler = self._runtime.compiler
        self._transaction = Transaction(step.step, step.hypergradient, self._runtime, self._buffers, modules,
                                        self.scalers, self.distributed, self.sharding, self.tasks,
                                        self._tasked_batches, nonfinite)
        with self.sharding.running() if self.sharding is not None else contextlib.nullcontext():
            names = [n for n in self.levels if n in self._runtime.second_order]
            check_second_order(self._runtime, names, self._one_task_params(),
                               self._examples(first, names), modules)
        self.step_count = 0
        self.history: list[dict] = []

    # -- build helpers ------------------------------------------------------------------------
    def _trace(self, levels: dict, first: dict) -> dict:
        """Every level traced on its first batch (one task's, for a level batched over tasks)."""
        # Every level's function sees every module of the program, however it reaches it (argument,
        # closure, global), bound to the step's parameters; none is shared between two levels.
        program_modules = ProgramModules({n: lvl.module for n, lvl in levels.items()})
        read_in_train = {n: lvl.read_mode == "train" for n, lvl in levels.items()}
        traced_levels = {}
        for name, lvl in levels.items():
            traced = trace_level(lvl, program_modules, example(first, name, name in self._tasked_batches),
                                 {**read_in_train, name: True})
            traced.buffer_state = self._buffers
            traced_levels[name] = build.ProgramLevel(lvl, traced)
        return traced_levels

    def _traced_for_step(self, twice: set) -> dict:
        """The levels' traced losses as the step runs them: those differentiated twice (``twice``)
        square their parameters as products (``squares.squares_as_products``), and a sharded
        program's gather each sharded parameter where it is used (``Sharding.gathering``)."""
        params = {n: s["params"] for n, s in self._state.items()}
        traced = {n: (squares_as_products(pl.traced, params) if n in twice else pl.traced)
                  for n, pl in self.levels.items()}
        return traced if self.sharding is None else self.sharding.gathering(traced)

    def _one_task_params(self) -> dict:
        """Every level's parameters, the first task's for a level batched over tasks."""
        return {n: (tree_map(lambda x: x[0], s["params"]) if n in self.tasks else s["params"])
                for n, s in self._state.items()}

    def _examples(self, batches: dict, names) -> dict:
        return {n: example(batches, n, n in self._tasked_batches) for n in names}

    # -- running ------------------------------------------------------------------------------
    def _see_user_changes(self):
        """What the user changed since the last call and the step must see, before anything moves:
        a Python value a graph froze (``mlodsl.baked``: refused if a graph uses it) and a parameter
        replaced on a module (``Transaction.adopt_replaced``)."""
        self._baked.check()
        self._state = self._transaction.adopt_replaced(self._state)

    def step(self) -> dict:
        """One step of the top level(s), every lower step included; returns the losses."""
        self._see_user_changes()
        state, row = self._transaction.step(self._state, self._feeder.take(), self.step_count + 1)
        if state is not None:
            self._state = state
            self.step_count += 1
        self.history.append(row)
        return row

    def fit(self, iters: int, *, validate=None, every=None, callbacks=(), progress=True) -> list:
        """Run ``iters`` steps with a tqdm bar of the losses.

        ``validate(prog)`` returns a number or a dict of numbers, logged as ``val``/``val/<key>``
        every ``every`` steps (default: after the last step). A callback ``cb(prog, row)`` runs after
        every step; returning ``True`` stops the fit.
        """
        return trainer.fit(self, iters, validate=validate, every=every, callbacks=callbacks, progress=progress)

    @property
    def hypergradient_code(self) -> str:
        """The generated source of ``hypergradient(name)``'s entry point (the step's is ``code``)."""
        return self._step.hypergradient_code

    def hypergradient(self, name: str) -> dict:
        """The total gradient of level ``name`` that the next ``step()`` would apply; changes nothing."""
        if name not in self.levels:
            raise KeyError(f"no level '{name}' (known levels: {sorted(self.levels)})")
        if name in self.tasks:
            raise ValueError(f"level '{name}' is batched over tasks; ask for its upper level's hypergradient")
        self._see_user_changes()
        return self._transaction.hypergradient(name, self._state, self._feeder.peek())

    def loss_after_lowers(self, name: str, params: dict | None = None) -> torch.Tensor:
        """Level ``name``'s loss at its next update, its lower levels re-solved as the next step would
        (same batches), optionally at other parameters of ``name``; changes nothing."""
        self._see_user_changes()
        batches = self._feeder.peek()
        state = self._state
        if params is not None:
            state = {**state, name: {**state[name], "params": params}}
        return self._transaction.loss_after_lowers(name, state, batches)

    def params(self, name: str) -> dict:
        """A copy of level ``name``'s current parameters. A sharded level's are gathered from every
        rank: under ``shard=True`` every rank must call this together."""
        if name not in self.levels:
            raise KeyError(f"no level '{name}' (known levels: {sorted(self.levels)})")
        if self.sharding is not None and name in self.sharding.levels:
            return self.sharding.full(name, self._state[name]["params"])
        self._state = self._transaction.adopt_replaced(self._state)
        return {k: v.detach().clone() for k, v in self._state[name]["params"].items()}

    @property
    def _streams(self) -> dict:
        """Every level's batch stream (``mlodsl.data``)."""
        return self._feeder.streams

    # -- inspection ---------------------------------------------------------------------------
    def explain(self):
        """Memory per level (parameters, optimizer state, kept iterates, method workspace, activations),
        in bytes; prints as a table in B/KiB/MiB/GiB with a legend of its columns. See ``mlodsl.explain``."""
        if self.sharding is not None:
            raise ProgramError(f"explain() is not built for sharded levels {list(self.sharding.levels)}: it "
                               f"measures full parameters on one process; build the program unsharded to see it")
        return measure(self.levels, self._state, self.plan, self._runtime, self._feeder.peek(), self._tasked_batches)

    def show(self) -> LevelDiagram:
        """The level DAG: prints as text, draws as SVG (graphviz) or PNG (matplotlib) in Jupyter."""
        return LevelDiagram(self.graph)

    def __repr__(self) -> str:
        return f"Program({', '.join(self.levels)}; step {self.step_count})\n{self.schedule}"

    # -- checkpoints (mlodsl.checkpoint) ------------------------------------------------------
    def _parts(self) -> checkpoint.Parts:
        return checkpoint.Parts(self._state, {n: pl.level for n, pl in self.levels.items()}, self._feeder,
                                self.scalers, self.sharding, self.distributed, self.step_count, self.history)

    def _restore(self, sd: dict, source: str):
        restored = checkpoint.restore(self._parts(), sd, source)
        self._state, self.step_count, self.history = restored.state, restored.step, restored.history
        self._transaction.write_back(self._state)

    def state_dict(self) -> dict:
        """The program's state as plain data (parameters, optimizer states, buffers, data positions,
        loss scales, RNG state, step count, history)."""
        self._state = self._transaction.adopt_replaced(self._state)
        return checkpoint.state_dict(self._parts())

    def load_state_dict(self, sd: dict):
        """Restore a ``state_dict()``; raises ``ml.CheckpointError``, changing nothing, if it does not fit."""
        self._restore(sd, "the state dict")

    def save(self, path):
        """Write a checkpoint atomically (a temporary file, then a rename), with a checksum; under
        data parallel, rank 0 writes it and every rank waits until it is written."""
        checkpoint.save(self._parts(), path)


def load(path, prog: Program) -> Program:
    """Restore ``prog`` from a checkpoint written by ``prog.save(path)``: plain data only
    (``weights_only``), checksum verified, checked against the program before anything changes."""
    prog._restore(checkpoint.read(path), f"checkpoint '{os.fspath(path)}'")
    return prog
