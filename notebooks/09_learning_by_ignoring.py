# %% [markdown]
# # Learning by Ignoring: three levels where the top depends on the middle *and* the bottom
#
# Betty's Learning-by-Ignoring example on digits. The **target** domain is digits shifted one pixel to the
# right, with only 2 labelled images per class. The **source** domain has many more images in four equal
# parts: shifted like the target, unshifted, transposed (a foreign domain) and with a wrong label.
#
# * bottom `pretrain`: a linear classifier on the source, each example weighted by sigmoid(c_i);
# * middle `finetune`: a second linear classifier on the target's few images, pulled toward the
#   pretrained one by lam ||theta - theta_pretrain||^2;
# * top `reweight`: the ignoring logits c, on the target's validation loss of `finetune`.
#
# As in Betty, `reweight` depends on `finetune` and on `pretrain`, and `finetune` on `pretrain`: a level
# under two uppers at different depths. `pretrain` runs before each update of `finetune` (its deepest
# upper), and `reweight` differentiates through the whole block (`Unroll` all the way down).

# %%
import os
import numpy as np
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml
from mlodsl_examples.digits_data import balanced_accuracy
from mlodsl_examples.learning_by_ignoring import KINDS, build, classifier, make_domains, target_only

SMALL = os.environ.get("MLODSL_SMALL") == "1"
torch.set_num_threads(1)

ITERS, MIDDLE, BOTTOM, LAM = (4, 2, 2, 0.05) if SMALL else (150, 5, 5, 0.05)
(source, kind), target_train, target_valid, test = make_domains(0)
print(len(kind), "source examples:", {name: int((kind == k).sum()) for k, name in enumerate(KINDS)})
print(len(target_train[1]), "target training images,", len(target_valid[1]), "to validate")

# %% [markdown]
# The three levels, written out (`build` in the example module does the same):

# %%
src_net, tgt_net = classifier(0), classifier(1)
weights = ml.Hyper(c=torch.zeros(len(kind)))

@ml.level(src_net, optimizer=ml.optim.sgd(lr=0.5), data=source, steps=BOTTOM)
def pretrain(net, batch, reweight):
    x, y = batch
    w = torch.sigmoid(reweight.c)
    return (w * F.cross_entropy(net(x), y, reduction="none")).sum() / w.sum() + 1e-3 * (net.weight ** 2).sum()

@ml.level(tgt_net, optimizer=ml.optim.sgd(lr=0.5), data=target_train, steps=MIDDLE, depends_on=[pretrain])
def finetune(net, batch, pretrain):
    x, y = batch
    anchor = ((net.weight - pretrain.weight) ** 2).sum() + ((net.bias - pretrain.bias) ** 2).sum()
    return F.cross_entropy(net(x), y) + LAM * anchor

@ml.level(weights, optimizer=ml.optim.adam(lr=0.1), data=target_valid, depends_on=[finetune, pretrain])
def reweight(weights, batch, finetune, pretrain):
    x, y = batch
    logits = finetune(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

prog = ml.Program(reweight, seed=0)
print(prog.show())      # as text

# %% [markdown]
# The level DAG: `pretrain` sits under two uppers, `finetune` and `reweight`.

# %%
prog.show()

# %% [markdown]
# The schedule: `pretrain`'s block runs inside `finetune`'s loop, before each of its updates; `reweight`
# sees `pretrain` where the last block left it, and its hypergradient goes through `finetune`'s updates
# with `pretrain`'s blocks inside.

# %%
print(prog.schedule)

# %%
history = prog.fit(ITERS, progress=False)
acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
common = dict(seed=0, bottom_steps=BOTTOM, lam=LAM)
uniform, _, uni_net, _ = build(source, target_train, target_valid, learn_weights=False, **common)
uniform.fit(ITERS * MIDDLE, progress=False)
oracle, _, ora_net, _ = build(source, target_train, target_valid, learn_weights=False,
                              fixed_weights=(kind == 0).float(), **common)
oracle.fit(ITERS * MIDDLE, progress=False)
alone = target_only(target_train, seed=0, steps=ITERS * MIDDLE, lam=LAM)
print(f"balanced target test accuracy: target only {acc(alone):.4f}; every source example {acc(uni_net):.4f}; "
      f"learning by ignoring {acc(tgt_net):.4f}; oracle (shifted source only) {acc(ora_net):.4f}")

# %%
# %matplotlib inline
# (re)selects the inline backend: prog.show()'s PNG drawing switches pyplot to Agg
fig, ax = plt.subplots(1, 3, figsize=(15, 3.5))
steps = [r["step"] for r in history]
for name in ("reweight", "finetune", "pretrain"):
    ax[0].plot(steps, [r[name] for r in history], label=name)
ax[0].set_xlabel("top step"); ax[0].set_ylabel("loss"); ax[0].legend(); ax[0].set_title("every level's loss")
w = torch.sigmoid(weights.c.detach())
bins = np.linspace(0, 1, 26)
for k, name in enumerate(KINDS):
    ax[1].hist(w[kind == k].numpy(), bins, alpha=0.5, label=name)
ax[1].set_xlabel("source example weight"); ax[1].legend(); ax[1].set_title("learned ignoring weights")
names = ["target only", "every source", "ignoring", "oracle"]
ax[2].bar(names, [acc(m) for m in (alone, uni_net, tgt_net, ora_net)])
ax[2].set_ylim(0.5, 1); ax[2].set_ylabel("balanced test accuracy"); ax[2].set_title("target domain")
fig.tight_layout()
