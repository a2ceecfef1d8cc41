"""Implicit and approximate hypergradients against closed forms and hand-written autograd (float64)."""

import pytest
import torch
from torch import nn

import mlodsl as ml
from helpers import DT, RIDGE_D, RIDGE_N, ridge_closed_form, ridge_data, ridge_levels, ridge_solution

N, D = RIDGE_N, RIDGE_D
LR = 1e-3  # one SGD step at the closed-form optimum leaves it there (its gradient is ~1e-16)


def ridge(method, log_l2=None, opt=None, steps=1, seed=0, offset=0.0):
    """The ridge bilevel problem with the lower level started at its closed-form optimum (+ offset)."""
    train, val = ridge_data(seed)
    log_l2 = torch.linspace(-2.0, 0.0, D, dtype=DT) if log_l2 is None else log_l2
    net = nn.Linear(D, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(ridge_solution(*train, log_l2.exp()).unsqueeze(0) + offset)
    hyper = ml.Hyper(log_l2=log_l2.clone())

    prog = ridge_levels(net, hyper, train, val, optimizer=opt or ml.optim.sgd(lr=LR), method=method, steps=steps)
    return prog, train, val, log_l2


def hypergradient(method, **kw):
    prog, train, val, log_l2 = ridge(method, **kw)
    expected, parts = ridge_closed_form(train, val, log_l2)
    return prog.hypergradient("outer")["log_l2"], expected, parts


def test_cg_in_d_iterations_equals_the_closed_form():
    got, expected, _ = hypergradient(ml.hypergrad.CG(iters=D))
    assert got.dtype == DT
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_cg_stops_early_at_its_tolerance_and_damping_solves_the_shifted_system():
    loose, expected, p = hypergradient(ml.hypergrad.CG(iters=100, tol=1e-3))
    assert 1e-10 < (loose - expected).abs().max() < 1e-2
    damped, _, p = hypergradient(ml.hypergrad.CG(iters=D, damping=0.5))
    shifted = -p["lam"] * p["w"] * torch.linalg.solve(p["H"] + 0.5 * torch.eye(D, dtype=DT), p["v"])
    torch.testing.assert_close(damped, shifted, rtol=1e-8, atol=1e-10)


def _step_size(p):
    return 1.0 / torch.linalg.eigvalsh(p["H"]).max().item()  # below 2/L


def test_neumann_converges_to_the_closed_form():
    _, expected, p = hypergradient(ml.hypergrad.FirstOrder())
    alpha = _step_size(p)
    few, _, _ = hypergradient(ml.hypergrad.Neumann(iters=5, alpha=alpha))
    many, _, _ = hypergradient(ml.hypergrad.Neumann(iters=600, alpha=alpha))
    torch.testing.assert_close(many, expected, rtol=1e-6, atol=1e-8)
    assert (few - expected).abs().max() > 1e-4  # truncation is visible, then goes away
    # The truncated series is exactly α Σ_{j≤K} (I - αH)^j v:
    M = torch.eye(D, dtype=DT) - alpha * p["H"]
    x = alpha * sum(torch.linalg.matrix_power(M, j) @ p["v"] for j in range(6))
    torch.testing.assert_close(few, -p["lam"] * p["w"] * x, rtol=1e-9, atol=1e-12)


def test_fixed_point_of_sgd_converges_to_the_closed_form():
    _, expected, p = hypergradient(ml.hypergrad.FirstOrder())
    lr = _step_size(p)
    got, _, _ = hypergradient(ml.hypergrad.FixedPoint(iters=600), opt=ml.optim.sgd(lr=lr))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_finite_difference_is_the_implicit_hypergradient_with_identity_hessian():
    """On ridge (quadratic in w) the central difference is exact, so the only error is H⁻¹ ≈ I:
    FiniteDiff = -λ ⊙ w ⊙ v, against the closed form -λ ⊙ w ⊙ H⁻¹v."""
    got, expected, p = hypergradient(ml.hypergrad.FiniteDiff(eps=0.01))
    torch.testing.assert_close(got, -p["lam"] * p["w"] * p["v"], rtol=1e-7, atol=1e-9)
    assert not torch.allclose(got, expected, rtol=0.1)


def test_finite_difference_is_exact_when_the_lower_hessian_is_the_identity():
    """Lower loss ½‖w - tanh(P a)‖² (H = I, nonlinear in the upper a): w*(a) = tanh(P a)."""
    g = torch.Generator().manual_seed(1)
    P = torch.randn(D, 3, generator=g, dtype=DT) / 2
    a0 = torch.tensor([0.3, -0.5, 0.8], dtype=DT)
    target = torch.randn(D, generator=g, dtype=DT)
    W = ml.Hyper(w=torch.tanh(P @ a0))
    A = ml.Hyper(a=a0.clone())

    @ml.level(W, optimizer=ml.optim.sgd(lr=0.5), hypergrad=ml.hypergrad.FiniteDiff(eps=0.01))
    def inner(m, outer):
        return 0.5 * ((m.w - torch.tanh(P @ outer.a)) ** 2).sum()

    @ml.level(A, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return ((inner.w - target) ** 3).sum()

    a = a0.clone().requires_grad_()
    (expected,) = torch.autograd.grad(((torch.tanh(P @ a) - target) ** 3).sum(), a)
    torch.testing.assert_close(ml.Program(outer).hypergradient("outer")["a"], expected, rtol=1e-5, atol=1e-7)


def test_sama_equals_finite_difference_under_sgd():
    fd, _, _ = hypergradient(ml.hypergrad.FiniteDiff(eps=0.01))
    sama, _, _ = hypergradient(ml.hypergrad.SAMA(eps=0.01))
    torch.testing.assert_close(sama, fd, rtol=1e-12, atol=1e-14)


def test_sama_under_adam_preconditions_the_direction_by_adams_jacobian():
    """-λ ⊙ w ⊙ (D v), D = ∂u/∂g of the next Adam direction u = m̂/(√v̂ + ε), by hand."""
    b1, b2, e = 0.9, 0.999, 1e-8
    # Away from the optimum: at it, g ≈ 0 and Adam's direction ≈ sign(g) has D ~ 1/ε (ill-posed).
    prog, train, val, log_l2 = ridge(ml.hypergrad.SAMA(eps=0.01), opt=ml.optim.adam(lr=1e-3), steps=3, offset=0.1)
    got = prog.hypergradient("outer")["log_l2"]
    # Re-run the 3 Adam steps by hand to get (w, m, v) where the block ends.
    (X, y), (Xv, yv) = train, val
    lam = log_l2.exp()
    w = prog.params("inner")["weight"].squeeze(0).clone()
    m, s = torch.zeros(D, dtype=DT), torch.zeros(D, dtype=DT)
    grad = lambda w: X.T @ (X @ w - y) / N + lam * w
    for t in range(1, 4):
        gr = grad(w)
        m, s = b1 * m + (1 - b1) * gr, b2 * s + (1 - b2) * gr * gr
        w = w - 1e-3 * (m / (1 - b1 ** t)) / (torch.sqrt(s / (1 - b2 ** t) + 1e-16) + e)
    gr, t = grad(w), 4
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    mn, sn = b1 * m + (1 - b1) * gr, b2 * s + (1 - b2) * gr * gr
    root = torch.sqrt(sn / c2 + 1e-16)
    D_ = (1 - b1) / c1 / (root + e) - (mn / c1) * ((1 - b2) * gr / c2 / root) / (root + e) ** 2
    v = 2 * Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    torch.testing.assert_close(got, -lam * w * (D_ * v), rtol=1e-7, atol=1e-9)


def test_zero_order_matches_the_unrolled_hypergradient_within_its_statistical_error():
    """ES estimates the total derivative of the block's updates; compare with autograd through
    the same 2 SGD steps. Its per-coordinate standard error for n antithetic samples of a
    (nearly) linear g with gradient a is √((‖a‖² + a_j²)/n)."""
    lr, samples, seeds = 0.3, 50, 8
    # Off the optimum, so that the two steps depend on log_l2 noticeably.
    prog, train, val, log_l2 = ridge(ml.hypergrad.ZeroOrder(samples=samples, sigma=1e-3), opt=ml.optim.sgd(lr=lr),
                                     steps=2, log_l2=torch.linspace(-1.0, 0.0, D, dtype=DT), offset=0.1)
    (X, y), (Xv, yv) = train, val
    ll = log_l2.clone().requires_grad_()
    wk = prog.params("inner")["weight"].squeeze(0).clone()
    for _ in range(2):
        wk = wk - lr * (X.T @ (X @ wk - y) / N + ll.exp() * wk)
    (expected,) = torch.autograd.grad(((Xv @ wk - yv) ** 2).mean(), ll)
    estimates = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        estimates.append(prog.hypergradient("outer")["log_l2"])
    mean = torch.stack(estimates).mean(0)
    stderr = torch.sqrt((expected.norm() ** 2 + expected ** 2) / (samples * seeds))
    assert ((mean - expected).abs() <= 4 * stderr).all(), (mean, expected, stderr)
    assert torch.stack(estimates).std(0).max() > 0  # it is random
    torch.manual_seed(3)
    again = prog.hypergradient("outer")["log_l2"]
    torch.testing.assert_close(again, estimates[3], rtol=0, atol=0)  # and repeatable from the seed


# Three levels: top (a) ─depends_on→ middle (u) ─depends_on→ bottom (w); the bottom reads both.
D3, N3, LR_C, LR_B = 4, 12, 0.05, 0.1


def _three_data():
    g = torch.Generator().manual_seed(5)
    Xc, Xb = torch.randn(N3, D3, generator=g, dtype=DT), torch.randn(N3, D3, generator=g, dtype=DT)
    return Xc, torch.randn(N3, generator=g, dtype=DT), Xb, torch.randn(N3, generator=g, dtype=DT)


Xc, yc, Xb, yb = _three_data()
T3 = torch.tensor([0.5, -0.2, 0.1, 0.3], dtype=DT)


def loss_c(w, u, a):  # quadratic in w: w*(u, a) in closed form
    return 0.5 * ((Xc @ w - yc) ** 2).mean() + 0.5 * (u.exp() * w ** 2).sum() + 0.1 * (a * w).sum()


def loss_b(u, w, a):
    return ((Xb @ w - yb) ** 2).mean() + 0.5 * (a.exp() * u ** 2).sum() + 0.5 * ((u * w) ** 2).sum()


def loss_a(a, u):
    return ((u - T3) ** 2).sum() + 0.1 * (a ** 2).sum()


def three_levels(u0, w0, a0, method_b, method_c, steps_b=1, steps_c=1, compile=False):
    C, B, A = ml.Hyper(w=w0.clone()), ml.Hyper(u=u0.clone()), ml.Hyper(a=a0.clone())

    @ml.level(C, optimizer=ml.optim.sgd(lr=LR_C), steps=steps_c, hypergrad=method_c)
    def bottom(c, middle, top):
        return loss_c(c.w, middle.u, top.a)

    @ml.level(B, optimizer=ml.optim.sgd(lr=LR_B), steps=steps_b, depends_on=[bottom], hypergrad=method_b)
    def middle(b, bottom, top):
        return loss_b(b.u, bottom.w, top.a)

    @ml.level(A, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle])
    def top(t, middle):
        return loss_a(t.a, middle.u)

    return ml.Program(top, compile=compile)


def w_star(u, a):
    """argmin_w loss_c: (XcᵀXc/n + diag eᵘ) w = Xcᵀyc/n - 0.1 a."""
    return torch.linalg.solve(Xc.T @ Xc / N3 + torch.diag(u.exp()), Xc.T @ yc / N3 - 0.1 * a)


def middle_stationarity(u, a):
    """Φ(u, a) = d/du loss_b(u, w*(u, a), a), the total gradient of the middle level."""
    return torch.func.grad(lambda u_: loss_b(u_, w_star(u_, a), a))(u)


def joint_solution(a):
    """Newton on Φ(u, a) = 0 (hand-written, with dense Jacobians): the middle level's solution."""
    u = torch.zeros(D3, dtype=DT)
    for _ in range(30):
        u = u - torch.linalg.solve(torch.func.jacrev(middle_stationarity)(u, a), middle_stationarity(u, a))
    assert middle_stationarity(u, a).abs().max() < 1e-13
    return u


A0 = torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=DT)


