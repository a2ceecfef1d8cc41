"""Attention kernels for levels whose loss is differentiated twice.

PyTorch picks a fused kernel for ``scaled_dot_product_attention`` (flash attention on CPU and
CUDA) whose backward has no derivative of its own: a second derivative through it fails with
``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``.
The math kernel computes the same attention from differentiable ops. mlodsl knows which losses are
differentiated twice (``second_order_levels``) and evaluates those of them that may call attention
(``may_run_attention``) under the math kernel (``attention_kernel``); every other loss (a top
level's own gradient, levels under ``FiniteDiff`` or ``FirstOrder``) keeps the fast kernel.

``check_second_order`` takes one Hessian-vector product of each such level at build time, so an
op with no double backward at all (a custom ``autograd.Function`` marked ``once_differentiable``)
is reported there, named, with the fix, instead of in the middle of training; a level whose
method takes forward-over-reverse products (``MixedUnroll``) gets one of those too.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .graph import ProgramError
from .hypergrad.base import differentiates_twice


def second_order_levels(plan, methods: dict) -> set:
    """Levels whose loss is differentiated twice: every level of the block of a lower level whose
    method differentiates through its gradient (the lower level's updates or its Hessian products,
    and, in a deeper block, the updates a level above differentiates through in turn), and every
    level of the blocks a level unrolls together because they share a level (``plan.groups``)."""
    unrolled = {n for group in plan.groups.values() for m in group for n in plan.subtree[m]}
    return unrolled | {n for lower, m in methods.items() if differentiates_twice(m) for n in plan.subtree[lower]}


def may_run_attention(traced) -> bool:
    """Whether a level's loss may call ``scaled_dot_product_attention`` (``TracedLevel.attends``,
    read off its graph at build: an attention op, a module or a function outside torch that the
    graph calls without showing its ops, or an opaque level). A loss that cannot is evaluated
    without entering ``attention_kernel`` (a context per evaluation is a measurable part of a small
    level's update)."""
    return getattr(traced, "attends", True)


def attention_kernel() -> contextlib.AbstractContextManager:
    """The context a twice-differentiated loss runs in: attention by the math kernel."""
    return sdpa_kernel(SDPBackend.MATH)


def check_second_order(runtime, names, params: dict, batches: dict, modules: dict):
    """One Hessian-vector product of each level in ``names`` at ``params`` on its batch, raising
    ``ProgramError`` naming the level, the op without a double backward and the fix.

    ``batches``: level -> one batch; ``modules``: level -> module (buffers are restored after).
    """
    saved = [(b, b.detach().clone()) for m in modules.values() for b in m.buffers()]
    try:
        for name in names:
            _hvp_or_raise(runtime, name, params, batches[name])
            method = runtime.methods.get(name)
            if method is not None and method.forward_over_reverse:
                _jvp_of_grad_or_raise(runtime, name, params, batches[name])
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def forward_mode_failures(runtime, names, params: dict, batches: dict, modules: dict, transformed=()) -> dict:
    """``{level: None, or (the error, the op it names)}`` of one Hessian product by reverse over
    forward (``autodiff.reverse_over_forward``: a forward pass over dual tensors, then the gradient
    of the directional derivative) of each level in ``names``, in every level's parameters at
    ``params`` on its batch, as ``CG(low_memory=True)`` takes them; also under ``torch.func`` for the
    levels in ``transformed`` (compiled, or batched over tasks). Buffers and the random number
    generators are restored after: a loss that draws (dropout) leaves the program's random stream
    as it was."""
    saved = [(b, b.detach().clone()) for m in modules.values() for b in m.buffers()]
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return {name: _forward_mode_failure(runtime, name, params, batches[name], name in transformed)
                    for name in names}
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _forward_mode_failure(runtime, name, params, batch, transformed: bool):
    from . import autodiff
    own = {k: v.detach() for k, v in params[name].items()}
    others = {n: {k: v.detach() for k, v in p.items()} for n, p in params.items() if n != name}

    def loss(own_, others_):
        return runtime.evaluate(name, {**others_, name: own_}, batch)[0]

    try:
        for under_func in (False, True) if transformed else (False,):
            with autodiff.torch_func_products() if under_func else contextlib.nullcontext():
                autodiff.reverse_over_forward(loss, (own, others), ({k: torch.ones_like(v) for k, v in own.items()},
                                                                    None))
    except Exception as err:  # noqa: BLE001 - whatever fails here, the linearization is chosen or it is refused
        return err, _forward_culprit(err, loss, own, others)
    return None


def _forward_culprit(err: Exception, loss, own: dict, others: dict) -> str:
    """The op without a forward-mode derivative that ``err`` names, else the custom
    autograd.Functions of the loss without a ``jvp``."""
    found = re.search(r"forward AD with (\S+) that", str(err)) or re.search(r"(aten::\w+)", str(err))
    if found:
        return f"'{found.group(1)}'"
    try:
        with torch.enable_grad():
            out = loss({k: v.detach().requires_grad_() for k, v in own.items()}, others)
        lacking = [c for c in custom_functions([out]) if c.jvp is torch.autograd.Function.jvp]
    except Exception:  # noqa: BLE001 - only a better name is lost
        lacking = []
    if lacking:
        return "the autograd.Function " + " / ".join(f"'{c.__name__}'" for c in lacking) + " (it has no jvp)"
    return "an op"


def _hvp_or_raise(runtime, name, params, batch):
    own = {k: v.detach().requires_grad_() for k, v in params[name].items()}
    loss = runtime.evaluate(name, {**params, name: own}, batch)[0]
    flat = list(own.values())
    if not loss.requires_grad:
        # A middle level's loss may reach only the parameters of the levels below it: check there.
        leaves = {n: {k: v.detach().requires_grad_() for k, v in p.items()} for n, p in params.items()}
        flat = [x for p in leaves.values() for x in p.values()]
        loss = runtime.evaluate(name, leaves, batch)[0]
    if not loss.requires_grad:  # a constant loss: nothing to differentiate (check_losses says so)
        return
    grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
    pairs = [(g, p) for g, p in zip(grads, flat) if g is not None and g.requires_grad]
    if not pairs:  # the gradient does not depend on the parameters (a linear loss): nothing to check
        return
    dot = sum((g * torch.ones_like(g)).sum() for g, _ in pairs)
    try:
        torch.autograd.grad(dot, [p for _, p in pairs], allow_unused=True)
        # A node without a derivative raises only when a backward pass reaches it; one that cuts
        # the graph instead (@once_differentiable) is found by looking for it.
        broken = _broken_nodes(g for g, _ in pairs)
        if broken:
            raise RuntimeError(f"the gradient's graph has {broken[0]} nodes: a derivative is missing")
        # @once_differentiable marks its gradient only when the incoming gradient requires grad;
        # under a sum or mean that gradient is a constant, so the gradient is silently detached.
        if _once_differentiable(loss):
            raise RuntimeError("its backward is @once_differentiable: its gradient is a constant to a "
                               "second derivative")
    except RuntimeError as err:
        what = _culprit(err, loss)
        method = runtime.methods.get(name)
        how = f"its method {method!r}" if method is not None else "the method of a level above it"
        raise ProgramError(
            f"level '{name}': {how} differentiates its loss twice, but {what} has no double backward "
            f"({str(err).splitlines()[0]}). Fix: give this level a first-order method "
            f"(hypergrad=ml.hypergrad.FiniteDiff() or FirstOrder()), or implement the double backward "
            f"(a custom autograd.Function whose backward uses differentiable torch ops, without "
            f"@once_differentiable).") from err


def _jvp_of_grad_or_raise(runtime, name, params, batch):
    """One forward-over-reverse product (``torch.func.jvp`` of ``torch.func.grad``) of level
    ``name``'s loss in every level's parameters, as ``MixedUnroll`` takes them."""
    from . import autodiff
    own = {k: v.detach() for k, v in params[name].items()}
    others = {n: {k: v.detach() for k, v in p.items()} for n, p in params.items() if n != name}

    def loss(own_, others_):
        return runtime.evaluate(name, {**others_, name: own_}, batch)[0]

    try:
        for transformed in (False, True):  # on the tape (eager) and under torch.func (vmap, compile)
            with (autodiff.torch_func_products() if transformed else contextlib.nullcontext()):
                autodiff.forward_over_reverse(loss, (own, others), ({k: torch.ones_like(v) for k, v in own.items()},
                                                                    None))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        hint = (" (F.mse_loss with reduction='mean' is one, as of torch 2.13, in a level that runs as an opaque "
                "call: write ((pred - target) ** 2).mean())" if "ZeroTensors are immutable" in first
                else " (requires_grad_() on a tensor of the loss, as an input-gradient penalty does, cannot run "
                     "under torch.func transforms)" if "requires_grad_()" in first else "")
        raise ProgramError(
            f"level '{name}': its method {runtime.methods.get(name)!r} takes forward-mode derivatives of its "
            f"loss's gradient, but an op of its loss has no forward-mode derivative of its backward{hint} "
            f"({first}). Fix: hypergrad=ml.hypergrad.Unroll() (the same numbers by reverse-over-reverse), "
            f"or write the loss with ops that have one (a custom autograd.Function needs a jvp "
            f"staticmethod).") from err


def _graph_nodes(roots):
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions)


