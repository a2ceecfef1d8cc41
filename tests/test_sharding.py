"""Sharded lower levels (``shard=True``, gloo on CPU): two ranks that each keep half of the lower
level's parameters and optimizer state give the parameters one unsharded process gives on the
whole batches; a gathered checkpoint resumes bit-exactly in a sharded program and loads into an
unsharded one; a dead rank makes the other fail inside the sharded collectives, not hang."""
import operator
import textwrap
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mlodsl as ml
from test_distributed import _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

PROBLEM = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch import nn
    import mlodsl as ml

    def data():
        g = torch.Generator().manual_seed(0)
        X, w = torch.randn(160, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
        y = (X @ w + 0.5 * torch.randn(160, generator=g, dtype=torch.float64) > 0).double()
        return [(X[i:i + 20], y[i:i + 20]) for i in range(0, 160, 20)]

    def build(method, rank=0, world=1, shard=False):
        batches = [(x[rank::world], y[rank::world]) for x, y in data()]  # every rank: its half of each batch
        torch.manual_seed(rank)  # different initial values per rank: rank 0's are broadcast
        net = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        hyper = ml.Hyper(log_l2=torch.full((3, 5), -2.0, dtype=torch.float64))

        # clipped: the norm of a sharded gradient is an all-reduce of the ranks' partial sums
        @ml.level(net, optimizer=ml.optim.adam(lr=0.05), data=batches[:4], steps=3, hypergrad=method, shard=shard,
                  clip_grad_norm=0.1)
        def inner(net, batch, outer):
            x, t = batch
            return F.binary_cross_entropy_with_logits(net(x).squeeze(-1), t) + \\
                (outer.log_l2.exp() * net[0].weight ** 2).sum()

        @ml.level(hyper, optimizer=ml.optim.adam(lr=0.05), data=batches[4:], depends_on=[inner])
        def outer(hyper, batch, inner):
            x, t = batch
            return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), t)

        return ml.Program(outer)

    def by_hand(net, x):  # the layers as x @ w.t() + b: each weight reaches its matmul through a view
        for i in range(0, len(net) - 1, 2):
            x = torch.tanh(x @ net[i].weight.t() + net[i].bias)
        return x @ net[-1].weight.T + net[-1].bias

    def deep(rank=0, world=1, shard=False, width=4, layers=6, rows=12, transposed=False):
        # a deeper lower level: equal layers, an L2 penalty (w ** 2).sum() on every weight
        g = torch.Generator().manual_seed(1)
        X = torch.randn(rows, width, generator=g, dtype=torch.float64)
        y = torch.randn(rows, 1, generator=g, dtype=torch.float64)
        torch.manual_seed(rank)
        net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())],
                            nn.Linear(width, 1)).double()
        hyper = ml.Hyper(log_l2=torch.full((layers,), -2.0, dtype=torch.float64))
        batch = [(X[rank::world], y[rank::world])]

        @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=batch, shard=shard,
                  hypergrad=ml.hypergrad.CG(iters=2, on_divergence="warn", warn_residual=None))
        def inner(net, batch, outer):
            x, t = batch
            out = by_hand(net, x) if transposed else net(x)
            return F.mse_loss(out, t) + sum(outer.log_l2[i].exp() * (net[2 * i].weight ** 2).sum()
                                            for i in range(layers))

        @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=batch, depends_on=[inner])
        def outer(hyper, batch, inner):
            x, t = batch
            return F.mse_loss(inner(x), t)

        return ml.Program(outer), X, y

    METHODS = {"unroll": ml.hypergrad.Unroll(), "cg": ml.hypergrad.CG(iters=4, on_divergence="warn"),
               "finite_diff": ml.hypergrad.FiniteDiff(), "neumann": ml.hypergrad.Neumann(iters=3, alpha=0.1),
               "sama": ml.hypergrad.SAMA(), "unroll_checkpointed": ml.hypergrad.Unroll(checkpoint=2),
               "cg_tol": ml.hypergrad.CG(iters=6, tol=0.1, on_divergence="warn")}  # stops early on a dot product
