"""Small helpers over nested dicts of tensors (the state of a step is one such tree)."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

tree_leaves = pytree.tree_leaves


class _NotPlain(Exception):
    pass


def _flatten_into(tree, leaves: list):
    """Append ``tree``'s tensors to ``leaves``; return a function rebuilding it from an iterator."""
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return next
    kind = type(tree)
    if kind is dict:
        keys = list(tree)
        parts = [_flatten_into(tree[k], leaves) for k in keys]
        return lambda it: {k: part(it) for k, part in zip(keys, parts)}
    if kind is list or kind is tuple:
        parts = [_flatten_into(x, leaves) for x in tree]
        return lambda it: kind([part(it) for part in parts])
    raise _NotPlain


def flatten(tree):
    """``(leaves, unflatten)``, like ``pytree.tree_flatten`` (same leaf order). A step's trees
    (dicts of dicts of tensors) take a direct path: pytree's generic one costs tens of microseconds
    per call, which the eager step pays several times per update."""
    leaves: list = []
    try:
        build = _flatten_into(tree, leaves)
    except _NotPlain:
        leaves, spec = pytree.tree_flatten(tree)
        return leaves, lambda xs: pytree.tree_unflatten(list(xs), spec)
    return leaves, lambda xs: build(iter(xs))


def _leaves_into(tree, leaves: list):
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return
    kind = type(tree)
    if kind is dict:
        tree = tree.values()
    elif kind is not list and kind is not tuple:
        raise _NotPlain
    for x in tree:
        _leaves_into(x, leaves)


def fast_leaves(tree) -> list:
    """``pytree.tree_leaves(tree)`` (same order), by the direct path for a step's trees."""
    leaves: list = []
    try:
        _leaves_into(tree, leaves)
    except _NotPlain:
        return pytree.tree_leaves(tree)
    return leaves


def detached(tree):
    """``tree`` with every tensor detached (other leaves as they are)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    kind = type(tree)
    if kind is dict:
        return {k: detached(v) for k, v in tree.items()}
    if kind is list or kind is tuple:
        return kind([detached(x) for x in tree])
    if kind in (int, float, bool, str) or tree is None:
        return tree
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _map(fn, tree, rest):
    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    kind = type(tree)
    if kind is dict and all(type(r) is dict and r.keys() == tree.keys() for r in rest):
        return {k: _map(fn, v, [r[k] for r in rest]) for k, v in tree.items()}
    if (kind is list or kind is tuple) and all(type(r) is kind and len(r) == len(tree) for r in rest):
        return kind([_map(fn, v, [r[i] for r in rest]) for i, v in enumerate(tree)])
    raise _NotPlain


def tree_map(fn, tree, *rest):
    """``pytree.tree_map(fn, tree, *rest)``, by a direct path for a step's trees (dicts, lists and
    tuples of tensors, matched by key); anything else, or trees that differ, through pytree."""
    try:
        return _map(fn, tree, rest)
    except _NotPlain:
        return pytree.tree_map(fn, tree, *rest)


def tree_add(a, b):
    """Leafwise a + b over two trees of the same structure."""
    return tree_map(lambda x, y: x + y, a, b)


def tree_zeros_like(tree):
    return tree_map(torch.zeros_like, tree)


def tree_vdot(a, b) -> torch.Tensor:
    """Sum over leaves of <a, b>."""
    total = None
    for x, y in zip(fast_leaves(a), fast_leaves(b)):
        term = (x * y).sum()
        total = term if total is None else total + term  # not 0 + the first: a kernel per call (CG's per iteration)
    return 0 if total is None else total


def is_differentiable(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def split_differentiable(tree):
    """Split a tree into (floating leaves, everything else, a function that joins them back).

    torch.func.vjp/jvp refuse integer primals (step counters), so the transforms only see the
    floating leaves; the rest is closed over as constants.
    """
    leaves, spec = pytree.tree_flatten(tree)
    mask = [is_differentiable(x) for x in leaves]
    floats = [x for x, m in zip(leaves, mask) if m]
    others = [x for x, m in zip(leaves, mask) if not m]

    def join(float_leaves):
        it_f, it_o = iter(float_leaves), iter(others)
        return pytree.tree_unflatten([next(it_f) if m else next(it_o) for m in mask], spec)

    return floats, join