def test_three_levels_implicit_in_the_middle_is_betty_semantics_and_close_to_the_true_derivative():
    """Start the middle and bottom at their joint solution; with CG at the bottom too, the middle's
    program gradient is its total gradient Φ, zero there, so a step leaves both in place. The true
    derivative of F(a) = loss_a(a, u**(a)) is by the implicit function theorem on Φ(u, a) = 0,
    with Φ the middle's *total* gradient (through w*). The implicit method in the middle linearizes
    its *partial* stationarity ∇_u loss_b with the bottom held (docs/hypergradients.md), so it equals
    ∂F/∂a - ∂²loss_b/∂a∂u (∂²loss_b/∂u²)⁻¹ ∂F/∂u at fixed w (to 1e-8), and differs from the true
    derivative by the bottom's response to u, here 0.206 relative (documented in docs/hypergradients.md)."""
    u, a = joint_solution(A0), A0
    w = w_star(u, a)
    prog = three_levels(u, w, a, ml.hypergrad.CG(iters=D3), ml.hypergrad.CG(iters=D3))
    got = prog.hypergradient("top")["a"]

    Ju, Ja = torch.func.jacrev(middle_stationarity, argnums=(0, 1))(u, a)
    fu, fa = torch.func.grad(loss_a, argnums=(0, 1))(a, u)[::-1]
    true = fa - Ja.T @ torch.linalg.solve(Ju.T, fu)

    Huu = torch.func.hessian(loss_b)(u, w, a)
    Hau = torch.func.jacrev(torch.func.grad(loss_b), argnums=2)(u, w, a)  # ∂(∇_u loss_b)/∂a
    betty = fa - Hau.T @ torch.linalg.solve(Huu, fu)

    torch.testing.assert_close(got, betty, rtol=1e-8, atol=1e-10)
    rel = ((got - true).norm() / true.norm()).item()
    assert 0.19 < rel < 0.22, rel  # the documented cost of holding the bottom level


