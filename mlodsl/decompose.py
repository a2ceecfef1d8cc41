"""Ops of a traced loss rewritten as the arithmetic they compute, where torch's own derivative of
the op fails under a transform mlodsl applies.

``F.mse_loss`` with ``reduction="mean"``: the forward-mode derivative of its backward divides a
zero tangent in place, so ``torch.func.jvp`` of its gradient raises "ZeroTensors are immutable"
(pytorch#123996, open as of torch 2.13). mlodsl takes exactly those products: the ``Forward``
method's Jacobian-vector products through the lower updates, ``MixedUnroll``'s
forward-over-reverse Hessian products, and Hessian products by reverse over forward. The graph
computes ``(input - target).square()`` and its mean (or sum) instead: the same ops torch's kernel
runs, bit-identical in value and gradient, and every derivative of them is defined.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

_REDUCTIONS = {0: None, 1: "mean", 2: "sum"}  # aten's reduction enum


def _mse_operands(node: fx.Node):
    """``(input, target, reduction, aten)`` of an ``mse_loss`` call this pass rewrites, else None."""
    if node.op != "call_function":
        return None
    if node.target is F.mse_loss:
        names = ("input", "target", "size_average", "reduce", "reduction", "weight")
        bound = dict(zip(names, node.args), **node.kwargs)
        if any(bound.get(k) is not None for k in ("size_average", "reduce", "weight")):
            return None  # the legacy or weighted forms: left to torch
        return bound["input"], bound["target"], bound.get("reduction", "mean"), False
    if node.target is torch.ops.aten.mse_loss.default:
        reduction = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction", 1)
        return node.args[0], node.args[1], _REDUCTIONS.get(reduction, "unknown"), True
    return None


def decompose_mse_loss(graph: fx.Graph) -> bool:
    """Rewrite every plain ``mse_loss`` call of ``graph``; returns whether any was."""
    changed = False
    for node in list(graph.nodes):
        operands = _mse_operands(node)
        if operands is None or operands[2] not in (None, "none", "mean", "sum"):
            continue
        pred, target, reduction, aten = operands
        with graph.inserting_before(node):
            if aten:
                new = [graph.call_function(torch.ops.aten.sub.Tensor, (pred, target))]
                new.append(graph.call_function(torch.ops.aten.square.default, (new[-1],)))
                if reduction in ("mean", "sum"):
                    new.append(graph.call_function(getattr(torch.ops.aten, reduction).default, (new[-1],)))
            else:
                new = [graph.call_function(operator.sub, (pred, target))]
                new.append(graph.call_method("square", (new[-1],)))
                if reduction in ("mean", "sum"):
                    new.append(graph.call_method(reduction, (new[-1],)))
        for added in new:
            added.meta.update(node.meta)  # where it came from, and whether it ran with gradients off
        value = new[-1]
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        changed = True
    graph.lint()
    return changed