""")

WORKER = PROBLEM + textwrap.dedent("""
    import os, sys, weakref
    from torch.distributed.tensor import DTensor
    from torch.multiprocessing.reductions import StorageWeakRef
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = sys.argv[1]
    result = {}
    for name, method in METHODS.items():
        prog = build(method, rank, world, shard=True)
        prog.fit(3, progress=False)
        result[name] = {n: prog.params(n) for n in prog.levels}  # gathered: every rank calls it
    # one CG step, counting the elements of the gathered (full) parameters alive at each all-gather
    prog = build(METHODS["cg"], rank, world, shard=True)
    full, alive, peak = prog.sharding._full, [], [0]
    def counting(x, shape):
        t = full(x, shape)
        alive.append(weakref.ref(t))
        peak[0] = max(peak[0], sum(r().numel() for r in alive if r() is not None))
        return t
    prog.sharding._full = counting
    prog.step()
    result["peak_full_elements"], result["gathers"] = peak[0], len(alive)
    # a gradient built with create_graph (what CG's and Neumann's linearization keep): its graph
    # holds the parameters as slices, every full one gathered for it is freed
    gathered = []
    def recording(x, shape):
        t = full(x, shape)
        gathered.append(StorageWeakRef(t.untyped_storage()))
        return t
    prog.sharding._full = recording
    x, t = data()[0]
    state = {n: prog._state[n]["params"] for n in prog.levels}
    with prog.sharding.running():
        slices = {k: v.detach().requires_grad_() for k, v in state["inner"].items()}
        loss, _ = prog._runtime.evaluate("inner", {**state, "inner": slices}, (x[rank::world], t[rank::world]))
        grads = torch.autograd.grad(loss, list(slices.values()), create_graph=True)
        del loss
        result["full_alive_in_graph"] = sum(not r.expired() for r in gathered)
        hvp = torch.autograd.grad(grads, list(slices.values()), [torch.ones_like(g) for g in grads])
    result["graph_gathers"], result["hvp"] = len(gathered), [prog.sharding.full("inner", h) for h in hvp]
    result["hvp_at"], result["hvp_outer"] = prog.params("inner"), prog.params("outer")
    prog.sharding._full = full
    # the second differentiation of a deep sharded loss (a Hessian-vector product), counting the
    # full-size (width²) tensors alive at each op: what waits for its reduce-scatter
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class FullSize(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.alive, self.peak = numel, [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.alive += [StorageWeakRef(t.untyped_storage()) for t in tree_leaves(out)
                           if type(t) is torch.Tensor and t.numel() == self.numel]
            self.alive = [r for r in self.alive if not r.expired()]
            self.peak = max(self.peak, len({r.cdata for r in self.alive}))
            return out

    for key, transposed in (("deep", False), ("deep_transposed", True)):
        deep_prog, X, y = deep(rank, world, shard=True, transposed=transposed)
        state = {n: deep_prog._state[n]["params"] for n in deep_prog.levels}
        with deep_prog.sharding.running():
            slices = {k: v.detach().requires_grad_() for k, v in state["inner"].items()}
            loss, _ = deep_prog._runtime.evaluate("inner", {**state, "inner": slices}, (X[rank::world], y[rank::world]))
            grads = torch.autograd.grad(loss, list(slices.values()), create_graph=True)
            del loss
            counting = FullSize(4 * 4)
            with counting:
                hvp = torch.autograd.grad(grads, list(slices.values()), [torch.ones_like(g) for g in grads])
        result[key] = {"full_peak": counting.peak, "hvp": [deep_prog.sharding.full("inner", h) for h in hvp],
                       "at": deep_prog.params("inner"), "outer": deep_prog.params("outer")}
    # an op that draws (dropout of a weight) is recomputed in its backward pass with the same draws
    dropconnect = prog.sharding.gathered_op(lambda w, x: x @ F.dropout(w, 0.5).T, ((3, 5),))
    w = prog._state["inner"]["params"]["0.weight"].detach().requires_grad_()
    with prog.sharding.running():
        torch.manual_seed(7)
        (g,) = torch.autograd.grad(dropconnect(w, data()[0][0][rank::world]).pow(2).mean(), [w])
    result["dropconnect"] = prog.sharding.full("inner", {"0.weight": w, "grad": g})
    # and under autocast (bf16 on CPU) as its forward pass ran, though the backward pass runs outside
    linear = prog.sharding.gathered_op(F.linear, ((3, 5),))
    w = prog._state["inner"]["params"]["0.weight"].detach().float().requires_grad_()
    with prog.sharding.running():
        with torch.autocast("cpu", torch.bfloat16):
            low = linear(data()[0][0][rank::world].float(), w)  # (not `out`: the result files' path)
        (g,) = torch.autograd.grad(low.float().pow(2).sum(), [w])
    result["autocast"] = prog.sharding.full("inner", {"0.weight": w, "grad": g})
    # unequal shards (7 and 6 examples): each rank's loss, its penalty too, is weighed by its share
    deep_prog = deep(rank, world, shard=True, rows=13)[0]
    deep_prog.fit(2, progress=False)
    result["deep_unequal"] = {n: deep_prog.params(n) for n in deep_prog.levels}
    state = prog._state["inner"]  # what this rank stores of the sharded level
    result["stored"] = {k: (type(v).__name__, tuple(v.to_local().shape)) for k, v in state["params"].items()}
    result["stored_opt"] = {s: {k: (type(v).__name__, tuple(v.to_local().shape)) for k, v in state["opt"][s].items()}
                            for s in ("m", "v")}
    result["module"] = {k: p.numel() for k, p in prog.levels["inner"].level.module.named_parameters()}
    # checkpoint after 2 steps, then 1 more; a fresh sharded program loaded from the file takes the same step
    prog = build(METHODS["unroll"], rank, world, shard=True)
    prog.fit(2, progress=False)
    prog.save(out + ".ckpt")
    prog.step()
    result["continued"] = {n: prog.params(n) for n in prog.levels}
    result["continued_opt"] = prog.state_dict()["levels"]["inner"]["opt"]
    resumed = ml.load(out + ".ckpt", build(METHODS["unroll"], rank, world, shard=True))
    resumed.step()
    result["resumed"] = {n: resumed.params(n) for n in resumed.levels}
    result["resumed_opt"] = resumed.state_dict()["levels"]["inner"]["opt"]
    torch.save(result, out + f".rank{rank}")
    # then rank 1 dies in the middle of a step, at an all-gather of the sharded level
    gather = prog.sharding._full
    calls = [0]
    def dying(x, shape):
        calls[0] += 1
        if rank == 1 and calls[0] == 5:
            os._exit(3)  # a crashed rank: no clean shutdown of the process group
        return gather(x, shape)
    prog.sharding._full = dying
    try:
        for _ in range(100):
            prog.step()
    except ml.distributed.DistributedError:
        print(f"rank 0 failed after rank 1 died", flush=True)
        raise
""")


@pytest.fixture(scope="module")
def reference():
    """One unsharded process on the whole batches, and the problem's namespace."""
    namespace = {}
    exec(PROBLEM, namespace)
    out = {}
    for name, method in namespace["METHODS"].items():
        prog = namespace["build"](method)
        prog.fit(3, progress=False)
        out[name] = {n: prog.params(n) for n in prog.levels}
    prog = namespace["deep"](rows=13)[0]
    prog.fit(2, progress=False)
    out["deep_unequal"] = {n: prog.params(n) for n in prog.levels}
    return out, namespace


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    t0 = time.time()
    procs = _spawn(script, [str(tmp / "result")], timeout_s="10")
    logs = [p.communicate(timeout=150)[0] for p in procs]
    ranks = [torch.load(f"{tmp}/result.rank{r}") if Path(f"{tmp}/result.rank{r}").exists() else None
             for r in range(2)]
    assert None not in ranks, "\n".join(logs)
    return tmp, procs, logs, ranks, time.time() - t0


# CG meets negative curvature on this non-convex lower level: warned alike by both programs
@pytest.mark.filterwarnings("ignore::mlodsl.hypergrad.base.DivergenceWarning")
def test_two_ranks_with_a_sharded_lower_level_equal_one_unsharded_process(two_ranks, reference):
    _, _, _, ranks, _ = two_ranks
    ref, _ = reference
    for name in ("unroll", "cg", "finite_diff", "neumann", "sama", "unroll_checkpointed", "cg_tol", "deep_unequal"):
        for n, params in ref[name].items():
            for k, v in params.items():
                for r in ranks:
                    assert r[name][n][k].shape == v.shape
                    torch.testing.assert_close(r[name][n][k], v, rtol=1e-6, atol=1e-9)


def test_each_rank_stores_half_of_the_sharded_level(two_ranks):
    _, _, _, ranks, _ = two_ranks
    sizes = {"0.weight": 15, "0.bias": 3, "2.weight": 3, "2.bias": 1}
    for r, rank in enumerate(ranks):
        for k, n in sizes.items():
            half = (n + 1) // 2 if r == 0 else n - (n + 1) // 2  # torch.chunk's split of the flattened tensor
            assert rank["stored"][k] == ("DTensor", (half,))
            assert rank["stored_opt"]["m"][k] == rank["stored_opt"]["v"][k] == ("DTensor", (half,))
            assert rank["module"][k] == 0  # the module's full tensors were released


@pytest.mark.filterwarnings("ignore::mlodsl.hypergrad.base.DivergenceWarning")
def test_a_sharded_step_holds_one_layers_full_parameters_at_a_time(two_ranks):
    """Layer 0 (15 + 3 elements) is the largest; all four parameters would be 22."""
    _, _, _, ranks, _ = two_ranks
    for rank in ranks:
        assert rank["gathers"] > 4  # forward passes, backward re-gathers: many all-gathers...
        assert rank["peak_full_elements"] == 15 + 3  # ...of which one layer's are alive at a time


def test_a_graph_built_through_a_sharded_loss_holds_slices(two_ranks, reference):
    """The Hessian-vector product of the inner loss (on the union of the ranks' halves) in the full
    parameters, by hand, against the one taken through the sharded slices and their graph."""
    _, _, _, ranks, _ = two_ranks
    _, namespace = reference
    x, t = namespace["data"]()[0]
    for rank in ranks:
        assert rank["graph_gathers"] > 4  # the forward's gathers and the backward's re-gathers...
        assert rank["full_alive_in_graph"] == 0  # ...none of which the create_graph graph keeps
        net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
        params = {k: v.clone().requires_grad_() for k, v in rank["hvp_at"].items()}
        hyper = rank["hvp_outer"]["log_l2"]  # the upper level's after the step
        out = torch.func.functional_call(net, params, (x,)).squeeze(-1)
        penalty = (hyper.exp() * params["0.weight"] ** 2).sum()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, t) + penalty
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        hvp = torch.autograd.grad(grads, list(params.values()), [torch.ones_like(g) for g in grads])
        for (k, v), h in zip(params.items(), hvp):
            torch.testing.assert_close(rank["hvp"][list(params).index(k)].reshape(v.shape), h, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("key", ["deep", "deep_transposed"])
def test_a_second_differentiation_reduces_each_layers_full_gradient_as_it_arrives(two_ranks, reference, key):
    """A Hessian-vector product through six sharded 4×4 layers (nn.Linear, or x @ w.t() + b by
    hand): at most one layer's full-size (16-element) tensors are alive at once. When the
    second-order contributions went back to the forward pass's gathers (which run last), every
    layer's waited there: 13 at the peak. The product equals the one taken by hand in the full
    parameters on the union of the ranks' batches."""
    _, _, _, ranks, _ = two_ranks
    _, namespace = reference
    for rank in ranks:
        assert 1 <= rank[key]["full_peak"] <= 3  # one layer's: its weight, a contribution (and v gathered)
        net, X, y = namespace["deep"]()
        params = {k: v.clone().requires_grad_() for k, v in rank[key]["at"].items()}
        log_l2 = rank[key]["outer"]["log_l2"]
        module = torch.nn.Sequential(*[m for _ in range(6) for m in (torch.nn.Linear(4, 4), torch.nn.Tanh())],
                                     torch.nn.Linear(4, 1)).double()
        out = torch.func.functional_call(module, params, (X,))
        loss = torch.nn.functional.mse_loss(out, y) + sum(log_l2[i].exp() * (params[f"{2 * i}.weight"] ** 2).sum()
                                                          for i in range(6))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        hvp = torch.autograd.grad(grads, list(params.values()), [torch.ones_like(g) for g in grads])
        for i, (v, h) in enumerate(zip(params.values(), hvp)):
            torch.testing.assert_close(rank[key]["hvp"][i].reshape(v.shape), h, rtol=1e-6, atol=1e-9)


def test_an_op_that_draws_is_recomputed_with_the_same_draws(two_ranks, reference):
    """Dropout of a sharded weight: its backward pass runs the op again; the gradient is that of the
    mask the forward pass drew (the same seed on both ranks), on the union of their batches."""
    _, _, _, ranks, _ = two_ranks
    _, namespace = reference
    x = namespace["data"]()[0][0]
    for rank in ranks:
        w = rank["dropconnect"]["0.weight"].clone().requires_grad_()
        torch.manual_seed(7)
        (expected,) = torch.autograd.grad((x @ torch.nn.functional.dropout(w, 0.5).T).pow(2).mean(), [w])
        assert (expected == 0).any() and (expected != 0).any()  # some weights dropped, some kept
        torch.testing.assert_close(rank["dropconnect"]["grad"].reshape(3, 5), expected, rtol=1e-6, atol=1e-9)


def test_an_op_is_recomputed_under_the_autocast_of_its_forward_pass(two_ranks, reference):
    """A linear layer run under bf16 autocast: the gradient in the slices is the ranks' mean of the
    gradients autocast gives in the full weight (in float32 it differs by bf16's rounding)."""
    _, _, _, ranks, _ = two_ranks
    _, namespace = reference
    x = namespace["data"]()[0][0].float()
    w = ranks[0]["autocast"]["0.weight"].clone().requires_grad_()
    grads = []
    for half in (x[0::2], x[1::2]):
        with torch.autocast("cpu", torch.bfloat16):
            out = torch.nn.functional.linear(half, w)
        grads.append(torch.autograd.grad(out.float().pow(2).sum(), [w])[0])
    expected = (grads[0] + grads[1]) / 2
    in_fp32 = sum(torch.autograd.grad(torch.nn.functional.linear(h, w).pow(2).sum(), [w])[0]
                  for h in (x[0::2], x[1::2])) / 2
    assert (expected - in_fp32).abs().max() > 1e-3  # autocast matters here
    for rank in ranks:
        torch.testing.assert_close(rank["autocast"]["grad"].reshape(3, 5), expected, rtol=1e-6, atol=1e-6)


def test_gather_at_use_gathers_each_parameter_just_before_its_op():
    """A loss whose weight is read again at its end: re-gathered there, not held across the layers."""
    from torch import fx
    from mlodsl.sharding import gather_at_use

    def loss(x, w1, b1, w2):
        return (torch.tanh(x @ w1 + b1) @ w2).sum() + (w1 ** 2).sum()

    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 2)}
    alive, events = [], []

    def all_gather(flat, shape):  # stands in for the collective: a reshape of the "slice"
        full = flat.reshape(shape) * 1.0
        alive.append(weakref.ref(full))
        events.append((shape, sum(r().numel() for r in alive if r() is not None)))
        return full

    gm = fx.GraphModule(torch.nn.Module(), gather_at_use(fx.symbolic_trace(loss).graph, shapes, all_gather))
    # the square of a gathered weight is a product, whose graph-building backward saves the weight
    # (a slice, in a step) rather than a new 2 * w
    squares = [n for n in gm.graph.nodes if n.target in (operator.pow, operator.mul)]
    assert len(squares) == 1 and squares[0].target is operator.mul
    assert squares[0].args[0] is squares[0].args[1] and squares[0].args[0].target is all_gather
    g = torch.Generator().manual_seed(0)
    x, w1, b1, w2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 3), (3, 4), (4,), (4, 2)))
    flat = [t.reshape(-1).requires_grad_() for t in (w1, b1, w2)]
    with torch.no_grad():  # a step's autograd would save w2 for the matmul's backward: as a slice
        gm(x, *flat)  # (Sharding.running's hooks), which this graph alone does not do
    # the gathers in order (w1 again for the last term), each with what is alive at that moment:
    # w1 and b1 are used by separate ops here, so w1 is already dropped when b1 is gathered
    assert events == [((3, 4), 12), ((4,), 4), ((4, 2), 8), ((3, 4), 12)]
    out = gm(x, *flat)
    ref = [t.detach().requires_grad_() for t in (w1, b1, w2)]
    expected = loss(x, *ref)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, flat)
    for gr, r, t in zip(grads, torch.autograd.grad(expected, ref), (w1, b1, w2)):
        torch.testing.assert_close(gr, r.reshape(-1))


