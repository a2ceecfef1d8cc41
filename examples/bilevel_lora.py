"""Bilevel LoRA fine-tuning with data reweighting (BiLoRA / ScaleBiO style) against plain LoRA
fine-tuning, on a tiny BERT and a generated text task with noisy labels.

The task (generated here, nothing downloads): sentences of ``LENGTH`` tokens over a vocabulary of
``VOCAB`` words, among which ``CUE`` "positive" and ``CUE`` "negative" words; the label says
whether a sentence holds more positive than negative words (no ties). A fraction ``--noise`` of the
training labels is flipped; a small validation set and the test set are clean.

The model: a 2-layer ``BertForSequenceClassification`` (hidden 32) from random init, "pretrained"
here for ``--pretrain-steps`` Adam steps on a related task (which of the 6 cue words a sentence
holds: its features know the words, not their polarity), then frozen, with a new two-class head and
peft LoRA adapters (rank 4) on query, key and value: the head and the adapters are fine-tuned.

    lower (fine-tune):  the adapters and the head, full-batch SGD (lr 1), ``--inner-steps`` steps per
                        upper step, warm-started; loss = mean_i sigmoid(c_i) · CE_i over the noisy set
    upper (reweight):   the logits c (one per training example, ml.Hyper, start at 0), Adam; loss =
                        the cross-entropy of the fine-tuned model on the clean validation set,
                        through the lower level's K steps (Unroll)

Baseline: the same LoRA fine-tuning on the same noisy data, every weight 1, for as many steps as
the bilevel run's lower level took, at each learning rate of ``--plain-lrs`` (SGD at lr 1 oscillates
on the noisy labels; the bilevel run's weights, below 1, tame it): the best on the clean
validation set is compared. A second baseline fine-tunes on the clean validation set alone. Then
the recipes are scored on the clean test set, and the
learned weights on how well they find the flipped labels.

    python examples/bilevel_lora.py                    # 150 upper steps x 5 inner steps, a few minutes
    python examples/bilevel_lora.py --noise 0.2 --seed 1
"""
from __future__ import annotations

import argparse
import copy
import functools
import time

import torch
import torch.nn.functional as F

import mlodsl as ml

VOCAB, LENGTH, CUE = 24, 12, 3  # words 0..2 positive, 3..5 negative, the rest neutral
POSITIVE, NEGATIVE = range(0, CUE), range(CUE, 2 * CUE)


def sentences(n: int, generator: torch.Generator):
    """``n`` sentences of neutral words with one or two cue words of the same polarity at random
    places, and their labels (1: positive)."""
    ids = torch.randint(2 * CUE, VOCAB, (n, LENGTH), generator=generator)
    label = torch.randint(0, 2, (n,), generator=generator)
    for _ in range(2):
        cue = torch.randint(0, CUE, (n,), generator=generator) + CUE * (1 - label)  # positive: 0..CUE-1
        place = torch.randint(0, LENGTH, (n,), generator=generator)
        ids[torch.arange(n), place] = cue
    return ids, label


def task(seed: int = 0, n_train: int = 256, n_val: int = 64, n_test: int = 1000, noise: float = 0.4):
    """``(train, val, test, flipped)``: noisy training pairs, clean validation and test pairs, and
    which training labels were flipped."""
    g = torch.Generator().manual_seed(seed)
    train, val, test = sentences(n_train, g), sentences(n_val, g), sentences(n_test, g)
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=g)[: int(round(noise * n_train))]] = True
    x, y = train
    return (x, torch.where(flipped, 1 - y, y)), val, test, flipped


@functools.lru_cache(maxsize=4)
def _pretrained(seed: int, steps: int):
    """A 2-layer BERT (hidden 32) pretrained from random init on a related task, which cue word a
    sentence holds (one of ``2 * CUE``): its features know the words, not their polarity."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2 * CUE,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(2 * CUE, VOCAB, (512, LENGTH), generator=g)
    word = torch.randint(0, 2 * CUE, (512,), generator=g)
    ids[torch.arange(512), torch.randint(0, LENGTH, (512,), generator=g)] = word
    opt = torch.optim.Adam(bert.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(bert(ids).logits, word).backward()
        opt.step()
    return bert


def lora_bert(seed: int = 0, pretrain_steps: int = 100):
    """The pretrained BERT, frozen, with a new two-class head (trained) and rank-4 LoRA adapters
    on query, key and value (peft; the head is peft's ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model
    bert = copy.deepcopy(_pretrained(seed, pretrain_steps))
    torch.manual_seed(seed)
    bert.classifier = torch.nn.Linear(bert.config.hidden_size, 2)
    bert.config.num_labels = bert.num_labels = 2
    adapters = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "key", "value"],
                          modules_to_save=["classifier"])
    return get_peft_model(bert, adapters)


