"""Memory accounting: what a program keeps, per level, in bytes.

``prog.explain()`` returns a ``MemoryReport``, one ``LevelMemory`` per level, whose columns are:

* ``params``: the level's learnable parameters;
* ``optimizer``: its optimizer state (moments, momentum buffers, the update count);
* ``iterates``: for a lower level, what its hypergradient method keeps of the level's block (the
  level and every level below it) for the reverse pass: ``Unroll`` keeps every
  ``path_stride``-th state of the block, plus the ⌈log₂ stride⌉ recomputed iterates of a segment alive
  at once when checkpointing (``Unroll`` reverses a segment by bisection), or, when
  the block is recorded on the autograd tape, the graph of each of its updates;
* ``workspace``: the method's other buffers (``method.workspace(state_bytes, param_bytes)`` where a
  method defines it: the cotangents and the one update being differentiated);
* ``activations``: the bytes autograd saves for one evaluation of the level's loss and its gradient
  with ``create_graph`` (what a VJP through one update holds), measured on the next step's batch;
* ``total``: their sum.

Printed, every value is in bytes with a binary unit (B, KiB, MiB, GiB) chosen per value, and a
legend under the table defines the columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from .feeder import first_micro_batch
from .runtime import split_output
from .tree import tree_leaves


def nbytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in tree_leaves(tree) if isinstance(x, torch.Tensor))


@dataclass
class LevelMemory:
    level: str
    params: int
    optimizer: int
    iterates: int
    workspace: int
    activations: int = 0

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.iterates + self.workspace + self.activations


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

LEGEND = ("params: learnable parameters. optimizer: optimizer state. iterates: the block states (or taped\n"
          "update graphs) a lower level's hypergradient method keeps. workspace: the method's other buffers.\n"
          "activations: what autograd saves for one evaluation of the loss and its gradient. total: their sum.\n"
          "Units: B, KiB = 1024 B, MiB, GiB.")


def human_bytes(n: int) -> str:
    """``n`` bytes with a binary unit: ``"0 B"``, ``"812 B"``, ``"1.5 KiB"``, ``"12.0 MiB"``."""
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


class MemoryReport(list):
    """One ``LevelMemory`` per level (bytes); prints as a table in human-readable units with a
    legend defining its columns."""

    @property
    def total(self) -> int:
        return sum(r.total for r in self)

    def __str__(self) -> str:
        columns = ("params", "optimizer", "iterates", "workspace", "activations", "total")
        rows = [f"{'level':<16}" + "".join(f"{c:>12}" for c in columns)]
        for r in self:
            rows.append(f"{r.level:<16}" + "".join(f"{human_bytes(getattr(r, c)):>12}" for c in columns))
        rows.append(f"{'all levels':<16}{'':>{12 * (len(columns) - 1)}}{human_bytes(self.total):>12}")
        return "\n".join(rows + [LEGEND])

    __repr__ = __str__


def kept_iterates(method, steps: int) -> int:
    """How many block states a method holds at its peak (0 when it keeps none)."""
    if not method.keeps_path:
        return 0
    stride = method.path_stride(steps)
    kept = math.ceil(steps / stride) + 1
    # plus the recomputed iterates of one segment alive at once in the reverse pass (bisection: ⌈log₂ stride⌉)
    return kept + (math.ceil(math.log2(stride)) if stride > 1 else 0)


def saved_activation_bytes(loss_fn, params) -> int:
    """Bytes autograd saves while evaluating ``loss_fn(params)`` and its gradient (create_graph);
    ``params``: a tree of tensors, all made leaves that require grad (their own storage not counted)."""
    seen: dict = {}

    def pack(t):
        if t.numel():
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    leaves = pytree.tree_map(lambda v: v.detach().requires_grad_(), params)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(leaves)
        if loss.requires_grad:
            torch.autograd.grad(loss, tree_leaves(leaves), create_graph=True, allow_unused=True)
    own = {v.untyped_storage().data_ptr() for v in tree_leaves(leaves)}
    return sum(b for (ptr, _), b in seen.items() if ptr not in own)


class _Saved:
    """A tensor autograd saved, held by the graph node that saved it (and weakly by us)."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def taped_update_bytes(loss_fn, own: dict, uppers: dict) -> int:
    """Bytes one update of a level recorded on the autograd tape keeps until the backward pass:
    what the graph of its gradient (built with ``create_graph`` from ``own`` and ``uppers``, all
    requiring grad) still holds once the loss itself is gone, the iterate ``own`` included where
    that graph holds it; the uppers' parameters are shared by every update and not counted."""
    import weakref
    saved: list = []

    def pack(t):
        holder = _Saved(t)
        saved.append(weakref.ref(holder))
        return holder

    leaves = pytree.tree_map(lambda v: v.detach().requires_grad_(), {"own": own, "uppers": uppers})
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        loss = loss_fn(leaves["own"], leaves["uppers"])
        grads = (torch.autograd.grad(loss, tree_leaves(leaves["own"]), create_graph=True, allow_unused=True)
                 if loss.requires_grad else ())
    del loss  # the gradient's graph lives on (in the next iterate, on the tape); the loss's does not
    shared = {v.untyped_storage().data_ptr() for v in tree_leaves(leaves["uppers"])}
    shared |= {g.untyped_storage().data_ptr() for g in grads if g is not None}  # consumed by the update
    kept = {}
    for ref in saved:
        holder = ref()
        if holder is not None and holder.tensor.numel():
            storage = holder.tensor.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
    return sum(b for ptr, b in kept.items() if ptr not in shared)


