"""Gradients and vector-Jacobian products, by ``torch.func`` or by the autograd tape.

The generated step differentiates pure functions of tensors. Under a ``torch.func`` transform
(``jvp`` in ``Forward``, ``torch.compile`` tracing) the products must be ``torch.func`` transforms;
outside of them, plain ``torch.autograd.grad`` computes the same numbers with a third of the
Python overhead (~0.3 ms against ~0.9 ms a call for small models), so eager steps use it.

On the tape, a product is a *partial* derivative: the inputs are aliased (``x.view_as(x)``) before
the function runs, so paths that reach an output through the inputs' own history (a lower level's
final parameters computed from the upper's) are not counted. When an input already carries a
graph (a level above is differentiating through this product), the product is built with
``create_graph=True`` so that it stays differentiable.

A backward pass starts from the outputs' places in the graph (``GradientEdge``), not from the output
tensors: an output the caller does not keep (a linearized gradient, an update's new parameters) is
freed before the backward passes run, unless the graph itself saved it.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
from torch.autograd.graph import get_gradient_edge
from torch.utils import _pytree as pytree

from .tree import detached, flatten

# Modes, per thread and per asyncio task (contextvars), set only by the context managers below.
_FORCE_FUNC: ContextVar[bool] = ContextVar("mlodsl_autodiff_force_func", default=False)
# > 0 while a function is evaluated for an enclosing product on the tape
_DIFFERENTIATING: ContextVar[int] = ContextVar("mlodsl_autodiff_differentiating", default=0)


@contextlib.contextmanager
def torch_func_products(flag: bool = True):
    """Within it, products are always ``torch.func`` transforms (``flag=True``: for
    ``torch.compile``, which traces transforms but not the tape), or chosen as usual (``False``)."""
    token = _FORCE_FUNC.set(flag)
    try:
        yield
    finally:
        _FORCE_FUNC.reset(token)


# torch.compile cannot read a ContextVar: it calls these once while tracing a region and keeps the
# result (its regions are traced under torch_func_products(), outside any tape product).
@torch.compiler.assume_constant_result
def _forced_func() -> bool:
    return _FORCE_FUNC.get()


@torch.compiler.assume_constant_result
def _differentiating() -> int:
    return _DIFFERENTIATING.get()


# A torch.func transform is active in this thread exactly while its dynamic-layer dispatch keys are
# in the thread's included set (functorch adds them with its first layer and drops them with its
# last). Asked this way, not by ``torch._C._functorch.maybe_current_level()``: that creates the
# thread's functorch state, which every later backward pass then copies (twice; on B1's eager step,
# ~1.3 M instructions of the floor's 73 M).
_TRANSFORM_KEY = torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode
_key_included = torch._C._dispatch_tls_is_dispatch_key_included


def in_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``vmap``) is active here."""
    return _key_included(_TRANSFORM_KEY)


def _tape() -> bool:
    return not _forced_func() and not _key_included(_TRANSFORM_KEY)


def on_tape() -> bool:
    """Whether products are taken on the autograd tape here (no torch.func transform is active)."""
    return not _forced_func() and not _key_included(_TRANSFORM_KEY)  # _tape(), one call fewer per update


def inside_product() -> bool:
    """Whether a function is being evaluated for an enclosing product on the tape (``evaluating``)."""
    return _differentiating() > 0


def _inputs(leaves):
    """Alias inputs that carry a graph; make fresh leaves of those that do not.

    ``nested``: this product will itself be differentiated (an input carries a graph, or it is
    evaluated inside the function of an enclosing product), so it must be built with create_graph.
    """
    # on the tape only, never under torch.compile: the ContextVar is read directly
    nested = _DIFFERENTIATING.get() > 0 or any(x.requires_grad for x in leaves)
    return [x.view_as(x) if x.requires_grad else x.detach().requires_grad_() for x in leaves], nested


class evaluating:
    """Marks the evaluation of a function that an enclosing tape product differentiates.

    A class rather than ``contextlib.contextmanager``: it runs on every product, and a generator
    costs several times more per use."""

    __slots__ = ("_token",)

    def __enter__(self):
        self._token = _DIFFERENTIATING.set(_DIFFERENTIATING.get() + 1)

    def __exit__(self, *exc):
        _DIFFERENTIATING.reset(self._token)


def edge(output: torch.Tensor):
    """Where a backward pass from ``output`` starts: its ``GradientEdge`` for a tensor computed in the
    graph (a sharded level's ``DTensor`` too; holding the edge does not keep the tensor's memory),
    else the tensor itself (a leaf)."""
    if output.grad_fn is not None:
        return get_gradient_edge(output)
    return output


