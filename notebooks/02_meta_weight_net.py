# %% [markdown]
# # Meta-Weight-Net: learning a loss-weighting function on long-tailed and on noisy digits
#
# [Shu et al. 2019](https://arxiv.org/abs/1902.07379). The training set is long-tailed: class c keeps
# `n_max * imbalance^(-c/9)` images, so at imbalance 100 the rarest digit has one or two examples. A
# small **weight net** maps each example's loss to a weight in (0, 1); the classifier trains on the
# weighted loss, and the weight net learns so that one classifier step does well on a small
# *balanced* meta set (10 images per class). The script `examples/meta_weight_net.py` runs all three
# imbalance factors (10, 50, 100), and, with `--noise 0.4`, the setting of the second half of this
# notebook: 40 % of the labels wrong, where MW-Net does win.

# %%
import os
import torch, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml
from mlodsl_examples.digits_data import CLASSES, corrupt, digits, long_tailed, sampler
from mlodsl_examples.meta_weight_net import (auc, build_baseline, build_mwn, classifier, mwn_example_weights,
                                             test_accuracy, weight_net)

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

# %% [markdown]
# ## Where MW-Net wins: 40 % uniform label noise
#
# Shu et al. report their largest gains with noisy labels. Here the whole (balanced) training pool is
# used, and 40 % of its labels are replaced by another class drawn uniformly. The classifier is a
# small CNN with BatchNorm (`model="cnn"`), trained for 500 steps (about 42 epochs; the learning rate
# drops tenfold for the last fifth). Plain training first fits the clean majority and then memorizes
# the wrong labels; a weighting function that *falls* with the loss stops that. The weight net is the
# same program as above (`build_mwn`), with a meta learning rate of 1e-2.

# %%
NOISY_ITERS = 30 if SMALL else 500
clean_train, meta, test = digits(0)
noisy, corrupted = corrupt(clean_train, 0.4)
print(len(noisy[1]), "training labels,", int(corrupted.sum()), "of them wrong")
setting = dict(seed=0, model="cnn", decay_at=int(0.8 * NOISY_ITERS))
plain_prog, plain_net = build_baseline(noisy, torch.ones(CLASSES), **setting)
plain_hist = plain_prog.fit(NOISY_ITERS, progress=False)
mwn_prog, mwn_net, mwn_wnet = build_mwn(noisy, meta, meta_lr=1e-2, **setting)
mwn_hist = mwn_prog.fit(NOISY_ITERS, progress=False)
w = mwn_example_weights(mwn_net, mwn_wnet, noisy)
print(f"plain on noisy labels: balanced test accuracy {test_accuracy(plain_net, test):.4f}")
print(f"MW-Net:                balanced test accuracy {test_accuracy(mwn_net, test):.4f}")
print(f"MW-Net's weights: mean {w[~corrupted].mean():.3f} on correct labels, {w[corrupted].mean():.3f} on wrong "
      f"ones (ROC AUC {auc(-w, corrupted):.3f} for finding the wrong ones)")

# %%
fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
steps = [r["step"] for r in mwn_hist]
ax[0].plot(steps, [r["classify"] for r in plain_hist], label="plain (train loss, noisy labels)", alpha=0.7)
ax[0].plot(steps, [r["weights"] for r in mwn_hist], label="MW-Net (meta-set loss)")
ax[0].set_xlabel("step"); ax[0].set_ylabel("loss"); ax[0].legend(); ax[0].set_title("training curves")
with torch.no_grad():
    losses = torch.linspace(0, 6, 100)
    ax[1].plot(losses, mwn_wnet(losses.unsqueeze(1)).squeeze(1))
ax[1].set_xlabel("per-example training loss"); ax[1].set_ylabel("weight")
ax[1].set_title("learned weighting function (noisy labels)")
ax[2].hist([w[~corrupted].numpy(), w[corrupted].numpy()], bins=20, label=["correct label", "wrong label"])
ax[2].set_xlabel("MW-Net weight at the end"); ax[2].set_ylabel("training examples"); ax[2].legend()
ax[2].set_title("weights of the training examples")
fig.tight_layout()

# %% [markdown]
# With noisy labels the learned function falls steeply with the loss: examples the classifier cannot
# fit (mostly the wrong labels) get almost no weight, and MW-Net ends far above plain training, which
# has memorized many wrong labels by the end. `examples/README.md` has the measured table, with
# per-example learned weights, plain training early-stopped on the meta set, and the clean-only ceiling.
