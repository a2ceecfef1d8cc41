"""DARTS (Liu et al. 2019) on digits: a small cell whose edges mix candidate operations with softmax
architecture weights, searched first-order and second-order.

The supernet: stem Linear(64, 32) + ReLU gives node 0; node 1 = mix(0 -> 1)(node 0); node 2 =
mix(0 -> 2)(node 0) + mix(1 -> 2)(node 1); a linear head reads node 2. Each mix is
sum_k softmax(alpha_e)_k op_k(h) over OPS (zero, skip, linear + ReLU, linear + tanh, linear).

    weights (lower): the supernet's weights, SGD with momentum on the search-train half, one step per
                     architecture step (DARTS alternates)
    arch (upper):    alpha (3 edges x 5 ops, ml.Hyper, start at 0), Adam, on the search-validation
                     half; its loss goes through the supernet's weights:
                       first order:  FirstOrder()  (only the direct dependence on alpha)
                       second order: DARTS's xi * FiniteDiff: mlodsl's FiniteDiff computes -B v
                                     without the inner learning rate xi (docs/hypergradients.md);
                                     DARTS's one-step look-ahead multiplies it by xi, which a
                                     three-line user-defined method restores

After the search the cell is made discrete (the strongest non-zero op per edge) and retrained from
scratch on the whole training pool. Baseline: the same supernet with alpha frozen at uniform
(no search), retrained the same way.

    python examples/darts_digits.py                         # 400 steps per search, ~1 min
    python examples/darts_digits.py --iters 2000 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, balanced_accuracy, digits, sampler

OPS = ["zero", "skip", "linear+relu", "linear+tanh", "linear"]
EDGES = ["0->1", "0->2", "1->2"]
WIDTH = 32


class MixedOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu, self.tanh, self.lin = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, h, weights):                    # weights: softmax over OPS, shape (5,)
        outs = [torch.zeros_like(h), h, F.relu(self.relu(h)), torch.tanh(self.tanh(h)), self.lin(h)]
        return (weights[:, None, None] * torch.stack(outs)).sum(0)   # no Python loop over a tensor: fx traces it


class SuperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(64, WIDTH)
        self.edges = nn.ModuleList(MixedOp() for _ in EDGES)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x, alpha):                      # alpha: (edges, ops) logits
        w = torch.softmax(alpha, dim=-1)
        h0 = F.relu(self.stem(x))
        h1 = self.edges[0](h0, w[0])
        h2 = self.edges[1](h0, w[1]) + self.edges[2](h1, w[2])
        return self.head(h2)


class DartsSecondOrder(ml.hypergrad.FiniteDiff):
    """DARTS's second-order term: xi * FiniteDiff (a user-defined method on the documented interface)."""

    def __init__(self, xi, eps=0.01):
        super().__init__(eps)
        self.xi = xi

    def vjp(self, traj, cotangent):
        return {k: self.xi * v for k, v in super().vjp(traj, cotangent).items()}


def supernet(seed):
    torch.manual_seed(seed)
    return SuperNet()


def build_search(train, val, *, order=1, seed=0, batch=100, lr=0.05, arch_lr=0.01):
    """The two-level search program. Returns ``(prog, net, arch)``."""
    net, arch = supernet(seed), ml.Hyper(alpha=torch.zeros(len(EDGES), len(OPS)))
    method = ml.hypergrad.FirstOrder() if order == 1 else DartsSecondOrder(xi=lr)

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr, momentum=0.9, weight_decay=3e-4),
              data=sampler(train, batch, seed), hypergrad=method)
    def weights(net, batch, search):
        x, y = batch
        return F.cross_entropy(net(x, search.alpha), y)

    @ml.level(arch, optimizer=ml.optim.adam(lr=arch_lr, betas=(0.5, 0.999), weight_decay=1e-3),
              data=sampler(val, batch, seed + 1), depends_on=[weights])
    def search(arch, batch, weights):
        x, y = batch
        logits = weights(x, arch.alpha)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(search, seed=seed), net, arch


def discrete(alpha):
    """One-hot logits of the strongest non-zero op per edge (DARTS's derivation rule)."""
    best = alpha[:, 1:].argmax(-1) + 1
    out = torch.full_like(alpha, -1e4)
    out[torch.arange(len(EDGES)), best] = 0.0
    return out


def train_fixed(train, alpha, *, seed=0, steps=1000, batch=100, lr=0.05):
    """Train a fresh supernet with frozen architecture logits ``alpha`` (a one-level program)."""
    net, alpha = supernet(seed), alpha.detach().clone()

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr, momentum=0.9, weight_decay=3e-4), data=sampler(train, batch, seed))
    def weights(net, batch):
        x, y = batch
        return F.cross_entropy(net(x, alpha), y)

    ml.Program(weights, seed=seed).fit(steps, progress=False)
    return net


def search(order, iters, seed=0):
    """Run one search; returns the program, the arch Hyper and softmax(alpha) after every step."""
    train, _, _ = digits(seed)
    half = len(train[1]) // 2
    s_train, s_val = (train[0][:half], train[1][:half]), (train[0][half:], train[1][half:])
    prog, net, arch = build_search(s_train, s_val, order=order, seed=seed)
    trace = []
    prog.fit(iters, progress=False,
             callbacks=[lambda p, row: trace.append(torch.softmax(p.params("search")["alpha"], -1).clone())])
    return prog, net, arch, torch.stack(trace)


def describe(alpha):
    return ", ".join(f"{e}: {OPS[i]}" for e, i in zip(EDGES, discrete(alpha).argmax(-1).tolist()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=400, help="search steps (default 400)")
    ap.add_argument("--retrain-steps", type=int, default=600, help="steps to retrain each final cell (default 600)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"DARTS on digits: ops {OPS}, edges {EDGES}; {args.iters} search steps, seeds {args.seeds}")
    results = {"uniform (no search)": [], "DARTS 1st order": [], "DARTS 2nd order": []}
    for seed in args.seeds:
        train, _, test = digits(seed)
        acc = lambda net, a: balanced_accuracy(net(test[0], a).detach(), test[1])
        uniform = torch.zeros(len(EDGES), len(OPS))
        results["uniform (no search)"].append(acc(train_fixed(train, uniform, seed=seed, steps=args.retrain_steps),
                                                  uniform))
        for order in (1, 2):
            prog, net, arch, trace = search(order, args.iters, seed)
            alpha = arch.alpha.detach()
            final = discrete(alpha)
            a = acc(train_fixed(train, final, seed=seed, steps=args.retrain_steps), final)
            results[f"DARTS {'1st' if order == 1 else '2nd'} order"].append(a)
            t = time.perf_counter() - t0
            print(f"seed {seed}, order {order}: search-val acc {prog.history[-1]['search/acc']:.3f}, "
                  f"supernet test acc {acc(net, alpha):.4f}, cell [{describe(alpha)}], retrained test acc {a:.4f} "
                  f"({t:.0f} s)")
            print("    softmax(alpha) at the end:\n" + "\n".join(
                f"    {e:5s} " + "  ".join(f"{o}={p:.3f}" for o, p in zip(OPS, row.tolist()))
                for e, row in zip(EDGES, trace[-1])))
    print("balanced test accuracy of the retrained cell, mean over seeds:")
    for name, accs in results.items():
        print(f"  {name:20s} {sum(accs) / len(accs):.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
