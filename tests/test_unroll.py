"""Exact hypergradients through unrolled updates against hand-written autograd (float64)."""
import pytest
import torch

import mlodsl as ml
from helpers import DT, make_hpo, reference_hpo
from mlodsl.tree import tree_leaves


@pytest.mark.parametrize("method", [ml.hypergrad.Unroll(), ml.hypergrad.Forward()], ids=repr)
def test_bilevel_hypergradient_equals_autograd_through_K_steps(method):
    K, lr = 6, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr, method=method)
    expected, _ = reference_hpo(net, hyper, train, val, K, lr)
    got = prog.hypergradient("outer")["log_l2"]
    assert got.dtype == DT
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_truncated_unroll_equals_truncated_backprop():
    K, lr, T = 8, 0.5, 3
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr, method=ml.hypergrad.Unroll(last=T))
    expected, _ = reference_hpo(net, hyper, train, val, K, lr, last=T)
    full, _ = reference_hpo(net, hyper, train, val, K, lr)
    got = prog.hypergradient("outer")["log_l2"]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got, full, rtol=1e-3)  # truncation really drops the early steps


def test_first_order_ignores_the_response():
    prog, *_ = make_hpo(K=4, method=ml.hypergrad.FirstOrder())
    # The outer loss does not take log_l2 directly, so its first-order gradient is exactly zero.
    assert torch.count_nonzero(prog.hypergradient("outer")["log_l2"]) == 0


def test_step_applies_the_hypergradient_and_the_inner_trajectory():
    K, lr = 5, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr)
    g, (w, b) = reference_hpo(net, hyper, train, val, K, lr)
    before = hyper.log_l2.detach().clone()
    prog.step()
    torch.testing.assert_close(prog.params("outer")["log_l2"], before - 0.1 * g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prog.params("inner")["weight"].squeeze(0), w, rtol=1e-9, atol=1e-12)
    # The user's modules hold the learned values.
    torch.testing.assert_close(hyper.log_l2.detach(), prog.params("outer")["log_l2"])
    assert prog.params("outer")["log_l2"].dtype == DT and prog.params("inner")["weight"].dtype == DT


def test_hypergradient_changes_nothing():
    prog, *_ = make_hpo(K=3)
    before = {n: prog.params(n) for n in ("inner", "outer")}
    g1 = prog.hypergradient("outer")
    g2 = prog.hypergradient("outer")
    torch.testing.assert_close(g1, g2)
    for n in before:
        torch.testing.assert_close(prog.params(n), before[n])


@pytest.mark.parametrize("opt", [ml.optim.sgd(lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01),
                                 ml.optim.adam(lr=0.05), ml.optim.adamw(lr=0.05, weight_decay=0.1)],
                         ids=lambda o: o.name)
def test_unroll_through_stateful_optimizers_equals_autograd(opt):
    """Unrolling differentiates through momentum and Adam moments: compare with the same
    optimizer written by hand (torch.optim semantics) under autograd."""
    K = 4
    prog, net, hyper, train, val = make_hpo(K=K, inner_opt=opt)
    from helpers import inner_loss_fn, outer_loss_fn
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    params = [net.weight.detach().clone().squeeze(0).requires_grad_(),
              net.bias.detach().clone().squeeze(0).requires_grad_()]
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p), buf=None) for p in params]
    for t in range(1, K + 1):
        grads = torch.autograd.grad(inner_loss_fn(*params, log_l2, train), params, create_graph=True)
        new = []
        for p, g, st in zip(params, grads, state):
            if opt.name == "sgd":
                g = g + 0.01 * p
                st["buf"] = g if st["buf"] is None else 0.9 * st["buf"] + g
                new.append(p - 0.3 * (g + 0.9 * st["buf"]))
            else:
                if opt.name == "adam":
                    pass
                st["m"] = 0.9 * st["m"] + 0.1 * g
                st["v"] = 0.999 * st["v"] + 0.001 * g * g
                mh, vh = st["m"] / (1 - 0.9 ** t), st["v"] / (1 - 0.999 ** t)
                p2 = p * (1 - 0.05 * 0.1) if opt.name == "adamw" else p
                new.append(p2 - 0.05 * mh / (torch.sqrt(vh + 1e-16) + 1e-8))
        params = new
    (expected,) = torch.autograd.grad(outer_loss_fn(*params, val), log_l2)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-9, atol=1e-12)


