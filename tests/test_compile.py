"""compile=True: the step's regions under torch.compile give the eager numbers, for every method.

Compiling is slow on 2 cores, so the problems are tiny and the regions few; the inductor cache
makes later programs with the same graphs cheap.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl import loops
from mlodsl.compiled import CompileWarning
from helpers import hpo_problem, logreg_data, make_hpo, reference_hpo

HG = ml.hypergrad
METHODS = {
    "unroll": lambda: HG.Unroll(),
    "unroll_checkpoint": lambda: HG.Unroll(checkpoint=2),
    "unroll_last": lambda: HG.Unroll(last=2),
    "forward": lambda: HG.Forward(),
    "first_order": lambda: HG.FirstOrder(),
    "cg": lambda: HG.CG(iters=3),
    "neumann": lambda: HG.Neumann(iters=3, alpha=0.1),
    "fixed_point": lambda: HG.FixedPoint(iters=3),
    "finite_diff": lambda: HG.FiniteDiff(eps=0.01),
    "sama": lambda: HG.SAMA(eps=0.01),
    "zero_order": lambda: HG.ZeroOrder(samples=2, sigma=0.01),
    "f2sa": lambda: HG.F2SA(iters=3, lr=0.1, penalty=lambda step: 10.0 * step),
    "bome": lambda: HG.BOME(iters=3, lr=0.05, value_lr=0.1, value_iters=2),
}


def float32_hpo(method, compile):
    """Per-feature L2 for logistic regression in float32, with Adam inside (an optimizer state
    with a step counter) and a warm start, so that steps differ."""
    train, val = logreg_data(d=5, seed=1)
    train, val = [tuple(t.float() for t in split) for split in (train, val)]
    outer, _, _ = hpo_problem(train, val, K=4, method=method, inner_opt=ml.optim.adam(lr=0.05),
                              outer_opt=ml.optim.adam(lr=0.1), dtype=torch.float32, seed=1)
    return ml.Program(outer, compile=compile)


def run(prog, steps=2):
    torch.manual_seed(0)
    for _ in range(steps):
        prog.step()
    return prog.params("outer")["log_l2"], prog.params("inner")["weight"]


def regions(prog, level="inner") -> dict:
    """``{what: region}`` of the bottom level 'inner' (or ``level``)."""
    return {r.label.split("its ")[1]: r for r in prog.compiler.regions if r.label.startswith(f"level '{level}'")}


def compiled_updates(used: dict, steps: int = 4) -> int:
    """Inner updates that ran compiled: one at a time, or as a loop of ``steps`` (mlodsl.loops)."""
    loops = sum(r.compiled_calls for what, r in used.items() if what.startswith("loop of updates"))
    return used["update"].compiled_calls + steps * loops


def compiled_vjps(used: dict) -> int:
    """Calls of compiled update VJPs: one at a time, or as Unroll's whole reverse loop."""
    return used["update's VJP"].compiled_calls + sum(
        r.compiled_calls for what, r in used.items() if what.startswith("reverse loop"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_step_equals_eager_for_every_method(name):
    eager_prog = float32_hpo(METHODS[name](), False)
    eager = run(eager_prog)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)  # nothing falls back here
        prog = float32_hpo(METHODS[name](), True)
        compiled = run(prog)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # what a method reports reaches the log
    for key in ("inner/cg_residual", "inner/neumann_change", "inner/penalty", "inner/barrier_weight"):
        if key in eager_prog.history[-1]:
            assert abs(prog.history[-1][key] - eager_prog.history[-1][key]) < 1e-4
    used = regions(prog)
    if name in ("cg", "neumann", "finite_diff", "sama", "f2sa", "bome"):  # the hypergradient's products: one region
        assert used["hypergradient products toward 'outer'"].compiled_calls == 2
    assert compiled_updates(used) >= 2 * 4  # every inner update ran compiled (checkpoints rerun some)
    assert regions(prog, "outer")["partial gradients"].compiled_calls == 2
    if name.startswith("unroll"):
        assert compiled_vjps(used) > 0  # the reverse pass too
    if name in ("unroll", "unroll_last", "cg") and loops.scan is not None:  # the K updates (and Unroll's
        # reverse pass) as one loop each (torch's scan: absent from older torch, e.g. 2.4)
        assert used["loop of updates" + " (keeping iterates)" * (name != "cg")].compiled_calls == 2
        assert name == "cg" or used["reverse loop of update VJPs (toward 'outer')"].compiled_calls == 2
    if name == "unroll_checkpoint":  # segments are replayed: one update at a time
        assert used["update"].compiled_calls > 2 * 4 and used["update's VJP"].compiled_calls == 2 * 4


@pytest.mark.parametrize("lr", [0.5, 0.3])
def test_compiled_unroll_hypergradient_equals_autograd_in_float64(lr):
    """The second learning rate is a float dynamo has seen change at the same source line: it must
    stay a float64 constant (a float32 tensor would put the hypergradient off by ~1e-8)."""
    prog, net, hyper, train, val = make_hpo(K=5, lr=lr, compile=True)
    ref, _ = reference_hpo(net, hyper, train, val, K=5, lr=lr)
    g = prog.hypergradient("outer")["log_l2"]
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    assert regions(prog)["reverse loop of update VJPs (toward 'outer')"].compiled_calls == 1  # 5 VJPs, one call


def test_compile_options_are_checked_and_passed_to_torch_compile():
    with pytest.raises(ValueError, match="unknown torch.compile options"):
        make_hpo(compile={"fullgraf": True})
    with pytest.raises(ValueError, match="compile must be"):
        make_hpo(compile="yes")
    prog, net, hyper, train, val = make_hpo(K=3, lr=0.5, compile={"backend": "aot_eager"})
    ref, _ = reference_hpo(net, hyper, train, val, K=3, lr=0.5)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], ref, rtol=1e-10, atol=1e-12)
    loops = [r for r in prog.compiler.regions if "loop" in r.label]
    assert loops and all(r.compiled_calls > 0 for r in loops)


