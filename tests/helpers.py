"""Shared test problems: small float64 problems with hand-written autograd references."""
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml

DT = torch.float64


def logreg_data(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = (X @ w + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    h = n // 2
    return (X[:h], y[:h]), (X[h:], y[h:])


def inner_loss_fn(w, b, log_l2, batch):
    x, y = batch
    fit = F.binary_cross_entropy_with_logits(x @ w + b, y)
    return fit + (log_l2.exp() * w ** 2).sum()


def outer_loss_fn(w, b, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(x @ w + b, y)


def hpo_problem(train, val, *, K=5, method=None, inner_opt=None, outer_opt=None, d=5, dtype=DT, seed=0,
               log_l2=-2.0, extra_hyper=None, metrics=None, inner_precision=None):
    """The logistic-regression HPO problem every test shares: a learned per-feature L2 penalty
    exp(log_l2) on a logistic regression fitted by ``K`` steps of ``inner_opt`` (default SGD, lr 0.5)
    on ``train``; the upper level learns log_l2 from the loss on ``val`` (default SGD, lr 0.1).
    ``extra_hyper``: more tensors of the upper module (not read by either loss); ``metrics``: what the
    lower level returns beside its loss. Returns ``(outer level, net, hyper)``."""
    torch.manual_seed(seed)
    net = nn.Linear(d, 1).to(dtype)
    hyper = ml.Hyper(log_l2=torch.full((d,), log_l2, dtype=dtype), **(extra_hyper or {}))

    @ml.level(net, optimizer=inner_opt or ml.optim.sgd(lr=0.5), data=train, steps=K, hypergrad=method,
              precision=inner_precision)
    def inner(net, batch, outer):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        loss = fit + (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()
        return loss if metrics is None else (loss, metrics)

    @ml.level(hyper, optimizer=outer_opt or ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

    return outer, net, hyper


def make_hpo(K=5, lr=0.5, method=None, d=5, inner_opt=None, outer_opt=None, seed=0, compile=False):
    """``hpo_problem`` on ``logreg_data``, float64. Returns (program, net, hyper, train, val)."""
    train, val = logreg_data(d=d, seed=seed)
    outer, net, hyper = hpo_problem(train, val, K=K, method=method, inner_opt=inner_opt or ml.optim.sgd(lr=lr),
                                   outer_opt=outer_opt, d=d, seed=seed)
    return ml.Program(outer, compile=compile), net, hyper, train, val


def reference_hpo(net, hyper, train, val, K, lr, last=None):
    """Hand-written autograd: d outer(w_K) / d log_l2 through K SGD steps (the last `last` only)."""
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    w = net.weight.detach().clone().squeeze(0).requires_grad_()
    b = net.bias.detach().clone().squeeze(0).requires_grad_()
    first = 0 if last is None else K - last
    for k in range(K):
        if k == first:  # truncation: the state before the last `last` steps is a constant
            w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
        gw, gb = torch.autograd.grad(inner_loss_fn(w, b, log_l2, train), (w, b), create_graph=True)
        w, b = w - lr * gw, b - lr * gb
    (g,) = torch.autograd.grad(outer_loss_fn(w, b, val), log_l2)
    return g, (w.detach(), b.detach())


def reference_implicit_hpo(net, hyper, train, val, K, lr):
    """Hand-written autograd: the implicit hypergradient -(∂²L/∂λ∂θ) H⁻¹ ∇_θ f at θ_K (K SGD steps
    from the module's parameters), H = ∂²L/∂θ² formed and solved exactly; θ = (w, b)."""
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    theta = torch.cat([net.weight.detach().squeeze(0), net.bias.detach()])

    def lower(th, lam):
        return inner_loss_fn(th[:-1], th[-1], lam, train)

    for _ in range(K):
        th = theta.clone().requires_grad_()
        (g,) = torch.autograd.grad(lower(th, log_l2.detach()), th)
        theta = (th - lr * g).detach()
    H = torch.autograd.functional.hessian(lambda th: lower(th, log_l2.detach()), theta)
    th = theta.clone().requires_grad_()
    (v,) = torch.autograd.grad(outer_loss_fn(th[:-1], th[-1], val), th)
    x = torch.linalg.solve(H, v)
    (g_theta,) = torch.autograd.grad(lower(th, log_l2), th, create_graph=True)
    (cross,) = torch.autograd.grad(g_theta @ x, log_l2)
    return -cross


# -- ridge regression with per-feature L2: the closed-form implicit hypergradient --------------------

RIDGE_N, RIDGE_D = 30, 6


def ridge_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * RIDGE_N, RIDGE_D, generator=g, dtype=DT)
    y = X @ torch.randn(RIDGE_D, generator=g, dtype=DT) + 0.3 * torch.randn(2 * RIDGE_N, generator=g, dtype=DT)
    return (X[:RIDGE_N], y[:RIDGE_N]), (X[RIDGE_N:], y[RIDGE_N:])


def ridge_solution(X, y, lam):
    """argmin_w ½‖Xw - y‖²/n + ½ Σ λ w²  =  (XᵀX/n + diag λ)⁻¹ Xᵀy/n."""
    n = X.shape[0]
    return torch.linalg.solve(X.T @ X / n + torch.diag(lam), X.T @ y / n)


def ridge_levels(net, hyper, train, val, *, optimizer, method=None, steps=1, compile=False):
    """The ridge bilevel Program: ``net`` (a bias-free linear layer) fits ``train`` with the per-feature
    L2 penalty exp(``hyper.log_l2``); the upper level is its validation MSE (SGD, lr 0.1)."""

    @ml.level(net, optimizer=optimizer, data=train, steps=steps, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        fit = 0.5 * ((net(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    return ml.Program(outer, compile=compile)


def ridge_closed_form(train, val, log_l2):
    """d/d log_l2 of the validation MSE at w*(λ), λ = exp(log_l2), by the closed form

        H dw*/dλ_i = -e_i w*_i  ⇒  ∂f/∂log_l2_i = -λ_i w*_i (H⁻¹ ∇_w f)_i.

    Returns the hypergradient and ``dict(w=w*, H=H, v=∇_w f, lam=λ)``.
    """
    (X, y), (Xv, yv) = train, val
    lam = log_l2.exp()
    w = ridge_solution(X, y, lam)
    H = X.T @ X / X.shape[0] + torch.diag(lam)
    v = 2 * Xv.T @ (Xv @ w - yv) / Xv.shape[0]  # ∇_w of the validation MSE
    return -lam * w * torch.linalg.solve(H, v), dict(w=w, H=H, v=v, lam=lam)


class SquareWithoutJvp(torch.autograd.Function):
    """x² with a differentiable backward but no forward-mode rule (no ``jvp`` staticmethod)."""

    @staticmethod
    def forward(x):
        return x.square()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return 2 * ctx.saved_tensors[0] * grad
