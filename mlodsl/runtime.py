"""The runtime the generated step calls: evaluating a level's loss and its partial derivatives,
applying an optimizer update, and handing a lower level's block to its hypergradient method.

Everything here is a pure function of tensors, so the generated step stays differentiable and
traceable. The step's other helpers live in modules of their own and are bound here under the
names the generated code uses (``rt.record``, ``rt.tape_vjp``, ``rt.restrict``...): the log
(``steplog``), the tape and block records (``records``), random seeds (``randomness``), the state's
dict operations (``states``), and which parameters a loss reaches (``reach``).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import autodiff, records, states, steplog
from .compiled import Compiler, is_plain
from .data import MicroBatches
from .hypergrad.base import Solution, Trajectory, state_vjp
from .kernels import attention_kernel, may_run_attention
from .loops import UpdateLoop
from .randomness import Seeds, SeededBatch, draws_random, fixed_rng
from .reach import absent_params
from .records import BlockRecord
from .sharding import plain_tree
from .states import params_of


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


def _loss_and_metrics(name: str, out) -> tuple:
    """``split_output``, with its common case (a plain scalar loss) first."""
    if type(out) is torch.Tensor and out.dim() == 0:
        return out, {}
    return split_output(name, out)


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


def _traced_loss(params: dict, name: str, traced, batch) -> tuple:
    """``(loss, metrics)`` of level ``name`` by its traced graph alone (``_loss_and_metrics`` of it)."""
    out = traced(params, batch)
    if type(out) is torch.Tensor and out.dim() == 0:  # the common case, inline: it runs every update
        return out, {}
    return split_output(name, out)


def _levels_taken(traced) -> frozenset:
    """The levels whose parameters a traced loss takes (``TracedLevel.levels``, read once)."""
    levels = getattr(traced, "levels", None)
    return levels if levels is not None else frozenset(lvl for lvl, _ in traced.inputs.values())


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
                 weigh: Callable | None = None, lowers: dict | None = None, second_order: set | None = None):
        self.traced, self.optimizers, self.methods = traced, optimizers, methods
        self.starts = starts or {}            # level -> None | "init" | upper level name
        self.init_params = init_params or {}  # level -> its initial parameters
        self.projections = projections or {}  # level -> params -> params, after each update
        self.autocast = autocast or {}        # level -> () -> context manager
        self.loss_scales = loss_scales or {}  # level -> LossScaler (fp16)
        self.reduce, self.replicate = reduce, replicate  # data parallel (None: one process)
        self.weigh = weigh                    # data parallel: (level, loss, batch) -> this rank's share of the mean
        self.clip = clip or {}                # level -> max norm of its total gradient
        self.buffer_state = None              # trace.BufferState: staged running statistics
        self.compiler = compiler or Compiler(None)  # compile=True: the step's compiled regions
        self.second_order = second_order or set()  # levels whose loss is differentiated twice (mlodsl.kernels)
        # of those, the levels whose loss may call attention: evaluated under the math kernel
        self.math_attention = {n for n in self.second_order if may_run_attention(traced[n])}
        # levels whose loss is their traced graph alone, taking their own parameters: no running
        # statistics, precision, fp16 loss scale, data-parallel weight (every distributed program, a
        # sharded one too: its traced graphs gather their slices themselves) or attention kernel
        # around it (``gradient`` differentiates them by a direct path)
        # (level -> whether its function may take products of its own: an opaque one)
        self.direct = {n: getattr(t, "opaque", True) for n, t in traced.items()
                       if not getattr(t, "buffers", None) and n not in self.loss_scales and n not in self.autocast
                       and n not in self.math_attention and weigh is None
                       and n in _levels_taken(t)}
        self._products: dict = {}             # (lower, upper) -> compiled region of a products_only vjp
        self.health = steplog.StepHealth(methods, self.loss_scales)  # the checks of a step's log
        # level -> parameters no loss it is differentiated through reaches: their gradient is absent
        # (None to the optimizer, as torch.optim's p.grad), so decay and moments leave them alone
        self.absent = absent_params(traced, lowers, optimizers, self.starts) if lowers is not None else {}
        # lower level -> whether its loss draws random numbers (then each of its updates gets a seed
        # per step); None until an opaque level's loss has run once (``seeded``)
        self.stochastic = {n: draws_random(traced[n]) for n in methods}
        self.seeds = Seeds(self.stochastic, self.evaluate)
        self.seeded = self.seeds.seeded

    # The step's helpers that need nothing of the runtime, under the names the generated code uses.
    restrict, outside, params_of = map(staticmethod, (states.restrict, states.outside, states.params_of))
    add, mean_over_tasks = map(staticmethod, (states.add, states.mean_over_tasks))
    new_log, task_log, task_outcome = map(staticmethod, (steplog.new_log, steplog.task_log, steplog.task_outcome))
    merge_task_outcomes, report, report_info = map(staticmethod, (steplog.merge_task_outcomes, steplog.report,
                                                                  steplog.report_info))
    record, record_block, grad_norm = map(staticmethod, (steplog.record, steplog.record_block, steplog.grad_norm))
    tape_gradient, tape_vjp = map(staticmethod, (records.tape_gradient, records.tape_vjp))
    recording, untaped = map(staticmethod, (records.recording, records.untaped))

    def finite(self, log) -> dict:
        """``StepHealth.finite``: whether every loss and gradient of the step was finite, by level."""
        return self.health.finite(log)

    def check_divergence(self, reports: dict):
        """``StepHealth.check_divergence``."""
        self.health.check_divergence(reports)

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

    def evaluate(self, name: str, params: dict, batch):
        """``(loss, metrics)`` of level ``name`` under its precision; the mean over micro-batches.
        A loss that is differentiated twice runs under attention kernels with a double backward."""
        kind = type(batch)
        if kind is SeededBatch:  # the same random draws at every evaluation of one update
            with fixed_rng(batch.seed):
                return self.evaluate(name, params, batch.batch)
        if kind is MicroBatches:
            return _mean_outputs([self.evaluate(name, params, b) for b in batch])
        if name in self.math_attention:
            with attention_kernel():
                return self._evaluate(name, params, batch)
        return self._evaluate(name, params, batch)

    def _evaluate(self, name: str, params: dict, batch):
        ctx = self.autocast.get(name) if self.autocast else None
        if ctx is None:
            out = self.traced[name](params, batch)
        else:
            with ctx():
                out = self.traced[name](params, batch)
        loss, metrics = _loss_and_metrics(name, out)
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
                and not isinstance(log, steplog.TaskLog)):
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

    def gradient(self, name: str, params: dict, batch, log=None) -> tuple:
        """``(loss, metrics, gradient)``: level ``name``'s loss on ``batch`` and its gradient in the
        level's own parameters, as ``partials(name, params, batch, (name,), log)`` gives them. The
        update of every level takes one; for a level whose loss is its traced graph alone
        (``direct``), on a plain batch and on the tape, it is taken by a direct path
        (``autodiff.tape_level_grad``)."""
        marks = self.direct.get(name)
        kind = type(batch)
        if marks is not None and kind is not SeededBatch and kind is not MicroBatches and autodiff.on_tape():
            grad, loss, metrics = autodiff.tape_level_grad(_traced_loss, marks, params, name,
                                                           name, self.traced[name], batch)
            return loss, metrics, grad
        loss, metrics, grads = self.partials(name, params, batch, (name,), log)
        return loss, metrics, grads[name]

    def apply_update(self, name: str, sub: dict, up: dict, grad: dict, batch=None) -> dict:
        """One optimizer update of level ``name`` inside a block state (``batch``: the update's,
        handed to a solver, ``ml.optim.solver``)."""
        if self.reduce is not None:  # data parallel: the ranks' mean, before clipping and the update
            grad = self.reduce(grad)
        if name in self.clip:
            grad = clip_norm(grad, self.clip[name])
        reads = {**up, **params_of(sub)}
        optimizer, own = self.optimizers[name], sub[name]
        if optimizer.solves:
            p, o = self._solve(name, own, grad, reads, batch)
        else:
            p, o = optimizer.update(own["params"], self.mark_absent(name, grad), own["opt"], reads)
        if name in self.projections:
            p = self.projections[name](p)
        return {**sub, name: {"params": p, "opt": o}}

    def apply_uncounted(self, name: str, sub: dict, up: dict, grad: dict) -> dict:
        """``apply_update`` in a block whose update count moves once, at its end (``count``;
        ``LevelPlan.counted_at_end``: nothing reduces, clips or projects its gradient there): the
        optimizer's update without its count (``Optimizer.uncounted``)."""
        optimizer, own = self.optimizers[name], sub[name]
        reads = {**up, **params_of(sub)} if optimizer.reads else None
        if name in self.absent:
            grad = self.mark_absent(name, grad)
        p, o = optimizer.uncounted(own["params"], grad, own["opt"], reads)
        return {**sub, name: {"params": p, "opt": o}}

    @staticmethod
    def count(sub: dict, name: str, updates: int) -> dict:
        """The block state ``sub`` with level ``name``'s update count advanced by ``updates``."""
        own = sub[name]
        return {**sub, name: {**own, "opt": {**own["opt"], "count": own["opt"]["count"] + updates}}}

    def _solve(self, name: str, own: dict, grad: dict, reads: dict, batch) -> tuple:
        """The update of a level solved by ``ml.optim.solver``: its solver's solution on ``batch``."""
        batch = batch.batch if isinstance(batch, SeededBatch) else batch
        try:
            return self.optimizers[name].update(own["params"], self.mark_absent(name, grad), own["opt"], reads,
                                                batch=batch)
        except (TypeError, FloatingPointError) as error:
            raise type(error)(f"level '{name}': {error}") from error  # the solver's message, with its level

    def mark_absent(self, name: str, grad: dict) -> dict:
        """``grad`` with None for the parameters of ``name`` that no loss reaches (``absent``), for
        an optimizer that takes None there (the built-ins: they leave those parameters alone)."""
        absent = self.absent.get(name)
        if not absent or not self.optimizers[name].absent_grads:
            return grad
        return {k: None if k in absent else g for k, g in grad.items()}

    def tape(self, name: str, state: dict, up: dict, uppers: list, always: bool = False) -> tuple:
        """Record the block of ``name`` on the autograd tape, when its method differentiates the
        forward updates themselves (``records_tape``: ``Unroll`` without checkpointing) and nothing
        else is being differentiated, traced or compiled: returns ``(up', leaves)`` where ``up'`` is
        ``up`` with the parameters of the ``uppers`` (the levels whose hypergradient goes through
        this block) replaced by fresh leaves that require grad, so that every update of the block
        is built with ``create_graph`` and one backward pass gives vᵀ dθ_K/dθ_U; else ``(up, None)``.

        The tape costs the activations of every update (what ``torch.autograd`` keeps) instead of
        one replay of every update in the reverse pass: one forward pass instead of two.

        ``always``: the plan found that this block never runs inside a derivative, so it keeps no
        iterates to fall back on; a run that breaks that is refused rather than differentiated wrong."""
        if always:
            if not autodiff.on_tape() or not is_plain((state, up)):
                raise LevelError(f"level '{name}': its block was planned to run outside every derivative "
                                 f"(it keeps no iterates, its updates are recorded on the autograd tape), but "
                                 f"it runs inside a torch.func transform or an enclosing product here; run "
                                 f"Program.step() outside of transforms")
            leaves = {u: {k: v.detach().requires_grad_() for k, v in up[u].items()} for u in uppers if u in up}
            return {**up, **leaves}, leaves
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

    def solution(self, lower: str, upper_name: str, final: dict, up: dict, batch) -> tuple:
        """``(Solution, info)``: level ``lower`` at the end of its block (state ``final``, the other
        levels at ``up``, its last ``batch``) toward ``upper_name``, for a method's own source in
        the step (``Method.source``); ``info`` collects the diagnostics it reports."""
        info: dict = {}
        loss = self.objective(lower, upper_name, final, up, batch)
        return Solution(lower, final[lower]["params"], up[upper_name], loss, final[lower].get("opt", {}),
                        info.__setitem__), info

    def products_region(self, lower: str, upper_name: str, fn: Callable) -> Callable:
        """A method's own VJP source (``(final, up, batch, v) -> (vjp, info)``) as one compiled region."""
        return self.region(lower, f"hypergradient products toward '{upper_name}'", fn)

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

    def objective(self, lower: str, upper_name: str, final: dict, up: dict, batch) -> Callable:
        """The L of level ``lower`` at the end of its block (state ``final``, the other levels at
        ``up``) on ``batch``: ``lower_loss``, ``minimized``."""
        return self.minimized(lower, self.lower_loss(lower, upper_name, up, params_of(final), batch))

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
        loss = self.objective(lower, upper_name, final, up, batch)

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
            log["_finite"][loop.name][-2:] = losses, norms  # every update's health, not the last's alone
        return final, path


