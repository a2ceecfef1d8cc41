"""The method contract: user-defined methods (subclassing ``Method`` or ``ImplicitMethod``, or
duck-typed) and user-defined optimizers, against hand-written autograd in float64; built-ins print
every setting."""
from dataclasses import FrozenInstanceError, dataclass

import pytest
import torch

import mlodsl as ml
from helpers import make_hpo, reference_hpo, reference_implicit_hpo

HG = ml.hypergrad
K, LR = 4, 0.5


@dataclass(frozen=True, repr=False)
class LastUpdate(HG.Method):
    """vᵀ ∂θ_K/∂θ_U through the last update alone (truncated backpropagation, T = 1), from the kept
    iterate before it: a method of the trajectory, written with torch.func."""

    keeps_path = True

    def vjp(self, trajectory, cotangent):
        k = trajectory.steps - 1
        before = trajectory.path[k]

        def last(upper):
            return trajectory.advance(before, upper, k)[trajectory.level]["params"]

        _, pull = torch.func.vjp(last, trajectory.upper)
        return pull(cotangent[trajectory.level])[0]


@dataclass(frozen=True, repr=False)
class DenseSolve(HG.ImplicitMethod):
    """The implicit hypergradient with H formed and solved densely: a method of the ``Solution``."""

    def solution_vjp(self, solution, v):
        names = list(solution.params)
        flat = torch.cat([solution.params[k].reshape(-1) for k in names])
        shapes = [solution.params[k].shape for k in names]

        def unflat(x):
            return dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(x, [s.numel() for s in shapes]),
                                                                    shapes))))

        def loss(x, upper):
            return solution.loss(unflat(x), upper)

        H = torch.func.hessian(loss)(flat, solution.upper)
        x = torch.linalg.solve(H, torch.cat([v[k].reshape(-1) for k in names]))
        _, pull = torch.func.vjp(lambda upper: torch.func.grad(loss)(flat, upper), solution.upper)
        return {k: -g for k, g in pull(x)[0].items()}


class DuckLastUpdate:
    """``LastUpdate`` without the base class: the flags it needs and ``vjp``."""

    keeps_path = True

    def vjp(self, trajectory, cotangent):
        return LastUpdate().vjp(trajectory, cotangent)

    def __repr__(self):
        return "DuckLastUpdate()"


class PlainSGD:
    """A user-defined optimizer that is not an ``ml.optim.Optimizer``: init, update, reads."""

    reads = ()

    def __init__(self, lr):
        self.lr = lr

    def init(self, params):
        return {"count": torch.zeros((), dtype=torch.int64)}

    def update(self, params, grads, state, reads=None):
        return {k: p - self.lr * grads[k] for k, p in params.items()}, {"count": state["count"] + 1}


@pytest.mark.parametrize("method", [LastUpdate(), DuckLastUpdate()], ids=repr)
def test_a_user_method_of_the_trajectory_with_a_user_optimizer(method):
    prog, net, hyper, train, val = make_hpo(K=K, lr=LR, method=method, inner_opt=PlainSGD(LR))
    expected, _ = reference_hpo(net, hyper, train, val, K=K, lr=LR, last=1)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-10, atol=1e-12)
    assert f"hypergradient of outer through inner by {method!r}" in str(prog.schedule)
    before = hyper.log_l2.detach().clone()
    prog.step()
    torch.testing.assert_close(prog.params("outer")["log_l2"], before - 0.1 * expected, rtol=1e-10, atol=1e-12)


def test_a_user_implicit_method_gets_the_solution_and_matches_the_hand_written_implicit_hypergradient():
    prog, net, hyper, train, val = make_hpo(K=K, lr=LR, method=DenseSolve())
    expected = reference_implicit_hpo(net, hyper, train, val, K=K, lr=LR)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-9, atol=1e-12)


def test_flags_have_their_declared_defaults_and_vjp_is_required():
    with pytest.raises(TypeError, match="abstract"):
        HG.Method()
    m = DenseSolve()
    assert (m.keeps_path, m.records_tape, m.products_only, m.replays_updates, m.second_order,
            m.on_divergence, m.diverged({"cg_residual": 9.0}), m.path_stride(10), m.workspace(8, 8)) == \
        (False, False, True, False, True, "raise", None, 1, 0)


BUILT_INS = [HG.Unroll(), HG.Unroll(last=3, checkpoint="sqrt"), HG.Forward(chunk=4), HG.FirstOrder(),
             HG.CG(iters=3, tol=1e-6, damping=0.5, on_divergence="warn"), HG.Neumann(iters=2, alpha=0.1, damping=0.2),
             HG.Nystrom(rank=4, rho=0.01, seed=3), HG.FixedPoint(iters=5, on_divergence="warn"),
             HG.FiniteDiff(eps=0.1), HG.SAMA(eps=0.02, betas=(0.8, 0.9), adam_eps=1e-6, eps_root=1e-12),
             HG.ZeroOrder(samples=3, sigma=0.1, antithetic=False)]


@pytest.mark.parametrize("method", BUILT_INS, ids=repr)
def test_built_in_reprs_name_every_setting(method):
    """``eval(repr(m))`` rebuilds an equal method: no setting is left out of what the schedule prints."""
    assert isinstance(method, HG.Method)
    assert eval(repr(method), dict(vars(HG))) == method
    with pytest.raises(FrozenInstanceError):  # frozen: a method's settings cannot change under a built program
        method.on_divergence = "warn"