def test_gather_at_use_on_an_aten_graph():
    """A level captured by make_fx (aten ops): the same placement, and its square a product."""
    from torch import fx
    from torch.fx.experimental.proxy_tensor import make_fx
    from mlodsl.sharding import gather_at_use

    def loss(x, w1, w2):
        return (torch.tanh(x @ w1) @ w2).sum() + (w1 ** 2).sum()

    g = torch.Generator().manual_seed(1)
    x, w1, w2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 3), (3, 4), (4, 2)))
    captured = make_fx(loss)(x, w1, w2)
    assert any(n.target is torch.ops.aten.pow.Tensor_Scalar for n in captured.graph.nodes)
    names = [n.target for n in captured.graph.nodes if n.op == "placeholder"]
    shapes = {names[1]: (3, 4), names[2]: (4, 2)}
    order = []

    def all_gather(flat, shape):
        order.append(shape)
        return flat.reshape(shape)

    gm = fx.GraphModule(captured, gather_at_use(captured.graph, shapes, all_gather))
    assert not any(n.target is torch.ops.aten.pow.Tensor_Scalar for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, w1.reshape(-1), w2.reshape(-1)), loss(x, w1, w2), rtol=0, atol=0)
    assert order == [(3, 4), (4, 2), (3, 4)]


