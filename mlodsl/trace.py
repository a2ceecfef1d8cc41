"""Trace a level function into a ``torch.fx.GraphModule`` whose inputs are tensors.

The graph's placeholders are the batch (``batch`` for a tensor, ``batch_0, batch_1, ...`` for a
tuple, ``batch_<key>`` for a dict) and then one placeholder per learnable parameter of every level
the function reads, named ``<level>_<parameter path>`` (``inner_weight``, ``outer_log_l2``): its own
level and its arguments always, and any other level whose module it reaches through a closure, a
global or another object (the tracer's root holds every module of the program). Modules are traced
into (``nn.Linear`` becomes ``torch._C._nn.linear``), so the graph shows the arithmetic the loss does
on each parameter.

A function that symbolic tracing cannot follow (data-dependent Python control flow, modules that
do not trace), or whose graph would freeze a learned tensor as a constant, falls back to an
*opaque* graph: one node that calls the function on the program's modules, every one bound to the
step's parameters (``binding.ProgramModules``); it runs the same math, and a warning names the
level, the reason and what to change to get a readable graph. A tensor that requires grad but
belongs to no level is refused at build time (``ProgramError``): nothing could learn it.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .baked import collect, fingerprint, recording_module_reads
from .binding import ProgramModules, storage_of, storages
from .graph import ProgramError
from .decompose import decompose_mse_loss
from .names import Namespace
from .nograd import constants_where_grad_was_disabled, mark_if_grad_disabled, stop_gradient
from .writes import no_writes, refuse_writes_to_inputs
from .capture import capture_level


class TraceWarning(UserWarning):
    """A level could not be traced symbolically and runs as an opaque call."""


@dataclass
class TracedLevel:
    """A level's loss as a graph: ``graph(*batch_leaves, **params) -> loss or (loss, metrics)``."""

    name: str
    graph: fx.GraphModule
    batch_kind: str                 # "none" | "tensor" | "tuple" | "dict"
    batch_keys: tuple               # tuple length or dict keys
    inputs: dict                    # placeholder -> (level name, parameter name)
    opaque: bool = False
    reason: str = ""
    direct: object = None           # direct(params, batch): the user's function on the bound modules
    buffers: dict = field(default_factory=dict)  # placeholder -> (level, module, buffer name)
    buffer_state: object = None     # the Program's BufferState (staged running statistics)
    reads: tuple = ()               # levels whose parameters the loss reaches (found at build time)
    # Python values the graph froze (mlodsl.baked): {where held: Watched}, the graph's fingerprint,
    # and retrace() -> a new trace's fingerprint; None for an opaque level, which reads them live
    baked: dict = field(default_factory=dict)
    # ops that read a tensor from outside the function into a Python value while tracing
    value_reads: tuple = ()
    fingerprint: tuple = ()
    retrace: object = None

    def __post_init__(self):
        # Read off once at build: the eager step asks them at every update, and a compiled region
        # may ask them while dynamo traces it (which a lazy property's lock would break).
        self.levels = frozenset(lvl for lvl, _ in self.inputs.values())  # levels whose parameters it takes
        # whether running the graph may call scaled-dot-product attention, whose kernel a loss that
        # is differentiated twice must pick (mlodsl.kernels): an op named for attention (or a
        # transformer's fused path), a module or a function outside torch that the graph calls
        # without showing its ops, or an opaque graph
        self.attends = (self.opaque or self.graph is None
                        or any(_may_attend(node) for node in self.graph.graph.nodes))

    def batch_args(self, batch) -> tuple:
        if self.batch_kind == "none":
            return ()
        if self.batch_kind == "tensor":
            return (batch,)
        if self.batch_kind == "tuple":
            return tuple(batch)
        return tuple(batch[k] for k in self.batch_keys)

    def __call__(self, params: dict, batch):
        """Evaluate the loss; ``params`` maps level names to dicts of parameter tensors."""
        kwargs = {ph: params[lvl][p] for ph, (lvl, p) in self.inputs.items()}
        if self.buffers:
            kwargs.update(self.buffer_state.inputs(self.buffers))
        args = tuple(batch) if self.batch_kind == "tuple" else self.batch_args(batch)  # the usual case inline
        try:
            out = self.graph.forward(*args, **kwargs)  # no nn.Module call machinery: no hooks to run
            if self.buffers:
                self.buffer_state.written(self.buffers, kwargs)
            return out
        except Exception:
            if self.opaque or self.direct is None:
                raise
            user_error = _raised(self.direct, params, batch)
            if user_error is None:
                raise
        # The graph's traceback shows generated code; the user's function, re-run directly on the
        # same inputs, raises the same error at the user's own line.
        user_error.add_note(f"(raised in level '{self.name}'; shown by calling its function directly)")
        raise user_error.with_traceback(user_error.__traceback__) from None


