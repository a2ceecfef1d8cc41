"""F2SA and BOME, the first-order hypergradient methods, on ridge regression with a per-feature L2
penalty (float64): closed forms of what they compute, convergence to the exact hypergradient as the
penalty grows, the inner steps increase or BOME's step falls, and no second derivative taken."""
import math

import pytest
import torch

import mlodsl as ml

DT = torch.float64
D, N = 4, 16


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * N, D, generator=g, dtype=DT)
    y = X @ torch.randn(D, generator=g, dtype=DT) + 0.3 * torch.randn(2 * N, generator=g, dtype=DT)
    return (X[:N], y[:N]), (X[N:], y[N:])


TRAIN, VAL = _data()
THETA = torch.linspace(-1.0, 0.5, D, dtype=DT)


class _SquareBackward(torch.autograd.Function):
    """Square's backward, 2·x·grad; differentiating it (a second derivative of Square) raises."""

    @staticmethod
    def forward(ctx, grad, x):
        return grad * 2 * x

    @staticmethod
    def backward(ctx, outer_grad):
        raise RuntimeError("a second derivative of Square was taken")


class Square(torch.autograd.Function):
    """x², whose backward is recorded (under create_graph) as a node that raises when reached.
    (``@once_differentiable`` would not do: it cuts the graph silently where the incoming gradient
    is a constant, as under ``.mean()``, and a second derivative would just miss those terms.)"""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _SquareBackward.apply(grad, x)


def _hessian():
    X = TRAIN[0]
    return X.T @ X / N + torch.diag(THETA.exp())


def _solution():
    X, y = TRAIN
    return torch.linalg.solve(_hessian(), X.T @ y / N)


def _upper_cotangent(w):
    """v = ∂f/∂w for f = mean((X_v w - y_v)²)."""
    Xv, yv = VAL
    return 2 * Xv.T @ (Xv @ w - yv) / N


def _exact():
    """∂f/∂θ_i = -λ_i w*_i (H⁻¹ v)_i: the implicit function theorem on ∇_w L = 0."""
    w = _solution()
    return -THETA.exp() * w * torch.linalg.solve(_hessian(), _upper_cotangent(w))


def _program(method, start=None, square=torch.square, steps=1, lr=1e-9):
    """The lower level starts at w* (or ``start``) and takes ``steps`` SGD steps of ``lr``."""
    low = ml.Hyper(w=(_solution() if start is None else start).clone())
    up = ml.Hyper(theta=THETA.clone())

    @ml.level(low, optimizer=ml.optim.sgd(lr=lr), data=TRAIN, steps=steps, hypergrad=method)
    def inner(m, batch, outer):
        x, y = batch
        # a branch on a shape keeps symbolic tracing out, so a custom Function runs as itself
        w = m.w if m.w.shape[0] == D else m.w.flip(0)
        return 0.5 * square(x @ w - y).mean() + 0.5 * (outer.theta.exp() * square(w)).sum()

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), data=VAL, depends_on=[inner])
    def outer(m, batch, inner):
        x, y = batch
        return ((x @ inner.w - y) ** 2).mean()

    return ml.Program(outer)


def _rel(g, ref):
    return ((g - ref).norm() / ref.norm()).item()


def _f2sa_closed_form(w, iters, lr, penalty):
    """What F2SA computes on this problem, by hand. The lower loss is quadratic in w, so from the
    same start the two copies differ by z - y = -n/Λ with n = lr Σ_{j<iters} (I - lr H)^j v, and
    ∇_θ L = ½ λ∘w², so Λ(∇_θ L(z) - ∇_θ L(y)) = -λ∘y∘n + λ∘n²/(2Λ): a Neumann truncation of the
    implicit hypergradient plus a bias of exactly λ∘n²/(2Λ)."""
    H, lam = _hessian(), THETA.exp()
    v = _upper_cotangent(w)
    n, term = torch.zeros_like(v), v.clone()
    for _ in range(iters):
        n = n + lr * term
        term = term - lr * (H @ term)
    return -lam * w * n + lam * n * n / (2 * penalty)


def _lmax():
    return torch.linalg.eigvalsh(_hessian()).max().item()


@pytest.mark.parametrize("iters, penalty", [(3, 10.0), (40, 10.0), (40, 1e3), (8, 1e5)])
def test_f2sa_equals_its_closed_form(iters, penalty):
    lr = 1 / _lmax()
    got = _program(ml.hypergrad.F2SA(iters=iters, lr=lr, penalty=penalty)).hypergradient("outer")["theta"]
    expected = _f2sa_closed_form(_solution(), iters, lr, penalty)
    # Λ(∇L(z) - ∇L(y)) loses log10(Λ) digits to cancellation
    torch.testing.assert_close(got, expected, rtol=1e-13 * penalty, atol=0.0)


