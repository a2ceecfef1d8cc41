"""What a level computes under ``torch.no_grad()`` is a constant of its graph.

A function may compute part of its loss with gradients off (a normalizer, a target, a statistic),
which in PyTorch makes that value a constant of the backward pass. Symbolic tracing does not record
the grad mode: the ops run on proxies, so the graph would differentiate through them and give
another hypergradient than the function's. ``make_fx`` records the mode switches
(``torch._C._set_grad_enabled``), but a switch only acts on reverse mode: forward-mode products
(``torch.func.jvp``: the ``Forward`` method, reverse-over-forward Hessian products) would still
carry tangents through the region, so two methods would disagree about the same function.

So both graphs get the one meaning PyTorch's reverse mode gives it: every value computed while
gradients were off and used after the region (or returned) passes through ``stop_gradient``, and
the mode switches themselves are dropped. ``torch.inference_mode()`` and
``torch.set_grad_enabled(False)`` are the same region.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

GRAD_DISABLED = "mlodsl_grad_disabled"  # node.meta key: the node ran with gradients off when traced


def stop_gradient(value):
    """``value`` as a constant of differentiation in every mode (reverse and forward): its tensors
    detached, anything else as it is."""
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, value)


def mark_if_grad_disabled(node: fx.Node) -> fx.Node:
    """Record on ``node`` (created by a symbolic tracer now) whether gradients are off: the tracer
    calls this as it creates each node, since the mode is visible only while the function runs."""
    if node.op in ("call_function", "call_method", "call_module") and not torch.is_grad_enabled():
        node.meta[GRAD_DISABLED] = True
    return node


def _mark_make_fx_regions(graph: fx.Graph) -> bool:
    """Mark the nodes between ``make_fx``'s ``_set_grad_enabled(False)`` and the switch back, and
    drop the switches; returns whether there were any."""
    enabled, switched = True, False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            enabled, switched = bool(node.args[0]), True
            graph.erase_node(node)
        elif not enabled and node.op == "call_function":
            node.meta[GRAD_DISABLED] = True
    return switched


def constants_where_grad_was_disabled(graph: fx.Graph) -> bool:
    """Insert ``stop_gradient`` between each value computed with gradients off and its uses outside
    the region; returns whether the graph changed."""
    changed = _mark_make_fx_regions(graph)
    for node in list(graph.nodes):
        if not node.meta.get(GRAD_DISABLED):
            continue
        outside = [user for user in node.users if not user.meta.get(GRAD_DISABLED)]
        if not outside:
            continue
        with graph.inserting_after(node):
            constant = graph.call_function(stop_gradient, (node,))
        for user in outside:
            user.replace_input_with(node, constant)
        changed = True
    graph.lint()
    return changed
