"""Programs rejected at build time with a message naming the culprit; non-finite steps."""
import pytest
import torch

import mlodsl as ml
from helpers import DT

from mlodsl.loops import scan


def hyper(v=0.0):
    return ml.Hyper(w=torch.full((3,), v, dtype=DT))


def sq(m):
    return (m.w ** 2).sum()


def test_cycle_is_rejected_with_the_cycle_printed():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=["b"])
    def a(m):
        return sq(m)

    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=[a])
    def b(m):
        return sq(m)

    with pytest.raises(ml.ProgramError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        ml.Program(b)


def test_argument_naming_no_level_lists_the_known_levels():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1))
    def low(m, nonexistent):
        return sq(m)

    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=[low])
    def high(m, low):
        return sq(low)

    with pytest.raises(ml.ProgramError, match=r"level 'low': argument 'nonexistent' names no level.*\['high', 'low'\]"):
        ml.Program(high)


def test_self_dependency_is_rejected():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=["me"])
    def me(m):
        return sq(m)

    with pytest.raises(ml.ProgramError, match="level 'me' depends on itself"):
        ml.Program(me)


def test_reference_to_a_level_outside_the_program():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=["elsewhere"])
    def top(m):
        return sq(m)

    with pytest.raises(ml.ProgramError, match=r"level 'top': depends_on 'elsewhere' names no level.*\['top'\]"):
        ml.Program(top)


def test_bad_declarations_fail_at_decoration_time():
    with pytest.raises(TypeError, match="nn.Module"):
        ml.level(torch.zeros(3), optimizer=ml.optim.sgd(lr=0.1))
    with pytest.raises(ValueError, match="level 'e': steps must be a positive int"):
        @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), steps=0)
        def e(m):
            return sq(m)
    with pytest.raises(ValueError, match="takes `batch` but the level has no data"):
        @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1))
        def f(m, batch):
            return sq(m)
    with pytest.raises(TypeError, match="level 'g': optimizer must have init"):
        @ml.level(hyper(), optimizer=torch.optim.SGD)
        def g(m):
            return sq(m)


def test_non_scalar_loss_is_named_at_build_time():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1))
    def vec(m):
        return m.w ** 2

    with pytest.raises(ml.ProgramError, match="level 'vec'.*scalar loss"):
        ml.Program(vec)


def _nan_program(mode="raise", compile=False):
    calls = {"n": 0}
    x = torch.ones(3, dtype=DT)

    def batch():
        calls["n"] += 1
        return x * float("nan") if calls["n"] > 6 else x  # the 3rd step's inner batches are NaN

    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.1, momentum=0.9), data=batch, steps=3)
    def inner(m, batch, outer):
        return ((m.w - batch * outer.w) ** 2).sum()

    @ml.level(hyper(0.5), optimizer=ml.optim.adam(lr=0.1), data=(x,), depends_on=[inner])
    def outer(m, batch, inner):
        return ((inner.w - 2.0) ** 2).sum()

    return ml.Program(outer, nonfinite=mode, compile=compile)


def _snapshot(prog):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in torch.utils._pytree.tree_flatten_with_path(prog.state_dict()["levels"])[0]}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_non_finite_step_raises_naming_level_and_step_and_changes_nothing(compile):
    """Compiled, the inner updates run as one loop region, which hands the check every update's
    loss and gradient norm."""
    prog = _nan_program(compile=compile)
    prog.step()
    prog.step()
    before = _snapshot(prog)
    with pytest.raises(ml.NonFiniteError, match="level 'inner' in step 3.*unchanged"):
        prog.step()
    after = _snapshot(prog)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert prog.step_count == 2
    if compile and scan is not None:  # torch's scan (absent from older torch, e.g. 2.4)
        loops = [r for r in prog.compiler.regions if "loop of updates" in r.label]
        assert loops and all(r.compiled_calls == 3 and r.reason is None for r in loops)


@pytest.mark.parametrize("method", [ml.hypergrad.Unroll(), ml.hypergrad.CG(iters=2)], ids=repr)
def test_an_infinite_gradient_under_finite_losses_is_caught_at_the_blocks_end(method):
    """In the 3rd step, the inner block's first update has a finite loss (√0 = 0) and an infinite
    gradient (d√x/dx at 0); its second update sees w = -∞ through a clamp, with a finite loss and a
    zero gradient. No loss and not the last gradient is non-finite: the block checks its gradients
    on the parameters it ends at (``checked_at_end``), where SGD carried the infinity, and the step
    is refused with nothing changed, as when every gradient's norm was checked."""
    calls = {"n": 0}

    def batch():
        calls["n"] += 1
        return torch.tensor(1.0 if calls["n"] == 5 else 0.0, dtype=DT)  # the 3rd step's 1st inner update

    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.1), data=batch, steps=2, hypergrad=method)
    def inner(m, batch, outer):
        w = m.w.clamp(-10.0, 10.0)
        kink = torch.sqrt(w - w.detach() + (1.0 - batch))  # √0 where batch = 1: value 0, slope ∞
        return ((w - outer.w) ** 2).sum() + kink.sum()

    @ml.level(hyper(0.5), optimizer=ml.optim.adam(lr=0.1), data=(torch.ones(3, dtype=DT),), depends_on=[inner])
    def outer(m, batch, inner):
        return ((inner.w - 2.0) ** 2).sum()

    prog = ml.Program(outer)
    assert prog.plan.levels["inner"].checked_at_end
    prog.step()
    prog.step()
    before = _snapshot(prog)
    with pytest.raises(ml.NonFiniteError, match="level 'inner' in step 3"):
        prog.step()
    assert all(torch.equal(before[k], v) for k, v in _snapshot(prog).items()) and prog.step_count == 2


