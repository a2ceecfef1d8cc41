"""Levels under several uppers (depends_on edges that make a DAG, not a tree), float64: the
documented schedule, written out by hand with nested torch.func.grad, and finite differences.

* Learning-by-Ignoring (Betty's shape): ``top`` depends on ``mid`` and on ``bot``, ``mid`` on
  ``bot``. ``bot`` runs before each update of ``mid`` (its deepest upper); ``top`` sees it where
  mid's block left it, and takes its total derivative through that block.
* A diamond: ``top`` depends on ``a`` and ``b``, both on ``c``. ``c`` runs once per update of
  ``top`` (its host), before the blocks of ``a`` and ``b``, which update once each against that
  one block of ``c``; ``top`` differentiates the three blocks together.
"""
import pytest
import torch
from torch.func import grad

import mlodsl as ml
from helpers import DT


def hyper(*values):
    return ml.Hyper(v=torch.tensor(values, dtype=DT))


def sgd(params, loss, lr, steps):
    """``steps`` plain SGD updates of ``params`` on ``loss(params)``, differentiable."""
    for _ in range(steps):
        params = params - lr * grad(loss)(params)
    return params


def finite_difference(f, x, eps=1e-6):
    """Central differences of a scalar function of a vector."""
    out = torch.zeros_like(x)
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e[j] = eps
        out[j] = (f(x + e) - f(x - e)) / (2 * eps)
    return out


# -- Learning-by-Ignoring: top -> mid, top -> bot, mid -> bot ------------------------------------
LR_BOT, LR_MID, LR_TOP = 0.1, 0.2, 0.3


def loss_bot(w, u, a):   # reads mid and top: per-coordinate weights and a pull toward the top's target
    return (torch.sigmoid(u) * (w - 1.0) ** 2).sum() + 0.2 * ((w - a) ** 2).sum()


def loss_mid(u, w, a):   # through bot's solution, and a proximity to the top
    return ((w - 0.5) ** 2).sum() + 0.1 * ((u - a) ** 2).sum()


def loss_top(a, u, w):   # through mid's and bot's solutions
    return ((w + 0.3) ** 2).sum() + 0.05 * (u ** 2).sum() + 0.01 * (a ** 2).sum()


def ignoring(steps_top=2, steps_mid=3, steps_bot=2, top_depends_on_bot=True):
    bot_m, mid_m, top_m = hyper(0.3, -0.4, 0.8), hyper(-0.5, 0.2, 1.0), hyper(0.1, 0.6, -0.2)

    @ml.level(bot_m, optimizer=ml.optim.sgd(lr=LR_BOT), steps=steps_bot)
    def bot(m, mid, top):
        return loss_bot(m.v, mid.v, top.v)

    @ml.level(mid_m, optimizer=ml.optim.sgd(lr=LR_MID), steps=steps_mid, depends_on=[bot])
    def mid(m, bot, top):
        return loss_mid(m.v, bot.v, top.v)

    @ml.level(top_m, optimizer=ml.optim.sgd(lr=LR_TOP), steps=steps_top,
              depends_on=[mid, bot] if top_depends_on_bot else [mid])
    def top(m, mid, bot):
        return loss_top(m.v, mid.v, bot.v)

    return ml.Program(top), top_m, mid_m, bot_m


def ignoring_top_loss(a, u, w, steps_mid, steps_bot):
    """One iteration of top's loop by hand: before each update of mid, bot takes its updates (from
    where it was) and mid's gradient is its total derivative through that block; then top's loss,
    whose gradient is its total derivative through all of them."""
    def bot_block(w, u, a):
        return sgd(w, lambda w_: loss_bot(w_, u, a), LR_BOT, steps_bot)

    for _ in range(steps_mid):
        gu = grad(lambda u_: loss_mid(u_, bot_block(w, u_, a), a))(u)
        u, w = u - LR_MID * gu, bot_block(w, u, a)
    return loss_top(a, u, w), (u, w)


def ignoring_step(a, u, w, steps_top, steps_mid, steps_bot):
    """One step by hand: top's updates, each after its iteration; the final (a, u, w)."""
    for _ in range(steps_top):
        ga, (u, w) = grad(ignoring_top_loss, has_aux=True)(a, u, w, steps_mid, steps_bot)
        a = a - LR_TOP * ga
    return a, u, w


def test_learning_by_ignoring_equals_nested_autograd_and_finite_differences():
    prog, top_m, mid_m, bot_m = ignoring()
    a0, u0, w0 = (m.v.detach().clone() for m in (top_m, mid_m, bot_m))
    expected = grad(ignoring_top_loss, has_aux=True)(a0, u0, w0, 3, 2)[0]
    got = prog.hypergradient("top")["v"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    fd = finite_difference(lambda a_: ignoring_top_loss(a_, u0, w0, 3, 2)[0], a0)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-9)
    prog.step()
    for name, value in zip(("top", "mid", "bot"), ignoring_step(a0, u0, w0, 2, 3, 2)):
        torch.testing.assert_close(prog.params(name)["v"], value, rtol=1e-10, atol=1e-12)


