"""Trace a level function into a ``torch.fx.GraphModule`` whose inputs are tensors.

The graph's placeholders are the batch (``batch`` for a tensor, ``batch_0, batch_1, ...`` for a
tuple, ``batch_<key>`` for a dict) and then one placeholder per learnable parameter of every
module the function touches, named ``<level>_<parameter path>`` (``inner_weight``,
``outer_log_l2``). Modules are traced into (``nn.Linear`` becomes ``torch._C._nn.linear``), so the
graph shows the arithmetic the loss does on each parameter.

A function that symbolic tracing cannot follow (data-dependent Python control flow, modules that
do not trace) falls back to an *opaque* graph: one node that calls the function with
``torch.func.functional_call``; it runs the same math, and a warning names the level, the reason
and what to change to get a readable graph.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

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
    direct: object = None           # the user's function called directly (same signature as graph)
    buffers: dict = field(default_factory=dict)  # placeholder -> (level, module, buffer name)
    buffer_state: object = None     # the Program's BufferState (staged running statistics)

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
        args = self.batch_args(batch)
        try:
            out = self.graph.forward(*args, **kwargs)  # no nn.Module call machinery: no hooks to run
            if self.buffers:
                self.buffer_state.written(self.buffers, kwargs)
            return out
        except Exception:
            if self.opaque or self.direct is None:
                raise
            user_error = _raised(self.direct, args, kwargs)
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


def _raised(fn, args, kwargs):
    try:
        fn(*args, **kwargs)
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
    """Traces into every module, so parameters appear as get_attr nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        # BatchNorm's forward checks input.dim() in Python, which symbolic tracing cannot follow;
        # record the same arithmetic as one batch_norm call on its (proxied) buffers instead.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and not kwargs:
            return _batch_norm(m, *args)
        return super().call_module(m, forward, args, kwargs)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        # get_attr nodes become placeholders later; keep their names free for those placeholders.
        if kind == "get_attr":
            name = "_attr_" + _identifier(str(target))
        return super().create_node(kind, target, args, kwargs, name, type_expr)


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
    """Positional/keyword arguments of the user's function from bound modules and a batch."""
    args = [modules[level.own_arg]]
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


def trace_level(level, modules: dict, owners: dict, example_batch, training: dict | None = None) -> TracedLevel:
    """Trace ``level.fn`` with ``modules`` bound to its arguments.

    ``modules`` maps the function's argument names to modules; ``owners`` maps the same names to the
    level each module belongs to (the own argument maps to the level itself); ``training`` maps
    them to the mode each module runs in (train by default): fx records ``training`` flags as
    constants, so the mode is fixed when the level is traced.
    """
    with _modes(modules, training or {}):
        traced = _trace(level, modules, owners, example_batch)
        if not traced.opaque and not _follows_the_function(traced, modules, owners, example_batch):
            warnings.warn(
                f"level '{level.name}': its traced graph does not change with the parameters the way the "
                f"function does (parameters read through .parameters() or Python numbers are frozen by "
                f"tracing); it runs as an opaque functional_call instead. Read parameters by name "
                f"(net.weight, net[0].bias) to get a readable graph.", TraceWarning, stacklevel=3)
            kind, keys, batch_names = _batch_structure(example_batch, level.takes_batch)
            traced = _opaque_level(level, modules, owners, kind, keys, batch_names, "graph not faithful")
    if traced.opaque:
        graph_call = traced.graph.forward

        def call_in_mode(*args, **kwargs):
            with _modes(modules, training or {}):
                return graph_call(*args, **kwargs)

        traced.graph.forward = call_in_mode
    return traced


