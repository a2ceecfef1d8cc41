"""The plan stage: what the build decides for a program (``plan.levels``), and the code generator as
a printer of those decisions alone."""
import dataclasses

import pytest
import torch

import mlodsl as ml
from mlodsl import codegen
from helpers import DT, inner_loss_fn, make_hpo, reference_implicit_hpo


@pytest.mark.parametrize("method, keep, tape, inline", [
    (ml.hypergrad.CG(iters=3), 0, False, True),
    (ml.hypergrad.Neumann(iters=3, alpha=0.1), 0, False, True),
    (ml.hypergrad.FiniteDiff(), 0, False, True),
    (ml.hypergrad.Unroll(), 0, True, True),                   # one backward over the tape: no iterates
    (ml.hypergrad.Unroll(checkpoint=2), 2, False, False),     # every 2nd iterate, replayed
    (ml.hypergrad.FirstOrder(), 0, False, False),
])
def test_the_plan_records_what_each_lower_level_keeps_and_how_it_is_differentiated(method, keep, tape, inline):
    prog, *_ = make_hpo(K=4, method=method)
    inner, outer = prog.plan.levels["inner"], prog.plan.levels["outer"]
    assert (inner.keep, inner.tape, inner.inline) == (keep, tape, inline)
    assert inner.toward == ("outer",) and outer.toward == ()
    assert inner.wrt == ("inner",) and outer.wrt == ("outer", "inner")  # own, then the levels below
    assert not inner.nested and not inner.compiled and inner.method == method
    assert outer.method is None and outer.keep == 0
    assert not inner.math_attention  # a loss without attention never enters the math-kernel context
    printed = str(prog.plan)
    assert str(prog.schedule) in printed and f"inner: {method!r} |" in printed


def _three_levels(method_bottom=None, method_middle=None):
    """bottom fits w to m·t; middle fits m so that w lands on want; top scales t (all SGD)."""
    top = ml.Hyper(c=torch.tensor([1.0, 2.0], dtype=DT))
    mid = ml.Hyper(m=torch.tensor([0.5, -0.5], dtype=DT))
    low = ml.Hyper(w=torch.zeros(2, dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.3), steps=3, hypergrad=method_bottom)
    def bottom(low, middle, upper):
        return ((low.w - middle.m * upper.c) ** 2).sum()

    @ml.level(mid, optimizer=ml.optim.sgd(lr=0.1), steps=2, depends_on=[bottom], hypergrad=method_middle)
    def middle(mid, bottom):
        return ((bottom.w - torch.tensor([1.0, 1.0], dtype=DT)) ** 2).sum() + 0.1 * (mid.m ** 2).sum()

    @ml.level(top, optimizer=ml.optim.sgd(lr=0.1), depends_on=[middle], name="upper")
    def upper(top, middle):
        return ((middle.m - 0.3) ** 2).sum()

    return ml.Program(upper)


def test_a_block_a_level_above_replays_may_not_always_record_the_tape():
    """The middle level's block runs only outside derivatives: it always records the tape. The
    bottom block also runs inside the replays of the middle one's updates (Unroll over the middle
    level replays them): it records the tape where it can and keeps its iterates for the rest."""
    prog = _three_levels()
    middle, bottom = prog.plan.levels["middle"], prog.plan.levels["bottom"]
    assert middle.tape and not middle.nested
    assert bottom.tape and bottom.nested and bottom.keep == 1
    assert "rt.tape('middle', s, up_middle, ['upper'], always=True)" in prog.code
    assert "rt.tape('bottom', s, up_bottom, ['middle'])" in prog.code
    # under an implicit method at the middle level nothing replays the bottom block
    implicit = _three_levels(method_middle=ml.hypergrad.CG(iters=2))
    assert not implicit.plan.levels["bottom"].nested