def explain(state: dict, plan, methods: dict, activations: dict | None = None,
            update_graphs: dict | None = None, taped: set = frozenset()) -> MemoryReport:
    """Per-level memory from the program's state and plan (``activations``: level -> bytes;
    ``update_graphs``: level -> ``taped_update_bytes`` of one of its updates, for a level whose
    method differentiates its updates: where the block is recorded on the autograd tape (``taped``:
    those levels, see ``Runtime.tape``) every update's graph is kept until the backward pass, in place of the
    iterates; where updates are replayed, one VJP holds one such graph and, measured at the peak of
    differentiating it, about as much again)."""
    activations = dict(activations or {})
    report = MemoryReport()
    for name in plan.subtree:
        params, opt = nbytes(state[name]["params"]), nbytes(state[name]["opt"])
        iterates = workspace = 0
        method = methods.get(name)
        if method is not None:
            block = sum(nbytes(state[n]) for n in plan.subtree[name])
            steps = plan.updates_per_step[name] // max(1, plan.updates_per_step.get(plan.parent[name] or "", 1))
            graph = (update_graphs or {}).get(name)
            if name in taped and graph is not None:
                iterates = steps * graph
            else:
                iterates = kept_iterates(method, steps) * block
                if graph is not None:  # a replayed update's VJP holds its graph, and as much again at
                    activations[name] = max(activations.get(name, 0), 2 * graph)  # the peak of its backward
            workspace = method.workspace(block, params)
        report.append(LevelMemory(name, params, opt, iterates, workspace, activations.get(name, 0)))
    return report


def measure(levels: dict, state: dict, plan, runtime, batches: dict, tasked: set) -> MemoryReport:
    """``explain`` of a built program, its activations and update graphs measured on ``batches``
    (the next step's). ``levels``: name -> ``ProgramLevel``; ``runtime``: the step's ``Runtime``
    (its methods and compiler); ``tasked``: levels batched over tasks, whose per-task activations
    under vmap are not measured."""
    params = {n: s["params"] for n, s in state.items()}
    activations, update_graphs = {}, {}
    for name, pl in levels.items():
        if name in tasked:
            continue
        batch = first_micro_batch(batches[name][0])
        activations[name] = saved_activation_bytes(
            lambda own: split_output(name, pl.traced({**params, name: own}, batch))[0], params[name])
        method = runtime.methods.get(name)
        if method is not None and method.keeps_path:  # it differentiates the updates themselves
            uppers = {n: params[n] for n in plan.subtree if name in plan.lowers[n]}
            update_graphs[name] = taped_update_bytes(
                lambda own, ups: split_output(name, pl.traced({**params, **ups, name: own}, batch))[0],
                params[name], uppers)
    taped = {n for n, m in runtime.methods.items()  # compiled updates are replayed instead
             if m.records_tape and not runtime.compiler.compiles(n)}
    return explain(state, plan, runtime.methods, activations, update_graphs, taped)
