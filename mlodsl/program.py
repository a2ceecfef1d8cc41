"""`Program`: builds a multilevel program through the pipeline and runs its generated step.

    trace (trace.py) → analyze (graph.py) → plan (plan.py) → generate (codegen.py) → run (here)

The step is a pure function ``(state, batches) -> (new state, log)``; the Program owns the state,
draws the batches, commits a step only when every loss and gradient in it is finite, and writes
the learned parameters back into the user's modules.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx

from . import checkpoint, codegen, distributed, sharding
from .data import BatchStream, BlockBatches
from .draw import LevelDiagram
from .graph import ProgramError, build_graph, collect_levels
from .kernels import check_second_order, second_order_levels
from .hypergrad import CG, Unroll
from .hypergrad.base import as_method
from .level import Level
from .losscheck import check_losses
from .param_groups import GroupError
from .compiled import MAX_OPS, Compiler, graph_ops
from .plan import decide, make_plan
from .precision import Autocast, LossScaler, check as check_precision
from .data import MicroBatches
from .runtime import Runtime, split_output
from .tree import tree_leaves, tree_map
from .binding import ProgramModules, learnable
from .trace import BufferState, TracedLevel, trace_level


def _batch_every(levels: dict, plan) -> dict:
    """Updates per drawn batch of each level: its ``steps`` with ``batch_per="block"``, else 1."""
    every = {}
    for name, lvl in levels.items():
        every[name] = lvl.steps if lvl.batch_per == "block" else 1
        if plan.updates_per_step[name] % every[name]:
            raise ProgramError(f"level '{name}': batch_per='block' draws one batch per block of steps={lvl.steps} "
                               f"updates, but the schedule gives it {plan.updates_per_step[name]} updates per step, "
                               f"not whole blocks; use batch_per='update'")
    return every


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or Inf; the program's state is as it was before the step."""


@dataclass
class ProgramLevel:
    """A level as built into a program: the user's ``Level`` with its traced graph."""

    level: Level
    traced: TracedLevel

    @property
    def graph(self) -> fx.GraphModule:
        """The level's loss as a torch.fx GraphModule (``.code`` prints it)."""
        return self.traced.graph

    def __getattr__(self, name):
        return getattr(self.level, name)

    def __repr__(self) -> str:
        return repr(self.level)


def _methods(levels: dict, graph) -> dict:
    """The hypergradient method of every lower level (where none is given, ``Unroll()``, or ``CG``
    for a level solved by ``ml.optim.solver``: ``_default_method``).

    The default is recorded on the graph's node, never written into the user's ``Level``.
    """
    methods = {}
    for name, lvl in levels.items():
        if any(k == "depends_on" for _, _, k in graph.in_edges(name, data="kind")):
            methods[name] = as_method(lvl.hypergrad) if lvl.hypergrad is not None else _default_method(lvl)
            graph.nodes[name]["method"] = repr(methods[name])
    return methods


SOLVER_CG_ITERS = 100  # the default CG's iterations at most, for a level solved by ml.optim.solver


def _default_method(lvl):
    """``Unroll()``; for a level solved by ``ml.optim.solver``, ``CG`` with one iteration per
    parameter (exact to rounding on a positive definite Hessian) up to ``SOLVER_CG_ITERS``."""
    if not lvl.optimizer.solves:
        return Unroll()
    size = sum(p.numel() for p in lvl.module.parameters())
    return CG(iters=max(1, min(size, SOLVER_CG_ITERS)))