def _follows_the_function(traced: TracedLevel, modules: dict, owners: dict, example_batch) -> bool:
    """Check the graph against the function itself at perturbed parameters (same random seed).

    Tracing records what flows through proxies; a parameter reached another way (iterating
    ``module.parameters()``) is baked in as a constant, and the graph would silently ignore it.
    """
    module_of = {owners[a]: m for a, m in modules.items()}
    gen = torch.Generator().manual_seed(0)
    kwargs = {}
    for ph, (lvl, pname) in traced.inputs.items():
        p = dict(module_of[lvl].named_parameters())[pname].detach()
        kwargs[ph] = p + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
    args = traced.batch_args(example_batch)
    saved = {(lvl, name): module.get_buffer(name).detach().clone() for lvl, module, name in traced.buffers.values()}
    every_buffer = [(b, b.detach().clone()) for m in modules.values() for b in m.buffers()]
    outs = []
    with torch.no_grad():
        for fn in (traced.graph, traced.direct):
            extra = ({ph: saved[(lvl, name)].clone() for ph, (lvl, _, name) in traced.buffers.items()}
                     if fn is traced.graph else {})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                try:
                    outs.append(fn(*args, **kwargs, **extra))
                except Exception:  # noqa: BLE001 - a failure here is for the build-time check to report
                    return True
                finally:  # the direct call ran the real modules: put their buffers back
                    for buffer, value in every_buffer:
                        buffer.copy_(value)
    a = [x for x in fx.node.map_aggregate(outs[0], lambda x: x) if isinstance(x, torch.Tensor)] \
        if isinstance(outs[0], (tuple, list)) else [outs[0]]
    b = [x for x in fx.node.map_aggregate(outs[1], lambda x: x) if isinstance(x, torch.Tensor)] \
        if isinstance(outs[1], (tuple, list)) else [outs[1]]
    return len(a) == len(b) and all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        and torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-6, equal_nan=True) for x, y in zip(a, b))


def _trace(level, modules: dict, owners: dict, example_batch) -> TracedLevel:
    kind, keys, batch_names = _batch_structure(example_batch, level.takes_batch)
    owner_of_param, owner_of_buffer = {}, {}
    for arg, module in modules.items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                owner_of_param[f"{arg}.{pname}"] = (owners[arg], pname)
        for bname, _ in module.named_buffers():
            owner_of_buffer[f"{arg}.{bname}"] = (owners[arg], module, bname)
    keys_out = keys if kind == "dict" else (keys[0] if keys else 0,)

    # forward(self, batch_0, batch_1, ...) rebuilds the batch and calls the user's function.
    sig = ", ".join(["self"] + batch_names)
    namespace = {"_rebuild": _rebuild_batch, "_call": _call_args, "_level": level,
                 "_kind": kind, "_keys": keys if kind == "dict" else keys_out}
    src = (f"def forward({sig}):\n"
           f"    batch = _rebuild(_kind, _keys, ({', '.join(batch_names)}{',' if batch_names else ''}))\n"
           f"    args, kwargs = _call(_level, {{n: getattr(self, n) for n in {list(modules)!r}}}, batch)\n"
           f"    return _level.fn(*args, **kwargs)\n")
    exec(compile(src, f"<mlodsl trace {level.name}>", "exec"), namespace)
    root = type(f"level_{_identifier(level.name)}", (nn.Module,), {"forward": namespace["forward"]})()
    for arg, module in modules.items():
        root.add_module(arg, module)

    try:
        graph = _IntoModulesTracer().trace(root)
        inputs = _parameters_to_placeholders(graph, owner_of_param)
        buffers = _buffers_to_placeholders(graph, owner_of_buffer)
        gm = fx.GraphModule(root, graph, class_name=f"level_{_identifier(level.name)}")
        direct, _ = _direct_call(level, modules, owners, kind, keys)
        return TracedLevel(level.name, gm, kind, keys, inputs, direct=direct, buffers=buffers)
    except Exception as err:  # noqa: BLE001 - every tracing failure falls back the same way
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        # Real models (Hugging Face, attention with shape checks): a graph of aten ops by make_fx.
        captured = capture_level(level, modules, owners, example_batch, TracedLevel, _direct_call,
                                 _batch_structure, f"symbolic_trace failed: {reason}")
        if not isinstance(captured, str):
            return captured
        reason += f"; make_fx could not capture it either ({captured})"
        warnings.warn(
            f"level '{level.name}' could not be traced by torch.fx ({reason}); it runs as an opaque "
            f"functional_call, with the same numbers but no readable graph. To get a graph, avoid Python "
            f"control flow that depends on tensor values (use torch.where) and modules that do not trace.",
            TraceWarning, stacklevel=4)
        return _opaque_level(level, modules, owners, kind, keys, batch_names, reason)


