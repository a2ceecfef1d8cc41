"""Exact hypergradients through the unrolled updates, in reverse or forward mode."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..tree import split_differentiable, tree_add, tree_vdot, tree_zeros_like
from .base import Method, Trajectory
from .handover import claim


@dataclass(frozen=True, repr=False)
class Unroll(Method):
    """Reverse mode through the block's updates:  vᵀ dθ_K/dθ_U = Σ_k  ∂S_{k+1}/∂θ_U ᵀ λ_{k+1},
    with λ_K = (v on θ_L, 0 elsewhere) and λ_k = ∂S_{k+1}/∂S_k ᵀ λ_{k+1}.

    The forward pass keeps the iterates S_0..S_K (parameters and optimizer states of the block's
    levels); the reverse pass is a loop of VJPs of one update. ``last=T`` runs the reverse loop
    over the last T updates only (truncated backpropagation). Memory O(K·d).

    Without checkpointing or truncation, where nothing else is differentiating the block (eager,
    no ``vmap``), the forward updates are recorded on the autograd tape instead and the reverse
    pass is one backward over it (``records_tape``): the same numbers for one forward pass instead
    of two, at the price of every update's activations.

    ``checkpoint=n`` keeps every n-th iterate only and recomputes each segment of n updates
    forward before reversing it, by bisection: the iterate halfway through the segment is
    recomputed, the second half reversed from it (recursively), then the first half from the
    segment's start, so that at most ⌈log₂ n⌉ recomputed iterates are alive at once. Memory
    O((K/n + log n)·d) for about (log₂ n)/2 more forward passes (one for n ≤ 3, 4/3 for n = 4);
    ``"sqrt"`` picks n = ⌈√K⌉. Same numbers as keeping every iterate.
    """

    last: int | None = None
    checkpoint: int | str | None = None

    keeps_path = True
    consumes_cotangent = True  # v only starts λ: handed over, it is dropped once λ moves on
    replays_updates = True  # differentiates the optimizer updates
    second_order = True  # the updates contain the lower gradient

    def __post_init__(self):
        last, checkpoint = self.last, self.checkpoint
        if last is not None and (not isinstance(last, int) or last < 1):
            raise ValueError(f"Unroll(last=...) must be a positive int or None, got {last!r}")
        if checkpoint is not None and checkpoint != "sqrt" and (not isinstance(checkpoint, int) or checkpoint < 1):
            raise ValueError(f"Unroll(checkpoint=...) must be None, a positive int or 'sqrt', got {checkpoint!r}")

    @property
    def records_tape(self) -> bool:
        """The whole block is differentiated from every iterate: the tape can stand in for them."""
        return self.last is None and self.checkpoint is None

    def path_stride(self, steps: int) -> int:
        """Keep the iterate after every ``path_stride`` updates (and the first and last)."""
        if self.checkpoint is None:
            return 1
        if self.checkpoint == "sqrt":
            return max(1, math.ceil(math.sqrt(steps)))
        return self.checkpoint

    def workspace(self, state_bytes: int, param_bytes: int) -> int:
        """The cotangent λ on the block state, the state being differentiated and its image."""
        return 3 * state_bytes

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        # v handed over by the step (``handover``): taken out of its dict, so that λ_K is its only holder
        cotangent = {name: claim(ct)[0] for name, ct in cotangent.items()}
        if traj.taped_vjp is not None:  # the start's dependence on θ_U (MAML) is on the tape too
            return traj.taped_vjp(cotangent)
        first = 0 if self.last is None else max(traj.steps - self.last, 0)
        stride = self.path_stride(traj.steps)
        lam = tree_zeros_like(traj.final)
        for name in cotangent:
            lam[name] = {**lam[name], "params": cotangent[name]}
        del cotangent
        lam_floats, _ = split_differentiable(lam)
        del lam
        total = tree_zeros_like(traj.upper)
        end = traj.steps
        if stride == 1 and traj.reverse_vjp is not None:  # the whole reverse pass as one compiled loop
            looped = traj.reverse_vjp(first, lam_floats, total)
            if looped is not None:
                (lam_floats, total), end = looped, first
        carry = [lam_floats, total]  # λ and the total live here alone: no frame keeps a spent λ
        del lam_floats, total
        while end > first:
            seg = ((end - 1) // stride) * stride       # the kept iterate this segment starts from
            reverse_segment(traj, traj.path[seg], seg, end, first, carry)
            end = seg
        lam_floats, total = carry
        if first == 0 and traj.starts_from_upper:  # MAML: the start itself is θ_U's
            lam_start = split_differentiable(traj.path[0])[1](lam_floats)
            total = tree_add(total, traj.start_vjp(lam_start[traj.level]["params"]))
        return total


def reverse_segment(traj: Trajectory, state: dict, a: int, b: int, first: int, carry: list) -> None:
    """Reverse updates b-1 down to max(a, first) from the iterate ``state`` = S_a, by bisection:
    S_m (m halfway) is recomputed, [m, b) reversed from it, S_m dropped, then [a, m) reversed from
    S_a. At most ⌈log₂(b - a)⌉ recomputed iterates are alive at once (a plain recompute of the
    segment keeps b - a - 1); each update's VJP sees the same iterate. ``carry`` = [λ_b, total]
    becomes [λ_a, total + the updates' upper cotangents], in place: the recursion's frames hold
    the list, not a λ that later updates have replaced."""
    if b - a == 1:
        if a >= first:
            lam, upper_ct = traj.update_vjp(state, a, carry.pop(0))
            carry.insert(0, lam)
            carry[1] = tree_add(carry[1], upper_ct)
        return
    m = (a + b) // 2
    mid = state
    for j in range(a, m):
        mid = traj.advance(mid, traj.upper, j)
    reverse_segment(traj, mid, m, b, first, carry)
    del mid
    if m > first:
        reverse_segment(traj, state, a, m, first, carry)


@dataclass(frozen=True, repr=False)
class Forward(Method):
    """Forward mode: the same quantity as ``Unroll`` from Jacobian-vector products,
    (vᵀ dθ_K/dθ_U)_j = vᵀ (dθ_K/dθ_U e_j), one ``torch.func.jvp`` through the block per
    coordinate e_j of θ_U, ``chunk`` coordinates at a time under ``torch.func.vmap``.
    Memory O(chunk·d), time O(p·K) for p upper parameters.
    """

    chunk: int = 32  # directions pushed through the block at once (vmapped)

    second_order = True  # jvp through the updates, which contain the lower gradient
    forward_over_reverse = True  # so its products are jvp-of-grad (mlodsl.kernels checks one at build)

    def __post_init__(self):
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"Forward(chunk=...) must be a positive int, got {self.chunk!r}")

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        leaves, spec = pytree.tree_flatten(traj.upper)
        sizes = [x.numel() for x in leaves]
        total = sum(sizes)

        def final_params(*upper_leaves):
            final = traj.run(pytree.tree_unflatten(list(upper_leaves), spec))
            return {name: final[name]["params"] for name in cotangent}

        def directional(direction):  # vᵀ (dθ_K/dθ_U · e) for one flat direction e
            parts = torch.split(direction, sizes)
            tangents = tuple(t.reshape(x.shape) for t, x in zip(parts, leaves))
            _, jv = torch.func.jvp(final_params, tuple(leaves), tangents)
            return tree_vdot(cotangent, jv)

        basis = torch.eye(total, dtype=leaves[0].dtype, device=leaves[0].device)
        batched = torch.func.vmap(directional, randomness="same")
        flat = torch.cat([batched(basis[a:a + self.chunk]) for a in range(0, total, self.chunk)])
        return pytree.tree_unflatten([c.reshape(x.shape) for c, x in zip(torch.split(flat, sizes), leaves)], spec)


@dataclass(frozen=True, repr=False)
class FirstOrder(Method):
    """Ignores the second-order terms: dθ_L/dθ_U ≈ ∂θ_L^0/∂θ_U, the dependence of the start alone.

    With a warm start that is 0 and the upper level's gradient is its partial derivative; with
    ``start_from=<upper>`` it is the identity, which is first-order MAML. Free."""

    replays_updates = False
    second_order = False  # no derivative of the lower loss at all

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        if traj.level not in cotangent:
            return tree_zeros_like(traj.upper)
        return traj.start_vjp(cotangent[traj.level])
