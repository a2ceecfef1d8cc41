"""Planning: the static schedule of one ``Program.step()``.

A top level takes ``steps`` updates per step. Before each update of a level U, every level below
U (its depends_on children) takes its own ``steps`` updates, recursively. A level under several
uppers (``depends_on`` makes a DAG, not a tree) runs

* before each update of its *deepest* upper, the one every other upper depends on, directly or
  through other levels (Betty's Learning-by-Ignoring shape: the top depends on the middle and on
  the bottom, the middle on the bottom). The other uppers update only after that upper's whole
  block, and see the level as the block left it;
* otherwise (uppers on separate branches: a diamond) once per iteration of the loop of its *host*,
  the lowest level above all of its uppers (``step()`` itself when they are under different top
  levels), before the other blocks of that iteration. Each upper must then update exactly once
  after it, so that its hypergradient is taken at the parameters the shared block saw: an upper is
  the host itself, or a level whose block the host's update runs, with ``steps=1``. Other shapes
  are refused with the reason and the nearest program that works.

Hypergradients follow every path. A level differentiates each lower block by that lower level's
method; the blocks of one iteration that share a level (the shared block and its uppers' blocks)
it differentiates together, by unrolling them, since their updates use the shared level's response
and its parameters move both.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import networkx as nx

from .graph import ProgramError, depends_on_dag
from .hypergrad.unroll import Forward, Unroll


@dataclass(frozen=True)
class Block:
    """A level's loop: ``steps`` updates of ``level``, each preceded by its child blocks."""

    level: str
    steps: int
    children: tuple  # of Block, run in this order before each update of ``level``


@dataclass(frozen=True)
class ScheduleOp:
    """One line of the schedule: ``depth`` is the loop nesting, ``action`` what happens."""

    depth: int
    action: str       # "repeat" | "update" | "hypergradient"
    level: str
    detail: str = ""

    def __str__(self) -> str:
        pad = "  " * self.depth
        if self.action == "repeat":
            return f"{pad}repeat {self.detail}:"
        if self.action == "update":
            return f"{pad}update {self.level}  {self.detail}".rstrip()
        return f"{pad}hypergradient of {self.level} {self.detail}"


