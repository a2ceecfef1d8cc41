# %% [markdown]
# # Meta-Weight-Net: learning a loss-weighting function on long-tailed digits
#
# [Shu et al. 2019](https://arxiv.org/abs/1902.07379). The training set is long-tailed: class c keeps
# `n_max * imbalance^(-c/9)` images, so at imbalance 100 the rarest digit has one or two examples. A
# small **weight net** maps each example's loss to a weight in (0, 1); the classifier trains on the
# weighted loss, and the weight net learns so that one classifier step does well on a small
# *balanced* meta set (10 images per class). The script `examples/meta_weight_net.py` runs all three
# imbalance factors (10, 50, 100).

# %%
import os
import torch, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, digits, long_tailed, sampler
from mlodsl_examples.meta_weight_net import build_baseline, classifier, weight_net, test_accuracy

SMALL = os.environ.get("MLODSL_SMALL") == "1"
torch.set_num_threads(1)

ITERS = 30 if SMALL else 1000
IMBALANCE = 100
train_pool, meta, test = digits(0)
train = long_tailed(train_pool, IMBALANCE)
counts = torch.bincount(train[1], minlength=CLASSES)
print("training images per class:", counts.tolist())

# %% [markdown]
# ## The two levels
#
# `classify` is the lower level: it *reads* `weights` (the weight net, called on the detached
# per-example losses) and takes one SGD step per step of `weights`. `weights` *depends on*
# `classify`: its loss is the classifier's cross-entropy on the meta set after that step, so its
# gradient is MW-Net's one-step look-ahead, here `Unroll()` through `steps=1`.

# %%
net, wnet = classifier(0), weight_net(0)

@ml.level(net, optimizer=ml.optim.sgd(lr=0.1, momentum=0.9, weight_decay=5e-4),
          data=sampler(train, 100, 0), steps=1, hypergrad=ml.hypergrad.Unroll())
def classify(net, batch, weights):
    x, y = batch
    losses = F.cross_entropy(net(x), y, reduction="none")
    w = weights(losses.detach().unsqueeze(1)).squeeze(1)      # weight_net(per-example loss)
    return (w * losses).sum() / (w.sum() + 1e-8)

@ml.level(wnet, optimizer=ml.optim.adam(lr=1e-3), data=meta, depends_on=[classify])
def weights(wnet, batch, classify):
    x, y = batch
    logits = classify(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

prog = ml.Program(weights, seed=0)
print(prog.schedule)

# %%
prog.show()

# %% [markdown]
# The generated step: the classifier's update runs inside the weight net's step, and the weight
# net's gradient is a vector-Jacobian product through that update.

# %%
print(prog.code)

# %% [markdown]
# ## Train, and the two baselines (plain training, class-balanced weights 1/n_c)

# %%
history = prog.fit(ITERS, progress=False)
results = {"MW-Net": test_accuracy(net, test)}
for name, cw in (("plain", torch.ones(CLASSES)), ("class-balanced", counts.sum() / (CLASSES * counts.float()))):
    base, base_net = build_baseline(train, cw, seed=0)
    base.fit(ITERS, progress=False)
    results[name] = test_accuracy(base_net, test)
for k, v in results.items():
    print(f"{k:15s} balanced test accuracy {v:.4f}")

# %%
# %matplotlib inline
# (re)selects the inline backend: prog.show()'s PNG drawing switches pyplot to Agg
fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
steps = [r["step"] for r in history]
ax[0].plot(steps, [r["classify"] for r in history], label="classifier (weighted train loss)", alpha=0.6)
ax[0].plot(steps, [r["weights"] for r in history], label="weight net (meta-set loss)")
ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].legend(); ax[0].set_title("training curves")
ax[1].plot(steps, [r["weights/acc"] for r in history])
ax[1].set_xlabel("step"); ax[1].set_ylabel("meta-set accuracy"); ax[1].set_title("meta-set accuracy after each step")
with torch.no_grad():
    losses = torch.linspace(0, 6, 100)
    ax[2].plot(losses, wnet(losses.unsqueeze(1)).squeeze(1))
ax[2].set_xlabel("per-example training loss"); ax[2].set_ylabel("weight")
ax[2].set_title("learned weighting function")
fig.tight_layout()

# %% [markdown]
# On these small digits the learned weighting function rises gently with the loss (it upweights hard
# examples, which are over-represented among the rare classes), but the balanced test accuracy stays
# within a test image or two of plain training; class-balanced weights do a little better. The table
# in `examples/README.md` has the measured numbers for all three imbalance factors. A larger
# meta learning rate (`--meta-lr 1e-2` in the script) makes the function steeper and, at imbalance 10
# and 50, collapses training onto the highest-loss examples.