def test_a_gathered_checkpoint_resumes_bit_exactly_and_loads_unsharded(two_ranks, reference):
    tmp, _, _, ranks, _ = two_ranks
    for rank in ranks:
        for n, params in rank["continued"].items():
            for k, v in params.items():
                assert torch.equal(rank["resumed"][n][k], v)
        for s in ("m", "v"):
            for k, v in rank["continued_opt"][s].items():
                assert torch.equal(rank["resumed_opt"][s][k], v)
    # the file holds full tensors: an unsharded single process loads it and takes the same step
    _, namespace = reference
    single = ml.load(f"{tmp}/result.ckpt", namespace["build"](namespace["METHODS"]["unroll"]))
    assert single.params("inner")["0.weight"].shape == (3, 5)
    single.step()
    for n, params in ranks[0]["continued"].items():
        for k, v in params.items():
            torch.testing.assert_close(single.params(n)[k], v, rtol=1e-6, atol=1e-9)


def test_when_a_rank_dies_the_other_fails_in_the_sharded_collectives(two_ranks):
    _, procs, logs, _, seconds = two_ranks
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0, logs[0]
    assert "DistributedError" in logs[0] and "another rank died" in logs[0]
    assert "of a sharded level failed" in logs[0] and "rank 0 failed" in logs[0]
    assert seconds < 140


