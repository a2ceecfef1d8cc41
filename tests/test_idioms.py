"""Idioms from Betty, TorchOpt and higher: per-parameter-group hyperparameters (learnable too),
``maximize=True`` (min-max levels), and one batch per block of inner updates (float64, against
torch.optim and hand-written torch.autograd)."""
import pytest
import torch
from torch import nn

import mlodsl as ml
from helpers import DT


class Net(nn.Module):
    """Betty's features / classifier split, tiny."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Linear(3, 4).to(DT)
        self.classifier = nn.Linear(4, 1).to(DT)

    def forward(self, x):
        return self.classifier(torch.tanh(self.features(x)))


def regression(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)


def net_loss(params, batch):
    """Net's mean squared error as a function of a dict of its parameters (the hand-written side)."""
    x, y = batch
    h = torch.tanh(x @ params["features.weight"].T + params["features.bias"])
    return ((h @ params["classifier.weight"].T + params["classifier.bias"] - y) ** 2).mean()


def fake_grads(params, step):
    """A deterministic gradient field that changes with the parameters and the step."""
    return {k: torch.cos(p * (1 + 0.1 * step)) + 0.3 * p for k, p in params.items()}


def run_torch(opt_cls, groups, params, steps, **kwargs):
    """torch.optim with explicit param groups ({"params": [names], ...}); the parameters after each step."""
    leaves = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    opt = opt_cls([{**g, "params": [leaves[n] for n in g["params"]]} for g in groups], **kwargs)
    out = []
    for t in range(steps):
        for k, g in fake_grads({k: v.detach() for k, v in leaves.items()}, t).items():
            leaves[k].grad = g
        opt.step()
        out.append({k: v.detach().clone() for k, v in leaves.items()})
    return out


def run_ml(opt, params, steps):
    """The parameters after each update (copies: ``from_torch`` updates its tensors in place)."""
    params = {k: v.clone() for k, v in params.items()}
    state, out = opt.init(params), []
    for t in range(steps):
        params, state = opt.update(params, fake_grads(params, t), state)
        out.append({k: v.clone() for k, v in params.items()})
    return out


def assert_trajectories_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for k in e:
            torch.testing.assert_close(g[k], e[k], rtol=1e-12, atol=1e-13)


NET_PARAMS = {k: v.detach() for k, v in Net().named_parameters()}
ALL = [{"params": list(NET_PARAMS)}]


# -- maximize=True ------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, cls, kwargs", [
    (ml.optim.sgd(lr=0.1, maximize=True), torch.optim.SGD, dict(lr=0.1)),
    (ml.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True, maximize=True), torch.optim.SGD,
     dict(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True)),
    (ml.optim.sgd(lr=0.1, momentum=0.8, weight_decay=0.05, dampening=0.3, maximize=True), torch.optim.SGD,
     dict(lr=0.1, momentum=0.8, weight_decay=0.05, dampening=0.3)),
    (ml.optim.adam(lr=0.05, weight_decay=0.1, maximize=True), torch.optim.Adam, dict(lr=0.05, weight_decay=0.1)),
    (ml.optim.adamw(lr=0.05, weight_decay=0.1, maximize=True), torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
], ids=["sgd", "sgd-nesterov-wd", "sgd-dampening", "adam", "adamw"])
def test_maximize_equals_torch_optim_step_by_step(ours, cls, kwargs):
    expected = run_torch(cls, ALL, NET_PARAMS, 5, maximize=True, **kwargs)
    assert_trajectories_equal(run_ml(ours, NET_PARAMS, 5), expected)
    minimizing = run_torch(cls, ALL, NET_PARAMS, 1, **kwargs)[0]["features.weight"]  # not that trajectory
    assert (minimizing - expected[0]["features.weight"]).abs().max() > 1e-3


def minmax_program(K, lr, momentum):
    """The upper w minimizes the error on adversarially shifted inputs x + δ; the lower δ maximizes
    that error minus a penalty c‖δ‖² by K steps of gradient ascent."""
    x, y = regression(n=5)
    c = 2.0
    up = ml.Hyper(w=torch.tensor([0.5, -0.3, 0.2], dtype=DT))
    adv = ml.Hyper(delta=torch.zeros(5, 3, dtype=DT))

    def err(w, delta):
        return ((((x + delta) @ w) - y.squeeze(-1)) ** 2).mean()

    @ml.level(adv, optimizer=ml.optim.sgd(lr=lr, momentum=momentum, maximize=True), steps=K)
    def attack(adv, model):
        return err(model.w, adv.delta) - c * (adv.delta ** 2).sum()

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[attack])
    def model(up, attack):
        return err(up.w, attack.delta)

    def reference():
        w = up.w.detach().clone().requires_grad_()
        delta, buf = torch.zeros(5, 3, dtype=DT), None
        for _ in range(K):
            delta = delta if delta.requires_grad else delta.requires_grad_()
            (g,) = torch.autograd.grad(err(w, delta) - c * (delta ** 2).sum(), delta, create_graph=True)
            g = -g  # ascent
            buf = g if buf is None else momentum * buf + g
            delta = delta - lr * buf
        return torch.autograd.grad(err(w, delta), w)[0]

    return ml.Program(model), reference


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_minmax_hypergradient_equals_autograd(momentum):
    prog, reference = minmax_program(K=4, lr=0.05, momentum=momentum)
    expected = reference()
    torch.testing.assert_close(prog.hypergradient("model")["w"], expected, rtol=1e-10, atol=1e-13)
    before = prog.params("attack")["delta"]
    prog.step()
    # the adversary ascended: its objective at the new δ is above the one at δ = 0
    assert (prog.params("attack")["delta"] - before).abs().max() > 1e-4


