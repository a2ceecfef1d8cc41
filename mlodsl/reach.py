"""Which parameters each level's loss reaches, read off its traced graph: a parameter no loss it
is differentiated through reaches has no gradient (None to the optimizer, as torch.optim's
``p.grad``), so weight decay and moments leave it alone."""
from __future__ import annotations

import torch


_NO_GRADIENT = {"detach", "detach_", "requires_grad_", "size", "dim", "numel"}


def reached_params(traced) -> set | None:
    """``{(level, parameter)}`` that the loss of a traced level reaches in its fx graph (through
    ops other than ``detach``), or None when that cannot be read off (an opaque level: all count)."""
    if getattr(traced, "opaque", True):
        return None
    output = next(n for n in traced.graph.graph.nodes if n.op == "output")
    value = output.args[0]
    loss = value[0] if isinstance(value, (tuple, list)) else value  # (loss, metrics): the loss only
    if not isinstance(loss, torch.fx.Node):
        return set()
    seen, stack = set(), [loss]
    while stack:
        node = stack.pop()
        if node in seen or (node.op in ("call_function", "call_method")
                            and getattr(node.target, "__name__", node.target) in _NO_GRADIENT):
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return {traced.inputs[n.target] for n in seen if n.op == "placeholder" and n.target in traced.inputs}


def absent_params(traced: dict, lowers: dict, optimizers: dict, starts: dict) -> dict:
    """``{level: names of its parameters whose gradient is structurally absent}``, decided once.

    A level's total gradient is its own loss plus the hypergradients through the levels below it,
    so a parameter of X has a gradient when X's loss or the loss of any level below X reaches it
    (or when an optimizer hyperparameter or a ``start_from`` of a level below takes X). Only
    levels whose graphs can be read count; where one cannot, nothing of X is absent."""
    def below(name, out):
        for c in lowers.get(name, ()):
            if c not in out:
                out.add(c)
                below(c, out)
        return out

    absent = {}
    for name in optimizers:
        mine = {p for lvl, p in traced[name].inputs.values() if lvl == name}
        related = {name} | below(name, set())
        if any(name in optimizers[r].reads or starts.get(r) == name for r in related):
            continue
        reached = set()
        for r in related:
            found = reached_params(traced[r])
            if found is None:
                reached = mine
                break
            reached |= {p for lvl, p in found if lvl == name}
        if mine - reached:
            absent[name] = frozenset(mine - reached)
    return absent