def test_the_code_generator_prints_the_decisions_it_is_given():
    """The same program printed from a plan whose CG level is not inline calls the method through
    its record instead of writing out its solve; both compute the implicit hypergradient."""
    prog, net, hyper, train, val = make_hpo(K=30, method=ml.hypergrad.CG(iters=6))
    plan = prog.plan
    generic = dataclasses.replace(plan, levels={**plan.levels,
                                                "inner": dataclasses.replace(plan.levels["inner"], inline=False)})
    source = codegen.generate(generic, "Program(outer)")
    assert "linear.conjugate_gradient" not in source and "rt.best_response_vjp('inner', 'outer'" in source
    assert "linear.conjugate_gradient(joint_vp, v, iters=6, info=info" in prog.code
    step, _ = codegen.build(source, prog._runtime)
    want = reference_implicit_hpo(net, hyper, train, val, K=30, lr=0.5)  # H formed and solved exactly
    for fn in (prog._step.step, step):
        state, log = fn(prog._state, prog._feeder.peek())
        # one SGD step of the upper level (lr 0.1) from log_l2 = -2 with the hypergradient
        g = (-2.0 - state["outer"]["params"]["log_l2"]) / 0.1
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-9)
        assert log["inner/cg_residual"] < 1e-6


def test_compile_decisions_are_in_the_plan_and_only_then_in_the_code():
    eager, *_ = make_hpo(K=2)
    assert "rt.region(" not in eager.code and "loop_inner" not in eager.code
    assert not any(lp.compiled for lp in eager.plan.levels.values())


def test_the_architecture_page_shows_what_the_quickstart_program_prints():
    """docs/design.md prints the plan and the step of examples/hpo_logreg.py with CG(iters=3);
    `python docs/_print_step.py` rewrites them after a change to the plan or the generator."""
    from pathlib import Path

    from mlodsl_examples import hpo_logreg
    train, val, _, _ = hpo_logreg.make_data(0)
    prog = hpo_logreg.build(train, val, method="cg")[0]
    page = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    assert f"```text\n{prog.plan}\n```" in page and f"```python\n{prog.code}```" in page


@pytest.mark.parametrize("inner_opt, once", [
    (ml.optim.sgd(lr=0.5), True),                                   # reads no count: it moves once per block
    (ml.optim.sgd(lr=0.5, momentum=0.5), False),                    # the general update counts each one
    (ml.optim.sgd(lr=lambda step: 0.5 / step), False),              # a schedule reads the count
])
def test_the_update_count_is_the_number_of_updates_however_the_plan_counts_it(inner_opt, once):
    """Plain SGD's block advances its count once, by its updates (``counted_at_end``); the count
    after two steps of K=3 updates is 6 either way, and the parameters are those of 6 hand-written
    SGD updates (a schedule that read a wrong count would move them differently)."""
    prog, net, hyper, train, val = make_hpo(K=3, inner_opt=inner_opt, method=ml.hypergrad.CG(iters=2))
    inner = prog.plan.levels["inner"]
    assert inner.checked_at_end and inner.counted_at_end == once
    assert ("rt.count(s, 'inner', 3)" in prog.code) == once
    w = net.weight.detach().clone().squeeze(0)
    b = net.bias.detach().clone().squeeze(0)
    lr = inner_opt.hyperparams["lr"]
    momentum = inner_opt.hyperparams["momentum"]
    bufs = None
    for step in range(2):
        log_l2 = prog.params("outer")["log_l2"]
        for k in range(3):
            wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
            gw, gb = torch.autograd.grad(inner_loss_fn(wl, bl, log_l2, train), (wl, bl))
            if momentum:
                bufs = (gw, gb) if bufs is None else (momentum * bufs[0] + gw, momentum * bufs[1] + gb)
                gw, gb = bufs
            eta = lr(3 * step + k + 1) if callable(lr) else lr
            w, b = w - eta * gw, b - eta * gb
        prog.step()
    assert int(prog._state["inner"]["opt"]["count"]) == 6
    torch.testing.assert_close(prog.params("inner")["weight"].squeeze(0), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prog.params("inner")["bias"].squeeze(0), b, rtol=1e-12, atol=1e-12)