def test_sharding_refuses_what_it_is_not_built_for():
    """Checked before any process group is needed: the refusals name the level and the fix."""
    from mlodsl.sharding import check
    from mlodsl.graph import ProgramError
    net, hyper = torch.nn.Linear(2, 1), ml.Hyper(a=torch.zeros(1))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), shard=True, hypergrad=ml.hypergrad.Forward())
    def inner(net, outer):
        return (net.weight ** 2).sum() * outer.a.sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner], shard=True)
    def outer(hyper, inner):
        return inner.weight.sum()

    levels = {"inner": inner, "outer": outer}
    with pytest.raises(ProgramError, match="level 'outer' has shard=True, but it has lower levels"):
        check(levels, {"outer": ("inner",), "inner": ()}, {}, False)
    with pytest.raises(ProgramError, match="level 'inner' has shard=True, but compile=True"):
        check({"inner": inner}, {}, {}, True)
    with pytest.raises(ProgramError, match="level 'inner' is differentiated by Forward.*torch.func.jvp.*Fix: Unroll"):
        check({"inner": inner}, {}, {"inner": inner.hypergrad}, False)
    with pytest.raises(ProgramError, match="level 'inner' is differentiated by Nystrom.*Fix: CG or Neumann"):
        check({"inner": inner}, {}, {"inner": ml.hypergrad.Nystrom(rank=2)}, False)


