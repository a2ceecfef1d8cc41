"""``check_hypergradient``: a gradcheck for multilevel programs.

Compares a level's hypergradient g with central finite differences of its loss F(θ) with the lower
levels re-solved (the same batches, the same schedule):

    (F(θ + ε d) - F(θ - ε d)) / 2ε  ≈  gᵀ d

along unit directions d: every coordinate when the level has at most ``max_coords`` parameters,
otherwise ``directions`` random ones. Use float64 for a meaningful comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HypergradientCheck:
    level: str
    analytic: torch.Tensor       # gᵀ d for each direction
    numeric: torch.Tensor        # central differences along the same directions
    rel_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tol

    def __str__(self) -> str:
        verdict = "agrees" if self.ok else "DISAGREES"
        return (f"hypergradient of '{self.level}' {verdict} with finite differences: relative error "
                f"{self.rel_error:.2e} over {len(self.numeric)} directions (tolerance {self.tol:.0e})")


def check_hypergradient(prog, name: str, eps: float = 1e-6, *, directions: int = 6, max_coords: int = 32,
                        tol: float = 1e-4, seed: int = 0) -> HypergradientCheck:
    """Compare ``prog.hypergradient(name)`` with central differences; changes nothing."""
    params = prog.params(name)
    grad = prog.hypergradient(name)
    names = list(params)
    flat = torch.cat([params[k].reshape(-1) for k in names])
    g = torch.cat([grad[k].reshape(-1) for k in names])
    if flat.numel() <= max_coords:
        dirs = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dirs = torch.randn(directions, flat.numel(), generator=gen, dtype=flat.dtype).to(flat.device)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)

    def unflatten(vec):
        out, i = {}, 0
        for k in names:
            n = params[k].numel()
            out[k] = vec[i:i + n].reshape(params[k].shape)
            i += n
        return out

    numeric = torch.stack([(prog.loss_after_lowers(name, unflatten(flat + eps * d))
                            - prog.loss_after_lowers(name, unflatten(flat - eps * d))) / (2 * eps) for d in dirs])
    analytic = dirs @ g
    scale = max(float(numeric.norm()), float(analytic.norm()), 1e-30)
    return HypergradientCheck(name, analytic, numeric, float((numeric - analytic).norm()) / scale, tol)
