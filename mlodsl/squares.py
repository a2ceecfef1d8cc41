"""``p ** 2`` of a parameter as ``p * p`` in a traced loss that is differentiated twice.

The same numbers: torch computes a square as that product, and the two gradients agree exactly
(``2·(g·p)`` as ``g·(2·p)`` or as ``g·p + g·p``: doubling is exact). But a backward pass that builds
a graph (CG's linearization, an unrolled update's VJP) saves ``2·p`` for ``p ** 2``, a new tensor
of the parameter's size per parameter, held as long as that graph lives; for ``p * p`` it saves
``p`` itself. On an L2 penalty over every weight, common in bilevel problems, that is one parameter
size (measured on B5: CG(3) by its linearization 3.86× → 3.28× the params+grads footprint).
"""
from __future__ import annotations

import copy
import dataclasses
import operator

import torch
from torch import fx

POW = {operator.pow, torch.pow, torch.ops.aten.pow.Tensor_Scalar}  # the last: a make_fx graph's square
# ops whose result is the parameter's values reshaped or indexed, in its dtype (``w.squeeze(0) ** 2``)
SAME_VALUES_METHODS = {"squeeze", "unsqueeze", "view", "reshape", "flatten", "t", "transpose", "view_as",
                       "contiguous"}
SAME_VALUES_FUNCTIONS = {torch.squeeze, torch.unsqueeze, torch.reshape, torch.flatten, torch.t, torch.transpose,
                         operator.getitem}


def square_as_product(node: fx.Node, operands) -> bool:
    """Rewrite ``node`` (in place) from ``x ** 2`` to ``x * x`` when ``x`` is in ``operands``;
    whether it did."""
    is_pow = ((node.op == "call_function" and node.target in POW)
              or (node.op == "call_method" and node.target == "pow"))
    if not is_pow or len(node.args) != 2 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    if node.args[0] not in operands:
        return False
    exponent = node.args[1]
    if type(exponent) not in (int, float) or exponent != 2:
        return False
    node.op, node.target, node.args = "call_function", operator.mul, (node.args[0], node.args[0])
    return True


def squares_as_products(traced, params: dict):
    """``traced`` (a ``TracedLevel``) with every ``p ** 2`` of a float32 or float64 parameter ``p``,
    or of ``p`` reshaped or indexed, written ``p * p`` (``params``: level -> its parameters, for their
    dtypes: under autocast a lower-precision parameter's square would be computed in float32 and its
    product not); itself when there is none (or no graph: an opaque level)."""
    if traced.opaque or traced.graph is None:
        return traced
    full = {ph for ph, (lvl, k) in traced.inputs.items()
            if lvl in params and k in params[lvl] and params[lvl][k].dtype in (torch.float32, torch.float64)}
    graph = copy.deepcopy(traced.graph.graph)
    operands = {n for n in graph.nodes if n.op == "placeholder" and n.target in full}
    changed = []
    for node in list(graph.nodes):  # in order: an operand's reshapes come after it
        reshaped = ((node.op == "call_method" and node.target in SAME_VALUES_METHODS)
                    or (node.op == "call_function" and node.target in SAME_VALUES_FUNCTIONS))
        if reshaped and node.args and node.args[0] in operands:
            operands.add(node)
        changed.append(square_as_product(node, operands))
    if not any(changed):
        return traced
    graph.lint()
    gm = fx.GraphModule(traced.graph, graph, class_name=type(traced.graph).__name__)
    return dataclasses.replace(traced, graph=gm)