def _buffers_to_placeholders(graph: fx.Graph, owner_of_buffer: dict) -> dict:
    """Buffers the graph reads become placeholders ``<level>_<buffer>``: each call gets copies, so
    in-place updates (BatchNorm's running statistics) never touch the module."""
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    used = [n for n in graph.nodes if n.op == "get_attr" and n.target in owner_of_buffer]
    buffers, placeholder_of = {}, {}
    with graph.inserting_before(first_op):
        for target in dict.fromkeys(n.target for n in used):
            lvl, module, bname = owner_of_buffer[target]
            ph = graph.placeholder(_identifier(f"{lvl}_{bname}"))
            buffers[ph.name] = (lvl, module, bname)
            placeholder_of[target] = ph
    for node in used:
        node.replace_all_uses_with(placeholder_of[node.target])
        graph.erase_node(node)
    graph.lint()
    return buffers


def _parameters_to_placeholders(graph: fx.Graph, owner_of_param: dict) -> dict:
    """Turn get_attr nodes of learnable parameters into placeholders named after their level.

    Every learnable parameter of every bound module becomes an input, used or not, so a level's
    graph has the same signature whatever its body touches.
    """
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    inputs, placeholder_of = {}, {}
    with graph.inserting_before(first_op):
        for target, (lvl, pname) in owner_of_param.items():
            ph = graph.placeholder(_identifier(f"{lvl}_{pname}"))
            inputs[ph.name] = (lvl, pname)
            placeholder_of[target] = ph
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in placeholder_of:
            node.replace_all_uses_with(placeholder_of[node.target])
            graph.erase_node(node)
    graph.lint()
    return inputs


def _direct_call(level, modules, owners, kind, keys):
    """The user's function as ``call(*batch_leaves, **params)``, through ``functional_call``."""
    inputs = {}
    for arg, module in modules.items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                inputs[_identifier(f"{owners[arg]}_{pname}")] = (owners[arg], pname)
    arg_of_owner = {owners[a]: a for a in modules}

    def call_level(*batch_leaves, **params):
        batch = _rebuild_batch(kind, keys if kind == "dict" else (len(batch_leaves),), batch_leaves)
        bound = {}
        for arg, module in modules.items():
            own = {p: params[ph] for ph, (lvl, p) in inputs.items() if arg_of_owner[lvl] == arg}
            bound[arg] = _FunctionalModule(module, own)
        args, kwargs = _call_args(level, bound, batch)
        return level.fn(*args, **kwargs)

    call_level.__name__ = f"call_{_identifier(level.name)}"
    return call_level, inputs


def _opaque_level(level, modules, owners, kind, keys, batch_names, reason) -> TracedLevel:
    """A one-node graph that calls the function through ``torch.func.functional_call``."""
    call_level, inputs = _direct_call(level, modules, owners, kind, keys)
    graph = fx.Graph()
    placeholders = [graph.placeholder(n) for n in batch_names + list(inputs)]
    out = graph.call_function(call_level, tuple(placeholders[:len(batch_names)]),
                              {n: ph for n, ph in zip(inputs, placeholders[len(batch_names):])})
    graph.output(out)
    gm = fx.GraphModule(nn.Module(), graph, class_name=f"level_{_identifier(level.name)}_opaque")
    return TracedLevel(level.name, gm, kind, keys, inputs, opaque=True, reason=reason)


class _FunctionalModule:
    """A module seen with given parameters: calls go through ``torch.func.functional_call``."""

    def __init__(self, module: nn.Module, params: dict):
        self._module, self._params = module, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._module, self._params, args, kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        for name, p in self._module.named_parameters(recurse=recurse):
            yield prefix + name, self._params.get(name, p)

    def parameters(self, recurse: bool = True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def _child(self, key: str):
        prefix = key + "."
        return _FunctionalModule(self._module.get_submodule(key),
                                 {k[len(prefix):]: v for k, v in self._params.items() if k.startswith(prefix)})

    def __getitem__(self, idx):  # nn.Sequential / nn.ModuleList indexing
        if isinstance(idx, slice):
            raise TypeError("slicing a module inside a level is not supported; index its layers one by one")
        n = len(self._module)
        return self._child(str(idx % n if isinstance(idx, int) else idx))

    def __len__(self):
        return len(self._module)

    def __iter__(self):
        return (self[i] for i in range(len(self._module)))

    def __getattr__(self, name):
        prefix = name + "."
        if name in self._params:
            return self._params[name]
        sub = {k[len(prefix):]: v for k, v in self._params.items() if k.startswith(prefix)}
        attr = getattr(self._module, name)
        if sub and isinstance(attr, nn.Module):
            return _FunctionalModule(attr, sub)
        return attr