class BufferState:
    """Buffers (BatchNorm running statistics) as state of a step, kept out of the user's modules
    until the step commits.

    Every evaluation of a traced loss gets fresh copies of the current buffers (the staged values of
    this step, else the module's). Only the evaluation of a level's own loss in its own update, in
    the step's forward pass (``writing(level)``), stages what it wrote for that level's buffers;
    hypergradient products, finite differences and readers' evaluations leave no trace. The
    Program commits the staged buffers with the step, or drops them with it.
    """

    def __init__(self):
        self.staged: dict = {}
        self.writer = None

    def begin(self):
        self.staged, self.writer = {}, None

    def inputs(self, buffers: dict) -> dict:
        out = {}
        for ph, (lvl, module, name) in buffers.items():
            current = self.staged.get((lvl, name))
            out[ph] = (module.get_buffer(name) if current is None else current).detach().clone()
        return out

    def written(self, buffers: dict, kwargs: dict):
        for ph, (lvl, module, name) in buffers.items():
            if lvl != self.writer:
                continue
            self.staged[(lvl, name)] = kwargs[ph].detach()
            if name.endswith("running_mean"):  # one more batch seen by that BatchNorm
                count = name[: -len("running_mean")] + "num_batches_tracked"
                if count in dict(module.named_buffers()):
                    current = self.staged.get((lvl, count), module.get_buffer(count))
                    self.staged[(lvl, count)] = current + 1

    def writing(self, level):
        state = self

        class _Writing:
            def __enter__(self):
                state.writer = level

            def __exit__(self, *exc):
                state.writer = None

        return _Writing()

    def commit(self, modules: dict):
        """Write the staged buffers into the levels' modules (``modules``: level -> module)."""
        with torch.no_grad():
            for (lvl, name), value in self.staged.items():
                modules[lvl].get_buffer(name).copy_(value)
        self.begin()


_TORCH_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _may_attend(node: fx.Node) -> bool:
    if node.op == "call_module":
        return True
    if node.op != "call_function":
        return False  # placeholders, attributes, outputs; a tensor method is never attention
    target = node.target
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')} {target}".lower()
    if "attention" in name or "transformer" in name:
        return True
    if target is stop_gradient:  # mlodsl's own detach (mlodsl.nograd)
        return False
    return not (getattr(target, "__module__", None) or "").startswith(_TORCH_MODULES)


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - returned to be re-raised with the user's traceback
        return err
    return None


def _identifier(text: str) -> str:
    out = re.sub(r"\W", "_", text)
    return out if out.isidentifier() else "_" + out


def _batch_structure(batch, takes_batch):
    if not takes_batch:
        return "none", (), []
    if isinstance(batch, torch.Tensor):
        return "tensor", (), ["batch"]
    if isinstance(batch, (tuple, list)):
        return "tuple", (len(batch),), [f"batch_{i}" for i in range(len(batch))]
    if isinstance(batch, dict):
        return "dict", tuple(batch), [f"batch_{_identifier(str(k))}" for k in batch]
    raise TypeError(f"a batch must be a tensor, a tuple/list or a dict of tensors; got {type(batch).__name__}")


