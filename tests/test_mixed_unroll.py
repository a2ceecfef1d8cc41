"""MixedUnroll (forward-over-reverse Hessian products, per-update rematerialization) against
hand-written torch.autograd of the unrolled computation, float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from helpers import DT, SquareWithoutJvp, inner_loss_fn, logreg_data, make_hpo, outer_loss_fn, reference_hpo

TOL = dict(rtol=1e-9, atol=1e-12)


def test_sgd_hypergradient_and_step_equal_hand_written_autograd():
    K, lr = 6, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr, method=ml.hypergrad.MixedUnroll())
    expected, (w, b) = reference_hpo(net, hyper, train, val, K, lr)
    got = prog.hypergradient("outer")["log_l2"]
    assert got.dtype == DT and got.abs().max() > 1e-4  # a hypergradient that is not trivially zero
    torch.testing.assert_close(got, expected, **TOL)
    before = hyper.log_l2.detach().clone()
    prog.step()
    torch.testing.assert_close(prog.params("outer")["log_l2"], before - 0.1 * expected, **TOL)
    torch.testing.assert_close(prog.params("inner")["weight"].squeeze(0), w, **TOL)
    torch.testing.assert_close(prog.params("inner")["bias"].squeeze(0), b, **TOL)


def _by_hand(opt_name, p, g, st, t, lr, wd=0.0):
    """One update of torch.optim-style SGD (momentum 0.9, Nesterov) or Adam, written out."""
    if opt_name == "sgd":
        g = g + wd * p
        st["buf"] = g if st["buf"] is None else 0.9 * st["buf"] + g
        return p - lr * (g + 0.9 * st["buf"])
    st["m"] = 0.9 * st["m"] + 0.1 * g
    st["v"] = 0.999 * st["v"] + 0.001 * g * g
    mh, vh = st["m"] / (1 - 0.9 ** t), st["v"] / (1 - 0.999 ** t)
    return p - lr * mh / (torch.sqrt(vh + 1e-16) + 1e-8)


def _state(p):
    return dict(m=torch.zeros_like(p), v=torch.zeros_like(p), buf=None)


@pytest.mark.parametrize("opt", [ml.optim.sgd(lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01),
                                 ml.optim.adam(lr=0.05)], ids=lambda o: o.name)
def test_stateful_optimizers_equal_hand_written_autograd(opt):
    """The reverse sweep carries the cotangent of the momentum buffer / Adam moments too."""
    K = 5
    prog, net, hyper, train, val = make_hpo(K=K, inner_opt=opt, method=ml.hypergrad.MixedUnroll())
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    params = [net.weight.detach().clone().squeeze(0).requires_grad_(),
              net.bias.detach().clone().squeeze(0).requires_grad_()]
    states = [_state(p) for p in params]
    lr = 0.3 if opt.name == "sgd" else 0.05
    for t in range(1, K + 1):
        grads = torch.autograd.grad(inner_loss_fn(*params, log_l2, train), params, create_graph=True)
        params = [_by_hand(opt.name, p, g, st, t, lr, wd=0.01) for p, g, st in zip(params, grads, states)]
    (expected,) = torch.autograd.grad(outer_loss_fn(*params, val), log_l2)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, **TOL)


def _learned_lr_program(opt_name, K):
    train, val = logreg_data(d=4, seed=1)
    torch.manual_seed(1)
    net = nn.Linear(4, 1).to(DT)
    hyper = ml.Hyper(log_lr=torch.tensor(-1.5, dtype=DT), log_l2=torch.full((4,), -2.0, dtype=DT))
    lr = lambda outer: outer.log_lr.exp()  # noqa: E731 - read by the optimizer from the upper level
    opt = ml.optim.sgd(lr=lr, momentum=0.9, nesterov=True) if opt_name == "sgd" else ml.optim.adam(lr=lr)

    @ml.level(net, optimizer=opt, data=train, steps=K, hypergrad=ml.hypergrad.MixedUnroll())
    def inner(net, batch, outer):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        return fit + (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

    return ml.Program(outer), net, hyper, train, val


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_learned_learning_rate_and_penalty_equal_hand_written_autograd(opt_name):
    """θ_U reaches the updates twice: through the optimizer's learning rate (the first-order VJP of
    the update) and through the lower loss (the mixed Hessian block H_Uθ u)."""
    K = 4
    prog, net, hyper, train, val = _learned_lr_program(opt_name, K)
    log_lr = hyper.log_lr.detach().clone().requires_grad_()
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    params = [net.weight.detach().clone().squeeze(0).requires_grad_(),
              net.bias.detach().clone().squeeze(0).requires_grad_()]
    states = [_state(p) for p in params]
    for t in range(1, K + 1):
        grads = torch.autograd.grad(inner_loss_fn(*params, log_l2, train), params, create_graph=True)
        params = [_by_hand(opt_name, p, g, st, t, log_lr.exp()) for p, g, st in zip(params, grads, states)]
    expected = torch.autograd.grad(outer_loss_fn(*params, val), (log_lr, log_l2))
    got = prog.hypergradient("outer")
    assert expected[0].abs() > 1e-4  # the learning rate really moves the outer loss
    torch.testing.assert_close(got["log_lr"], expected[0], **TOL)
    torch.testing.assert_close(got["log_l2"], expected[1], **TOL)


def test_micro_batches_are_differentiated_one_at_a_time_as_their_mean():
    """grad_accum=2: each update's gradient is the mean over two micro-batches."""
    (x, y), val = logreg_data(n=48, d=3, seed=2)
    halves = [(x[:12], y[:12]), (x[12:], y[12:])]
    torch.manual_seed(2)
    net = nn.Linear(3, 1).to(DT)
    hyper = ml.Hyper(log_l2=torch.full((3,), -1.0, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.5), data=halves, steps=3, hypergrad=ml.hypergrad.MixedUnroll())
    def inner(net, batch, outer):
        xb, yb = batch
        fit = F.binary_cross_entropy_with_logits(net(xb).squeeze(-1), yb)
        return fit + (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        xb, yb = batch
        return F.binary_cross_entropy_with_logits(inner(xb).squeeze(-1), yb)

    prog = ml.Program(outer, grad_accum=2)
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    w = net.weight.detach().clone().squeeze(0).requires_grad_()
    b = net.bias.detach().clone().squeeze(0).requires_grad_()
    for _ in range(3):
        loss = sum(inner_loss_fn(w, b, log_l2, h) for h in halves) / 2
        gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
        w, b = w - 0.5 * gw, b - 0.5 * gb
    (expected,) = torch.autograd.grad(outer_loss_fn(w, b, val), log_l2)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, **TOL)