def test_f2sa_error_falls_like_one_over_the_penalty():
    """Converged copies (200 steps): the error against the exact hypergradient is the bias λ∘n²/(2Λ),
    so it falls tenfold per decade of Λ (measured: 4.2e-2, 4.2e-3, 4.2e-4, 4.2e-5)."""
    lr, exact = 1 / _lmax(), _exact()
    errors = [_rel(_program(ml.hypergrad.F2SA(iters=200, lr=lr, penalty=p)).hypergradient("outer")["theta"], exact)
              for p in (1e1, 1e2, 1e3, 1e4)]
    assert errors[0] > 1e-2  # the bias is real at a small penalty
    for a, b in zip(errors, errors[1:]):
        assert 9.5 < a / b < 10.5
    assert errors[-1] < 1e-4


def test_f2sa_error_falls_geometrically_with_the_inner_steps():
    """At a large penalty the error is the Neumann series' truncation, ~(1 - μ/L)^iters
    (measured: 0.10, 1.8e-3, 4.3e-8 at 2, 8, 32 steps; the last is the 1/Λ bias at Λ = 1e7)."""
    H = _hessian()
    mu, L = torch.linalg.eigvalsh(H)[0].item(), _lmax()
    exact = _exact()
    errors = {k: _rel(_program(ml.hypergrad.F2SA(iters=k, lr=1 / L, penalty=1e7)).hypergradient("outer")["theta"],
                      exact) for k in (2, 8, 32)}
    assert errors[2] > 1e-2
    assert errors[2] > errors[8] > errors[32]
    assert errors[32] < 5 * (1 - mu / L) ** 32 + 1e-6


def test_paired_copies_cancel_the_lower_levels_optimization_error():
    """The lower level ends 1e-3 away from w*: with paired copies the error is that of the cotangent
    taken at the lower's end (measured 7.0e-3); the unpaired reference adds Λ times the lower's
    residual (measured 141)."""
    lr, penalty = 1 / _lmax(), 1e4
    start = _solution() + 1e-3 * torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=DT)
    exact = _exact()

    def error(paired):
        method = ml.hypergrad.F2SA(iters=200, lr=lr, penalty=penalty, paired=paired)
        return _rel(_program(method, start=start).hypergradient("outer")["theta"], exact)

    paired, unpaired = error(True), error(False)
    assert paired < 1e-2
    assert unpaired > 1.0  # Λ · 1e-3 · ‖H‖: the estimate is dominated by the lower's error


def test_penalty_schedule_reads_the_lower_levels_update_count():
    """penalty=lambda step: ...: Λ at each step is the schedule at the lower's update count
    (2 updates per block), logged as inner/penalty, and the upper's update uses that Λ."""
    lr = 1 / _lmax()
    prog = _program(ml.hypergrad.F2SA(iters=5, lr=lr, penalty=lambda step: 10.0 * step), steps=2)
    w = _solution()
    for t in range(1, 4):
        theta = prog.levels["outer"].module.theta.detach().clone()
        prog.step()
        assert float(prog.history[-1]["inner/penalty"]) == 20.0 * t
        expected = _f2sa_closed_form(w, 5, lr, 20.0 * t)
        if t == 1:  # θ moved afterwards, so the closed form above holds for the first step only
            torch.testing.assert_close(prog.levels["outer"].module.theta.detach(), theta - 0.1 * expected,
                                       rtol=1e-9, atol=1e-12)


def _hand_bome(w, iters, lr, value_iters, value_lr, eta):
    """BOME's barrier loop written with torch.autograd, from the lower's solution w."""
    theta = THETA.clone().requires_grad_()

    def loss(z):
        x, y = TRAIN
        return 0.5 * ((x @ z - y) ** 2).mean() + 0.5 * (theta.exp() * z ** 2).sum()

    def grad_z(z):
        z = z.detach().requires_grad_()
        return torch.autograd.grad(loss(z), z)[0]

    def weight(r):
        rr = r @ r
        return 0.0 if rr == 0 else max(eta * rr - v @ r, 0.0) / rr

    v = _upper_cotangent(w)
    z = w.clone()
    for _ in range(iters):
        r = grad_z(z)
        z = z - lr * (v + weight(r) * r)
    lam = weight(grad_z(z))
    t = z.clone()
    for _ in range(value_iters):
        t = t - value_lr * grad_z(t)
    g_z = torch.autograd.grad(loss(z), theta)[0]
    g_t = torch.autograd.grad(loss(t), theta)[0]
    return lam * (g_z - g_t)