REFUSED = PROBLEM + textwrap.dedent("""
    import os
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        build(ml.hypergrad.CG(iters=2, low_memory=True), rank, world, shard=True)
    except ml.ProgramError as err:
        print("REFUSED:", err, flush=True)
""")


def test_reverse_over_forward_on_a_sharded_level_is_refused_at_build(tmp_path):
    """A DTensor slice takes no forward-mode tangent: CG(low_memory=True) on a sharded level is
    refused when the Program is built, on every rank, not in its first step."""
    script = tmp_path / "refused.py"
    script.write_text(REFUSED)
    logs = [p.communicate(timeout=120)[0] for p in _spawn(script, [], timeout_s="30")]
    for log in logs:
        refused = [line for line in log.splitlines() if line.startswith("REFUSED:")]
        assert refused, log
        assert "level 'inner'" in refused[0] and "shard=True" in refused[0] and "low_memory=False" in refused[0]


def test_gather_at_use_makes_each_op_on_sharded_parameters_one_gathered_op():
    """With ``gathered_op``, an op that reads slices is replaced by one call that gathers them itself
    (forward and backward). Ops that only read an attribute, change an argument in place or read a
    buffer (which a recomputation would update twice) get a plain gather before them instead."""
    from torch import fx
    from mlodsl.sharding import gather_at_use

    def loss(x, w1, b1, w2, running):
        h = torch.tanh(torch.nn.functional.linear(x, w1, b1))
        h.add_(b1)  # in place: reads b1, writes h
        torch.mul(h, b1, out=h)  # so is a call with out=
        n = w2.size(0)
        return (h @ w2).sum() / n + torch.addcmul(running, h[0], b1).sum()

    shapes = {"w1": (4, 3), "b1": (4,), "w2": (4, 2)}
    wrapped, gathered = [], []

    def gathered_op(fn, op_shapes, views=()):
        def run(*args, **kwargs):
            return fn(*args, **kwargs)

        wrapped.append((getattr(fn, "__name__", fn), op_shapes))
        return run

    def all_gather(flat, shape):
        gathered.append(shape)
        return flat.reshape(shape)

    graph = gather_at_use(fx.symbolic_trace(loss).graph, shapes, all_gather, gathered_op, keep={"running"})
    assert wrapped == [("linear", ((4, 3), (4,))), ("matmul", ((4, 2),))]  # fn and its slices' shapes, in order
    gm = fx.GraphModule(torch.nn.Module(), graph)
    g = torch.Generator().manual_seed(0)
    x, w1, b1, w2, running = (torch.randn(s, generator=g, dtype=torch.float64)
                              for s in ((5, 3), (4, 3), (4,), (4, 2), (4,)))
    out = gm(x, w1, b1, w2, running.clone())  # (the stand-ins take full tensors as they come)
    # b1 for add_ and out= (one gather, shared), w2 for size, b1 again for addcmul with the buffer
    assert gathered == [(4,), (4, 2), (4,)]
    torch.testing.assert_close(out, loss(x, w1, b1.clone(), w2, running.clone()))


