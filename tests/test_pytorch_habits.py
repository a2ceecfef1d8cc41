"""PyTorch habits inside a level function, each against hand-written autograd in float64: a value
computed under ``torch.no_grad()`` (a constant of the gradient, as in PyTorch); an in-place write to
a parameter or to the batch (refused at build: it would move values outside autograd and the
hypergradient); an input-gradient penalty; parametrized weights and forward hooks."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml

DT = torch.float64
K, LR = 3, 0.2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(12, 3, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)),
            (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)))


def _inner_loss(w, b, l2, batch, no_grad_scale):
    """The lower loss, written by hand; with ``no_grad_scale`` its fit is divided by a constant
    computed from the upper's parameter (what the level computes under torch.no_grad())."""
    x, y = batch
    fit = F.mse_loss(x @ w + b, y)
    if no_grad_scale:
        fit = fit / (1.0 + l2.detach() ** 2)
    return fit + l2 * (w * w).sum()


def _outer_loss(w, b, batch, normalize):
    x, y = batch
    pred = x @ w + b
    if normalize:
        pred = pred / pred.detach().std()
    return F.mse_loss(pred, y)


def _hand_hypergradient(w0, b0, l2_value, train, val, *, no_grad_scale, normalize):
    """K SGD steps on the lower loss by hand, then the upper loss's gradient with respect to l2."""
    l2 = torch.tensor(l2_value, dtype=DT, requires_grad=True)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    for _ in range(K):
        gw, gb = torch.autograd.grad(_inner_loss(w, b, l2, train, no_grad_scale), (w, b), create_graph=True)
        w, b = w - LR * gw, b - LR * gb
    return torch.autograd.grad(_outer_loss(w, b, val, normalize), l2)[0]


def _program(method, *, no_grad_scale=False, normalize=False, shape_branch=False, compile=False):
    """The bilevel ridge program whose levels compute part of their losses under torch.no_grad().
    ``shape_branch``: both levels branch on a shape in Python, which symbolic tracing cannot follow,
    so their graphs are captured by make_fx instead."""
    train, val = _data()
    torch.manual_seed(0)
    net = nn.Linear(3, 1).to(DT)
    hyper = ml.Hyper(l2=torch.tensor(0.3, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=LR), data=train, steps=K, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        if shape_branch and x.shape[0] < 2:
            raise ValueError("a batch of one")
        fit = F.mse_loss(net(x).squeeze(-1), y)
        if no_grad_scale:
            with torch.no_grad():
                scale = 1.0 + outer.l2 ** 2
            fit = fit / scale
        return fit + outer.l2 * (net.weight * net.weight).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.0), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        if shape_branch and x.shape[0] < 2:
            raise ValueError("a batch of one")
        pred = inner(x).squeeze(-1)
        if normalize:
            with torch.no_grad():
                s = inner(x).std()
            pred = pred / s
        return F.mse_loss(pred, y)

    w0, b0 = net.weight.detach().clone().squeeze(0), net.bias.detach().clone().squeeze(0)
    return ml.Program(outer, compile=compile), (w0, b0, train, val)


@pytest.mark.parametrize("method", [ml.hypergrad.Unroll(), ml.hypergrad.Forward()], ids=["unroll", "forward"])
@pytest.mark.parametrize("shape_branch", [False, True], ids=["symbolic", "make_fx"])
@pytest.mark.parametrize("no_grad_scale,normalize", [(True, False), (False, True)], ids=["in-lower", "in-upper"])
def test_a_value_computed_under_no_grad_is_a_constant_of_the_hypergradient(method, shape_branch, no_grad_scale,
                                                                            normalize):
    prog, (w0, b0, train, val) = _program(method, no_grad_scale=no_grad_scale, normalize=normalize,
                                          shape_branch=shape_branch)
    if shape_branch:
        assert all(prog.levels[n].traced.reason.startswith("captured by make_fx") for n in ("inner", "outer"))
    else:  # a detach shows no attention: the loss keeps the fast attention kernel
        assert not any(prog.levels[n].traced.attends for n in ("inner", "outer"))
    got = prog.hypergradient("outer")["l2"]
    want = _hand_hypergradient(w0, b0, 0.3, train, val, no_grad_scale=no_grad_scale, normalize=normalize)
    through = _hand_hypergradient(w0, b0, 0.3, train, val, no_grad_scale=False, normalize=False)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got, want)
    assert not torch.allclose(want, through, rtol=1e-3)  # the constant matters: differentiating through differs


