"""Meta-Weight-Net (Shu et al. 2019): learn a per-example loss weighting from a small balanced set.

Two settings, both on scikit-learn's digits with a clean balanced meta set (10 images per class)
and test set (50 per class):

* long-tailed (default): the training pool keeps n_max * imbalance^(-c/9) examples of class c (at
  imbalance 100 the rarest class has one or two examples); classifier: MLP 64-32-10.
* noisy labels (``--noise 0.4``): the whole training pool (1197 images) with that fraction of its
  labels replaced by a different class drawn uniformly (Shu et al.'s "uniform noise", where they
  report their largest gains); classifier: a small CNN with BatchNorm, learning rate divided by 10
  for the last fifth of the steps.

    classifier (lower): SGD with momentum on minibatches of 100 of the training pool; its loss is
                        the per-example cross-entropy weighted by weight_net(loss), normalized by
                        the sum of the weights in the batch (as the MW-Net code does)
    weight_net (upper): MLP 1-32-1 with a sigmoid, Adam; its loss is the classifier's cross-entropy on
                        the meta set, through one classifier step (Unroll, steps=1: exactly MW-Net's
                        one-step look-ahead)

Baselines, same classifier, optimizer, steps and batches: plain training (every weight 1); on
long-tailed data class-balanced weights (1 / class count, normalized the same way); on noisy labels
one learned weight per training example (sigmoid of a logit, ``ml.Hyper``, learned through the same
one-step look-ahead: online hyper-cleaning) and, as a ceiling, plain training on the clean examples
only.

    python examples/meta_weight_net.py                     # imbalance 10, 50, 100; ~1 min
    python examples/meta_weight_net.py --noise 0.4         # 40 % uniform label noise; ~1 min
    python examples/meta_weight_net.py --iters 20 --imbalance 100   # a smoke run
    python examples/meta_weight_net.py --seeds 0 1 2 --iters 3000
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, balanced_accuracy, corrupt, digits, long_tailed, sampler


def classifier(seed, model="mlp"):
    """``"mlp"``: 64-32-10; ``"cnn"``: two 3x3 conv-BatchNorm-ReLU-maxpool blocks (16, 32 channels)."""
    torch.manual_seed(seed)
    if model == "cnn":
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                   nn.MaxPool2d(2)]
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), *block(1, 16), *block(16, 32), nn.Flatten(),
                             nn.Linear(32 * 2 * 2, CLASSES))
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def weight_net(seed):
    torch.manual_seed(seed + 1000)
    return nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())


def inner_optimizer(lr, decay_at=None):
    """SGD with momentum; with ``decay_at``, the learning rate drops tenfold after that many steps."""
    rate = lr if decay_at is None else (lambda step: torch.where(step > decay_at, lr / 10, lr))
    return ml.optim.sgd(lr=rate, momentum=0.9, weight_decay=5e-4)


def weighted_mean(losses, w):
    return (w * losses).sum() / (w.sum() + 1e-8)


def build_mwn(train, meta, *, seed=0, batch=100, lr=0.1, meta_lr=1e-3, method="unroll", model="mlp",
              decay_at=None):
    """The two-level Meta-Weight-Net program. Returns ``(prog, net, wnet)``."""
    net, wnet = classifier(seed, model), weight_net(seed)
    hypergrad = {"unroll": ml.hypergrad.Unroll(), "cg": ml.hypergrad.CG(iters=3),
                 "darts": ml.hypergrad.FiniteDiff(eps=0.01)}[method]

    @ml.level(net, optimizer=inner_optimizer(lr, decay_at), data=sampler(train, batch, seed), steps=1,
              hypergrad=hypergrad)
    def classify(net, batch, weights):
        x, y = batch
        losses = F.cross_entropy(net(x), y, reduction="none")
        w = weights(losses.detach().unsqueeze(1)).squeeze(1)       # weight_net(per-example loss)
        return weighted_mean(losses, w)

    @ml.level(wnet, optimizer=ml.optim.adam(lr=meta_lr), data=meta, depends_on=[classify])
    def weights(wnet, batch, classify):
        x, y = batch
        logits = classify(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(weights, seed=seed), net, wnet


def build_example_weights(train, meta, *, seed=0, batch=100, lr=0.1, weight_lr=0.05, model="cnn", decay_at=None):
    """Per-example reweighting: example i's loss is weighted by sigmoid(c_i), one learned logit per
    training example (all 0 at the start), learned through the same one-step look-ahead as MW-Net.
    Returns ``(prog, net, cleaner)``."""
    net = classifier(seed, model)
    n = len(train[1])
    cleaner = ml.Hyper(c=torch.zeros(n))
    indexed = (*train, torch.arange(n))                           # batches carry the examples' indices

    @ml.level(net, optimizer=inner_optimizer(lr, decay_at), data=sampler(indexed, batch, seed), steps=1,
              hypergrad=ml.hypergrad.Unroll())
    def classify(net, batch, clean):
        x, y, i = batch
        losses = F.cross_entropy(net(x), y, reduction="none")
        return weighted_mean(losses, torch.sigmoid(clean.c[i]))

    @ml.level(cleaner, optimizer=ml.optim.adam(lr=weight_lr), data=meta, depends_on=[classify])
    def clean(cleaner, batch, classify):
        x, y = batch
        return F.cross_entropy(classify(x), y)

    return ml.Program(clean, seed=seed), net, cleaner


def build_baseline(train, class_weights, *, seed=0, batch=100, lr=0.1, model="mlp", decay_at=None):
    """One level: the same classifier trained with fixed per-class weights (all ones: plain)."""
    net = classifier(seed, model)

    @ml.level(net, optimizer=inner_optimizer(lr, decay_at), data=sampler(train, batch, seed))
    def classify(net, batch):
        x, y = batch
        losses, w = F.cross_entropy(net(x), y, reduction="none"), class_weights[y]
        return (w * losses).sum() / w.sum()

    return ml.Program(classify, seed=seed), net


@torch.no_grad()
def test_accuracy(net, test):
    """Balanced accuracy in eval mode (BatchNorm uses its running statistics); leaves ``net`` in train mode."""
    net.eval()
    try:
        return balanced_accuracy(net(test[0]), test[1])
    finally:
        net.train()


@torch.no_grad()
def weight_curve(wnet, losses=None):
    losses = torch.linspace(0, 6, 61) if losses is None else losses
    return losses, wnet(losses.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def mwn_example_weights(net, wnet, train):
    """The weight MW-Net's weight net gives each training example at the classifier's final losses."""
    net.eval()
    try:
        losses = F.cross_entropy(net(train[0]), train[1], reduction="none")
    finally:
        net.train()
    return wnet(losses.unsqueeze(1)).squeeze(1)


def auc(scores, positive):
    """ROC AUC of ``scores`` for the ``positive`` mask (ties count one half)."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean())


