"""B6: a meta-batch of 25 tasks as one vmapped computation (``tasks=True``) against a Python loop.

MAML on sinusoid regression (MLP 1-40-40-1, 5 inner SGD steps, 10 shots): the time of one outer
hypergradient with ``tasks=True`` against 25 single-task programs of the same levels, one after the
other (the same math: their mean is the vmapped hypergradient, checked).

    python benchmarks/b6_tasks.py [--tasks 25] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import mlodsl as ml


def mse(a, b):
    return ((a - b) ** 2).mean()


def program(meta, support, query, tasks: bool, method):
    fast = copy.deepcopy(meta)

    @ml.level(fast, optimizer=ml.optim.sgd(lr=0.01), data=support, steps=5, hypergrad=method,
              start_from="outer", tasks=tasks)
    def inner(fast, batch):
        x, y = batch
        return mse(fast(x), y)

    @ml.level(meta, optimizer=ml.optim.adam(lr=1e-3), data=query, depends_on=[inner])
    def outer(meta, batch, inner):
        x, y = batch
        return mse(inner(x), y)

    return ml.Program(outer)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", type=int, default=25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, shots = args.tasks, 10
    amp, phase = 0.1 + 4.9 * torch.rand(T, 1, 1), 3.14 * torch.rand(T, 1, 1)
    xs, xq = 10 * torch.rand(T, shots, 1) - 5, 10 * torch.rand(T, shots, 1) - 5
    support, query = (xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase))
    meta = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    for name, method in (("Unroll", ml.hypergrad.Unroll()), ("FirstOrder", ml.hypergrad.FirstOrder())):
        batched = program(meta, support, query, True, method)
        singles = [program(meta, (xs[t], support[1][t]), (xq[t], query[1][t]), False, method) for t in range(T)]
        g = batched.hypergradient("outer")
        loop = [s.hypergradient("outer") for s in singles]
        err = max(float((g[k] - sum(h[k] for h in loop) / T).abs().max()) for k in g)
        tv, tl = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            batched.hypergradient("outer")
            tv.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for s in singles:
                s.hypergradient("outer")
            tl.append(time.perf_counter() - t0)
        v, lp = statistics.median(tv), statistics.median(tl)
        print(f"B6 {name:10s} {T} tasks: vmapped {1e3 * v:8.1f} ms, loop {1e3 * lp:8.1f} ms, "
              f"vmapped/loop {v / lp:.2f}  (max |difference| {err:.1e})")


if __name__ == "__main__":
    main()
