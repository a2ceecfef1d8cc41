"""Linear solvers over dicts of tensors, for the implicit hypergradient methods.

A solver is a pure function ``solve(matvec, b) -> x`` with ``matvec(x) ≈ A x`` given as a function
(Hessian-vector products: the matrix is never formed). The implicit methods take the solver as a
parameter, so a user swaps the solver without touching the method. Every operation is a plain
differentiable torch operation, so a level above can differentiate through a solve.
"""
from __future__ import annotations

import inspect
from functools import partial

import torch

from ..tree import tree_add, tree_map, tree_vdot
from .handover import claim


def tree_scale(a, x):
    """Leafwise a · x (a is a number or a 0-d tensor)."""
    return tree_map(lambda t: a * t, x)


def tree_axpy(a, x, y):
    """Leafwise a · x + y."""
    return tree_map(lambda s, t: a * s + t, x, y)


def tree_sub(x, y):
    return tree_map(lambda s, t: s - t, x, y)


def tree_norm(x) -> torch.Tensor:
    return torch.sqrt(tree_vdot(x, x))


def _ratio(num, den):
    """num / den, and 0 where den == 0 (then num == 0 too: the residual is exactly zero)."""
    return num / (den + (den == 0))  # den, or 1 where den == 0 (den + 0 is den exactly): three kernels


def conjugate_gradient(matvec, b, *, iters: int, tol: float | None = None, info: dict | None = None,
                       readout: dict | None = None):
    """Conjugate gradient for A x = b, A symmetric positive definite, from x₀ = 0.

    r₀ = p₀ = b;  αₖ = rₖᵀrₖ / pₖᵀA pₖ;  x ← x + αₖ pₖ;  r ← r - αₖ A pₖ;
    βₖ = rₖ₊₁ᵀrₖ₊₁ / rₖᵀrₖ;  p ← r + βₖ p.

    In exact arithmetic the solution is exact after d iterations on a d-dimensional system.
    One ``matvec`` per iteration. With ``tol``, stops when ‖r‖ ≤ tol (a host synchronisation per
    iteration, and a graph break under torch.compile); without it, runs ``iters`` iterations with no
    data-dependent branch (a zero residual gives zero steps, not 0/0).

    ``info`` gets ``cg_residual`` = ‖r‖/‖b‖ at the end (above 1: it did not converge) and
    ``cg_indefinite``, the number of iterations that met pᵀA p < 0 (A is not positive definite: CG
    is no longer minimizing anything); both are tensors, counted without a branch.

    ``readout`` (zeros shaped like M's output): ``matvec(p)`` returns ``(A p, M p)`` for a linear map M
    (one backward pass gives both: the implicit methods' H p and mixed product B p), and the result
    is M x = Σₖ αₖ M pₖ,
    accumulated as CG goes: x itself is never formed (one vector of b's size fewer) and M is not
    applied again at the end. The last iteration updates neither p nor, when nothing reads the
    residual (no ``info``, no ``tol``), r.

    A b handed over by the generated step (``handover.Handed``) whose buffers nothing else sees is
    consumed: r and p are updated in place, p in b's buffers (CG then holds r, p and A p: b is
    not kept beside them). Otherwise nothing is written and every iterate is a new tensor.
    """
    x = tree_map(torch.zeros_like, b) if readout is None else readout
    b, owned = claim(b)
    r, p = b, b
    rr = tree_vdot(r, r)
    bb = rr
    indefinite = torch.zeros_like(rr)
    for i in range(iters):
        if tol is not None and bool(rr <= tol * tol):  # a comparison, not float(): exact on a sharded level too
            break
        Ap = matvec(p)
        if readout is not None:
            Ap, Mp = Ap
        pAp = tree_vdot(p, Ap)
        if info is not None:  # pᵀAp = 0 exactly: p = 0 or a direction the loss does not depend on (α = 0 then)
            indefinite = indefinite + (pAp < 0)  # a float plus a bool: one kernel
        alpha = _ratio(rr, pAp)
        x = tree_axpy(alpha, p if readout is None else Mp, x)
        last = i == iters - 1
        if last and readout is not None and info is None and tol is None:
            break
        if not owned:
            r = tree_axpy(-alpha, Ap, r)
        elif r is p:  # the first step: r leaves b's buffers, which p keeps
            # Ap is not named inside the comprehension: that would make it a closure cell, whose
            # `del Ap` below torch.compile cannot trace (DELETE_DEREF)
            r = {k: torch.addcmul(t, a, alpha, value=-1) for (k, t), a in zip(r.items(), map(Ap.__getitem__, r))}
        else:
            for k, t in r.items():
                t.addcmul_(Ap[k], alpha, value=-1)
        del Ap
        rr_new = tree_vdot(r, r)
        if not last:
            beta = _ratio(rr_new, rr)
            if not owned:
                p = tree_axpy(beta, p, r)
            else:
                for k, t in p.items():
                    t.mul_(beta).add_(r[k])
        rr = rr_new
    if info is not None:  # free: CG tracks its residual anyway
        info["cg_residual"] = torch.sqrt(_ratio(rr, bb))
        info["cg_indefinite"] = indefinite
    return x


def neumann_series(matvec, b, *, iters: int, alpha: float, info: dict | None = None):
    """A⁻¹ b ≈ α Σ_{j=0}^{iters} (I - αA)^j b: the truncated Neumann series of (αA)⁻¹.

    Converges when the spectral radius of I - αA is below 1 (for SPD A: 0 < α < 2/λ_max);
    the error after ``iters`` terms is (I - αA)^{iters+1} A⁻¹ b. One ``matvec`` per term after the first.
    ``info`` gets ``neumann_change`` (the last term's size relative to the sum) and
    ``neumann_growth`` = ‖(I - αA)^{iters} b‖/‖b‖: above 1 the terms grow and the series diverges.
    """
    term, total = b, b
    for _ in range(iters):
        term = tree_sub(term, tree_scale(alpha, matvec(term)))  # (I - αA) term
        total = tree_add(total, term)
    if info is not None:  # the size of the last term relative to the sum: how far from converged
        info["neumann_change"] = _ratio(tree_norm(term), tree_norm(total))
        info["neumann_growth"] = _ratio(tree_norm(term), tree_norm(b))
    return tree_scale(alpha, total)


def cg_solver(iters: int, tol: float | None = None):
    """``solve(matvec, b)`` by ``conjugate_gradient`` with these settings."""
    return partial(conjugate_gradient, iters=iters, tol=tol)


def neumann_solver(iters: int, alpha: float):
    """``solve(matvec, b)`` by ``neumann_series`` with these settings."""
    return partial(neumann_series, iters=iters, alpha=alpha)


def solve_with_info(solve, matvec, b, report) -> dict:
    """``solve(matvec, b)``, passing the solver an ``info`` dict when it takes one and reporting
    what it wrote there (the diagnostics that reach the metrics)."""
    try:
        takes_info = "info" in inspect.signature(solve).parameters
    except (TypeError, ValueError):
        takes_info = False
    if not takes_info:
        return solve(matvec, b)
    info: dict = {}
    x = solve(matvec, b, info=info)
    for key, value in info.items():
        report(key, value)
    return x