def run(imbalance, seed, iters, method="unroll", meta_lr=1e-3, data_seed=0):
    """The long-tailed setting: plain, class-balanced and MW-Net on one imbalance factor."""
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


def fit_early_stopped(prog, net, meta, iters, every=25):
    """Fit ``iters`` steps, checking the meta-set accuracy every ``every`` steps; returns the best
    (first best) checkpoint's step, leaving its weights in ``net``."""
    best, best_step, best_state, done = -1.0, 0, None, 0
    while done < iters:
        step = min(every, iters - done)
        prog.fit(step, progress=False)
        done += step
        acc = test_accuracy(net, meta)
        if acc > best:
            best, best_step, best_state = acc, done, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return best_step


def run_noisy(noise, seed, iters, method="unroll", meta_lr=1e-2, weight_lr=0.3, model="cnn", data_seed=0):
    """The noisy-label setting: plain (final and early-stopped on the meta set), per-example weights,
    MW-Net and the clean-only ceiling."""
    clean_train, meta, test = digits(data_seed)
    train, corrupted = corrupt(clean_train, noise, data_seed)
    common = dict(seed=seed, model=model, decay_at=int(0.8 * iters))
    ones = torch.ones(CLASSES)
    out = {"n": len(train[1]), "corrupted": corrupted}
    prog, net = build_baseline(train, ones, **common)
    prog.fit(iters, progress=False)
    out["plain"] = test_accuracy(net, test)
    prog, net = build_baseline(train, ones, **common)
    out["stop_step"] = fit_early_stopped(prog, net, meta, iters)
    out["early"] = test_accuracy(net, test)
    prog, net = build_baseline((train[0][~corrupted], train[1][~corrupted]), ones, **common)
    prog.fit(iters, progress=False)
    out["ceiling"] = test_accuracy(net, test)
    prog, net, cleaner = build_example_weights(train, meta, weight_lr=weight_lr, **common)
    prog.fit(iters, progress=False)
    out["example"], out["example_w"] = test_accuracy(net, test), torch.sigmoid(cleaner.c.detach())
    prog, net, wnet = build_mwn(train, meta, method=method, meta_lr=meta_lr, **common)
    prog.fit(iters, progress=False)
    out["mwn"], out["mwn_w"] = test_accuracy(net, test), mwn_example_weights(net, wnet, train)
    out["prog"], out["wnet"] = prog, wnet
    return out