def test_an_l2_penalty_of_a_sharded_parameter_is_summed_on_its_slices():
    """``(w ** 2).sum()``, ``torch.sum(w * w)`` and ``w.pow(2).sum()`` become ``sum_of_squares(w)``;
    a weighted square, or a square that is also used elsewhere, is left to the gathers."""
    from torch import fx
    from mlodsl.sharding import sum_squares_on_slices

    def loss(w, v, u, c, t):
        q = t ** 2
        return (w ** 2).sum() + torch.sum(v * v) + u.pow(2).sum() + (c * w ** 2).sum() + q.sum() + q.mean()

    calls = []

    def sum_of_squares(p):
        calls.append(tuple(p.shape))
        return (p * p).sum()

    graph = sum_squares_on_slices(fx.symbolic_trace(loss).graph, {"w", "v", "u", "t"}, sum_of_squares)
    assert sum(n.target is sum_of_squares for n in graph.nodes) == 3
    gm = fx.GraphModule(torch.nn.Module(), graph)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 2), (4,), (2, 2), (3, 2), (5,))]
    torch.testing.assert_close(gm(*args), loss(*args))
    assert calls == [(3, 2), (4,), (2, 2)]


def test_gather_at_use_hands_a_view_of_a_sharded_parameter_to_the_op_that_reads_it():
    """``x @ w.t()``, ``h @ w2.T.contiguous()``: the view is taken inside the op's GatheredOp (which
    then gathers the slice itself, in its backward too), not made an op of its own; a user that
    cannot take it (the loss's output) gets the view as a GatheredOp of its own."""
    from torch import fx
    from torch.utils._pytree import tree_flatten, tree_unflatten
    from mlodsl.sharding import gather_at_use

    def loss(x, w1, w2):
        h = torch.tanh(x @ w1.t())
        return (h @ w2.T.contiguous()).sum(), w1.view(-1)

    shapes = {"w1": (4, 3), "w2": (2, 4)}
    wrapped = []

    def gathered_op(fn, op_shapes, views=()):
        def run(*args, **kwargs):  # stands in for GatheredOp: full tensors in, the views applied
            leaves, spec = tree_flatten((args, kwargs))
            at = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and a.shape in op_shapes]
            for i, view in zip(at, views):
                leaves[i] = leaves[i] if view is None else view(leaves[i])
            a, k = tree_unflatten(leaves, spec)
            return fn(*a, **k)

        wrapped.append((getattr(fn, "__name__", fn), op_shapes, len(views)))
        return run

    graph = gather_at_use(fx.symbolic_trace(loss).graph, shapes, lambda f, s: f.reshape(s), gathered_op)
    assert wrapped == [("matmul", ((4, 3),), 1), ("matmul", ((2, 4),), 1), ("_itself", ((4, 3),), 1)]
    assert not any(n.op == "call_method" and n.target in ("t", "contiguous") for n in graph.nodes)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 3), (4, 3), (2, 4)))
    for got, expected in zip(gm(x, w1, w2), loss(x, w1, w2)):
        torch.testing.assert_close(got, expected)
