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


def test_non_finite_step_can_be_skipped_and_counted():
    prog = _nan_program("skip")
    prog.step()
    prog.step()
    before = _snapshot(prog)
    row = prog.step()
    assert row["skipped"] == 1 and prog.step_count == 2
    assert all(torch.equal(before[k], v) for k, v in _snapshot(prog).items())