@pytest.mark.parametrize("method_c", [ml.hypergrad.CG(iters=D3), ml.hypergrad.Neumann(iters=400, alpha=0.5),
                                      ml.hypergrad.FixedPoint(iters=400)], ids=repr)
def test_implicit_at_the_bottom_is_differentiated_by_the_unrolled_middle(method_c):
    """The top unrolls the middle's 2 updates, each of which takes an implicit hypergradient through
    the bottom's 3 unrolled steps: the top differentiates through the solver's products. Hand-written:

        g_u = ∂loss_b/∂u - eᵘ ⊙ w ⊙ H_c⁻¹ ∂loss_b/∂w,  H_c = XcᵀXc/n + diag eᵘ,  w = 3 SGD steps.
    """
    u0, w0 = torch.full((D3,), -0.5, dtype=DT), torch.linspace(-0.3, 0.3, D3, dtype=DT)
    prog = three_levels(u0, w0, A0, ml.hypergrad.Unroll(), method_c, steps_b=2, steps_c=3)
    got = prog.hypergradient("top")["a"]

    a = A0.clone().requires_grad_()
    u, w = u0.clone().requires_grad_(), w0.clone().requires_grad_()
    for _ in range(2):
        for _ in range(3):
            w = w - LR_C * torch.func.grad(loss_c)(w, u, a)  # partial in w (u was computed from w)
        lu, lw = torch.func.grad(loss_b, argnums=(0, 1))(u, w, a)  # partials (w depends on u on the tape)
        Hc = Xc.T @ Xc / N3 + torch.diag(u.exp())
        u = u - LR_B * (lu - u.exp() * w * torch.linalg.solve(Hc, lw))
    (expected,) = torch.autograd.grad(loss_a(a, u), a)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_two_lower_levels_with_matrix_parameters_each_with_its_own_method():
    """An upper p (a 2×3 matrix) under two lowers: a Linear(3, 2) (weight and bias) with per-weight
    L2 exp(p), solved by CG, and a 2×2 matrix pulled toward tanh of p's first columns, by FixedPoint.
    Reference: the dense implicit formula -Bᵀ H⁻¹ v at each lower's final point, by hand."""
    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT)
    Xv, Yv = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT)
    lin = nn.Linear(3, 2).to(DT)
    M = ml.Hyper(m=torch.full((2, 2), 0.1, dtype=DT))
    P = ml.Hyper(p=torch.full((2, 3), -1.0, dtype=DT))
    W0, b0, m0, p0 = lin.weight.detach().clone(), lin.bias.detach().clone(), M.m.detach().clone(), P.p.detach().clone()

    def loss1(W, b, p):
        return 0.5 * ((X @ W.T + b - Y) ** 2).mean() + 0.5 * (p.exp() * W ** 2).sum()

    def loss2(m, p):
        return 0.5 * ((m - torch.tanh(p[:, :2])) ** 2).sum() + 0.25 * (m ** 4).sum()

    def upper(W, b, m):
        return ((Xv @ W.T + b + Xv[:, :2] @ m - Yv) ** 2).mean()

    @ml.level(lin, optimizer=ml.optim.sgd(lr=0.1), steps=2, hypergrad=ml.hypergrad.CG(iters=8))
    def first(net, top):
        return loss1(net.weight, net.bias, top.p)

    @ml.level(M, optimizer=ml.optim.sgd(lr=0.3), steps=2, hypergrad=ml.hypergrad.FixedPoint(iters=300))
    def second(mod, top):
        return loss2(mod.m, top.p)

    @ml.level(P, optimizer=ml.optim.sgd(lr=0.1), depends_on=[first, second])
    def top(mod, first, second):
        return upper(first.weight, first.bias, second.m)

    got = ml.Program(top).hypergradient("top")["p"]

    W, b, m = W0, b0, m0
    for _ in range(2):
        gW, gb = torch.func.grad(loss1, argnums=(0, 1))(W, b, p0)
        W, b = W - 0.1 * gW, b - 0.1 * gb
        m = m - 0.3 * torch.func.grad(loss2)(m, p0)
    vW, vb, vm = torch.func.grad(upper, argnums=(0, 1, 2))(W, b, m)

    def flat1(z, p):  # loss1 over the flat vector (W, b)
        return loss1(z[:6].reshape(2, 3), z[6:], p)

    z = torch.cat([W.reshape(-1), b])
    H1 = torch.func.hessian(flat1)(z, p0)
    B1 = torch.func.jacrev(torch.func.grad(flat1), argnums=1)(z, p0).reshape(8, 6)  # ∂(∇_z)/∂p
    H2 = torch.func.hessian(lambda x: loss2(x.reshape(2, 2), p0))(m.reshape(-1))
    B2 = torch.func.jacrev(lambda p: torch.func.grad(loss2)(m, p).reshape(-1))(p0).reshape(4, 6)
    expected = -(B1.T @ torch.linalg.solve(H1, torch.cat([vW.reshape(-1), vb])) +
                 B2.T @ torch.linalg.solve(H2, vm.reshape(-1))).reshape(2, 3)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore::mlodsl.TraceWarning")
