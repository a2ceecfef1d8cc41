"""A level may read any module of the program however it reaches it (its argument, a closure, a
global): it gets the live, differentiable values, and the hypergradient flows through the read.
References are hand-written autograd of the same unrolled or implicit computation (float64)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from helpers import DT, inner_loss_fn, logreg_data, outer_loss_fn, reference_hpo, reference_implicit_hpo

K, LR, OUTER_LR = 4, 0.5, 0.1
NET = None  # the lower level's module, read as a global by `_outer_reads_global`


def _logits(net, x, opaque):
    logits = net(x).squeeze(-1)
    if opaque and logits.sum() > 1e9:  # data-dependent control flow: fx cannot trace it (never taken)
        logits = logits * 0
    return logits


class _Identity(torch.autograd.Function):
    """An identity whose backward is differentiable again (MAML differentiates through it twice)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def _inner_loss(net, hyper, batch, opaque):
    x, y = batch
    fit = F.binary_cross_entropy_with_logits(_logits(net, x, opaque), y)
    return fit + (hyper.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()


def _outer_reads_global(hyper, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(_logits(NET, x, False), y)


def bilevel(lower_reads="argument", upper_reads="argument", method=None, opaque=False):
    """Per-feature L2 for logistic regression; `lower_reads`/`upper_reads` say how each level reaches
    the other's module: "argument" (named), "closure" (the enclosing scope) or "global"."""
    global NET
    train, val = logreg_data()
    torch.manual_seed(0)
    net = nn.Linear(5, 1).to(DT)
    hyper = ml.Hyper(log_l2=torch.full((5,), -2.0, dtype=DT))
    NET = net
    inner_options = dict(optimizer=ml.optim.sgd(lr=LR), data=train, steps=K, hypergrad=method, name="inner")
    if lower_reads == "closure":
        def inner(own, batch):
            return _inner_loss(own, hyper, batch, opaque)
    else:
        def inner(own, batch, outer):
            return _inner_loss(own, outer, batch, opaque)
    inner = ml.level(net, **inner_options)(inner)

    outer_options = dict(optimizer=ml.optim.sgd(lr=OUTER_LR), data=val, depends_on=[inner], name="outer")
    if upper_reads == "global":
        outer = ml.level(hyper, **outer_options)(_outer_reads_global)
    elif upper_reads == "closure":
        def outer(own, batch):
            x, y = batch
            return F.binary_cross_entropy_with_logits(_logits(net, x, opaque), y)
        outer = ml.level(hyper, **outer_options)(outer)
    else:
        def outer(own, batch, inner):
            x, y = batch
            return F.binary_cross_entropy_with_logits(_logits(inner, x, opaque), y)
        outer = ml.level(hyper, **outer_options)(outer)
    return ml.Program(outer), net, hyper, train, val


READS = [("closure", "argument"), ("argument", "closure"), ("argument", "global"), ("closure", "global")]
METHODS = [ml.hypergrad.Unroll(), ml.hypergrad.CG(iters=12)]


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("lower_reads, upper_reads", READS)
def test_closure_and_global_reads_give_the_hand_written_hypergradient(lower_reads, upper_reads, method):
    prog, net, hyper, train, val = bilevel(lower_reads, upper_reads, method)
    if isinstance(method, ml.hypergrad.Unroll):
        expected, _ = reference_hpo(net, hyper, train, val, K, LR)
    else:
        expected = reference_implicit_hpo(net, hyper, train, val, K, LR)
    got = prog.hypergradient("outer")["log_l2"]
    assert got.abs().max() > 1e-4  # not the silent zero of a frozen read
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    assert not prog.levels["inner"].traced.opaque and not prog.levels["outer"].traced.opaque


@pytest.mark.parametrize("lower_reads, upper_reads", READS[:2])
def test_the_opaque_call_gives_the_traced_numbers(lower_reads, upper_reads):
    """Forced opaque (data-dependent control flow), the function runs on the program's modules bound
    to the step's parameters: the same numbers as the traced graph."""
    traced, *_ = bilevel(lower_reads, upper_reads)
    with pytest.warns(ml.TraceWarning, match="could not be traced"):
        opaque, net, hyper, train, val = bilevel(lower_reads, upper_reads, opaque=True)
    assert opaque.levels["inner"].traced.opaque and opaque.levels["outer"].traced.opaque
    expected, _ = reference_hpo(net, hyper, train, val, K, LR)
    got = opaque.hypergradient("outer")
    torch.testing.assert_close(got["log_l2"], expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got, traced.hypergradient("outer"), rtol=1e-13, atol=1e-15)
    traced.step(), opaque.step()
    for name in ("inner", "outer"):
        torch.testing.assert_close(opaque.params(name), traced.params(name), rtol=1e-13, atol=1e-15)


def reference_steps(net, hyper, train, val, steps):
    """`steps` outer SGD steps by hand, each through K inner steps warm-started from the last."""
    w, b = net.weight.detach().clone().squeeze(0), net.bias.detach().clone().squeeze(0)
    log_l2 = hyper.log_l2.detach().clone()
    for _ in range(steps):
        lam, wk, bk = log_l2.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        for _ in range(K):
            gw, gb = torch.autograd.grad(inner_loss_fn(wk, bk, lam, train), (wk, bk), create_graph=True)
            wk, bk = wk - LR * gw, bk - LR * gb
        (g,) = torch.autograd.grad(outer_loss_fn(wk, bk, val), lam)
        w, b, log_l2 = wk.detach(), bk.detach(), log_l2 - OUTER_LR * g
    return w, b, log_l2


@pytest.mark.parametrize("opaque", [False, True], ids=["traced", "opaque"])
def test_later_steps_read_the_updated_values(opaque):
    """Each step's closure reads see that step's parameters, never the build-time ones; the user's
    modules keep their nn.Parameter objects and hold the program's values after the steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)
        prog, net, hyper, train, val = bilevel("closure", "global", opaque=opaque)
    w, b, log_l2 = reference_steps(net, hyper, train, val, steps=3)
    objects = dict(net.named_parameters())
    for _ in range(3):
        prog.step()
    assert all(p is objects[k] for k, p in net.named_parameters())  # the user's own nn.Parameters
    torch.testing.assert_close(prog.params("outer")["log_l2"], log_l2, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(prog.params("inner")["weight"].squeeze(0), w, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(prog.params("inner")["bias"].squeeze(0), b, rtol=1e-10, atol=1e-13)
    assert torch.equal(hyper.log_l2.detach(), prog.params("outer")["log_l2"])  # written back
    assert torch.equal(net.weight.detach(), prog.params("inner")["weight"])


def test_a_closure_read_is_a_reads_edge_and_a_graph_input():
    prog, *_ = bilevel("closure", "global")
    edges = set(prog.graph.edges(data="kind"))
    assert ("inner", "outer", "reads") in edges and ("outer", "inner", "depends_on") in edges
    placeholders = [n.name for n in prog.levels["inner"].graph.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["batch_0", "batch_1", "inner_weight", "inner_bias", "outer_log_l2"]
    assert "outer_log_l2.exp()" in prog.levels["inner"].graph.code
    assert "_tensor_constant" not in prog.levels["inner"].graph.code


@pytest.mark.parametrize("opaque", [False, True], ids=["traced", "opaque"])
def test_a_free_tensor_that_requires_grad_is_refused(opaque):
    train, _ = logreg_data()
    net = nn.Linear(5, 1).to(DT)
    free = torch.randn(5, dtype=DT, requires_grad=True)

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train)
    def fit(net, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(_logits(net, x * free, opaque), y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)
        with pytest.raises(ml.ProgramError, match=r"level 'fit' reads `free` \(shape \(5,\), requires_grad=True\)"
                                                  r".*belongs to no level.*requires_grad=False.*free.detach\(\)"):
            ml.Program(fit)


def test_a_module_outside_the_program_is_refused():
    train, _ = logreg_data()
    net, stranger = nn.Linear(5, 1).to(DT), nn.Linear(5, 5).to(DT)

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train)
    def fit(net, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(net(stranger(x)).squeeze(-1), y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)
        with pytest.raises(ml.ProgramError, match=r"level 'fit' reads `stranger\.(weight|bias)`.*belongs to no level"):
            ml.Program(fit)


def test_a_parameter_captured_before_the_build_is_refused():
    """A variable holding the nn.Parameter itself cannot be bound to the step's values: refused."""
    train, val = logreg_data()
    net = nn.Linear(5, 1).to(DT)
    hyper = ml.Hyper(log_l2=torch.full((5,), -2.0, dtype=DT))
    log_l2 = hyper.log_l2

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train, steps=2)
    def inner(net, batch):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        return fit + (log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)
        with pytest.raises(ml.ProgramError, match=r"level 'inner' reads parameter 'log_l2' of level 'outer' "
                                                  r"through a reference to the nn.Parameter itself \(`log_l2`\)"):
            ml.Program(outer)



def bottom_loss(w, a):
    return ((w - a.tanh()) ** 2).sum() + 0.1 * (w ** 4).sum()


def mid_loss(a, t, w):
    return ((a - t) ** 2).sum() + ((w - 1.0) ** 2 * a.exp()).sum()


def top_loss(a, w):
    return ((a - 0.5) ** 2).sum() + ((w + 0.2) ** 2).sum()


STARTS = {"bottom": 1.0, "mid": 0.5, "top": -0.3}


def three_levels(top_reads, method):
    """top → mid → bottom; the top's loss also takes the bottom level's module (two levels down),
    named as an argument or read through a closure."""
    low, middle, high = (ml.Hyper(v=torch.linspace(-1.0, 1.0, 3, dtype=DT) * s) for s in STARTS.values())

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.3), steps=3)
    def bottom(m, mid):
        return bottom_loss(m.v, mid.v)

    @ml.level(middle, optimizer=ml.optim.sgd(lr=0.2), steps=2, depends_on=[bottom], hypergrad=method)
    def mid(m, top, bottom):
        return mid_loss(m.v, top.v, bottom.v)

    if top_reads == "closure":
        def top(m, mid):
            return top_loss(mid.v, low.v)
    else:
        def top(m, mid, bottom):
            return top_loss(mid.v, bottom.v)
    return ml.Program(ml.level(high, optimizer=ml.optim.sgd(lr=0.1), depends_on=[mid])(top))