def main_long_tailed(args):
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


def main_noisy(args):
    print(f"Meta-Weight-Net on digits with {args.noise:.0%} uniform label noise; {args.model} classifier, "
          f"{args.iters} steps, method {args.method}, seeds {args.seeds}")
    print("balanced test accuracy (50 test images per class), mean over seeds")
    print(f"{'noise':>5}  {'n_train':>7}  {'plain':>7}  {'plain, early-stopped':>20}  {'per-example':>11}  "
          f"{'MW-Net':>7}  {'clean only':>10}")
    rows = [run_noisy(args.noise, s, args.iters, args.method, args.meta_lr, args.weight_lr, args.model)
            for s in args.seeds]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    print(f"{args.noise:5.2f}  {rows[0]['n']:7d}  {mean('plain'):7.4f}  {mean('early'):20.4f}  "
          f"{mean('example'):11.4f}  {mean('mwn'):7.4f}  {mean('ceiling'):10.4f}")
    print("plain, early-stopped: the checkpoint (every 25 steps) with the best meta-set accuracy, at step "
          + ", ".join(str(r["stop_step"]) for r in rows))
    r, bad = rows[0], rows[0]["corrupted"]
    for name, key in (("per-example", "example_w"), ("MW-Net", "mwn_w")):
        w = r[key]
        print(f"{name:>11} weights (seed {args.seeds[0]}): mean on clean labels {w[~bad].mean():.3f}, on corrupted "
              f"{w[bad].mean():.3f}; ROC AUC for finding the corrupted ones {auc(-w, bad):.4f}")
    losses, w = weight_curve(r["wnet"], torch.tensor([0.01, 0.5, 1.0, 2.0, 4.0]))
    print("     MW-Net learned weight at loss " + ", ".join(f"{x:.2f}: {v:.3f}" for x, v in zip(losses, w)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imbalance", type=float, nargs="+", default=[10, 50, 100])
    ap.add_argument("--noise", type=float, default=0.0,
                    help="fraction of wrong training labels; > 0 runs the noisy-label setting instead of "
                         "the long-tailed one (default 0)")
    ap.add_argument("--model", choices=["mlp", "cnn"], default=None,
                    help="classifier (default: mlp on long-tailed data, cnn with noisy labels)")
    ap.add_argument("--iters", type=int, default=None,
                    help="classifier steps (= weight-net steps), default 1000 (long-tailed), 500 (noisy: about "
                         "42 epochs; MW-Net trains 40)")
    ap.add_argument("--meta-lr", type=float, default=None,
                    help="Adam learning rate of the weight net (default 1e-3, MW-Net's, on long-tailed data; "
                         "1e-2 with noisy labels)")
    ap.add_argument("--weight-lr", type=float, default=0.3,
                    help="Adam learning rate of the per-example logits (noisy setting, default 0.3)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="model/batch seeds, averaged (default 0)")
    ap.add_argument("--method", choices=["unroll", "cg", "darts"], default="unroll",
                    help="hypergradient through the classifier step (default unroll)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.iters is None:
        args.iters = 500 if args.noise else 1000
    if args.meta_lr is None:
        args.meta_lr = 1e-2 if args.noise else 1e-3
    if args.model is None:
        args.model = "cnn" if args.noise else "mlp"

    t0 = time.perf_counter()
    if args.noise:
        main_noisy(args)
    else:
        if args.model != "mlp":
            ap.error("the long-tailed setting uses the MLP (--model mlp)")
        main_long_tailed(args)
    print(f"total time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
