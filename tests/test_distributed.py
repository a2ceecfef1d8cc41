"""Data parallel on torch.distributed (gloo, CPU): two ranks on two halves of every batch give the
parameters one process gives on the whole batches; a dead rank makes the others fail, not hang."""
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mlodsl as ml

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TESTS = str(Path(__file__).parent)

PROBLEM = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch import nn
    import mlodsl as ml

    def data(seed=0):
        g = torch.Generator().manual_seed(seed)
        X, w = torch.randn(160, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
        y = (X @ w + 0.5 * torch.randn(160, generator=g, dtype=torch.float64) > 0).double()
        return [(X[i:i + 20], y[i:i + 20]) for i in range(0, 160, 20)]

    def build(method, rank=0, world=1, seed=0, unequal=False):
        batches = data()
        shard = [(x[rank::world], y[rank::world]) for x, y in batches]  # every rank: its half of each batch
        if unequal:  # two ranks: 7 + i of batch i's 20 examples to rank 0, the rest to rank 1
            shard = [(x[:7 + i], y[:7 + i]) if rank == 0 else (x[7 + i:], y[7 + i:])
                     for i, (x, y) in enumerate(batches)]
        torch.manual_seed(seed + rank)  # different initial values per rank: rank 0's are broadcast
        net = nn.Linear(5, 1).double()
        hyper = ml.Hyper(log_l2=torch.full((5,), -2.0, dtype=torch.float64))

        @ml.level(net, optimizer=ml.optim.sgd(lr=0.5, momentum=0.5), data=shard[:4], steps=3, hypergrad=method)
        def inner(net, batch, outer):
            x, t = batch
            return F.binary_cross_entropy_with_logits(net(x).squeeze(-1), t) + \\
                (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

        @ml.level(hyper, optimizer=ml.optim.adam(lr=0.05), data=shard[4:], depends_on=[inner])
        def outer(hyper, batch, inner):
            x, t = batch
            return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), t)

        return ml.Program(outer)

    METHODS = {"unroll": ml.hypergrad.Unroll(), "cg": ml.hypergrad.CG(iters=4)}
""")

WORKER = PROBLEM + textwrap.dedent("""
    import os, sys, time
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = sys.argv[1]
    if True:  # two ranks equal one process on the union of their shards
        result = {}
        for name, method in METHODS.items():
            prog = build(method, rank, world)
            assert prog.distributed is not None and prog.distributed.world_size == world
            prog.fit(3, progress=True)
            result[name] = {n: prog.params(n) for n in prog.levels}
            result[name + "/loss"] = prog.history[-1]["outer"]
            prog.save(out + f".{name}.ckpt")  # rank 0 writes, every rank waits
            prog = build(method, rank, world, unequal=True)
            prog.fit(3, progress=False)
            result[name + "/unequal"] = {n: prog.params(n) for n in prog.levels}
            result[name + "/unequal/loss"] = prog.history[-1]["outer"]
        torch.save(result, out + f".rank{rank}")
    if True:  # then rank 1 dies: rank 0 must fail, not hang
        prog = build(METHODS["unroll"], rank, world)
        prog.step()
        if rank == 1:
            os._exit(3)  # a crashed rank: no clean shutdown of the process group
        t0 = time.time()
        try:
            for _ in range(1000):
                prog.step()
        except ml.distributed.DistributedError as err:
            print(f"rank 0 failed {time.time() - t0:.1f}s after rank 1 died", flush=True)
            raise
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(script, args, world=2, timeout_s="20"):
    """``world`` processes with the environment torchrun gives its workers."""
    procs = []
    port = _free_port()
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "MLODSL_DIST_TIMEOUT": timeout_s, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _reference():
    namespace = {}
    exec(PROBLEM, namespace)
    out = {}
    for name, method in namespace["METHODS"].items():
        prog = namespace["build"](method)
        prog.fit(3, progress=False)
        out[name] = {n: prog.params(n) for n in prog.levels}
        out[name + "/loss"] = prog.history[-1]["outer"]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One run of two ranks (one start-up for both tests): 3 steps each of Unroll and CG, then
    rank 1 exits abruptly in the middle of a further run."""
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    t0 = time.time()
    procs = _spawn(script, [str(tmp / "result")], timeout_s="10")
    logs = [p.communicate(timeout=90)[0] for p in procs]
    return tmp, procs, logs, time.time() - t0


def test_two_ranks_equal_one_process_on_the_union_of_their_shards(two_ranks):
    tmp, procs, logs, _ = two_ranks
    out = str(tmp / "result")
    assert all(Path(f"{out}.rank{r}").exists() for r in range(2)), "\n".join(logs)
    assert "fit" in logs[0] and "fit" not in logs[1]  # the progress bar is rank 0's only
    ref = _reference()
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    for name in ("unroll", "cg"):
        for n, params in ref[name].items():
            for k, v in params.items():
                for r in ranks:
                    torch.testing.assert_close(r[name][n][k], v, rtol=1e-6, atol=1e-9)
        # losses in the history are the ranks' mean: the union's loss (mean loss, equal shards)
        assert ranks[0][name + "/loss"] == pytest.approx(ref[name + "/loss"], rel=1e-9)
        ckpt = torch.load(f"{out}.{name}.ckpt", weights_only=True)["state"]  # written by rank 0
        torch.testing.assert_close(ckpt["levels"]["outer"]["params"]["log_l2"], ref[name]["outer"]["log_l2"])
    assert not list(tmp.glob("*.tmp"))


def test_unequal_shards_are_weighted_by_examples_as_one_process_on_the_concatenated_batches(two_ranks):
    """Rank 0 holds 7..14 of each batch's 20 examples, rank 1 the rest: an unweighted mean of the
    ranks' mean losses would be off by percents; weighted by examples it is the union's."""
    tmp, _, logs, _ = two_ranks
    out = str(tmp / "result")
    assert all(Path(f"{out}.rank{r}").exists() for r in range(2)), "\n".join(logs)
    ref = _reference()
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    for name in ("unroll", "cg"):
        for n, params in ref[name].items():
            for k, v in params.items():
                for r in ranks:
                    torch.testing.assert_close(r[name + "/unequal"][n][k], v, rtol=1e-10, atol=1e-10)
        assert ranks[0][name + "/unequal/loss"] == pytest.approx(ref[name + "/loss"], rel=1e-10)


def test_when_a_rank_dies_the_others_fail_instead_of_hanging(two_ranks):
    _, procs, logs, seconds = two_ranks
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0, logs[0]
    assert "DistributedError" in logs[0] and "another rank died" in logs[0]
    assert "rank 0 failed" in logs[0] and seconds < 80


def test_a_single_process_runs_without_a_process_group():
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    assert ml.distributed.setup() is None


def test_a_batch_size_with_two_weights_in_a_step_makes_its_level_ask_at_every_evaluation():
    """A rank's weight is tabulated by batch size; where one size has two weights in a step (the
    ranks' totals differ), the table cannot say which, and the level all-reduces its counts instead."""
    from mlodsl.distributed import _weights_by_size
    assert _weights_by_size([(7, 20), (13, 20), (7, 20)], world=2) == {7: 0.7, 13: 1.3}
    assert _weights_by_size([(10, 20), (10, 30)], world=2) is None
    assert _weights_by_size([(-1, 0), (5, 10)], world=2) == {5: 1.0}  # a batch without tensors is not weighed
