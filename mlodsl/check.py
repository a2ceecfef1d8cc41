"""``check_hypergradient``: a gradcheck for multilevel programs.

Compares a level's hypergradient g with central finite differences of its loss F(θ) with the lower
levels re-solved (the same batches, the same schedule):

    (F(θ + ε d) - F(θ - ε d)) / 2ε  ≈  gᵀ d

along unit directions d: every coordinate when the level has at most ``max_coords`` parameters,
otherwise ``directions`` random ones. Use float64 for a meaningful comparison.

Finite differences assume a smooth loss. At a kink (a ReLU, max or abs that switches within ε, as in
unrolled ReLU networks) the one-sided differences (F(θ+εd) - F(θ))/ε and (F(θ) - F(θ-εd))/ε disagree
by the jump in the derivative, whatever ε; for a smooth loss they differ by about ε·curvature, which
shrinks with ε. The check compares them, at ε and where they disagree also at ε/10, and says when the
loss may not be smooth at the point (``smooth``), where finite differences are no reference.
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
    smooth: bool = True          # False: the one-sided differences disagree whatever ε (a kink)
    one_sided_gap: float = 0.0   # |forward - backward differences| relative to the gradient's scale

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tol

    def __str__(self) -> str:
        verdict = "agrees" if self.ok else "DISAGREES"
        text = (f"hypergradient of '{self.level}' {verdict} with finite differences: relative error "
                f"{self.rel_error:.2e} over {len(self.numeric)} directions (tolerance {self.tol:.0e})")
        if not self.smooth:
            text += (f"; but the loss may not be smooth at this point (forward and backward differences differ by "
                     f"{self.one_sided_gap:.2e} of the gradient, at ε and at ε/10: a ReLU, max or abs switching "
                     f"there), so finite differences are unreliable: check at another point or with a smooth "
                     f"stand-in (softplus for ReLU)")
        return text


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
        dirs = torch.randn(directions, flat.numel(), generator=gen, dtype=flat.dtype,  # drawn where gen is
                           device="cpu").to(flat.device)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)

    def unflatten(vec):
        out, i = {}, 0
        for k in names:
            n = params[k].numel()
            out[k] = vec[i:i + n].reshape(params[k].shape)
            i += n
        return out

    def loss_at(vec):
        return prog.loss_after_lowers(name, unflatten(vec))

    def around(step):
        """The loss at θ ± step·d along every direction."""
        return (torch.stack([loss_at(flat + step * d) for d in dirs]),
                torch.stack([loss_at(flat - step * d) for d in dirs]))

    def one_sided_gap(plus, minus, step):
        """|forward - backward differences| over the directions."""
        return float(((plus - here) / step - (here - minus) / step).norm())

    plus, minus = around(eps)
    numeric = (plus - minus) / (2 * eps)
    analytic = dirs @ g
    scale = max(float(numeric.norm()), float(analytic.norm()), 1e-30)
    rel_error = float((numeric - analytic).norm()) / scale

    # A gap of a tenth of the gradient is a kink, or curvature over ε: at ε/10 curvature's gap shrinks
    # tenfold, a kink's does not (1/2 leaves room for rounding).
    here = loss_at(flat)
    gap = one_sided_gap(plus, minus, eps)
    smooth = gap <= 0.1 * scale or one_sided_gap(*around(eps / 10), eps / 10) < 0.5 * gap
    return HypergradientCheck(name, analytic, numeric, rel_error, tol, smooth, gap / scale)