class _IntoModulesTracer(fx.Tracer):
    """Traces into every module, so parameters and buffers appear as get_attr nodes (a value computed
    from a buffer is then part of the graph, not a constant that misses the buffer's changes)."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # BatchNorm's forward checks input.dim() in Python, which symbolic tracing cannot follow;
        # record the same arithmetic as one batch_norm call on its (proxied) buffers instead.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and not kwargs:
            return _batch_norm(m, *args)
        return super().call_module(m, forward, args, kwargs)

    def trace(self, root, concrete_args=None):
        # A custom autograd.Function is one call in the graph: tracing its forward would record the
        # forward's ops and differentiate those, silently dropping the user's backward (a
        # straight-through estimator's gradient would become round()'s zero).
        function_apply = torch.autograd.Function.__dict__["apply"]
        tracer = self

        def apply(cls, *args, **kwargs):
            if any(isinstance(x, fx.Proxy) for x in torch.utils._pytree.tree_leaves((args, kwargs))):
                return tracer.create_proxy("call_function", _custom_function_call(cls), args, kwargs)
            return function_apply.__get__(None, cls)(*args, **kwargs)

        torch.autograd.Function.apply = classmethod(apply)
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.autograd.Function.apply = function_apply

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        # get_attr nodes become placeholders later; keep their names free for those placeholders.
        if kind == "get_attr":
            name = "_attr_" + _identifier(str(target))
        return mark_if_grad_disabled(super().create_node(kind, target, args, kwargs, name, type_expr))


def _custom_function_call(cls):
    """``cls.apply`` as a plain function named after ``cls``: the graph's code reads
    ``<module>_<Function>_apply(x)``."""
    def call(*args, **kwargs):
        return cls.apply(*args, **kwargs)
    call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
    call.__module__ = cls.__module__
    return call


def _batch_norm(m, x):
    """``nn.BatchNorm*.forward`` for a module with a fixed momentum, without its Python checks."""
    # num_batches_tracked only matters when momentum is None (not traced); BufferState counts it.
    use_running = not m.training or m.track_running_stats
    return torch.batch_norm(x, m.weight, m.bias, m.running_mean if use_running else None,
                            m.running_var if use_running else None, m.training or not m.track_running_stats,
                            m.momentum, m.eps, torch.backends.cudnn.enabled)


def _rebuild_batch(kind, keys, args):
    if kind == "none":
        return None
    if kind == "tensor":
        return args[0]
    if kind == "tuple":
        return tuple(args)
    return dict(zip(keys, args))


def _call_args(level, modules: dict, batch):
    """Positional/keyword arguments of the user's function from ``{level: module}`` and a batch."""
    args = [modules[level.name]]
    kwargs = {n: modules[n] for n in level.level_args}
    if level.takes_batch:
        kwargs["batch"] = batch
    return args, kwargs


class _modes:
    """Temporarily put modules in train (True) or eval (False) mode."""

    def __init__(self, modules: dict, training: dict):
        self.modules, self.training = modules, training

    def __enter__(self):
        self.saved = {a: [m.training for m in mod.modules()] for a, mod in self.modules.items()}
        for a, mod in self.modules.items():
            mod.train(self.training.get(a, True))

    def __exit__(self, *exc):
        for a, mod in self.modules.items():
            for m, flag in zip(mod.modules(), self.saved[a]):
                m.training = flag


def trace_level(level, program: ProgramModules, example_batch, training: dict | None = None) -> TracedLevel:
    """Trace ``level.fn`` with every module of the program reachable, however the function reaches it.

    ``program`` holds every level's module; ``training`` maps level names to the mode their modules
    run in when this level's function calls them (train by default): fx records ``training`` flags
    as constants, so the mode is fixed when the level is traced.

    A graph that would not follow the parameters (a tensor computed from them frozen as a constant,
    or outputs that differ from the function's at perturbed parameters) is replaced by the opaque
    call, which binds every module to the live parameters; a tensor that requires grad but belongs
    to no level is refused (``ProgramError``): it would be frozen silently either way.
    """
    modes = training or {}
    with _modes(program.modules, modes):
        with recording_module_reads() as module_reads:
            traced = _trace(level, program, example_batch, modes)
        why = None if traced.opaque else _unfaithful(level, traced, program, example_batch)
        if why is not None:
            warnings.warn(
                f"level '{level.name}': its traced graph does not change with the parameters the way the "
                f"function does ({why}); it runs as an opaque call on the live parameters instead, with "
                f"the same numbers but no readable graph. For a readable graph, read parameters as module "
                f"attributes (net.weight, net[0].bias, outer.log_l2), best through the level's arguments, "
                f"not through .parameters() or variables holding them.", TraceWarning, stacklevel=3)
            kind, keys, batch_names = _batch_structure(example_batch, level.takes_batch)
            traced = _opaque_level(level, program, kind, keys, batch_names, modes, "graph not faithful")
    traced.reads = _probe_reads(level, traced, program, example_batch)
    if not traced.opaque:
        traced.baked = collect(level.name, level.fn, module_reads, _module_paths(program))
        traced.fingerprint = fingerprint(traced.graph)
        traced.retrace = lambda: _retraced(level, program, example_batch, modes)
    return traced


