"""The helpers the generated step calls: evaluating a level's loss and its partial derivatives,
applying an optimizer update, recording metrics, and packaging a block's trajectory.

Everything here is a pure function of tensors (the log is written only outside of transforms), so
the generated step stays differentiable and traceable.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from . import autodiff
from .compiled import Compiler, is_plain
from .hypergrad.base import DivergenceError, DivergenceWarning, Trajectory, state_vjp
from .hypergrad.implicit import ConvergenceWarning
from .kernels import attention_kernel
from .loops import StackedPath, UpdateLoop
from .sharding import plain, plain_tree
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
            new = rt.optimizers[level].update(own, rt.mark_absent(level, g), self.final[level]["opt"], reads)[0]
            return rt.projections[level](new) if level in rt.projections else new

        def begin(upper):
            return self.start if self.begin is None else self.begin({**up, upper_name: upper})

        from_upper = rt.starts.get(level) == upper_name
        advance_vjp = None
        if self.update_vjp is not None:
            def advance_vjp(state, k, lam):
                return self.update_vjp(state, up, upper_name, k, lam)

        def report(key, value):
            Runtime.report(self.log, level, key, value)

        update_split = None
        if self.batches is not None:  # a level with no lower levels: its k-th update's batch is known
            def update_split(k):
                return rt.update_split(level, up, upper_name, self.batches[k])

        return Trajectory(level, self.steps, self.start, self.final, self.path, upper_name,
                          up[upper_name], advance, rt.minimized(level, loss), update_map, begin, from_upper,
                          report, advance_vjp,
                          self.taped_vjp(upper_name), self.reverse_vjp(upper_name), update_split)


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


_RANDOM_PREFIXES = ("rand", "bernoulli", "normal_", "multinomial", "poisson", "uniform_", "exponential_",
                    "cauchy_", "geometric_", "log_normal_", "random_", "rrelu")


def draws_random(traced) -> bool | None:
    """Whether a level's loss draws random numbers (dropout, ``torch.rand``...): an fx node of a
    random op; None for an opaque level, whose graph cannot be read (``Runtime.seeded`` runs it once)."""
    if getattr(traced, "opaque", True):
        return None
    for node in traced.graph.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = str(getattr(node.target, "__name__", node.target)).lower()
            if "dropout" in name and _dropout_is_identity(node):
                continue
            if "dropout" in name or name == "normal" or name.startswith(_RANDOM_PREFIXES):
                return True
    return False


def _dropout_is_identity(node) -> bool:
    """A dropout node whose probability is the constant 0, or whose training flag is the constant
    False (``F.dropout(x, p, training)``, ``aten.dropout(x, p, train)``): it draws nothing. Models
    configured without dropout (``dropout=0.0``, Hugging Face's ``*_dropout_prob=0``) keep such
    calls; seeding their updates would cost a generator fork per evaluation for nothing."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    train = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return (isinstance(p, (int, float)) and p == 0) or train is False


class _RandomOps(TorchDispatchMode):
    """Notes whether any operation that runs under it draws from a generator."""

    found = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.found = self.found or torch.Tag.nondeterministic_seeded in func.tags
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class SeededBatch:
    """One update's batch with the seed of its random draws: every evaluation of that update's loss
    (the update itself, Unroll's replays of it, a finite difference's two sides, an implicit
    method's products at the block's end) sees the same dropout masks."""

    batch: object
    seed: int


@contextlib.contextmanager
def fixed_rng(seed: int):
    """torch's generators seeded with ``seed`` inside, as they were outside (``fork_rng``)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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


def _levels_taken(traced) -> frozenset:
    """The levels whose parameters a traced loss takes (``TracedLevel.levels``, read once)."""
    levels = getattr(traced, "levels", None)
    return levels if levels is not None else frozenset(lvl for lvl, _ in traced.inputs.values())


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


class TaskLog(dict):
    """The log of one task's evaluation under ``vmap`` (``tasks=True``). Nothing can be written
    from inside the transform to a log outside it, so a task's method diagnostics (a CG residual)
    and loss health come back as outputs of the vmapped function (``task_outcome``) and are merged
    into the step's log (``merge_task_outcomes``); running statistics are not staged from it."""


class Runtime:
    """Binds the program's traced losses, optimizers and methods for the generated step.

    Systems concerns are handed in, never branched on by the methods: ``autocast[level]()`` is the
    context a level's loss runs in (``mlodsl.precision``), ``loss_scales[level].scale`` the fp16
    loss scale of its gradients (read at every use: the Program backs it off between steps),
    ``reduce``/``replicate`` the data-parallel averages (``mlodsl.distributed``), ``clip[level]``
    the maximum norm of its total gradient.
    """

    def __init__(self, traced: dict, optimizers: dict, methods: dict, starts: dict | None = None,
                 init_params: dict | None = None, projections: dict | None = None, *,
                 autocast: dict | None = None, loss_scales: dict | None = None, reduce: Callable | None = None,
                 replicate: Callable | None = None, clip: dict | None = None, compiler: Compiler | None = None,
                 weigh: Callable | None = None, lowers: dict | None = None, second_order: set | None = None,
                 gather: Callable | None = None):
        self.traced, self.optimizers, self.methods = traced, optimizers, methods
        self.starts = starts or {}            # level -> None | "init" | upper level name
        self.init_params = init_params or {}  # level -> its initial parameters
        self.projections = projections or {}  # level -> params -> params, after each update
        self.autocast = autocast or {}        # level -> () -> context manager
        self.loss_scales = loss_scales or {}  # level -> LossScaler (fp16)
        self.reduce, self.replicate = reduce, replicate  # data parallel (None: one process)
        self.weigh = weigh                    # data parallel: (level, loss, batch) -> this rank's share of the mean
        self.gather = gather                  # sharded levels: params -> full params, just before a loss runs
        self.clip = clip or {}                # level -> max norm of its total gradient
        self.restrict, self.outside, self.params_of = restrict, outside, params_of
        self.buffer_state = None              # trace.BufferState: staged running statistics
        self.compiler = compiler or Compiler(None)  # compile=True: the step's compiled regions
        self.second_order = second_order or set()  # levels whose loss is differentiated twice (mlodsl.kernels)
        self._products: dict = {}             # (lower, upper) -> compiled region of a products_only vjp
        self.warned_unconverged: set = set()  # levels whose method's solve has been said not to converge
        # level -> parameters no loss it is differentiated through reaches: their gradient is absent
        # (None to the optimizer, as torch.optim's p.grad), so decay and moments leave them alone
        self.absent = absent_params(traced, lowers, optimizers, self.starts) if lowers is not None else {}
        # lower level -> whether its loss draws random numbers (then each of its updates gets a seed
        # per step); None until an opaque level's loss has run once (``seeded``)
        self.stochastic = {n: draws_random(traced[n]) for n in methods}

    def region(self, name: str, what: str, fn: Callable, trailing: int = 0) -> Callable:
        """``fn`` as a compiled region of level ``name`` under ``compile=True`` (``mlodsl.compiled``);
        the update of a level solved by ``ml.optim.solver`` runs eagerly (the user's solver is any
        Python: its own loops, ``no_grad``, ``torch.optim.LBFGS``)."""
        if what == "update" and self.optimizers[name].solves:
            return fn
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

    def update_split(self, name: str, up: dict, upper_name: str, batch) -> tuple:
        """One update of level ``name`` (a level with no lower levels) on ``batch``, split at its
        gradient: ``(losses, scale, apply)`` where the gradient is ``g = Σ_m ∇_θ losses[m](θ, θ_U) / scale``
        (one loss per micro-batch, each weighted 1/count, times the fp16 loss scale; this rank's own,
        as ``partials`` computes it) and ``apply(S, θ_U, g)`` is the rest of the update (data-parallel
        mean, clipping, optimizer, projection), so that the update is ``apply(S, θ_U, g(S, θ_U))``."""
        scale = self.loss_scales[name].scale if name in self.loss_scales else 1.0
        parts = list(batch) if isinstance(batch, MicroBatches) else [batch]

        def loss_on(mb):
            def loss(own, upper):
                params = {**up, upper_name: upper, name: own}
                return self.evaluate(name, params, mb)[0] * (scale / len(parts))
            return loss

        def apply(sub, upper, grad):
            return self.apply_update(name, sub, {**up, upper_name: upper}, grad, batch)

        return [loss_on(mb) for mb in parts], scale, apply

    def seeded(self, state: dict, B: dict, exclude=()) -> dict:
        """The step's batches with a seed for each update of a lower level whose loss draws random
        numbers (``SeededBatch``), drawn here from torch's generator: that update's loss is evaluated
        under that seed every time (a finite difference's two sides, every replay) and so sees the
        same dropout mask. ``exclude``: levels batched over tasks (``vmap`` draws their masks)."""
        for n, random in self.stochastic.items():
            if random is None and n not in exclude and n in B:  # an opaque level: run it once and see
                self.stochastic[n] = self._draws_random_when_run(n, state, B[n][0])
        levels = [n for n, random in self.stochastic.items() if random and n not in exclude and n in B]
        if not levels:
            return B
        sizes = {n: sum(len(b) if isinstance(b, MicroBatches) else 1 for b in B[n]) for n in levels}
        seeds = iter(torch.randint(0, 2 ** 62, (sum(sizes.values()),)).tolist())  # one draw for the step
        out = dict(B)
        for n in levels:
            out[n] = [MicroBatches(SeededBatch(mb, next(seeds)) for mb in b) if isinstance(b, MicroBatches)
                      else SeededBatch(b, next(seeds)) for b in B[n]]
        return out

    def _draws_random_when_run(self, name: str, state: dict, batch) -> bool:
        """Whether level ``name``'s loss draws random numbers, seen by evaluating it once (the
        generators as they were afterwards); True where the evaluation fails here."""
        params = {n: s["params"] for n, s in state.items()}
        try:
            with fixed_rng(0), torch.no_grad(), _RandomOps() as mode:
                self.evaluate(name, params, batch[0] if isinstance(batch, MicroBatches) else batch)
        except Exception:  # noqa: BLE001 - the step itself will report it; seeding is then harmless
            return True
        return mode.found

    def evaluate(self, name: str, params: dict, batch):
        """``(loss, metrics)`` of level ``name`` under its precision; the mean over micro-batches.
        A loss that is differentiated twice runs under attention kernels with a double backward."""
        kind = type(batch)
        if kind is SeededBatch:  # the same random draws at every evaluation of one update
            with fixed_rng(batch.seed):
                return self.evaluate(name, params, batch.batch)
        if kind is MicroBatches:
            return _mean_outputs([self.evaluate(name, params, b) for b in batch])
        if name in self.second_order and getattr(self.traced[name], "attends", True):
            with attention_kernel():
                return self._evaluate(name, params, batch)
        return self._evaluate(name, params, batch)

    def _evaluate(self, name: str, params: dict, batch):
        if self.gather is not None:  # sharded levels: all-gathered here, freed with this evaluation
            params = self.gather(params)
        ctx = self.autocast.get(name) if self.autocast else None
        if ctx is None:
            out = self.traced[name](params, batch)
        else:
            with ctx():
                out = self.traced[name](params, batch)
        if type(out) is torch.Tensor and out.dim() == 0:  # a plain loss (split_output's common case)
            loss, metrics = out, {}
        else:
            loss, metrics = split_output(name, out)
        if ctx is not None and loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        if self.weigh is not None:  # unequal shards: the ranks' mean is then the union's mean loss
            loss = self.weigh(name, loss, batch)
        return loss, metrics

    def partials(self, name: str, params: dict, batch, wrt: tuple, log=None):
        """Loss of level ``name`` and its partial gradients w.r.t. the levels in ``wrt``.

        Levels in ``wrt`` that the loss does not take get zero gradients. With ``log`` (the step's
        forward pass, not a re-evaluation), the level's buffers (running statistics) advance.
        """
        traced = self.traced[name]
        if (log is not None and getattr(traced, "buffers", None) and self.buffer_state is not None
                and not isinstance(log, TaskLog)):
            with self.buffer_state.writing(name):
                return self.partials(name, params, batch, wrt)
        taken = _levels_taken(traced)
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
        if self.reduce is not None:  # data parallel: the cotangents a method is handed are the ranks' mean
            lowers = [w for w in grads if w != name]
            if lowers:
                grads = {**grads, **self.reduce({w: grads[w] for w in lowers})}
        if len(grads) < len(wrt):
            for w in wrt:
                if w not in grads:
                    grads[w] = {k: torch.zeros_like(v) for k, v in params[w].items()}
        return loss, metrics, grads

    def apply_update(self, name: str, sub: dict, up: dict, grad: dict, batch=None) -> dict:
        """One optimizer update of level ``name`` inside a block state (``batch``: the update's,
        handed to a solver, ``ml.optim.solver``)."""
        if self.reduce is not None:  # data parallel: the ranks' mean, before clipping and the update
            grad = self.reduce(grad)
        if name in self.clip:
            grad = clip_norm(grad, self.clip[name])
        reads = {**up, **params_of(sub)}
        optimizer = self.optimizers[name]
        extra = {"batch": batch.batch if isinstance(batch, SeededBatch) else batch} if optimizer.solves else {}
        try:
            p, o = optimizer.update(sub[name]["params"], self.mark_absent(name, grad), sub[name]["opt"], reads,
                                    **extra)
        except (TypeError, FloatingPointError) as error:
            if not optimizer.solves:
                raise
            raise type(error)(f"level '{name}': {error}") from error  # the solver's message, with its level
        if name in self.projections:
            p = self.projections[name](p)
        return {**sub, name: {"params": p, "opt": o}}

    def mark_absent(self, name: str, grad: dict) -> dict:
        """``grad`` with None for the parameters of ``name`` that no loss reaches (``absent``), for
        an optimizer that takes None there (the built-ins: they leave those parameters alone)."""
        absent = self.absent.get(name)
        if not absent or not self.optimizers[name].absent_grads:
            return grad
        return {k: None if k in absent else g for k, g in grad.items()}

    def tape(self, name: str, state: dict, up: dict, uppers: list) -> tuple:
        """Record the block of ``name`` on the autograd tape, when its method differentiates the
        forward updates themselves (``records_tape``: ``Unroll`` without checkpointing) and nothing
        else is being differentiated, traced or compiled: returns ``(up', leaves)`` where ``up'`` is
        ``up`` with the parameters of the ``uppers`` (the levels whose hypergradient goes through
        this block) replaced by fresh leaves that require grad, so that every update of the block
        is built with ``create_graph`` and one backward pass gives vᵀ dθ_K/dθ_U; else ``(up, None)``.

        The tape costs the activations of every update (what ``torch.autograd`` keeps) instead of
        one replay of every update in the reverse pass: one forward pass instead of two."""
        if (not uppers or not self.methods[name].records_tape or self.compiler.compiles(name)
                or not autodiff.on_tape() or not is_plain((state, up))):
            return up, None
        leaves = {u: {k: v.detach().requires_grad_() for k, v in up[u].items()} for u in uppers if u in up}
        return {**up, **leaves}, leaves

    def tape_tasks(self, tasked: str, name: str, sub: dict, up: dict) -> dict | None:
        """Level ``name``'s parameters as fresh leaves that require grad, when its gradient through
        the tasks of ``tasked`` can be one backward pass over the vmapped tasks' mean loss: the
        tasked level's method records the tape (``Unroll``), nothing else is differentiating, and
        the gradient needs no fp16 loss scale or data-parallel average of cotangents. Else None."""
        if (not self.methods[tasked].records_tape or self.reduce is not None
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
        if not method.products_only or not self.compiler.compiles(lower):
            # a sharded lower level's scalars (norms, dot products) are DTensors: the upper's is plain
            return plain_tree(method.vjp(record.toward(upper_name), cotangent))
        key = (lower, upper_name)
        if key not in self._products:
            def products(final, up, batch, cotangent_):
                reports = {}
                traj = self._products_trajectory(lower, upper_name, final, up, batch, reports)
                return method.vjp(traj, cotangent_), reports

            self._products[key] = self.region(lower, f"hypergradient products toward '{upper_name}'", products)
        g, reports = self._products[key](record.final, record.up, record.last_batch, cotangent)
        for k, v in reports.items():
            self.report(record.log, lower, k, v)
        return g

    @staticmethod
    def group_vjp(name: str, run: Callable, sub: dict, cotangent: dict) -> dict:
        """``vᵀ dθ/dθ_X`` of the blocks of one update of level ``name`` that share a level, unrolled
        together: ``run`` maps X's block state to the state after those blocks (``group_X``), ``sub``
        is the state they started from, ``cotangent`` maps levels to cotangents on their final
        parameters. One re-run of the blocks, differentiated in X's parameters."""
        def final(params):
            after = run({**sub, name: {**sub[name], "params": params}})
            return {n: after[n]["params"] for n in cotangent}

        (g,), _ = autodiff.vjp(final, (sub[name]["params"],), cotangent)
        return g

    def lower_loss(self, level: str, upper_name: str, up: dict, final_params: dict, batch) -> Callable:
        """``(own, upper) ↦`` level ``level``'s loss on ``batch`` as a function of its own parameters
        and those of ``upper_name``, every other level held at ``up`` / ``final_params``: the L of a
        trajectory, whose products the hypergradient methods take (``minimized``)."""
        def loss(own, upper):
            if self.replicate is not None:  # data parallel: every product of this loss is the ranks' mean
                both = self.replicate({level: own, upper_name: upper})
                own, upper = both[level], both[upper_name]
            return self.evaluate(level, {**up, **final_params, level: own, upper_name: upper}, batch)[0]

        return loss

    def minimized(self, level: str, loss: Callable) -> Callable:
        """The objective level ``level`` minimizes: ``loss``, negated when its optimizer maximizes.
        A trajectory's L is this, so that at a maximum the implicit methods see a positive definite
        Hessian, as the Neumann series, CG's damping and FiniteDiff's H⁻¹ ≈ I assume;
        the exact implicit formula is unchanged by the sign."""
        if not self.optimizers[level].maximize:
            return loss
        return lambda own, upper: -loss(own, upper)

    def _products_trajectory(self, lower, upper_name, final, up, batch, reports) -> Trajectory:
        """The part of a ``Trajectory`` that a ``products_only`` method uses, from plain values."""
        loss = self.minimized(lower, self.lower_loss(lower, upper_name, up, params_of(final), batch))

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
        generated Python loop must run instead (``UpdateLoop.run``, and a level solved by
        ``ml.optim.solver``: a solver's own loops and ``no_grad`` do not fit in the loop's region)."""
        if self.optimizers[loop.name].solves:
            return None
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
        return {"_finite": {}, "_reports": {}}

    @staticmethod
    def task_log() -> TaskLog:
        return TaskLog(_finite={}, _reports={})

    @staticmethod
    def task_outcome(log: TaskLog) -> dict:
        """What one task's evaluation reported, as tensors (an output of the vmapped function)."""
        return {"_finite": log["_finite"],
                "_reports": {lvl: {k: [torch.as_tensor(v) for v in vs] for k, vs in keys.items()}
                             for lvl, keys in log["_reports"].items()}}

    @staticmethod
    def merge_task_outcomes(log, outcomes: dict):
        """Every task's reports and loss health (stacked over tasks by ``vmap``) into the step's
        log: a diagnostic is the worst over the tasks, so one task's diverged solve is caught."""
        if log is None:
            return
        for name, values in outcomes["_finite"].items():
            log["_finite"].setdefault(name, []).extend(values)
        for level, keys in outcomes["_reports"].items():
            for key, values in keys.items():
                for value in values:
                    Runtime.report(log, level, key, value.max())

    @staticmethod
    def report(log, level: str, key: str, value):
        """A method's diagnostic (a CG residual) as the level's metric; every value of the step is
        kept for ``check_divergence`` (a block may run several times a step; the metric is the last)."""
        if log is None:
            return
        value = plain(value.detach()) if isinstance(value, torch.Tensor) else value
        log[f"{level}/{key}"] = value
        log.setdefault("_reports", {}).setdefault(level, {}).setdefault(key, []).append(value)

    def check_divergence(self, reports: dict):
        """Raise ``DivergenceError`` (or warn, for a method with ``on_divergence="warn"``) when a
        method's diagnostics in this step say its solve diverged (the method's ``diverged``). Runs
        after the step, outside every transform and before anything is committed."""
        for level, values in reports.items():
            method = self.methods.get(level)
            if method is None:
                continue
            # every diagnostic is "larger is worse"; a few scalars per step (one per hypergradient)
            worst = {k: max(float(v) for v in vs) for k, vs in values.items()}
            problem = method.diverged(worst)
            if problem is None:
                self.warn_unconverged(level, method, worst)
                continue
            message = f"level '{level}': the hypergradient by {method!r} {problem}."
            if method.on_divergence == "warn":
                warnings.warn(message + " The step is taken all the same (on_divergence='warn').",
                              DivergenceWarning, stacklevel=4)
            else:
                raise DivergenceError(message + " The program's parameters and optimizer states are unchanged "
                                      "(on_divergence='warn' on the method warns and goes on instead).")

    def warn_unconverged(self, level: str, method, worst: dict):
        """Warn, once per level, when the method's solve stopped short of converging (its
        ``unconverged(diagnostics)``, optional: ``CG``'s residual above ``warn_residual``)."""
        if level in self.warned_unconverged:
            return
        note = method.unconverged(worst)
        if note is not None:
            self.warned_unconverged.add(level)
            warnings.warn(f"level '{level}': the hypergradient by {method!r} {note}. The step is taken; "
                          f"this warning is given once for this level (the residual is its metric "
                          f"'{level}/cg_residual' in the history).", ConvergenceWarning, stacklevel=5)

    @staticmethod
    def grad_norm(grad: dict) -> torch.Tensor:
        """The norm of a gradient (detached): a NaN or Inf anywhere in it makes the norm non-finite."""
        if len(grad) == 1:
            return plain(torch.linalg.vector_norm(next(iter(grad.values())).detach()))
        norms = [plain(torch.linalg.vector_norm(g.detach())) for g in grad.values()]  # a slice's: all-reduced
        return torch.linalg.vector_norm(torch.stack(norms))

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

    def finite(self, log) -> dict:
        """``{level: True when every loss and gradient it logged in the step was finite}``; pops them.
        First raises ``DivergenceError`` when a hypergradient solve in the step diverged (not in an
        fp16 step that overflowed: the Program skips that one and backs its loss scale off)."""
        finite = {n: bool(torch.isfinite(torch.cat([x.reshape(-1) for x in v])).all())
                  for n, v in log.pop("_finite").items()}
        reports = log.pop("_reports", {})
        if all(finite.values()) or not self.loss_scales:
            self.check_divergence(reports)
        return finite

    @staticmethod
    def mean_over_tasks(g: dict) -> dict:
        return {k: v.mean(0) for k, v in g.items()}

    @staticmethod
    def add(a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}
