"""A three-level program: per-source weights above per-example weights above a classifier.

The digits training pool is split into four sources of equal size whose labels are corrupted at
different rates (0%, 20%, 50%, 80%, a label replaced by a different class). Example i from source
s(i) enters the classifier's loss with weight sigmoid(a_s(i) + c_i): a coarse per-source logit a
plus a fine per-example offset c.

    classify (bottom): linear softmax regression, full-batch SGD, warm-started, ``--bottom-steps``
                       steps per update of the middle; loss = mean_i sigmoid(a_s(i) + c_i) CE_i + L2
    examples (middle): the offsets c (ml.Hyper), Adam, ``--middle-steps`` steps per top step; loss =
                       CE of the classifier on clean set 1 (10 per class) + 1e-3 ||c||^2, through
                       the classifier's steps (Unroll)
    sources (top):     the source logits a (ml.Hyper), Adam; loss = CE of the classifier on clean
                       set 2 (10 per class, other images), through the middle level's steps and
                       the classifier's steps inside them (Unroll all the way down)

Baselines, the same classifier and steps: trained on every label with weight 1, and the bilevel
program without the top level (per-example weights only, learned on both clean sets together).

    python examples/three_level_sources.py                 # ~1 min
    python examples/three_level_sources.py --iters 300
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, balanced_accuracy, digits

NOISE = (0.0, 0.2, 0.5, 0.8)
L2 = 1e-3


def make_sources(seed=0):
    """``(train, source_id, corrupted), clean1, clean2, test``."""
    train, meta, test = digits(seed, meta_per_class=20)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    source = torch.arange(n) % len(NOISE)
    noisy, corrupted = y.clone(), torch.zeros(n, dtype=torch.bool)
    for s, rate in enumerate(NOISE):
        idx = torch.nonzero(source == s).squeeze(1)
        bad = idx[torch.randperm(len(idx), generator=g)[: int(round(rate * len(idx)))]]
        noisy[bad] = (y[bad] + torch.randint(1, CLASSES, (len(bad),), generator=g)) % CLASSES
        corrupted[bad] = True
    mx, my = meta                     # 20 per class, shuffled: split by class into two sets of 10
    first = torch.zeros(len(my), dtype=torch.bool)
    for c in range(CLASSES):
        first[torch.nonzero(my == c).squeeze(1)[:10]] = True
    return ((x, noisy), source, corrupted), (mx[first], my[first]), (mx[~first], my[~first]), test


def classifier(seed):
    torch.manual_seed(seed)
    return nn.Linear(64, CLASSES)


def build(train, source, clean1, clean2, *, seed=0, bottom_steps=10, middle_steps=2, lr=0.5,
          middle_lr=0.1, top_lr=0.1, three_levels=True):
    """The three-level program (``three_levels=False``: the bilevel one without source weights).
    Returns ``(prog, net, offsets, sources)``."""
    net = classifier(seed)
    offsets = ml.Hyper(c=torch.zeros(len(source)))
    sources = ml.Hyper(a=torch.zeros(len(NOISE)))

    if three_levels:
        @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=train, steps=bottom_steps)
        def classify(net, batch, examples, sources):
            x, y = batch
            w = torch.sigmoid(sources.a[source] + examples.c)
            return (w * F.cross_entropy(net(x), y, reduction="none")).mean() + L2 * (net.weight ** 2).sum()
    else:
        @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=train, steps=bottom_steps)
        def classify(net, batch, examples):
            x, y = batch
            w = torch.sigmoid(examples.c)
            return (w * F.cross_entropy(net(x), y, reduction="none")).mean() + L2 * (net.weight ** 2).sum()

    @ml.level(offsets, optimizer=ml.optim.adam(lr=middle_lr), data=clean1, steps=middle_steps if three_levels else 1,
              depends_on=[classify])
    def examples(offsets, batch, classify):
        x, y = batch
        return F.cross_entropy(classify(x), y) + 1e-3 * (offsets.c ** 2).sum()

    if not three_levels:
        return ml.Program(examples, seed=seed), net, offsets, None

    @ml.level(sources, optimizer=ml.optim.adam(lr=top_lr), data=clean2, depends_on=[examples], name="sources")
    def sources_level(sources, batch, examples, classify):
        x, y = batch
        logits = classify(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(sources_level, seed=seed), net, offsets, sources


def plain(train, *, seed=0, steps=1000, lr=0.5):
    net = classifier(seed)

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=train)
    def classify(net, batch):
        x, y = batch
        return F.cross_entropy(net(x), y) + L2 * (net.weight ** 2).sum()

    ml.Program(classify, seed=seed).fit(steps, progress=False)
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=100, help="top steps (default 100)")
    ap.add_argument("--bottom-steps", type=int, default=10)
    ap.add_argument("--middle-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    (train, source, corrupted), clean1, clean2, test = make_sources(args.seed)
    print(f"three-level source and example weighting on digits: {len(source)} training labels in "
          f"{len(NOISE)} sources with label noise {NOISE}; clean sets of {len(clean1[1])} + {len(clean2[1])}")
    prog, net, offsets, sources = build(train, source, clean1, clean2, seed=args.seed,
                                        bottom_steps=args.bottom_steps, middle_steps=args.middle_steps)
    print(prog.schedule)
    prog.fit(args.iters, progress=False)
    acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
    a = sources.a.detach()
    print("learned source weights sigmoid(a): " + ", ".join(
        f"{int(100 * r)}% noise: {torch.sigmoid(v):.3f}" for r, v in zip(NOISE, a)))
    w = torch.sigmoid(a[source] + offsets.c.detach())
    print(f"mean example weight: clean labels {w[~corrupted].mean():.3f}, corrupted {w[corrupted].mean():.3f}")

    both = (torch.cat([clean1[0], clean2[0]]), torch.cat([clean1[1], clean2[1]]))
    bi, bnet, boff, _ = build(train, source, both, None, seed=args.seed, bottom_steps=args.bottom_steps,
                              three_levels=False)
    bi.fit(args.iters * args.middle_steps, progress=False)          # as many example-weight updates
    base = plain(train, seed=args.seed, steps=args.iters * args.middle_steps * args.bottom_steps)
    print(f"balanced test accuracy: plain on noisy labels {acc(base):.4f}; bilevel (example weights only) "
          f"{acc(bnet):.4f}; three levels (source + example weights) {acc(net):.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return prog


if __name__ == "__main__":
    main()
