"""Second derivatives through attention without user action (mlodsl.kernels): the losses a
method differentiates twice run under the math SDPA kernel, the rest keep the fast one, and an op
with no double backward is named at build."""
import warnings

import pytest
import torch
from torch.autograd.function import once_differentiable

import mlodsl as ml
from attention_models import DT, bert, encoder, hand_cg, hand_unroll, reweighting

CG_ITERS = 3


@pytest.mark.parametrize("model", [encoder, bert], ids=["TransformerEncoder", "BERT"])
@pytest.mark.parametrize("method", ["Unroll", "CG"])
def test_attention_lower_level_hypergradient_equals_hand_autograd(model, method):
    """Flash attention (the default on CPU) has no double backward; mlodsl picks the math kernel for
    the lower loss, so Unroll and CG run as written and match autograd to rounding."""
    net, logits, train, val = model()
    # Two SGD steps from a random init are not a minimum: CG meets negative curvature, which
    # mlodsl reports (DivergenceError by default); warned here, the numbers are CG's as written.
    hypergrad = (ml.hypergrad.Unroll() if method == "Unroll"
                 else ml.hypergrad.CG(iters=CG_ITERS, on_divergence="warn"))
    prog, _ = reweighting(net, logits, train, val, hypergrad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.hypergrad.DivergenceWarning)
        got = prog.hypergradient("outer")["w"]
    expected = (hand_unroll(net, logits, train, val) if method == "Unroll"
                else hand_cg(net, logits, train, val, CG_ITERS))
    assert got.dtype == DT and expected.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method, twice", [(ml.hypergrad.Unroll(), {"inner"}),
                                           (ml.hypergrad.CG(iters=2, on_divergence="warn"), {"inner"}),
                                           (ml.hypergrad.Forward(), {"inner"}), (ml.hypergrad.FiniteDiff(), set()),
                                           (ml.hypergrad.FirstOrder(), set()), (ml.hypergrad.SAMA(), set())], ids=repr)
def test_only_losses_differentiated_twice_leave_the_fast_kernel(method, twice):
    """The top level's own gradient and first-order methods keep the fast kernel (they run with
    flash attention, which would fail a second derivative: they never take one)."""
    net, logits, train, val = encoder()
    prog, _ = reweighting(net, logits, train, val, method, steps=1)
    assert {n for n, lp in prog.plan.levels.items() if lp.twice} == twice
    # the plan evaluates exactly those under the math kernel: the encoder's loss calls attention
    assert {n for n, lp in prog.plan.levels.items() if lp.math_attention} == twice
    with warnings.catch_warnings():  # CG at a random init meets negative curvature: warned
        warnings.simplefilter("ignore", ml.hypergrad.DivergenceWarning)
        assert torch.isfinite(prog.hypergradient("outer")["w"]).all()


class Cube(torch.autograd.Function):
    """x³ with a backward that cannot itself be differentiated."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x ** 2


def _cube_program(method):
    low, up = ml.Hyper(w=torch.ones(3, dtype=DT)), ml.Hyper(u=torch.zeros(3, dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=2, hypergrad=method)
    def inner(m, outer):
        # A Python branch on a shape: symbolic tracing cannot follow it (and would trace into
        # Cube's forward, dropping its backward); the level keeps calling Cube itself.
        w = m.w if m.w.shape[0] == 3 else m.w.flip(0)
        return (Cube.apply(w) - outer.u).pow(2).sum()

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return (inner.w - 2.0).pow(2).sum()

    return lambda: ml.Program(outer)


def test_op_without_double_backward_is_named_at_build():
    with pytest.raises(ml.ProgramError, match=r"(?s)level 'inner'.*Unroll\(\).*'Cube'.*no double backward.*"
                                              r"FiniteDiff\(\) or FirstOrder\(\).*double backward"):
        _cube_program(ml.hypergrad.Unroll())()
    prog = _cube_program(ml.hypergrad.FiniteDiff())()  # first order: nothing to check, it runs
    assert torch.isfinite(prog.hypergradient("outer")["u"]).all()


def test_once_differentiable_under_a_plain_sum_is_refused_too():
    """Under a sum the gradient entering Cube's backward is a constant, so @once_differentiable does
    not mark its output: the second derivative would be silently cut (a zero hypergradient)."""
    low, up = ml.Hyper(w=torch.ones(3, dtype=DT)), ml.Hyper(u=torch.zeros(3, dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=2)
    def inner(m, outer):
        w = m.w if m.w.shape[0] == 3 else m.w.flip(0)  # keeps the level calling Cube (see above)
        return Cube.apply(w - outer.u).sum() + (w ** 2).sum()

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return (inner.w - 2.0).pow(2).sum()

    with pytest.raises(ml.ProgramError, match=r"(?s)level 'inner'.*'Cube'.*no double backward.*once_differentiable"):
        ml.Program(outer)


def test_a_middle_level_whose_loss_reaches_only_the_level_below_builds():
    """The build's double-backward check differentiates a middle level's loss through the level
    below it (its own parameters enter only through that level's response). One SGD step of lr 0.5
    on (w - m x)^2 lands on w = m x, so the middle's hypergradient is 2 (m x - 2) x."""
    x = torch.ones(3, dtype=DT)

    def hyper(v):
        return ml.Hyper(w=torch.full((3,), v, dtype=DT))

    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.5), data=(x,))
    def bottom(m, batch, middle):
        return ((m.w - batch[0] * middle.w) ** 2).sum()

    @ml.level(hyper(0.5), optimizer=ml.optim.sgd(lr=0.1), data=(x,), depends_on=[bottom])
    def middle(m, batch, bottom):
        return ((bottom.w - 2.0) ** 2).sum()

    @ml.level(hyper(0.0), optimizer=ml.optim.sgd(lr=0.1), data=(x,), depends_on=[middle])
    def top(m, batch, middle):
        return ((middle.w - m.w) ** 2).sum()

    got = ml.Program(top).hypergradient("middle")["w"]
    torch.testing.assert_close(got, 2 * (0.5 * x - 2) * x, rtol=1e-14, atol=1e-14)


def test_the_math_kernel_is_entered_only_for_graphs_that_can_attend(monkeypatch):
    """Read once at build from the traced graph: a twice-differentiated loss with attention in it
    (or a module the graph does not show) runs under the math kernel, a plain one skips the
    kernel's context, which the eager step would otherwise enter at every update."""
    from helpers import make_hpo

    net, logits, train, val = encoder()
    attending, _ = reweighting(net, logits, train, val, ml.hypergrad.CG(iters=2, on_divergence="warn"), steps=1)
    plain = make_hpo(K=2, method=ml.hypergrad.CG(iters=2))[0]
    assert attending.plan.levels["inner"].twice and attending.levels["inner"].traced.attends
    assert plain.plan.levels["inner"].twice and not plain.levels["inner"].traced.attends
    entered = []
    real = ml.runtime.attention_kernel
    monkeypatch.setattr(ml.runtime, "attention_kernel", lambda: entered.append(1) or real())
    plain.hypergradient("outer")
    assert not entered
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.hypergrad.DivergenceWarning)
        attending.hypergradient("outer")
    assert entered
