"""Capture a level that ``torch.fx.symbolic_trace`` cannot follow (Hugging Face models, attention
layers with Python checks on their inputs) as a graph of aten operations, with ``make_fx``.

``symbolic_trace`` runs the function on proxies that have no shapes, so any Python branch on a
shape, a config value or a slice of a proxy stops it. ``make_fx`` runs the function on tensors
that have shapes but no values (``tracing_mode="fake"``) and records every aten operation they go
through, so Python control flow on shapes and configs is followed (and specialized: see below),
while control flow on tensor *values* raises instead of being baked in silently (fake tensors have
no values to branch on; Hugging Face models see fake tensors and take their traceable path).
``pre_dispatch=True`` records operations before autograd and before kernels are chosen, so the graph
keeps high-level ops (``aten.scaled_dot_product_attention``, ``aten.dropout``, ``aten.linear``):
the attention kernel is picked when the graph runs (``mlodsl.kernels``), and autograd
differentiates the graph as it would the function, twice if asked.

The function captured is the level's ``(batch leaves..., params...) -> loss``, every module of the
program bound to the parameters (``binding.ProgramModules``, as the opaque call does); its
placeholders are renamed to the convention of the symbolic path: ``batch_0, ...`` then
``<level>_<parameter path>``.
Tensors the function reads that are not parameters (buffers such as ``position_ids``, frozen
weights) become constants of the graph.

The graph is specialized to the example's shapes. Each call checks its inputs' shapes, dtypes
and devices; a new signature (the last, partial batch of an epoch) is captured again at
those shapes (up to ``MAX_SHAPES`` graphs), and where that is not possible the level's function
is called directly: never the graph of another shape.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from .decompose import decompose_mse_loss
from .kernels import custom_functions
from .nograd import constants_where_grad_was_disabled
from .graph import ProgramError
from .writes import no_writes, refuse_writes_to_inputs

MAX_SHAPES = 8  # captured graphs kept per level; beyond that, new shapes call the function directly


def capture_level(name: str, call_with, inputs: dict, named: tuple, batch_names: list, leaves: tuple,
                  values: dict, modules) -> tuple | str:
    """Level ``name`` captured by ``make_fx``: ``(graph, inputs it takes)``, or the reason it cannot be
    captured (a str: ``trace._trace`` then falls back to an opaque call).

    ``call_with(inputs)`` is the level's function as ``call(*batch_leaves, **params)`` with the program
    bound to the placeholders ``inputs`` (``{placeholder: (level, parameter)}``, every learnable
    parameter of the program); ``values`` holds a tensor for each placeholder. The graph keeps the
    placeholders of the levels in ``named`` (the level and its arguments) and of every level whose
    parameters it uses, as the symbolic path does."""
    if _running_statistics(modules):  # staged by the symbolic path's BufferState; a constant here
        return "running statistics (floating-point buffers) are not captured"
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        return "the batch has leaves that are not tensors"
    direct = call_with(inputs)
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        by_level = {}
        for ph, (lvl, k) in inputs.items():
            by_level.setdefault(lvl, {})[k] = values[ph]
        with no_writes(name, by_level, leaves):  # this probe runs the function on the real tensors
            found = _custom_functions(direct, leaves, values)
        if found:
            # make_fx would record the Function's forward and differentiate that, not its backward
            return "the loss calls a custom autograd.Function"
        gm = _capture(name, direct, batch_names, list(inputs), leaves, [values[ph] for ph in inputs])
    except ProgramError:
        raise
    except Exception as err:  # noqa: BLE001 - value-dependent control flow and the like: the opaque call
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    refuse_writes_to_inputs(name, gm.graph, inputs, batch_names)
    kept = _prune_inputs(gm, inputs, named)
    direct = call_with(kept)  # a level left out is not bound: the graph does not read it
    guarded = _ShapeGuard(name, gm, direct, batch_names, list(kept), leaves, [values[ph] for ph in kept], modes)
    gm.shape_guard = guarded
    gm.forward = guarded.__call__  # TracedLevel calls graph.forward: the guard picks the graph for the shapes
    # (a bound method, not the guard object itself: torch.compile traces methods, not callable objects)
    return gm, kept


def _prune_inputs(gm: fx.GraphModule, inputs: dict, named: tuple) -> dict:
    """Drop the placeholders of levels the graph neither names nor uses; the inputs that remain."""
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}  # forward's keywords
    used = {inputs[ph][0] for ph, node in placeholders.items() if ph in inputs and node.users}
    kept = {ph: src for ph, src in inputs.items() if src[0] in named or src[0] in used}
    for ph in inputs:
        if ph not in kept:
            gm.graph.erase_node(placeholders[ph])
    gm.graph.lint()
    gm.recompile()
    return kept


def _running_statistics(modules) -> bool:
    return any(b.is_floating_point() for m in modules for b in m.buffers())


def _custom_functions(direct, leaves, params) -> bool:
    """Whether the loss goes through a custom ``autograd.Function`` (one forward, its graph walked).
    Buffers that a forward writes are running statistics, which never reach this path."""
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        out = direct(*leaves, **{k: v.detach().requires_grad_() for k, v in params.items()})
    return bool(custom_functions(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)))


def _capture(name, direct, batch_names, param_names, leaves, params) -> fx.GraphModule:
    n = len(batch_names)

    def loss_of(*flat):
        return direct(*flat[:n], **dict(zip(param_names, flat[n:])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model's own warnings were already shown by the symbolic try
        raw = make_fx(loss_of, tracing_mode="fake", pre_dispatch=True, _allow_non_fake_inputs=True)(*leaves, *params)
    gm = _renamed(raw, batch_names + param_names, name)
    if decompose_mse_loss(gm.graph) | constants_where_grad_was_disabled(gm.graph):
        gm.recompile()
    return gm


def _renamed(raw: fx.GraphModule, names: list, level_name: str) -> fx.GraphModule:
    """``raw`` with its placeholders (``arg0_1, ...``) named ``names``, the rest of the graph copied."""
    graph = fx.Graph()
    old = [n for n in raw.graph.nodes if n.op == "placeholder"]
    env = {o: graph.placeholder(new) for o, new in zip(old, names)}
    out = graph.graph_copy(raw.graph, env)
    graph.output(out)
    graph.eliminate_dead_code()
    graph.lint()
    ident = "".join(c if c.isalnum() else "_" for c in level_name)
    return fx.GraphModule(raw, graph, class_name=f"level_{ident}_captured")


class _ShapeGuard:
    """``graph.forward`` of a captured level: the graph captured at the shapes of its inputs."""

    def __init__(self, name, gm, direct, batch_names, param_names, leaves, params, modes):
        self.name, self.direct = name, direct
        self.batch_names, self.param_names = batch_names, param_names
        self.modes = modes            # (module, training) as captured: dropout on or off is in the graph
        self.graphs = {_signature([*leaves, *params]): type(gm).forward.__get__(gm)}  # the graph's own forward
        self.failed: set = set()

    def __call__(self, *leaves, **params):
        flat = [*leaves, *(params[n] for n in self.param_names)]
        key = _signature(flat)
        forward = self.graphs.get(key)
        if forward is None and key not in self.failed:
            forward = self._capture_at(key)
        if forward is None:
            return self.direct(*leaves, **params)
        return forward(*leaves, **params)

    def _capture_at(self, key):
        if len(self.graphs) >= MAX_SHAPES:
            self.failed.add(key)
            return None
        # Plain tensors of the new shapes: fake tracing reads their metadata only (the inputs seen
        # here may be a transform's wrappers, which fake tracing cannot take).
        flat = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in key]
        n = len(self.batch_names)
        saved = [(m, m.training) for m, _ in self.modes]
        try:
            for m, flag in self.modes:
                m.training = flag
            with torch._C._DisableFuncTorch():  # capture the function itself, not a transform of it
                gm = _capture(self.name, self.direct, self.batch_names, self.param_names, flat[:n], flat[n:])
        except Exception:  # noqa: BLE001 - the direct call is always right, only slower
            self.failed.add(key)
            warnings.warn(f"level '{self.name}': its graph could not be captured again for input shapes "
                          f"{[k[0] for k in key[:n]]}; inputs of these shapes call the function directly",
                          stacklevel=3)
            return None
        finally:
            for m, flag in saved:
                m.training = flag
        self.graphs[key] = gm.forward
        return gm.forward


def _signature(leaves) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) for x in leaves)