def _retraced(level, program: ProgramModules, example_batch, modes: dict) -> tuple:
    """The fingerprint of ``level`` traced again as the build traced it (``mlodsl.baked``)."""
    with _modes(program.modules, modes):
        return fingerprint(_trace(level, program, example_batch, modes).graph)


def _module_paths(program: ProgramModules) -> dict:
    """``{id(module): 'inner.0'}``: every module of the program, by level and path."""
    return {id(m): f"{lvl}.{path}" if path else lvl
            for lvl, root in program.modules.items() for path, m in root.named_modules()}


def _unfaithful(level, traced: TracedLevel, program: ProgramModules, example_batch) -> str | None:
    """Why the traced graph would not follow the parameters as the function does, else None."""
    why = _frozen_constant(level, traced, program)
    if why is None and not _follows_the_function(traced, program, example_batch):
        why = ("its outputs differ from the function's at other parameter values: parameters read "
               "through .parameters() or Python numbers are frozen by tracing")
    return why


def _evaluate(traced: TracedLevel, program: ProgramModules, params: dict, batch, through_graph: bool):
    """One evaluation at ``params`` (``{level: {name: tensor}}``), through the graph or the function
    itself, under a fixed random seed; every module's buffers are as they were afterwards."""
    every_buffer = [(b, b.detach().clone()) for m in program.modules.values() for b in m.buffers()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            if not through_graph:
                with no_writes(traced.name, params, batch):
                    return traced.direct(params, batch)
            kwargs = {ph: params[lvl][p] for ph, (lvl, p) in traced.inputs.items()}
            kwargs.update({ph: module.get_buffer(name).detach().clone()
                           for ph, (_, module, name) in traced.buffers.items()})
            return traced.graph.forward(*traced.batch_args(batch), **kwargs)
        finally:  # a direct call runs the real modules (BatchNorm writes its running statistics)
            with torch.no_grad():
                for buffer, value in every_buffer:
                    buffer.copy_(value)


def _tensors(out) -> list:
    if isinstance(out, (tuple, list)):
        return [x for x in fx.node.map_aggregate(out, lambda x: x) if isinstance(x, torch.Tensor)]
    return [out]


def _follows_the_function(traced: TracedLevel, program: ProgramModules, example_batch) -> bool:
    """Check the graph against the function itself with every parameter of the program perturbed.

    Tracing records what flows through proxies; a parameter reached another way is baked in as a
    constant, and the graph would silently ignore it. The function, called on the modules bound to
    the perturbed parameters, sees them all, however it reaches them.
    """
    gen = torch.Generator().manual_seed(0)
    perturbed = {lvl: {k: p.detach() + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype,
                                                   device="cpu").to(p.device)
                       for k, p in ps.items()} for lvl, ps in program.parameters().items()}
    try:
        with torch.no_grad():
            a, b = (_tensors(_evaluate(traced, program, perturbed, example_batch, through_graph))
                    for through_graph in (True, False))
    except ProgramError:  # the function wrote its parameters or its batch (mlodsl.writes)
        raise
    except Exception:  # noqa: BLE001 - a failure here is for the build-time check to report
        return True
    return len(a) == len(b) and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        and torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-6, equal_nan=True) for x, y in zip(a, b))


