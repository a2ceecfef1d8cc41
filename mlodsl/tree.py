"""Small helpers over nested dicts of tensors (the state of a step is one such tree)."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


def tree_add(a, b):
    """Leafwise a + b over two trees of the same structure."""
    return pytree.tree_map(lambda x, y: x + y, a, b)


def tree_zeros_like(tree):
    return pytree.tree_map(torch.zeros_like, tree)


def tree_vdot(a, b) -> torch.Tensor:
    """Sum over leaves of <a, b>."""
    return sum((x * y).sum() for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)))


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
