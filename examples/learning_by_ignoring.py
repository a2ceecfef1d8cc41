"""Learning by Ignoring (Betty's three-level example): which source examples to ignore when
pretraining for a target domain.

Digits in two domains. The **target** domain is the digits shifted one pixel to the right, with only
2 labelled images per class to train on, 10 per class to validate on, and a 500-image test set. The
**source** domain is the rest of the digits in four equal parts: shifted like the target, unshifted,
transposed (a foreign domain, correct labels), and with a wrong label. Only the first part is the
target's domain; the others mislead a linear classifier to some degree.

    pretrain (bottom): a linear classifier on the source, full-batch SGD, warm-started, ``--bottom-steps``
                       steps before each update of finetune; loss = sum_i w_i CE_i / sum_i w_i + L2 with
                       w = sigmoid(c), one ignoring logit c_i per source example (read from reweight)
    finetune (middle): a second linear classifier on the target's 20 training images, SGD,
                       ``--middle-steps`` steps per step of reweight; loss = CE + lam ||theta - theta_pretrain||^2
                       (the pretrained classifier is its proximal anchor)
    reweight (top):    the logits c (ml.Hyper), Adam; loss = CE of finetune on the target's validation set,
                       through finetune's steps and pretrain's steps before each of them (Unroll)

As in Betty, reweight depends on finetune *and* on pretrain, finetune on pretrain: pretrain runs before
each update of finetune (its deepest upper) and reweight differentiates through that whole block.

Baselines, the same classifiers and as many updates: finetune on the target alone (anchored at zero,
i.e. L2 of the same strength), pretrain on every source example with weight 1 then finetune, and an
oracle that pretrains on the source examples shifted like the target only (it knows what to ignore).

    python examples/learning_by_ignoring.py                 # ~40 s
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, balanced_accuracy, digits

L2 = 1e-3
KINDS = ("shifted like the target", "unshifted", "transposed", "wrong label")


def shift_right(x):
    """8x8 images (flattened, background -1) moved one pixel to the right."""
    img = x.view(-1, 8, 8)
    out = torch.full_like(img, -1.0)
    out[:, :, 1:] = img[:, :, :-1]
    return out.reshape(len(x), 64)


def make_domains(seed=0, shifted=0.25, transposed=0.25, wrong=0.25, per_class=2):
    """``(source, kind), target_train, target_valid, target_test``; ``kind[i]`` indexes KINDS."""
    train, meta, test = digits(seed, meta_per_class=per_class + 10, test_per_class=50)
    x, y = train
    x, y = x.clone(), y.clone()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    cut = torch.cumsum(torch.tensor([shifted, transposed, wrong]) * len(y), 0).round().long().tolist()
    s_idx, t_idx, w_idx = order[:cut[0]], order[cut[0]:cut[1]], order[cut[1]:cut[2]]
    x[s_idx] = shift_right(x[s_idx])
    x[t_idx] = x[t_idx].view(-1, 8, 8).transpose(1, 2).reshape(-1, 64)
    y[w_idx] = (y[w_idx] + torch.randint(1, CLASSES, (len(w_idx),), generator=g)) % CLASSES
    kind = torch.ones(len(y), dtype=torch.long)          # unshifted, unless below
    kind[s_idx], kind[t_idx], kind[w_idx] = 0, 2, 3
    mx, my = meta                     # 15 per class: per_class to train on the target, 10 to validate
    first = torch.zeros(len(my), dtype=torch.bool)
    for c in range(CLASSES):
        first[torch.nonzero(my == c).squeeze(1)[:per_class]] = True
    mx = shift_right(mx)
    return ((x, y), kind), (mx[first], my[first]), (mx[~first], my[~first]), (shift_right(test[0]), test[1])


def classifier(seed):
    torch.manual_seed(seed)
    return nn.Linear(64, CLASSES)


def build(source, target_train, target_valid, *, seed=0, bottom_steps=5, middle_steps=5, lr=0.5,
          top_lr=0.1, lam=0.05, learn_weights=True, fixed_weights=None):
    """The three-level program; ``learn_weights=False`` gives the two-level one with fixed source
    weights ``fixed_weights`` (default all 1). Returns ``(prog, pretrain_net, finetune_net, weights)``."""
    src_net, tgt_net = classifier(seed), classifier(seed + 1)
    weights = ml.Hyper(c=torch.zeros(len(source[1])))
    fixed = torch.ones(len(source[1])) if fixed_weights is None else fixed_weights

    def weighted_ce(net, batch, w):
        x, y = batch
        return (w * F.cross_entropy(net(x), y, reduction="none")).sum() / w.sum() + L2 * (net.weight ** 2).sum()

    if learn_weights:
        @ml.level(src_net, optimizer=ml.optim.sgd(lr=lr), data=source, steps=bottom_steps)
        def pretrain(net, batch, reweight):
            return weighted_ce(net, batch, torch.sigmoid(reweight.c))
    else:
        @ml.level(src_net, optimizer=ml.optim.sgd(lr=lr), data=source, steps=bottom_steps)
        def pretrain(net, batch):
            return weighted_ce(net, batch, fixed)

    @ml.level(tgt_net, optimizer=ml.optim.sgd(lr=lr), data=target_train,
              steps=middle_steps if learn_weights else 1, depends_on=[pretrain])
    def finetune(net, batch, pretrain):
        x, y = batch
        anchor = ((net.weight - pretrain.weight) ** 2).sum() + ((net.bias - pretrain.bias) ** 2).sum()
        return F.cross_entropy(net(x), y) + lam * anchor

    if not learn_weights:
        return ml.Program(finetune, seed=seed), src_net, tgt_net, None

    @ml.level(weights, optimizer=ml.optim.adam(lr=top_lr), data=target_valid, depends_on=[finetune, pretrain])
    def reweight(weights, batch, finetune, pretrain):
        x, y = batch
        logits = finetune(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(reweight, seed=seed), src_net, tgt_net, weights


def target_only(target_train, *, seed=0, steps=100, lr=0.5, lam=0.05):
    """The target classifier with no pretraining: anchored at zero (plain L2 of the same strength)."""
    net = classifier(seed + 1)

    @ml.level(net, optimizer=ml.optim.sgd(lr=lr), data=target_train)
    def finetune(net, batch):
        x, y = batch
        return F.cross_entropy(net(x), y) + lam * ((net.weight ** 2).sum() + (net.bias ** 2).sum())

    ml.Program(finetune, seed=seed).fit(steps, progress=False)
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=150, help="reweight (top) steps (default 150)")
    ap.add_argument("--middle-steps", type=int, default=5)
    ap.add_argument("--bottom-steps", type=int, default=5)
    ap.add_argument("--lam", type=float, default=0.05, help="proximal strength of finetune to pretrain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    (source, kind), tr, va, test = make_domains(args.seed)
    print(f"learning by ignoring on digits: {len(kind)} source examples ("
          + ", ".join(f"{int((kind == k).sum())} {name}" for k, name in enumerate(KINDS))
          + f"); target (shifted one pixel right): {len(tr[1])} to train, {len(va[1])} to validate, "
          f"{len(test[1])} to test")
    common = dict(seed=args.seed, bottom_steps=args.bottom_steps, lam=args.lam)
    prog, src_net, tgt_net, weights = build(source, tr, va, middle_steps=args.middle_steps, **common)
    print(prog.schedule)
    prog.fit(args.iters, progress=False)
    acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
    w = torch.sigmoid(weights.c.detach())
    print("mean learned source weight: " + ", ".join(
        f"{name} {w[kind == k].mean():.3f}" for k, name in enumerate(KINDS)))

    finetune_updates = args.iters * args.middle_steps
    uniform, _, uni_net, _ = build(source, tr, va, learn_weights=False, **common)
    uniform.fit(finetune_updates, progress=False)           # as many finetune and pretrain updates
    oracle, _, ora_net, _ = build(source, tr, va, learn_weights=False, fixed_weights=(kind == 0).float(), **common)
    oracle.fit(finetune_updates, progress=False)
    alone = target_only(tr, seed=args.seed, steps=finetune_updates, lam=args.lam)
    print(f"balanced target test accuracy: target only {acc(alone):.4f}; pretrained on every source example "
          f"{acc(uni_net):.4f}; learning by ignoring {acc(tgt_net):.4f}; "
          f"oracle (shifted source only) {acc(ora_net):.4f}")
    print(f"pretrained source classifier on the target test set: learning by ignoring {acc(src_net):.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return prog


if __name__ == "__main__":
    main()
