"""Hyperparameter optimization through the optimizer: per-feature L2 penalties together with the
inner SGD's learning rate and weight decay, all learned by differentiating through the updates.

The data are Betty's hello world (as in hpo_logreg.py): 1000 points in 20 dimensions, labels from a
random linear model, half training, half validation, plus 1000 test points.

    inner: logistic regression w, restarted from 0 every outer step (start_from="init"), ``--inner-steps``
           SGD steps with lr = exp(log_lr) and weight decay exp(log_wd), both read from the outer level;
           loss = BCE + 0.5 sum_i exp(log_l2_i) w_i^2
    outer: (log_lr, log_wd, log_l2) in one ml.Hyper, Adam; loss = validation BCE after the inner steps,
           through all of them (Unroll): the gradient w.r.t. log_lr and log_wd goes through every SGD update

Baselines: the starting hyperparameters (lr 0.1, weight decay 1e-3, every L2 penalty 1), and the best
of a 6 x 5 grid over the learning rate and one L2 strength shared by all features (weight decay is
the same knob under SGD), chosen on the validation loss.

    python examples/hpo_optimizer.py                       # ~20 s
    python examples/hpo_optimizer.py --iters 500 --inner-steps 100
"""
from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.hpo_logreg import DATA_DIM, evaluate_w, make_data

LR0, WD0 = 0.1, 1e-3


def build(train, val, *, inner_steps=30, outer_lr=0.05):
    """Returns ``(prog, net, hyper)``; ``hyper`` holds log_lr, log_wd and log_l2."""
    net = nn.Linear(DATA_DIM, 1, bias=False)
    nn.init.zeros_(net.weight)
    hyper = ml.Hyper(log_lr=torch.tensor(math.log(LR0)), log_wd=torch.tensor(math.log(WD0)),
                     log_l2=torch.zeros(DATA_DIM))
    opt = ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), weight_decay=lambda outer: outer.log_wd.exp())

    @ml.level(net, optimizer=opt, data=train, steps=inner_steps, hypergrad=ml.hypergrad.Unroll(),
              start_from="init")
    def inner(net, batch, outer):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        return fit + 0.5 * (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.adam(lr=outer_lr), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        logits = inner(x).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, y), {"acc": ((logits > 0).float() == y).float().mean()}

    return ml.Program(outer, seed=0), net, hyper


def train_fixed(train, lr, wd, steps, l2=None):
    """The inner problem alone with fixed hyperparameters; returns w."""
    l2 = torch.ones(DATA_DIM) if l2 is None else l2
    w = torch.zeros(DATA_DIM)
    x, y = train
    for _ in range(steps):
        w = w.detach().requires_grad_()
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (l2 * w ** 2).sum()
        g, = torch.autograd.grad(loss, w)
        w = w - lr * (g + wd * w)
    return w.detach()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200, help="outer steps (default 200)")
    ap.add_argument("--inner-steps", type=int, default=30, help="inner SGD steps from 0 per outer step (default 30)")
    ap.add_argument("--outer-lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train, val, test, _ = make_data(args.seed)
    prog, net, hyper = build(train, val, inner_steps=args.inner_steps, outer_lr=args.outer_lr)
    print(prog.schedule)
    prog.fit(args.iters, progress=False)
    lr, wd, l2 = hyper.log_lr.exp().item(), hyper.log_wd.exp().item(), hyper.log_l2.detach().exp()
    print(f"learned: lr {LR0} -> {lr:.3g}, weight decay {WD0} -> {wd:.3g}, L2 penalties min {l2.min():.3g} "
          f"median {l2.median():.3g} max {l2.max():.3g} (from 1)")

    rows = {"start (lr 0.1, wd 1e-3, L2 1)": train_fixed(train, LR0, WD0, args.inner_steps)}
    # the grid: learning rate x one shared L2 strength (weight decay is the same knob under SGD)
    grid = {(g_lr, g_l2): train_fixed(train, g_lr, 0.0, args.inner_steps, torch.full((DATA_DIM,), g_l2))
            for g_lr, g_l2 in itertools.product((0.03, 0.1, 0.3, 1.0, 3.0, 10.0), (1.0, 0.1, 0.01, 1e-3, 0.0))}
    best = min(grid, key=lambda k: evaluate_w(grid[k], val)[0])
    rows[f"grid best (lr {best[0]}, shared L2 {best[1]})"] = grid[best]
    rows["learned (lr, wd, L2) by hypergradient"] = train_fixed(train, lr, wd, args.inner_steps, l2)
    print(f"{'after ' + str(args.inner_steps) + ' SGD steps from 0':42s}  val loss  val acc  test acc")
    for name, w in rows.items():
        vl, va = evaluate_w(w, val)
        print(f"{name:42s}  {vl:8.4f}  {va:7.4f}  {evaluate_w(w, test)[1]:8.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return prog


if __name__ == "__main__":
    main()
