"""Data parallel on torch.distributed: every rank holds all parameters and passes its own data shard.

A Program started under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) joins the process
group (gloo for CPU modules, nccl for CUDA ones; timeout ``MLODSL_DIST_TIMEOUT`` seconds, default
300) and hands the generated step two functions, both bucketed (one flat buffer per call):

* ``reduce(grad)``: the mean over ranks of a level's total gradient, applied in
  ``Runtime.apply_update`` before every update of every level. It is differentiable and its own
  adjoint (the backward pass all-reduces the cotangents), so an upper level unrolling through a
  lower level's updates differentiates the *averaged* updates: with every level's update averaged
  this way, the mean of the ranks' total gradients is exactly the gradient one process computes on
  the union of the shards, and the reduce in the upper level's own update forms that mean.
* ``replicate(params)``: identity forward, mean over ranks backward, applied to the parameters
  entering the loss that an implicit or finite-difference method differentiates
  (``Trajectory.loss``): every gradient, Hessian-vector product and mixed product formed from it is
  the ranks' mean where it is formed, so a CG solve runs on the averaged Hessian.

* ``weigh(level, loss, batch)``: shards may hold different numbers of examples. ``Runtime.evaluate``
  multiplies every loss a rank computes by ``world · n_r / Σ_r n_r``, where ``n_r`` is the leading
  dimension of the rank's batch (its first tensor). For a loss that is a mean over the batch, the
  ranks' mean of the weighted losses is the mean loss over the union of their batches, so every
  average above (and the logged loss) is the one a single process computes on the concatenated
  batch; equal shards get a weight of exactly 1. The counts cost one all-reduce per step: the
  Program hands every batch of the step to ``share_examples`` before running it, which tabulates
  each level's weight by batch size. (Where one rank's batch size has two weights in a step, that
  level's losses all-reduce their counts at every evaluation instead.) Levels batched over tasks
  are averaged unweighted, and metrics other than the loss too.

Every rank runs the same program, so the collectives are issued in the same order everywhere.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from .data import MicroBatches
from .sharding import is_sharded


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or the group timed out."""


def _all_reduce_(flat: torch.Tensor, op=None) -> torch.Tensor:
    try:
        dist.all_reduce(flat, op=op or dist.ReduceOp.SUM)
    except Exception as err:  # gloo raises RuntimeError or DistBackendError on a lost peer
        raise DistributedError(f"rank {dist.get_rank()}: an all-reduce failed (another rank died or the "
                               f"group timed out; MLODSL_DIST_TIMEOUT sets the timeout): {err}") from err
    return flat


def _mean(xs):
    """One all-reduce of the flattened ``xs`` (one dtype), divided by the world size."""
    flat = torch.cat([x.reshape(-1) for x in xs])
    _all_reduce_(flat)
    flat = flat / dist.get_world_size()
    return tuple(c.view_as(x) for c, x in zip(flat.split([x.numel() for x in xs]), xs))


class AllReduceMean(torch.autograd.Function):
    """``x_r ↦ mean_r x_r`` on every rank. Its adjoint is itself, so the backward pass (and the
    tangent of ``jvp``) is the same all-reduce; a vmapped call reduces the whole batch at once."""

    @staticmethod
    def forward(*xs):
        return _mean(xs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *cts):
        return AllReduceMean.apply(*cts)

    @staticmethod
    def jvp(ctx, *tangents):
        return AllReduceMean.apply(*tangents)

    @staticmethod
    def vmap(info, in_dims, *xs):
        xs = [x.movedim(d, 0) if d is not None else x.expand(info.batch_size, *x.shape) for x, d in zip(xs, in_dims)]
        return AllReduceMean.apply(*xs), (0,) * len(xs)


class Replicated(torch.autograd.Function):
    """Identity forward; the mean over ranks of the cotangents backward (a replicated input's gradient)."""

    @staticmethod
    def forward(*xs):
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *cts):
        return AllReduceMean.apply(*cts)

    @staticmethod
    def jvp(ctx, *tangents):
        return tuple(t.view_as(t) for t in tangents)

    @staticmethod
    def vmap(info, in_dims, *xs):
        return Replicated.apply(*xs), tuple(in_dims)


def _apply_bucketed(fn, tree: dict) -> dict:
    """``fn`` applied once per dtype to the tensors of a dict (nested one level deep at most)."""
    leaves = [(k, j, v) for k, v in tree.items()
              for j, v in ((v.items()) if isinstance(v, dict) else [(None, v)])]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    by_dtype: dict = {}
    for k, j, v in leaves:
        # every floating tensor (``requires_grad`` says nothing about an outer torch.func level), but
        # a sharded level's slices: their gradients are already the ranks' mean (mlodsl.sharding)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not is_sharded(v):
            by_dtype.setdefault(v.dtype, []).append((k, j, v))
    for group in by_dtype.values():
        results = fn(*[v for _, _, v in group])
        for (k, j, _), r in zip(group, results):
            if j is None:
                out[k] = r
            else:
                out[k][j] = r
    return out


def examples(batch) -> int | None:
    """The examples in a batch: its first tensor's leading dimension (None: a batch without tensors)."""
    first = next((x for x in tree_leaves(batch) if isinstance(x, torch.Tensor)), None)
    if first is None:
        return None
    return first.shape[0] if first.dim() > 0 else 1


