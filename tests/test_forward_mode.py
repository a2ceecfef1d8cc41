"""How CG takes its Hessian products, decided at build (``mlodsl.forward_mode``): reverse over
forward for a large eager level whose loss has forward-mode derivatives, the linearization
otherwise, the user's ``low_memory`` first; hypergradients against closed forms (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from helpers import DT, RIDGE_D, SquareWithoutJvp, ridge_closed_form, ridge_data, ridge_levels, ridge_solution
from mlodsl import autodiff, forward_mode

GRID = torch.tensor([[[[-0.6, -0.3], [0.1, 0.4], [0.7, -0.8]]]], dtype=DT)  # (1, 1, 3, 2): three points


def _sampled(w):
    """grid_sample of w seen as a 2×(d/2) image at GRID's points: linear in w, and grid_sampler_2d has
    a double backward but no forward-mode derivative in torch 2.13."""
    return F.grid_sample(w.reshape(1, 1, 2, RIDGE_D // 2), GRID, align_corners=False).reshape(-1)


def _program(method, sampled=False, opaque=False):
    """The ridge program at its exact lower solution, optionally with ½‖G w‖² (G: ``_sampled``) added
    to the lower loss; and the closed-form hypergradient -λ ⊙ w* ⊙ H⁻¹ v."""
    train, val = ridge_data(0)
    log_l2 = torch.linspace(-2.0, 0.0, RIDGE_D, dtype=DT)
    lam = log_l2.exp()
    if not sampled and not opaque:
        net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
        with torch.no_grad():
            net.weight.copy_(ridge_solution(*train, lam).unsqueeze(0))
        hyper = ml.Hyper(log_l2=log_l2.clone())
        return ridge_levels(net, hyper, train, val, optimizer=ml.optim.sgd(lr=1e-3), method=method), \
            ridge_closed_form(train, val, log_l2)[0]
    (X, y), (Xv, yv) = train, val
    G = torch.autograd.functional.jacobian(_sampled, torch.zeros(RIDGE_D, dtype=DT)) if sampled else \
        torch.zeros(0, RIDGE_D, dtype=DT)
    H = X.T @ X / X.shape[0] + torch.diag(lam) + G.T @ G
    w = torch.linalg.solve(H, X.T @ y / X.shape[0])
    v = 2 * Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    expected = -lam * w * torch.linalg.solve(H, v)
    net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(w.unsqueeze(0))
    hyper = ml.Hyper(log_l2=log_l2.clone())

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        w = net.weight.squeeze(0)
        if opaque and float(w.detach().sum()) > 1e9:  # a value-dependent branch: the level runs as an opaque call
            w = 2 * w
        penalty = 0.5 * (_sampled(w) ** 2).sum() if sampled else 0.0
        return 0.5 * ((net(x).squeeze(-1) - y) ** 2).mean() + 0.5 * (outer.log_l2.exp() * w ** 2).sum() + penalty

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    return ml.Program(outer), expected


def _assert_linearized_and_exact(prog, expected, monkeypatch):
    """The plan kept the linearization, the hypergradient took no reverse-over-forward product, and
    it equals ``expected``."""
    assert prog.plan.levels["inner"].afresh is False
    got, forward_products = _hypergradient_counting_forward_products(prog, monkeypatch)
    assert forward_products == 0
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def _hypergradient_counting_forward_products(prog, monkeypatch) -> tuple:
    """``prog.hypergradient("outer")`` and how many products it took by reverse over forward."""
    calls = []
    original = autodiff.reverse_over_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(autodiff, "reverse_over_forward", counting)
    return prog.hypergradient("outer")["log_l2"], len(calls)


def test_a_large_level_whose_loss_has_forward_derivatives_gets_reverse_over_forward(monkeypatch):
    monkeypatch.setattr(forward_mode, "LOW_MEMORY_FROM", RIDGE_D)  # the ridge level counts as large
    prog, expected = _program(ml.hypergrad.CG(iters=RIDGE_D))
    assert prog.plan.levels["inner"].afresh is True
    got, forward_products = _hypergradient_counting_forward_products(prog, monkeypatch)
    assert forward_products == RIDGE_D  # one per CG iteration: no linearization was kept
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_a_small_level_and_the_users_false_keep_the_linearization(monkeypatch):
    prog, expected = _program(ml.hypergrad.CG(iters=RIDGE_D))  # RIDGE_D parameters: below LOW_MEMORY_FROM
    assert forward_mode.LOW_MEMORY_FROM > RIDGE_D
    _assert_linearized_and_exact(prog, expected, monkeypatch)

    monkeypatch.setattr(forward_mode, "LOW_MEMORY_FROM", 1)
    prog, expected = _program(ml.hypergrad.CG(iters=RIDGE_D, low_memory=False))
    _assert_linearized_and_exact(prog, expected, monkeypatch)


def test_an_op_without_forward_derivative_keeps_the_linearization_and_true_is_refused(monkeypatch):
    monkeypatch.setattr(forward_mode, "LOW_MEMORY_FROM", 1)
    prog, expected = _program(ml.hypergrad.CG(iters=RIDGE_D), sampled=True)
    _assert_linearized_and_exact(prog, expected, monkeypatch)  # the probe met grid_sampler_2d

    with pytest.raises(ml.ProgramError) as err:
        _program(ml.hypergrad.CG(iters=RIDGE_D, low_memory=True), sampled=True)
    message = str(err.value)
    assert "level 'inner'" in message and "'grid_sampler_2d'" in message and "low_memory=False" in message


def test_true_with_a_custom_function_without_jvp_is_refused_naming_it():
    train, val = ridge_data(0)
    net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
    hyper = ml.Hyper(log_l2=torch.zeros(RIDGE_D, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train, hypergrad=ml.hypergrad.CG(iters=2, low_memory=True))
    def inner(net, batch, outer):
        x, y = batch
        penalty = outer.log_l2.exp() * SquareWithoutJvp.apply(net.weight[0])
        return 0.5 * ((net(x).squeeze(-1) - y) ** 2).mean() + penalty.sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    with pytest.raises(ml.ProgramError) as err:
        ml.Program(outer)
    message = str(err.value)
    assert "level 'inner'" in message and "'SquareWithoutJvp'" in message
    assert "jvp" in message and "low_memory=False" in message


@pytest.mark.filterwarnings("ignore:level 'inner' could not be traced")
def test_an_opaque_level_keeps_the_linearization(monkeypatch):
    monkeypatch.setattr(forward_mode, "LOW_MEMORY_FROM", 1)
    prog, expected = _program(ml.hypergrad.CG(iters=RIDGE_D), opaque=True)
    assert prog.levels["inner"].traced.opaque  # the value-dependent branch could not be traced
    _assert_linearized_and_exact(prog, expected, monkeypatch)


def test_the_build_probe_leaves_the_random_stream_as_it_was(monkeypatch):
    """A lower loss with dropout: the probe's evaluation draws, and gives the draws back."""
    monkeypatch.setattr(forward_mode, "LOW_MEMORY_FROM", 1)
    states = {}
    for low_memory in (False, None):  # not probed, then probed
        torch.manual_seed(0)
        train, val = ridge_data(0)
        net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
        hyper = ml.Hyper(log_l2=torch.zeros(RIDGE_D, dtype=DT))

        @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train,
                  hypergrad=ml.hypergrad.CG(iters=2, low_memory=low_memory))
        def inner(net, batch, outer):
            x, y = batch
            fit = 0.5 * ((net(F.dropout(x, 0.5)).squeeze(-1) - y) ** 2).mean()
            return fit + 0.5 * (outer.log_l2.exp() * net.weight[0] ** 2).sum()

        @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
        def outer(hyper, batch, inner):
            x, y = batch
            return ((inner(x).squeeze(-1) - y) ** 2).mean()

        prog = ml.Program(outer)
        assert prog.plan.levels["inner"].afresh is (low_memory is None)
        states[low_memory] = torch.get_rng_state()
    assert torch.equal(states[False], states[None])


