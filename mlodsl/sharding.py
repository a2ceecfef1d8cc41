"""Sharded levels (ZeRO-3/FSDP) on torch.distributed: ``@ml.level(..., shard=True)``.

Under data parallel (``mlodsl.distributed``) every rank of a sharded level keeps a 1/world slice of
each of its parameters (flattened) and of its optimizer state, as ``torch.distributed.tensor``
``DTensor``s placed ``Shard(0)`` on a one-dimensional device mesh. The step passes these slices
around functionally; the two seams are:

* the traced losses (``gathering``): every loss that reads a sharded level's parameters takes their
  slices, and every op of its graph that reads them is one ``GatheredOp``: it all-gathers them
  (``full_tensor``) when it runs and drops them after, as FSDP gathers per unit: a forward pass
  holds the full parameters of one op at a time (one layer's weight and bias), not the level's.
  Its backward gathers them again and recomputes the op, so that a backward pass that builds a
  graph (a Hessian-vector product) gathers afresh inside the op's part of that graph; a view of a
  parameter (``w.t()``) is taken inside the op that reads it. An L2 penalty ``(p ** 2).sum()`` is
  summed on the slices (``sum_of_squares``) and gathers nothing.
* the gathers' backward is a reduce-scatter of the ranks' mean (``grad_placements=Partial("avg")``):
  the gradient in a slice is already the mean over ranks of the gradient in the full parameter,
  so ``reduce`` leaves sharded tensors alone and an optimizer update touches one slice. The
  reduce-scatter's own backward is an all-gather, which autograd differentiates again: Hessian-
  vector products, mixed products and the unrolled updates of a sharded level are those of one
  process on the union of the ranks' batches.

Dot products and norms of slices (a CG iteration, a finite difference's step, gradient clipping)
are DTensor reductions, which all-reduce the ranks' partial sums: the methods run on slices
unchanged. Scalars such as those mix with plain tensors (the step runs under DTensor's
``implicit_replication``); what leaves a method for the levels above (``plain``) is a plain tensor.

DTensor is differentiated on the autograd tape, not under ``torch.func`` transforms (inside them it
is no longer a DTensor), so ``Program`` refuses sharding together with ``Forward``, ``tasks=True``
and ``compile=True``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import operator

import torch
import torch.distributed as dist
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from .squares import POW, square_as_product

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication
except ImportError:  # torch built without distributed: nothing can be sharded
    DTensor = None


def is_sharded(x) -> bool:
    """Whether ``x`` is a slice of a sharded level's tensor (a ``DTensor``)."""
    return DTensor is not None and isinstance(x, DTensor)


def plain(x):
    """A DTensor that is not sharded (a replicated or partial scalar: a norm, a dot product, a
    hypergradient formed with one) as the plain tensor every rank holds; anything else as it is."""
    if is_sharded(x) and not any(p.is_shard() for p in x.placements):
        return x.full_tensor()
    return x


def plain_tree(tree: dict) -> dict:
    """``plain`` of every value of a dict (a hypergradient for an upper level)."""
    return {k: plain(v) for k, v in tree.items()}


class _Regather:
    """A full parameter autograd saved for the backward pass, as its slice and its view's geometry."""

    __slots__ = ("piece", "size", "stride", "offset")

    def __init__(self, piece, size, stride, offset):
        self.piece, self.size, self.stride, self.offset = piece, size, stride, offset

    def make(self, sharding) -> torch.Tensor:
        # Without a graph of its own: autograd gives an unpacked tensor the saved one's place in the
        # graph, so a double backward reaches the slice through the gather that made the saved
        # tensor (a ``GatheredOp``'s gather in its backward pass, inside that op's part of the graph).
        with torch.no_grad():
            full = sharding._full(self.piece, (-1,)).as_strided(self.size, self.stride, self.offset)
        return sharding._remember(full, self.piece)  # what a graph-building backward saves of it: the slice


def lost_peer(err: Exception) -> bool:
    """Whether ``err`` is a collective's failure (gloo raises a plain RuntimeError naming its
    transport when a peer's connection closes or a wait times out; nccl a DistBackendError)."""
    return isinstance(err, dist.DistError) or "gloo" in str(err) or "NCCL" in str(err)


