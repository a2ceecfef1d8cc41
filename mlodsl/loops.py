"""A level's update loop as one compiled region (``compile=True``).

The K updates of a level with no lower levels run as torch's ``scan`` operator, compiled once,
instead of K calls of the one-update region: dynamo traces the loop body once (compile time does
not grow with K) and inductor lowers the scan to a loop over the body's kernels, so an update costs
a few kernel launches instead of a compiled call's guard evaluation and wrappers (~120 µs on CPU).

``Unroll``'s reverse pass is a second scan over the iterates the first one kept, carrying the
cotangent from the last update to the first:

    λ_k = ∂S_{k+1}/∂S_k ᵀ λ_{k+1},    ḡ_U ← ḡ_U + ∂S_{k+1}/∂θ_U ᵀ λ_{k+1},    k = K-1, ..., first.

Where a loop cannot run as one region (compile off for the level, batches of different shapes or
with non-tensor leaves, a derivative that must flow through the loop, no ``scan`` in this torch),
``UpdateLoop.run`` returns None and the generated step runs its Python loop of updates.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils import _pytree as pytree

from .compiled import Compiler, is_plain
from .hypergrad.base import state_vjp
from .tree import tree_add

try:
    from torch._higher_order_ops.scan import scan
except ImportError:  # an older torch: every update is its own region
    scan = None


class StackedPath:
    """The iterates S_0..S_K of a block, kept by one scan: ``before`` holds S_0..S_{K-1} stacked
    on a leading dimension, ``final`` is S_K; ``path[k]`` is S_k."""

    def __init__(self, before, final):
        self.before, self.final = before, final
        self.steps = pytree.tree_leaves(before)[0].shape[0]

    def __getitem__(self, k: int):
        return self.final if k == self.steps else pytree.tree_map(lambda x: x[k], self.before)


def stacked_batches(batches: list):
    """``(xs, fixed)`` for the scan: the K batches stacked on a new leading dimension and
    ``fixed=None``, or ``xs=arange(K)`` and ``fixed`` the batch when every update uses the same
    one; None when they cannot be stacked (different shapes or structures, non-tensor leaves)."""
    first = batches[0]
    leaves, spec = pytree.tree_flatten(first)
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        return None
    if all(b is first for b in batches):
        return torch.arange(len(batches), device=leaves[0].device), first  # the batch's device, not the default
    flat = [pytree.tree_flatten(b) for b in batches]
    if any(s != spec or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(ls, leaves)) for ls, s in flat):
        return None
    return pytree.tree_unflatten([torch.stack(parts) for parts in zip(*(ls for ls, _ in flat))], spec), None


def _fresh(tree):
    """Copies of a state's tensors: a scan's outputs may not alias its carry."""
    return pytree.tree_map(torch.clone, tree)


class UpdateLoop:
    """The update loop of level ``name`` (``update(sub, up, batch, log) -> (sub, loss, metrics,
    norm)``, the generated one-update function) as compiled regions: ``run`` (the K updates,
    keeping the iterates when asked) and ``reverse`` (the VJPs of updates end-1..first)."""

    def __init__(self, compiler: Compiler, name: str, update: Callable):
        self.compiler, self.name, self.update = compiler, name, update
        self._run = {}      # keep_path -> region
        self._reverse = {}  # upper level -> region

    def available(self) -> bool:
        return scan is not None and self.compiler.compiles(self.name)

    def run(self, sub: dict, up: dict, batches: list, keep_path: bool):
        """``(S_K, path, losses, norms, metrics)`` of the K updates from ``sub`` (``path`` a
        ``StackedPath`` when ``keep_path``; ``losses``/``norms`` of every update, ``metrics`` of
        the last one), or None where the loop cannot be one region."""
        if not self.available() or not is_plain((sub, up)):
            return None
        stacked = stacked_batches(batches)
        if stacked is None:
            return None
        if keep_path not in self._run:
            self._run[keep_path] = self.compiler.region(
                self.name, f"loop of updates{' (keeping iterates)' * keep_path}",
                self._eager_run, traced=self._scan_run if keep_path else self._scan_run_only, loop=True)
        region = self._run[keep_path]
        if getattr(region, "reason", None):  # it could not be compiled: the per-update regions instead
            return None
        final, losses, norms, metrics, before = region(sub, up, *stacked)
        return final, (StackedPath(before, final) if keep_path else None), losses, norms, metrics

    def reverse(self, path: StackedPath, up: dict, upper_name: str, batches: list, first: int,
                lam: list, total: dict):
        """``(λ_first, total + Σ_k ∂S_{k+1}/∂θ_U ᵀ λ_{k+1})`` over updates K-1..first, or None."""
        stacked = stacked_batches(batches[first:])
        if not self.available() or stacked is None or not is_plain((up, lam, total)):
            return None
        if upper_name not in self._reverse:
            def eager(before, up_, xs, fixed, lam_, total_):
                return _reverse_loop(self.update, upper_name, before, up_, xs, fixed, lam_, total_)

            def traced(before, up_, xs, fixed, lam_, total_):
                return _reverse_scan(self.update, upper_name, before, up_, xs, fixed, lam_, total_)

            self._reverse[upper_name] = self.compiler.region(
                self.name, f"reverse loop of update VJPs (toward '{upper_name}')", eager, traced=traced, loop=True)
        region = self._reverse[upper_name]
        if getattr(region, "reason", None):
            return None
        before = pytree.tree_map(lambda x: x[first:], path.before)
        return region(before, up, *stacked, lam, total)

    # -- the loop, eagerly (the regions' fallback) and as a scan --------------------------------
    def _eager_run(self, sub, up, xs, fixed):
        steps = xs.shape[0] if fixed is not None else pytree.tree_leaves(xs)[0].shape[0]
        before, losses, norms, metrics = [], [], [], {}
        for k in range(steps):
            batch = fixed if fixed is not None else pytree.tree_map(lambda x: x[k], xs)
            before.append(sub)
            sub, loss, metrics, norm = self.update(sub, up, batch, None)
            losses.append(loss)
            norms.append(norm)
        stacked = pytree.tree_map(lambda *xs_: torch.stack(xs_), *before)
        return sub, torch.stack(losses), torch.stack(norms), metrics, stacked

    def _scan_run(self, sub, up, xs, fixed):
        return self._scan(sub, up, xs, fixed, keep_path=True)

    def _scan_run_only(self, sub, up, xs, fixed):
        return self._scan(sub, up, xs, fixed, keep_path=False)

    def _scan(self, sub, up, xs, fixed, keep_path):
        def body(s, x):
            new, loss, metrics, norm = self.update(s, up, fixed if fixed is not None else x, None)
            # a scan's outputs are tensors: a metric that is a Python number goes through as one
            # (the history stores numbers either way)
            metrics = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=loss.dtype, device=loss.device)
                       for k, v in metrics.items()}
            return new, (loss, norm, metrics, _fresh(s) if keep_path else ())

        final, (losses, norms, metrics, before) = scan(body, sub, xs)
        return final, losses, norms, pytree.tree_map(lambda m: m[-1], metrics), before


def _vjp_of_update(update, upper_name, s, up, batch, lam):
    return state_vjp(lambda s_, upper: update(s_, {**up, upper_name: upper}, batch, None)[0], s, up[upper_name], lam)


def _reverse_loop(update, upper_name, before, up, xs, fixed, lam, total):
    steps = pytree.tree_leaves(before)[0].shape[0]
    for k in reversed(range(steps)):
        batch = fixed if fixed is not None else pytree.tree_map(lambda x: x[k], xs)
        s = pytree.tree_map(lambda x: x[k], before)
        lam, ct = _vjp_of_update(update, upper_name, s, up, batch, lam)
        total = tree_add(total, ct)
    return lam, total


def _reverse_scan(update, upper_name, before, up, xs, fixed, lam, total):
    def body(carry, x):
        lam_, total_ = carry
        s, batch = x
        lam_, ct = _vjp_of_update(update, upper_name, s, up, fixed if fixed is not None else batch, lam_)
        return (lam_, tree_add(total_, ct)), ()

    (lam, total), _ = scan(body, (lam, total), (before, xs), reverse=True)
    return lam, total
