# %% [markdown]
# # Data hyper-cleaning: one learned weight per training example
#
# [Franceschi et al. 2017](https://arxiv.org/abs/1703.01785). Half of the digits' training labels are
# replaced by a wrong class. Each training example i gets a logit c_i (an `ml.Hyper` with one entry
# per example) and enters the classifier's loss with weight sigmoid(c_i). The weights are learned so
# that the classifier does well on a small **clean** validation set (10 images per class); the
# hypergradient uses the implicit function theorem (`CG`) at the classifier's warm-started solution.

# %%
import os
import numpy as np
import torch, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml
from mlodsl_examples.digits_data import balanced_accuracy, corrupt, digits
from mlodsl_examples.hyper_cleaning import L2, classifier, detection, train_plain

SMALL = os.environ.get("MLODSL_SMALL") == "1"
torch.set_num_threads(1)

ITERS, INNER = (10, 5) if SMALL else (150, 20)
clean_train, val, test = digits(0)
train, corrupted = corrupt(clean_train, 0.5, 0)
print(len(train[1]), "training labels,", int(corrupted.sum()), "corrupted")

# %%
net = classifier(0)
cleaner = ml.Hyper(c=torch.zeros(len(train[1])))

@ml.level(net, optimizer=ml.optim.sgd(lr=0.5), data=train, steps=INNER, hypergrad=ml.hypergrad.CG(iters=10))
def classify(net, batch, clean):
    x, y = batch
    losses = F.cross_entropy(net(x), y, reduction="none")
    return (torch.sigmoid(clean.c) * losses).mean() + L2 * (net.weight ** 2).sum()

@ml.level(cleaner, optimizer=ml.optim.adam(lr=0.1), data=val, depends_on=[classify])
def clean(cleaner, batch, classify):
    x, y = batch
    logits = classify(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

prog = ml.Program(clean, seed=0)
print(prog.schedule)
prog.show()

# %% [markdown]
# `classify`'s traced loss: the per-example weights enter as `sigmoid` of the `clean` level's
# parameter, which is what makes the mixed second derivative (and so the hypergradient) non-zero.

# %%
print(prog.levels["classify"].graph.code)

# %%
history = prog.fit(ITERS, progress=False)
weights = torch.sigmoid(cleaner.c.detach())
precision, recall, auc = detection(weights, corrupted)
noisy = train_plain(train, seed=0, steps=100 if SMALL else 1000)
acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
print(f"test accuracy: trained on the noisy labels {acc(noisy):.4f}, hyper-cleaning {acc(net):.4f}")
print(f"finding the corrupted labels (weight < 0.5): precision {precision:.3f}, recall {recall:.3f}, ROC AUC {auc:.3f}")

# %%
# %matplotlib inline
# (re)selects the inline backend: prog.show()'s PNG drawing switches pyplot to Agg
fig, ax = plt.subplots(1, 3, figsize=(14, 3.5))
steps = [r["step"] for r in history]
ax[0].plot(steps, [r["clean"] for r in history], label="validation loss (upper)")
ax[0].plot(steps, [r["classify"] for r in history], label="weighted training loss (lower)")
ax[0].set_xlabel("upper step"); ax[0].legend(); ax[0].set_title("training curves")
ax[1].plot(steps, [r["clean/acc"] for r in history])
ax[1].set_xlabel("upper step"); ax[1].set_title("clean validation accuracy")
bins = np.linspace(0, 1, 26)
ax[2].hist(weights[~corrupted].numpy(), bins, alpha=0.6, label="correct label")
ax[2].hist(weights[corrupted].numpy(), bins, alpha=0.6, label="corrupted label")
ax[2].set_xlabel("learned weight sigmoid(c_i)"); ax[2].set_ylabel("examples"); ax[2].legend()
ax[2].set_title("learned weights separate the corrupted labels")
fig.tight_layout()

# %% [markdown]
# With 100 clean labels the learned weights find about nine in ten corrupted labels, and the
# classifier beats the one trained on all the noisy labels; it stays below the ceiling of training
# on the clean half only (see the table in `examples/README.md`).
