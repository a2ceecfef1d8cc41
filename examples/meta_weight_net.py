"""Meta-Weight-Net (Shu et al. 2019): learn a per-example loss weighting from a small balanced set.

Long-tailed digits: the training pool keeps n_max * imbalance^(-c/9) examples of class c (so at
imbalance 100 the rarest class has one or two examples); the meta set holds 10 examples per class
and the test set 50 per class (both balanced).

    classifier (lower): MLP 64-32-10, SGD with momentum on minibatches of the long-tailed pool; its
                        loss is the per-example cross-entropy weighted by weight_net(loss), normalized
                        by the sum of the weights in the batch (as the MW-Net code does)
    weight_net (upper): MLP 1-32-1 with a sigmoid, Adam; its loss is the classifier's cross-entropy on
                        the balanced meta set, through one classifier step (Unroll, steps=1: exactly
                        MW-Net's one-step look-ahead)

Baselines, same classifier, optimizer, steps and batches: plain training (every weight 1) and
class-balanced weights (1 / class count, normalized the same way).

    python examples/meta_weight_net.py                     # imbalance 10, 50, 100; ~1 min
    python examples/meta_weight_net.py --iters 20 --imbalance 100   # a smoke run
    python examples/meta_weight_net.py --seeds 0 1 2 --iters 3000
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, balanced_accuracy, digits, long_tailed, sampler


def classifier(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def weight_net(seed):
    torch.manual_seed(seed + 1000)
    return nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())


def inner_optimizer(lr):
    return ml.optim.sgd(lr=lr, momentum=0.9, weight_decay=5e-4)


def build_mwn(train, meta, *, seed=0, batch=100, lr=0.1, meta_lr=1e-3, method="unroll"):
    """The two-level Meta-Weight-Net program. Returns ``(prog, net, wnet)``."""
    net, wnet = classifier(seed), weight_net(seed)
    hypergrad = {"unroll": ml.hypergrad.Unroll(), "cg": ml.hypergrad.CG(iters=3),
                 "darts": ml.hypergrad.FiniteDiff(eps=0.01)}[method]

    @ml.level(net, optimizer=inner_optimizer(lr), data=sampler(train, batch, seed), steps=1, hypergrad=hypergrad)
    def classify(net, batch, weights):
        x, y = batch
        losses = F.cross_entropy(net(x), y, reduction="none")
        w = weights(losses.detach().unsqueeze(1)).squeeze(1)       # weight_net(per-example loss)
        return (w * losses).sum() / (w.sum() + 1e-8)

    @ml.level(wnet, optimizer=ml.optim.adam(lr=meta_lr), data=meta, depends_on=[classify])
    def weights(wnet, batch, classify):
        x, y = batch
        logits = classify(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(weights, seed=seed), net, wnet


def build_baseline(train, class_weights, *, seed=0, batch=100, lr=0.1):
    """One level: the same classifier trained with fixed per-class weights (all ones: plain)."""
    net = classifier(seed)

    @ml.level(net, optimizer=inner_optimizer(lr), data=sampler(train, batch, seed))
    def classify(net, batch):
        x, y = batch
        losses = F.cross_entropy(net(x), y, reduction="none")
        w = class_weights[y]
        return (w * losses).sum() / w.sum()

    return ml.Program(classify, seed=seed), net


@torch.no_grad()
def test_accuracy(net, test):
    return balanced_accuracy(net(test[0]), test[1])


@torch.no_grad()
def weight_curve(wnet, losses=None):
    losses = torch.linspace(0, 6, 61) if losses is None else losses
    return losses, wnet(losses.unsqueeze(1)).squeeze(1)


def run(imbalance, seed, iters, method="unroll", meta_lr=1e-3, data_seed=0):
    train_pool, meta, test = digits(data_seed)
    train = long_tailed(train_pool, imbalance, data_seed)
    counts = torch.bincount(train[1], minlength=CLASSES).float()
    out = {"counts": counts}
    for name, w in (("plain", torch.ones(CLASSES)), ("class-balanced", counts.sum() / (CLASSES * counts))):
        prog, net = build_baseline(train, w, seed=seed)
        prog.fit(iters, progress=False)
        out[name] = test_accuracy(net, test)
    prog, net, wnet = build_mwn(train, meta, seed=seed, method=method, meta_lr=meta_lr)
    prog.fit(iters, progress=False)
    out["mwn"] = test_accuracy(net, test)
    out["prog"], out["wnet"] = prog, wnet
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imbalance", type=float, nargs="+", default=[10, 50, 100])
    ap.add_argument("--iters", type=int, default=1000, help="classifier steps (= weight-net steps), default 1000")
    ap.add_argument("--meta-lr", type=float, default=1e-3,
                    help="Adam learning rate of the weight net (default 1e-3, MW-Net's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="model/batch seeds, averaged (default 0)")
    ap.add_argument("--method", choices=["unroll", "cg", "darts"], default="unroll",
                    help="hypergradient through the classifier step (default unroll)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    print(f"Meta-Weight-Net on long-tailed digits; {args.iters} steps, method {args.method}, seeds {args.seeds}")
    print("balanced test accuracy (50 test images per class), mean over seeds")
    print(f"{'imbalance':>9}  {'n_train':>7}  {'plain':>7}  {'class-bal':>9}  {'MW-Net':>7}")
    for imb in args.imbalance:
        rows = [run(imb, s, args.iters, args.method, args.meta_lr) for s in args.seeds]
        mean = lambda k: sum(r[k] for r in rows) / len(rows)
        print(f"{imb:9.0f}  {int(rows[0]['counts'].sum()):7d}  {mean('plain'):7.4f}  "
              f"{mean('class-balanced'):9.4f}  {mean('mwn'):7.4f}")
        losses, w = weight_curve(rows[0]["wnet"], torch.tensor([0.01, 0.5, 1.0, 2.0, 4.0]))
        print("           learned weight at loss " + ", ".join(f"{x:.2f}: {v:.3f}" for x, v in zip(losses, w)))
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
