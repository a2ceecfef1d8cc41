"""Refuse a level function that writes its parameters, its batch or a constant in place.

mlodsl evaluates a level's function many times in a step, on the step's values of the parameters
(an update, a hypergradient's products, a check) and on the same batch, and differentiates it. A
write such as ``net.weight.data.clamp_(-1, 1)`` (a habit from weight clipping) or ``x.sub_(mean)``
on the batch would change the values the next evaluation reads, outside autograd: the parameters
would move without the update, the hypergradient would not see it, and a fixed batch would drift
by one write per evaluation. PyTorch does not stop it (``.data`` escapes autograd's checks), so the
build reads the traced graph and refuses such a write, naming the op and the fix. Writes to values
the function computed itself (``h += 1``) are ordinary autograd and stay allowed, as are buffers
(BatchNorm's running statistics, staged by the step). Where the build runs the function itself (a
level without a graph, the check of a graph against its function), a mode watches for in-place
ops on the parameters' and the batch's memory and refuses them before they write.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .binding import storage_of
from .graph import ProgramError

# Tensor methods and torch functions that return a view of their first argument: a write to the
# view writes the tensor it views.
_VIEW_NAMES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "t", "transpose", "swapaxes", "swapdims", "permute",
    "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "unflatten", "flatten",
    "detach", "as_strided", "contiguous", "diagonal", "unbind", "split", "chunk", "tensor_split", "unfold",
    "__getitem__", "real", "imag", "view_as_real", "view_as_complex"})
_VIEW_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})


# Python's augmented assignments, which write their left operand
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                              "__ilshift__", "__irshift__"})


# in-place by name, but they change a tensor's autograd flags, not its values
_FLAGS_ONLY = frozenset({"requires_grad_", "detach_", "share_memory_", "retain_grad"})


def _in_place(name: str) -> bool:
    """Whether the tensor method or torch function named ``name`` writes its first argument."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__") and name not in _FLAGS_ONLY)


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_NAMES
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if node.target is getattr:
        return node.args[1] in _VIEW_ATTRIBUTES
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # an aten op: its first argument is aliased, not written, by a view
        info = schema.arguments[0].alias_info if schema.arguments else None
        return info is not None and not info.is_write
    return getattr(node.target, "__name__", None) in _VIEW_NAMES and node.target in vars(torch).values()


def _written(node: fx.Node) -> list:
    """The arguments ``node`` writes in place: an in-place method (``clamp_``), an aten op whose schema
    says it writes an argument, or any call given ``out=``."""
    written = []
    if node.op == "call_method" and _in_place(node.target):
        written.append(node.args[0])
    elif node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            written += [arg for arg, spec in zip(node.args, schema.arguments)
                        if spec.alias_info is not None and spec.alias_info.is_write]
        elif _in_place(getattr(node.target, "__name__", "")) and node.args:  # torch.Tensor.add_, torch.relu_
            written.append(node.args[0])
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    return [w for w in written if isinstance(w, fx.Node)]


def _root(node: fx.Node) -> fx.Node:
    """The tensor that ``node`` views (itself when it is no view)."""
    while _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _what(node: fx.Node, level: str, parameters: dict, batch: set) -> str | None:
    """Which of the function's inputs a write to ``node`` reaches, in words, or None for its own values."""
    if node.op == "placeholder" and node.target in parameters:
        owner, name = parameters[node.target]
        return f"level '{owner}''s parameter '{name}'" if owner != level else f"its parameter '{name}'"
    if node.op == "placeholder" and node.target in batch:
        return f"its batch ({node.target})"
    if node.op == "get_attr":
        return f"the tensor {node.target} it reads as a constant (a parameter's .data, a module's tensor)"
    return None


def refuse_writes_to_inputs(level: str, graph: fx.Graph, parameters: dict, batch) -> None:
    """Raise ``ProgramError`` if level ``level``'s graph writes in place a tensor it did not compute:
    a parameter (``parameters``: ``{placeholder: (level, name)}``), its batch (the placeholders in
    ``batch``) or a constant. Buffers' placeholders are in neither and may be written."""
    batch = set(batch)
    for node in graph.nodes:
        for target in _written(node):
            what = _what(_root(target), level, parameters, batch)
            if what is not None:
                schema = getattr(node.target, "_schema", None)
                op = (node.target if isinstance(node.target, str) else schema.name.split("::")[-1]
                      if schema is not None else getattr(node.target, "__name__", str(node.target)))
                raise _write_error(level, what, op)


class _InPlaceWatch(torch.overrides.TorchFunctionMode):
    """Raises at the first in-place op (a method ending in ``_``, an augmented assignment,
    ``__setitem__``, ``out=``) on the memory of a watched tensor, before it writes;
    ``watched``: storage address -> the tensor in words."""

    def __init__(self, level: str, watched: dict):
        super().__init__()
        self.level, self.watched = level, watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        targets = ([args[0]] if args and _in_place(name) else []) + ([kwargs["out"]] if "out" in kwargs else [])
        for target in pytree.tree_leaves(targets):
            if isinstance(target, torch.Tensor) and storage_of(target) in self.watched:
                raise _write_error(self.level, self.watched[storage_of(target)], name)
        return func(*args, **kwargs)


def no_writes(level: str, parameters: dict, batch) -> contextlib.AbstractContextManager:
    """While level ``level``'s function runs at build on real tensors: raise ``ProgramError`` at its
    first in-place write to the memory of ``parameters`` (``{level: {name: tensor}}``) or of the
    tensors in ``batch``, before the write happens. This covers what a graph does not show: a
    level that runs as an opaque call, and the function's own run beside its graph."""
    watched = {storage_of(t): (f"its parameter '{k}'" if lvl == level else f"level '{lvl}''s parameter '{k}'")
               for lvl, ps in parameters.items() for k, t in ps.items()}
    watched.update({storage_of(t): "its batch" for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)})
    watched.pop(None, None)
    return _InPlaceWatch(level, watched)


def _write_error(level: str, what: str, op: str) -> ProgramError:
    fix = ("compute a new tensor (x = x - mean, not x.sub_(mean))" if what.startswith("its batch")
           else "compute out of place (w = w.clamp(-1, 1)); to keep parameters in a set, give the level "
                "project=ml.constraints.clamp(-1, 1) (or norm_ball, simplex), which runs after every "
                "update and is differentiated")
    return ProgramError(
        f"level '{level}': its function writes {what} in place ({op}). mlodsl evaluates a level's "
        f"function several times a step on the same parameters and batch, and differentiates it, so "
        f"the write would change what the next evaluation reads, outside autograd and the "
        f"hypergradient. Instead, {fix}.")