def _check_solvers(levels: dict, graph, methods: dict, grad_accum: int):
    """A level solved by ``ml.optim.solver`` is differentiated implicitly, from its optimality
    condition at the solution: nothing from it up to the top may differentiate its updates."""
    import networkx as nx
    from .graph import depends_on_dag
    dag = depends_on_dag(graph)
    for name, lvl in levels.items():
        if not lvl.optimizer.solves:
            continue
        if lvl.tasks:
            raise ProgramError(f"level '{name}' is solved by {lvl.optimizer!r}, which is not run over tasks "
                               f"(tasks=True); use a functional optimizer (ml.optim.sgd/adam) there")
        lowers = sorted(dag.successors(name))
        if lowers:  # its optimality condition would have to hold with their responses: not one solve
            raise ProgramError(f"level '{name}' is solved by {lvl.optimizer!r}, but it has lower levels "
                               f"{lowers}, whose responses its solution would have to account for; solve a "
                               f"level with no lower levels, or give '{name}' a functional optimizer "
                               f"(ml.optim.sgd/adam)")
        if grad_accum > 1:
            raise ProgramError(f"level '{name}' is solved by {lvl.optimizer!r} on its whole batch, but "
                               f"grad_accum={grad_accum} splits it into micro-batches; use grad_accum=1")
        for below in {name} | nx.ancestors(dag, name):
            method = methods.get(below)
            if method is not None and method.replays_updates:
                where = (f"its hypergrad={method!r}" if below == name else
                         f"hypergrad={method!r} of level '{below}' above it")
                raise ProgramError(
                    f"level '{name}' is solved by {lvl.optimizer!r}, which nothing differentiates, but {where} "
                    f"differentiates the updates that run it; differentiate the solution implicitly "
                    f"instead: hypergrad=ml.hypergrad.CG(iters=...) or ml.hypergrad.Implicit(solve) on "
                    f"'{below}' (CG, Implicit, Neumann, Nystrom)")


def _tasked_levels(levels: dict, plan) -> set:
    """Levels with ``tasks=True`` and their uppers (whose batches also lead with the task axis)."""
    out = set()
    for name, lvl in levels.items():
        if not lvl.tasks:
            continue
        uppers = [u for u, lw in plan.lowers.items() if name in lw]
        if len(uppers) != 1 or plan.lowers[uppers[0]] != (name,) or plan.lowers[name]:
            raise ProgramError(f"level '{name}' has tasks=True: it must be the only lower level of exactly one "
                               f"upper and have no lower levels of its own (uppers: {uppers})")
        out |= {name, uppers[0]}
    return out


