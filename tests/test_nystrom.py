"""The Nyström implicit solver: exact at full rank, against the closed-form ridge hypergradient."""
import pytest
import torch
from torch import nn

import mlodsl as ml
from helpers import DT
from mlodsl.hypergrad.nystrom import nystrom_inverse

D, N = 8, 40


def _spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=DT)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=DT)


def test_full_rank_nystrom_is_the_regularized_inverse():
    H = _spd(6)
    b = {"a": torch.arange(4, dtype=DT), "b": torch.ones(2, dtype=DT)}
    flat = torch.cat([b["a"], b["b"]])
    x = nystrom_inverse(lambda w: {"a": (H @ torch.cat([w["a"], w["b"]]))[:4],
                                   "b": (H @ torch.cat([w["a"], w["b"]]))[4:]}, b, rank=6, rho=0.3)
    expected = torch.linalg.solve(H + 0.3 * torch.eye(6, dtype=DT), flat)
    torch.testing.assert_close(torch.cat([x["a"], x["b"]]), expected, rtol=1e-10, atol=1e-12)


def _ridge(method):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2 * N, D, generator=g, dtype=DT)
    y = X @ torch.randn(D, generator=g, dtype=DT) + 0.3 * torch.randn(2 * N, generator=g, dtype=DT)
    (Xt, yt), (Xv, yv) = (X[:N], y[:N]), (X[N:], y[N:])
    theta = torch.linspace(-2.0, 0.0, D, dtype=DT)
    lam = theta.exp()
    H = Xt.T @ Xt / N + torch.diag(lam)
    w_star = torch.linalg.solve(H, Xt.T @ yt / N)
    net = nn.Linear(D, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(w_star.unsqueeze(0))

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-9), data=(Xt, yt), hypergrad=method)
    def inner(net, batch, outer):
        x, t = batch
        w = net.weight.squeeze(0)
        return 0.5 * ((x @ w - t) ** 2).mean() + 0.5 * (outer.theta.exp() * w ** 2).sum()

    @ml.level(ml.Hyper(theta=theta.clone()), optimizer=ml.optim.sgd(lr=0.1), data=(Xv, yv), depends_on=[inner])
    def outer(hyper, batch, inner):
        x, t = batch
        return ((inner(x).squeeze(-1) - t) ** 2).mean()

    v = 2 * Xv.T @ (Xv @ w_star - yv) / N
    exact = -lam * w_star * torch.linalg.solve(H, v)
    return ml.Program(outer).hypergradient("outer")["theta"], exact


def test_full_rank_nystrom_hypergradient_equals_the_closed_form():
    got, exact = _ridge(ml.hypergrad.Nystrom(rank=D, rho=1e-10))
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-12)


def test_low_rank_nystrom_is_an_approximation_that_improves_with_rank():
    errors = []
    for rank in (2, 5, D):
        got, exact = _ridge(ml.hypergrad.Implicit(ml.hypergrad.nystrom_solver(rank, rho=1e-3)))
        errors.append(((got - exact).norm() / exact.norm()).item())
    assert errors[-1] < 1e-2 and errors[-1] < errors[0], errors


def test_nystrom_options_are_checked():
    with pytest.raises(ValueError, match="rho"):
        ml.hypergrad.nystrom_solver(3, rho=0.0)
    with pytest.raises(ValueError, match="rank"):
        ml.hypergrad.Nystrom(rank=0)
    assert repr(ml.hypergrad.Nystrom(rank=4, rho=0.01)) == "Nystrom(rank=4, rho=0.01)"
