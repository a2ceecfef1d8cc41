"""Error of every hypergradient method on ridge regression with a per-feature L2 penalty, against
the closed form, and of Betty's methods at their defaults on the same problem (if betty-ml imports).

    lower:  w*(θ) = argmin_w ½‖Xw - y‖²/n + ½ Σ exp(θ) w²,   upper:  f(θ) = ‖X_v w*(θ) - y_v‖²/n_v
    closed form:  ∂f/∂θ_i = -λ_i w*_i (H⁻¹ ∇_w f)_i,  H = XᵀX/n + diag λ,  λ = exp θ.

The lower level starts at w*(θ) and takes one SGD step of lr 1e-6 (its gradient there is ~1e-16),
so every implicit method (and the first-order F2SA and BOME, whose copies start there) sees the
exact solution. Float64, d = 20, n = 100. ZeroOrder and Unroll
estimate the total derivative of the updates they run, so they get their own setting: 100 SGD steps
of lr 1/L from w = 0. Run: ``python benchmarks/hypergrad_error.py`` (about a minute on one core;
ZeroOrder and BOME's 6000-step row take most of it).
Writes the markdown table to stdout.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

import mlodsl as ml

DT = torch.float64
D, N = 20, 100


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * N, D, generator=g, dtype=DT)
    y = X @ torch.randn(D, generator=g, dtype=DT) + 0.5 * torch.randn(2 * N, generator=g, dtype=DT)
    return (X[:N], y[:N]), (X[N:], y[N:])


TRAIN, VAL = data()
THETA = torch.linspace(-3.0, 0.0, D, dtype=DT)


def solution(lam):
    X, y = TRAIN
    return torch.linalg.solve(X.T @ X / N + torch.diag(lam), X.T @ y / N)


def closed_form():
    lam = THETA.exp()
    w = solution(lam)
    H = TRAIN[0].T @ TRAIN[0] / N + torch.diag(lam)
    Xv, yv = VAL
    v = 2 * Xv.T @ (Xv @ w - yv) / N
    return -lam * w * torch.linalg.solve(H, v), H


def inner_loss(w, x, y, theta):
    return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (theta.exp() * w ** 2).sum()


def program(method, lr=1e-6, steps=1, start=None):
    net = nn.Linear(D, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_((solution(THETA.exp()) if start is None else start).unsqueeze(0))
    hyper = ml.Hyper(theta=THETA.clone())

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=TRAIN, steps=steps, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        return inner_loss(net.weight.squeeze(0), x, y, outer.theta)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=VAL, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    return ml.Program(outer)


def timed(fn, repeat=3):
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def rel(g, ref):
    return ((g - ref).norm() / ref.norm()).item()


def mlodsl_rows(exact, H):
    L = torch.linalg.eigvalsh(H).max().item()
    mu = torch.linalg.eigvalsh(H).min().item()
    hg = ml.hypergrad
    at_solution = [
        ("CG(iters=d)", hg.CG(iters=D), {}, f"{D} HVP + 1 mixed VJP", "O(d)"),
        ("CG(iters=5)", hg.CG(iters=5), {}, "5 HVP + 1 mixed VJP", "O(d)"),
        ("CG(iters=1)", hg.CG(iters=1), {}, "1 HVP + 1 mixed VJP", "O(d)"),
        ("CG(iters=100, tol=1e-6)", hg.CG(iters=100, tol=1e-6), {}, "≤100 HVP + 1 mixed VJP", "O(d)"),
        ("Nystrom(rank=d, rho=1e-8)", hg.Nystrom(rank=D, rho=1e-8), {}, f"{D} HVP + 1 mixed VJP", "O(d²)"),
        ("Nystrom(rank=5, rho=1)", hg.Nystrom(rank=5, rho=1.0), {}, "5 HVP + 1 mixed VJP", "O(5d)"),
        ("Nystrom(rank=5, rho=λ_min)", hg.Nystrom(rank=5, rho=mu), {}, "5 HVP + 1 mixed VJP", "O(5d)"),
        ("Neumann(iters=1, alpha=1)", hg.Neumann(iters=1, alpha=1.0), {}, "1 HVP + 1 mixed VJP", "O(d)"),
        ("Neumann(iters=100, alpha=1/L)", hg.Neumann(iters=100, alpha=1 / L), {}, "100 HVP + 1 mixed VJP", "O(d)"),
        ("Neumann(iters=1000, alpha=1/L)", hg.Neumann(iters=1000, alpha=1 / L), {}, "1000 HVP + 1 mixed VJP", "O(d)"),
        ("FixedPoint(iters=100), SGD lr=1/L", hg.FixedPoint(iters=100), {"lr": 1 / L},
         "100 VJP of the update (1 HVP each) + 1", "O(d)"),
        ("FixedPoint(iters=1000), SGD lr=1/L", hg.FixedPoint(iters=1000), {"lr": 1 / L},
         "1000 VJP of the update + 1", "O(d)"),
        ("FiniteDiff(eps=0.01)", hg.FiniteDiff(eps=0.01), {}, "2 gradients in θ_U", "O(d)"),
        ("SAMA(eps=0.01), SGD", hg.SAMA(eps=0.01), {}, "2 gradients in θ_U (+1 in θ_L for Adam)", "O(d)"),
        ("FirstOrder()", hg.FirstOrder(), {}, "free", "O(1)"),
    ]
    rows = []
    for name, method, kw, cost, mem in at_solution:
        prog = program(method, **kw)
        g, t = timed(lambda: prog.hypergradient("outer")["theta"])
        rows.append((name, cost, mem, rel(g, exact), t))

    rows += first_order_rows(exact, L)

    # Methods that differentiate the updates themselves: 100 SGD steps of lr 1/L from w = 0.
    K, zero = 100, torch.zeros(D, dtype=DT)
    prog = program(hg.Unroll(), lr=1 / L, steps=K, start=zero)
    unrolled, t = timed(lambda: prog.hypergradient("outer")["theta"], repeat=1)
    rows.append((f"Unroll(), {K} SGD steps from 0", f"{K} updates on the tape + 1 backward", f"{K} updates' graphs",
                 rel(unrolled, exact), t))
    torch.manual_seed(0)
    prog = program(hg.ZeroOrder(samples=50, sigma=1e-3), lr=1 / L, steps=K, start=zero)
    es, t = timed(lambda: prog.hypergradient("outer")["theta"], repeat=1)
    rows.append((f"ZeroOrder(samples=50, sigma=1e-3), {K} steps", f"100 re-runs of the {K} updates", "O(d)",
                 rel(es, exact), t))
    rows.append(("  … the same ZeroOrder against Unroll (its target)", "", "", rel(es, unrolled), float("nan")))
    return rows, mu, L


def first_order_rows(exact, L):
    """F2SA and BOME (no second derivative) at the solution; BOME's error oscillates with iters, so
    its rows take iters = 60/(lr·L), past its transient."""
    hg = ml.hypergrad
    settings = [(f"F2SA(iters=100, lr=1/L, penalty={p:g})", hg.F2SA(iters=100, lr=1 / L, penalty=p),
                 "2·100 gradients in θ_L + 2 in θ_U", "2·d") for p in (1e1, 1e2, 1e3, 1e4)]
    settings += [(f"F2SA(iters={k}, lr=1/L, penalty=1e6)", hg.F2SA(iters=k, lr=1 / L, penalty=1e6),
                  f"2·{k} gradients in θ_L + 2 in θ_U", "2·d") for k in (10, 30)]
    settings += [("F2SA(iters=100, lr=1/L, penalty=1e4, paired=False)",
                  hg.F2SA(iters=100, lr=1 / L, penalty=1e4, paired=False), "100 gradients in θ_L + 2 in θ_U",
                  "2·d")]
    settings += [(f"BOME(iters={60 * s}, lr=1/{'' if s == 1 else s}L, value_lr=1/L, value_iters=100)",
                  hg.BOME(iters=60 * s, lr=1 / (s * L), value_lr=1 / L, value_iters=100),
                  f"{60 * s + 101} gradients in θ_L + 2 in θ_U", "2·d") for s in (1, 10, 100)]
    rows = []
    for name, method, cost, mem in settings:
        prog = program(method)
        g, t = timed(lambda: prog.hypergradient("outer")["theta"], repeat=1 if "BOME" in name else 3)
        rows.append((name, cost, mem, rel(g, exact), t))
    joint = joint_bome(iters=600, lr=1 / (10 * L), value_lr=1 / L, value_iters=100)
    rows.append(("  … BOME's joint barrier weight (hand-written, lr=1/10L, 600 iters)", "", "", rel(joint, exact),
                 float("nan")))
    return rows


def joint_bome(iters, lr, value_lr, value_iters, eta=0.5):
    """BOME as published, by hand: λ from the inner products over (θ, z) jointly (here ∂f/∂θ = 0, so
    only ‖∇q‖² gains ∇_θ q's part); the θ-direction λ ∇_θ q (+ ∂f/∂θ = 0) at the last z."""
    X, y = TRAIN
    theta = THETA.clone().requires_grad_()
    w = solution(THETA.exp())
    Xv, yv = VAL
    v = 2 * Xv.T @ (Xv @ w - yv) / N

    # value_iters gradient steps on the quadratic lower loss from z: θ^T(z) = w* + (I - αH)^T (z - w*)
    H = X.T @ X / N + torch.diag(THETA.exp())
    contraction = torch.linalg.matrix_power(torch.eye(D, dtype=DT) - value_lr * H, value_iters)

    def grads(z):  # (∇_z L, ∇_θ q), θ^T(z) held constant
        t = w + contraction @ (z - w)
        z = z.detach().requires_grad_()
        r, gz = torch.autograd.grad(inner_loss(z, X, y, theta), (z, theta))
        gt = torch.autograd.grad(inner_loss(t, X, y, theta), theta)[0]
        return r, gz - gt

    def weight(r, q_theta):
        rr = r @ r + q_theta @ q_theta
        return max(eta * rr - v @ r, 0.0) / rr if rr > 0 else 0.0

    z = w.clone()
    for _ in range(iters):
        r, q_theta = grads(z)
        z = z - lr * (v + weight(r, q_theta) * r)
    r, q_theta = grads(z)
    return weight(r, q_theta) * q_theta


def betty_rows(exact):
    """Betty 0.2.1 at its defaults (cg_iterations=1, cg_alpha=1; neumann_iterations=1,
    neumann_alpha=1; darts_alpha=0.01), one engine step; the hypergradient is read off the outer
    parameter's change under SGD(lr=1)."""
    try:
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem
    except Exception as err:  # noqa: BLE001
        return [], f"betty does not import: {type(err).__name__}: {err}"

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return inner_loss(self.module.weight.squeeze(0), x, y, self.outer.module.theta)

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return ((self.inner(x).squeeze(-1) - y) ** 2).mean()

    import logging
    logging.disable(logging.INFO)  # Betty logs every problem's setup at INFO
    rows = []
    settings = [("cg", {}, "defaults: cg_iterations=1"), ("cg", {"cg_iterations": D}, f"cg_iterations={D}"),
                ("neumann", {}, "defaults: neumann_iterations=1, alpha=1"),
                ("darts", {}, "defaults: darts_alpha=0.01")]
    for kind, extra, label in settings:
        net = nn.Linear(D, 1, bias=False).to(DT)
        with torch.no_grad():
            net.weight.copy_(solution(THETA.exp()).unsqueeze(0))
        hyper = ml.Hyper(theta=THETA.clone())
        loader = lambda ds: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*ds), batch_size=N)
        inner = Inner(name="inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1e-6),
                      train_data_loader=loader(TRAIN), config=Config(type=kind, unroll_steps=1, **extra))
        outer = Outer(name="outer", module=hyper, optimizer=torch.optim.SGD(hyper.parameters(), lr=1.0),
                      train_data_loader=loader(VAL), config=Config())
        engine = Engine(config=EngineConfig(train_iters=1), problems=[outer, inner],
                        dependencies={"l2u": {inner: [outer]}, "u2l": {outer: [inner]}})
        before = hyper.theta.detach().clone()
        t0 = time.perf_counter()
        engine.run()
        t = time.perf_counter() - t0
        g = before - hyper.theta.detach()
        rows.append((f"Betty 0.2.1 {kind} ({label})", "", "", rel(g, exact), t))
    return rows, None


def main():
    torch.set_num_threads(1)
    exact, H = closed_form()
    rows, mu, L = mlodsl_rows(exact, H)
    brows, why = betty_rows(exact)
    print(f"Ridge, d={D}, n={N}, float64; H eigenvalues in [{mu:.3g}, {L:.3g}] (condition {L / mu:.3g}); "
          f"torch {torch.__version__}, 1 thread.\n")
    print("| method | cost per hypergradient | memory | relative error ‖g - g*‖/‖g*‖ | time (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, cost, mem, err, t in rows + brows:
        ms = "" if t != t else f"{1e3 * t:.1f}"
        print(f"| {name} | {cost} | {mem} | {err:.2e} | {ms} |")
    if why:
        print(f"\n{why}")


if __name__ == "__main__":
    sys.exit(main())