def _task_count(name, batch) -> int:
    leaves = [x for x in tree_leaves(batch) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ProgramError(f"level '{name}' has tasks=True but its batch has no tensors")
    return leaves[0].shape[0]


def _starts(levels: dict, graph, state: dict) -> dict:
    """``start_from`` of every level as None, "init" or an upper level's name, validated."""
    from .graph import depends_on_dag
    import networkx as nx
    dag = depends_on_dag(graph)
    starts = {}
    for name, lvl in levels.items():
        how = lvl.start_from
        if how is None or how == "init":
            starts[name] = how
            continue
        upper = how if isinstance(how, str) else how.name
        if upper not in levels or name not in nx.descendants(dag, upper):
            raise ProgramError(f"level '{name}': start_from='{upper}' must name a level above it "
                               f"(levels above: {sorted(nx.ancestors(dag, name))})")
        mine, theirs = state[name]["params"], state[upper]["params"]
        bad = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
        if bad:
            raise ProgramError(f"level '{name}': start_from='{upper}' copies the upper level's parameters by "
                               f"name, but {bad} have no match of the same shape in '{upper}'")
        starts[name] = upper
    return starts


def _one(batch):
    """The first micro-batch of an update's batch (the batch itself without accumulation)."""
    return batch[0] if isinstance(batch, MicroBatches) else batch


def _check_in_place(levels: dict, graph, methods: dict):
    """A level whose optimizer updates in place (``ml.optim.from_torch``) must not be differentiated
    through: every level from it up to the top must be a top or use a method that does not replay
    the updates."""
    import networkx as nx
    from .graph import depends_on_dag
    dag = depends_on_dag(graph)
    for name, lvl in levels.items():
        if not lvl.optimizer.in_place:
            continue
        for below in {name} | nx.ancestors(dag, name):
            method = methods.get(below)
            if method is not None and method.replays_updates:
                raise ProgramError(
                    f"level '{name}' uses an in-place torch.optim optimizer, but level '{below}' is "
                    f"differentiated by {method!r}, which replays its updates; use ml.optim.sgd/adam/adamw "
                    f"there, or a method that does not (CG, Neumann, FiniteDiff, FirstOrder)")


def _check_leaf_only(plan, methods: dict):
    """A method that differentiates one loss's gradient per update (``leaf_only``: ``MixedUnroll``)
    cannot take a lower level whose update's gradient runs levels below it."""
    for name, method in methods.items():
        if method.leaf_only and plan.lowers[name]:
            raise ProgramError(
                f"level '{name}' has lower levels {list(plan.lowers[name])}, but its hypergrad={method!r} "
                f"differentiates a level whose update is the gradient of its own loss alone (one without "
                f"lower levels); use hypergrad=ml.hypergrad.Unroll() on '{name}'")


def _compile_options(compile) -> tuple[dict | None, int | None]:
    """``compile=`` as ``torch.compile`` keyword arguments (None: eager), and the compile budget
    ``max_ops`` (mlodsl's own key of the dict; ``compiled.MAX_OPS`` by default, None: no budget)."""
    if compile is False or compile is None:
        return None, None
    if compile is True:
        return {}, MAX_OPS
    if isinstance(compile, dict):
        import inspect
        options = dict(compile)
        max_ops = options.pop("max_ops", MAX_OPS)
        if max_ops is not None and (not isinstance(max_ops, int) or isinstance(max_ops, bool) or max_ops < 1):
            raise ValueError(f"compile: max_ops must be a positive int or None, got {max_ops!r}")
        known = set(inspect.signature(torch.compile).parameters) - {"model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"compile: unknown torch.compile options {unknown} (known: {sorted(known)}, "
                             f"and mlodsl's max_ops)")
        return options, max_ops
    raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")


def _learnable(module) -> dict:
    """The module's learnable tensors, sharing their storage (steps never write into them); a tied
    parameter once, under its first name."""
    return {k: p.detach() for k, p in learnable(module).items()}


def _add_unnamed_reads(graph, levels: dict):
    """``reads`` edges for the levels a function reaches without naming them (a closure, a global):
    the same dependency information as an argument. Edges carry ``via="closure"``."""
    for name, pl in levels.items():
        for other in pl.traced.reads:
            if other != name and not graph.has_edge(name, other):
                graph.add_edge(name, other, kind="reads", via="closure")


def _levels_taken(levels: dict) -> dict:
    """``{level: the levels whose parameters its loss takes as inputs}`` (itself included)."""
    return {n: {n, *(lvl for lvl, _ in pl.traced.inputs.values())} for n, pl in levels.items()}


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
        compile_options, max_ops = _compile_options(compile)
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
        methods = _methods(levels, self.graph)
        _check_in_place(levels, self.graph, methods)
        _check_solvers(levels, self.graph, methods, grad_accum)
        self.plan = make_plan(levels, self.graph, methods)
        _check_leaf_only(self.plan, methods)
        self.schedule = self.plan.schedule
        self._streams = {n: BatchStream(n, lvl.data) for n, lvl in levels.items()}
        self._batch_every = _batch_every(levels, self.plan)
        self._tasked_batches = _tasked_levels(levels, self.plan)  # levels whose batches carry tasks
        if grad_accum > 1 and self._tasked_batches:
            raise ProgramError(f"grad_accum={grad_accum} is not built for levels batched over tasks "
                               f"({sorted(self._tasked_batches)}); use grad_accum=1")
        self._pending = None
        first = self._draw_batches()
        self._pending = first
        self.levels = {}
        self._buffers = BufferState()  # running statistics: staged by a step, committed with it
        # Every level's function sees every module of the program, however it reaches it (argument,
        # closure, global), bound to the step's parameters; none is shared between two levels.
        program_modules = ProgramModules({n: lvl.module for n, lvl in levels.items()})
        read_in_train = {n: lvl.read_mode == "train" for n, lvl in levels.items()}
        for name, lvl in levels.items():
            example = _one(first[name][0])
            if name in self._tasked_batches:
                example = tree_map(lambda x: x[0], example)  # one task's batch
            traced = trace_level(lvl, program_modules, example, {**read_in_train, name: True})
            traced.buffer_state = self._buffers
            self.levels[name] = ProgramLevel(lvl, traced)
        _add_unnamed_reads(self.graph, self.levels)
        self._state = {n: {"params": _learnable(lvl.module), "opt": None} for n, lvl in levels.items()}
        for name, lvl in levels.items():
            if not self._state[name]["params"]:
                raise ProgramError(f"level '{name}': its module has no learnable parameters (requires_grad=True)")
            try:
                self._state[name]["opt"] = lvl.optimizer.init(self._state[name]["params"])
            except GroupError as e:  # parameter groups that do not fit this level's parameters
                raise ProgramError(f"level '{name}': {e}") from None
        starts = _starts(levels, self.graph, self._state)
        self.tasks = {}
        for name in self._tasked_batches:
            if levels[name].tasks:
                self.tasks[name] = _task_count(name, first[name][0])
                self._state[name] = tree_map(lambda x: x.expand(self.tasks[name], *x.shape).clone(),
                                             self._state[name])
        self._check_losses(first)
        # Systems (mlodsl.precision, mlodsl.distributed): handed to the step, never branched on in it.
        devices = {n: next(iter(s["params"].values())).device.type for n, s in self._state.items()}
        self.precision = {n: lvl.precision or precision for n, lvl in levels.items()}
        self.scalers = {n: LossScaler() for n, p in self.precision.items() if p == "fp16"}
        self.distributed = distributed.setup(next(iter(devices.values())))
        sharded = sharding.check(levels, self.plan.lowers, methods, compile_options is not None)
        self.sharding = None
        if self.distributed is not None:  # every rank starts from rank 0's state, as DDP does
            self.distributed.broadcast_([x for x in tree_leaves(self._state) if isinstance(x, torch.Tensor)])
            self._write_back()
        # shard=True: each rank keeps its slice of those levels' state from here on (mlodsl.sharding)
        self.sharding = sharding.setup({n: levels[n] for n in sharded}, self._state, self.distributed,
                                       distributed.DistributedError)
        title = f"Program({', '.join(t.name for t in tops)})"
        dp = self.distributed
        self._runtime = Runtime({n: pl.traced for n, pl in self.levels.items()},
                                {n: lvl.optimizer for n, lvl in levels.items()}, methods, starts,
                                {n: dict(s["params"]) for n, s in self._state.items()},
                                {n: lvl.project for n, lvl in levels.items() if lvl.project is not None},
                                autocast={n: Autocast(p, devices[n]) for n, p in self.precision.items() if p != "fp32"},
                                loss_scales=self.scalers,
                                reduce=dp and dp.reduce, replicate=dp and dp.replicate,
                                weigh=dp and dp.weigh, gather=self.sharding and self.sharding.gather,
                                clip={n: lvl.clip_grad_norm for n, lvl in levels.items() if lvl.clip_grad_norm},
                                compiler=Compiler(compile_options, self._eager_levels(compile_options, max_ops)),
                                lowers=self.plan.lowers,
                                second_order=second_order_levels(self.plan, methods))
        self.compiler = self._runtime.compiler
        compiler = self._runtime.compiler
        self.plan = decide(self.plan, levels, methods, taken=_levels_taken(self.levels),
                           compiled={n for n in levels if compiler.compiles(n)},
                           loops_allowed={n: not lvl.optimizer.solves for n, lvl in levels.items()},
                           sharded=set(sharded), random=self._runtime.stochastic,
                           math_attention=self._runtime.math_attention, precision=self.precision,
                           data_parallel=dp is not None)
        self._title = title
        self.code = codegen.generate(self.plan, title)
        self._step_fn, self.code_filename = codegen.build(self.code, self._runtime)
        self._hypergradient_fn = None  # built on first use (``hypergradient_code``)
        self._runtime.buffer_state = self._buffers
        if self.sharding is not None:
            self._step_fn = self.sharding.wrap(self._step_fn)
        with self.sharding.running() if self.sharding is not None else contextlib.nullcontext():
            self._check_second_order(first, {n: lvl.module for n, lvl in levels.items()})
        self.step_count = 0
        self.history: list[dict] = []

    def _eager_levels(self, options, max_ops: int | None = None) -> dict:
        """Levels whose regions stay eager under compile=True, and why (decided before compiling)."""
        if options is None:
            return {}
        why = {}
        for name, pl in self.levels.items():
            ops = graph_ops(pl.traced)
            if max_ops is not None and ops is not None and ops > max_ops:
                why[name] = (f"its graph has {ops} operations, above the compile budget max_ops={max_ops} (a "
                             f"transformer level's regions take minutes to compile; see docs/compile.md). "
                             f"compile={{'max_ops': None}} compiles it all the same")
                continue
            if self.distributed is not None:
                why[name] = "data-parallel averages (all_reduce) run between the regions' products"
            elif pl.traced.buffers:
                why[name] = "its running statistics (BatchNorm buffers) are staged outside the graph"
            elif name in self.scalers:
                why[name] = "its fp16 loss scale changes between steps (each value would recompile)"
        return why

    # -- data ---------------------------------------------------------------------------------
    def _draw_batches(self) -> dict:
        """Every level's batches for one step, one per update (``batch_per="block"``: one per block,
        repeated for its updates)."""
        out = {}
        for n, s in self._streams.items():
            every = self._batch_every[n]
            draws = [self._draw(s) for _ in range(self.plan.updates_per_step[n] // every)]
            out[n] = draws if every == 1 else BlockBatches(draws, every)
        return out

    def _draw(self, stream: BatchStream):
        """One update's batch: ``grad_accum`` micro-batches from a stream that changes."""
        if self.grad_accum == 1 or stream.kind in ("none", "fixed"):
            return stream.next()
        return MicroBatches(stream.next() for _ in range(self.grad_accum))

    def _next_batches(self) -> dict:
        batches, self._pending = (self._pending, None) if self._pending is not None else (self._draw_batches(), None)
        return batches

    def _share_examples(self, batches: dict):
        """Data parallel: every rank's examples in these batches, which weigh the ranks' losses
        (``mlodsl.distributed``); levels batched over tasks are averaged unweighted."""
        if self.distributed is not None:
            self.distributed.share_examples({n: b for n, b in batches.items() if n not in self._tasked_batches})

    def _check_losses(self, batches):
        """Evaluate every level's loss once at build time: errors surface here, named."""
        params = {n: (tree_map(lambda x: x[0], s["params"]) if n in self.tasks else s["params"])
                  for n, s in self._state.items()}
        one = {n: _one(batches[n][0]) for n in self.levels}
        one = {n: tree_map(lambda x: x[0], b) if n in self._tasked_batches else b for n, b in one.items()}
        check_losses(self.levels, params, one)

    def _check_second_order(self, batches, modules):
        """One Hessian-vector product of every loss that is differentiated twice, at build time: an op
        without a double backward is named here rather than in the middle of training."""
        names = [n for n in self.levels if n in self._runtime.second_order]
        params = {n: (tree_map(lambda x: x[0], s["params"]) if n in self.tasks else s["params"])
                  for n, s in self._state.items()}
        first = {}
        for name in names:
            first[name] = _one(batches[name][0])
            if name in self._tasked_batches:
                first[name] = tree_map(lambda x: x[0], first[name])
        check_second_order(self._runtime, names, params, first, modules)

    # -- running ------------------------------------------------------------------------------
    def step(self) -> dict:
        """One step of the top level(s), every lower step included; returns the losses."""
        batches = self._next_batches()
        self._share_examples(batches)
        self._buffers.begin()
        new_state, log = self._step_fn(self._state, batches)
        finite = self._runtime.finite(log)
        if self.distributed is not None:  # the ranks' mean losses; a step is bad if it is bad anywhere
            log, finite = self.distributed.mean_log(log, finite)
        bad = [n for n, ok in finite.items() if not ok]
        row = {"step": self.step_count + 1}
        if bad and any(n in self.scalers for n in bad):  # fp16 overflow: skip, back the scales off
            for n in bad:
                if n in self.scalers:
                    self.scalers[n].update(overflowed=True)
            self._log_scales(row)
            row["skipped"] = 1
            self.history.append(row)
            return row
        if bad:
            if self.nonfinite == "raise":
                raise NonFiniteError(f"non-finite loss or gradient at level '{bad[0]}' in step "
                                     f"{self.step_count + 1}" + (f" (also {bad[1:]})" if bad[1:] else "")
                                     + "; the program's parameters and optimizer states are unchanged")
            row["skipped"] = 1
            self.history.append(row)
            return row
        self._state = new_state
        self._buffers.commit({n: pl.level.module for n, pl in self.levels.items()})
        self.step_count += 1
        for sc in self.scalers.values():
            sc.update(overflowed=False)
        self._log_scales(row)
        self._write_back()
        row.update({k: float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in log.items()})
        self.history.append(row)
        return row

    def _log_scales(self, row):
        for n, sc in self.scalers.items():
            row[f"{n}/loss_scale"] = sc.scale

    def _write_back(self):
        with torch.no_grad():
            for name, pl in self.levels.items():
                if name in self.tasks:  # one module cannot hold every task's parameters
                    continue
                if self.sharding is not None and name in self.sharding.levels:
                    continue  # a rank holds a slice only: ``params(name)`` gathers the full tensors
                new = self._state[name]["params"]
                for k, p in pl.level.module.named_parameters():
                    if k in new:  # point the module at the step's output: no copy, no second footprint
                        p.data = new[k]

    def fit(self, iters: int, *, validate=None, every=None, callbacks=(), progress=True) -> list:
        """Run ``iters`` steps with a tqdm bar of the losses.

        ``validate(prog)`` returns a number or a dict of numbers, logged as ``val``/``val/<key>``
        every ``every`` steps (default: after the last step). A callback ``cb(prog, row)`` runs after
        every step; returning ``True`` stops the fit.
        """
        main = self.distributed is None or self.distributed.is_main
        progress = progress and main
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(range(iters), desc="fit")
        else:
            bar = range(iters)
        for it in bar:
            row = self.step()
            if validate is not None and ((every and (it + 1) % every == 0) or it + 1 == iters):
                val = validate(self)
                row.update({"val": float(val)} if not isinstance(val, dict)
                           else {f"val/{k}": float(v) for k, v in val.items()})
            if progress:
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                                 if k != "step" and isinstance(v, float)}, refresh=False)
            stop = main and any(cb(self, row) is True for cb in callbacks)  # callbacks run on rank 0
            if self.distributed is not None:
                stop = self.distributed.any(stop)
            if stop:
                break
        return self.history

    @property
    def hypergradient_code(self) -> str:
        """The generated source of ``hypergradient(name)``'s entry point (the step's is ``code``)."""
        return codegen.generate(self.plan, self._title, entry="hypergradient")

    def _hypergradient_entry(self):
        """``hypergradient(name, state, B, log)`` of the generated code, built on first use."""
        if self._hypergradient_fn is None:
            fn, self.hypergradient_code_filename = codegen.build(self.hypergradient_code, self._runtime,
                                                                 entry="hypergradient")
            self._hypergradient_fn = self.sharding.wrap(fn) if self.sharding is not None else fn
        return self._hypergradient_fn

    def hypergradient(self, name: str) -> dict:
        """The total gradient of level ``name`` that the next ``step()`` would apply; changes nothing."""
        if name not in self.levels:
            raise KeyError(f"no level '{name}' (known levels: {sorted(self.levels)})")
        if name in self.tasks:
            raise ValueError(f"level '{name}' is batched over tasks; ask for its upper level's hypergradient")
        if self._pending is None:
            self._pending = self._draw_batches()
        self._share_examples(self._pending)
        self._buffers.begin()  # nothing this computes is committed: buffers stay as they are
        log = self._runtime.new_log()
        try:
            g, _ = self._hypergradient_entry()(name, self._state, self._pending, log)
        finally:
            self._buffers.begin()
        # A diverged solve raises here as in step(), rather than returning its huge or NaN result.
        self._runtime.check_divergence(log["_reports"])
        if self.distributed is not None:
            g = self.distributed.reduce(g)
        if self.sharding is not None and name in self.sharding.levels:
            g = self.sharding.full(name, g)
        return {k: v.detach() for k, v in g.items()}

    def loss_after_lowers(self, name: str, params: dict | None = None) -> torch.Tensor:
        """Level ``name``'s loss at its next update, its lower levels re-solved as the next step would
        (same batches), optionally at other parameters of ``name``; changes nothing."""
        if self._pending is None:
            self._pending = self._draw_batches()
        state = self._state
        if params is not None:
            state = {**state, name: {**state[name], "params": params}}
        self._share_examples(self._pending)
        with torch.no_grad():
            self._buffers.begin()
            _, loss = self._hypergradient_entry()(name, state, self._pending)
        if self.distributed is not None:
            loss = self.distributed.mean_log({"loss": loss}, {})[0]["loss"]
        return loss.detach()

    def params(self, name: str) -> dict:
        """A copy of level ``name``'s current parameters. A sharded level's are gathered from every
        rank: under ``shard=True`` every rank must call this together."""
        if name not in self.levels:
            raise KeyError(f"no level '{name}' (known levels: {sorted(self.levels)})")
        if self.sharding is not None and name in self.sharding.levels:
            return self.sharding.full(name, self._state[name]["params"])
        return {k: v.detach().clone() for k, v in self._state[name]["params"].items()}

    # -- inspection ---------------------------------------------------------------------------
    def explain(self):
        """Memory per level (parameters, optimizer state, kept iterates, method workspace, activations),
        in bytes; prints as a table in B/KiB/MiB/GiB with a legend of its columns. See ``mlodsl.explain``."""
        from .explain import explain, saved_activation_bytes, taped_update_bytes
        if self.sharding is not None:
            raise ProgramError(f"explain() is not built for sharded levels {list(self.sharding.levels)}: it "
                               f"measures full parameters on one process; build the program unsharded to see it")
        if self._pending is None:
            self._pending = self._draw_batches()
        params = {n: s["params"] for n, s in self._state.items()}
        activations, update_graphs = {}, {}
        for name, pl in self.levels.items():
            if name in self._tasked_batches:
                continue  # per-task activations under vmap are not measured
            batch = _one(self._pending[name][0])
            activations[name] = saved_activation_bytes(
                lambda own: split_output(name, pl.traced({**params, name: own}, batch))[0], params[name])
            method = self._runtime.methods.get(name)
            if method is not None and method.keeps_path:  # it differentiates the updates themselves
                uppers = {n: params[n] for n in self.plan.subtree if name in self.plan.lowers[n]}
                update_graphs[name] = taped_update_bytes(
                    lambda own, ups: split_output(name, pl.traced({**params, **ups, name: own}, batch))[0],
                    params[name], uppers)
        taped = {n for n, m in self._runtime.methods.items()  # compiled updates are replayed instead
                 if m.records_tape and not self._runtime.compiler.compiles(n)}
        return explain(self._state, self.plan, self._runtime.methods, activations, update_graphs, taped)

    def show(self) -> LevelDiagram:
        """The level DAG: prints as text, draws as SVG (graphviz) or PNG (matplotlib) in Jupyter."""
        return LevelDiagram(self.graph)

    def __repr__(self) -> str:
        return f"Program({', '.join(self.levels)}; step {self.step_count})\n{self.schedule}"

    # -- checkpoints (mlodsl.checkpoint) ------------------------------------------------------
    def state_dict(self) -> dict:
        """The program's state as plain data (parameters, optimizer states, buffers, data positions,
        loss scales, RNG state, step count, history)."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, sd: dict):
        """Restore a ``state_dict()``; raises ``ml.CheckpointError``, changing nothing, if it does not fit."""
        checkpoint.load_state_dict(self, sd)

    def save(self, path):
        """Write a checkpoint atomically (a temporary file, then a rename), with a checksum; under
        data parallel, rank 0 writes it and every rank waits until it is written."""
        checkpoint.save(self, path)


def load(path, prog: Program) -> Program:
    """Restore ``prog`` from a checkpoint written by ``prog.save(path)``: plain data only
    (``weights_only``), checksum verified, checked against the program before anything changes."""
    return checkpoint.load(path, prog)
