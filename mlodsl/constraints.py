"""Projections applied after each update of a level (``@ml.level(..., project=...)``).

Each is a pure function ``params -> params`` over a dict of tensors, differentiable almost
everywhere, so unrolled hypergradients see the constraint.
"""
from __future__ import annotations

import torch


def clamp(low=None, high=None):
    """Clip every parameter into [low, high]."""
    def project(params):
        return {k: torch.clamp(v, low, high) for k, v in params.items()}
    return project


def norm_ball(radius: float):
    """Scale each parameter tensor back into the ball ‖θ‖ ≤ radius."""
    def project(params):
        out = {}
        for k, v in params.items():
            n = v.norm()
            out[k] = v * torch.clamp(radius / torch.clamp(n, min=1e-30), max=1.0)
        return out
    return project


def simplex():
    """Euclidean projection of each (flattened) tensor onto the probability simplex
    {θ ≥ 0, Σθ = 1} (Duchi et al. 2008: sort, find the threshold τ, θ ← max(θ - τ, 0))."""
    def project(params):
        out = {}
        for k, v in params.items():
            flat = v.reshape(-1)
            u, _ = torch.sort(flat, descending=True)
            css = torch.cumsum(u, 0) - 1
            idx = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
            rho = (u - css / idx > 0).to(flat.dtype).cumsum(0).argmax()
            tau = css[rho] / (rho + 1).to(flat.dtype)
            out[k] = torch.clamp(flat - tau, min=0).reshape(v.shape)
        return out
    return project