def test_no_grad_regions_compile_with_the_same_numbers():
    prog, (w0, b0, train, val) = _program(ml.hypergrad.Unroll(), no_grad_scale=True, normalize=True, compile=True)
    want = _hand_hypergradient(w0, b0, 0.3, train, val, no_grad_scale=True, normalize=True)
    assert torch.allclose(prog.hypergradient("outer")["l2"], want, rtol=1e-10, atol=1e-12)
    assert sum(r.compiled_calls for r in prog.compiler.regions) > 0  # run compiled, stop_gradient inside


def test_a_program_built_under_no_grad_traces_its_losses_with_gradients():
    with torch.no_grad():
        prog, (w0, b0, train, val) = _program(ml.hypergrad.Unroll())
    got = prog.hypergradient("outer")["l2"]
    want = _hand_hypergradient(w0, b0, 0.3, train, val, no_grad_scale=False, normalize=False)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def _writing_program(write):
    train, val = _data()
    net = nn.Linear(3, 1).to(DT)
    hyper = ml.Hyper(l2=torch.tensor(0.3, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=LR), data=train, steps=K)
    def inner(net, batch, outer):
        x, y = batch
        if write == "param.data.clamp_":
            net.weight.data.clamp_(-0.1, 0.1)
        elif write == "param view mul_":
            net.weight.data.view(-1).mul_(0.5)
        elif write == "batch.sub_":
            x.sub_(x.mean(0))
        elif write == "batch +=":
            x += 1.0                        # the graph adds out of place; the function itself would not
        elif write == "batch setitem":
            x[0] = 0.0                      # symbolic tracing cannot follow it: captured by make_fx
        elif write == "opaque param clamp_":
            if float(x.sum()) != 0.5:       # control flow on a value: neither tracer follows it
                net.weight.data.clamp_(-0.1, 0.1)
        h = net(x).squeeze(-1)
        if write == "own values":
            h += 1.0
            h.clamp_(-5.0, 5.0)
        return F.mse_loss(h, y) + outer.l2 * (net.weight * net.weight).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.0), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.mse_loss(inner(x).squeeze(-1), y)

    return outer, net, train


@pytest.mark.parametrize("write,what,op", [
    ("param.data.clamp_", "its parameter 'weight'", "clamp_"),
    ("param view mul_", "its parameter 'weight'", "mul_"),
    ("batch.sub_", "its batch", "sub_"),
    ("batch +=", "its batch", "add_"),
    ("batch setitem", "its batch", "__setitem__"),
    ("opaque param clamp_", "its parameter 'weight'", "clamp_"),
])
def test_a_write_to_a_parameter_or_the_batch_is_refused_at_build_naming_the_op_and_the_fix(write, what, op):
    outer, net, train = _writing_program(write)
    w_before, x_before = net.weight.detach().clone(), train[0].clone()
    with pytest.raises(ml.ProgramError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)  # the opaque call's
        ml.Program(outer)
    message = str(err.value)
    assert "level 'inner'" in message and what in message and op in message
    assert ("project=ml.constraints.clamp" in message) == ("parameter" in what)
    # refused before it wrote: the build's own runs of the function on real tensors are watched
    assert torch.equal(net.weight, w_before) and torch.equal(train[0], x_before)


def test_in_place_ops_on_values_the_function_computed_are_ordinary_autograd():
    outer, net, train = _writing_program("own values")
    w0, b0 = net.weight.detach().clone().squeeze(0), net.bias.detach().clone().squeeze(0)
    prog = ml.Program(outer)
    val = _data()[1]
    l2 = torch.tensor(0.3, dtype=DT, requires_grad=True)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    for _ in range(K):
        x, y = train
        loss = F.mse_loss((x @ w + b + 1.0).clamp(-5.0, 5.0), y) + l2 * (w * w).sum()
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - LR * gw, b - LR * gb
    want = torch.autograd.grad(F.mse_loss(val[0] @ w + b, val[1]), l2)[0]
    assert torch.allclose(prog.hypergradient("outer")["l2"], want, rtol=1e-10, atol=1e-12)


def _input_gradient_penalty(f, x):
    """‖∂(Σ f(x))/∂x‖²: the penalty of double backpropagation (and of WGAN-GP's critic)."""
    x = x.clone().requires_grad_(True)
    gx, = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    return (gx ** 2).sum()