def test_a_level_shared_by_a_middle_and_a_top_with_different_steps():
    """bot is under mid (steps=3) and top (steps=2, itself above mid): 3 x 2 bot blocks per step."""
    prog, top_m, mid_m, bot_m = ignoring(steps_top=2, steps_mid=3, steps_bot=4)
    assert prog.plan.updates_per_step == {"top": 2, "mid": 6, "bot": 24}
    a0, u0, w0 = (m.v.detach().clone() for m in (top_m, mid_m, bot_m))
    expected = grad(ignoring_top_loss, has_aux=True)(a0, u0, w0, 3, 4)[0]
    torch.testing.assert_close(prog.hypergradient("top")["v"], expected, rtol=1e-10, atol=1e-12)
    prog.step()
    for name, value in zip(("top", "mid", "bot"), ignoring_step(a0, u0, w0, 2, 3, 4)):
        torch.testing.assert_close(prog.params(name)["v"], value, rtol=1e-10, atol=1e-12)


def test_learning_by_ignoring_schedule_nests_the_bottom_under_the_middle():
    prog, *_ = ignoring()
    assert [(op.action, op.level, op.depth) for op in prog.schedule] == [
        ("repeat", "top", 0), ("repeat", "mid", 1), ("repeat", "bot", 2), ("update", "bot", 3),
        ("hypergradient", "mid", 2), ("update", "mid", 2), ("hypergradient", "top", 1), ("update", "top", 1)]
    assert "hypergradient of top through mid by Unroll() (with bot inside)" in str(prog.schedule)
    # Depending on bot, or only reading it, is the same computation under this schedule.
    same, top_m, *_ = ignoring(top_depends_on_bot=False)
    torch.testing.assert_close(prog.hypergradient("top")["v"], same.hypergradient("top")["v"], rtol=0, atol=0)


# -- a diamond: top -> a, top -> b, a -> c, b -> c ------------------------------------------------
LR_C, LR_A, LR_B, LR_T = 0.1, 0.2, 0.15, 0.25
STEPS_C, STEPS_T = 3, 2


def loss_c(w, x, y, p):  # reads both of its uppers and the top
    return ((w - x) ** 2).sum() + (y.exp() * w ** 2).sum() + 0.3 * (p * w).sum()


def loss_a(x, w, p):
    return ((w - 1.0) ** 2).sum() + ((x - p) ** 2).sum()


def loss_b(y, w, p):
    return ((w + 0.5) ** 2).sum() + 0.5 * ((y * p) ** 2).sum()


def loss_t(p, x, y, w):
    return ((x + y - w) ** 2).sum() + 0.1 * (p ** 2).sum()


def diamond(top_depends_on_c=False, steps_a=1, method_a=None):
    c_m, a_m = hyper(0.1, -0.2, 0.3), hyper(0.5, 0.1, -0.1)
    b_m, t_m = hyper(-0.3, 0.2, 0.4), hyper(0.2, 0.2, -0.1)

    @ml.level(c_m, optimizer=ml.optim.sgd(lr=LR_C), steps=STEPS_C)
    def c(m, a, b, top):
        return loss_c(m.v, a.v, b.v, top.v)

    @ml.level(a_m, optimizer=ml.optim.sgd(lr=LR_A), steps=steps_a, depends_on=[c], hypergrad=method_a)
    def a(m, c, top):
        return loss_a(m.v, c.v, top.v)

    @ml.level(b_m, optimizer=ml.optim.sgd(lr=LR_B), depends_on=[c])
    def b(m, c, top):
        return loss_b(m.v, c.v, top.v)

    @ml.level(t_m, optimizer=ml.optim.sgd(lr=LR_T), steps=STEPS_T, depends_on=[a, b, c] if top_depends_on_c else [a, b])
    def top(m, a, b, c):
        return loss_t(m.v, a.v, b.v, c.v)

    return ml.Program(top), t_m, a_m, b_m, c_m


def c_block(w, x, y, p):
    return sgd(w, lambda w_: loss_c(w_, x, y, p), LR_C, STEPS_C)


def diamond_top_loss(p, x, y, w):
    """One iteration of top's loop by hand: c's block (with a, b and top as they are), then one
    update of a and one of b, each by its total derivative through that block of c (which saw
    their parameters before either updated); then top's loss."""
    w1 = c_block(w, x, y, p)
    gx = grad(lambda x_: loss_a(x_, c_block(w, x_, y, p), p))(x)
    gy = grad(lambda y_: loss_b(y_, c_block(w, x, y_, p), p))(y)
    x1, y1 = x - LR_A * gx, y - LR_B * gy
    return loss_t(p, x1, y1, w1), (x1, y1, w1)