def concave_program(method, optimizer, A, M):
    """The lower δ maximizes g(δ; w) = (Mw)ᵀδ - ½ δᵀAδ (solution δ* = A⁻¹Mw); the upper minimizes
    F = ½‖δ - t‖² + ½‖w‖². The implicit hypergradient at δ* is w + Mᵀ A⁻¹ (δ* - t)."""
    w0 = torch.tensor([0.4, -0.7], dtype=DT)
    t = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    up = ml.Hyper(w=w0)
    low = ml.Hyper(delta=torch.zeros(3, dtype=DT))

    @ml.level(low, optimizer=optimizer, steps=80, hypergrad=method)
    def lower(low, upper):
        d = low.delta
        return (M @ upper.w) @ d - 0.5 * d @ (A @ d)

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[lower])
    def upper(up, lower):
        return 0.5 * ((lower.delta - t) ** 2).sum() + 0.5 * (up.w ** 2).sum()

    star = torch.linalg.solve(A, M @ w0)
    expected = w0 + M.T @ torch.linalg.solve(A, star - t)
    return ml.Program(upper), expected


M_MIX = torch.tensor([[1.0, 0.5], [-0.3, 2.0], [0.7, -1.0]], dtype=DT)
A_SPD = torch.tensor([[1.5, 0.2, 0.0], [0.2, 1.2, 0.1], [0.0, 0.1, 1.8]], dtype=DT)  # eigenvalues in [1, 2]


@pytest.mark.parametrize("method, A, optimizer", [
    (ml.hypergrad.CG(iters=10), A_SPD, ml.optim.sgd(lr=0.5, maximize=True)),
    (ml.hypergrad.Neumann(iters=80, alpha=0.5), A_SPD, ml.optim.sgd(lr=0.5, maximize=True)),
    (ml.hypergrad.FixedPoint(iters=80), A_SPD, ml.optim.sgd(lr=0.5, maximize=True)),
    (ml.hypergrad.FiniteDiff(eps=0.01), torch.eye(3, dtype=DT), ml.optim.sgd(lr=0.5, maximize=True)),
    (ml.hypergrad.CG(iters=10), A_SPD, ml.optim.from_torch(torch.optim.SGD, lr=0.5, maximize=True)),
], ids=["CG", "Neumann", "FixedPoint", "FiniteDiff", "from_torch-CG"])
def test_maximizing_lower_level_implicit_hypergradient_equals_closed_form(method, A, optimizer):
    prog, expected = concave_program(method, optimizer, A, M_MIX)
    torch.testing.assert_close(prog.hypergradient("upper")["w"], expected, rtol=1e-9, atol=1e-11)


# -- parameter groups ---------------------------------------------------------------------------
GROUPS = {"features": dict(lr=0.02), "features.weight": dict(weight_decay=0.3), "*.bias": dict(weight_decay=0.0)}
TORCH_GROUPS = [  # the same, written out as torch.optim param groups
    {"params": ["features.weight"], "lr": 0.02, "weight_decay": 0.3},
    {"params": ["features.bias"], "lr": 0.02, "weight_decay": 0.0},
    {"params": ["classifier.weight"]},
    {"params": ["classifier.bias"], "weight_decay": 0.0},
]


ADAM_BETAS = [{**g, "betas": (0.5, 0.9)} if g["params"][0].startswith("classifier") else g for g in TORCH_GROUPS]


