"""The helpers the generated step calls: evaluating a level's loss and its partial derivatives,
applying an optimizer update, recording metrics, and packaging a block's trajectory.

Everything here is a pure function of tensors (the log is written only outside of transforms), so
the generated step stays differentiable and traceable.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import autodiff
from .compiled import Compiler, is_plain
from .hypergrad.base import Trajectory, state_vjp
from .kernels import attention_kernel
from .loops import StackedPath, UpdateLoop
from .tree import detached


class LevelError(RuntimeError):
    """An error raised while running a level; the message names the level."""


def split_output(name: str, out):
    """A level function returns ``loss`` or ``(loss, metrics)``."""
    metrics = {}
    if isinstance(out, (tuple, list)):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise LevelError(f"level '{name}' must return a scalar loss or (loss, metrics_dict); "
                             f"got a {type(out).__name__} of length {len(out)}")
        out, metrics = out
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LevelError(f"level '{name}' must return a scalar loss tensor (reduce it with .mean() or "
                         f".sum()); got {shape}")
    return out, metrics


@dataclass
class BlockRecord:
    """What a lower level's block did; ``toward(upper)`` views it as a ``Trajectory`` for one upper."""

    level: str
    steps: int
    start: dict
    final: dict
    path: list | None
    up: dict                       # parameters of every level outside the block, as the block saw them
    advance: Callable              # (state, up, k) -> state
    last_batch: object
    runtime: "Runtime"
    begin: Callable | None = None  # up -> start state, when the block restarts each time it runs
    log: dict | None = None        # where methods' diagnostics go (None inside transforms)
    update_vjp: Callable | None = None  # (state, up, upper name, k, λ) -> (λ, upper cotangent)
    tape: dict | None = None       # upper name -> the leaves the block's updates were recorded from
    loop: UpdateLoop | None = None  # the level's update loop as compiled regions (mlodsl.loops)
    batches: list | None = None    # the block's batches, one per update (for the loop's reverse pass)

    def reverse_vjp(self, upper_name: str) -> Callable | None:
        """``(first, λ_K, total) -> (λ_first, total + Σ ∂S_{k+1}/∂θ_U ᵀ λ_{k+1}) | None``: Unroll's
        reverse pass as one compiled loop, when the forward pass ran as one (``StackedPath``)."""
        if self.loop is None or not isinstance(self.path, StackedPath):
            return None
        up = self.up

        def reverse(first, lam, total):
            return self.loop.reverse(self.path, up, upper_name, self.batches, first, lam, total)

        return reverse

    def taped_vjp(self, upper_name: str) -> Callable | None:
        """``v ↦ vᵀ dθ_K/dθ_U`` by one backward pass over the tape the block's forward updates
        recorded (``Runtime.tape``), or None when they recorded none for ``upper_name``."""
        if self.tape is None or upper_name not in self.tape:
            return None
        leaves, final = self.tape[upper_name], self.final
        several = len(self.tape) > 1  # the other uppers still need the tape

        def vjp(cotangent: dict) -> dict:
            pairs = [(final[n]["params"][k], c) for n, ct in cotangent.items() for k, c in ct.items()
                     if final[n]["params"][k].requires_grad]
            if not pairs:
                return {k: torch.zeros_like(v) for k, v in leaves.items()}
            grads = autodiff.tape_grads([o for o, _ in pairs], list(leaves.values()), [c for _, c in pairs],
                                    create_graph=False, retain_graph=several)
            return dict(zip(leaves, grads))

        return vjp

    def toward(self, upper_name: str) -> Trajectory:
        rt, level, up = self.runtime, self.level, self.up
        final_params = params_of(self.final)

        def advance(state, upper, k):
            return self.advance(state, {**up, upper_name: upper}, k)

        loss = rt.lower_loss(level, upper_name, up, final_params, self.last_batch)

        def update_map(own, upper):
            g = autodiff.grad(loss)(own, upper)
            reads = {**up, **final_params, level: own, upper_name: upper}
            new = rt.optimizers[level].update(own, g, self.final[level]["opt"], reads)[0]
            return rt.projections[level](new) if level in rt.projections else new

        def begin(upper):
            return self.start if self.begin is None else self.begin({**up, upper_name: upper})

        from_upper = rt.starts.get(level) == upper_name
        advance_vjp = None
        if self.update_vjp is not None:
            def advance_vjp(state, k, lam):
                return self.update_vjp(state, up, upper_name, k, lam)

        def report(key, value):
            if self.log is not None:
                self.log[f"{level}/{key}"] = value.detach() if isinstance(value, torch.Tensor) else value

        return Trajectory(level, self.steps, self.start, self.final, self.path, upper_name,
                          up[upper_name], advance, loss, update_map, begin, from_upper, report, advance_vjp,
                          self.taped_vjp(upper_name), self.reverse_vjp(upper_name))


