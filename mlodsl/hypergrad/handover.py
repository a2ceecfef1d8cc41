"""A cotangent handed over to a hypergradient method, which may then reuse its buffers.

The generated step computes a lower level's cotangent v (its part of the upper level's gradient),
gives it to the level's method and reads it no more: ``take`` hands it over as a ``Handed`` dict.
A method that needs a vector of v's size anyway (CG's residual and direction, FiniteDiff's
perturbed point) then builds it in v's buffers instead of beside them, one parameter-sized buffer
fewer at its peak. ``claim`` decides: only plain tensors that nothing else can see (no graph, not a
view, no other tensor on their storage, no other reference) are claimed; otherwise the method works
out of place, with the same numbers. A v passed by anyone else (a user calling
``solution_vjp``, a method's own ``vjp``) is a plain dict and is never written.
"""
from __future__ import annotations

import sys

import torch
from torch.utils import _pytree as pytree

from .. import autodiff


class Handed(dict):
    """A cotangent ``{name: tensor}`` whose caller reads it no more (``take``). To tree functions it
    is a dict (a pytree node whose maps come back as plain dicts)."""


pytree.register_pytree_node(Handed, lambda d: (list(d.values()), list(d.keys())),
                            lambda values, keys: dict(zip(keys, values)),
                            serialized_type_name="mlodsl.hypergrad.handover.Handed")


def take(grads: dict, level: str) -> Handed:
    """``grads[level]``, removed from ``grads`` and handed over to the method that consumes it."""
    return Handed(grads.pop(level))


def claim(tree) -> tuple:
    """``(tensors, writable)``: a ``Handed`` ``tree`` as a plain dict (``tree`` is emptied), and whether
    the caller may overwrite its tensors in place: not when products are taken under a
    ``torch.func`` transform or ``torch.compile``, nor when any tensor is seen elsewhere
    (``writable``). Any other ``tree`` comes back as it is, not writable."""
    if type(tree) is not Handed:
        return tree, False
    owned = dict(tree)
    tree.clear()
    if not autodiff.on_tape() or torch.compiler.is_compiling():
        return owned, False
    # Python references to each tensor, counted as they are for a probe that only a dict holds: the
    # interpreter may add references of its own per call (one more once torch.compile has run in
    # the process), which the same count of the probe includes
    alone = _references({"probe": torch.empty(0)})[0]
    return owned, all(writable(t) and refs <= alone for t, refs in zip(owned.values(), _references(owned)))


def _references(tensors: dict) -> list:
    """``sys.getrefcount`` of each tensor of ``tensors``, all counted in the same frames."""
    return [sys.getrefcount(t) for t in tensors.values()]


def writable(t) -> bool:
    """Whether overwriting ``t`` in place is invisible to everyone else, Python references aside
    (``claim`` counts those): a plain tensor outside any graph, contiguous, held by no saved graph,
    alone on its storage or a view of a base of its size that nothing else holds (autograd returns
    some gradients so: the transpose of a product)."""
    if type(t) is not torch.Tensor or t.requires_grad or not t.is_contiguous():
        return False
    try:
        if t._use_count() != 1:
            return False
        sharing = torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # less the temporary's
        if t._base is None:
            return sharing == 1
        base = t._base  # held by t, this name, getrefcount's argument and its own TensorImpl
        return (sharing == 2 and base._base is None and not base.requires_grad and base.numel() == t.numel()
                and base._use_count() <= 2 and sys.getrefcount(base) <= 3)
    except (AttributeError, RuntimeError):  # a torch without these counters: never overwrite
        return False