def test_optimizers_match_torch_optim():
    """One trajectory of each functional optimizer equals torch.optim's on the same gradients."""
    torch.manual_seed(0)
    p0 = torch.randn(7, dtype=DT)
    grads = [torch.randn(7, dtype=DT) for _ in range(5)]
    pairs = [(ml.optim.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
              lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
             (ml.optim.sgd(lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
             (ml.optim.sgd(lr=0.1, momentum=0.9, dampening=0.3),  # the first update is not damped
              lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3)),
             (ml.optim.adam(lr=0.01, weight_decay=0.1, eps_root=0.0),
              lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1)),
             (ml.optim.adamw(lr=0.01, weight_decay=0.1, eps_root=0.0),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1))]
    for ours, theirs in pairs:
        p = torch.nn.Parameter(p0.clone())
        topt = theirs([p])
        params, state = {"p": p0.clone()}, ours.init({"p": p0})
        for g in grads:
            p.grad = g.clone()
            topt.step()
            params, state = ours.update(params, {"p": g}, state)
        torch.testing.assert_close(params["p"], p.detach(), rtol=1e-12, atol=1e-12)


def test_learning_rate_schedule_is_a_function_of_the_step():
    opt = ml.optim.sgd(lr=lambda step: 1.0 / step)
    params, state = {"p": torch.zeros(1, dtype=DT)}, opt.init({"p": torch.zeros(1, dtype=DT)})
    for _ in range(3):
        params, state = opt.update(params, {"p": torch.ones(1, dtype=DT)}, state)
    torch.testing.assert_close(params["p"], torch.tensor([-(1 + 1 / 2 + 1 / 3)], dtype=DT))


@pytest.mark.parametrize("checkpoint", [1, 3, "sqrt", 10])
def test_checkpointed_unroll_equals_plain_unroll(checkpoint):
    K, lr = 10, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr, method=ml.hypergrad.Unroll(checkpoint=checkpoint))
    expected, _ = reference_hpo(net, hyper, train, val, K, lr)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-10, atol=1e-13)
    plain, *_ = make_hpo(K=K, lr=lr)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], plain.hypergradient("outer")["log_l2"],
                               rtol=1e-10, atol=1e-13)


def test_checkpointed_unroll_keeps_fewer_iterates_and_truncates():
    K, lr = 16, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr, method=ml.hypergrad.Unroll(last=5, checkpoint="sqrt"))
    assert prog.plan.levels["inner"].keep == 4  # the plan keeps 5 of 17 iterates: every 4th, and the last
    assert "if (k + 1) % 4 == 0 or k == 15:" in prog.code
    expected, _ = reference_hpo(net, hyper, train, val, K, lr, last=5)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("checkpoint", ["none", "sqrt", "1"])