def test_products_a_level_above_differentiates_keep_the_linearization(monkeypatch):
    """The middle level's updates use the bottom's CG hypergradient and the top unrolls them: the
    bottom's products are differentiated again, which the build leaves to the linearization."""
    monkeypatch.setattr(forward_mode, "LOW_MEMORY_FROM", 1)
    train, val = ridge_data(0)
    net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
    middle_params = ml.Hyper(log_l2=torch.zeros(RIDGE_D, dtype=DT))
    top_params = ml.Hyper(scale=torch.ones((), dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train, hypergrad=ml.hypergrad.CG(iters=2))
    def inner(net, batch, middle):
        x, y = batch
        return 0.5 * ((net(x).squeeze(-1) - y) ** 2).mean() + 0.5 * (middle.log_l2.exp() * net.weight[0] ** 2).sum()

    @ml.level(middle_params, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def middle(middle, batch, inner, top):
        x, y = batch
        return top.scale * ((inner(x).squeeze(-1) - y) ** 2).mean()

    @ml.level(top_params, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle])
    def top(top, middle):
        return (middle.log_l2 ** 2).sum() + (top.scale - 1) ** 2

    prog = ml.Program(top)
    assert forward_mode.differentiated_again("inner", prog.plan, {n: pl.level for n, pl in prog.levels.items()},
                                             prog._runtime.methods)
    assert prog.plan.levels["inner"].afresh is False
