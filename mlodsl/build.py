"""The build stage's decisions: what ``Program`` decides about a program before its first step.

Each decision is a function of the levels, the level DAG and the plan that returns plain data
(the hypergradient method of every lower level and its default, the levels batched over tasks, where
each level starts, batches per block, the compile options and the levels that stay eager), or
refuses the program naming the level and the fix. ``make_step`` is the one place the step's source
is generated, built and bound to its ``Runtime``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import networkx as nx
import torch
from torch import fx

from . import codegen
from .binding import learnable
from .compiled import MAX_OPS, graph_ops
from .graph import ProgramError, depends_on_dag
from .hypergrad import CG, Unroll
from .hypergrad.base import as_method
from .level import Level
from .param_groups import GroupError
from .plan import Plan, decide
from .runtime import Runtime
from .trace import TracedLevel
from .tree import tree_leaves


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


# -- options -----------------------------------------------------------------------------------------
def compile_options(compile) -> tuple[dict | None, int | None]:
    """``compile=`` as ``torch.compile`` keyword arguments (None: eager), and the compile budget
    ``max_ops`` (mlodsl's own key of the dict; ``compiled.MAX_OPS`` by default, None: no budget)."""
    if compile is False or compile is None:
        return None, None
    if compile is True:
        return {}, MAX_OPS
    if isinstance(compile, dict):
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


def eager_levels(levels: dict, options: dict | None, max_ops: int | None, data_parallel: bool,
                 fp16: set) -> dict:
    """``{level: why}`` for the levels whose regions stay eager under ``compile=True`` (decided
    before compiling); empty when nothing compiles. ``levels``: name -> ``ProgramLevel``."""
    if options is None:
        return {}
    why = {}
    for name, pl in levels.items():
        ops = graph_ops(pl.traced)
        if max_ops is not None and ops is not None and ops > max_ops:
            why[name] = (f"its graph has {ops} operations, above the compile budget max_ops={max_ops} (a "
                         f"transformer level's regions take minutes to compile; see docs/compile.md). "
                         f"compile={{'max_ops': None}} compiles it all the same")
            continue
        if data_parallel:
            why[name] = "data-parallel averages (all_reduce) run between the regions' products"
        elif pl.traced.buffers:
            why[name] = "its running statistics (BatchNorm buffers) are staged outside the graph"
        elif name in fp16:
            why[name] = "its fp16 loss scale changes between steps (each value would recompile)"
    return why


# -- hypergradient methods ---------------------------------------------------------------------------
SOLVER_CG_ITERS = 100  # the default CG's iterations at most, for a level solved by ml.optim.solver


def default_method(lvl: Level):
    """``Unroll()``; for a level solved by ``ml.optim.solver``, ``CG`` with one iteration per
    parameter (exact to rounding on a positive definite Hessian) up to ``SOLVER_CG_ITERS``."""
    if not lvl.optimizer.solves:
        return Unroll()
    size = sum(p.numel() for p in lvl.module.parameters())
    return CG(iters=max(1, min(size, SOLVER_CG_ITERS)))


def methods(levels: dict, graph) -> dict:
    """The hypergradient method of every lower level (where none is given, ``default_method``).

    The default is recorded on the graph's node, never written into the user's ``Level``.
    """
    out = {}
    for name, lvl in levels.items():
        if any(k == "depends_on" for _, _, k in graph.in_edges(name, data="kind")):
            out[name] = as_method(lvl.hypergrad) if lvl.hypergrad is not None else default_method(lvl)
            graph.nodes[name]["method"] = repr(out[name])
    return out


def check_in_place(levels: dict, graph, methods: dict):
    """A level whose optimizer updates in place (``ml.optim.from_torch``) must not be differentiated
    through: every level from it up to the top must be a top or use a method that does not replay
    the updates."""
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


def check_solvers(levels: dict, graph, methods: dict, grad_accum: int):
    """A level solved by ``ml.optim.solver`` is differentiated implicitly, from its optimality
    condition at the solution: nothing from it up to the top may differentiate its updates."""
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


def check_leaf_only(plan, methods: dict):
    """A method that differentiates one loss's gradient per update (``leaf_only``: ``MixedUnroll``)
    cannot take a lower level whose update's gradient runs levels below it."""
    for name, method in methods.items():
        if method.leaf_only and plan.lowers[name]:
            raise ProgramError(
                f"level '{name}' has lower levels {list(plan.lowers[name])}, but its hypergrad={method!r} "
                f"differentiates a level whose update is the gradient of its own loss alone (one without "
                f"lower levels); use hypergrad=ml.hypergrad.Unroll() on '{name}'")


# -- batches and tasks -------------------------------------------------------------------------------
def batch_every(levels: dict, plan) -> dict:
    """Updates per drawn batch of each level: its ``steps`` with ``batch_per="block"``, else 1."""
    every = {}
    for name, lvl in levels.items():
        every[name] = lvl.steps if lvl.batch_per == "block" else 1
        if plan.updates_per_step[name] % every[name]:
            raise ProgramError(f"level '{name}': batch_per='block' draws one batch per block of steps={lvl.steps} "
                               f"updates, but the schedule gives it {plan.updates_per_step[name]} updates per step, "
                               f"not whole blocks; use batch_per='update'")
    return every


def tasked_levels(levels: dict, plan) -> set:
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


def task_count(name: str, batch) -> int:
    """The number of tasks in level ``name``'s batch: the length of its tensors' leading axis."""
    leaves = [x for x in tree_leaves(batch) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ProgramError(f"level '{name}' has tasks=True but its batch has no tensors")
    return leaves[0].shape[0]


# -- state and starts --------------------------------------------------------------------------------
def initial_state(levels: dict) -> dict:
    """``{level: {"params", "opt"}}``: every level's learnable tensors, sharing the module's storage
    (steps never write into them; a tied parameter once, under its first name), and its optimizer's
    initial state."""
    state = {n: {"params": {k: p.detach() for k, p in learnable(lvl.module).items()}, "opt": None}
             for n, lvl in levels.items()}
    for name, lvl in levels.items():
        if not state[name]["params"]:
            raise ProgramError(f"level '{name}': its module has no learnable parameters (requires_grad=True)")
        try:
            state[name]["opt"] = lvl.optimizer.init(state[name]["params"])
        except GroupError as e:  # parameter groups that do not fit this level's parameters
            raise ProgramError(f"level '{name}': {e}") from None
    return state


def starts(levels: dict, graph, state: dict) -> dict:
    """``start_from`` of every level as None, "init" or an upper level's name, validated."""
    dag = depends_on_dag(graph)
    out = {}
    for name, lvl in levels.items():
        how = lvl.start_from
        if how is None or how == "init":
            out[name] = how
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
        out[name] = upper
    return out


# -- reads -------------------------------------------------------------------------------------------
def add_unnamed_reads(graph, levels: dict):
    """``reads`` edges for the levels a function reaches without naming them (a closure, a global):
    the same dependency information as an argument. Edges carry ``via="closure"``."""
    for name, pl in levels.items():
        for other in pl.traced.reads:
            if other != name and not graph.has_edge(name, other):
                graph.add_edge(name, other, kind="reads", via="closure")


def levels_taken(traced: dict) -> dict:
    """``{level: the levels whose parameters its loss takes as inputs}`` (itself included);
    ``traced``: name -> ``TracedLevel``."""
    return {n: {n, *t.levels} for n, t in traced.items()}


# -- the step ----------------------------------------------------------------------------------------
@dataclass
class Step:
    """The generated step, built and bound: what ``make_step`` returns. ``hypergradient``'s own
    entry point is generated and built on its first call."""

    runtime: Runtime
    plan: Plan                    # the plan with every level's decisions (``plan.decide``)
    title: str
    code: str                     # its Python source (``prog.code``)
    filename: str                 # the file it runs from (tracebacks point into it)
    step: Callable                # (state, batches) -> (new state, log)
    wrap: Callable | None = None  # a sharded program's wrapper of the entry points
    hypergradient_filename: str | None = None
    _hypergradient: Callable | None = None

    @property
    def hypergradient_code(self) -> str:
        """The source of ``hypergradient(name, ...)``'s entry point (``prog.hypergradient_code``)."""
        return codegen.generate(self.plan, self.title, entry="hypergradient")

    def hypergradient(self, *args):
        """``(name, state, batches[, log]) -> (hypergradient, loss)``, built on first use."""
        if self._hypergradient is None:
            fn, self.hypergradient_filename = codegen.build(self.hypergradient_code, self.runtime,
                                                            entry="hypergradient")
            self._hypergradient = self.wrap(fn) if self.wrap is not None else fn
        return self._hypergradient(*args)


def make_step(title: str, plan: Plan, levels: dict, methods: dict, traced: dict, runtime_args: tuple,
              runtime_options: dict, buffers, *, sharded: set, precision: dict, data_parallel: bool,
              wrap: Callable | None = None, resolve: Callable | None = None) -> Step:
    """Bind a ``Runtime(traced, *runtime_args, **runtime_options)``, record every level's decisions
    in the plan (``plan.decide``: what compiles, is sharded, draws random numbers...), generate the
    step's source from that plan and build it; ``wrap`` (a sharded program's) wraps the entry
    points. ``levels``: name -> ``Level``; ``traced``: name -> ``TracedLevel``. ``resolve(runtime)``
    decides how the methods with a ``low_memory`` setting take their products
    (``forward_mode.settle``: ``{level: afresh}``)."""
    runtime = Runtime(traced, *runtime_args, **runtime_options)
    afresh = resolve(runtime) if resolve is not None else {}
    plan = decide(plan, levels, methods, taken=levels_taken(traced),
                  compiled={n for n in levels if runtime.compiler.compiles(n)},
                  loops_allowed={n: not lvl.optimizer.solves for n, lvl in levels.items()},
                  sharded=set(sharded), random=runtime.stochastic, twice=runtime.second_order,
                  math_attention=runtime.math_attention, no_gradient=runtime.absent,
                  precision=precision, data_parallel=data_parallel, afresh=afresh)
    code = codegen.generate(plan, title)
    step, filename = codegen.build(code, runtime)
    runtime.buffer_state = buffers
    return Step(runtime, plan, title, code, filename, wrap(step) if wrap is not None else step, wrap)
