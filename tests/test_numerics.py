"""Numerics of the optimizers and hypergradient methods: parameters that no loss reaches, diverging
solvers, and random state (dropout) shared by the evaluations of one update."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml

DT = torch.float64


# -- parameters that the loss does not reach ---------------------------------------------------

class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 1).to(DT)
        self.unused = nn.Parameter(torch.randn(4, dtype=DT))

    def forward(self, x):
        return self.used(x).squeeze(-1)


def _regression(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    return x, x @ torch.randn(3, generator=g, dtype=DT) + 0.1 * torch.randn(n, generator=g, dtype=DT)


OPTIMIZERS = {
    "sgd_momentum_decay": (lambda: ml.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.1),
                           lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)),
    "sgd_nesterov": (lambda: ml.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
                               lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
    "adam_decay": (lambda: ml.optim.adam(lr=0.05, weight_decay=0.1, eps_root=0.0),
                   lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1)),
    "adamw": (lambda: ml.optim.adamw(lr=0.05, weight_decay=0.1, eps_root=0.0),
              lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_parameter_the_loss_does_not_reach_is_left_alone_as_torch_optim_does(name):
    """torch.optim skips a parameter whose .grad is None (no decay, no momentum, no moments);
    torch.func gives zeros there, which decay and Adam would move. mlodsl matches torch.optim."""
    ours, theirs = OPTIMIZERS[name]
    torch.manual_seed(0)
    net = WithUnused()
    ref = WithUnused()
    ref.load_state_dict(net.state_dict())
    unused0 = net.unused.detach().clone()
    data = _regression()

    @ml.level(net, optimizer=ours(), data=data)
    def fit(net, batch):
        x, y = batch
        return F.mse_loss(net(x), y)

    prog = ml.Program(fit)
    opt = theirs(list(ref.parameters()))
    for _ in range(6):
        prog.step()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(ref(data[0]), data[1]).backward()
        assert ref.unused.grad is None
        opt.step()
    mine = prog.params("fit")
    for k, p in ref.named_parameters():
        torch.testing.assert_close(mine[k], p.detach(), rtol=0, atol=1e-12)
    assert torch.equal(mine["unused"], unused0)
    state = prog.state_dict()["levels"]["fit"]["opt"]
    for buf in ("momentum", "m", "v"):  # its optimizer state did not advance either
        if buf in state:
            assert not state[buf]["unused"].any()


def test_an_upper_parameter_reached_only_through_its_lower_level_still_moves():
    """The upper's loss does not take its parameter, the lower's does: the hypergradient reaches it,
    so it is no absent parameter (while the upper's parameter no level takes stays put)."""
    x, y = _regression()
    w = nn.Linear(3, 1, bias=False).to(DT)
    hyper = ml.Hyper(log_l2=torch.zeros(3, dtype=DT), spare=torch.ones(2, dtype=DT))

    @ml.level(w, optimizer=ml.optim.sgd(lr=0.1), data=(x, y), steps=3)
    def inner(w, batch, outer):
        xb, yb = batch
        return F.mse_loss(w(xb).squeeze(-1), yb) + (outer.log_l2.exp() * w.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.adamw(lr=0.1, weight_decay=0.5), data=(x, y), depends_on=[inner])
    def outer(hyper, batch, inner):
        xb, yb = batch
        return F.mse_loss(inner(xb).squeeze(-1), yb)

    prog = ml.Program(outer)
    prog.step()
    assert not torch.equal(prog.params("outer")["log_l2"], torch.zeros(3, dtype=DT))
    assert torch.equal(prog.params("outer")["spare"], torch.ones(2, dtype=DT))
    assert prog._runtime.absent == {"outer": frozenset({"spare"})}
