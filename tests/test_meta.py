"""Meta-learning: MAML-style starts, task batches (vmap), learned optimizer hyperparameters,
constraints (float64, against hand-written autograd)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import mlodsl as ml
from helpers import DT

TASKS, SHOTS, INNER_LR, K = 2, 5, 0.05, 3


def mse(pred, target):
    # F.mse_loss's forward-over-reverse derivative raises in torch (pytorch#123996); the Forward
    # method takes it, through the traced graph that computes it as arithmetic (mlodsl.decompose).
    return F.mse_loss(pred, target)


def sinusoid_tasks(seed=0):
    g = torch.Generator().manual_seed(seed)
    amp = 0.5 + 4.5 * torch.rand(TASKS, 1, 1, generator=g, dtype=DT)
    phase = 3.14 * torch.rand(TASKS, 1, 1, generator=g, dtype=DT)
    xs = 10 * torch.rand(TASKS, SHOTS, 1, generator=g, dtype=DT) - 5
    xq = 10 * torch.rand(TASKS, SHOTS, 1, generator=g, dtype=DT) - 5
    return (xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def maml_program(method):
    support, query = sinusoid_tasks()
    meta = mlp()
    fast = copy.deepcopy(meta)

    @ml.level(fast, optimizer=ml.optim.sgd(lr=INNER_LR), data=support, steps=K, hypergrad=method,
              start_from="outer", tasks=True)
    def inner(fast, batch):
        x, y = batch
        return mse(fast(x), y)

    @ml.level(meta, optimizer=ml.optim.sgd(lr=0.01), data=query, depends_on=[inner])
    def outer(meta, batch, inner):
        x, y = batch
        return mse(inner(x), y)

    return ml.Program(outer), meta, support, query


def maml_reference(meta, support, query, first_order=False):
    """A Python loop over tasks, each adapted by K SGD steps from the meta-parameters."""
    params = {k: v.detach().clone().requires_grad_() for k, v in meta.named_parameters()}
    total = 0.0
    for t in range(TASKS):
        fast = dict(params)
        for _ in range(K):
            loss = mse(functional_call(meta, fast, (support[0][t],)), support[1][t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
        total = total + mse(functional_call(meta, fast, (query[0][t],)), query[1][t]) / TASKS
    grads = torch.autograd.grad(total, list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.parametrize("method,first_order", [(ml.hypergrad.Unroll(), False),
                                                (ml.hypergrad.Unroll(checkpoint=1), False),
                                                (ml.hypergrad.Forward(), False), (ml.hypergrad.FirstOrder(), True)],
                         ids=["maml", "maml_replayed", "forward", "fomaml"])
def test_maml_over_a_task_batch_equals_a_hand_written_loop(method, first_order):
    """Plain Unroll takes the tasks' mean loss under vmap on the autograd tape and one backward pass;
    Unroll(checkpoint=1) replays every update's VJP inside the vmapped per-task gradient."""
    prog, meta, support, query = maml_program(method)
    assert ("leaves = rt.tape_tasks('inner', 'outer', sub, up)" in prog.code) == (method.__repr__() == "Unroll()")
    expected = maml_reference(meta, support, query, first_order)
    got = prog.hypergradient("outer")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)


def test_maml_step_restarts_each_task_from_the_meta_parameters():
    prog, meta, support, query = maml_program(ml.hypergrad.Unroll())
    g = maml_reference(meta, support, query)
    before = {k: v.detach().clone() for k, v in meta.named_parameters()}
    prog.step()
    for k in before:
        torch.testing.assert_close(prog.params("outer")[k], before[k] - 0.01 * g[k], rtol=1e-10, atol=1e-12)
    assert prog.params("inner")["0.weight"].shape == (TASKS, 8, 1)  # one trajectory per task
    g2 = maml_reference(meta, support, query)  # meta now holds the updated parameters
    got = prog.hypergradient("outer")
    for k in g2:
        torch.testing.assert_close(got[k], g2[k], rtol=1e-10, atol=1e-12)


