"""A cotangent handed over to CG and FiniteDiff (built in its buffers), and CG's products afresh by
reverse over forward, against closed forms and hand-written torch.autograd (float64)."""
import torch
from torch import nn

import mlodsl as ml
from helpers import DT, RIDGE_D, ridge_closed_form, ridge_data, ridge_levels, ridge_solution
from mlodsl import autodiff
from mlodsl.hypergrad import finite_diff, handover, linear
from mlodsl.hypergrad.base import Solution


def _system(d=6, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(d, d, generator=g, dtype=DT)
    A = Q @ Q.T + d * torch.eye(d, dtype=DT)
    return A, torch.randn(m, d, generator=g, dtype=DT), torch.randn(d, generator=g, dtype=DT)


def test_cg_on_a_handed_cotangent_keeps_p_in_its_buffer_and_matches_the_closed_form():
    A, B, b0 = _system()
    seen = []

    def matvec(w):
        seen.append(w["x"].data_ptr())
        return {"x": A @ w["x"]}, {"u": B @ w["x"]}

    b = b0.clone()
    ptr = b.data_ptr()
    handed = handover.take({"v": {"x": b}}, "v")
    del b
    got = linear.conjugate_gradient(matvec, handed, iters=6, info={}, readout={"u": torch.zeros(3, dtype=DT)})
    torch.testing.assert_close(got["u"], B @ torch.linalg.solve(A, b0), rtol=1e-10, atol=1e-12)
    assert seen == [ptr] * 6  # every direction p was built in the cotangent's own buffer
    assert handed == {}

    plain = {"x": b0.clone()}
    seen.clear()
    again = linear.conjugate_gradient(matvec, plain, iters=6, readout={"u": torch.zeros(3, dtype=DT)})
    torch.testing.assert_close(again["u"], got["u"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain["x"], b0, rtol=0, atol=0)  # a plain dict is never written
    assert len(set(seen)) == 6


def test_a_tensor_seen_elsewhere_is_not_claimed():
    kept = torch.randn(3, dtype=DT)
    base = torch.randn(4, 4, dtype=DT)
    cases = {"held by a name": kept, "a view of a held base": base.view(4, 4),
             "a slice": torch.randn(8, dtype=DT)[:4], "on a graph": torch.randn(3, dtype=DT, requires_grad=True)}
    for what, t in cases.items():
        handed = handover.Handed({"x": t})
        del t
        tensors, writable = handover.claim(handed)
        assert not writable, what
        assert list(tensors) == ["x"]
    twice = torch.randn(3, dtype=DT)
    assert not handover.claim(handover.Handed({"a": twice, "b": twice}))[1]
    del twice
    assert handover.claim(handover.Handed({"x": torch.randn(3, dtype=DT)}))[1]
    assert not handover.claim({"x": torch.randn(3, dtype=DT)})[1]  # not handed over


def _mlp_solution():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, generator=g, dtype=DT), torch.randn(7, 2, generator=g, dtype=DT)
    own = {"w1": torch.randn(4, 3, generator=g, dtype=DT), "w2": torch.randn(2, 4, generator=g, dtype=DT)}
    upper = {"lw": torch.tensor([-1.0, 0.5], dtype=DT)}

    def loss(o, u):
        pred = torch.tanh(x @ o["w1"].T) @ o["w2"].T
        decay = u["lw"][0].exp() * (o["w1"] ** 2).sum() + u["lw"][1].exp() * (o["w2"] ** 3).sum()
        return ((pred - y) ** 2).mean() + decay

    return Solution("inner", own, upper, loss, {})


def _flat_loss(sol):
    shapes = {k: t.shape for k, t in sol.params.items()}
    sizes = [t.numel() for t in sol.params.values()]

    def f(z, lw):
        parts = dict(zip(shapes, [p.reshape(shapes[k]) for k, p in zip(shapes, z.split(sizes))]))
        return sol.loss(parts, {"lw": lw})

    z = torch.cat([t.reshape(-1) for t in sol.params.values()])
    return f, z, sol.upper["lw"]


def _direction(sol, seed):
    """A random direction shaped like the lower level's parameters, and the same flattened."""
    g = torch.Generator().manual_seed(seed)
    d = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in sol.params.items()}
    return d, torch.cat([v.reshape(-1) for v in d.values()])


