"""Planning: the static schedule of one ``Program.step()``.

A top level takes ``steps`` updates per step. Before each update of a level U, every level below
U (its depends_on children) takes its own ``steps`` updates, recursively. A level under several
uppers runs once per iteration of the loop that contains all of them; mlodsl supports this when
those uppers are top levels taking one update per step each (the loop is then ``step()`` itself),
and rejects other shapes with an explanation.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .graph import ProgramError, depends_on_dag


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


class Schedule(list):
    """The planned operations of one step, a list of ``ScheduleOp`` that prints as a tree."""

    def __str__(self) -> str:
        return "\n".join(str(op) for op in self)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))


@dataclass(frozen=True)
class Plan:
    blocks: tuple                 # top-level blocks of one step, in order
    parent: dict                  # level -> the level whose update its block precedes (None: step())
    subtree: dict                 # level -> levels its block runs (itself first)
    updates_per_step: dict        # level -> updates (and batches) per step()
    lowers: dict                  # level -> the levels it depends on, in order
    schedule: Schedule


def make_plan(levels: dict, graph: nx.MultiDiGraph, methods: dict) -> Plan:
    dag = depends_on_dag(graph)
    order = list(levels)  # discovery order: tops first, as the user listed them
    lowers = {n: [d for d in levels[n].depends_on_names] for n in order}
    parent: dict = {}
    for name in order:
        uppers = [u for u in order if name in lowers[u]]
        if len(uppers) <= 1:
            parent[name] = uppers[0] if uppers else None
            continue
        not_top = [u for u in uppers if dag.in_degree(u) > 0]
        multi = [u for u in uppers if levels[u].steps != 1]
        if not_top or multi:
            culprit = (f"'{not_top[0]}' is itself below another level" if not_top
                       else f"'{multi[0]}' takes steps={levels[multi[0]].steps}")
            raise ProgramError(
                f"level '{name}' is under several uppers {uppers}; a shared lower level runs once per "
                f"iteration of the loop containing all its uppers, and each of them must then update once "
                f"in that loop. mlodsl supports this when the uppers are top levels with steps=1, but "
                f"{culprit}. Give each upper its own lower level, or make the uppers steps=1 top levels.")
        parent[name] = None

    def block(name) -> Block:
        children = tuple(block(c) for c in lowers[name] if parent[c] == name)
        return Block(name, levels[name].steps, children)

    roots = []
    for name in order:
        if parent[name] is None:
            roots.append(block(name))
    # Shared lowers run before the first of their uppers.
    roots.sort(key=lambda b: 0 if any(b.level in lowers[u] for u in order) else 1)

    subtree, updates = {}, {}

    def visit(b: Block, outer_updates: int):
        updates[b.level] = outer_updates * b.steps
        subtree[b.level] = [b.level]
        for c in b.children:
            visit(c, updates[b.level])
            subtree[b.level] += subtree[c.level]

    for b in roots:
        visit(b, 1)
    schedule = Schedule()

    def emit(b: Block, depth: int):
        lvl = levels[b.level]
        one_batch = " on one batch" if getattr(lvl, "batch_per", "update") == "block" and b.steps > 1 else ""
        schedule.append(ScheduleOp(depth, "repeat", b.level, f"{b.steps}× {b.level}{one_batch}"))
        for c in b.children:
            emit(c, depth + 1)
        if lowers[b.level]:
            through = ", ".join(f"{c} by {methods[c]!r}" for c in lowers[b.level])
            schedule.append(ScheduleOp(depth + 1, "hypergradient", b.level, f"through {through}"))
        schedule.append(ScheduleOp(depth + 1, "update", b.level, f"with {lvl.optimizer!r}"))

    for b in roots:
        emit(b, 0)
    return Plan(tuple(roots), parent, {k: tuple(v) for k, v in subtree.items()}, updates,
                {k: tuple(v) for k, v in lowers.items()}, schedule)