@pytest.mark.parametrize("method", [ml.hypergrad.CG(iters=5), ml.hypergrad.FiniteDiff()], ids=repr)
def test_buffers_are_the_same_before_and_after_a_hypergradient(method):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, generator=g, dtype=DT)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    hyper = ml.Hyper(l=torch.zeros((), dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=(X, y), steps=2, hypergrad=method)
    def inner(net, batch, outer):
        x, t = batch
        return ((net(x).squeeze(-1) - t) ** 2).mean() + outer.l.exp() * (net[0].weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=(X, y), depends_on=[inner])
    def outer(h, batch, inner):
        x, t = batch
        return ((inner(x).squeeze(-1) - t) ** 2).mean()

    prog = ml.Program(outer)
    assert not prog.levels["inner"].traced.opaque  # BatchNorm traces: its buffers are graph inputs
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prog.hypergradient("outer")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # A step advances the running statistics by the inner level's own 2 updates, nothing more.
    prog.step()
    assert int(net[1].num_batches_tracked) == 2
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])


def test_solver_diagnostics_reach_the_metrics():
    prog, *_ = ridge(ml.hypergrad.CG(iters=2))
    row = prog.step()
    assert 0 < row["inner/cg_residual"] < 1  # two of six CG iterations: not yet converged
    prog, *_ = ridge(ml.hypergrad.CG(iters=D))
    assert prog.step()["inner/cg_residual"] < 1e-8
    prog, train, val, log_l2 = ridge(ml.hypergrad.Neumann(iters=3, alpha=0.1))
    assert 0 < prog.step()["inner/neumann_change"] < 1