def test_bome_equals_hand_written_barrier_loop():
    L = _lmax()
    method = ml.hypergrad.BOME(iters=30, lr=0.2 / L, value_lr=1 / L, value_iters=7, eta=0.5)
    got = _program(method).hypergradient("outer")["theta"]
    expected = _hand_bome(_solution(), 30, 0.2 / L, 7, 1 / L, 0.5)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_bome_approaches_the_hypergradient_as_its_step_falls():
    """z ends at a distance ~lr from w*, where the barrier weight λ ∝ 1/lr stops growing (the step
    along the barrier's tangent becomes unstable there): the error falls with lr, though not
    monotonically in iters (it oscillates in that regime). Measured with iters = 8·L/(μ·lr·L):
    error 0.22 at lr = 1/(3L), 0.048 at lr = 1/(30L); λ·lr·L = 0.75, 0.79."""
    H = _hessian()
    mu, L = torch.linalg.eigvalsh(H)[0].item(), _lmax()
    exact = _exact()
    errors, scaled_weights = [], []
    for s in (3, 30):
        prog = _program(ml.hypergrad.BOME(iters=math.ceil(8 * s * L / mu), lr=1 / (s * L), value_lr=1 / L,
                                          value_iters=60))
        prog.step()
        errors.append(_rel(prog.hypergradient("outer")["theta"], exact))
        scaled_weights.append(float(prog.history[-1]["inner/barrier_weight"]) / (s * L))  # λ·lr·L
    assert errors[0] > 0.1
    assert errors[1] < errors[0] / 3 and errors[1] < 0.1
    assert 0.8 < scaled_weights[1] / scaled_weights[0] < 1.25  # λ grew tenfold with 1/lr


@pytest.mark.parametrize("method", [ml.hypergrad.F2SA(iters=3, lr=0.2, penalty=50.0),
                                    ml.hypergrad.BOME(iters=3, lr=0.05, value_lr=0.2, value_iters=2)], ids=repr)
def test_the_copies_never_write_the_lower_levels_parameters(method):
    """The copies are updated in place after their first step (eagerly), never the lower level's
    own parameters: a hypergradient leaves them as they were and gives the same numbers twice, and
    a step commits the lower level's two SGD updates, computed here by hand."""
    start = _solution() + 0.1
    prog = _program(method, start=start, steps=2, lr=0.1)
    first = prog.hypergradient("outer")["theta"]
    assert torch.equal(prog.params("inner")["w"], start)
    assert torch.equal(prog.hypergradient("outer")["theta"], first)
    prog.step()
    X, y = TRAIN
    w = start.clone()
    for _ in range(2):
        w = w - 0.1 * (X.T @ (X @ w - y) / N + THETA.exp() * w)
    torch.testing.assert_close(prog.params("inner")["w"], w, rtol=1e-13, atol=1e-15)


@pytest.mark.filterwarnings("ignore::mlodsl.TraceWarning")  # the level runs opaquely, on purpose
def test_no_second_derivative_is_taken():
    """The lower loss squares through an op whose backward cannot be differentiated: a method that
    differentiates twice is refused at build, while F2SA and BOME run and give their numbers."""
    square = Square.apply
    refused = r"(?s)level 'inner'.*CG\(.*no double backward.*second derivative of Square"
    with pytest.raises(ml.ProgramError, match=refused):
        _program(ml.hypergrad.CG(iters=4), square=square)
    L = _lmax()
    f2sa = _program(ml.hypergrad.F2SA(iters=40, lr=1 / L, penalty=1e3), square=square)
    torch.testing.assert_close(f2sa.hypergradient("outer")["theta"], _f2sa_closed_form(_solution(), 40, 1 / L, 1e3),
                               rtol=1e-10, atol=0.0)
    bome = _program(ml.hypergrad.BOME(iters=30, lr=0.2 / L, value_lr=1 / L, value_iters=7), square=square)
    expected = _hand_bome(_solution(), 30, 0.2 / L, 7, 1 / L, 0.5)
    torch.testing.assert_close(bome.hypergradient("outer")["theta"], expected, rtol=1e-9, atol=1e-12)