def _broken_nodes(tensors) -> list:
    """Names of autograd nodes that raise when reached: a missing derivative (``NotImplemented``)
    or a function differentiated twice that forbids it (``Error``, from @once_differentiable)."""
    return sorted({type(n).__name__ for n in _graph_nodes(t.grad_fn for t in tensors)
                   if type(n).__name__ in ("Error", "DelayedError", "NotImplemented")})


def custom_functions(tensors) -> list:
    """The custom autograd.Function classes in the graph of ``tensors``, in the order they are met."""
    custom = []
    for node in _graph_nodes(t.grad_fn for t in tensors):
        cls = getattr(node, "_forward_cls", None)  # the Function class of a custom autograd node
        if cls is not None and cls not in custom:
            custom.append(cls)
    return custom


def _once_differentiable(loss: torch.Tensor) -> list:
    """The custom Functions of the loss whose backward is wrapped by @once_differentiable
    (functools.wraps leaves ``__wrapped__``)."""
    return [c for c in custom_functions([loss]) if hasattr(c.backward, "__wrapped__")]


def _culprit(err: Exception, loss: torch.Tensor) -> str:
    """The op named by the error, else the custom autograd.Functions in the loss's graph."""
    op = re.search(r"aten::\w+", str(err))
    if op:
        return f"'{op.group(0)}'"
    # @once_differentiable ones are the culprits when present.
    once = _once_differentiable(loss) or custom_functions([loss])
    if once:
        return "the autograd.Function " + " / ".join(f"'{c.__name__}'" for c in once)
    return "an op of its loss"