@pytest.mark.parametrize("ours, cls, groups, kwargs", [
    (ml.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.05, groups=GROUPS), torch.optim.SGD, TORCH_GROUPS,
     dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
    (ml.optim.adam(lr=0.05, weight_decay=0.05, groups={**GROUPS, "classifier": dict(betas=(0.5, 0.9))}),
     torch.optim.Adam, ADAM_BETAS, dict(lr=0.05, weight_decay=0.05)),
    (ml.optim.adamw(lr=0.05, weight_decay=0.05, groups=GROUPS), torch.optim.AdamW, TORCH_GROUPS,
     dict(lr=0.05, weight_decay=0.05)),
    (ml.optim.from_torch(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.05, groups=GROUPS), torch.optim.SGD,
     TORCH_GROUPS, dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
], ids=["sgd", "adam", "adamw", "from_torch"])
def test_groups_equal_torch_param_groups_step_by_step(ours, cls, groups, kwargs):
    expected = run_torch(cls, groups, NET_PARAMS, 5, **kwargs)
    assert_trajectories_equal(run_ml(ours, NET_PARAMS, 5), expected)
    ungrouped = run_torch(cls, ALL, NET_PARAMS, 1, **kwargs)[0]["features.weight"]
    assert (ungrouped - expected[0]["features.weight"]).abs().max() > 1e-3  # the groups did something


def test_a_prefix_matches_whole_names_only():
    params = {"features.weight": torch.ones(2, dtype=DT), "features2.weight": torch.ones(2, dtype=DT)}
    opt = ml.optim.sgd(lr=0.5, groups={"features": dict(lr=0.0)})
    new, _ = opt.update(params, {k: torch.ones(2, dtype=DT) for k in params}, opt.init(params))
    torch.testing.assert_close(new["features.weight"], torch.ones(2, dtype=DT))  # lr 0: unchanged
    torch.testing.assert_close(new["features2.weight"], torch.full((2,), 0.5, dtype=DT))


def test_learnable_group_hyperparameters_hypergradient_equals_autograd():
    """Betty's features vs classifier learning rates, both learned, and a weight decay learned for
    every parameter but the biases."""
    K = 3
    train, val = regression(seed=1), regression(seed=2)
    net = Net()
    hyper = ml.Hyper(log_lr=torch.tensor([-2.0, -1.0], dtype=DT), log_wd=torch.tensor(-3.0, dtype=DT))
    opt = ml.optim.sgd(lr=0.1, momentum=0.5, weight_decay=lambda outer: outer.log_wd.exp(),
                       groups={"features": dict(lr=lambda outer: outer.log_lr[0].exp()),
                               "classifier": dict(lr=lambda outer: outer.log_lr[1].exp()),
                               "*.bias": dict(weight_decay=0.0)})

    @ml.level(net, optimizer=opt, data=train, steps=K)
    def inner(net, batch):
        x, y = batch
        return ((net(x) - y) ** 2).mean()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    prog = ml.Program(outer)
    log_lr = hyper.log_lr.detach().clone().requires_grad_()
    log_wd = hyper.log_wd.detach().clone().requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    bufs = {k: None for k in params}
    for _ in range(K):
        grads = dict(zip(params, torch.autograd.grad(net_loss(params, train), list(params.values()),
                                                     create_graph=True)))
        new = {}
        for k, p in params.items():
            g = grads[k] + (0 if k.endswith("bias") else log_wd.exp() * p)
            bufs[k] = g if bufs[k] is None else 0.5 * bufs[k] + g
            lr = log_lr[0].exp() if k.startswith("features") else log_lr[1].exp()
            new[k] = p - lr * bufs[k]
        params = new
    expected = torch.autograd.grad(net_loss(params, val), (log_lr, log_wd))
    got = prog.hypergradient("outer")
    torch.testing.assert_close(got["log_lr"], expected[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["log_wd"], expected[1], rtol=1e-10, atol=1e-14)
    assert "groups={'features': dict(lr=<lambda>(outer))" in str(prog.schedule)


def _two_level(optimizer):
    x, y = regression()

    @ml.level(Net(), optimizer=optimizer, data=(x, y))
    def fit(net, batch):
        return ((net(batch[0]) - batch[1]) ** 2).mean()

    return fit


def test_groups_that_do_not_fit_are_refused_at_build():
    with pytest.raises(ml.ProgramError, match=r"level 'fit'.*group 'feature' matches no parameter"):
        ml.Program(_two_level(ml.optim.sgd(lr=0.1, groups={"feature": dict(lr=0.01)})))
    with pytest.raises(ml.ProgramError, match=r"level 'fit'.*'features.bias' is in groups 'features' and "
                                              r"'\*.bias', which both set \['lr'\]"):
        ml.Program(_two_level(ml.optim.adam(groups={"features": dict(lr=0.01), "*.bias": dict(lr=0.1)})))
    with pytest.raises(TypeError, match=r"group 'features' sets \['nesterov'\]"):
        ml.optim.sgd(lr=0.1, groups={"features": dict(nesterov=True)})
    with pytest.raises(TypeError, match="nothing differentiates its updates"):
        ml.optim.from_torch(torch.optim.SGD, lr=0.1, groups={"features": dict(lr=lambda step: 0.1)})
    with pytest.raises(TypeError, match="maximize must be True or False"):
        ml.optim.adam(maximize="yes")


# -- one batch per block ------------------------------------------------------------------------
def block_program(batches, K=3, lr=0.1):
    hyper = ml.Hyper(log_l2=torch.tensor(-2.0, dtype=DT))
    low = ml.Hyper(w=torch.tensor([0.3, -0.2, 0.1], dtype=DT))
    val = regression(seed=9)

    @ml.level(low, optimizer=ml.optim.sgd(lr=lr), data=batches, steps=K, batch_per="block")
    def inner(low, batch, outer):
        x, y = batch
        return ((x @ low.w - y.squeeze(-1)) ** 2).mean() + outer.log_l2.exp() * (low.w ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((x @ inner.w - y.squeeze(-1)) ** 2).mean()

    def reference(w, log_l2, batch):
        """K SGD steps on ONE batch; returns (w_K, d outer(w_K) / d log_l2)."""
        log_l2 = log_l2.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        x, y = batch
        for _ in range(K):
            (g,) = torch.autograd.grad(((x @ w - y.squeeze(-1)) ** 2).mean() + log_l2.exp() * (w ** 2).sum(), w,
                                       create_graph=True)
            w = w - lr * g
        vx, vy = val
        return w.detach(), torch.autograd.grad(((vx @ w - vy.squeeze(-1)) ** 2).mean(), log_l2)[0]

    return ml.Program(outer), reference


def distinct_batches(n=4):
    return [regression(seed=10 + i) for i in range(n)]


def test_one_batch_per_block_equals_autograd_on_that_batch():
    batches = distinct_batches()
    prog, reference = block_program(batches)
    assert "repeat 3× inner on one batch:" in str(prog.schedule)
    for i in range(3):  # step i: the 3 inner updates all on batch i, then one outer update
        w, log_l2 = prog.params("inner")["w"], prog.params("outer")["log_l2"]
        w_K, expected = reference(w, log_l2, batches[i])
        torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-10, atol=1e-14)
        prog.step()
        torch.testing.assert_close(prog.params("inner")["w"], w_K, rtol=1e-12, atol=1e-14)


def test_one_batch_per_block_draws_one_batch_per_upper_update():
    drawn = []
    pool = distinct_batches(8)

    def next_batch():
        drawn.append(len(drawn))
        return pool[len(drawn) - 1]

    prog, _ = block_program(next_batch)
    for _ in range(3):
        prog.step()
    assert len(drawn) == 3  # one per step (per outer update), not K = 3 per step
    assert prog.state_dict()["data"]["inner"] == 3


def test_one_batch_per_block_resumes_from_a_checkpoint_at_the_next_batch():
    batches = distinct_batches()
    prog, _ = block_program(batches)
    prog.step()
    prog.hypergradient("outer")  # draws the next step's batch ahead: pending, not yet used
    saved = prog.state_dict()
    assert saved["data"]["inner"] == 1
    prog.step()
    expected = prog.params("inner")["w"]
    fresh, _ = block_program(batches)
    fresh.load_state_dict(saved)
    fresh.step()
    torch.testing.assert_close(fresh.params("inner")["w"], expected, rtol=0, atol=0)


def test_batch_per_is_checked():
    with pytest.raises(ValueError, match="batch_per must be 'update'"):
        ml.level(ml.Hyper(w=torch.zeros(1)), optimizer=ml.optim.sgd(lr=0.1), data=(torch.zeros(1),),
                 batch_per="epoch")(lambda m, batch: m.w.sum())


def test_one_batch_per_block_under_a_middle_level_draws_one_batch_per_middle_update():
    drawn = []
    pool = distinct_batches(12)

    def next_batch():
        drawn.append(len(drawn))
        return pool[len(drawn) - 1]

    x, y = regression(seed=3)
    bottom_h, middle_h, top_h = (ml.Hyper(w=torch.full((3,), v, dtype=DT)) for v in (0.1, 0.2, 0.3))

    @ml.level(bottom_h, optimizer=ml.optim.sgd(lr=0.1), data=next_batch, steps=3, batch_per="block")
    def bottom(m, batch, middle):
        return ((batch[0] @ (m.w + middle.w) - batch[1].squeeze(-1)) ** 2).mean()

    @ml.level(middle_h, optimizer=ml.optim.sgd(lr=0.1), steps=2, depends_on=[bottom])
    def middle(m, bottom, top):
        return ((x @ (bottom.w + m.w * top.w) - y.squeeze(-1)) ** 2).mean()

    @ml.level(top_h, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle])
    def top(m, bottom):
        return ((x @ bottom.w - y.squeeze(-1)) ** 2).mean()

    prog = ml.Program(top)
    prog.step()
    assert len(drawn) == 2  # one per block: the middle level updates twice per step
