"""Analysis: collect a program's levels and build its level DAG with networkx.

Edges of the ``MultiDiGraph``:

* ``U -> L`` with ``kind="depends_on"``: U's loss goes through L's solution;
* ``L -> U`` with ``kind="reads"``: L's function takes U's current parameters as input
  (an argument naming U, or an optimizer hyperparameter that is a function of U).

Only depends_on edges must be acyclic; a reads edge pointing up is how every bilevel problem is
written.
"""
from __future__ import annotations

import difflib
import warnings

import networkx as nx

from .level import Level, defined_names


class ProgramError(ValueError):
    """A program that cannot be built; the message names the level and what is wrong."""


class ReadCycleWarning(UserWarning):
    """Two levels read each other and neither depends on the other (probably a missing depends_on)."""


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
        for arg in lvl.level_args + tuple(lvl.optimizer.reads):
            cand = visible.get(arg)
            if cand is not None and cand.name == arg:
                pending.append(cand)
    return levels


def _known(levels) -> str:
    """Every level name the user could have meant: this program's, then the others defined."""
    others = sorted(defined_names() - set(levels))
    return f"levels in this program: {sorted(levels)}" + (f"; also defined: {others}" if others else "")


def _unknown(levels, who, what, name):
    """The error for a name that is no level of the program: left out of it, or misspelt."""
    if name in defined_names():  # a real level that the tops do not reach
        if what == "depends_on":
            fix = f"pass the level itself (depends_on=[{name}]) or pass {name} to Program(...)"
            msg = f"level '{who}' depends on '{name}', which is not in the program: {fix}"
        elif what == "argument":
            msg = (f"level '{who}' reads '{name}', which is not in the program: add depends_on=[{name}] to "
                   f"'{who}' (if its loss goes through {name}'s solution) or pass {name} to Program(...)")
        else:  # an optimizer hyperparameter reads it: an upper level, never a depends_on
            msg = f"level '{who}': an {what} reads '{name}', which is not in the program: pass {name} to Program(...)"
        return ProgramError(f"{msg} ({_known(levels)})")
    close = difflib.get_close_matches(name, set(levels) | defined_names(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ProgramError(f"level '{who}': {what} '{name}' names no level{hint} ({_known(levels)})")


def _warn_read_cycles(g: nx.MultiDiGraph, levels: dict):
    """Two levels that read each other with no depends_on path between them see each other as
    constants: no hypergradient flows either way, which is rarely meant (a game of two tops is)."""
    deps = depends_on_dag(g)
    order = list(levels)  # collection order: from the tops down, so the first is the likely upper
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            read_both_ways = b in reads(g, a) and a in reads(g, b)
            if read_both_ways and not (nx.has_path(deps, a, b) or nx.has_path(deps, b, a)):
                warnings.warn(
                    f"levels '{a}' and '{b}' read each other and neither depends on the other, so each takes the "
                    f"other's parameters as constants and no hypergradient flows between them; if '{a}''s loss "
                    f"goes through {b}'s solution, add depends_on=[{b}] to '{a}' (or depends_on=[{a}] to '{b}' "
                    f"the other way round). Two levels playing a game against each other may ignore this.",
                    ReadCycleWarning, stacklevel=4)


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
        for arg in lvl.optimizer.reads:
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
    _warn_read_cycles(g, levels)
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