def _autograd_leaves(t: torch.Tensor) -> list:
    """The tensors that require grad at the leaves of ``t``'s autograd graph."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    out, seen, stack = [], set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            out.append(node.variable)
        stack += [n for n, _ in node.next_functions]
    return out


def _frozen_constant(level, traced: TracedLevel, program: ProgramModules) -> str | None:
    """Why the graph holds a tensor constant that should have been an input, else None.

    fx turns a tensor it meets outside its proxies into a constant of the graph. One that requires
    grad or shares memory with a parameter was computed from something learned: frozen at its
    build-time value, with a zero gradient. One whose autograd leaves belong to no level is refused.
    """
    shared = storages(program.parameters())
    for node in traced.graph.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _attribute(traced.graph, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        if value.requires_grad:
            for leaf in _autograd_leaves(value):
                if program.owner(leaf) is None:
                    raise _stray_tensor(level, leaf, program)
        if value.requires_grad or storage_of(value) in shared:
            return (f"the tensor `{node.target}` of shape {tuple(value.shape)}, computed from parameters at "
                    f"build time, would be a constant")
    if traced.value_reads:
        return (f"it reads the values of a tensor from outside the function into Python "
                f"({', '.join(traced.value_reads)}, e.g. `temp.item()`), which tracing would freeze")
    return None


def _attribute(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _probe_reads(level, traced: TracedLevel, program: ProgramModules, example_batch) -> tuple:
    """The levels whose parameters the loss reaches on the autograd tape (one evaluation at the
    build-time parameters, as fresh leaves); a leaf that is none of them is refused."""
    leaves = {lvl: {k: p.detach().clone().requires_grad_() for k, p in ps.items()}
              for lvl, ps in program.parameters().items()}
    try:
        # watched for writes: an opaque level has no graph to read them from (mlodsl.writes)
        with torch.enable_grad(), _Created() as created, no_writes(level.name, leaves, example_batch):
            loss = _tensors(_evaluate(traced, program, leaves, example_batch, through_graph=True))[0]
    except ProgramError:
        raise
    except Exception:  # noqa: BLE001 - the build-time check evaluates the loss again and reports it
        return ()
    if not isinstance(loss, torch.Tensor):
        return ()
    level_of = {id(t): lvl for lvl, ps in leaves.items() for t in ps.values()}
    reads = set()
    for leaf in _autograd_leaves(loss):
        if id(leaf) in created.tensors:  # made by the function itself: an input-gradient penalty's input
            continue
        if id(leaf) not in level_of:
            raise _stray_tensor(level, leaf, program)
        reads.add(level_of[id(leaf)])
    return tuple(lvl for lvl in program.modules if lvl in reads)


# Tensor methods that read a tensor's values into Python: run on a tensor from outside the function
# while tracing, they freeze a number into the graph.
_VALUE_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                          "numpy", "__array__", "equal", "allclose", "__format__"})


class _LiftOutsideTensors(torch.overrides.TorchFunctionMode):
    """While fx traces: an op on real tensors (no proxy among its inputs) of which one comes from
    outside the function (a closure's, a global, a plain module attribute) is recorded as an op of
    the graph on that tensor (a ``get_attr`` of the tensor itself), not run once into a constant:
    ``log_t.exp()`` then follows ``log_t.fill_(...)``, as ``log_t * h`` always did. A tensor the
    function makes from nothing (``torch.zeros(3)``) stays a constant. An op that reads such a
    tensor's values into Python (``temp.item()``) is noted in ``value_reads``: that number would be
    frozen."""

    def __init__(self, tracer: fx.Tracer):
        super().__init__()
        self.tracer = tracer
        self.made: dict = {}       # id -> tensor made by the function from no outside tensor (kept alive)
        self.value_reads: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(x, fx.Proxy) for x in leaves):
            return func(*args, **kwargs)
        outside = [x for x in leaves if isinstance(x, torch.Tensor) and id(x) not in self.made]
        name = getattr(func, "__name__", "")
        if not outside:
            out = func(*args, **kwargs)
            self.made.update((id(x), x) for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor))
            return out
        if name in _VALUE_READS:
            self.value_reads.append(f"{name}()")
            return func(*args, **kwargs)
        in_place = name.endswith("_") and not name.startswith("__") or name.startswith("__i")
        if not in_place:
            out = func(*args, **kwargs)  # metadata (x.shape, x.dim()) stays a Python value
            if not any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(out)):
                return out
        lifted = {id(x): fx.Proxy(self.tracer.create_arg(x), self.tracer) for x in outside}
        args, kwargs = torch.utils._pytree.tree_map(
            lambda x: lifted.get(id(x), x) if isinstance(x, torch.Tensor) else x, (args, kwargs))
        return func(*args, **kwargs)


class _Created(torch.overrides.TorchFunctionMode):
    """Records every tensor an op returns while it is active: the tensors a function makes itself
    (kept alive here, so their ids stay theirs)."""

    def __init__(self):
        super().__init__()
        self.tensors: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.tensors[id(x)] = x
        return out


def _stray_tensor(level, tensor, program: ProgramModules) -> ProgramError:
    """The error for a loss that reaches a tensor requiring grad that the program does not bind."""
    name = _name_in(level.fn, tensor)
    owner = program.owner(tensor)
    if owner is not None:
        lvl, k = owner
        return ProgramError(
            f"level '{level.name}' reads parameter '{k}' of level '{lvl}' through a reference to the "
            f"nn.Parameter itself{f' (`{name}`)' if name else ''}, taken outside the function: the program's "
            f"updates cannot reach it, so it would stay at its build-time value with a zero gradient. Read "
            f"it through its module inside the function (`{lvl}.{k}` with '{lvl}' as an argument, or the "
            f"module's attribute)")
    what = f"`{name}`" if name else "a tensor"
    return ProgramError(
        f"level '{level.name}' reads {what} (shape {tuple(tensor.shape)}, requires_grad=True), which belongs "
        f"to no level of this program: nothing would learn it and its gradient would be dropped silently. "
        f"To learn it, make it a level's parameter (ml.Hyper({(name or 'x').split('.')[-1]}=...) as the "
        f"module of a level) and read it through that level; if it is a constant, create it with "
        f"requires_grad=False or use {name or 'it'}.detach()")


def _name_in(fn, tensor) -> str | None:
    """The name ``fn`` reaches ``tensor`` by (a closure variable, a global, or a module's parameter)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    seen = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            seen.append((name, cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    seen += [(n, fn.__globals__[n]) for n in code.co_names if n in getattr(fn, "__globals__", {})]
    for name, value in seen:
        if value is tensor:
            return name
        if isinstance(value, nn.Module):
            for k, p in value.named_parameters():
                if p is tensor:
                    return f"{name}.{k}"
    return None


def _attribute_names(levels) -> dict:
    """The attribute of the tracer's root that holds each level's module."""
    names, used = {}, set()
    for lvl in levels:
        attr = _identifier(lvl)
        if hasattr(nn.Module, attr):  # a level named 'train' or 'forward'
            attr = f"level_{attr}"
        while attr in used:
            attr += "_"
        used.add(attr)
        names[lvl] = attr
    return names


def _trace(level, program: ProgramModules, example_batch, modes: dict) -> TracedLevel:
    kind, keys, batch_names = _batch_structure(example_batch, level.takes_batch)
    attrs = _attribute_names(program.modules)
    owner_of_param = {f"{attrs[lvl]}.{k}": (lvl, k) for lvl in program.modules for k in program.learnable(lvl)}
    owner_of_buffer = {f"{attrs[lvl]}.{b}": (lvl, m, b) for lvl, m in program.modules.items()
                       for b, _ in m.named_buffers()}
    keys_out = keys if kind == "dict" else (keys[0] if keys else 0,)

    # forward(self, batch_0, batch_1, ...) rebuilds the batch and calls the user's function. The root
    # holds every level's module, so fx proxies their parameters however the function reaches them.
    sig = ", ".join(["self"] + batch_names)
    namespace = {"_rebuild": _rebuild_batch, "_call": _call_args, "_level": level, "_attrs": attrs,
                 "_kind": kind, "_keys": keys if kind == "dict" else keys_out}
    src = (f"def forward({sig}):\n"
           f"    batch = _rebuild(_kind, _keys, ({', '.join(batch_names)}{',' if batch_names else ''}))\n"
           f"    args, kwargs = _call(_level, {{lvl: getattr(self, a) for lvl, a in _attrs.items()}}, batch)\n"
           f"    return _level.fn(*args, **kwargs)\n")
    exec(compile(src, f"<mlodsl trace {level.name}>", "exec"), namespace)
    root = type(f"level_{_identifier(level.name)}", (nn.Module,), {"forward": namespace["forward"]})()
    for lvl, module in program.modules.items():
        root.add_module(attrs[lvl], module)

    try:
        # the function's own torch.no_grad() regions are the ones marked
        tracer = _IntoModulesTracer()
        with torch.enable_grad(), _LiftOutsideTensors(tracer) as lifting:
            graph = tracer.trace(root)
        decompose_mse_loss(graph)
        constants_where_grad_was_disabled(graph)
        names = Namespace(n.target for n in graph.nodes if n.op == "placeholder")  # the batch's
        inputs = _parameters_to_placeholders(graph, owner_of_param, (level.name, *level.level_args), names)
        buffers = _buffers_to_placeholders(graph, owner_of_buffer, names)
        gm = fx.GraphModule(root, graph, class_name=f"level_{_identifier(level.name)}")
        direct = _direct_call(level, program, modes)
        traced = TracedLevel(level.name, gm, kind, keys, inputs, direct=direct, buffers=buffers,
                             value_reads=tuple(lifting.value_reads))
    except Exception as err:  # noqa: BLE001 - every tracing failure falls back the same way
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        # Real models (Hugging Face, attention with shape checks): a graph of aten ops by make_fx.
        captured = _capture(level, program, example_batch, modes)
        if not isinstance(captured, str):
            captured.reason = f"captured by make_fx (symbolic_trace failed: {reason})"
            return captured
        reason += f"; make_fx could not capture it either ({captured})"
        warnings.warn(
            f"level '{level.name}' could not be traced by torch.fx ({reason}); it runs as an opaque "
            f"call, with the same numbers but no readable graph. To get a graph, avoid Python "
            f"control flow that depends on tensor values (use torch.where) and modules that do not trace.",
            TraceWarning, stacklevel=4)
        return _opaque_level(level, program, kind, keys, batch_names, modes, reason)
    refuse_writes_to_inputs(level.name, traced.graph.graph, traced.inputs, batch_names)
    return traced


def _buffers_to_placeholders(graph: fx.Graph, owner_of_buffer: dict, names: Namespace) -> dict:
    """Buffers the graph reads become placeholders ``<level>_<buffer>`` (unique in ``names``): each
    call gets copies, so in-place updates (BatchNorm's running statistics) never touch the module."""
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    used = [n for n in graph.nodes if n.op == "get_attr" and n.target in owner_of_buffer]
    buffers, placeholder_of = {}, {}
    with graph.inserting_before(first_op):
        for target in dict.fromkeys(n.target for n in used):
            lvl, module, bname = owner_of_buffer[target]
            ph = graph.placeholder(names.create(f"{lvl}_{bname}", ("buffer", lvl, bname)))
            buffers[ph.target] = (lvl, module, bname)
            placeholder_of[target] = ph
    for node in used:
        node.replace_all_uses_with(placeholder_of[node.target])
        graph.erase_node(node)
    graph.lint()
    return buffers


def _parameters_to_placeholders(graph: fx.Graph, owner_of_param: dict, named: tuple, names: Namespace) -> dict:
    """Turn get_attr nodes of learnable parameters into placeholders named after their level (each
    name unique in ``names``: level ``a``'s ``b_c`` and level ``a_b``'s ``c`` must not meet).

    Every learnable parameter of the levels the function names (itself, its arguments) becomes an
    input, used or not, so a level's graph has the same signature whatever its body touches; so
    does every parameter of a level it reaches another way (a closure, a global).
    """
    used = {owner_of_param[n.target][0] for n in graph.nodes if n.op == "get_attr" and n.target in owner_of_param}
    program_order = dict.fromkeys(lvl for lvl, _ in owner_of_param.values())
    read = list(named) + [lvl for lvl in program_order if lvl in used and lvl not in named]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    inputs, placeholder_of = {}, {}
    with graph.inserting_before(first_op):
        for lvl in read:
            for target, (owner, pname) in owner_of_param.items():
                if owner == lvl:
                    ph = graph.placeholder(names.create(f"{lvl}_{pname}", (lvl, pname)))
                    inputs[ph.target] = (lvl, pname)
                    placeholder_of[target] = ph
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in placeholder_of:
            node.replace_all_uses_with(placeholder_of[node.target])
            graph.erase_node(node)
    graph.lint()
    return inputs


def _direct_call(level, program: ProgramModules, modes: dict):
    """``call(params, batch)``: the user's function on the program's real modules, every one bound to
    ``params`` (``{level: {name: tensor}}``), so closures and globals see the same live tensors."""
    def call_level(params, batch):
        with _modes(program.modules, modes), program.bound(params):
            args, kwargs = _call_args(level, program.modules, batch)
            return level.fn(*args, **kwargs)

    call_level.__name__ = f"call_{_identifier(level.name)}"
    return call_level


def _program_inputs(level, program: ProgramModules, batch_names) -> dict:
    """``{placeholder: (level, parameter)}`` for every learnable parameter of the program, the
    level's own and its arguments' first: a function may read any of them. The names are unique
    among themselves and the batch's ``batch_names``."""
    named = (level.name, *level.level_args)
    order = list(named) + [lvl for lvl in program.modules if lvl not in named]
    names = Namespace(batch_names)
    return {names.create(f"{lvl}_{k}"): (lvl, k) for lvl in order for k in program.learnable(lvl)}


def _flat_call(level, program: ProgramModules, kind, keys, modes, inputs: dict):
    """The user's function as ``call(*batch_leaves, **{placeholder: tensor})``, the program's modules
    bound to the tensors of ``inputs``' placeholders (levels not in ``inputs`` keep their own)."""
    direct = _direct_call(level, program, modes)

    def call_level(*batch_leaves, **flat):
        params = {}
        for ph, (lvl, k) in inputs.items():
            params.setdefault(lvl, {})[k] = flat[ph]
        batch = _rebuild_batch(kind, keys if kind == "dict" else (len(batch_leaves),), batch_leaves)
        return direct(params, batch)

    call_level.__name__ = direct.__name__
    return call_level


def _capture(level, program: ProgramModules, example_batch, modes) -> TracedLevel | str:
    """The level as a graph of aten ops captured by ``make_fx`` (``mlodsl.capture``), or why not."""
    kind, keys, batch_names = _batch_structure(example_batch, level.takes_batch)
    inputs = _program_inputs(level, program, batch_names)
    values = {ph: program.learnable(lvl)[k].detach() for ph, (lvl, k) in inputs.items()}
    leaves = TracedLevel(level.name, None, kind, keys, inputs).batch_args(example_batch)
    captured = capture_level(level.name, lambda ins: _flat_call(level, program, kind, keys, modes, ins), inputs,
                             (level.name, *level.level_args), batch_names, leaves, values,
                             list(program.modules.values()))
    if isinstance(captured, str):
        return captured
    gm, kept = captured
    return TracedLevel(level.name, gm, kind, keys, kept, direct=_direct_call(level, program, modes))


def _opaque_level(level, program: ProgramModules, kind, keys, batch_names, modes, reason) -> TracedLevel:
    """A one-node graph that calls the function on the program's modules bound to its inputs: every
    learnable parameter of the program (own level and arguments first), since it may read any."""
    graph = fx.Graph()
    batch_phs = [graph.placeholder(n) for n in batch_names]
    inputs = _program_inputs(level, program, batch_names)
    param_phs = {ph: graph.placeholder(ph) for ph in inputs}
    call_level = _flat_call(level, program, kind, keys, modes, inputs)
    graph.output(graph.call_function(call_level, tuple(batch_phs), param_phs))
    gm = fx.GraphModule(nn.Module(), graph, class_name=f"level_{_identifier(level.name)}_opaque")
    return TracedLevel(level.name, gm, kind, keys, inputs, opaque=True, reason=reason,
                       direct=_direct_call(level, program, modes))