def _mean_outputs(outs: list):
    """The mean of ``(loss, metrics)`` pairs (metrics that are not tensors: the last one's)."""
    n = len(outs)
    loss = sum(o[0] for o in outs) / n
    metrics = {k: (sum(o[1][k] for o in outs) / n if isinstance(v, torch.Tensor) else v)
               for k, v in outs[-1][1].items()}
    return loss, metrics


def clip_norm(grad: dict, max_norm: float) -> dict:
    """``grad`` scaled to norm at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule),
    differentiably, so an unrolled upper level sees the clipping."""
    norm = torch.sqrt(sum((g ** 2).sum() for g in grad.values()))
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * factor for k, g in grad.items()}


def params_of(state: dict) -> dict:
    """``{level: params}`` from a state ``{level: {"params", "opt"}}``."""
    return {name: s["params"] for name, s in state.items()}


def restrict(state: dict, names) -> dict:
    return {n: state[n] for n in names}


def outside(state: dict, up: dict, names) -> dict:
    """Parameters of every level seen from a block over ``names``: ``up`` plus the rest of ``state``."""
    return {**up, **{n: s["params"] for n, s in state.items() if n not in names}}


class MicroBatches(list):
    """The ``grad_accum`` micro-batches of one update: the level's loss is their mean."""