def test_reverse_over_forward_is_the_joint_hessian_product():
    sol = _mlp_solution()
    f, z, lw = _flat_loss(sol)
    t, tz = _direction(sol, seed=4)
    H = torch.autograd.functional.hessian(f, (z, lw))  # hand-written: the full joint Hessian
    hz, hu = autodiff.reverse_over_forward(sol.loss, (sol.params, sol.upper), (t, None))
    torch.testing.assert_close(torch.cat([hz[k].reshape(-1) for k in sol.params]), H[0][0] @ tz,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hu["lw"], H[1][0] @ tz, rtol=1e-10, atol=1e-12)
    with autodiff.torch_func_products():  # the torch.func route gives the same
        fz, fu = autodiff.reverse_over_forward(sol.loss, (sol.params, sol.upper), (t, None))
    torch.testing.assert_close(fu["lw"], hu["lw"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fz["w1"], hz["w1"], rtol=1e-12, atol=1e-14)


def test_finite_difference_on_a_handed_cotangent_is_the_central_difference():
    sol = _mlp_solution()
    f, z, lw = _flat_loss(sol)
    d, dz = _direction(sol, seed=5)
    eps = 1e-3
    scale = eps / dz.norm()

    def upper_grad(point):
        lw_ = lw.clone().requires_grad_()
        return torch.autograd.grad(f(point, lw_), lw_)[0]

    # the minus side as FiniteDiff forms it, 2θ - (θ + ε'd): the difference is then exact to rounding
    plus = z + scale * dz
    expected = -(upper_grad(plus) - upper_grad(2 * z - plus)) / (2 * scale)
    original = {k: v.clone() for k, v in d.items()}
    plain = finite_diff.mixed_difference(sol, d, eps)
    torch.testing.assert_close(plain["lw"], expected, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(d[k], original[k]) for k in d)  # a plain dict is never written
    handed = handover.take({"v": d}, "v")
    del d
    got = finite_diff.mixed_difference(sol, handed, eps)
    torch.testing.assert_close(got["lw"], expected, rtol=1e-10, atol=1e-12)
    assert handed == {}
    # and it is the mixed second derivative to O(ε²)
    H = torch.autograd.functional.hessian(f, (z, lw))
    torch.testing.assert_close(got["lw"], -(H[1][0] @ dz), rtol=1e-5, atol=1e-7)


def _ridge_program(method):
    train, val = ridge_data(0)
    log_l2 = torch.linspace(-2.0, 0.0, RIDGE_D, dtype=DT)
    net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(ridge_solution(*train, log_l2.exp()).unsqueeze(0))
    hyper = ml.Hyper(log_l2=log_l2.clone())

    prog = ridge_levels(net, hyper, train, val, optimizer=ml.optim.sgd(lr=1e-3), method=method)
    return prog, ridge_closed_form(train, val, log_l2)[0]


def test_cg_in_the_step_consumes_the_cotangent_and_matches_the_closed_form_both_ways():
    for low_memory in (False, True):
        prog, expected = _ridge_program(ml.hypergrad.CG(iters=RIDGE_D, low_memory=low_memory))
        seen = []
        claim = handover.claim

        def spy(tree):
            tensors, writable = claim(tree)
            seen.append(writable)
            return tensors, writable

        linear.claim = spy
        try:
            got = prog.hypergradient("outer")["log_l2"]
        finally:
            linear.claim = claim
        assert seen == [True]  # the step handed v over and CG built r and p in its buffers
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
        before = prog.params("outer")["log_l2"]
        prog.step()  # the step hands the cotangent over too, and commits its SGD update
        torch.testing.assert_close(prog.params("outer")["log_l2"], before - 0.1 * expected, rtol=1e-8, atol=1e-10)


def test_unroll_drops_the_handed_cotangent_once_lambda_moves_on():
    """With checkpoints, v = λ_K is freed after the last update's VJP, not kept through the others."""
    import weakref

    from mlodsl.hypergrad import unroll
    train, val = ridge_data(0)
    net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
    hyper = ml.Hyper(log_l2=torch.zeros(RIDGE_D, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train, steps=4, hypergrad=ml.hypergrad.Unroll(checkpoint=2))
    def inner(net, batch, outer):
        x, y = batch
        return 0.5 * ((net(x).squeeze(-1) - y) ** 2).mean() + 0.5 * (outer.log_l2.exp() * net.weight[0] ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    prog = ml.Program(outer)
    handed, alive = [], []
    claim, add = unroll.claim, unroll.tree_add

    def spy_claim(tree):
        tensors, writable = claim(tree)
        handed.extend(weakref.ref(t) for t in tensors.values())
        return tensors, writable

    def spy_add(a, b):  # called once after each update's VJP
        alive.append(any(r() is not None for r in handed))
        return add(a, b)

    unroll.claim, unroll.tree_add = spy_claim, spy_add
    try:
        got = prog.hypergradient("outer")["log_l2"]
    finally:
        unroll.claim, unroll.tree_add = claim, add
    assert len(handed) == 1 and alive == [False] * 4
    assert torch.isfinite(got).all() and got.abs().sum() > 0