def scaled_regression(inner, compile, *, net=lambda: nn.Linear(3, 1), points=8, split=None, **options):
    """A program of two levels for the tests below: the lower level ``inner(net, batch, outer)`` (3
    SGD steps of lr 0.1 unless ``options`` say otherwise) fits ``net()`` on ``points`` random
    points with 3 features (``split(x, y)``: its data, default the whole set as a fixed batch); the
    upper level learns ``outer.scale`` from the regression error at the lower solution. Returns
    ``(program, the lower level's module)``."""
    torch.manual_seed(0)
    module, hyper = net(), ml.Hyper(scale=torch.ones(()))
    x, y = torch.randn(points, 3), torch.randn(points)
    lower = ml.level(module, **{"optimizer": ml.optim.sgd(lr=0.1), "steps": 3, **options},
                     data=(x, y) if split is None else split(x, y))(inner)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=(x, y), depends_on=[lower])
    def outer(hyper, batch, inner):
        return F.mse_loss(inner(batch[0]).squeeze(-1), batch[1])

    return ml.Program(outer, compile=compile), module


def test_a_level_that_cannot_be_compiled_warns_why_and_runs_eagerly():
    def inner(net, batch, outer):
        err = net(batch[0]).squeeze(-1) - batch[1]
        if err.abs().max() > 1e3:  # a branch on a tensor's value: a graph break, so not one graph
            err = err.clamp(-1e3, 1e3)
        return (outer.scale * err ** 2).mean()

    def build(compile):
        return scaled_regression(inner, compile)[0]

    eager = build(False)
    eager.step()
    prog = build(True)
    with pytest.warns(CompileWarning) as caught:
        prog.step()  # the loop region fails, then the one-update regions, each saying why
        prog.step()
    said = [str(w.message) for w in caught]
    assert any(m.startswith("level 'inner': its loop of updates (keeping iterates) could not be compiled")
               and "one region each instead" in m for m in said), said
    assert any(m.startswith("level 'inner': its update could not be compiled") and "runs eagerly" in m
               for m in said), said
    eager.step()
    torch.testing.assert_close(prog.params("outer")["scale"], eager.params("outer")["scale"], rtol=1e-6, atol=1e-7)
    used = regions(prog)
    assert "Data-dependent branching" in used["update"].reason  # it says why


def test_batchnorm_levels_run_eagerly_under_compile_with_a_warning():
    def inner(net, batch, outer):
        return outer.scale * F.mse_loss(net(batch[0]).squeeze(-1), batch[1])

    def build(compile):
        return scaled_regression(inner, compile, steps=2,
                                 net=lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))

    eager, net_e = build(False)
    eager.step()
    with pytest.warns(CompileWarning, match="level 'inner' runs eagerly.*running statistics"):
        prog, net_c = build(True)
    prog.step()
    torch.testing.assert_close(prog.params("outer")["scale"], eager.params("outer")["scale"])
    torch.testing.assert_close(net_c[1].running_mean, net_e[1].running_mean)


def test_three_levels_unrolled_everywhere_compile_the_bottom_and_agree_with_eager():
    # Under the top's reverse loop the regions are differentiated through: they run eagerly there.
    from test_implicit import D3, DT, three_levels
    g = torch.Generator().manual_seed(0)
    u0, w0, a0 = (0.3 * torch.randn(D3, generator=g, dtype=DT) for _ in range(3))
    progs = [three_levels(u0, w0, a0, HG.Unroll(), HG.Unroll(), steps_b=2, steps_c=3, compile=c)
             for c in (False, True)]
    for prog in progs:
        for _ in range(2):
            prog.step()
    eager, prog = progs
    for name in prog.levels:
        for k, v in eager.params(name).items():
            torch.testing.assert_close(prog.params(name)[k], v, rtol=1e-10, atol=1e-12)
    assert regions(prog, "bottom")["update"].compiled_calls > 0


