"""Analysis: collect a program's levels and build its level DAG with networkx.

Edges of the ``MultiDiGraph``:

* ``U -> L`` with ``kind="depends_on"``: U's loss goes through L's solution;
* ``L -> U`` with ``kind="reads"``: L's function takes U's current parameters as input
  (an argument naming U, or an optimizer hyperparameter that is a function of U).

Only depends_on edges must be acyclic; a reads edge pointing up is how every bilevel problem is
written.
"""
from __future__ import annotations

import networkx as nx

from .level import Level


class ProgramError(ValueError):
    """A program that cannot be built; the message names the level and what is wrong."""


def _closure_levels(fn) -> dict:
    """Levels visible to a function by name: its globals and closure cells."""
    found = {k: v for k, v in getattr(fn, "__globals__", {}).items() if isinstance(v, Level)}
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is not None:
        for name, cell in zip(code.co_freevars, cells):
            try:
                if isinstance(cell.cell_contents, Level):
                    found[name] = cell.cell_contents
            except ValueError:  # empty cell
                pass
    return found


def collect_levels(tops) -> dict:
    """All levels reachable from ``tops`` through depends_on and argument names, by name."""
    levels: dict[str, Level] = {}
    pending = list(tops)
    for top in tops:
        if not isinstance(top, Level):
            raise ProgramError(f"Program takes levels made with @ml.level, got {top!r}")
    while pending:
        lvl = pending.pop(0)
        if lvl.name in levels:
            if levels[lvl.name] is not lvl:
                raise ProgramError(f"two different levels are named '{lvl.name}'; give one of them name=")
            continue
        levels[lvl.name] = lvl
        pending += [d for d in lvl.depends_on if isinstance(d, Level)]
        visible = _closure_levels(lvl.fn)
        for arg in lvl.level_args + tuple(lvl.optimizer.reads if hasattr(lvl.optimizer, "reads") else ()):
            cand = visible.get(arg)
            if cand is not None and cand.name == arg:
                pending.append(cand)
    for i, lvl in enumerate(levels.values()):
        lvl._position = i
    return levels


def _unknown(levels, who, what, name):
    return ProgramError(f"level '{who}': {what} '{name}' names no level of this program "
                        f"(known levels: {sorted(levels)})")


def build_graph(levels: dict) -> nx.MultiDiGraph:
    """The level DAG, validated: names resolve, no level depends on itself, depends_on is acyclic."""
    g = nx.MultiDiGraph()
    for name, lvl in levels.items():
        n_params = sum(p.numel() for p in lvl.module.parameters() if p.requires_grad)
        g.add_node(name, params=n_params, steps=lvl.steps, optimizer=repr(lvl.optimizer),
                   method=repr(lvl.hypergrad) if lvl.hypergrad is not None else None)
    for name, lvl in levels.items():
        for dep in lvl.depends_on_names:
            if dep == name:
                raise ProgramError(f"level '{name}' depends on itself; depends_on lists the levels *below* it")
            if dep not in levels:
                raise _unknown(levels, name, "depends_on", dep)
            g.add_edge(name, dep, kind="depends_on")
        for arg in lvl.level_args:
            if arg not in levels:
                raise _unknown(levels, name, "argument", arg)
            if arg == name:
                raise ProgramError(f"level '{name}': argument '{arg}' names the level itself; its own module "
                                   f"is the first argument")
            if arg not in lvl.depends_on_names:
                g.add_edge(name, arg, kind="reads")
        for arg in getattr(lvl.optimizer, "reads", ()):
            if arg not in levels:
                raise _unknown(levels, name, "optimizer hyperparameter argument", arg)
            if not g.has_edge(name, arg):
                g.add_edge(name, arg, kind="reads")
    deps = depends_on_dag(g)
    try:
        cycle = nx.find_cycle(deps)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        raise ProgramError(f"depends_on has a cycle: {path}; a level can only depend on levels below it")
    return g


def depends_on_dag(g: nx.MultiDiGraph) -> nx.DiGraph:
    """The depends_on edges alone (upper -> lower) as a DiGraph."""
    d = nx.DiGraph()
    d.add_nodes_from(g.nodes)
    d.add_edges_from((u, v) for u, v, k in g.edges(data="kind") if k == "depends_on")
    return d


def reads(g: nx.MultiDiGraph, name: str) -> list:
    """Levels whose parameters ``name``'s loss takes as constants (reads edges)."""
    return [v for _, v, k in g.out_edges(name, data="kind") if k == "reads"]