def tape_grads(outputs, inputs, grad_outputs, create_graph, retain_graph=None):
    """``torch.autograd.grad`` of ``outputs`` in ``inputs``, zeros for inputs they do not reach."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=create_graph,
                                retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def grad_with_aux(fn, primals):
    """``(∇ fn(primals), aux)`` for ``fn(primals) -> (scalar, aux)``; primals is a pytree.

    The eager step calls this once per update, so its own cost is kept to a few microseconds:
    the grad mode is switched only when it is off, and the nesting count is kept by hand."""
    if _forced_func() or _key_included(_TRANSFORM_KEY):
        return _func_grad_with_aux(fn, primals)
    if torch.is_grad_enabled():
        return _tape_grad_with_aux(fn, primals)
    with torch.enable_grad():
        return _tape_grad_with_aux(fn, primals)


def _level_params(primals) -> bool:
    """Whether ``primals`` is ``{level: {name: tensor}}``, the shape the step differentiates in."""
    if type(primals) is not dict:
        return False
    for params in primals.values():
        if type(params) is not dict:
            return False
        for x in params.values():
            if not isinstance(x, torch.Tensor):
                return False
    return True


def _tape_grad_with_aux(fn, primals):
    if _level_params(primals):  # the update's own case, without the generic flattening
        grads, _, aux, nested = _tape_partials(fn, primals, primals)
        return grads, (aux if nested else detached(aux))
    leaves, unflatten = flatten(primals)
    inputs, nested = _inputs(leaves)  # with grad on: the alias of an input must carry its graph
    token = _DIFFERENTIATING.set(_DIFFERENTIATING.get() + 1)
    try:
        out, aux = fn(unflatten(inputs))
    finally:
        _DIFFERENTIATING.reset(token)
    grads = torch.autograd.grad((out,), inputs, create_graph=nested, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    if not nested:
        aux = detached(aux)
    return unflatten(grads), aux


def tape_level_grad(fn, marks: bool, params: dict, level: str, *args):
    """``(∇ loss in params[level], loss, metrics)`` on the tape for ``fn(params, *args) -> (loss,
    metrics)``, ``params`` mapping levels to their parameters: ``grad_with_aux`` in one level's
    parameters (partial derivatives, zeros where the loss does not reach, a graph kept where a
    product around it differentiates it), by a direct path: the eager step takes one at every
    update. ``marks``: whether ``fn`` may take products of its own (an opaque level's function), so
    that its evaluation is marked as one for an enclosing product (``evaluating``); a traced graph
    of torch operations takes none. Call it only on the tape (``on_tape()``)."""
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            return tape_level_grad(fn, marks, params, level, *args)
    depth = _DIFFERENTIATING.get()
    nested = depth > 0
    own = {}
    for k, x in params[level].items():
        if x.requires_grad:  # it carries a graph: alias it (a partial derivative), keep the graph
            nested = True
            own[k] = x.view_as(x)
        else:
            own[k] = x.detach().requires_grad_()
    inputs = {**params, level: own}
    if marks:
        token = _DIFFERENTIATING.set(depth + 1)  # by hand: ``evaluating``'s cost, per update
        try:
            loss, metrics = fn(inputs, *args)
        finally:
            _DIFFERENTIATING.reset(token)
    else:
        loss, metrics = fn(inputs, *args)
    if len(own) == 1:  # one tensor as itself: torch's wrapper checks a tuple against Mapping
        ((k, x),) = own.items()
        (g,) = torch.autograd.grad(loss, x, create_graph=nested, allow_unused=True)
        grad = {k: torch.zeros_like(x) if g is None else g}
    else:
        grads = torch.autograd.grad(loss, tuple(own.values()), create_graph=nested, allow_unused=True)
        grad = {k: torch.zeros_like(x) if g is None else g for (k, x), g in zip(own.items(), grads)}
    if not nested:
        loss = loss.detach()
        if metrics:
            metrics = detached(metrics)
    return grad, loss, metrics


def _tape_partials(fn, params: dict, wrt) -> tuple:
    """``(grads, out, aux, nested)`` for ``fn(params) -> (scalar out, aux)`` with ``params`` mapping
    levels to their parameters: the gradient of ``out`` in the parameters of the levels ``wrt``
    (``{level: {name: gradient}}``, zeros where it does not reach; the other levels' parameters are
    passed as they are), and whether it was built with a graph (an input carries one, or a product
    around it differentiates it). Grad mode must be on."""
    nested = _DIFFERENTIATING.get() > 0
    inputs, flat = dict(params), []
    for level in wrt:
        own = inputs[level] = {}
        for k, x in params[level].items():
            if x.requires_grad:  # it carries a graph: alias it (a partial derivative), keep the graph
                nested = True
                own[k] = x = x.view_as(x)
            else:
                own[k] = x = x.detach().requires_grad_()
            flat.append(x)
    token = _DIFFERENTIATING.set(_DIFFERENTIATING.get() + 1)  # by hand: ``evaluating``'s cost, per update
    try:
        out, aux = fn(inputs)
    finally:
        _DIFFERENTIATING.reset(token)
    grads = iter(torch.autograd.grad((out,), flat, create_graph=nested, allow_unused=True))
    out_grads = {}
    for level in wrt:
        mine = out_grads[level] = {}
        for k, x in inputs[level].items():
            g = next(grads)
            mine[k] = torch.zeros_like(x) if g is None else g
    return out_grads, out, aux, nested


def _func_grad_with_aux(fn, primals):
    """``torch.func.grad(fn, has_aux=True)``, for an ``aux`` that may hold non-tensors (a metric
    that is a Python number): torch.func carries the tensors, the rest is put back after."""
    kept = []

    def tensors_only(p):
        out, aux = fn(p)
        leaves, spec = pytree.tree_flatten(aux)
        kept.append((spec, [None if isinstance(x, torch.Tensor) else x for x in leaves]))
        return out, [x for x in leaves if isinstance(x, torch.Tensor)]

    grads, tensors = torch.func.grad(tensors_only, has_aux=True)(primals)
    spec, others = kept[-1]
    it = iter(tensors)
    return grads, pytree.tree_unflatten([next(it) if x is None else x for x in others], spec)


def vjp(fn, primals: tuple, cotangent, output: bool = True):
    """``cotangentᵀ ∂fn/∂primals`` for each primal (a tuple of pytrees), and ``fn(*primals)``
    (``None`` with ``output=False``: then, on the tape, the outputs are freed before the backward
    pass, which starts from their gradient edges)."""
    if not _tape():
        out, pullback = torch.func.vjp(fn, *primals)
        return pullback(cotangent), (out if output else None)
    flat, unflatten = flatten(list(primals))
    with torch.enable_grad():
        inputs, nested = _inputs(flat)
        with evaluating():
            out = fn(*unflatten(inputs))
        outs, cts = flatten(out)[0], flatten(cotangent)[0]
        pairs = [(edge(o), c) for o, c in zip(outs, cts) if o.requires_grad]
        if not output:
            out = outs = None
        if pairs:
            grads = tape_grads([o for o, _ in pairs], inputs, [c for _, c in pairs], nested)
        else:
            grads = [torch.zeros_like(x) for x in inputs]
    if output and not nested:
        out = detached(out)
    return tuple(unflatten(grads)), out


def grad(fn, argnums: int = 0):
    """``∇`` of a scalar ``fn`` in its argument ``argnums`` (a pytree), like ``torch.func.grad``."""
    def gradient(*args):
        if not _tape():
            return torch.func.grad(fn, argnums)(*args)

        def with_aux(x):
            return fn(*args[:argnums], x, *args[argnums + 1:]), None

        return grad_with_aux(with_aux, args[argnums])[0]

    return gradient


def vjp_fn(fn, *primals):
    """``(fn(*primals), pullback)`` where ``pullback(cotangent)`` may be called many times
    (conjugate gradient reuses one linearization), like ``torch.func.vjp``;
    ``pullback(cotangent, argnums=(i, ...))`` returns the products for those primals alone (on
    the tape, only they are computed: one linearization in (θ_L, θ_U) serves H w and B x)."""
    if not _tape():
        out, full = torch.func.vjp(fn, *primals)

        def pullback_func(cotangent, argnums=None):
            cts = full(cotangent)
            return cts if argnums is None else tuple(cts[i] for i in argnums)

        return out, pullback_func
    sizes = [len(flatten(p)[0]) for p in primals]
    starts = [sum(sizes[:i]) for i in range(len(primals))]
    flat, unflatten = flatten(list(primals))
    with torch.enable_grad():
        inputs, nested = _inputs(flat)
        with evaluating():
            out = fn(*unflatten(inputs))
    # The edges, not the outputs: a caller that drops the outputs (CG drops the linearized gradient)
    # frees them while the linearization lives on for every later pullback.
    roots = [edge(o) if o.requires_grad else None for o in flatten(out)[0]]

    def pullback(cotangent, argnums=None):
        pairs = [(o, c) for o, c in zip(roots, flatten(cotangent)[0]) if o is not None]
        wanted = range(len(primals)) if argnums is None else argnums
        wrt = [x for i in wanted for x in inputs[starts[i]:starts[i] + sizes[i]]]
        with torch.enable_grad():
            grads = (tape_grads([o for o, _ in pairs], wrt, [c for _, c in pairs], nested, retain_graph=True)
                     if pairs else [torch.zeros_like(x) for x in wrt])
        if argnums is None:
            return tuple(unflatten(grads))
        out_, at = [], 0
        for i in argnums:
            out_.append(flatten(primals[i])[1](grads[at:at + sizes[i]]))
            at += sizes[i]
        return tuple(out_)

    if not nested:
        out = detached(out)
    return out, pullback


def forward_over_reverse(fn, primals: tuple, tangents: tuple) -> tuple:
    """The tangent of the gradient of a scalar ``fn`` in every primal (a tuple of pytrees) along
    ``tangents`` (shaped like ``primals``; ``None`` for a primal whose tangent is zero): H t, for
    H the Hessian of ``fn`` in all its primals, by forward mode over reverse mode. H is symmetric,
    so this is also tᵀH, the VJP of the gradient, without a second backward pass.

    On the tape it is one backward pass over dual tensors (``torch.autograd.forward_ad``), built
    with ``create_graph`` only when a product around it differentiates it (that keeps the
    backward's own graph, which forward mode otherwise never needs); under a ``torch.func``
    transform it is ``torch.func.jvp`` of ``torch.func.grad``."""
    if not _tape():
        zeros = tuple(pytree.tree_map(torch.zeros_like, p) if t is None else t for p, t in zip(primals, tangents))
        grad = torch.func.grad(fn, argnums=tuple(range(len(primals))))
        return torch.func.jvp(grad, primals, zeros)[1]
    from torch.autograd import forward_ad
    flat, unflatten = flatten(list(primals))
    flat_tangents = [t for p, tan in zip(primals, tangents)
                     for t in (flatten(tan)[0] if tan is not None else [None] * len(flatten(p)[0]))]
    with torch.enable_grad(), forward_ad.dual_level():
        inputs, nested = _inputs(flat)
        duals = [x if t is None else forward_ad.make_dual(x, t) for x, t in zip(inputs, flat_tangents)]
        with evaluating():
            out = fn(*unflatten(duals))
        grads = (torch.autograd.grad(out, duals, create_graph=nested, allow_unused=True)
                 if out.requires_grad else [None] * len(duals))
        found = [None if g is None else forward_ad.unpack_dual(g).tangent for g in grads]
    products = [torch.zeros_like(x) if t is None else (t if nested else t.detach()) for t, x in zip(found, flat)]
    return tuple(unflatten(products))


def reverse_over_forward(fn, primals: tuple, tangents: tuple) -> tuple:
    """The gradient, in every primal (a tuple of pytrees), of the derivative of a scalar ``fn`` along
    ``tangents`` (shaped like ``primals``; ``None`` for a primal whose tangent is zero): H t, for H
    the Hessian of ``fn`` in all its primals jointly, as ``forward_over_reverse`` gives it.

    On the tape it is one forward pass over dual tensors (``torch.autograd.forward_ad``), whose
    tangent is the scalar ∇fn·t, and one backward pass of that scalar: what it records is the
    forward pass's (activation-sized, and the inputs and tangents themselves), not a gradient's
    graph, and nothing stays after it returns. Built with ``create_graph`` only when a product
    around it differentiates it; under a ``torch.func`` transform it is ``torch.func.grad`` of
    ``torch.func.jvp``."""
    if not _tape():
        zeros = tuple(pytree.tree_map(torch.zeros_like, p) if t is None else t for p, t in zip(primals, tangents))

        def directional(*args):
            return torch.func.jvp(fn, args, zeros)[1]

        return torch.func.grad(directional, argnums=tuple(range(len(primals))))(*primals)
    from torch.autograd import forward_ad
    flat, unflatten = flatten(list(primals))
    flat_tangents = [t for p, tan in zip(primals, tangents)
                     for t in (flatten(tan)[0] if tan is not None else [None] * len(flatten(p)[0]))]
    with torch.enable_grad():
        inputs, nested = _inputs(flat)
        with forward_ad.dual_level():
            duals = [x if t is None else forward_ad.make_dual(x, t) for x, t in zip(inputs, flat_tangents)]
            with evaluating():
                out = fn(*unflatten(duals))
            slope = forward_ad.unpack_dual(out).tangent
            del duals, out
        if slope is None or not slope.requires_grad:  # fn is linear along t: no second derivative
            products = [torch.zeros_like(x) for x in flat]
        else:
            products = tape_grads([slope], inputs, None, nested)
    return tuple(unflatten(products))
