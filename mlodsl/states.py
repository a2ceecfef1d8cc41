"""The program state ``{level: {"params": {...}, "opt": {...}}}`` and gradients by level: the
dict operations the generated step does on them."""
from __future__ import annotations


def params_of(state: dict) -> dict:
    """``{level: params}`` from a state ``{level: {"params", "opt"}}``."""
    return {name: s["params"] for name, s in state.items()}


def restrict(state: dict, names) -> dict:
    return {n: state[n] for n in names}


def outside(state: dict, up: dict, names) -> dict:
    """Parameters of every level seen from a block over ``names``: ``up`` plus the rest of ``state``."""
    return {**up, **{n: s["params"] for n, s in state.items() if n not in names}}


def add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def mean_over_tasks(g: dict) -> dict:
    return {k: v.mean(0) for k, v in g.items()}