class Runtime:
    """Binds the program's traced losses, optimizers and methods for the generated step.

    Systems concerns are handed in, never branched on by the methods: ``autocast[level]()`` is the
    context a level's loss runs in (``mlodsl.precision``), ``loss_scales[level].scale`` the fp16
    loss scale of its gradients (read at every use: the Program backs it off between steps), ``reduce``/``replicate`` the data-parallel averages
    (``mlodsl.distributed``), ``clip[level]`` the maximum norm of its total gradient.
    """

    def __init__(self, traced: dict, optimizers: dict, methods: dict, starts: dict | None = None,
                 init_params: dict | None = None, projections: dict | None = None, *,
                 autocast: dict | None = None, loss_scales: dict | None = None, reduce: Callable | None = None,
                 replicate: Callable | None = None, clip: dict | None = None, compiler: Compiler | None = None,
                 second_order: set | None = None):
        self.traced, self.optimizers, self.methods = traced, optimizers, methods
        self.starts = starts or {}            # level -> None | "init" | upper level name
        self.init_params = init_params or {}  # level -> its initial parameters
        self.projections = projections or {}  # level -> params -> params, after each update
        self.autocast = autocast or {}        # level -> () -> context manager
        self.loss_scales = loss_scales or {}  # level -> LossScaler (fp16)
        self.reduce, self.replicate = reduce, replicate  # data parallel (None: one process)
        self.clip = clip or {}                # level -> max norm of its total gradient
        self.restrict, self.outside, self.params_of = restrict, outside, params_of
        self.buffer_state = None              # trace.BufferState: staged running statistics
        self.compiler = compiler or Compiler(None)  # compile=True: the step's compiled regions
        self.second_order = second_order or set()  # levels whose loss is differentiated twice (mlodsl.kernels)
        self._products: dict = {}             # (lower, upper) -> compiled region of a products_only vjp

    def region(self, name: str, what: str, fn: Callable, trailing: int = 0) -> Callable:
        """``fn`` as a compiled region of level ``name`` under ``compile=True`` (``mlodsl.compiled``)."""
        return self.compiler.region(name, what, fn, trailing)

    def update_vjp(self, name: str, update: Callable) -> Callable:
        """The VJP of one update of level ``name`` (a level with no lower levels), as a region:

            (S_k, up, U, batch, λ_{k+1}) ↦ (∂S_{k+1}/∂S_k ᵀ λ_{k+1},  ∂S_{k+1}/∂θ_U ᵀ λ_{k+1})

        over the floating leaves of the state S (parameters and optimizer state), for the upper
        level U whose parameters ``up[U]`` are. ``Unroll``'s reverse loop calls it once per update.
        """
        def vjp(sub, up, upper_name, batch, lam):
            return state_vjp(lambda s, upper: update(s, {**up, upper_name: upper}, batch, None)[0],
                             sub, up[upper_name], lam)

        return self.region(name, "update's VJP", vjp)

    def evaluate(self, name: str, params: dict, batch):
        """``(loss, metrics)`` of level ``name`` under its precision; the mean over micro-batches.
        A loss that is differentiated twice runs under attention kernels with a double backward."""
        if isinstance(batch, MicroBatches):
            return _mean_outputs([self.evaluate(name, params, b) for b in batch])
        if name in self.second_order:
            with attention_kernel():
                return self._evaluate(name, params, batch)
        return self._evaluate(name, params, batch)

    def _evaluate(self, name: str, params: dict, batch):
        ctx = self.autocast.get(name)
        if ctx is None:
            return split_output(name, self.traced[name](params, batch))
        with ctx():
            loss, metrics = split_output(name, self.traced[name](params, batch))
        return (loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss), metrics

    def partials(self, name: str, params: dict, batch, wrt: tuple, log=None):
        """Loss of level ``name`` and its partial gradients w.r.t. the levels in ``wrt``.

        Levels in ``wrt`` that the loss does not take get zero gradients. With ``log`` (the step's
        forward pass, not a re-evaluation), the level's buffers (running statistics) advance.
        """
        traced = self.traced[name]
        if log is not None and self.buffer_state is not None and getattr(traced, "buffers", None):
            with self.buffer_state.writing(name):
                return self.partials(name, params, batch, wrt)
        taken = {lvl for lvl, _ in traced.inputs.values()}
        diff = {w: params[w] for w in wrt if w in taken}
        scale = self.loss_scales[name].scale if name in self.loss_scales else None  # fp16: scale·loss

        def partials_at(mb):
            def loss_fn(diff_params):
                loss, metrics = self.evaluate(name, {**params, **diff_params}, mb)
                return (loss if scale is None else loss * scale), (loss, metrics)

            grads, (loss, metrics) = autodiff.grad_with_aux(loss_fn, diff)
            if scale is not None:
                grads = {w: {k: v / scale for k, v in g.items()} for w, g in grads.items()}
            return loss, metrics, grads

        if isinstance(batch, MicroBatches):  # grad_accum: one backward per micro-batch, averaged
            outs = [partials_at(mb) for mb in batch]
            (loss, metrics), n = _mean_outputs([o[:2] for o in outs]), len(outs)
            grads = {w: {k: sum(o[2][w][k] for o in outs) / n for k in diff[w]} for w in diff}
        else:
            loss, metrics, grads = partials_at(batch)
        lowers = [w for w in grads if w != name]
        if self.reduce is not None and lowers:  # data parallel: the cotangents a method is handed
            grads = {**grads, **self.reduce({w: grads[w] for w in lowers})}  # are the ranks' mean
        for w in wrt:
            if w not in grads:
                grads[w] = {k: torch.zeros_like(v) for k, v in params[w].items()}
        return loss, metrics, grads

    def apply_update(self, name: str, sub: dict, up: dict, grad: dict) -> dict:
        """One optimizer update of level ``name`` inside a block state."""
        if self.reduce is not None:  # data parallel: the ranks' mean, before clipping and the update
            grad = self.reduce(grad)
        if name in self.clip:
            grad = clip_norm(grad, self.clip[name])
        reads = {**up, **params_of(sub)}
        p, o = self.optimizers[name].update(sub[name]["params"], grad, sub[name]["opt"], reads)
        if name in self.projections:
            p = self.projections[name](p)
        return {**sub, name: {"params": p, "opt": o}}

    def tape(self, name: str, state: dict, up: dict, uppers: list) -> tuple:
        """Record the block of ``name`` on the autograd tape, when its method differentiates the
        forward updates themselves (``records_tape``: ``Unroll`` without checkpointing) and nothing
        else is being differentiated, traced or compiled: returns ``(up', leaves)`` where ``up'`` is
        ``up`` with the parameters of the ``uppers`` (the levels whose hypergradient goes through
        this block) replaced by fresh leaves that require grad, so that every update of the block
        is built with ``create_graph`` and one backward pass gives vᵀ dθ_K/dθ_U; else ``(up, None)``.

        The tape costs the activations of every update (what ``torch.autograd`` keeps) instead of
        one replay of every update in the reverse pass: one forward pass instead of two."""
        if (not getattr(self.methods[name], "records_tape", False) or self.compiler.compiles(name)
                or not autodiff.on_tape() or not is_plain((state, up))):
            return up, None
        leaves = {u: {k: v.detach().requires_grad_() for k, v in up[u].items()} for u in uppers if u in up}
        return {**up, **leaves}, leaves

    def tape_tasks(self, tasked: str, name: str, sub: dict, up: dict) -> dict | None:
        """Level ``name``'s parameters as fresh leaves that require grad, when its gradient through
        the tasks of ``tasked`` can be one backward pass over the vmapped tasks' mean loss: the
        tasked level's method records the tape (``Unroll``), nothing else is differentiating, and
        the gradient needs no fp16 loss scale or data-parallel average of cotangents. Else None."""
        if (not getattr(self.methods[tasked], "records_tape", False) or self.reduce is not None
                or name in self.loss_scales or not autodiff.on_tape() or not is_plain((sub, up))):
            return None
        return {k: v.detach().requires_grad_() for k, v in sub[name]["params"].items()}

    @staticmethod
    def tape_gradient(loss: torch.Tensor, leaves: dict) -> dict:
        """∇ loss in ``leaves``, by one backward pass over the tape."""
        return dict(zip(leaves, autodiff.tape_grads([loss], list(leaves.values()), None, create_graph=False)))

    @staticmethod
    def recording(tape):
        """The context the block's updates run in: while a tape is recorded, every product inside
        them is built with ``create_graph`` (even where its own inputs carry no graph yet, as at
        the first update), as for the updates an enclosing product differentiates."""
        return autodiff.evaluating() if tape is not None else contextlib.nullcontext()

    @staticmethod
    def untaped(state: dict, tape) -> dict:
        """The block's final state as the rest of the step sees it: values, off the tape."""
        return state if tape is None else detached(state)

    def begin(self, name: str, s: dict, up: dict) -> dict:
        """The state a block of ``name`` starts from: as it is (warm start), its initial values
        (``start_from="init"``), or the upper level's parameters (``start_from=<upper>``, MAML)."""
        how = self.starts.get(name)
        if how is None:
            return s
        params = (self.init_params[name] if how == "init"
                  else {k: up[how][k] for k in s[name]["params"]})
        return {**s, name: {"params": params, "opt": self.optimizers[name].init(params)}}

    def block(self, level, steps, start, final, path, up, advance, last_batch, begin=None, log=None,
              update_vjp=None, tape=None, loop=None, batches=None) -> BlockRecord:
        return BlockRecord(level, steps, start, final, path, up, advance, last_batch, self, begin, log, update_vjp,
                           tape, loop, batches)

    def best_response_vjp(self, lower: str, upper_name: str, record: BlockRecord, cotangent: dict) -> dict:
        """``vᵀ dθ_L/dθ_U`` of level ``lower`` through its block ``record`` toward ``upper_name``, by
        the lower level's method. A method whose ``vjp`` takes products of the lower loss alone
        (``products_only``) runs as one compiled region under ``compile=True``: its trajectory is
        rebuilt inside the region from plain tensors (final state, parameters, batch), and what it
        reports comes back as outputs for the log."""
        method = self.methods[lower]
        if not getattr(method, "products_only", False) or not self.compiler.compiles(lower):
            return method.vjp(record.toward(upper_name), cotangent)
        key = (lower, upper_name)
        if key not in self._products:
            def products(final, up, batch, cotangent_):
                reports = {}
                traj = self._products_trajectory(lower, upper_name, final, up, batch, reports)
                return method.vjp(traj, cotangent_), reports

            self._products[key] = self.region(lower, f"hypergradient products toward '{upper_name}'", products)
        g, reports = self._products[key](record.final, record.up, record.last_batch, cotangent)
        if record.log is not None:
            for k, v in reports.items():
                record.log[f"{lower}/{k}"] = v.detach() if isinstance(v, torch.Tensor) else v
        return g

    def lower_loss(self, level: str, upper_name: str, up: dict, final_params: dict, batch) -> Callable:
        """``(own, upper) ↦`` level ``level``'s loss on ``batch`` as a function of its own parameters
        and those of ``upper_name``, every other level held at ``up`` / ``final_params``: the L of a
        trajectory, whose products the hypergradient methods take."""
        def loss(own, upper):
            if self.replicate is not None:  # data parallel: every product of this loss is the ranks' mean
                both = self.replicate({level: own, upper_name: upper})
                own, upper = both[level], both[upper_name]
            return self.evaluate(level, {**up, **final_params, level: own, upper_name: upper}, batch)[0]

        return loss

    def _products_trajectory(self, lower, upper_name, final, up, batch, reports) -> Trajectory:
        """The part of a ``Trajectory`` that a ``products_only`` method uses, from plain values."""
        loss = self.lower_loss(lower, upper_name, up, params_of(final), batch)

        def unavailable(*args):
            raise LevelError(f"level '{lower}': a products_only method used more of its trajectory than "
                             f"the loss at the block's end")

        return Trajectory(lower, 0, final, final, None, upper_name, up[upper_name], unavailable, loss,
                          unavailable, unavailable, False, reports.__setitem__)

    def update_loop(self, name: str, update: Callable) -> UpdateLoop:
        """The K updates of level ``name`` (a level with no lower levels) as one compiled region."""
        return UpdateLoop(self.compiler, name, update)

    def run_loop(self, loop: UpdateLoop, sub: dict, up: dict, batches: list, keep_path: bool, log):
        """``(S_K, path)`` from the compiled loop, its losses and norms logged; None where the
        generated Python loop must run instead (``UpdateLoop.run``)."""
        out = loop.run(sub, up, batches, keep_path)
        if out is None:
            return None
        final, path, losses, norms, metrics = out
        if log is not None:
            self.record(log, loop.name, losses[-1], metrics, norms[-1])
            log["_finite"][loop.name][-1] = losses + norms  # every update's health, not the last's alone
        return final, path

    @staticmethod
    def new_log() -> dict:
        return {"_finite": {}}

    @staticmethod
    def grad_norm(grad: dict) -> torch.Tensor:
        """The norm of a gradient (detached): a NaN or Inf anywhere in it makes the norm non-finite."""
        if len(grad) == 1:
            return torch.linalg.vector_norm(next(iter(grad.values())).detach())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grad.values()]))

    @staticmethod
    def record(log, name, loss, metrics, norm):
        """Write a level's loss, metrics and gradient norm to the log (outside of transforms only)."""
        if log is None:
            return
        # Checked once at the end of the step (``finite``): one reduction per level, not per update.
        log["_finite"].setdefault(name, []).append(loss.detach() + norm)
        log[name] = loss.detach()
        log[f"{name}/grad_norm"] = norm
        for k, v in metrics.items():
            log[f"{name}/{k}"] = v.detach() if isinstance(v, torch.Tensor) else v

    @staticmethod
    def finite(log) -> dict:
        """``{level: True when every loss and gradient it logged in the step was finite}``; pops them."""
        return {n: bool(torch.isfinite(torch.cat([x.reshape(-1) for x in v])).all())
                for n, v in log.pop("_finite").items()}

    @staticmethod
    def mean_over_tasks(g: dict) -> dict:
        return {k: v.mean(0) for k, v in g.items()}

    @staticmethod
    def add(a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}
