"""Python values a traced level froze (mlodsl.baked): changing one after the build refuses the step
instead of computing with the old value; a change the graph does not use, or a tensor changed in
place, gives the hand-written hypergradient. References are hand-written float64 autograd."""
import argparse
import warnings

import pytest
import torch
from torch import nn

import mlodsl as ml

DT = torch.float64
CONFIG = {"temp": 1.0, "epoch": 0}  # a module-level config dict, as scripts keep them
ARGS = argparse.Namespace(temp=1.0)
TEMP = 1.0


def scaled(r):
    """A helper the level calls, reading a global of its own."""
    return TEMP * (r ** 2).mean()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)) for _ in range(4)]
    val = (torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, generator=g, dtype=DT))
    return batches, val


def _program(read_scale, batches, val, net=None):
    """One SGD step (lr 0.1) of a linear regression whose loss is scaled by ``read_scale(net, r)``;
    the upper level learns its weight decay lam from the validation MSE."""
    net = net or nn.Linear(3, 1, bias=False).to(DT)
    nn.init.constant_(net.weight, 0.1)
    hyper = ml.Hyper(lam=torch.tensor(0.2, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=batches)
    def inner(net, batch, outer):
        x, y = batch
        r = net(x).squeeze(-1) - y
        return read_scale(net, r) + outer.lam * (net.weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.5), data=val, depends_on=[inner])
    def outer(h, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    return ml.Program(outer), net, hyper


def _hand(w0, lam0, batch, val, scale):
    """(hypergradient of lam, w after the inner step) for loss scale * mse + lam |w|²."""
    lam = lam0.detach().clone().requires_grad_()
    w = w0.detach().clone().requires_grad_()
    x, y = batch
    loss = scale * ((x @ w.T).squeeze(-1) - y).square().mean() + lam * (w ** 2).sum()
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    w1 = w - 0.1 * g
    xv, yv = val
    (hg,) = torch.autograd.grad(((xv @ w1.T).squeeze(-1) - yv).square().mean(), lam)
    return hg, w1.detach()


def _check_step(prog, net, hyper, batch, val, scale):
    hg, w1 = _hand(net.weight, hyper.lam, batch, val, scale)
    lam_before = hyper.lam.detach().clone()
    prog.step()
    torch.testing.assert_close(net.weight.detach(), w1, rtol=0, atol=1e-12)
    torch.testing.assert_close(hyper.lam.detach(), lam_before - 0.5 * hg, rtol=0, atol=1e-12)


def _closure_value():
    box = {"s": 1.0}

    def set_scale(v):
        box["s"] = v

    return (lambda net, r: box["s"] * (r ** 2).mean()), set_scale, "box['s']"


def _nonlocal_float():
    s = 1.0

    def read(net, r):
        return s * (r ** 2).mean()

    def set_scale(v):
        nonlocal s
        s = v

    return read, set_scale, "s"


def _module_attribute():
    def read(net, r):
        return net.tau * (r ** 2).mean()

    def set_scale(v):
        _module_attribute.net.tau = v

    return read, set_scale, "inner.tau"


SOURCES = {
    "a global config dict's item": (lambda: ((lambda net, r: CONFIG["temp"] * (r ** 2).mean()),
                                             lambda v: CONFIG.__setitem__("temp", v), "CONFIG['temp']")),
    "an argparse namespace's attribute": (lambda: ((lambda net, r: ARGS.temp * (r ** 2).mean()),
                                                   lambda v: setattr(ARGS, "temp", v), "ARGS.temp")),
    "a global read by a helper function": (lambda: ((lambda net, r: scaled(r)),
                                                    lambda v: globals().__setitem__("TEMP", v), "TEMP")),
    "a closure's dict item": _closure_value,
    "a closure variable rebound (nonlocal)": _nonlocal_float,
    "a module attribute": _module_attribute,
}


@pytest.fixture(autouse=True)
def _reset_globals():
    global TEMP
    yield
    CONFIG.update(temp=1.0, epoch=0)
    ARGS.temp = 1.0
    TEMP = 1.0


@pytest.mark.parametrize("source", SOURCES)
def test_a_python_value_changed_after_the_build_refuses_the_step_and_moves_nothing(source):
    batches, val = _data()
    net = nn.Linear(3, 1, bias=False).to(DT)
    net.tau = 1.0
    _module_attribute.net = net
    read, set_scale, where = SOURCES[source]()
    prog, net, hyper = _program(read, batches, val, net)
    _check_step(prog, net, hyper, batches[0], val, 1.0)

    set_scale(2.0)
    w, lam = net.weight.detach().clone(), hyper.lam.detach().clone()
    for call in (prog.step, lambda: prog.hypergradient("outer")):
        with pytest.raises(ml.ProgramError) as err:
            call()
        assert "level 'inner'" in str(err.value) and where in str(err.value) and "refused" in str(err.value)
        assert "1.0 when traced, 2.0 now" in str(err.value)
    assert torch.equal(net.weight, w) and torch.equal(hyper.lam, lam) and prog.step_count == 1

    set_scale(1.0)  # back to the traced value: the step goes on, on the batch it was to draw
    _check_step(prog, net, hyper, batches[1], val, 1.0)


def test_a_change_the_graph_does_not_read_retraces_and_goes_on():
    batches, val = _data()
    prog, net, hyper = _program(lambda net, r: CONFIG["temp"] * (r ** 2).mean(), batches, val)
    for step in range(3):
        CONFIG["epoch"] = step + 1  # read by no level: the retrace finds the same graph
        _check_step(prog, net, hyper, batches[step], val, 1.0)
    assert prog._baked.retraces == 3


def test_a_value_held_in_a_tensor_follows_its_schedule():
    """The fix the refusal names: a tensor changed in place, or a buffer, is read at every step."""
    batches, val = _data()
    temp = torch.tensor(1.0, dtype=DT)
    net = nn.Linear(3, 1, bias=False).to(DT)
    net.register_buffer("tau", torch.tensor(1.0, dtype=DT))
    prog, net, hyper = _program(lambda net, r: temp * net.tau * (r ** 2).mean(), batches, val, net)
    for step, (t, tau) in enumerate([(1.0, 1.0), (0.5, 2.0), (0.25, 3.0)]):
        temp.fill_(t)
        net.tau.fill_(tau)
        _check_step(prog, net, hyper, batches[step], val, t * tau)
    assert prog._baked.retraces == 0


@pytest.mark.parametrize("same_value", [True, False])
def test_a_tensor_rebound_to_another_is_refused_unless_its_values_are_the_same(same_value):
    batches, val = _data()
    held = {"t": torch.tensor(1.0, dtype=DT)}
    prog, net, hyper = _program(lambda net, r: held["t"] * (r ** 2).mean(), batches, val)
    _check_step(prog, net, hyper, batches[0], val, 1.0)
    held["t"] = torch.tensor(1.0 if same_value else 3.0, dtype=DT)
    if same_value:
        _check_step(prog, net, hyper, batches[1], val, 1.0)
    else:
        with pytest.raises(ml.ProgramError, match=r"held\['t'\] \(tensor of shape \(\) when traced"):
            prog.step()


def test_a_submodule_setting_read_in_its_forward_is_watched():
    """Dropout's p is read by Dropout.forward, not by the level function: it is frozen all the same."""
    batches, val = _data()
    net = nn.Sequential(nn.Linear(3, 1, bias=False), nn.Dropout(p=0.0)).to(DT)
    hyper = ml.Hyper(lam=torch.tensor(0.2, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=batches)
    def inner(net, batch, outer):
        x, y = batch
        return ((net(x).squeeze(-1) - y) ** 2).mean() + outer.lam * (net[0].weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.5), data=val, depends_on=[inner])
    def outer(h, batch, inner):
        x, y = batch
        return ((inner(x).squeeze(-1) - y) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = ml.Program(outer)
    prog.step()
    net[1].p = 0.5
    with pytest.raises(ml.ProgramError, match=r"inner\.1\.p \(0\.0 when traced, 0\.5 now\)"):
        prog.step()


def test_a_value_computed_while_tracing_from_an_outside_tensor_follows_that_tensor():
    """``log_t.exp()`` of a closure tensor runs before it meets a traced value: as a graph constant it
    would keep exp(log_t) at build time; it is an op of the graph on log_t instead. ``temp.item()``
    cannot be: that level runs its function live (and warns)."""
    batches, val = _data()
    log_t = torch.tensor(0.0, dtype=DT)
    prog, net, hyper = _program(lambda net, r: log_t.exp() * (r ** 2).mean(), batches, val)
    assert not prog.levels["inner"].traced.opaque and "exp" in prog.levels["inner"].traced.graph.code
    for step, t in enumerate([0.0, 0.7, -0.4]):
        log_t.fill_(t)
        _check_step(prog, net, hyper, batches[step], val, torch.tensor(t, dtype=DT).exp())

    temp = torch.tensor(1.0, dtype=DT)
    with pytest.warns(ml.TraceWarning, match=r"reads the values of a tensor from outside the function.*item\(\)"):
        prog, net, hyper = _program(lambda net, r: temp.item() * (r ** 2).mean(), batches, val)
    for step, t in enumerate([1.0, 0.5]):
        temp.fill_(t)
        _check_step(prog, net, hyper, batches[step], val, t)


def test_a_value_computed_from_a_buffer_is_part_of_the_graph():
    """A buffer is a traced value: ``net.tau * 2`` is an op of the graph, not a constant."""
    batches, val = _data()
    net = nn.Linear(3, 1, bias=False).to(DT)
    net.register_buffer("tau", torch.tensor(1.0, dtype=DT))
    prog, net, hyper = _program(lambda net, r: (net.tau * 2) * (r ** 2).mean(), batches, val, net)
    assert not prog.levels["inner"].traced.opaque
    for step, tau in enumerate([1.0, 0.3, 2.0]):
        net.tau.fill_(tau)
        _check_step(prog, net, hyper, batches[step], val, 2 * tau)
