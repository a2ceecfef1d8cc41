"""The generated step: identifiers that cannot collide."""
import pytest
import torch

import mlodsl as ml
from mlodsl.codegen import Namespace, StepNames
from helpers import DT


def _pull_towards(target, name):
    @ml.level(ml.Hyper(w=torch.zeros(1, dtype=DT)), optimizer=ml.optim.sgd(lr=0.25), steps=2, name=name)
    def fn(m):
        return ((m.w - target) ** 2).sum()
    return fn


def test_level_names_that_sanitize_alike_keep_their_own_functions():
    """`low-a` and `low_a` both sanitize to `low_a`; each level must still run its own loss."""
    prog = ml.Program(_pull_towards(1.0, "low-a"), _pull_towards(-3.0, "low_a"))
    prog.step()
    # two SGD steps on (w - c)^2 from 0 with lr 0.25: w = c (1 - 0.5^2) = 0.75 c
    torch.testing.assert_close(prog.params("low-a")["w"], torch.tensor([0.75], dtype=DT))
    torch.testing.assert_close(prog.params("low_a")["w"], torch.tensor([-2.25], dtype=DT))
    assert "def advance_low_a(" in prog.code and "def advance_low_a_1(" in prog.code


def test_namespace_never_gives_two_keys_one_name():
    ns = Namespace(reserved=("step",))
    names = [ns.create(c, key) for key, c in enumerate(["low-a", "low_a", "low_a", "low_a_1", "step", "if", "1x"])]
    assert names == ["low_a", "low_a_1", "low_a_2", "low_a_1_1", "step_1", "_if", "_1x"]
    assert ns.create("anything", 1) == "low_a_1"  # a key keeps its name
    # every identifier of every level is distinct, whatever the levels are called
    levels = ["a", "vjp_a", "a_", "low-a", "low_a", "a_one_task", "gradient"]
    table = StepNames(levels)
    every = [v for n in levels for v in vars(table[n]).values()]
    assert len(every) == len(set(every)) and all(v.isidentifier() for v in every)


K, LR, UPPER_LR = 3, 0.3, 0.1
TARGETS = {0: torch.tensor([1.0, -2.0], dtype=DT), 1: torch.tensor([0.5, 3.0], dtype=DT)}
WANT = {0: torch.tensor([0.3, 0.1], dtype=DT), 1: torch.tensor([-1.0, 2.0], dtype=DT)}


def _reference(c0):
    """Hand-written autograd: lower i takes K SGD steps on ‖w - c ⊙ t_i‖² + ‖w‖²/2 from w = 0; the
    upper loss is Σ_i ‖w_i^K - want_i‖². Returns d upper / d c."""
    c = c0.detach().clone().requires_grad_()
    total = 0
    for i in (0, 1):
        w = torch.zeros(2, dtype=DT, requires_grad=True)
        for _ in range(K):
            (g,) = torch.autograd.grad(((w - c * TARGETS[i]) ** 2).sum() + 0.5 * (w ** 2).sum(), w,
                                       create_graph=True)
            w = w - LR * g
        total = total + ((w - WANT[i]) ** 2).sum()
    return torch.autograd.grad(total, c)[0]


@pytest.mark.parametrize("names", [("low-a", "low_a"), ("a", "vjp_a"), ("x", "x_")])
def test_lower_levels_whose_identifiers_collide_get_their_own_hypergradients(names):
    """Two lower levels under one upper, named so that their generated names collide (`low-a`/`low_a`
    sanitize alike; `update_vjp_` + `a` is `update_` + `vjp_a`; the record of `x`'s block, `block_x_`,
    is `x_`'s block function). Replayed unrolling (checkpoint=1) calls every generated function."""
    c = ml.Hyper(c=torch.tensor([0.7, -0.4], dtype=DT))
    # nn.Modules read through the upper's closure (`low-a` cannot be an argument name)
    first, second = mods = [torch.nn.Linear(1, 2, bias=False).to(DT) for _ in names]
    for m in mods:
        torch.nn.init.zeros_(m.weight)
    lowers = []
    for i, (name, mod) in enumerate(zip(names, mods)):
        @ml.level(mod, optimizer=ml.optim.sgd(lr=LR), steps=K, name=name, start_from="init",
                  hypergrad=ml.hypergrad.Unroll(checkpoint=1))
        def lower(m, upper, i=i):
            w = m.weight[:, 0]
            return ((w - upper.c * TARGETS[i]) ** 2).sum() + 0.5 * (w ** 2).sum()
        lowers.append(lower)

    @ml.level(c, optimizer=ml.optim.sgd(lr=UPPER_LR), depends_on=lowers)
    def upper(m):  # reads both lower levels' modules through the closure
        return ((first.weight[:, 0] - WANT[0]) ** 2).sum() + ((second.weight[:, 0] - WANT[1]) ** 2).sum()

    prog = ml.Program(upper)
    c0 = c.c.detach().clone()
    expected = _reference(c0)
    torch.testing.assert_close(prog.hypergradient("upper")["c"], expected, rtol=1e-10, atol=1e-12)
    prog.step()
    torch.testing.assert_close(prog.params("upper")["c"], c0 - UPPER_LR * expected, rtol=1e-10, atol=1e-12)