@pytest.mark.parametrize("iters", [2, 5])
def test_conjugate_gradient_readout_sums_the_mapped_directions_without_forming_x(iters):
    """CG with ``readout``: ``matvec`` gives (A p, M p) and the result is M x, summed over CG's
    directions. Exact (5 iterations on a 5-dimensional SPD system): M A⁻¹ b by torch.linalg.solve;
    a partial solve (2 iterations): M times the x the plain CG forms, with the same residual."""
    from mlodsl.hypergrad.linear import conjugate_gradient
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A, M = q @ q.T + 0.5 * torch.eye(5, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    info_x, info_m = {}, {}
    x = conjugate_gradient(lambda p: {"w": A @ p["w"]}, b, iters=iters, info=info_x)
    mx = conjugate_gradient(lambda p: ({"w": A @ p["w"]}, {"u": M @ p["w"]}), b, iters=iters, info=info_m,
                            readout={"u": torch.zeros(3, dtype=torch.float64)})
    torch.testing.assert_close(mx["u"], M @ x["w"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(info_m["cg_residual"], info_x["cg_residual"], rtol=0, atol=0)
    if iters == 5:
        torch.testing.assert_close(mx["u"], M @ torch.linalg.solve(A, b["w"]), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_cg_without_x_and_its_generated_source_give_the_closed_form(damping):
    """CG sums the mixed products of its directions instead of forming x, in ``solution_vjp`` and in
    the lines it hands the generated step (``source``, run here with the names the step binds).
    On L(θ, u) = ½ θᵀAθ - θᵀMᵀu (H = A, ∂²L/∂u∂θ = -M) with d = 4 iterations on d = 4 parameters,
    both are M (A + damping·I)⁻¹ v."""
    from mlodsl.hypergrad import linear, products
    from mlodsl.hypergrad.base import Solution
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 4, generator=g, dtype=DT)
    A, M = q @ q.T + torch.eye(4, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)
    v = {"w": torch.randn(4, generator=g, dtype=DT)}

    def loss(own, upper):
        return 0.5 * own["w"] @ (A @ own["w"]) - own["w"] @ (M.T @ upper["u"])

    reports = {}
    sol = Solution("low", {"w": torch.randn(4, generator=g, dtype=DT)}, {"u": torch.randn(3, generator=g, dtype=DT)},
                   loss, {}, reports.__setitem__)
    expected = M @ torch.linalg.solve(A + damping * torch.eye(4, dtype=DT), v["w"])
    cg = ml.hypergrad.CG(iters=4, damping=damping)
    torch.testing.assert_close(cg.solution_vjp(sol, v)["u"], expected, rtol=1e-9, atol=1e-10)
    assert float(reports["cg_residual"]) < 1e-8
    namespace = {"products": products, "linear": linear, "solution": sol, "v": v, "info": {}}
    exec("def vjp():\n" + "\n".join("    " + line for line in cg.source("method['low']")), namespace)
    torch.testing.assert_close(namespace["vjp"]()["u"], expected, rtol=1e-9, atol=1e-10)
    assert float(namespace["info"]["cg_residual"]) < 1e-8