def test_non_finite_step_can_be_skipped_and_counted():
    prog = _nan_program("skip")
    prog.step()
    prog.step()
    before = _snapshot(prog)
    row = prog.step()
    assert row["skipped"] == 1 and prog.step_count == 2
    assert all(torch.equal(before[k], v) for k, v in _snapshot(prog).items())


# -- a forgotten depends_on -----------------------------------------------------------------------

def _forgotten_depends_on(regularise):
    """``outer`` calls ``inner``'s module but does not depend on it; ``inner`` reads ``outer``."""
    x = torch.ones(3, dtype=DT)

    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.1), data=(x,), steps=2)
    def inner(m, batch, outer):
        return ((m.w - batch[0] * outer.w) ** 2).sum()

    @ml.level(hyper(0.5), optimizer=ml.optim.sgd(lr=0.1), data=(x,))
    def outer(m, batch, inner):
        return ((inner.w - 2.0) ** 2).sum() + (1e-3 * sq(m) if regularise else 0.0)

    return inner, outer


def test_forgotten_depends_on_with_the_lower_level_outside_the_program():
    inner, outer = _forgotten_depends_on(regularise=False)
    with pytest.raises(ml.ProgramError, match=r"level 'outer' reads 'inner', which is not in the program: add "
                                              r"depends_on=\[inner\] to 'outer' \(if its loss goes through "
                                              r"inner's solution\) or pass inner to Program\(\.\.\.\) "
                                              r"\(levels in this program: \['outer'\]; also defined: \[.*'inner'"):
        ml.Program(outer)


def test_forgotten_depends_on_loss_without_a_path_from_its_parameters_is_a_build_error():
    inner, outer = _forgotten_depends_on(regularise=False)
    with pytest.warns(ml.ReadCycleWarning), \
            pytest.raises(ml.ProgramError, match=r"level 'outer': its loss has no path from its own parameters.*"
                                                 r"needs depends_on=\[inner\]"):
        ml.Program(outer, inner)


def test_read_cycle_without_depends_on_warns_naming_the_fix(recwarn):
    """Regularising its own parameters, outer would train on a zero hypergradient: warned. The same
    program with depends_on=[inner] is a plain bilevel program: no warning."""
    inner, outer = _forgotten_depends_on(regularise=True)
    with pytest.warns(ml.ReadCycleWarning, match=r"'outer' and 'inner' read each other.*add depends_on=\[inner\] "
                                              r"to 'outer'"):
        ml.Program(outer, inner)
    recwarn.clear()
    fixed = ml.level(hyper(0.5), optimizer=ml.optim.sgd(lr=0.1), data=outer.data, depends_on=[inner])(outer.fn)
    ml.Program(fixed)
    assert not [w for w in recwarn if issubclass(w.category, ml.ReadCycleWarning)]


def test_a_top_level_that_reads_a_level_below_the_one_it_depends_on_learns_through_it():
    """top depends on middle, middle on bottom; top's loss reads only bottom, which reads top. top's
    gradient flows through bottom's solution (not a forgotten depends_on). One SGD step of lr 0.5 on
    (w - t x)^2 lands on w = t x, so top's hypergradient is d/dt sum((t x - 2)^2) = 2 (t x - 2) x."""
    x = torch.ones(3, dtype=DT)

    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.5), data=(x,))
    def bottom(m, batch, top):
        return ((m.w - batch[0] * top.w) ** 2).sum()

    @ml.level(hyper(0.0), optimizer=ml.optim.sgd(lr=0.5), data=(x,), depends_on=[bottom])
    def middle(m, batch, bottom):
        return ((bottom.w - m.w) ** 2).sum()

    @ml.level(hyper(0.5), optimizer=ml.optim.sgd(lr=0.1), data=(x,), depends_on=[middle])
    def top(m, batch, bottom):
        return ((bottom.w - 2.0) ** 2).sum()

    got = ml.Program(top).hypergradient("top")["w"]
    torch.testing.assert_close(got, 2 * (0.5 * x - 2) * x, rtol=1e-14, atol=1e-14)