def test_a_second_process_reuses_the_compile_caches(tmp_path):
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "import torch\n"
        "from torch._dynamo.utils import counters\n"
        "from helpers import make_hpo\n"
        "prog = make_hpo(K=2, compile=True)[0]\n"
        "prog.step()\n"
        "print(counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss'])\n"
    ) % os.path.dirname(__file__)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (hit1, miss1), (hit2, miss2) = [map(int, r.stdout.split()[-2:]) for r in runs]
    assert miss1 > 0 and hit1 == 0  # the first process compiles and fills the cache
    assert hit2 == miss1 and miss2 == 0  # the second compiles nothing


def test_batches_of_different_shapes_run_one_compiled_update_at_a_time():
    """The K updates run as one compiled loop when their batches stack; a smaller last batch in the
    block means they cannot, and the updates run one compiled region each, with the eager numbers."""
    def inner(net, batch, outer):
        return (outer.scale * (net(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()

    def build(compile):
        return scaled_regression(inner, compile, points=14, optimizer=ml.optim.sgd(lr=0.1, momentum=0.9),
                                 hypergrad=ml.hypergrad.Unroll(), split=lambda x, y: [
                                     (x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])])[0]  # 5, 5, 4 points

    eager, prog = build(False), build(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        for _ in range(2):
            eager.step()
            prog.step()
    torch.testing.assert_close(prog.params("outer")["scale"], eager.params("outer")["scale"], rtol=1e-5, atol=1e-6)
    used = regions(prog)
    assert "loop of updates (keeping iterates)" not in used  # never asked for: the batches do not stack
    assert used["update"].compiled_calls == 2 * 3 and used["update's VJP"].compiled_calls == 2 * 3


def test_metrics_that_are_python_numbers_compile_and_reach_the_history():
    """A level may report a metric that is a Python number beside tensor metrics: the compiled loop
    carries it (as a tensor) and the history holds the eager numbers."""
    def inner(net, batch, outer):
        err = net(batch[0]).squeeze(-1) - batch[1]
        return (outer.scale * err ** 2).mean(), {"const": 0.5, "mae": err.abs().mean()}

    def build(compile):
        return scaled_regression(inner, compile)[0]

    eager, prog = build(False), build(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        for _ in range(2):
            want, got = eager.step(), prog.step()
    assert got["inner/const"] == want["inner/const"] == 0.5
    assert abs(got["inner/mae"] - want["inner/mae"]) < 1e-6 and abs(got["outer"] - want["outer"]) < 1e-6
    if loops.scan is not None:
        assert [r.compiled_calls for w, r in regions(prog).items() if w.startswith("loop of updates")] == [2]


def test_levels_over_the_compile_budget_run_eagerly_with_a_warning_and_the_exact_numbers():
    """A captured transformer level (76 and 73 operations here) is over the budget of 50: under
    compile=True it runs eagerly, says so at build, and nothing is compiled (its first step takes
    the eager time, not minutes); compile={"max_ops": None} lifts the budget."""
    from attention_models import encoder, hand_unroll, reweighting
    net, logits, train, val = encoder()
    with pytest.warns(CompileWarning) as caught:
        prog, _ = reweighting(net, logits, train, val, HG.Unroll(), compile=True)
    said = [str(w.message) for w in caught]
    for level in ("inner", "outer"):
        assert any(m.startswith(f"level '{level}' runs eagerly under compile=True: its graph has")
                   and "max_ops=50" in m and "'max_ops': None" in m for m in said), said
    torch.testing.assert_close(prog.hypergradient("outer")["w"], hand_unroll(net, logits, train, val),
                               rtol=1e-10, atol=1e-12)
    prog.step()
    assert prog.compiler.regions == [] and set(prog.compiler.eager_levels) == {"inner", "outer"}

    unlimited, _ = reweighting(net, logits, train, val, HG.Unroll(), compile={"max_ops": None})
    assert unlimited.compiler.eager_levels == {} and unlimited.compiler.options == {}

    def inner(net, batch, outer):
        return outer.scale * F.mse_loss(net(batch[0]).squeeze(-1), batch[1])

    with pytest.warns(CompileWarning, match="level 'inner' runs eagerly.*max_ops=1"):  # a budget of one's own
        small, _ = scaled_regression(inner, {"max_ops": 1, "backend": "aot_eager"})
    assert small.compiler.options == {"backend": "aot_eager"}
    with pytest.raises(ValueError, match="max_ops must be a positive int or None"):
        scaled_regression(inner, {"max_ops": 0})


def test_compile_runs_the_solver_eagerly_without_a_warning(recwarn):
    """A level solved by ml.optim.solver (any Python): its update runs eagerly, the rest compiled."""
    from test_solver import ridge_closed_form, ridge_program
    prog, train, val, log_l2 = ridge_program(compile=True)
    expected, _ = ridge_closed_form(train, val, log_l2)
    torch.testing.assert_close(prog.hypergradient("outer")["log_l2"], expected, rtol=0, atol=1e-10)
    assert not [w for w in recwarn if "could not be compiled" in str(w.message)]