@pytest.mark.parametrize("top_depends_on_c", [False, True])
def test_diamond_equals_nested_autograd_and_finite_differences(top_depends_on_c):
    prog, t_m, a_m, b_m, c_m = diamond(top_depends_on_c)
    p, x, y, w = (m.v.detach().clone() for m in (t_m, a_m, b_m, c_m))
    expected = grad(diamond_top_loss, has_aux=True)(p, x, y, w)[0]
    got = prog.hypergradient("top")["v"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    fd = finite_difference(lambda p_: diamond_top_loss(p_, x, y, w)[0], p)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-9)
    # The uppers of c: each through c's block, which ran just before.
    torch.testing.assert_close(prog.hypergradient("a")["v"],
                               grad(lambda x_: loss_a(x_, c_block(w, x_, y, p), p))(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prog.hypergradient("b")["v"],
                               grad(lambda y_: loss_b(y_, c_block(w, x, y_, p), p))(y), rtol=1e-10, atol=1e-12)
    for _ in range(STEPS_T):
        gp, (x, y, w) = grad(diamond_top_loss, has_aux=True)(p, x, y, w)
        p = p - LR_T * gp
    prog.step()
    for name, value in (("top", p), ("a", x), ("b", y), ("c", w)):
        torch.testing.assert_close(prog.params(name)["v"], value, rtol=1e-10, atol=1e-12)


def test_diamond_schedule_runs_the_shared_level_once_per_update_of_its_host():
    prog, *_ = diamond()
    assert prog.plan.updates_per_step == {"top": 2, "c": 2 * STEPS_C, "a": 2, "b": 2}
    assert [(op.action, op.level, op.depth) for op in prog.schedule] == [
        ("repeat", "top", 0), ("repeat", "c", 1), ("update", "c", 2),
        ("repeat", "a", 1), ("hypergradient", "a", 2), ("update", "a", 2),
        ("repeat", "b", 1), ("hypergradient", "b", 2), ("update", "b", 2),
        ("hypergradient", "top", 1), ("update", "top", 1)]
    text = str(prog.schedule)
    assert "hypergradient of a through c by Unroll() (shared: its block ran above)" in text
    assert "hypergradient of top through the blocks of c + a + b unrolled together" in text


# -- shapes with no well-defined schedule ----------------------------------------------------------
def test_diamond_with_an_upper_taking_several_steps_is_refused_with_the_nearest_program():
    with pytest.raises(ml.ProgramError) as info:
        diamond(steps_a=2)
    message = str(info.value)
    assert "level 'c' is under uppers on separate branches ['a', 'b']" in message
    assert "once per update of 'top'" in message and "'a' takes steps=2" in message
    assert "Nearest program that works: steps=1 on 'a'; or give 'a' its own copy of 'c'" in message
    diamond(steps_a=1)  # the first program the message proposes builds


def test_nested_upper_on_another_branch_is_refused_with_the_nearest_program():
    """c is under b and under a2, which updates inside a's block: a would differentiate a2's
    updates without the block of c they use."""
    mods = {n: hyper(0.1 * i, -0.2, 0.3) for i, n in enumerate(["c", "a2", "a", "b", "top"])}

    @ml.level(mods["c"], optimizer=ml.optim.sgd(lr=0.1), steps=2)
    def c(m, a2, b):
        return ((m.v - a2.v) ** 2).sum() + ((m.v - b.v) ** 2).sum()

    @ml.level(mods["a2"], optimizer=ml.optim.sgd(lr=0.1), depends_on=[c])
    def a2(m, c, a):
        return ((c.v - a.v) ** 2).sum() + (m.v ** 2).sum()

    @ml.level(mods["a"], optimizer=ml.optim.sgd(lr=0.1), depends_on=[a2])
    def a(m, a2):
        return (a2.v ** 2).sum() + (m.v ** 2).sum()

    @ml.level(mods["b"], optimizer=ml.optim.sgd(lr=0.1), depends_on=[c])
    def b(m, c):
        return ((c.v - 1.0) ** 2).sum() + (m.v ** 2).sum()

    @ml.level(mods["top"], optimizer=ml.optim.sgd(lr=0.1), depends_on=[a, b])
    def top(m, a, b):
        return ((a.v - b.v) ** 2).sum() + (m.v ** 2).sum()

    with pytest.raises(ml.ProgramError, match=r"'a2' updates inside the block of 'a', not directly in 'top''s "
                                              r"update.*Nearest program that works: give 'a2' its own copy of 'c'"):
        ml.Program(top)


def test_diamond_upper_with_an_approximate_method_is_refused():
    with pytest.raises(ml.ProgramError, match=r"level 'a': 'top' differentiates the blocks of \['c', 'a', 'b'\] "
                                              r"together.*it is CG\(.*Remove hypergrad= from 'a'"):
        diamond(method_a=ml.hypergrad.CG(iters=5))