def _penalized_program(method=None):
    train, val = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hyper = ml.Hyper(lam=torch.tensor(0.3, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=LR), data=train, steps=K, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        return F.mse_loss(net(x).squeeze(-1), y) + outer.lam * _input_gradient_penalty(net, x)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.0), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.mse_loss(inner(x).squeeze(-1), y)

    return outer, net, train, val


def test_an_input_gradient_penalty_makes_its_own_leaf_and_unrolls_exactly():
    """The function makes a leaf that requires grad (a copy of its batch) to take a gradient in its
    input: a tensor of its own, not a stray one the program would have to learn."""
    outer, net, train, val = _penalized_program()
    p = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    prog = ml.Program(outer)
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)

    def f(p, x):
        return torch.func.functional_call(net, p, (x,))
    for _ in range(K):
        loss = F.mse_loss(f(p, train[0]).squeeze(-1), train[1]) + lam * _input_gradient_penalty(
            lambda x: f(p, x), train[0])
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: v - LR * g for (k, v), g in zip(p.items(), grads)}
    want, = torch.autograd.grad(F.mse_loss(f(p, val[0]).squeeze(-1), val[1]), lam)
    assert torch.allclose(prog.hypergradient("outer")["lam"], want, rtol=1e-10, atol=1e-12)


def test_an_input_gradient_penalty_under_forward_mode_is_refused_naming_the_cause():
    """torch.func transforms cannot run requires_grad_() inside the loss: Forward's products would
    fail in the first step; the build says why and what to use."""
    outer, _, _, _ = _penalized_program(ml.hypergrad.Forward())
    with pytest.raises(ml.ProgramError, match=r"level 'inner'.*input-gradient penalty.*Unroll\(\)"):
        ml.Program(outer)


def _features_hook(store):
    def hook(module, inputs, output):
        store["hidden"] = output
    return hook


@pytest.mark.parametrize("habit", ["weight_norm", "forward_hook"])
def test_parametrized_weights_and_forward_hooks_unroll_exactly(habit):
    """torch.nn.utils.parametrizations (the level learns ``original0/1``, the weight is computed
    from them at every call) and a forward hook whose stored activation the loss penalizes."""
    train, val = _data()
    store = {}

    def make_net():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
        if habit == "forward_hook":
            net[1].register_forward_hook(_features_hook(store))
        else:
            getattr(torch.nn.utils.parametrizations, habit)(net[0])
        return net

    def penalty(params):
        return (store["hidden"] ** 2).mean() if habit == "forward_hook" else sum((p * p).sum() for p in params)

    net = make_net()
    hyper = ml.Hyper(l2=torch.tensor(0.3, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=LR), data=train, steps=K)
    def inner(net, batch, outer):
        x, y = batch
        return F.mse_loss(net(x).squeeze(-1), y) + outer.l2 * penalty(p for _, p in net.named_parameters())

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.0), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.mse_loss(inner(x).squeeze(-1), y)

    p = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.TraceWarning)  # parametrized weights run as an opaque call
        prog = ml.Program(outer)
    got = prog.hypergradient("outer")["l2"]

    reference = make_net()
    l2 = torch.tensor(0.3, dtype=DT, requires_grad=True)
    for _ in range(K):
        fit = F.mse_loss(torch.func.functional_call(reference, p, (train[0],)).squeeze(-1), train[1])
        grads = torch.autograd.grad(fit + l2 * penalty(p.values()), list(p.values()), create_graph=True)
        p = {k: v - LR * g for (k, v), g in zip(p.items(), grads)}
    want, = torch.autograd.grad(F.mse_loss(torch.func.functional_call(reference, p, (val[0],)).squeeze(-1),
                                           val[1]), l2)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got, want)


