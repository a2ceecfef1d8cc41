"""The generated step: identifiers that cannot collide."""
import torch

import mlodsl as ml
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