class _PrintsAsText:
    """``repr`` and IPython's display are ``str``: the printed schedule or plan."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))


class Schedule(_PrintsAsText, list):
    """The planned operations of one step, a list of ``ScheduleOp`` that prints as a tree."""

    def __str__(self) -> str:
        return "\n".join(str(op) for op in self)


@dataclass(frozen=True, repr=False)
class Plan(_PrintsAsText):
    blocks: tuple                 # top-level blocks of one step, in order
    parent: dict                  # level -> the level whose update its block precedes (None: step())
    subtree: dict                 # level -> levels its block runs (itself first)
    updates_per_step: dict        # level -> updates (and batches) per step()
    lowers: dict                  # level -> the levels it depends on, in order
    schedule: Schedule
    children: dict = field(default_factory=dict)  # level (None: step()) -> the blocks its update runs, in order
    hosts: dict = field(default_factory=dict)     # level shared by separate branches -> its host (None: step())
    outside: dict = field(default_factory=dict)   # level -> lower levels whose blocks ran above it (shared)
    groups: dict = field(default_factory=dict)    # level -> the blocks it differentiates together (shared first)
    levels: dict = field(default_factory=dict)    # level -> LevelPlan: what the build decided (``decide``)

    def __str__(self) -> str:
        """The schedule, then what was decided for each level: the two views the step is written from."""
        rows = [LevelPlan.HEADER] + [str(lp) for lp in self.levels.values()]
        return f"{self.schedule}\n\n" + "\n".join(rows) if self.levels else str(self.schedule)


@dataclass(frozen=True)
class LevelPlan:
    """What the build decided for one level, once; the generated step is written from it alone.

    * ``wrt``: the levels its loss is differentiated in (itself first);
    * ``toward``: the levels whose hypergradients go through its block by its ``method``;
    * ``keep``: keep every ``keep``-th iterate of its block (0: none; the method replays them);
    * ``tape``: its block is recorded on the autograd tape (the method asks for it; the level is
      eager and unsharded); ``nested``: the block may also run inside a derivative (a level above
      replays it, or ``vmap`` runs it over tasks), where the tape cannot be recorded: the step then
      decides per run and falls back to the kept iterates;
    * ``compiled``: its regions (partial gradients, update, products) are compiled; ``loop``: its
      ``steps`` updates are one compiled loop;
    * ``inline``: its method's VJP is written out in the step: an implicit method's own source
      (``Method.source``), or ``Unroll``'s one backward pass over the tape its block recorded;
    * ``random``: a lower level whose loss draws random numbers (each of its updates gets a seed;
      None: an opaque level, known after its first run);
    * ``twice``: its loss is differentiated twice (a method above differentiates its gradient);
      ``math_attention``: that loss may call attention: it is evaluated under the math attention
      kernel, which has a double backward (``mlodsl.kernels``);
    * ``no_gradient``: its parameters that no loss it is differentiated through reaches: their
      gradient is absent (an optimizer that says it takes None leaves them as they are);
    * ``start``: None (warm start), ``"init"`` or the upper level it starts from (MAML);
    * ``checked_at_end``: the finiteness of its block's gradients is checked once, on the parameters
      the block ends at, instead of by a gradient norm per update: its optimizer carries a non-finite
      gradient into the parameters (``Optimizer.carries_nonfinite``) and nothing between its updates
      could replace them (a projection, clipping) or hide them (an fp16 loss scale, another rank's
      average, a transform it runs in); every update's loss is still checked;
    * ``counted_at_end``: its optimizer's update count (``state["count"]``) advances once, by
      ``steps``, at its block's end: a block checked at its end whose optimizer's update reads no count
      (``Optimizer.uncounted``: plain SGD) runs that update, without a counter kernel per update; every
      other block (a compiled loop too) counts each update. The count the step ends at is the same.
    * ``afresh``: its method takes its Hessian products afresh by reverse over forward (True) or
      from one linearization (False), as the build decided (``mlodsl.forward_mode``); None: its
      method has no such choice.
    """

    name: str
    steps: int
    method: object
    wrt: tuple
    toward: tuple
    keep: int
    tape: bool
    nested: bool
    compiled: bool
    loop: bool
    inline: bool
    random: bool | None
    twice: bool
    math_attention: bool
    no_gradient: tuple
    start: str | None
    tasks: bool
    precision: str
    sharded: bool
    data_parallel: bool
    checked_at_end: bool = False
    counted_at_end: bool = False
    afresh: bool | None = None

    HEADER = ("level: method | iterates kept | tape | compiled | vjp source | random | differentiated | "
              "attention | start | tasks | precision | sharded | no gradient | gradients checked | update count | "
              "products")

    def __str__(self) -> str:
        keep = {0: "none", 1: "every"}.get(self.keep, f"every {self.keep}")
        compiled = "loop" if self.loop else ("regions" if self.compiled else "no")
        source = "method's own" if self.inline else "Method.vjp"
        random = {None: "unknown", True: "yes", False: "no"}[self.random]
        method = "top level" if self.method is None else repr(self.method)
        tape = "where it can" if self.tape and self.nested else ("yes" if self.tape else "no")
        return (f"{self.name}: {method} | {keep} | {tape} | {compiled} | {source} | "
                f"{random} | {'twice' if self.twice else 'once'} | {'math' if self.math_attention else 'any'} | "
                f"{self.start or 'warm'} | {'yes' if self.tasks else 'no'} | {self.precision} | "
                f"{'yes' if self.sharded else 'no'} | {', '.join(self.no_gradient) or '-'} | "
                f"{'at the end' if self.checked_at_end else 'each update'} | "
                f"{f'once per block (+{self.steps})' if self.counted_at_end else 'each update'} | "
                f"{_PRODUCTS[self.afresh]}"
                + (" | data parallel" if self.data_parallel else ""))


_PRODUCTS = {None: "-", True: "reverse over forward", False: "linearized"}  # LevelPlan.afresh, printed


def _runs_inside_a_derivative(name, plan: Plan, methods: dict, levels: dict, grouped: set) -> bool:
    """Whether the block of ``name`` may run inside a transform or a product that differentiates it:
    under ``vmap`` (tasks), re-run by a group's VJP (``grouped``: the levels of the blocks some level
    unrolls together), or replayed by the method of a level whose block contains it (any method but
    one that takes products at its block's end alone)."""
    for level in _chain(name, plan.parent)[:-1]:
        method = methods.get(level)
        if levels[level].tasks or level in grouped:
            return True
        if level != name and method is not None and (not method.products_only or method.replays_updates):
            return True
    return False


def decide(plan: Plan, levels: dict, methods: dict, *, taken: dict, compiled: set, loops_allowed: dict,
           sharded: set, random: dict, twice: set, math_attention: set, no_gradient: dict, precision: dict,
           data_parallel: bool, afresh: dict | None = None) -> Plan:
    """``plan`` with every level's ``LevelPlan``: the choices the generated step is written from.

    ``taken``: level -> the levels whose parameters its loss takes; ``compiled``: the levels whose
    regions compile; ``loops_allowed``: level -> whether its updates may run as one compiled loop
    (not for a level solved by ``ml.optim.solver``); ``random``: level -> whether its loss draws
    random numbers; ``twice``: the levels whose loss is differentiated twice; ``math_attention``: those
    evaluated under the math attention kernel; ``no_gradient``: level -> its parameters no loss reaches;
    ``afresh``: level -> how its method takes its products (``forward_mode.settle``)."""
    out = {}
    grouped = {n for group in plan.groups.values() for m in group for n in plan.subtree[m]}
    for name in plan.subtree:
        method, steps = methods.get(name), levels[name].steps  # a top level has no method
        below = list(plan.subtree[name][1:]) + [n for c in plan.outside.get(name, ()) for n in plan.subtree[c]]
        wrt = (name,) + tuple(dict.fromkeys(n for n in below if n in taken[name] or n in plan.lowers[name]))
        toward = tuple(u for u in plan.subtree if name in plan.outside.get(u, ())
                       or (plan.parent[name] == u and name not in plan.groups.get(u, ())))
        leaf = not plan.lowers[name]
        stride = method.path_stride(steps) if method is not None and method.keeps_path else 0
        is_compiled = name in compiled
        # A sharded level keeps its iterates (slices) instead: the tape would hold every update's
        # gathered parameters (measured on 2 ranks, 25M parameters, Unroll over 4 updates: peak
        # per rank 1.06x the unsharded program's on the tape, 0.83x replaying the kept slices).
        tape = (bool(toward) and method is not None and bool(method.records_tape) and not is_compiled
                and name not in sharded)
        nested = _runs_inside_a_derivative(name, plan, methods, levels, grouped)
        if tape and not nested:
            stride = 0  # the tape stands in for the iterates: nothing falls back on them
        inline = (method is not None and bool(method.products_only) and method.source("method") is not None
                  and name not in sharded) or (tape and not nested and type(method).vjp is Unroll.vjp)
        start = levels[name].start_from
        # the block loops over the updates themselves (nothing replays them) and runs eagerly, in
        # fp32, on one process, outside every transform: its end can stand for every gradient
        plain_loop = (leaf and (inline or not toward) and not is_compiled and not nested and not levels[name].tasks
                      and name not in sharded and not data_parallel and precision.get(name, "fp32") == "fp32")
        at_end = (plain_loop and method is not None and levels[name].optimizer.carries_nonfinite
                  and levels[name].project is None and not levels[name].clip_grad_norm)
        out[name] = LevelPlan(
            name, steps, method, wrt, toward, stride, tape, nested, is_compiled,
            is_compiled and leaf and stride in (0, 1) and loops_allowed.get(name, True), inline,
            random.get(name, False), name in twice, name in math_attention,
            tuple(sorted(no_gradient.get(name, ()))),
            start if start is None or isinstance(start, str) else start.name,
            bool(levels[name].tasks), precision.get(name, "fp32"), name in sharded, data_parallel, at_end,
            at_end and levels[name].optimizer.uncounted is not None, (afresh or {}).get(name))
    return replace(plan, levels=out)


def _chain(name, parent) -> list:
    """``name``, the level whose update runs its block, and so on up to ``None`` (step())."""
    out = [name]
    while out[-1] is not None:
        out.append(parent[out[-1]])
    return out


def _unshareable(name, uppers, host, culprit, levels, parent) -> ProgramError:
    """Why level ``name`` cannot be shared by ``uppers`` (``culprit`` breaks it), and the nearest
    programs that work."""
    loop = f"per update of '{host}', the lowest level above all of them," if host else "per step()"
    if parent[culprit] != host:
        where = f"'{host}''s update" if host else "step()"
        problem = (f"'{culprit}' updates inside the block of '{parent[culprit]}', not directly in {where}: "
                   f"'{parent[culprit]}' would differentiate its updates without the shared block they use")
        fix = f"give '{culprit}' its own copy of '{name}'"
    else:
        problem = (f"'{culprit}' takes steps={levels[culprit].steps}: its later updates would use {name}'s "
                   f"response to its earlier parameters")
        fix = f"steps=1 on '{culprit}'; or give '{culprit}' its own copy of '{name}'"
    return ProgramError(
        f"level '{name}' is under uppers on separate branches {uppers} (none of them depends on all the "
        f"others, directly or through other levels), so no upper's loop holds it: it runs once {loop} "
        f"before the other blocks there, and each upper must then update exactly once after it, so that "
        f"its hypergradient through '{name}' is taken at the parameters {name}'s block saw. But {problem}. "
        f"Nearest program that works: {fix} (a second level with its own module and the same loss, in "
        f"{culprit}'s depends_on instead of '{name}'), which then runs before each of {culprit}'s updates.")


def _host(name, uppers, parent, levels):
    """The level whose iteration runs the block of ``name``, shared by ``uppers`` on separate
    branches (None: step()); refuses uppers that do not update exactly once per iteration of it."""
    chains = [_chain(u, parent) for u in uppers]
    host = next(a for a in chains[0] if all(a in c for c in chains[1:]))
    for u in uppers:
        if u != host and (parent[u] != host or levels[u].steps != 1):
            raise _unshareable(name, uppers, host, u, levels, parent)
    return host


def _exact(method) -> bool:
    return isinstance(method, Forward) or (isinstance(method, Unroll) and method.last is None)


def make_plan(levels: dict, graph: nx.MultiDiGraph, methods: dict) -> Plan:
    dag = depends_on_dag(graph)
    order = list(levels)  # discovery order: tops first, as the user listed them
    position = {n: i for i, n in enumerate(order)}
    topological = list(nx.lexicographical_topological_sort(dag, key=position.get))  # uppers first
    lowers = {n: tuple(levels[n].depends_on_names) for n in order}
    uppers = {n: [u for u in order if n in lowers[u]] for n in order}
    parent, hosts = {}, {}
    for name in topological:
        ups = uppers[name]
        deepest = [d for d in ups if all(u == d or nx.has_path(dag, u, d) for u in ups)]
        if not ups or deepest:
            parent[name] = deepest[0] if ups else None
        else:
            parent[name] = hosts[name] = _host(name, ups, parent, levels)

    # The blocks of each update: shared levels first (lower ones first), then their uppers' blocks,
    # then the others, as depends_on lists them (the top levels: as Program lists them).
    children, groups = {}, {}
    for host in [None, *order]:
        shared = sorted((c for c, h in hosts.items() if h == host), key=topological.index, reverse=True)
        mine = [n for n in (lowers[host] if host else order) if parent[n] == host and n not in hosts]
        users = [n for n in mine if any(n in uppers[c] for c in shared)]
        children[host] = tuple(shared + users + [n for n in mine if n not in users])
        if host is not None and shared:
            groups[host] = tuple(shared + users)

    def block(name) -> Block:
        return Block(name, levels[name].steps, tuple(block(c) for c in children[name]))

    roots = [block(n) for n in children[None]]
    subtree, updates = {}, {}

    def visit(b: Block, outer_updates: int):
        updates[b.level] = outer_updates * b.steps
        subtree[b.level] = [b.level]
        for c in b.children:
            visit(c, updates[b.level])
            subtree[b.level] += subtree[c.level]

    for b in roots:
        visit(b, 1)
    outside = {}
    for name in order:
        above = [c for c in lowers[name] if c not in subtree[name]]
        outside[name] = tuple(c for c in above if not any(c != o and c in subtree[o] for o in above))
        for c in outside[name]:
            if c not in hosts:  # every shape make_plan builds reaches its lowers; a guard, not a rule
                raise ProgramError(f"level '{name}' depends on '{c}', whose block runs neither below it nor "
                                   f"before it in a loop that contains it; this shape is not supported")
    for host, group in groups.items():
        for m in group:
            if m in lowers[host] and not _exact(methods[m]):
                raise ProgramError(
                    f"level '{m}': '{host}' differentiates the blocks of {list(group)} together, by unrolling "
                    f"them (their updates use the response of the level they share, and {host}'s parameters "
                    f"move both), so {m}'s hypergradient method must be exact: Unroll() (the default, without "
                    f"last=) or Forward(); it is {methods[m]!r}. Remove hypergrad= from '{m}'.")
    schedule = _schedule(roots, levels, methods, lowers, subtree, outside, groups)
    return Plan(tuple(roots), parent, {k: tuple(v) for k, v in subtree.items()}, updates, lowers, schedule,
                children, hosts, {k: v for k, v in outside.items() if v}, groups)


def _schedule(roots, levels, methods, lowers, subtree, outside, groups) -> Schedule:
    """The printed plan: each block's loop, then the hypergradient and the update it precedes."""
    schedule = Schedule()

    def inside(name, blocks) -> str:
        """The lower levels of ``name`` that run inside ``blocks`` (its derivative through them goes there)."""
        nested = dict.fromkeys(n for b in blocks for n in subtree[b][1:] if n in lowers[name] and n not in blocks)
        return f" (with {', '.join(nested)} inside)" if nested else ""

    def emit(b: Block, depth: int):
        name, group = b.level, groups.get(b.level, ())
        one_batch = " on one batch" if levels[name].batch_per == "block" and b.steps > 1 else ""
        schedule.append(ScheduleOp(depth, "repeat", name, f"{b.steps}× {name}{one_batch}"))
        for c in b.children:
            emit(c, depth + 1)
        through = [f"the blocks of {' + '.join(group)} unrolled together{inside(name, group)}"] if group else []
        through += [f"{c.level} by {methods[c.level]!r}{inside(name, [c.level])}"
                    for c in b.children if c.level not in group]
        through += [f"{c} by {methods[c]!r}{inside(name, [c])} (shared: its block ran above)" for c in outside[name]]
        if through:
            schedule.append(ScheduleOp(depth + 1, "hypergradient", name, f"through {', '.join(through)}"))
        schedule.append(ScheduleOp(depth + 1, "update", name, f"with {levels[name].optimizer!r}"))

    for b in roots:
        emit(b, 0)
    return schedule