def test_a_torch_compiled_module_is_learned_and_traced_as_the_module_it_wraps():
    """model = torch.compile(model): the level learns the wrapped module (a readable graph, no
    dynamo run at build or per step) and says so; the numbers are the plain module's."""
    train, val = _data()
    torch.manual_seed(0)
    net = nn.Linear(3, 1).to(DT)
    w0, b0 = net.weight.detach().clone().squeeze(0), net.bias.detach().clone().squeeze(0)
    hyper = ml.Hyper(l2=torch.tensor(0.3, dtype=DT))
    with pytest.warns(UserWarning, match=r"level 'inner': its module is torch.compile'd.*compile=True"):
        @ml.level(torch.compile(net), optimizer=ml.optim.sgd(lr=LR), data=train, steps=K)
        def inner(net, batch, outer):
            x, y = batch
            return F.mse_loss(net(x).squeeze(-1), y) + outer.l2 * (net.weight * net.weight).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.0), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.mse_loss(inner(x).squeeze(-1), y)

    prog = ml.Program(outer)
    assert not prog.levels["inner"].traced.opaque and set(prog.params("inner")) == {"weight", "bias"}
    want = _hand_hypergradient(w0, b0, 0.3, train, val, no_grad_scale=False, normalize=False)
    assert torch.allclose(prog.hypergradient("outer")["l2"], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("read", ["item", "float", "detach", "not at all"])
def test_an_upper_level_whose_parameters_no_lower_loss_takes_with_a_gradient_is_refused(read):
    """``outer.lam.item()`` in the lower loss: the lower solution does not move with lam, so the upper
    gradient would be an exact zero at every step. Refused at build, naming the level and the fix."""
    x, y = torch.randn(12, 3, dtype=DT), torch.randn(12, dtype=DT)
    net = nn.Linear(3, 1, bias=False).to(DT)
    hyper = ml.Hyper(lam=torch.tensor(0.2, dtype=DT))
    lam_of = {"item": lambda h: h.lam.item(), "float": lambda h: float(h.lam), "detach": lambda h: h.lam.detach(),
              "not at all": lambda h: 0.2}[read]

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=(x, y))
    def inner(net, batch, outer):
        xb, yb = batch
        return ((net(xb).squeeze(-1) - yb) ** 2).mean() + lam_of(outer) * (net.weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.5), data=(x, y), depends_on=[inner])
    def outer(h, batch, inner):
        xb, yb = batch
        return ((inner(xb).squeeze(-1) - yb) ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ml.ProgramError, match=r"level 'outer' would get a zero gradient at every step.*"
                                                  r"\['inner'\]'s solution.*outer\.lam.item\(\)"):
            ml.Program(outer)


def _replace_problem(momentum=0.9):
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, dtype=DT), torch.randn(12, dtype=DT)
    net = nn.Linear(3, 1, bias=False).to(DT)
    hyper = ml.Hyper(lam=torch.tensor(0.2, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1, momentum=momentum), data=(x, y))
    def inner(net, batch, outer):
        xb, yb = batch
        return ((net(xb).squeeze(-1) - yb) ** 2).mean() + outer.lam * (net.weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.5), data=(x, y), depends_on=[inner])
    def outer(h, batch, inner):
        xb, yb = batch
        return ((inner(xb).squeeze(-1) - yb) ** 2).mean()

    return ml.Program(outer), net, hyper, (x, y)


def test_a_parameter_replaced_on_the_module_after_the_build_is_the_one_trained():
    """``net.weight = nn.Parameter(w)`` between steps: the next step starts from w (as if copied in
    place) and writes its update into the new parameter (hand-written float64 autograd)."""
    prog, net, hyper, (x, y) = _replace_problem(momentum=0.0)
    prog.step()
    w = torch.tensor([[0.3, -0.2, 0.1]], dtype=DT)
    net.weight = nn.Parameter(w.clone())
    lam = hyper.lam.detach().clone().requires_grad_()
    wr = w.clone().requires_grad_()
    inner_loss = ((x @ wr.T).squeeze(-1) - y).square().mean() + lam * (wr ** 2).sum()
    (g,) = torch.autograd.grad(inner_loss, wr, create_graph=True)
    w1 = wr - 0.1 * g
    (hg,) = torch.autograd.grad(((x @ w1.T).squeeze(-1) - y).square().mean(), lam)
    torch.testing.assert_close(prog.params("inner")["weight"], w, rtol=0, atol=0)
    torch.testing.assert_close(prog.hypergradient("outer")["lam"], hg, rtol=0, atol=1e-12)
    prog.step()
    torch.testing.assert_close(net.weight.detach(), w1.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(hyper.lam.detach(), lam.detach() - 0.5 * hg, rtol=0, atol=1e-12)


def test_a_parameter_replaced_by_one_of_another_shape_is_refused_and_nothing_moves():
    prog, net, hyper, _ = _replace_problem()
    prog.step()
    lam = hyper.lam.detach().clone()
    net.weight = nn.Parameter(torch.zeros(2, 3, dtype=DT))
    with pytest.raises(ml.ProgramError, match=r"level 'inner'.*parameter 'weight' was replaced.*shape \(2, 3\)"):
        prog.step()
    assert torch.equal(hyper.lam, lam) and prog.step_count == 1