def test_a_start_from_the_upper_level_is_differentiated_as_maml():
    """start_from=<upper>: the start is θ_U itself, so vᵀ dθ_K/dθ_U carries λ_0 into θ_U."""
    x = torch.linspace(-2, 2, 10, dtype=DT).unsqueeze(-1)
    y, yq = torch.sin(x), torch.sin(x + 0.2)
    torch.manual_seed(3)
    meta = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    fast = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)

    @ml.level(fast, optimizer=ml.optim.sgd(lr=0.1, momentum=0.5), steps=3, start_from="outer",
              hypergrad=ml.hypergrad.MixedUnroll())
    def inner(fast):
        return ((fast(x) - y) ** 2).mean()

    @ml.level(meta, optimizer=ml.optim.sgd(lr=0.01), depends_on=[inner])
    def outer(meta, inner):
        return ((inner(x) - yq) ** 2).mean()

    prog = ml.Program(outer)
    start = {k: v.detach().clone().requires_grad_() for k, v in meta.named_parameters()}
    params, bufs = dict(start), None
    for _ in range(3):
        loss = ((torch.func.functional_call(meta, params, (x,)) - y) ** 2).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
        bufs = grads if bufs is None else {k: 0.5 * bufs[k] + grads[k] for k in grads}
        params = {k: params[k] - 0.1 * bufs[k] for k in params}
    final = ((torch.func.functional_call(meta, params, (x,)) - yq) ** 2).mean()
    expected = dict(zip(start, torch.autograd.grad(final, list(start.values()))))
    got = prog.hypergradient("outer")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **TOL)


def test_a_lower_level_with_lower_levels_is_refused_at_build():
    a, b, c = (ml.Hyper(w=torch.zeros(2, dtype=DT)) for _ in range(3))

    @ml.level(c, optimizer=ml.optim.sgd(lr=0.1), steps=2)
    def bottom(m, middle):
        return ((m.w - middle.w) ** 2).sum()

    @ml.level(b, optimizer=ml.optim.sgd(lr=0.1), steps=2, depends_on=[bottom], hypergrad=ml.hypergrad.MixedUnroll())
    def middle(m, bottom, top):
        return ((m.w - top.w) ** 2).sum() + (bottom.w ** 2).sum()

    @ml.level(a, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle])
    def top(m, middle):
        return ((middle.w - 1) ** 2).sum()

    with pytest.raises(ml.ProgramError, match=r"level 'middle' has lower levels \['bottom'\].*"
                                              r"use hypergrad=ml\.hypergrad\.Unroll\(\) on 'middle'"):
        ml.Program(top)