class Sharding:
    """The sharded levels of a program and how their tensors are sliced and gathered."""

    def __init__(self, levels: list, state: dict, device: torch.device, error: type):
        self.levels = tuple(levels)
        self.world = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (self.world,))
        self.shapes = {n: {k: v.shape for k, v in state[n]["params"].items()} for n in self.levels}
        self.error = error  # DistributedError
        self._gathered: dict = {}  # storage address -> (weak reference to a gathered storage, its slice)

    # -- slicing ----------------------------------------------------------------------------------
    def slice(self, full: torch.Tensor):
        """This rank's slice of ``full`` (flattened; every rank holds the same ``full``: no transfer)."""
        return distribute_tensor(full.detach().reshape(-1), self.mesh, [Shard(0)], src_data_rank=None)

    def shard_level(self, state: dict, optimizer) -> dict:
        """A level's ``{"params", "opt"}`` with sliced parameters and a fresh optimizer state on them."""
        params = {k: self.slice(v) for k, v in state["params"].items()}
        return {"params": params, "opt": optimizer.init(params)}

    def shard_like(self, full, template):
        """``full`` (a level's state as one process holds it) sliced where ``template`` (the
        program's sharded state) holds slices."""
        if is_sharded(template):
            return self.slice(full)
        if isinstance(template, dict):
            return {k: self.shard_like(full[k], template[k]) for k in template}
        if isinstance(template, (list, tuple)):
            return type(template)(self.shard_like(f, t) for f, t in zip(full, template))
        return full

    # -- gathering --------------------------------------------------------------------------------
    def gather(self, params: dict) -> dict:
        """``{level: {name: tensor}}`` with every sharded level's slices all-gathered into full
        parameters at once, differentiably (as ``gathering``'s graphs gather each one)."""
        out = dict(params)
        for name in self.levels:
            if name in params:
                shapes = self.shapes[name]
                out[name] = {k: self._full(v, shapes[k]) for k, v in params[name].items()}
        return out

    def gathering(self, traced: dict) -> dict:
        """``{level: TracedLevel}`` where every loss that reads a sharded level's parameters takes
        their slices and gathers each where it is used (``gather_at_use``: each op that reads them
        is a ``GatheredOp``; ``sum_squares_on_slices``: an L2 penalty needs no gather).

        Each gather is differentiable: backward, the full gradient is reduce-scattered to the ranks'
        mean in each slice (and that, differentiated again, all-gathers). A ``GatheredOp``'s
        backward gathers and reduces within that op's backward, so a backward pass holds one op's
        full gradients at a time, and so does a second differentiation of a graph-building one.

        While a step runs (``running``), autograd keeps no gathered full tensor for a backward pass
        that outlives the op's own: it keeps the slice and all-gathers it again when the backward
        pass needs it, one at a time (``saved_tensors_hooks``). An unrolled update's graph, and the
        linearization CG reuses, hold slices, not full parameters."""
        return {n: self._gathering(t) for n, t in traced.items()}

    def _gathering(self, traced):
        shapes = {ph: tuple(self.shapes[lvl][k]) for ph, (lvl, k) in traced.inputs.items() if lvl in self.levels}
        if not shapes or traced.graph is None:
            return traced
        # an opaque level's one node is the user's whole function: it is not recomputed in a backward
        # pass (Python side effects), nor is an op that reads buffers (running statistics it updates)
        graph = copy.deepcopy(traced.graph.graph)
        sum_squares_on_slices(graph, set(shapes), self.sum_of_squares)
        graph = gather_at_use(graph, shapes, self.all_gather, None if traced.opaque else self.gathered_op,
                              keep=frozenset(traced.buffers), on_slices=(self.sum_of_squares,))
        gm = fx.GraphModule(traced.graph, graph, class_name=type(traced.graph).__name__)
        direct = traced.direct
        if direct is not None:  # the user's function, re-run on the same inputs to show an error: full ones
            def direct(params, batch, _direct=direct):
                return _direct(self.gather(params), batch)
        return dataclasses.replace(traced, graph=gm, direct=direct)

    def all_gather(self, x, shape):
        """Slice ``x`` gathered into a full tensor of ``shape`` (what a ``gathering`` graph calls)."""
        return self._full(x, shape)

    def sum_of_squares(self, x):
        """``(p ** 2).sum()`` of the full parameter whose slice is ``x``, from the slices: each rank
        sums the squares of its slice and one all-reduce adds the ranks' sums (a DTensor reduction).
        Backward, the ranks' cotangents of the sum are averaged (one all-reduce of a scalar, as a
        gather's backward averages the full gradients), and its gradient, ``2 p``, stays in the
        slices; both differentiable again. An L2 penalty gathers nothing."""
        from .distributed import Replicated
        if not is_sharded(x):
            return (x * x).sum()
        try:
            return Replicated.apply((x * x).sum().full_tensor())[0]
        except RuntimeError as err:
            if not lost_peer(err):
                raise
            raise self.failed("an all-reduce", err) from err

    def gathered_op(self, fn, shapes: tuple, views: tuple = ()):
        """``fn`` (one op of a traced loss) as a function of slices where it took full parameters:
        their ``shapes`` in the order they appear among its arguments (``GatheredOp``), and for
        each, the view the op took of it (``w.t()``) or None (``views``, empty: none)."""
        def run(*args, **kwargs):
            leaves, spec = tree_flatten((args, kwargs))
            sliced = [i for i, x in enumerate(leaves) if is_sharded(x)]
            if len(sliced) != len(shapes):
                raise RuntimeError(f"{fn}: {len(sliced)} sharded arguments, {len(shapes)} expected")
            op = _Op(self, fn, spec, dict(zip(sliced, shapes)), dict(zip(sliced, views)))
            if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad
                                                       for x in leaves):
                return _call(fn, spec, _gathered(op, leaves))
            return GatheredOp.apply(op, *leaves)

        run.__name__ = run.__qualname__ = "gathered_" + getattr(fn, "__name__", "op").strip("_")
        return run

    def _full(self, x, shape):
        if not is_sharded(x):
            return x
        try:
            full = x.full_tensor(grad_placements=[Partial("avg")]).view(shape)
        except RuntimeError as err:
            if not lost_peer(err):
                raise
            raise self.failed("an all-gather", err) from err
        return self._remember(full, x)

    def _remember(self, full, x):
        """Note that ``full`` (while it lives) is slice ``x`` gathered: autograd will save ``x`` instead."""
        # A weak reference to the storage, not to the tensor: a full tensor that a backward pass
        # re-gathered lives on in the engine after its Python object is gone, and a graph-building
        # backward pass saves it (or a view) then: it must still be recognised, or the graph of a
        # Hessian-vector product keeps one full weight per layer.
        # Entries of freed tensors go at once: an entry holds its slice, which may be an iterate that
        # is otherwise dropped (checkpointed Unroll's recomputed ones).
        self._gathered = {k: e for k, e in self._gathered.items() if not e[0].expired()}
        storage = full.untyped_storage()
        self._gathered[storage.data_ptr()] = (StorageWeakRef(storage), x)
        return full

    def _pack(self, t):
        """What autograd saves of ``t``: its slice where ``t`` is (a view of) a live gathered tensor."""
        if not self._gathered or is_sharded(t) or t.layout != torch.strided:
            return t
        entry = self._gathered.get(t.untyped_storage().data_ptr())
        if entry is None or entry[0].expired():  # not gathered, or freed (the address may be reused)
            return t
        return _Regather(entry[1], t.size(), t.stride(), t.storage_offset())

    def _unpack(self, x):
        return x.make(self) if isinstance(x, _Regather) else x

    def full(self, name: str, tree):
        """A sharded level's state (or part of it) as one process holds it: every slice gathered and
        shaped like the parameter whose name is its key (optimizer states are keyed by parameter)."""
        shapes = self.shapes[name]

        def walk(x, key=None):
            if is_sharded(x):
                with torch.no_grad():
                    t = x.full_tensor()
                return t.view(shapes[key]) if key in shapes and t.numel() == shapes[key].numel() else t
            if isinstance(x, dict):
                return {k: walk(v, k) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(walk(v) for v in x)
            return x

        try:
            return walk(tree)
        except RuntimeError as err:
            if not lost_peer(err):
                raise
            raise self.failed("gathering a sharded level's state", err) from err

    def full_state(self, state: dict) -> dict:
        """``{level: {"params", "opt"}}`` with the sharded levels gathered."""
        return {n: (self.full(n, s) if n in self.levels else s) for n, s in state.items()}

    # -- running --------------------------------------------------------------------------------------
    def failed(self, what: str, err: Exception) -> Exception:
        return self.error(f"rank {dist.get_rank()}: {what} of a sharded level failed (another rank died or "
                          f"the group timed out; MLODSL_DIST_TIMEOUT sets the timeout): {err}")

    @contextlib.contextmanager
    def running(self):
        """The context a step runs in: DTensor scalars mix with plain tensors (as replicated
        values); a collective that fails inside DTensor raises ``DistributedError``."""
        try:
            with implicit_replication(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        except RuntimeError as err:  # a collective inside DTensor (a reduce-scatter in a backward pass)
            if isinstance(err, self.error) or not lost_peer(err):
                raise
            raise self.failed("a collective", err) from err
        finally:
            self._gathered.clear()

    def wrap(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.running():
                return fn(*args, **kwargs)

        return run


class _Op:
    """What ``GatheredOp`` runs: ``fn`` on the leaves of its ``(args, kwargs)`` (``spec``), the
    leaves at ``shapes``' positions being slices gathered into full tensors of those shapes, and
    viewed by ``views[position]`` where that is not None."""

    __slots__ = ("sharding", "fn", "spec", "shapes", "views")

    def __init__(self, sharding, fn, spec, shapes: dict, views: dict):
        self.sharding, self.fn, self.spec, self.shapes, self.views = sharding, fn, spec, shapes, views


def _gathered(op: _Op, leaves: list) -> list:
    """``leaves`` with the slices at ``op.shapes``' positions all-gathered (differentiably where grad
    mode is on: backward, a reduce-scatter) and viewed; a slice passed twice (``w * w``) is
    gathered once."""
    out, fulls = list(leaves), {}
    for i, shape in op.shapes.items():
        x = leaves[i]
        if id(x) not in fulls:
            fulls[id(x)] = op.sharding._full(x, shape)
        view = op.views.get(i)
        out[i] = fulls[id(x)] if view is None else view(fulls[id(x)])
    return out


def _call(fn, spec, leaves: list):
    args, kwargs = tree_unflatten(leaves, spec)
    return fn(*args, **kwargs)


class _Replay:
    """The context an op ran in that its recomputation in a backward pass must run in again: the
    random number generators' states (an op that draws, such as dropout of a weight), autocast
    (mixed precision) and the attention kernels allowed (the math kernel of a twice-differentiated
    loss, ``mlodsl.kernels``)."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                         for t in {"cpu", device.type}}
        self.cache = torch.is_autocast_cache_enabled()
        self.attention = [b for b, on in _ATTENTION.items() if on()]

    @contextlib.contextmanager
    def __call__(self):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.devices))
            torch.set_rng_state(self.cpu_rng)
            for d, state in zip(self.devices, self.device_rng):
                torch.cuda.set_rng_state(state, d)
            for t, (on, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(t, dtype=dtype, enabled=on, cache_enabled=self.cache))
            if len(self.attention) < len(_ATTENTION):
                stack.enter_context(sdpa_kernel(self.attention))
            yield


class GatheredOp(torch.autograd.Function):
    """One op of a sharded level's loss that reads full parameters, run on their slices.

    Forward: the slices are all-gathered without a graph, the op runs, and only its inputs are
    saved (slices, not full parameters). Backward: the slices are gathered again, differentiably,
    the op is run again in the context it ran in (``_Replay``) and differentiated; the full
    parameters' gradients are reduce-scattered into the slices by the gathers' backward.

    Why not gather once and let autograd differentiate the op: a backward pass that builds a graph
    (a Hessian-vector product, an unrolled update's VJP) would then route the second-order
    contributions to a full parameter back to the forward pass's gather, which runs last in the
    second differentiation (the forward's nodes are the oldest), so every layer's full-size
    contribution waits there until the end of that pass: about one to two full copies of the
    parameters per rank. Here, a graph-building backward pass gathers the parameters afresh (new
    nodes, inside this op's part of the graph) from aliases of its inputs, and the second
    differentiation reduce-scatters each layer's contribution as soon as that layer is done.
    """

    @staticmethod
    def forward(ctx, op: _Op, *leaves):
        ctx.op, ctx.n = op, len(leaves)
        first: dict = {}  # a tensor passed twice (w * w) is saved once: position -> its first position
        ctx.first = {i: first.setdefault(id(x), i) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)}
        ctx.tensors = sorted(set(ctx.first.values()))
        ctx.others = [None if i in ctx.first else x for i, x in enumerate(leaves)]
        ctx.replay = _Replay(next(leaves[i] for i in op.shapes).device)
        out = _call(op.fn, op.spec, _gathered(op, list(leaves)))
        ctx.save_for_backward(*(leaves[i] for i in ctx.tensors))
        return out

    @staticmethod
    def backward(ctx, *grads):
        op, leaves = ctx.op, list(ctx.others)
        for i, x in zip(ctx.tensors, ctx.saved_tensors):
            leaves[i] = x
        create_graph = torch.is_grad_enabled()  # a backward pass that builds a graph of its own
        wrt = [i for i in ctx.tensors if any(ctx.needs_input_grad[1 + j] for j, f in ctx.first.items() if f == i)]
        # The recomputation's graph lives on when this pass builds a graph (its saved full parameters
        # are kept as slices, as everywhere in a step); otherwise it is gone when this function
        # returns, and what it saves is kept as it is: no second all-gather of a parameter.
        kept = contextlib.nullcontext() if create_graph else torch.autograd.graph.saved_tensors_hooks(_same, _same)
        with torch.enable_grad(), ctx.replay(), kept:
            for i in wrt:  # a fresh alias stops the inner grad here (an input may depend on another)
                leaves[i] = leaves[i].view_as(leaves[i]) if create_graph else leaves[i].detach().requires_grad_()
            for i, f in ctx.first.items():
                leaves[i] = leaves[f]
            out = _call(op.fn, op.spec, _gathered(op, leaves))
            pairs = [(o, g) for o, g in zip(out if isinstance(out, (tuple, list)) else (out,), grads)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wrt], [g for _, g in pairs],
                                        create_graph=create_graph, allow_unused=True) if pairs else [None] * len(wrt)
        result = [None] * (1 + ctx.n)  # a tensor passed twice: its whole gradient at its first position
        for i, g in zip(wrt, found):
            result[1 + i] = g
        return tuple(result)


def _same(x):
    return x


_ATTENTION = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
              SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
              SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
              SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled}


def gather_at_use(graph: fx.Graph, shapes: dict, all_gather, gathered_op=None, keep=frozenset(),
                  on_slices=()) -> fx.Graph:
    """``graph`` (in place) with every placeholder named in ``shapes`` (a slice) gathered where it is
    used.

    With ``gathered_op``, every node that reads slices becomes ``gathered_op(fn, shapes)`` (a
    ``GatheredOp``: the op gathers its own parameters, forward and backward; a view of a slice's
    parameter, ``w.t()``, is not an op of its own but taken inside its readers'), unless it reads a
    placeholder in ``keep`` (buffers, which an op may update in place and a recomputation would
    update twice), changes an argument in place, or only reads an attribute (``w.shape``). Those,
    and every node without ``gathered_op``, get ``all_gather(slice, shape)`` inserted just before
    them, shared with the next nodes until another parameter is gathered: a full parameter lives
    from its gather to its last use before that (fx's code drops a value after its last use).
    Either way a forward pass holds one op's full parameters (a linear layer's weight and bias) at
    a time, and a parameter read again at the end of the loss (a weight decay term) is gathered
    again, not held across the forward pass. Calls of a function in ``on_slices`` take the slices
    themselves (``sum_squares_on_slices``)."""
    sliced = {n for n in graph.nodes if n.op == "placeholder" and n.target in shapes}
    kept = {n for n in graph.nodes if n.op == "placeholder" and n.target in keep}
    live: dict = {}  # placeholder -> the gather its uses read now
    viewed: dict = {}  # a view of a slice's full tensor (w.t()) -> (placeholder, the view): left to its users
    for node in list(graph.nodes):
        if gathered_op is not None:
            view = _view_of(node, sliced, viewed)
            if view is not None:  # its users' GatheredOps take the view: their graphs then reach the
                viewed[node] = view  # slice through a gather of their own
                continue
            for v in [a for a in node.all_input_nodes if a in viewed]:
                if _recomputable(node) is None or kept & set(node.all_input_nodes):  # a view of its own
                    with graph.inserting_before(node):
                        own = graph.call_function(gathered_op(_itself, (shapes[viewed[v][0].target],),
                                                              (viewed[v][1],)), (viewed[v][0],))
                    node.replace_input_with(v, own)
        used = [a for a in node.all_input_nodes if a in sliced or a in viewed]
        if not used or (node.op == "call_function" and node.target in on_slices):
            continue
        square_as_product(node, set(used))  # the gathered parameter's square: see mlodsl.squares
        fn = _recomputable(node) if gathered_op is not None and not kept & set(node.all_input_nodes) else None
        if fn is not None:
            order = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node) and a in used]
            views = tuple(viewed[a][1] if a in viewed else None for a in order)
            order = [viewed[a][0] if a in viewed else a for a in order]
            for v in {a for a in used if a in viewed}:
                node.replace_input_with(v, viewed[v][0])
            with graph.inserting_before(node):
                new = graph.call_function(gathered_op(fn, tuple(shapes[a.target] for a in order),
                                                      views if any(views) else ()), node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            live = {}
            continue
        missing = [ph for ph in used if ph not in live]
        if missing:  # a new gather: the others' full tensors are let go (gathered again if read again)
            live = {ph: g for ph, g in live.items() if ph in used}
            with graph.inserting_before(node):
                for ph in missing:
                    live[ph] = graph.call_function(all_gather, (ph, shapes[ph.target]))
        for ph in used:
            node.replace_input_with(ph, live[ph])
    for v in reversed(list(viewed)):  # every user now takes the slice itself
        graph.erase_node(v)
    graph.lint()
    return graph


def _itself(x):  # the view of a slice's full tensor for a user that cannot take the view itself
    return x


# views a GatheredOp takes of a full parameter for the op that reads it: methods, and functions of it
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous"}
_VIEW_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unsqueeze,
                   torch.squeeze, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
                   torch.ops.aten.permute.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default}
_VIEW_ATTRIBUTES = {"T", "mT"}


def _view_of(node: fx.Node, sliced: set, viewed: dict):
    """``(placeholder, view)`` when ``node`` is a view (``w.t()``, ``w.T``, ``w.view(4, -1)``) of a
    sliced placeholder or of such a view, with constant arguments: ``view(full)`` is ``node``'s
    value given the placeholder's full tensor. None otherwise."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    base = node.args[0]
    if base in sliced:
        root, inner = base, None
    elif base in viewed:
        root, inner = viewed[base]
    else:
        return None
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in tree_flatten((rest, kwargs))[0]):
        return None
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        this = functools.partial(_view_method, node.target, rest, kwargs)
    elif node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
        this = functools.partial(_view_function, node.target, rest, kwargs)
    elif node.op == "call_function" and node.target is getattr and len(rest) == 1 and rest[0] in _VIEW_ATTRIBUTES:
        this = functools.partial(_view_function, getattr, rest, kwargs)
    else:
        return None
    return root, (this if inner is None else functools.partial(_compose, this, inner))


def _view_method(name, rest, kwargs, x):
    return getattr(x, name)(*rest, **kwargs)


def _view_function(fn, rest, kwargs, x):
    return fn(x, *rest, **kwargs)


def _compose(outer, inner, x):
    return outer(inner(x))


def sum_squares_on_slices(graph: fx.Graph, sliced: set, sum_of_squares) -> fx.Graph:
    """``graph`` (in place) with every sum of the squares of a sliced placeholder (named in
    ``sliced``), ``(p ** 2).sum()``, ``(p * p).sum()``, ``torch.sum(p ** 2)``, replaced by
    ``sum_of_squares(p)`` (``Sharding.sum_of_squares``), where the square is used by nothing else."""
    for node in list(graph.nodes):
        total = (node.op == "call_method" and node.target == "sum") or \
            (node.op == "call_function" and node.target in (torch.sum, torch.ops.aten.sum.default))
        if not total or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        square = node.args[0]
        p = _squared(square)
        if p is None or p.op != "placeholder" or p.target not in sliced or len(square.users) != 1:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(sum_of_squares, (p,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(square)
    graph.lint()
    return graph


def _squared(node: fx.Node):
    """The node ``node`` squares (``x ** 2``, ``x.pow(2)``, ``x * x``), or None."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if (node.op == "call_function" and node.target in POW) or (node.op == "call_method" and node.target == "pow"):
        return a if isinstance(a, fx.Node) and type(b) in (int, float) and b == 2 else None
    if node.target in (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, "mul"):
        return a if isinstance(a, fx.Node) and a is b else None
    return None


# ops that only read a tensor's attributes: no gradient, nothing worth a GatheredOp
_ATTRIBUTES = {"size", "dim", "numel", "type", "get_device", "is_floating_point", "is_contiguous", "element_size",
               "stride", "nelement", "ndimension"}


def _recomputable(node: fx.Node):
    """The function a ``GatheredOp`` may run (and run again) for ``node``, or None: a call of a
    function or a method that changes none of its arguments in place (no trailing ``_``, no
    ``out=``, no in-place operator, no mutable aten schema)."""
    if node.op == "call_method":
        name = node.target
        if name in _ATTRIBUTES or name.endswith("_") and not name.endswith("__"):
            return None
        return _method(name)
    if node.op != "call_function" or node.target is getattr or "out" in node.kwargs:
        return None
    name = getattr(node.target, "__name__", "")
    schema = getattr(node.target, "_schema", None)  # an aten op says whether it writes an argument
    if ((schema is not None and schema.is_mutable) or (name.endswith("_") and not name.endswith("__"))
            or node.target in _INPLACE_OPERATORS):
        return None
    return node.target


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.imatmul,
                      operator.ipow}


@functools.lru_cache(maxsize=None)
def _method(name: str):
    def call(self, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)

    call.__name__ = name
    return call


def local_bytes(state: dict) -> int:
    """Bytes of the tensors a rank holds in ``state`` (a slice counts its local part only)."""
    total = 0
    stack = [state]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            t = x.to_local() if is_sharded(x) else x
            total += t.numel() * t.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def check(levels: dict, lowers: dict, methods: dict, compiled: bool) -> list:
    """The levels with ``shard=True``, after refusing (``ProgramError``, naming the level and the
    fix) what sharding is not built for."""
    from .graph import ProgramError
    sharded = [n for n, lvl in levels.items() if lvl.shard]
    if not sharded:
        return []
    if DTensor is None:
        raise ProgramError(f"levels {sharded} have shard=True, but this torch has no torch.distributed.tensor")
    for name in sharded:
        lvl = levels[name]
        refusals = [  # (what is wrong, the fix)
            (lowers.get(name), f"it has lower levels {list(lowers.get(name) or ())}",
             "shard the levels without lower levels (the big model at the bottom) and keep the ones above "
             "replicated"),
            (lvl.tasks, "it is batched over tasks (tasks=True), which runs under torch.func.vmap",
             "drop shard=True or tasks=True"),
            (lvl.start_from not in (None, "init"),
             "it starts from an upper level's parameters (start_from=<upper>), which are not sharded",
             "drop shard=True, or start_from"),
            (lvl.optimizer.in_place,
             "its optimizer updates torch parameters in place (ml.optim.from_torch)",
             "use ml.optim.sgd/adam/adamw"),
            (compiled, "compile=True traces the step's regions, which do not take sharded tensors (DTensor)",
             "drop shard=True or compile=True"),
        ]
        for wrong, what, fix in refusals:
            if wrong:
                raise ProgramError(f"level '{name}' has shard=True, but {what}. Fix: {fix}")
    for name, method in methods.items():
        why = _UNSHARDABLE.get(type(method).__name__)
        if why:
            raise ProgramError(f"level '{name}' is differentiated by {method!r}, which {why[0]}, but levels "
                               f"{sharded} are sharded (shard=True). Fix: {why[1]}, or drop shard=True")
    return sharded


# built-in methods that do not run through sharded slices: what they do, and what to use instead
_UNSHARDABLE = {
    "Forward": ("pushes tangents with torch.func.jvp (DTensor is differentiated on the autograd tape only)",
                "Unroll() (the same numbers)"),
    "Nystrom": ("sketches the Hessian over the level's parameters flattened into one vector (a concatenation "
                "of slices)", "CG or Neumann"),
}


def setup(levels: dict, state: dict, parallel, error: type) -> Sharding | None:
    """Slice the ``state`` of the sharded ``levels`` in place (after the initial broadcast: every
    rank slices rank 0's values) and release their modules' full parameters; ``None`` when there
    is nothing to shard (no sharded level, or a single process)."""
    sharded = [n for n, lvl in levels.items() if lvl.shard]
    if not sharded or parallel is None:
        return None
    sharding = Sharding(sharded, state, parallel.device, error)
    for name in sharded:
        state[name] = sharding.shard_level(state[name], levels[name].optimizer)
        with torch.no_grad():  # the module's full tensors: their memory is what sharding saves
            for k, p in levels[name].module.named_parameters():
                if k in state[name]["params"]:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return sharding
