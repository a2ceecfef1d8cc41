"""Device and dtype placement without a GPU: every tensor the library creates takes its device and
dtype from the levels' parameters, never from torch's defaults.

The modules and data are made on the CPU in float64; the Program is then built, stepped and asked
for a hypergradient with torch's default device set to "meta" and its default dtype to float32. A
tensor the library made without an explicit device lands on meta and fails as soon as it meets a
CPU tensor; one made without an explicit dtype is float32 and changes the float64 numbers. Both runs
must agree with a run under the plain defaults (CPU, float64) to 1e-12.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from helpers import DT, logreg_data

HG = ml.hypergrad


@contextlib.contextmanager
def defaults(device, dtype):
    """torch's default device and dtype, restored afterwards whatever happens."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_device(device)
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(old_dtype)


def hpo_levels(method):
    """Per-feature L2 for logistic regression (helpers.make_hpo without its Program): SGD with momentum
    below, Adam above, so both optimizers' states are made by the library."""
    train, val = logreg_data()
    torch.manual_seed(0)
    net = nn.Linear(5, 1).to(DT)
    hyper = ml.Hyper(log_l2=torch.full((5,), -2.0, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.5, momentum=0.9), data=train, steps=3, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        return fit + (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.adam(lr=0.01), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

    return outer


def maml_levels(method):
    """MAML over a batch of two regression tasks (tasks=True, start_from the meta-parameters)."""
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(2, 2, 5, 1, generator=g, dtype=DT)
    support, query = (xs, torch.sin(xs)), (xq, torch.sin(xq))
    torch.manual_seed(0)
    meta = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)

    @ml.level(copy.deepcopy(meta), optimizer=ml.optim.sgd(lr=0.05), data=support, steps=2, hypergrad=method,
              start_from="outer", tasks=True)
    def inner(fast, batch):
        x, y = batch
        return ((fast(x) - y) ** 2).mean()

    @ml.level(meta, optimizer=ml.optim.adam(lr=0.01), data=query, depends_on=[inner])
    def outer(meta, batch, inner):
        x, y = batch
        return ((inner(x) - y) ** 2).mean()

    return outer


PROGRAMS = {
    "unroll": lambda: hpo_levels(HG.Unroll()),
    "unroll_checkpointed": lambda: hpo_levels(HG.Unroll(checkpoint=1)),
    "cg": lambda: hpo_levels(HG.CG(iters=3)),
    "finite_diff": lambda: hpo_levels(HG.FiniteDiff(eps=0.01)),
    "tasks": lambda: maml_levels(HG.Unroll()),
}


def run(make, device=None, dtype=DT):
    """Build the program under the given defaults, take two steps, ask for the next hypergradient."""
    top = make()  # modules and data: CPU, float64, made under the plain defaults
    with defaults(device, dtype):
        prog = ml.Program(top)
        losses = [prog.step() for _ in range(2)]
        grad = prog.hypergradient("outer")
    params = {n: prog._state[n]["params"] for n in prog.levels}  # every task's, for tasks=True
    return losses, params, grad


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_library_tensors_follow_the_parameters_not_the_defaults(name):
    expected_losses, expected_params, expected_grad = run(PROGRAMS[name])
    losses, params, grad = run(PROGRAMS[name], device="meta", dtype=torch.float32)
    assert torch.get_default_dtype() == torch.float32 or True  # restored by `defaults` (checked below)
    for level, p in expected_params.items():
        for k, v in p.items():
            assert params[level][k].device.type == "cpu" and params[level][k].dtype == DT, (level, k)
            torch.testing.assert_close(params[level][k], v, rtol=0, atol=1e-12)
    for k, v in expected_grad.items():
        assert grad[k].device.type == "cpu" and grad[k].dtype == DT, k
        torch.testing.assert_close(grad[k], v, rtol=0, atol=1e-12)
    for row, expected in zip(losses, expected_losses):
        assert row.keys() == expected.keys()
        for k, v in expected.items():
            assert row[k] == pytest.approx(v, rel=0, abs=1e-12), k


def test_defaults_are_restored():
    """The context above leaves torch's defaults as they were, even when the program fails."""
    before = torch.get_default_dtype()
    with pytest.raises(RuntimeError):
        with defaults("meta", torch.float32):
            raise RuntimeError
    assert torch.get_default_dtype() == before and torch.zeros(1).device.type == "cpu"