def test_start_from_init_restarts_the_lower_level_every_step():
    h = ml.Hyper(a=torch.tensor([1.0, -1.0], dtype=DT))
    low = ml.Hyper(w=torch.tensor([3.0, 3.0], dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=2, start_from="init")
    def inner(m, outer):
        return ((m.w - outer.a) ** 2).sum()

    @ml.level(h, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return (inner.w ** 2).sum()

    prog = ml.Program(outer)
    for _ in range(3):
        a = prog.params("outer")["a"]
        prog.step()
        w = torch.tensor([3.0, 3.0], dtype=DT)
        for _ in range(2):
            w = w - 0.1 * 2 * (w - a)
        torch.testing.assert_close(prog.params("inner")["w"], w, rtol=1e-12, atol=1e-12)


def test_learned_learning_rate_hypergradient_equals_autograd():
    x = torch.linspace(-1, 1, 8, dtype=DT)
    y = 2 * x + 0.3
    hyper = ml.Hyper(log_lr=torch.tensor(-1.0, dtype=DT), log_wd=torch.tensor(-3.0, dtype=DT))
    low = ml.Hyper(w=torch.tensor(0.1, dtype=DT), b=torch.tensor(0.0, dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), momentum=0.5,
                                          weight_decay=lambda outer: outer.log_wd.exp()), steps=4)
    def inner(m):
        return ((m.w * x + m.b - y) ** 2).mean()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return ((inner.w * x + inner.b - y - 0.1) ** 2).mean()

    prog = ml.Program(outer)
    assert ("inner", "outer", "reads") in {(u, v, k) for u, v, k in prog.graph.edges(data="kind")}
    log_lr = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    log_wd = torch.tensor(-3.0, dtype=DT, requires_grad=True)
    w, b = torch.tensor(0.1, dtype=DT, requires_grad=True), torch.tensor(0.0, dtype=DT, requires_grad=True)
    bufs = None
    for _ in range(4):
        gw, gb = torch.autograd.grad(((w * x + b - y) ** 2).mean(), (w, b), create_graph=True)
        gw, gb = gw + log_wd.exp() * w, gb + log_wd.exp() * b
        bufs = (gw, gb) if bufs is None else (0.5 * bufs[0] + gw, 0.5 * bufs[1] + gb)
        w, b = w - log_lr.exp() * bufs[0], b - log_lr.exp() * bufs[1]
    expected = torch.autograd.grad(((w * x + b - y - 0.1) ** 2).mean(), (log_lr, log_wd))
    got = prog.hypergradient("outer")
    torch.testing.assert_close(got["log_lr"], expected[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["log_wd"], expected[1], rtol=1e-10, atol=1e-14)


def test_projection_holds_after_every_step():
    h = ml.Hyper(p=torch.tensor([0.2, 0.3, 0.5], dtype=DT))

    @ml.level(h, optimizer=ml.optim.sgd(lr=0.5), project=ml.constraints.simplex())
    def top(m):
        return ((m.p - torch.tensor([2.0, -1.0, 0.5], dtype=DT)) ** 2).sum()  # minimum off the simplex

    prog = ml.Program(top)
    for _ in range(5):
        prog.step()
        p = prog.params("top")["p"]
        assert (p >= 0).all() and abs(float(p.sum()) - 1) < 1e-12
    torch.testing.assert_close(p, torch.tensor([1.0, 0.0, 0.0], dtype=DT), rtol=0, atol=1e-6)


def test_constraints():
    v = torch.tensor([2.0, -3.0, 0.5], dtype=DT)
    torch.testing.assert_close(ml.constraints.clamp(-1, 1)({"v": v})["v"], torch.tensor([1.0, -1.0, 0.5], dtype=DT))
    ball = ml.constraints.norm_ball(1.0)({"v": v})["v"]
    assert abs(float(ball.norm()) - 1) < 1e-12
    s = ml.constraints.simplex()({"v": v})["v"]
    assert abs(float(s.sum()) - 1) < 1e-12 and (s >= 0).all()


class ScaledUnroll(ml.hypergrad.Unroll):
    """A deliberately wrong method (a user-defined one, on the documented interface)."""

    def vjp(self, traj, cotangent):
        return {k: 1.5 * v for k, v in super().vjp(traj, cotangent).items()}


def test_check_hypergradient_agrees_for_an_exact_method_and_flags_a_wrong_one():
    from helpers import make_hpo
    prog, *_ = make_hpo(K=4)
    report = ml.check_hypergradient(prog, "outer")
    assert report.ok and report.rel_error < 1e-7, str(report)
    before = prog.params("outer")
    bad, *_ = make_hpo(K=4, method=ScaledUnroll())
    report = ml.check_hypergradient(bad, "outer")
    assert not report.ok and report.rel_error > 0.1 and "DISAGREES" in str(report)
    torch.testing.assert_close(prog.params("outer"), before)  # the check changed nothing


def test_check_hypergradient_agrees_for_cg_on_ridge():
    """CG at the ridge optimum vs finite differences of the validation loss with the lower level
    re-solved (enough SGD steps from the old optimum to converge to the new one)."""
    from test_implicit import D, _step_size, hypergradient, ridge
    _, _, parts = hypergradient(ml.hypergrad.FirstOrder())
    prog, *_ = ridge(ml.hypergrad.CG(iters=D), steps=300, opt=ml.optim.sgd(lr=_step_size(parts)))
    report = ml.check_hypergradient(prog, "outer", eps=1e-5)
    assert report.ok, str(report)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_read_mode_sets_dropout_when_another_level_calls_the_module(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1)).to(DT)
    h = ml.Hyper(s=torch.tensor(0.1, dtype=DT))
    x = torch.randn(32, 4, dtype=DT)

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.01), read_mode=mode, hypergrad=ml.hypergrad.FirstOrder())
    def inner(net, outer):
        return (net(x) ** 2).mean() + outer.s ** 2

    @ml.level(h, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return (inner(x) ** 2).mean()

    prog = ml.Program(outer)
    assert ("dropout" in prog.levels["inner"].graph.code and "training = True" in prog.levels["inner"].graph.code)
    outer_code = prog.levels["outer"].graph.code
    assert ("training = True" in outer_code) == (mode == "train")
    params = {n: prog.params(n) for n in ("inner", "outer")}
    a = prog.levels["outer"].traced(params, None)
    b = prog.levels["outer"].traced(params, None)
    assert torch.equal(a, b) == (mode == "eval")  # eval: no dropout noise when the upper reads it
    assert net.training  # the user's module mode is left as it was


def test_plain_torch_optim_for_a_level_nothing_differentiates_through():
    """A top level with torch.optim.Adam follows torch's own trajectory; under Unroll it is refused."""
    from helpers import make_hpo
    prog, net, hyper, train, val = make_hpo(K=3, method=ml.hypergrad.CG(iters=3),
                                            outer_opt=ml.optim.from_torch(torch.optim.Adam, lr=0.05))
    ref = ml.Hyper(log_l2=hyper.log_l2.detach().clone())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    for _ in range(3):
        g = prog.hypergradient("outer")["log_l2"]
        prog.step()
        ref.log_l2.grad = g.clone()
        ref_opt.step()
        torch.testing.assert_close(prog.params("outer")["log_l2"], ref.log_l2.detach(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ml.ProgramError, match="level 'inner' uses an in-place torch.optim.*Unroll"):
        make_hpo(K=3, inner_opt=ml.optim.from_torch(torch.optim.SGD, lr=0.1))
    cg, *_ = make_hpo(K=3, method=ml.hypergrad.CG(iters=3), inner_opt=ml.optim.from_torch(torch.optim.SGD, lr=0.5))
    plain, *_ = make_hpo(K=3, method=ml.hypergrad.CG(iters=3), inner_opt=ml.optim.sgd(lr=0.5))
    torch.testing.assert_close(cg.hypergradient("outer"), plain.hypergradient("outer"), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature, diverges", [(0.0, False), (2.0, True)], ids=["convex", "indefinite"])
def test_a_method_of_a_tasked_level_reports_its_diagnostics_and_divergence(curvature, diverges):
    """Under vmap over tasks, CG's residual and negative-curvature checks still reach the step's
    log (the worst over the tasks): an indefinite lower loss raises as it does without tasks."""
    torch.manual_seed(0)
    meta = nn.Linear(3, 1).double()
    fast = copy.deepcopy(meta)
    x, y = torch.randn(4, 8, 3, dtype=torch.float64), torch.randn(4, 8, 1, dtype=torch.float64)

    @ml.level(fast, optimizer=ml.optim.sgd(lr=0.01), data=(x, y), steps=3,
              hypergrad=ml.hypergrad.CG(iters=3), start_from="meta", tasks=True)
    def adapt(fast, batch, meta):
        a, b = batch
        return (((fast(a) - b) ** 2).mean() + 0.5 * ((fast.weight - meta.weight) ** 2).sum()
                - curvature * (fast.weight ** 2).sum())

    @ml.level(meta, optimizer=ml.optim.adam(lr=1e-3), data=(x, y), depends_on=[adapt], name="meta")
    def meta_level(meta, batch, adapt):
        a, b = batch
        return ((adapt(a) - b) ** 2).mean()

    prog = ml.Program(meta_level, seed=0)
    before = {k: v.clone() for k, v in prog.params("meta").items()}
    if diverges:
        with pytest.raises(ml.hypergrad.DivergenceError, match="level 'adapt'.*negative curvature"):
            prog.step()
        assert all(torch.equal(before[k], v) for k, v in prog.params("meta").items())
    else:
        prog.step()
        assert prog.history[-1]["adapt/cg_indefinite"] == 0 and "adapt/cg_residual" in prog.history[-1]
