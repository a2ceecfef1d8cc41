"""A lower level solved by the user's solver (``ml.optim.solver``), differentiated implicitly:
against the closed-form ridge hypergradient and a hand-written implicit-function-theorem reference (float64)."""

import pytest
import torch
from torch import nn

import mlodsl as ml
from helpers import (DT, RIDGE_D, inner_loss_fn, logreg_data, outer_loss_fn, ridge_closed_form, ridge_data,
                     ridge_levels, ridge_solution)

D = RIDGE_D


def closed_form_ridge(params, batch, outer):
    """The user's solver: the lower level's minimizer in closed form (one linear solve)."""
    x, y = batch
    return {"weight": ridge_solution(x, y, outer.log_l2.exp()).unsqueeze(0)}


def ridge_program(hypergrad=None, solve=closed_form_ridge, compile=False):
    train, val = ridge_data()
    log_l2 = torch.linspace(-2.0, 0.0, D, dtype=DT)
    net = nn.Linear(D, 1, bias=False).to(DT)
    nn.init.zeros_(net.weight)  # far from the solution: only the solver puts it there
    hyper = ml.Hyper(log_l2=log_l2.clone())

    prog = ridge_levels(net, hyper, train, val, optimizer=ml.optim.solver(solve), method=hypergrad, compile=compile)
    return prog, train, val, log_l2


@pytest.mark.parametrize("hypergrad", [None, ml.hypergrad.Implicit(
    lambda matvec, b: _dense_solve(matvec, b))], ids=["default CG", "Implicit dense solve"])
def test_ridge_solved_in_closed_form_has_the_closed_form_hypergradient(hypergrad):
    prog, train, val, log_l2 = ridge_program(hypergrad)
    expected, parts = ridge_closed_form(train, val, log_l2)
    w = parts["w"]
    got = prog.hypergradient("outer")["log_l2"]
    assert got.dtype == DT
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert expected.abs().min() > 1e-4  # a hypergradient that would not notice a wrong solve is no test

    prog.step()  # the solver puts inner at w*(λ); outer takes one SGD step along the hypergradient
    torch.testing.assert_close(prog.params("inner")["weight"].squeeze(0), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(prog.params("outer")["log_l2"], log_l2 - 0.1 * expected, rtol=0, atol=1e-10)


def _dense_solve(matvec, b):
    """H x = b by building H column by column from matvec and one dense solve (b: a dict of tensors)."""
    names = list(b)
    flat = torch.cat([b[k].reshape(-1) for k in names])
    sizes = [b[k].numel() for k in names]

    def unflatten(x):
        return dict(zip(names, (p.reshape(b[k].shape) for k, p in zip(names, torch.split(x, sizes)))))

    columns = [torch.cat([v.reshape(-1) for v in matvec(unflatten(e)).values()])
               for e in torch.eye(flat.numel(), dtype=flat.dtype)]
    return unflatten(torch.linalg.solve(torch.stack(columns, 1), flat))


def newton_logistic(params, batch, outer, steps=25):
    """The user's solver: Newton's method on L2-regularized logistic regression, written by hand."""
    x, y = batch
    lam = outer.log_l2.exp()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    reg = torch.cat([2 * lam, torch.zeros(1, dtype=x.dtype)])
    theta = torch.cat([params["w"], params["b"].reshape(1)])
    for _ in range(steps):
        p = torch.sigmoid(xa @ theta)
        grad = xa.T @ (p - y) / len(x) + reg * theta
        hess = xa.T @ (xa * (p * (1 - p)).unsqueeze(1)) / len(x) + torch.diag(reg)
        theta = theta - torch.linalg.solve(hess, grad)
    return {"w": theta[:-1], "b": theta[-1]}


def test_logistic_solved_by_newton_matches_the_implicit_function_theorem():
    train, val = logreg_data(d=4)
    log_l2 = torch.tensor([-3.0, -2.0, -1.5, -1.0], dtype=DT)
    lower = ml.Hyper(w=torch.zeros(4, dtype=DT), b=torch.zeros((), dtype=DT))
    hyper = ml.Hyper(log_l2=log_l2.clone())

    @ml.level(lower, optimizer=ml.optim.solver(newton_logistic), data=train)
    def inner(lower, batch, outer):
        return inner_loss_fn(lower.w, lower.b, outer.log_l2, batch)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        return outer_loss_fn(inner.w, inner.b, batch)

    prog = ml.Program(outer)
    got = prog.hypergradient("outer")["log_l2"]

    # Reference: θ* by the same Newton solve, then -∂²L/∂λ∂θ H⁻¹ ∇_θ f by hand-written autograd.
    sol = newton_logistic({"w": torch.zeros(4, dtype=DT), "b": torch.zeros((), dtype=DT)}, train,
                          ml.optim.params_view({"log_l2": log_l2}))
    theta = torch.cat([sol["w"], sol["b"].reshape(1)])

    def lower_loss(t, h):
        return inner_loss_fn(t[:-1], t[-1], h, train)

    grad_theta = torch.func.grad(lower_loss)
    assert grad_theta(theta, log_l2).abs().max() < 1e-12  # the solve is at the optimum
    H = torch.func.hessian(lower_loss)(theta, log_l2)
    mixed = torch.func.jacrev(grad_theta, argnums=1)(theta, log_l2)  # ∂(∇_θ L)/∂log_l2
    v = torch.func.grad(lambda t: outer_loss_fn(t[:-1], t[-1], val))(theta)
    expected = -mixed.T @ torch.linalg.solve(H, v)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)
    assert expected.abs().min() > 1e-4


