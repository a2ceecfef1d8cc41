"""Data hyper-cleaning (Franceschi et al. 2017): one weight per training example, learned on a small
clean validation set, finds the corrupted labels.

Digits: the training pool (~1200 images) has 50% of its labels replaced by a different class drawn
uniformly; the clean validation set has 10 images per class and the test set 50 per class.

    classifier (lower): linear softmax regression 64-10, full-batch SGD, warm-started, ``--inner-steps``
                        steps per upper step; loss = mean_i sigmoid(c_i) * CE_i + 1e-3 ||W||^2
    cleaner (upper):    the logits c (one per training example, ml.Hyper, start at 0), Adam; loss =
                        the classifier's cross-entropy on the clean validation set, through the lower
                        level's solution (CG on the implicit function theorem by default)

An example is flagged as corrupted when its learned weight sigmoid(c_i) < 0.5. Baselines: the same
classifier trained on the noisy labels (every weight 1), and, as a ceiling, on the clean half only.

    python examples/hyper_cleaning.py                      # CG(10), 150 upper steps, ~30 s
    python examples/hyper_cleaning.py --method unroll --iters 500
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, balanced_accuracy, corrupt, digits

L2 = 1e-3


def classifier(seed):
    torch.manual_seed(seed)
    return nn.Linear(64, CLASSES)


def methods():
    return {"cg": lambda: ml.hypergrad.CG(iters=10), "unroll": lambda: ml.hypergrad.Unroll(),
            "neumann": lambda: ml.hypergrad.Neumann(iters=10, alpha=0.5),
            "darts": lambda: ml.hypergrad.FiniteDiff(eps=0.01)}


def build(train, val, *, seed=0, inner_steps=20, inner_lr=0.5, outer_lr=0.1, method="cg"):
    """The two-level program. Returns ``(prog, net, cleaner)``."""
    net = classifier(seed)
    cleaner = ml.Hyper(c=torch.zeros(len(train[1])))           # weight sigmoid(0) = 0.5 each

    @ml.level(net, optimizer=ml.optim.sgd(lr=inner_lr), data=train, steps=inner_steps,
              hypergrad=methods()[method]())
    def classify(net, batch, clean):
        x, y = batch
        losses = F.cross_entropy(net(x), y, reduction="none")
        return (torch.sigmoid(clean.c) * losses).mean() + L2 * (net.weight ** 2).sum()

    @ml.level(cleaner, optimizer=ml.optim.adam(lr=outer_lr), data=val, depends_on=[classify])
    def clean(cleaner, batch, classify):
        x, y = batch
        logits = classify(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(clean, seed=seed), net, cleaner


def train_plain(train, *, seed=0, steps=2000, lr=0.5):
    """The baseline: the same classifier and loss with every weight 1 (a one-level program)."""
    net = classifier(seed)

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=train)
    def classify(net, batch):
        x, y = batch
        return F.cross_entropy(net(x), y) + L2 * (net.weight ** 2).sum()

    ml.Program(classify, seed=seed).fit(steps, progress=False)
    return net


def detection(weights, corrupted):
    """Precision and recall of flagging weight < 0.5 as corrupted, and the ROC AUC of 1 - weight."""
    flagged = weights < 0.5
    tp = (flagged & corrupted).sum().item()
    precision = tp / max(1, flagged.sum().item())
    recall = tp / max(1, corrupted.sum().item())
    from sklearn.metrics import roc_auc_score
    auc = roc_auc_score(corrupted.numpy(), (1 - weights).numpy())
    return precision, recall, auc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=150, help="upper steps (default 150)")
    ap.add_argument("--inner-steps", type=int, default=20, help="classifier steps per upper step (default 20)")
    ap.add_argument("--method", choices=sorted(methods()), default="cg", help="hypergradient method (default cg)")
    ap.add_argument("--noise", type=float, default=0.5, help="fraction of corrupted training labels (default 0.5)")
    ap.add_argument("--retrain-steps", type=int, default=1000,
                    help="full-batch steps of the final and baseline classifiers (default 1000)")
    ap.add_argument("--outer-lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    clean_train, val, test = digits(args.seed)
    train, corrupted = corrupt(clean_train, args.noise, args.seed)
    print(f"hyper-cleaning on digits: {len(train[1])} training labels, {int(corrupted.sum())} corrupted; "
          f"{len(val[1])} clean validation, {len(test[1])} test; method {args.method}")

    prog, net, cleaner = build(train, val, seed=args.seed, inner_steps=args.inner_steps,
                               outer_lr=args.outer_lr, method=args.method)
    prog.fit(args.iters, progress=False)
    weights = torch.sigmoid(cleaner.c.detach())
    # retrain from scratch on the learned weights (what hyper-cleaning delivers): same steps as the baseline
    final = classifier(args.seed)
    steps = args.retrain_steps
    w = weights.clone()

    @ml.level(final, optimizer=ml.optim.sgd(lr=0.5), data=train)
    def retrain(net, batch):
        x, y = batch
        return (w * F.cross_entropy(net(x), y, reduction="none")).mean() + L2 * (net.weight ** 2).sum()

    ml.Program(retrain, seed=args.seed).fit(steps, progress=False)

    noisy = train_plain(train, seed=args.seed, steps=steps)
    ceiling = train_plain((train[0][~corrupted], train[1][~corrupted]), seed=args.seed, steps=steps)
    acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
    precision, recall, auc = detection(weights, corrupted)
    print(f"test accuracy: trained on noisy labels {acc(noisy):.4f}; hyper-cleaning (end of the bilevel run) "
          f"{acc(net):.4f}, retrained on the learned weights {acc(final):.4f}; "
          f"ceiling (clean half only) {acc(ceiling):.4f}")
    print(f"corrupted-label detection (weight < 0.5): precision {precision:.4f}, recall {recall:.4f}, "
          f"ROC AUC {auc:.4f}; {int((weights < 0.5).sum())} flagged")
    print(f"mean weight: clean {weights[~corrupted].mean():.3f}, corrupted {weights[corrupted].mean():.3f}")
    print(f"validation loss {prog.history[0]['clean']:.4f} at step 1 -> {prog.history[-1]['clean']:.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return prog


if __name__ == "__main__":
    main()
