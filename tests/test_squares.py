"""``p ** 2`` of a parameter written ``p * p`` in a loss differentiated twice (``mlodsl.squares``):
the same loss, gradient and Hessian-vector product bit for bit, without the ``2·p`` a graph-building
backward pass of the square saves."""
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from helpers import DT, RIDGE_D, ridge_data, ridge_levels
from mlodsl.squares import POW


def _program():
    train, val = ridge_data(0)
    net = nn.Linear(RIDGE_D, 1, bias=False).to(DT)
    hyper = ml.Hyper(log_l2=torch.linspace(-2.0, 0.0, RIDGE_D, dtype=DT))
    return ridge_levels(net, hyper, train, val, optimizer=ml.optim.sgd(lr=1e-3), method=ml.hypergrad.CG(iters=3)), \
        train


def _by_hand(w, log_l2, batch):
    """The ridge lower loss as ``helpers.ridge_levels`` writes it, in plain torch."""
    x, y = batch
    fit = 0.5 * ((F.linear(x, w).squeeze(-1) - y) ** 2).mean()
    return fit + 0.5 * (log_l2.exp() * w.squeeze(0) ** 2).sum()


def _loss_grad_hvp(loss_fn, w, log_l2, direction, saved=None):
    """Loss, gradient in w and Hessian-vector product in w, with the graph of the gradient built in
    (w, log_l2) as CG's linearization builds it; ``saved``: what that graph saved."""
    w, log_l2 = w.detach().requires_grad_(), log_l2.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t) if saved is not None else None) or t,
                                                  lambda t: t):
        loss = loss_fn(w, log_l2)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (hv,) = torch.autograd.grad(g, w, direction)
    return loss, g, hv


def test_the_step_squares_a_parameter_as_a_product_with_the_same_numbers_and_no_2p_saved():
    prog, (x, y) = _program()
    step_graph = prog._runtime.traced["inner"].graph.graph
    user_graph = prog.levels["inner"].traced.graph.graph
    def squares(graph):
        return sum(n.op == "call_function" and n.target in POW for n in graph.nodes)

    # the residual's square stays (not a parameter's); the user's weight.squeeze(0) ** 2 is a product
    assert squares(user_graph) == 2 and squares(step_graph) == 1

    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, RIDGE_D, generator=g, dtype=DT)
    log_l2 = torch.randn(RIDGE_D, generator=g, dtype=DT)
    direction = torch.randn(1, RIDGE_D, generator=g, dtype=DT)
    params = {"inner": {"weight": w}, "outer": {"log_l2": log_l2}}

    def in_step(w_, l_):
        return prog._runtime.evaluate("inner", {**params, "inner": {"weight": w_}, "outer": {"log_l2": l_}},
                                      (x, y))[0]

    saved_step, saved_hand = [], []
    got = _loss_grad_hvp(in_step, w, log_l2, direction, saved_step)
    expected = _loss_grad_hvp(lambda w_, l_: _by_hand(w_, l_, (x, y)), w, log_l2, direction, saved_hand)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)  # bit for bit
    twice_w = 2 * w.squeeze(0)
    assert any(t.shape == twice_w.shape and torch.equal(t, twice_w) for t in saved_hand)  # the square saves 2·p
    assert not any(t.shape == twice_w.shape and torch.equal(t, twice_w) for t in saved_step)  # the product does not