def build(train, val, *, seed=0, inner_steps=5, lr=1.0, outer_lr=0.1, pretrain_steps=100):
    """The bilevel program. Returns ``(prog, model, weights)``."""
    model = lora_bert(seed, pretrain_steps)
    weights = ml.Hyper(c=torch.zeros(len(train[1])))           # sigmoid(0) = 0.5 each

    @ml.level(model, optimizer=ml.optim.sgd(lr=lr), data=train, steps=inner_steps, hypergrad=ml.hypergrad.Unroll())
    def finetune(model, batch, reweight):
        ids, y = batch
        losses = F.cross_entropy(model(ids).logits, y, reduction="none")
        return (torch.sigmoid(reweight.c) * losses).mean()

    @ml.level(weights, optimizer=ml.optim.adam(lr=outer_lr), data=val, depends_on=[finetune])
    def reweight(weights, batch, finetune):
        ids, y = batch
        logits = finetune(ids).logits
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(reweight, seed=seed), model, weights


def finetune_plain(train, *, seed=0, steps=750, lr=1.0, pretrain_steps=100):
    """The baseline: the same LoRA fine-tuning, every example weighted 1 (a one-level program)."""
    model = lora_bert(seed, pretrain_steps)

    @ml.level(model, optimizer=ml.optim.sgd(lr=lr), data=train)
    def finetune(model, batch):
        ids, y = batch
        return F.cross_entropy(model(ids).logits, y)

    ml.Program(finetune, seed=seed).fit(steps, progress=False)
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    ids, y = data
    return (model(ids).logits.argmax(-1) == y).float().mean().item()


def detection(weights, flipped):
    """Precision and recall of flagging weight < 0.5 as a flipped label."""
    flagged = weights < 0.5
    tp = (flagged & flipped).sum().item()
    return tp / max(1, flagged.sum().item()), tp / max(1, flipped.sum().item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=150, help="upper steps (default 150)")
    ap.add_argument("--inner-steps", type=int, default=5, help="LoRA steps per upper step (default 5)")
    ap.add_argument("--noise", type=float, default=0.4, help="fraction of flipped training labels (default 0.4)")
    ap.add_argument("--train", type=int, default=256, help="training sentences (default 256)")
    ap.add_argument("--pretrain-steps", type=int, default=100,
                    help="Adam steps of the base's pretraining (default 100)")
    ap.add_argument("--plain-lrs", type=lambda v: [float(x) for x in v.split(",")], default=[0.1, 0.3, 1.0],
                    help="learning rates of the plain baseline, the best on validation is compared (default 0.1,0.3,1)")
    ap.add_argument("--outer-lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train, val, test, flipped = task(args.seed, n_train=args.train, noise=args.noise)
    print(f"bilevel LoRA on a generated cue-word task: {len(train[1])} training sentences, "
          f"{int(flipped.sum())} labels flipped; {len(val[1])} clean validation, {len(test[1])} test")
    prog, model, weights = build(train, val, seed=args.seed, inner_steps=args.inner_steps, outer_lr=args.outer_lr,
                                 pretrain_steps=args.pretrain_steps)
    learned = sum(p.numel() for p in prog.params("finetune").values())
    print(f"trainable (adapters + head): {learned} of {sum(p.numel() for p in model.parameters())} parameters")
    prog.fit(args.iters, progress=False)
    w = torch.sigmoid(weights.c.detach())
    plain = {lr: finetune_plain(train, seed=args.seed, steps=args.iters * args.inner_steps, lr=lr,
                                pretrain_steps=args.pretrain_steps) for lr in args.plain_lrs}
    for lr, m in plain.items():
        print(f"plain LoRA, lr {lr}: test accuracy {accuracy(m, test):.4f}, validation {accuracy(m, val):.4f}")
    best = max(plain, key=lambda lr: accuracy(plain[lr], val))  # chosen on the clean validation set
    clean_only = finetune_plain(val, seed=args.seed, steps=args.iters * args.inner_steps, lr=best,
                                pretrain_steps=args.pretrain_steps)
    print(f"plain LoRA on the {len(val[1])} clean validation sentences alone (lr {best}): "
          f"test accuracy {accuracy(clean_only, test):.4f}")
    precision, recall = detection(w, flipped)
    print(f"test accuracy: plain LoRA on the noisy labels (lr {best}, the best on validation) "
          f"{accuracy(plain[best], test):.4f}; bilevel LoRA (reweighted) {accuracy(model, test):.4f}")
    print(f"flipped-label detection (weight < 0.5): precision {precision:.4f}, recall {recall:.4f}")
    print(f"mean weight: clean {w[~flipped].mean():.3f}, flipped {w[flipped].mean():.3f}")
    print(f"validation loss {prog.history[0]['reweight']:.4f} at step 1 -> {prog.history[-1]['reweight']:.4f}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return prog


if __name__ == "__main__":
    main()