def _mse_levels(fit):
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, dtype=DT)
    low, up = ml.Hyper(w=torch.zeros(3, dtype=DT)), ml.Hyper(a=torch.zeros(3, dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=2, hypergrad=ml.hypergrad.MixedUnroll())
    def inner(m, outer):
        return fit(x @ m.w, y) + (outer.a.exp() * m.w ** 2).sum()

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return ((x @ inner.w - y) ** 2).mean()

    return outer, (x, y)


def test_mse_loss_takes_forward_over_reverse_products_through_its_traced_arithmetic():
    """F.mse_loss (mean) has no forward derivative of its backward when the target has no tangent
    (torch 2.13, pytorch#123996); the traced graph computes it as arithmetic, so MixedUnroll works."""
    outer, (x, y) = _mse_levels(F.mse_loss)
    prog = ml.Program(outer)
    a = torch.zeros(3, dtype=DT, requires_grad=True)
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    for _ in range(2):
        g, = torch.autograd.grad(((x @ w - y) ** 2).mean() + (a.exp() * w ** 2).sum(), w, create_graph=True)
        w = w - 0.1 * g
    want, = torch.autograd.grad(((x @ w - y) ** 2).mean(), a)
    assert torch.allclose(prog.hypergradient("outer")["a"], want, rtol=1e-10, atol=1e-12)


def test_a_loss_without_forward_over_reverse_derivatives_is_refused_at_build():
    """An op without a forward-mode derivative is refused at build, naming the level and the fix,
    instead of failing in the first step."""
    outer, _ = _mse_levels(lambda pred, target: SquareWithoutJvp.apply(pred - target).mean())
    with pytest.raises(ml.ProgramError, match=r"level 'inner': its method MixedUnroll\(\) takes forward-mode "
                                              r"derivatives.*jvp staticmethod"):
        ml.Program(outer)


def _adam_by_hand(w, g, m, v, t, lr=0.1):
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return w - lr * (m / (1 - 0.9 ** t)) / (torch.sqrt(v / (1 - 0.999 ** t) + 1e-16) + 1e-8), m, v


def test_a_level_above_differentiates_through_its_products():
    """Three levels: the middle level's gradient contains the bottom's MixedUnroll hypergradient,
    and the top level unrolls through the middle's updates, so it differentiates those products."""
    torch.manual_seed(4)
    init = [torch.randn(3, dtype=DT) for _ in range(3)]
    a, b, c = (ml.Hyper(w=x.clone()) for x in init)

    def bottom_loss(wc, wb):
        return ((wc - wb.tanh()) ** 2).sum() + 0.1 * (wc ** 4).sum()

    def middle_loss(wb, wc, wa):
        return ((wb - wa) ** 2).sum() + (wc.sin() ** 2).sum()

    @ml.level(c, optimizer=ml.optim.adam(lr=0.1), steps=3, hypergrad=ml.hypergrad.MixedUnroll())
    def bottom(m, middle):
        return bottom_loss(m.w, middle.w)

    @ml.level(b, optimizer=ml.optim.sgd(lr=0.1, momentum=0.5), steps=2, depends_on=[bottom])
    def middle(m, bottom, top):
        return middle_loss(m.w, bottom.w, top.w)

    @ml.level(a, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle])
    def top(m, middle):
        return ((middle.w - 1) ** 2).sum()

    prog = ml.Program(top)
    wa = init[0].clone().requires_grad_()
    wb, wc = init[1].clone(), init[2].clone().requires_grad_()
    m, v, count, buf, middle_grads = torch.zeros(3, dtype=DT), torch.zeros(3, dtype=DT), 0, None, []
    for _ in range(2):  # the middle level's updates, each after the bottom level's block
        wb = wb if wb.requires_grad else wb.clone().requires_grad_()
        for _ in range(3):  # warm-started: Adam's moments and count go on from the last block
            count += 1
            wc = wc.view_as(wc)  # a partial derivative: not through wb, which earlier wc reached
            (g,) = torch.autograd.grad(bottom_loss(wc, wb), wc, create_graph=True)
            wc, m, v = _adam_by_hand(wc, g, m, v, count)
        (gb,) = torch.autograd.grad(middle_loss(wb, wc, wa), wb, create_graph=True)  # through the block
        middle_grads.append(gb)
        buf = gb if buf is None else 0.5 * buf + gb
        wb = wb - 0.1 * buf
    (expected,) = torch.autograd.grad(((wb - 1) ** 2).sum(), wa)
    torch.testing.assert_close(prog.hypergradient("middle")["w"], middle_grads[0].detach(), **TOL)
    torch.testing.assert_close(prog.hypergradient("top")["w"], expected, **TOL)


def test_maml_over_a_task_batch_under_vmap_equals_a_hand_written_loop():
    """tasks=True: the reverse sweep runs per task under vmap, its products by torch.func."""
    from test_meta import maml_program, maml_reference
    prog, meta, support, query = maml_program(ml.hypergrad.MixedUnroll())
    expected = maml_reference(meta, support, query)
    got = prog.hypergradient("outer")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **TOL)


def test_the_reverse_pass_sees_the_dropout_masks_of_the_forward_pass():
    """Each update's gradient and product are recomputed in the reverse pass: under the update's
    seed, so they draw the masks its forward evaluation drew."""
    from test_numerics import MASKS, _reweighting
    K = 3
    prog, w, logits, inner_loss, outer_loss = _reweighting(ml.hypergrad.MixedUnroll(), steps=K)
    MASKS.clear()
    got = prog.hypergradient("outer")["logits"]
    forward = MASKS[:K]
    assert not torch.equal(forward[0], forward[1])  # every update draws its own mask
    logits = logits.clone().requires_grad_()
    for mask in forward:  # the block by hand, with the masks the forward pass drew
        w = w if w.requires_grad else w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(inner_loss(w, logits, mask), w, create_graph=True)
        w = w - 0.1 * gw
    (expected,) = torch.autograd.grad(outer_loss(w), logits)
    torch.testing.assert_close(got, expected, **TOL)