def test_detached_loss_is_a_build_error_naming_the_level():
    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.1))
    def frozen(m):
        return sq(m).detach()

    with pytest.raises(ml.ProgramError, match=r"level 'frozen': its loss does not require grad.*detached"):
        ml.Program(frozen)


# -- names that resolve to no level ---------------------------------------------------------------

def test_misspelt_names_suggest_the_closest_defined_level_and_list_every_level_defined():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1))
    def lower_level(m):
        return sq(m)

    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1))
    def unrelated_level(m):  # defined, in no program: still listed
        return sq(m)

    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=["lower_levle"])
    def top(m):
        return sq(m)

    with pytest.raises(ml.ProgramError, match=r"level 'top': depends_on 'lower_levle' names no level; did you mean "
                                              r"'lower_level'\?.*also defined: \[.*'lower_level'.*"
                                              r"'unrelated_level'.*\]"):
        ml.Program(top)

    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=[lower_level])
    def top2(m, lower_levl):
        return sq(lower_levl)

    with pytest.raises(ml.ProgramError, match=r"level 'top2': argument 'lower_levl' names no level; did you mean "
                                              r"'lower_level'\?.*levels in this program: \['lower_level', 'top2'\]"
                                              r".*'unrelated_level'"):
        ml.Program(top2)
    assert unrelated_level.name  # alive until here


def test_optimizer_reading_a_level_outside_the_program_says_to_pass_it():
    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=lambda upper: upper.w.exp().mean()))
    def lower(m):
        return sq(m)

    @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), depends_on=[lower])
    def upper(m, lower):
        return sq(lower)

    with pytest.raises(ml.ProgramError, match=r"level 'lower': an optimizer hyperparameter argument reads 'upper', "
                                              r"which is not in the program: pass upper to Program\(\.\.\.\)"):
        ml.Program(lower)
    ml.Program(upper)  # from the top, the optimizer's read is found


# -- declarations -------------------------------------------------------------------------------

def test_data_without_a_batch_parameter_fails_at_decoration():
    with pytest.raises(ValueError, match=r"level 'nobatch': data= is given but the function has no `batch`"):
        @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), data=(torch.ones(3, dtype=DT),))
        def nobatch(m):
            return sq(m)


def test_hypergrad_class_instead_of_an_instance():
    with pytest.raises(TypeError, match=r"level 'low': hypergrad=CG is the class; use ml.hypergrad.CG\(\) "
                                        r"\(an instance"):
        @ml.level(hyper(), optimizer=ml.optim.sgd(lr=0.1), hypergrad=ml.hypergrad.CG)
        def low(m):
            return sq(m)


def test_parameters_with_defaults_keep_them_so_levels_can_be_made_in_a_loop():
    """``i=i`` binds the loop variable, not a level named 'i'; each lower level pulls toward its target."""
    targets = [1.0, -2.0, 3.0]
    lowers = []
    for i in range(3):
        @ml.level(hyper(0.0), optimizer=ml.optim.sgd(lr=0.25), steps=20, name=f"low{i}")
        def low(m, top, i=i):
            return ((m.w - targets[i] * top.w) ** 2).sum()

        lowers.append(low)

    @ml.level(hyper(1.0), optimizer=ml.optim.sgd(lr=0.1), depends_on=lowers)
    def top(m, low0, low1, low2):
        return sum(((lw.w - 1.0) ** 2).sum() for lw in (low0, low1, low2))

    prog = ml.Program(top)
    assert sorted(prog.levels) == ["low0", "low1", "low2", "top"]
    prog.step()
    for i, t in enumerate(targets):  # 20 steps of lr 0.25 on (w - t)^2 from 0: w = t (1 - 0.5^20)
        torch.testing.assert_close(prog.params(f"low{i}")["w"], torch.full((3,), t * (1 - 0.5 ** 20), dtype=DT))


# -- check_hypergradient where the loss is not smooth -------------------------------------------------

def _relu_program(a0):
    """inner pulls w toward relu(a) (unrolled); at a = 0 the outer loss has a kink."""
    @ml.level(hyper(0.0), optimizer=ml.optim.sgd(lr=0.5), steps=3)
    def inner(m, outer):
        return ((m.w - torch.relu(outer.w)) ** 2).sum()

    @ml.level(hyper(a0), optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return ((inner.w - 1.0) ** 2).sum()

    return ml.Program(outer)


def test_check_hypergradient_says_when_the_loss_is_not_smooth_at_the_point():
    report = ml.check_hypergradient(_relu_program(0.0), "outer")
    assert not report.ok and not report.smooth
    assert "may not be smooth" in str(report) and "finite differences are unreliable" in str(report)
    smooth = ml.check_hypergradient(_relu_program(0.5), "outer")  # away from the kink: a plain check
    assert smooth.ok and smooth.smooth and "smooth" not in str(smooth)
