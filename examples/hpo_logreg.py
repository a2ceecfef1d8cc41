"""Per-feature L2 regularization for logistic regression, learned by hypergradient descent.

Betty's hello world, written as two mlodsl levels. The data are Betty's: 1000 points in 20
dimensions, labels from a random linear model with a little noise, half for training, half for
validation (plus 1000 fresh points from the same model for a test accuracy).

    inner: logistic regression w (no bias, starts at 0) on the training half, 100 SGD steps
           (lr 0.1) per outer step, loss = BCE + 0.5 * sum_i exp(log_l2_i) * w_i^2
    outer: log_l2 (starts at 0, so every penalty starts at 1 as in Betty) on the validation half,
           Adam, loss = BCE of the inner solution; its gradient is a hypergradient through the
           100 inner steps.

    python examples/hpo_logreg.py                      # Unroll, 200 outer steps, 1 thread
    python examples/hpo_logreg.py --method forward --iters 50
    python examples/hpo_logreg.py --compile            # torch.compile the step's regions
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml

DATA_NUM, DATA_DIM, TEST_NUM = 1000, 20, 1000


def make_data(seed: int = 0):
    """Betty's hello-world data (same draws, in the same order, from NumPy's global generator).

    Returns ``(train, val, test, w_gt)``; each split is a float32 ``(x, y)`` pair.
    """
    np.random.seed(seed)
    w_gt = np.random.randn(DATA_DIM)
    x = np.random.randn(DATA_NUM, DATA_DIM)
    y = ((x @ w_gt + 0.1 * np.random.randn(DATA_NUM)) > 0).astype(float)
    x_test = np.random.randn(TEST_NUM, DATA_DIM)                 # drawn after Betty's data
    y_test = ((x_test @ w_gt + 0.1 * np.random.randn(TEST_NUM)) > 0).astype(float)
    h = DATA_NUM // 2

    def split(xs, ys):
        return torch.from_numpy(xs).float(), torch.from_numpy(ys).float()

    return split(x[:h], y[:h]), split(x[h:], y[h:]), split(x_test, y_test), w_gt


def methods() -> dict:
    """The hypergradient methods this example can use, by command-line name."""
    table = {"unroll": lambda: ml.hypergrad.Unroll(),
             "forward": lambda: ml.hypergrad.Forward(),
             "firstorder": lambda: ml.hypergrad.FirstOrder()}
    if hasattr(ml.hypergrad, "CG"):                              # Betty's choice: CG, 3 iterations
        table["cg"] = lambda: ml.hypergrad.CG(iters=3)
    if hasattr(ml.hypergrad, "Neumann"):
        table["neumann"] = lambda: ml.hypergrad.Neumann(iters=3, alpha=0.1)
    if hasattr(ml.hypergrad, "FiniteDiff"):                      # Betty's "darts"
        table["darts"] = lambda: ml.hypergrad.FiniteDiff(eps=0.01)
    return table


def build(train, val, *, inner_steps=100, method="unroll", inner_lr=0.1, outer_lr=0.1, restart=False, seed=0,
          compile=False):
    """The two-level program. Returns ``(prog, net, hyper)``.

    ``restart=True`` starts every inner solve from w = 0 (Betty's ``on_inner_loop_start``); the
    default warm-starts it from the previous outer step's solution.
    """
    net = nn.Linear(DATA_DIM, 1, bias=False)
    nn.init.zeros_(net.weight)                                   # Betty's ChildNet starts at 0
    hyper = ml.Hyper(log_l2=torch.zeros(DATA_DIM))               # exp(0) = 1: Betty's ParentNet

    @ml.level(net, optimizer=ml.optim.sgd(lr=inner_lr), data=train, steps=inner_steps,
              hypergrad=methods()[method](), start_from="init" if restart else None)
    def inner(net, batch, outer):
        x, y = batch
        fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
        return fit + 0.5 * (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.adam(lr=outer_lr), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

    return ml.Program(outer, seed=seed, compile=compile), net, hyper


@torch.no_grad()
def evaluate_w(w, data):
    """(loss, accuracy) of the logistic regression with weights ``w`` (no bias) on ``data``."""
    x, y = data
    logits = x @ w.reshape(-1)
    return F.binary_cross_entropy_with_logits(logits, y).item(), ((logits > 0).float() == y).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200, help="outer steps (default 200)")
    ap.add_argument("--inner-steps", type=int, default=100, help="inner SGD steps per outer step (default 100)")
    ap.add_argument("--method", choices=sorted(methods()), default="unroll", help="hypergradient method")
    ap.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate of log_l2 (default 0.1)")
    ap.add_argument("--restart", action="store_true",
                    help="start every inner solve from w = 0, as Betty's hello world does (default: warm start)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and of torch (default 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--compile", action="store_true", help="compile the step's regions with torch.compile")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    train, val, test, w_gt = make_data(args.seed)
    prog, net, hyper = build(train, val, inner_steps=args.inner_steps, method=args.method,
                             outer_lr=args.outer_lr, restart=args.restart, seed=args.seed, compile=args.compile)
    print(f"mlodsl {ml.__version__}, torch {torch.__version__}, {args.threads} thread(s); "
          f"method {args.method}, {args.inner_steps} inner steps per outer step"
          + (", each inner solve from w = 0" if args.restart else ", warm-started inner solves"))
    print(prog.schedule)

    stamps = [time.perf_counter()]
    prog.fit(args.iters, callbacks=[lambda prog, row: stamps.append(time.perf_counter())],
             progress=not args.no_progress)
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    warm = times[min(5, len(times) // 2):] or times              # drop the first steps (warm-up)
    print(f"time per outer step: {1e3 * statistics.median(warm):.2f} ms "
          f"(median of {len(warm)} steps after warm-up; first step {1e3 * times[0]:.1f} ms)")

    val_loss, val_acc = evaluate_w(net.weight, val)
    _, train_acc = evaluate_w(net.weight, train)
    _, test_acc = evaluate_w(net.weight, test)
    first, last = prog.history[0], prog.history[-1]
    print(f"outer (validation) loss: {first['outer']:.4f} at step 1 -> {last['outer']:.4f} at step {last['step']}")
    print(f"final validation loss {val_loss:.4f}, validation accuracy {val_acc:.4f}")
    print(f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}")

    lam = hyper.log_l2.detach().exp()
    print(f"learned L2 penalties exp(log_l2): min {lam.min():.3g}, median {lam.median():.3g}, "
          f"max {lam.max():.3g} (all started at 1)")
    order = np.argsort(np.abs(w_gt))
    print("feature  |w_gt|  penalty   (weakest true features first)")
    for i in order:
        print(f"{i:7d}  {abs(w_gt[i]):6.3f}  {lam[i].item():8.3g}")
    return prog


if __name__ == "__main__":
    main()
