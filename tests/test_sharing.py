"""Modules and parameters reached twice: tied weights inside a level get the summed gradient and
the user's modules are never corrupted; a module or parameter given to two levels is refused."""
import copy
import warnings

import pytest
import torch
from torch import nn

import mlodsl as ml
from helpers import DT

K, LR = 3, 0.2


def regression(seed=0, n=16, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    return x, torch.sin(x) + 0.1 * torch.randn(n, d, generator=g, dtype=DT)


def tied_net(seed=0):
    """One Linear reached twice: its weight and bias are used by both layers."""
    torch.manual_seed(seed)
    lin = nn.Linear(3, 3).to(DT)
    return nn.Sequential(lin, nn.Tanh(), lin)


def tied_forward(W, b, x):
    h = torch.tanh(x @ W.T + b)
    return h @ W.T + b


def test_the_tied_sequential_trains_with_the_summed_gradient():
    """Traced, and as the opaque call (which binds both slots of the tied Linear)."""
    for opaque in (False, True):
        _train_tied_against_autograd(opaque)


def _train_tied_against_autograd(opaque):
    seq, data = tied_net(), regression()
    reference = copy.deepcopy(seq)  # deepcopy keeps the tie
    assert reference[0].weight is reference[2].weight

    @ml.level(seq, optimizer=ml.optim.sgd(lr=LR), data=data)
    def fit(net, batch):
        x, y = batch
        pred = net(x)
        if opaque and pred.sum() > 1e9:  # data-dependent control flow: the opaque call (never taken)
            pred = pred * 0
        return ((pred - y) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)
        prog = ml.Program(fit)
    assert prog.levels["fit"].traced.opaque == opaque
    assert set(prog.params("fit")) == {"0.weight", "0.bias"}
    for _ in range(3):
        x, y = data
        grads = torch.autograd.grad(((reference(x) - y) ** 2).mean(), [reference[0].weight, reference[0].bias])
        got = prog.hypergradient("fit")
        torch.testing.assert_close(got["0.weight"], grads[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["0.bias"], grads[1], rtol=1e-12, atol=1e-14)
        prog.step()
        with torch.no_grad():
            for p, g in zip([reference[0].weight, reference[0].bias], grads):
                p -= LR * g
    torch.testing.assert_close(prog.params("fit")["0.weight"], reference[0].weight.detach(), rtol=1e-12, atol=1e-14)
    assert seq[0].weight is seq[2].weight and torch.equal(seq[2].weight.detach(), prog.params("fit")["0.weight"])


def test_a_tied_lower_level_gets_the_hand_written_hypergradient():
    seq, train, val = tied_net(), regression(0), regression(1)
    hyper = ml.Hyper(log_decay=torch.tensor(-1.0, dtype=DT))
    W0, b0 = seq[0].weight.detach().clone(), seq[0].bias.detach().clone()

    @ml.level(seq, optimizer=ml.optim.sgd(lr=LR), data=train, steps=K)
    def inner(net, batch, outer):
        x, y = batch
        return ((net(x) - y) ** 2).mean() + outer.log_decay.exp() * (net[2].weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    prog = ml.Program(outer)
    log_decay = hyper.log_decay.detach().clone().requires_grad_()
    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    for _ in range(K):
        x, y = train
        loss = ((tied_forward(W, b, x) - y) ** 2).mean() + log_decay.exp() * (W ** 2).sum()
        gW, gb = torch.autograd.grad(loss, (W, b), create_graph=True)
        W, b = W - LR * gW, b - LR * gb
    (expected,) = torch.autograd.grad(((tied_forward(W, b, val[0]) - val[1]) ** 2).mean(), log_decay)
    torch.testing.assert_close(prog.hypergradient("outer")["log_decay"], expected, rtol=1e-10, atol=1e-13)
    prog.step()
    torch.testing.assert_close(prog.params("inner")["0.weight"], W.detach(), rtol=1e-10, atol=1e-13)


def test_building_leaves_the_tied_module_untouched():
    seq = tied_net()
    before = {k: p.detach().clone() for k, p in seq.named_parameters(remove_duplicate=False)}
    objects = dict(seq.named_parameters(remove_duplicate=False))

    @ml.level(seq, optimizer=ml.optim.sgd(lr=LR), data=regression())
    def fit(net, batch):
        x, y = batch
        return ((net(x) - y) ** 2).mean()

    prog = ml.Program(fit)
    for k, p in seq.named_parameters(remove_duplicate=False):
        assert p is objects[k] and isinstance(p, nn.Parameter) and p.requires_grad
        assert torch.equal(p.detach(), before[k])
    prog.step()
    for k, p in seq.named_parameters(remove_duplicate=False):
        assert p is objects[k]
        assert torch.equal(p.detach(), prog.params("fit")[k.replace("2.", "0.")])


def test_weights_tied_across_two_submodules_get_the_summed_gradient():
    """The language-model tie: one nn.Parameter set on two different submodules."""
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)}).to(DT)
    model["b"].weight = model["a"].weight
    reference, data = copy.deepcopy(model), regression()

    @ml.level(model, optimizer=ml.optim.sgd(lr=LR), data=data)
    def fit(m, batch):
        x, y = batch
        return ((m["b"](torch.tanh(m["a"](x))) - y) ** 2).mean()

    prog = ml.Program(fit)
    x, y = data
    loss = ((reference["b"](torch.tanh(reference["a"](x))) - y) ** 2).mean()
    names = list(prog.params("fit"))
    assert names == ["a.weight", "a.bias", "b.bias"]
    expected = torch.autograd.grad(loss, [reference.get_parameter(k) for k in names])
    got = prog.hypergradient("fit")
    for k, g in zip(names, expected):
        torch.testing.assert_close(got[k], g, rtol=1e-12, atol=1e-14)
    prog.step()
    assert model["b"].weight is model["a"].weight
    assert torch.equal(model["b"].weight.detach(), prog.params("fit")["a.weight"])


def _two_levels(lower_module, upper_module):
    @ml.level(lower_module, optimizer=ml.optim.sgd(lr=0.1))
    def low(m, high):
        return ((m.weight - high.weight) ** 2).sum()

    @ml.level(upper_module, optimizer=ml.optim.sgd(lr=0.1), depends_on=[low])
    def high(m, low):
        return ((low.weight - 1.0) ** 2).sum()

    return high


def test_one_module_given_to_two_levels_is_refused():
    shared = ml.Hyper(weight=torch.ones(2, dtype=DT))
    with pytest.raises(ml.ProgramError, match=r"levels '(high|low)' and '(low|high)' are given the same module"):
        ml.Program(_two_levels(shared, shared))


def test_one_parameter_in_the_modules_of_two_levels_is_refused():
    a, b = nn.Linear(2, 2).to(DT), nn.Linear(2, 2).to(DT)
    b.weight = a.weight  # the same nn.Parameter in both modules
    with pytest.raises(ml.ProgramError, match=r"levels '(high|low)' and '(low|high)' share one nn.Parameter "
                                              r"\('weight' of '\w+' is 'weight' of '\w+'\)"):
        ml.Program(_two_levels(a, b))
    b.weight = nn.Parameter(a.weight.detach().clone())  # a copy of it: two parameters, accepted
    ml.Program(_two_levels(a, b))