def test_f2sa_at_the_bottom_is_differentiated_by_an_unrolled_middle():
    """Three levels: the top unrolls the middle's 2 updates, each of which takes F2SA's estimate
    through the bottom's 3 SGD steps, so the top differentiates through F2SA's copies (out of place
    then: a graph is on them). Hand-written with autograd: F2SA's two copies on the tape."""
    g = torch.Generator().manual_seed(5)
    Xc, yc = torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    Xb, yb = torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    target = torch.tensor([0.5, -0.2, 0.1], dtype=DT)

    def loss_c(w, u, a):
        return 0.5 * ((Xc @ w - yc) ** 2).mean() + 0.5 * (u.exp() * w ** 2).sum() + 0.1 * (a * w).sum()

    def loss_b(u, w, a):
        return ((Xb @ w - yb) ** 2).mean() + 0.5 * (a.exp() * u ** 2).sum() + 0.5 * ((u * w) ** 2).sum()

    def loss_a(a, u):
        return ((u - target) ** 2).sum() + 0.1 * (a ** 2).sum()

    u0, w0 = torch.full((3,), -0.5, dtype=DT), torch.linspace(-0.3, 0.3, 3, dtype=DT)
    a0 = torch.tensor([0.2, -0.1, 0.3], dtype=DT)
    iters, lr, penalty = 4, 0.3, 20.0
    C, B, A = ml.Hyper(w=w0.clone()), ml.Hyper(u=u0.clone()), ml.Hyper(a=a0.clone())

    @ml.level(C, optimizer=ml.optim.sgd(lr=0.05), steps=3, hypergrad=ml.hypergrad.F2SA(iters, lr, penalty))
    def bottom(c, middle, top):
        return loss_c(c.w, middle.u, top.a)

    @ml.level(B, optimizer=ml.optim.sgd(lr=0.1), steps=2, depends_on=[bottom], hypergrad=ml.hypergrad.Unroll())
    def middle(b, bottom, top):
        return loss_b(b.u, bottom.w, top.a)

    @ml.level(A, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle])
    def top(t, middle):
        return loss_a(t.a, middle.u)

    got = ml.Program(top).hypergradient("top")["a"]

    def descend(z, u, a, tilt):
        for _ in range(iters):
            z = z - lr * (torch.func.grad(loss_c)(z, u, a) + tilt)
        return z

    a = a0.clone().requires_grad_()
    u, w = u0.clone(), w0.clone()
    for _ in range(2):
        for _ in range(3):
            w = w - 0.05 * torch.func.grad(loss_c)(w, u, a)
        lu, lw = torch.func.grad(loss_b, argnums=(0, 1))(u, w, a)
        z, y = descend(w, u, a, lw / penalty), descend(w, u, a, 0.0)
        estimate = penalty * (torch.func.grad(loss_c, argnums=1)(z, u, a) - torch.func.grad(loss_c, argnums=1)(y, u, a))
        u = u - 0.1 * (lu + estimate)
    (expected,) = torch.autograd.grad(loss_a(a, u), a)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_schedule_needs_the_optimizers_count_and_a_refused_step_changes_nothing():
    """An optimizer without a ``count`` in its state gives the schedule no step: the step raises,
    naming the level and the fix, and leaves the parameters as they were."""
    plain = ml.optim.Optimizer("plain", lambda p: {}, lambda p, g, s, reads: ({k: p[k] - 0.1 * g[k] for k in p}, s),
                               {}, ())
    low, up = ml.Hyper(w=_solution()), ml.Hyper(theta=THETA.clone())

    @ml.level(low, optimizer=plain, data=TRAIN, hypergrad=ml.hypergrad.F2SA(2, 0.1, penalty=lambda step: 1 + step))
    def inner(m, batch, outer):
        x, y = batch
        return 0.5 * ((x @ m.w - y) ** 2).mean() + 0.5 * (outer.theta.exp() * m.w ** 2).sum()

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), data=VAL, depends_on=[inner])
    def outer(m, batch, inner):
        x, y = batch
        return ((x @ inner.w - y) ** 2).mean()

    prog = ml.Program(outer)
    with pytest.raises(ValueError, match=r"level 'inner': F2SA\(penalty=<schedule>\).*count.*give a number"):
        prog.step()
    assert torch.equal(prog.params("inner")["w"], _solution()) and torch.equal(prog.params("outer")["theta"], THETA)


@pytest.mark.parametrize("make", [lambda: ml.hypergrad.F2SA(iters=0, lr=0.1),
                                  lambda: ml.hypergrad.F2SA(iters=3, lr=0.0),
                                  lambda: ml.hypergrad.F2SA(iters=3, lr=0.1, penalty=-1.0),
                                  lambda: ml.hypergrad.BOME(iters=3, lr=0.1, value_lr=-0.1),
                                  lambda: ml.hypergrad.BOME(iters=3.5, lr=0.1, value_lr=0.1)])
def test_bad_settings_are_refused(make):
    with pytest.raises(ValueError, match=r"(F2SA|BOME)\(\w+=\.\.\.\) must be"):
        make()