def test_explain_estimates_the_measured_peak_memory(checkpoint):
    """A 2M-parameter (float64) lower level unrolled 16 steps, in a fresh process: recorded on the
    autograd tape (plain Unroll), √K-checkpointed, and replaying every update from kept iterates.
    malloc is told to give large blocks back to the system, so that peak RSS measures what tensors
    really held."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "memory_probe.py"), "2000000", "16", checkpoint],
                         env=env, check=True, capture_output=True, text=True).stdout.split()
    measured, estimated = int(out[-2]), int(out[-1])
    assert 0.8 <= measured / estimated <= 1.25, (measured, estimated)


def test_frozen_parameters_are_constants_not_state():
    """Parameters with requires_grad=False are not learned, copied into iterates or optimizer states."""
    K, lr = 4, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr)
    net.bias.requires_grad_(False)
    frozen = ml.Program(prog.levels["outer"].level)
    assert set(frozen.params("inner")) == {"weight"}
    assert frozen.explain()[1].params == net.weight.numel() * 8
    # the frozen bias is read from the module (a get_attr constant), never an input of the graph
    nodes = frozen.levels["inner"].graph.graph.nodes
    assert [n.target for n in nodes if n.op == "get_attr"] == ["inner.bias"]
    assert ("inner", "bias") not in frozen.levels["inner"].traced.inputs.values()
    from helpers import inner_loss_fn, outer_loss_fn
    log_l2 = hyper.log_l2.detach().clone().requires_grad_()
    w, b = net.weight.detach().clone().squeeze(0).requires_grad_(), net.bias.detach().clone().squeeze(0)
    for _ in range(K):
        (gw,) = torch.autograd.grad(inner_loss_fn(w, b, log_l2, train), w, create_graph=True)
        w = w - lr * gw
    (expected,) = torch.autograd.grad(outer_loss_fn(w, b, val), log_l2)
    torch.testing.assert_close(frozen.hypergradient("outer")["log_l2"], expected, rtol=1e-9, atol=1e-12)
    b0 = net.bias.detach().clone()
    frozen.step()
    assert torch.equal(net.bias.detach(), b0)


@pytest.mark.parametrize("checkpoint, evaluations", [(None, 8), (1, 16), (4, 8 + 2 * 4 + 8)])
def test_plain_unroll_records_the_tape_and_evaluates_each_update_once(checkpoint, evaluations):
    """Plain Unroll records the K forward updates on the autograd tape and differentiates them by one
    backward pass: K evaluations of the lower loss; replaying every update from kept iterates
    (checkpoint=1) evaluates each twice. checkpoint=4 reverses each segment of 4 by bisection: the
    iterate 2 updates in (2 updates), the one after it (1), then iterate 1 from the segment's start
    (1): 4 recomputed updates per segment where a plain recompute takes 3, besides the K forward
    updates and the K replayed in the VJPs. All give the hand-written hypergradient, and the state
    the step keeps carries no graph."""
    K, lr = 8, 0.5
    prog, net, hyper, train, val = make_hpo(K=K, lr=lr, method=ml.hypergrad.Unroll(checkpoint=checkpoint))
    traced, calls = prog._runtime.traced, []

    class Counting:  # the traced loss, counting its evaluations
        inputs = traced["inner"].inputs

        def __call__(self, *args, loss=traced["inner"]):
            calls.append(1)
            return loss(*args)

    traced["inner"] = Counting()
    expected, _ = reference_hpo(net, hyper, train, val, K, lr)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=1e-10, atol=1e-13)
    assert len(calls) == evaluations
    prog.step()
    assert not any(t.requires_grad for t in prog.params("inner").values())
    assert not any(t.requires_grad for s in prog._state.values() for t in tree_leaves(s))


def test_a_schedule_of_a_float64_level_is_computed_in_float64():
    """lr = 0.1 · 0.99^step on a float64 parameter equals the updates written by hand in float64
    (the integer update count made the schedule a float32 tensor: off by ~1e-9 relative)."""
    opt = ml.optim.sgd(lr=lambda step: 0.1 * 0.99 ** step)
    g = torch.tensor([1.0, -3.0], dtype=DT)
    params, state = {"p": torch.ones(2, dtype=DT)}, opt.init({"p": torch.ones(2, dtype=DT)})
    want = torch.ones(2, dtype=DT)
    for step in range(1, 4):
        params, state = opt.update(params, {"p": g}, state)
        want = want - (0.1 * 0.99 ** step) * g
    assert params["p"].dtype == DT
    torch.testing.assert_close(params["p"], want, rtol=1e-15, atol=0)