def test_lbfgs_inside_the_solver_reaches_the_same_hypergradient():
    """A solver that runs torch.optim.LBFGS (with autograd of its own, under enable_grad)."""
    def lbfgs(params, batch, outer):
        x, y = batch
        w = params["weight"].clone().requires_grad_()
        opt = torch.optim.LBFGS([w], lr=1, max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((x @ w.squeeze(0) - y) ** 2).mean() + 0.5 * (outer.log_l2.exp() * w.squeeze(0) ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return {"weight": w.detach()}

    prog, train, val, log_l2 = ridge_program(solve=lbfgs)
    expected, _ = ridge_closed_form(train, val, log_l2)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", [ml.hypergrad.Unroll(), ml.hypergrad.Forward(), ml.hypergrad.FixedPoint(5)])
def test_a_method_that_differentiates_the_updates_is_refused_at_build(method):
    with pytest.raises(ml.ProgramError) as err:
        ridge_program(method)
    message = str(err.value)
    assert "level 'inner'" in message and repr(method) in message
    assert "ml.hypergrad.CG(iters=...)" in message


def test_a_wrong_or_non_finite_solution_is_refused_and_nothing_is_committed():
    def wrong(params, batch, outer):
        return {"weight": torch.zeros(D, dtype=DT)}  # the shape of w, not of net.weight (1, D)

    def diverged(params, batch, outer):
        return {"weight": torch.full((1, D), float("nan"), dtype=DT)}

    for solve, error, match in [(wrong, TypeError, "level 'inner': .* another shape or dtype"),
                                (diverged, FloatingPointError, "level 'inner': .* non-finite values in"
                                                               r" \['weight'\]")]:
        prog, *_ = ridge_program(solve=solve)
        before = prog.params("outer")["log_l2"].clone()
        with pytest.raises(error, match=match):
            prog.step()
        torch.testing.assert_close(prog.params("outer")["log_l2"], before, rtol=0, atol=0)
        assert prog.params("inner")["weight"].abs().max() == 0  # nothing committed


def test_solver_signature_is_checked_when_written():
    with pytest.raises(TypeError, match="must take"):
        ml.optim.solver(lambda params: params)
    assert ml.optim.solver(closed_form_ridge).reads == ("outer",)


def test_unrolling_a_level_above_the_solved_one_is_refused_at_build():
    """Unroll at the middle level replays its updates, which run the solver: refused, naming both levels."""
    train, val = ridge_data()
    net = nn.Linear(D, 1, bias=False).to(DT)
    mid = ml.Hyper(log_l2=torch.zeros(D, dtype=DT))
    top = ml.Hyper(c=torch.ones((), dtype=DT))

    def solve(params, batch, middle):
        return {"weight": ridge_solution(*batch, middle.log_l2.exp()).unsqueeze(0)}

    @ml.level(net, optimizer=ml.optim.solver(solve), data=train)
    def inner(net, batch, middle):
        x, y = batch
        return 0.5 * ((net(x).squeeze(-1) - y) ** 2).mean() + 0.5 * (middle.log_l2.exp() * net.weight ** 2).sum()

    @ml.level(mid, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner], hypergrad=ml.hypergrad.Unroll())
    def middle(mid, batch, inner, outer):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean() + outer.c * (mid.log_l2 ** 2).sum()

    @ml.level(top, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[middle])
    def outer(top, batch, middle):
        return (middle.log_l2 ** 2).sum() + top.c ** 2

    with pytest.raises(ml.ProgramError, match=r"level 'inner' is solved by .* but hypergrad=Unroll\(\) of "
                                              r"level 'middle' above it differentiates the updates"):
        ml.Program(outer)


def test_a_solved_level_with_lower_levels_and_grad_accum_are_refused_at_build():
    train, val = ridge_data()
    bottom = ml.Hyper(s=torch.zeros((), dtype=DT))
    solved = ml.Hyper(w=torch.zeros(D, dtype=DT))
    top = ml.Hyper(c=torch.ones((), dtype=DT))

    @ml.level(bottom, optimizer=ml.optim.sgd(lr=0.1), data=train)
    def low(bottom, batch, mid):
        return (bottom.s - mid.w.sum()) ** 2

    @ml.level(solved, optimizer=ml.optim.solver(lambda params, batch: params), data=train, depends_on=[low],
              hypergrad=ml.hypergrad.CG(iters=D))
    def mid(solved, batch, low, outer):
        x, y = batch
        return ((x @ solved.w - y) ** 2).mean() + low.s ** 2 + outer.c * (solved.w ** 2).sum()

    @ml.level(top, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[mid])
    def outer(top, batch, mid):
        return (mid.w ** 2).sum() + top.c ** 2

    with pytest.raises(ml.ProgramError, match=r"level 'mid' is solved by .* it has lower levels \['low'\]"):
        ml.Program(outer)
    with pytest.raises(ml.ProgramError, match="level 'inner' .* grad_accum=2 .* use grad_accum=1"):
        ml.Program(ridge_program()[0].levels["outer"].level, grad_accum=2)