def three_level_reference():
    """d top / d t through mid's 2 updates, each after 3 warm-started bottom updates, by autograd over
    partial derivatives (torch.func.grad); mid's update takes its total derivative through the bottom
    block before it."""
    w, a, t = (torch.linspace(-1.0, 1.0, 3, dtype=DT) * s for s in STARTS.values())
    t = t.clone().requires_grad_()

    def bottom_block(w, a):
        for _ in range(3):
            w = w - 0.3 * torch.func.grad(bottom_loss)(w, a)
        return w

    for _ in range(2):
        g = torch.func.grad(lambda a_: mid_loss(a_, t, bottom_block(w, a_)))(a)
        w, a = bottom_block(w, a), a - 0.2 * g
    (expected,) = torch.autograd.grad(top_loss(a, w), t)
    return expected


@pytest.mark.parametrize("method", [ml.hypergrad.Unroll(), ml.hypergrad.Forward()], ids=repr)
def test_a_level_two_below_read_through_a_closure_carries_its_cotangent(method):
    """The top reads the bottom level's module without naming it: the bottom's cotangent goes through
    both blocks (the program that names it, three_levels("argument", ...), gives the same numbers)."""
    prog = three_levels("closure", method)
    assert ("top", "bottom", "reads") in set(prog.graph.edges(data="kind"))
    torch.testing.assert_close(prog.hypergradient("top")["v"], three_level_reference(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("opaque", [False, True], ids=["traced", "opaque"])
def test_maml_whose_upper_reads_the_task_module_through_a_closure(opaque):
    """Under vmap over tasks, a closure read of the adapted module sees each task's parameters."""
    import copy

    from test_meta import INNER_LR, mlp, mse, maml_reference, sinusoid_tasks
    support, query = sinusoid_tasks()
    meta = mlp()
    fast = copy.deepcopy(meta)

    @ml.level(fast, optimizer=ml.optim.sgd(lr=INNER_LR), data=support, steps=3, start_from="outer", tasks=True)
    def inner(own, batch):
        x, y = batch
        return mse(own(x), y)

    @ml.level(meta, optimizer=ml.optim.sgd(lr=0.01), data=query, depends_on=[inner])
    def outer(own, batch):
        x, y = batch
        pred = fast(x)
        if opaque:  # len() of a proxy stops symbolic_trace, a custom autograd.Function make_fx; vmap runs both
            pred = _Identity.apply(pred[: len(x)])
        return mse(pred, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)
        prog = ml.Program(outer)
    assert prog.levels["outer"].traced.opaque == opaque
    expected = maml_reference(meta, support, query)
    got = prog.hypergradient("outer")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)