def _weights_by_size(draws: list, world: int) -> dict | None:
    """One rank's ``{batch size: weight}`` from ``[(its size, every rank's total), ...]`` over a
    level's draws; None when one of its sizes has two weights (the level must then ask)."""
    weights: dict = {}
    for n, total in draws:
        if n < 0:  # a batch without tensors: not weighed
            continue
        w = world * n / total
        if weights.setdefault(int(n), w) != w:
            return None
    return weights


class DataParallel:
    """The process group as the generated step and the Program see it."""

    def __init__(self):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._weights: dict = {}  # level -> {this rank's batch size: weight} for the batches in use
        self._ask: set = set()    # levels whose weights are all-reduced at every evaluation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, grad: dict) -> dict:
        """The ranks' mean of a level's gradient ``{name: tensor}``, one buffer, differentiable."""
        return _apply_bucketed(AllReduceMean.apply, grad)

    def replicate(self, params: dict) -> dict:
        """``{level: {name: tensor}}`` unchanged, whose gradients are averaged over ranks."""
        return _apply_bucketed(Replicated.apply, params)

    def share_examples(self, batches: dict) -> None:
        """Tabulate this rank's weight ``world · n_r / Σ_r n_r`` for its batches of a step
        (``{level: [update batch, ...]}``, micro-batches included) by level and batch size: one
        all-reduce gathers every rank's counts, so every rank decides alike which levels are
        ambiguous and must ask at every evaluation."""
        sizes = {n: [examples(b) for u in ups for b in (u if isinstance(u, MicroBatches) else [u])]
                 for n, ups in batches.items()}  # the same levels and draws on every rank: the same program
        mine = [-1 if c is None else c for c in sum(sizes.values(), [])]
        table = torch.zeros(self.world_size, len(mine), dtype=torch.float64, device=self.device)
        table[self.rank] = torch.tensor(mine, dtype=torch.float64)
        _all_reduce_(table)  # row r: rank r's counts
        counts = table.cpu().tolist()
        totals = [sum(max(c, 0) for c in column) for column in zip(*counts)]
        self._weights, self._ask, start = {}, set(), 0
        for name, drawn in sizes.items():
            draws = range(start, start + len(drawn))
            start += len(drawn)
            by_rank = [_weights_by_size([(counts[r][j], totals[j]) for j in draws], self.world_size)
                       for r in range(self.world_size)]
            if any(w is None for w in by_rank):
                self._ask.add(name)
            else:
                self._weights[name] = by_rank[self.rank]

    def weigh(self, level: str, loss: torch.Tensor, batch) -> torch.Tensor:
        """``loss`` times this rank's share of the examples, ``world · n_r / Σ_r n_r``: the ranks' mean
        of the weighted mean losses is the mean loss over the union of their batches."""
        n = examples(batch)
        if n is None or (level not in self._weights and level not in self._ask):
            return loss  # no data, or batched over tasks: the plain mean
        if level in self._weights:
            w = self._weights[level].get(n)
            if w is None:
                raise DistributedError(f"rank {self.rank}: level '{level}' evaluated a batch of {n} examples, "
                                       f"a size none of its batches in this step has")
            return loss if w == 1.0 else loss * w
        total = torch.tensor([float(n)], dtype=torch.float64, device=self.device)
        _all_reduce_(total)
        return loss * (self.world_size * n / float(total.item()))

    def mean_log(self, log: dict, finite: dict) -> tuple:
        """Losses and metrics (scalar tensors) averaged over ranks, and ``finite[level]`` true only
        where it is true on every rank: one all-reduce."""
        keys = [k for k, v in log.items() if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()]
        flags = list(finite)
        flat = torch.tensor([float(log[k]) for k in keys] + [0.0 if finite[n] else 1.0 for n in flags],
                            dtype=torch.float64, device=self.device)
        _all_reduce_(flat)
        flat = flat.cpu()
        out = {**log, **{k: (flat[i] / self.world_size).to(log[k].dtype) for i, k in enumerate(keys)}}
        return out, {n: bool(flat[len(keys) + j] == 0) for j, n in enumerate(flags)}

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (every rank gets the same answer)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        _all_reduce_(t, dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_(self, tensors: list) -> None:
        """Copy rank 0's values into ``tensors`` on every rank, one buffer per dtype."""
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.device)
            try:
                dist.broadcast(flat, src=0)
            except Exception as err:
                raise DistributedError(f"rank {self.rank}: broadcasting the initial state failed: {err}") from err
            with torch.no_grad():
                for t, c in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(c.view_as(t).to(t.device))

    def barrier(self) -> None:
        try:
            dist.barrier()
        except Exception as err:
            raise DistributedError(f"rank {self.rank}: a barrier failed: {err}") from err

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, backend={dist.get_backend()})"


def setup(device_type: str = "cpu") -> DataParallel | None:
    """Join the process group described by the environment (``torchrun``), or use one already
    initialized; ``None`` when running as a single process."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get("MLODSL_DIST_TIMEOUT", "300")))
        dist.init_process_group(backend, timeout=timeout)
    if dist.get_world_size() == 1:
        return None
    return DataParallel()
