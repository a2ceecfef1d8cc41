# %% [markdown]
# # Three levels: source weights above example weights above a classifier
#
# The digits' training labels come from four sources with 0 %, 20 %, 50 % and 80 % label noise.
# Example i from source s(i) is weighted by sigmoid(a_s(i) + c_i): a **source** logit a (top level)
# plus an **example** offset c (middle level), used by the **classifier** (bottom). The middle level
# learns c on one clean set; the top level learns a on another, through the middle level's updates and
# the classifier's updates inside them (`Unroll` all the way down).

# %%
import os
import numpy as np
import torch, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml
from mlodsl_examples.digits_data import balanced_accuracy
from mlodsl_examples.three_level_sources import L2, NOISE, classifier, make_sources, plain

SMALL = os.environ.get("MLODSL_SMALL") == "1"
torch.set_num_threads(1)

ITERS, BOTTOM, MIDDLE = (5, 5, 2) if SMALL else (100, 10, 2)
(train, source, corrupted), clean1, clean2, test = make_sources(0)
print(len(source), "training labels; per source noise", NOISE)

# %%
net = classifier(0)
offsets = ml.Hyper(c=torch.zeros(len(source)))
src = ml.Hyper(a=torch.zeros(len(NOISE)))

@ml.level(net, optimizer=ml.optim.sgd(lr=0.5), data=train, steps=BOTTOM)
def classify(net, batch, examples, sources):
    x, y = batch
    w = torch.sigmoid(sources.a[source] + examples.c)
    return (w * F.cross_entropy(net(x), y, reduction="none")).mean() + L2 * (net.weight ** 2).sum()

@ml.level(offsets, optimizer=ml.optim.adam(lr=0.1), data=clean1, steps=MIDDLE, depends_on=[classify])
def examples(offsets, batch, classify):
    x, y = batch
    return F.cross_entropy(classify(x), y) + 1e-3 * (offsets.c ** 2).sum()

@ml.level(src, optimizer=ml.optim.adam(lr=0.1), data=clean2, depends_on=[examples])
def sources(src, batch, examples, classify):
    x, y = batch
    logits = classify(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

prog = ml.Program(sources, seed=0)
print(prog.show())      # as text

# %% [markdown]
# The level DAG. Solid `depends_on` edges go down (sources → examples → classify); `reads` edges go
# up (the classifier reads both weight levels). `sources` also names `classify` without depending on
# it: its loss evaluates the classifier, and the unrolled hypergradient follows every path.

# %%
prog.show()

# %%
print(prog.schedule)
print(sorted(prog.graph.edges(data="kind")))

# %% [markdown]
# The generated step nests the loops exactly as the schedule says:

# %%
print(prog.code)

# %%
history = prog.fit(ITERS, progress=False)
base = plain(train, seed=0, steps=ITERS * MIDDLE * BOTTOM)
acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
print(f"balanced test accuracy: plain on noisy labels {acc(base):.4f}, three levels {acc(net):.4f}")

# %%
# %matplotlib inline
# (re)selects the inline backend: prog.show()'s PNG drawing switches pyplot to Agg
fig, ax = plt.subplots(1, 3, figsize=(15, 3.5))
steps = [r["step"] for r in history]
for name in ("sources", "examples", "classify"):
    ax[0].plot(steps, [r[name] for r in history], label=name)
ax[0].set_xlabel("top step"); ax[0].set_ylabel("loss"); ax[0].legend(); ax[0].set_title("every level's loss")
ax[1].bar([f"{int(100 * r)}%" for r in NOISE], torch.sigmoid(src.a.detach()).numpy())
ax[1].set_xlabel("source label noise"); ax[1].set_ylabel("sigmoid(a)"); ax[1].set_title("learned source weights")
w = torch.sigmoid(src.a.detach()[source] + offsets.c.detach())
bins = np.linspace(0, 1, 26)
ax[2].hist(w[~corrupted].numpy(), bins, alpha=0.6, label="correct label")
ax[2].hist(w[corrupted].numpy(), bins, alpha=0.6, label="corrupted label")
ax[2].set_xlabel("example weight"); ax[2].legend(); ax[2].set_title("learned example weights")
fig.tight_layout()
