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
from helpers import DT, hpo_problem, logreg_data
from mlodsl import loops

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
    # a metric that is a Python number becomes a tensor inside a compiled loop
    outer, _, _ = hpo_problem(train, val, K=3, method=method, inner_opt=ml.optim.sgd(lr=0.5, momentum=0.9),
                             outer_opt=ml.optim.adam(lr=0.01), metrics={"tenth": 0.1})
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


def features_levels(method):
    """Much of the rest at once: BatchNorm buffers, metrics, a learning rate learned by the upper
    level (an optimizer read), SGD with dampening, clipping, AdamW with a projection, and a lower
    level that draws its batches from a list (for grad_accum)."""
    train, val = logreg_data()
    parts = [(train[0][i::2], train[1][i::2]) for i in range(2)]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    hyper = ml.Hyper(log_l2=torch.full((5,), -2.0, dtype=DT), log_lr=torch.tensor(-1.0, dtype=DT))

    @ml.level(net, optimizer=ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), momentum=0.5, dampening=0.1),
              data=parts, steps=3, hypergrad=method, clip_grad_norm=1.0)
    def inner(net, batch, outer):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        return fit + (outer.log_l2.exp() * net[0].weight ** 2).sum(), {"fit": fit, "tenth": 0.1}

    @ml.level(hyper, optimizer=ml.optim.adamw(lr=0.01), data=val, depends_on=[inner],
              project=ml.constraints.norm_ball(3.0))
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y), {"three": 3}

    return outer


PROGRAMS = {
    "unroll": lambda: hpo_levels(HG.Unroll()),
    "unroll_checkpointed": lambda: hpo_levels(HG.Unroll(checkpoint=1)),
    "cg": lambda: hpo_levels(HG.CG(iters=3)),
    "finite_diff": lambda: hpo_levels(HG.FiniteDiff(eps=0.01)),
    "tasks": lambda: maml_levels(HG.Unroll()),
    "tasks_checkpointed": lambda: maml_levels(HG.Unroll(checkpoint=1)),
    "forward": lambda: hpo_levels(HG.Forward()),
    "first_order": lambda: hpo_levels(HG.FirstOrder()),
    "neumann": lambda: hpo_levels(HG.Neumann(iters=3, alpha=0.1)),
    "fixed_point": lambda: hpo_levels(HG.FixedPoint(iters=3)),
    "sama": lambda: hpo_levels(HG.SAMA()),
    "zero_order": lambda: hpo_levels(HG.ZeroOrder(samples=2, sigma=0.01)),
    "features": lambda: features_levels(HG.Unroll()),
    "features_cg_accumulated": (lambda: features_levels(HG.CG(iters=2)), {"grad_accum": 2}),
}


def run(make, device=None, dtype=DT, **options):
    """Build the program under the given defaults, take two steps, ask for the next hypergradient."""
    torch.manual_seed(0)  # ZeroOrder draws from torch's generator
    top = make()  # modules and data: CPU, float64, made under the plain defaults
    with defaults(device, dtype):
        prog = ml.Program(top, **options)
        losses = [prog.step() for _ in range(2)]
        grad = prog.hypergradient("outer")
    params = {n: prog.params(n) for n in prog.levels}  # every task's, for tasks=True
    return prog, losses, params, grad


def assert_same_run(got, expected, atol=1e-12):
    (_, losses, params, grad), (_, expected_losses, expected_params, expected_grad) = got, expected
    for level, p in expected_params.items():
        for k, v in p.items():
            assert params[level][k].device.type == "cpu" and params[level][k].dtype == DT, (level, k)
            torch.testing.assert_close(params[level][k], v, rtol=0, atol=atol)
    for k, v in expected_grad.items():
        assert grad[k].device.type == "cpu" and grad[k].dtype == DT, k
        torch.testing.assert_close(grad[k], v, rtol=0, atol=atol)
    for row, expected in zip(losses, expected_losses):
        assert row.keys() == expected.keys()
        for k, v in expected.items():
            assert row[k] == pytest.approx(v, rel=0, abs=atol), k


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_library_tensors_follow_the_parameters_not_the_defaults(name):
    make, options = PROGRAMS[name] if isinstance(PROGRAMS[name], tuple) else (PROGRAMS[name], {})
    dtype = torch.get_default_dtype()
    expected = run(make, **options)
    got = run(make, device="meta", dtype=torch.float32, **options)
    assert torch.get_default_dtype() == dtype and torch.zeros(()).device.type == "cpu"  # defaults restored
    assert_same_run(got, expected)
    if name == "features":  # the inspection tools too
        with defaults("meta", torch.float32):
            for max_coords in (32, 2):  # every coordinate, then random directions
                report = ml.check_hypergradient(got[0], "outer", eps=1e-4, max_coords=max_coords)
                assert report.ok, str(report)
            assert got[0].explain() is not None


@pytest.mark.skipif(loops.scan is None, reason="torch's scan is absent from this torch (e.g. 2.4)")
def test_compiled_loops_follow_the_parameters_not_the_defaults():
    """The compiled loop of updates gets its index and its metrics on the parameters' device: with an
    index on meta the scan does not compile (and falls back to one region per update). Compared with
    the same program compiled under the plain defaults (compiled against eager is test_compile's);
    the meta run goes first, so that its regions are the ones traced and compiled."""
    got = run(PROGRAMS["unroll"], device="meta", dtype=torch.float32, compile=True)
    expected = run(PROGRAMS["unroll"], compile=True)
    for prog in (got[0], expected[0]):
        loops_ = [r for r in prog.compiler.regions if "loop" in r.label]
        assert loops_ and all(r.reason is None and r.compiled_calls > 0 for r in loops_), \
            [(r.label, r.reason) for r in loops_]
    assert_same_run(got, expected)
