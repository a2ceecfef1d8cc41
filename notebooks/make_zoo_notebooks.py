"""Writes the MLO-zoo notebooks (02-07) from their cells below, without outputs.

    python notebooks/make_zoo_notebooks.py

Each notebook pairs with a script in examples/ (same problem, its data helpers imported from there)
and runs a few steps only when MLODSL_SMALL=1 (the test suite does). Edit the cells here, not the
.ipynb files.
"""
import os
import sys

from nbformat.v4 import new_code_cell, new_markdown_cell

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_notebooks import write  # noqa: E402  (one writer: stable cell ids, validated, no outputs)

md, code = new_markdown_cell, new_code_cell

SETUP = """\
import os, sys
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml

sys.path.insert(0, os.path.abspath(os.path.join("..", "examples")))   # the examples' data helpers
SMALL = os.environ.get("MLODSL_SMALL") == "1"
torch.set_num_threads(1)
"""

PLOT = "%matplotlib inline\n# (re)selects the inline backend: prog.show()'s PNG drawing switches pyplot to Agg\n"

MWN = [
    md("""\
# Meta-Weight-Net: learning a loss-weighting function on long-tailed digits

[Shu et al. 2019](https://arxiv.org/abs/1902.07379). The training set is long-tailed: class c keeps
`n_max * imbalance^(-c/9)` images, so at imbalance 100 the rarest digit has one or two examples. A
small **weight net** maps each example's loss to a weight in (0, 1); the classifier trains on the
weighted loss, and the weight net learns so that one classifier step does well on a small
*balanced* meta set (10 images per class). The script `examples/meta_weight_net.py` runs all three
imbalance factors (10, 50, 100)."""),
    code(SETUP + """\
from digits_data import CLASSES, balanced_accuracy, digits, long_tailed, sampler
from meta_weight_net import build_baseline, classifier, weight_net, test_accuracy

ITERS = 30 if SMALL else 1000
IMBALANCE = 100
train_pool, meta, test = digits(0)
train = long_tailed(train_pool, IMBALANCE)
counts = torch.bincount(train[1], minlength=CLASSES)
print("training images per class:", counts.tolist())"""),
    md("""\
## The two levels

`classify` is the lower level: it *reads* `weights` (the weight net, called on the detached
per-example losses) and takes one SGD step per step of `weights`. `weights` *depends on*
`classify`: its loss is the classifier's cross-entropy on the meta set after that step, so its
gradient is MW-Net's one-step look-ahead, here `Unroll()` through `steps=1`."""),
    code("""\
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
print(prog.schedule)"""),
    code("prog.show()"),
    md("""\
The generated step: the classifier's update runs inside the weight net's step, and the weight
net's gradient is a vector-Jacobian product through that update."""),
    code("print(prog.code)"),
    md("## Train, and the two baselines (plain training, class-balanced weights 1/n_c)"),
    code("""\
history = prog.fit(ITERS, progress=False)
results = {"MW-Net": test_accuracy(net, test)}
for name, cw in (("plain", torch.ones(CLASSES)), ("class-balanced", counts.sum() / (CLASSES * counts.float()))):
    base, base_net = build_baseline(train, cw, seed=0)
    base.fit(ITERS, progress=False)
    results[name] = test_accuracy(base_net, test)
for k, v in results.items():
    print(f"{k:15s} balanced test accuracy {v:.4f}")"""),
    code(PLOT + """\
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
fig.tight_layout()"""),
    md("""\
On these small digits the learned weighting function rises gently with the loss (it upweights hard
examples, which are over-represented among the rare classes), but the balanced test accuracy stays
within a test image or two of plain training; class-balanced weights do a little better. The table
in `examples/README.md` has the measured numbers for all three imbalance factors. A larger
meta learning rate (`--meta-lr 1e-2` in the script) makes the function steeper and, at imbalance 10
and 50, collapses training onto the highest-loss examples."""),
]

CLEANING = [
    md("""\
# Data hyper-cleaning: one learned weight per training example

[Franceschi et al. 2017](https://arxiv.org/abs/1703.01785). Half of the digits' training labels are
replaced by a wrong class. Each training example i gets a logit c_i (an `ml.Hyper` with one entry
per example) and enters the classifier's loss with weight sigmoid(c_i). The weights are learned so
that the classifier does well on a small **clean** validation set (10 images per class); the
hypergradient uses the implicit function theorem (`CG`) at the classifier's warm-started solution."""),
    code(SETUP + """\
from digits_data import CLASSES, balanced_accuracy, corrupt, digits
from hyper_cleaning import L2, classifier, detection, train_plain

ITERS, INNER = (10, 5) if SMALL else (150, 20)
clean_train, val, test = digits(0)
train, corrupted = corrupt(clean_train, 0.5, 0)
print(len(train[1]), "training labels,", int(corrupted.sum()), "corrupted")"""),
    code("""\
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
prog.show()"""),
    md("""\
`classify`'s traced loss: the per-example weights enter as `sigmoid` of the `clean` level's
parameter, which is what makes the mixed second derivative (and so the hypergradient) non-zero."""),
    code('print(prog.levels["classify"].graph.code)'),
    code("""\
history = prog.fit(ITERS, progress=False)
weights = torch.sigmoid(cleaner.c.detach())
precision, recall, auc = detection(weights, corrupted)
noisy = train_plain(train, seed=0, steps=100 if SMALL else 1000)
acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
print(f"test accuracy: trained on the noisy labels {acc(noisy):.4f}, hyper-cleaning {acc(net):.4f}")
print(f"finding the corrupted labels (weight < 0.5): precision {precision:.3f}, recall {recall:.3f}, ROC AUC {auc:.3f}")"""),
    code(PLOT + """\
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
fig.tight_layout()"""),
    md("""\
With 100 clean labels the learned weights find about nine in ten corrupted labels, and the
classifier beats the one trained on all the noisy labels; it stays below the ceiling of training
on the clean half only (see the table in `examples/README.md`)."""),
]

DARTS = [
    md("""\
# DARTS: differentiable architecture search on a small cell

[Liu et al. 2019](https://arxiv.org/abs/1806.09055). A supernet over digits: a stem gives node 0;
node 1 = mix(0→1)(node 0), node 2 = mix(0→2)(node 0) + mix(1→2)(node 1); a linear head. Each
*mix* sums five candidate operations weighted by softmax(α_edge). The network weights are the
lower level (search-train half), α the upper level (search-validation half).

**First order** ignores the weights' response to α (`FirstOrder()`). **Second order** adds DARTS's
look-ahead term ξ·(−∂²L/∂α∂w)·∇_w L_val by finite differences: mlodsl's `FiniteDiff` computes the
product without the inner learning rate ξ, so the example defines a three-line method on the
documented interface that multiplies it by ξ."""),
    code(SETUP + """\
from digits_data import balanced_accuracy, digits, sampler
from darts_digits import EDGES, OPS, DartsSecondOrder, describe, discrete, supernet, train_fixed

ITERS = 20 if SMALL else 400
train, _, test = digits(0)
half = len(train[1]) // 2
s_train, s_val = (train[0][:half], train[1][:half]), (train[0][half:], train[1][half:])
print(supernet(0))"""),
    code("""\
def build(order):
    net, arch = supernet(0), ml.Hyper(alpha=torch.zeros(len(EDGES), len(OPS)))
    method = ml.hypergrad.FirstOrder() if order == 1 else DartsSecondOrder(xi=0.05)

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.05, momentum=0.9, weight_decay=3e-4),
              data=sampler(s_train, 100, 0), hypergrad=method)
    def weights(net, batch, search):
        x, y = batch
        return F.cross_entropy(net(x, search.alpha), y)

    @ml.level(arch, optimizer=ml.optim.adam(lr=0.01, betas=(0.5, 0.999), weight_decay=1e-3),
              data=sampler(s_val, 100, 1), depends_on=[weights])
    def search(arch, batch, weights):
        x, y = batch
        logits = weights(x, arch.alpha)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(-1) == y).float().mean()}

    return ml.Program(search, seed=0), net, arch

prog2, net2, arch2 = build(order=2)
print(prog2.schedule)
prog2.show()"""),
    md("The search level's loss, traced: the supernet is called with the architecture weights."),
    code('print(prog2.levels["search"].graph.code)'),
    code("""\
runs = {}
for order in (1, 2):
    prog, net, arch = build(order) if order == 1 else (prog2, net2, arch2)
    trace = []
    prog.fit(ITERS, progress=False, callbacks=[
        lambda p, row: trace.append(torch.softmax(p.params("search")["alpha"], -1).clone())])
    runs[order] = (prog, net, arch, torch.stack(trace))
    print(f"order {order}: derived cell [{describe(arch.alpha.detach())}]")"""),
    code(PLOT + """\
fig, ax = plt.subplots(2, len(EDGES), figsize=(14, 6), sharey=True)
for row, order in enumerate((1, 2)):
    trace = runs[order][3]
    for e, edge in enumerate(EDGES):
        for k, op in enumerate(OPS):
            ax[row, e].plot(trace[:, e, k], label=op)
        ax[row, e].set_title(f"{'first' if order == 1 else 'second'} order, edge {edge}")
        ax[row, e].set_xlabel("search step")
    ax[row, 0].set_ylabel("softmax(alpha)")
ax[0, -1].legend(fontsize=8)
fig.tight_layout()"""),
    code(PLOT + """\
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
for order in (1, 2):
    h = runs[order][0].history
    ax[0].plot([r["search"] for r in h], label=f"order {order}", alpha=0.8)
    ax[1].plot([r["weights"] for r in h], label=f"order {order}", alpha=0.8)
ax[0].set_title("search-validation loss (upper)"); ax[1].set_title("search-train loss (lower)")
for a in ax:
    a.set_xlabel("step"); a.legend()
fig.tight_layout()"""),
    md("Retrain each derived cell from scratch on the whole training pool, and the uniform mixture (no search):"),
    code("""\
steps = 50 if SMALL else 600
acc = lambda net, a: balanced_accuracy(net(test[0], a).detach(), test[1])
uniform = torch.zeros(len(EDGES), len(OPS))
print(f"uniform mixture (no search): {acc(train_fixed(train, uniform, steps=steps), uniform):.4f}")
for order in (1, 2):
    a = discrete(runs[order][2].alpha.detach())
    print(f"DARTS order {order} cell [{describe(a)}]: {acc(train_fixed(train, a, steps=steps), a):.4f}")"""),
    md("""\
Both searches move weight onto `skip` early (DARTS's well-known preference for parameter-free
operations, which help the supernet's validation loss early in training); at 400 steps the edge
0→2 has switched to `linear`. First and second order derive the same cell here, and it retrains
one point better than the uniform mixture (5 of 500 test images); `examples/README.md` has the
measured numbers."""),
]

MAML = [
    md("""\
# MAML on sinusoid regression: Unroll, FirstOrder and iMAML (CG)

[Finn et al. 2017](https://arxiv.org/abs/1703.03400). A task is y = A sin(x + φ); a learner sees 10
points of a new task, takes a few SGD steps from a meta-learned initialization, and is scored on
100 fresh points. The lower level `adapt` is batched over tasks (`tasks=True`, vmapped) and starts
each step from the upper level's parameters (`start_from="meta"`). Three hypergradients:

* `Unroll()`: MAML, exact through the inner steps;
* `FirstOrder()`: first-order MAML, the adapted point's gradient applied to the initialization;
* `CG(iters=5)` with a proximal term λ/2‖θ − θ_meta‖² in the lower loss: iMAML
  ([Rajeswaran et al. 2019](https://arxiv.org/abs/1909.04630)), implicit differentiation at the
  adapted point, memory independent of the number of inner steps."""),
    code(SETUP + """\
import copy
from maml_sinusoid import Episodes, meta_test, mlp, mse, pretrain

ITERS, TEST_TASKS = (10, 10) if SMALL else (500, 200)
INNER_STEPS, INNER_LR, LAM = 5, 0.01, 10.0"""),
    code("""\
def build(method):
    meta = mlp(0)
    episodes = Episodes(tasks=10, seed=0, inner_steps=INNER_STEPS)
    hypergrad = {"maml": ml.hypergrad.Unroll(), "fomaml": ml.hypergrad.FirstOrder(),
                 "imaml": ml.hypergrad.CG(iters=5)}[method]
    prox = LAM if method == "imaml" else 0.0

    @ml.level(copy.deepcopy(meta), optimizer=ml.optim.sgd(lr=INNER_LR), data=episodes.support,
              steps=INNER_STEPS, hypergrad=hypergrad, start_from="meta", tasks=True)
    def adapt(fast, batch, meta):
        x, y = batch
        fit = mse(fast(x), y)
        if prox:   # iMAML: stay near the initialization
            # named attributes: .parameters() inside a level is traced as a constant (an mlodsl bug)
            dist = sum(((getattr(fast[i], n) - getattr(meta[i], n)) ** 2).sum() for i in (0, 2, 4) for n in ("weight", "bias"))
            return fit + 0.5 * prox * dist
        return fit

    @ml.level(meta, optimizer=ml.optim.adam(lr=3e-3), data=episodes.query, depends_on=[adapt], name="meta")
    def meta_level(meta, batch, adapt):
        x, y = batch
        return mse(adapt(x), y)

    return ml.Program(meta_level, seed=0), meta

prog, _ = build("imaml")
print(prog.schedule)
prog.show()"""),
    md("iMAML's lower loss, traced: the proximal term reads the meta level's parameters."),
    code('print(prog.levels["adapt"].graph.code)'),
    code("""\
nets, histories = {}, {}
for method in ("maml", "fomaml", "imaml"):
    prog, nets[method] = build(method)
    histories[method] = prog.fit(ITERS, progress=False)
nets["pretrain"] = pretrain(ITERS, lr=3e-3)
results = {m: meta_test(n, steps=tuple(range(11)), tasks=TEST_TASKS)   # plain SGD for every method
           for m, n in nets.items()}
for m, r in results.items():
    print(f"{m:9s} meta-test MSE after 0/1/5/10 steps: " + " / ".join(f"{r[k]:.3f}" for k in (0, 1, 5, 10)))"""),
    code(PLOT + """\
fig, ax = plt.subplots(1, 3, figsize=(15, 3.8))
w = 25 if not SMALL else 1
for m, h in histories.items():
    v = np.array([r["meta"] for r in h])
    ax[0].plot(np.convolve(v, np.ones(w) / w, mode="valid"), label=m)
ax[0].set_xlabel("meta-step"); ax[0].set_ylabel(f"query MSE (moving mean of {w})"); ax[0].legend()
ax[0].set_title("meta-training")
for m, r in results.items():
    ax[1].plot(list(r), list(r.values()), marker="o", label=m)
ax[1].set_xlabel("SGD steps on the 10 shots"); ax[1].set_ylabel("meta-test MSE"); ax[1].legend()
ax[1].set_title("adaptation on new tasks")
# one new task: predictions before and after 10 steps
from torch.func import functional_call, grad
xs = torch.linspace(-5, 5, 10).unsqueeze(1); ys = 3.0 * torch.sin(xs + 1.0)
grid = torch.linspace(-5, 5, 200).unsqueeze(1)
ax[2].plot(grid, 3.0 * torch.sin(grid + 1.0), "k--", label="true")
ax[2].scatter(xs, ys, c="k")
for m in ("maml", "pretrain"):
    net = nets[m]; p = {k: v.detach() for k, v in net.named_parameters()}
    for _ in range(10):
        g = grad(lambda q: mse(functional_call(net, q, (xs,)), ys))(p)
        p = {k: p[k] - INNER_LR * g[k] for k in p}
    ax[2].plot(grid, functional_call(net, p, (grid,)).detach(), label=f"{m}, 10 steps")
ax[2].legend(fontsize=8); ax[2].set_title("a new task, 10 shots")
fig.tight_layout()"""),
    md("""\
The measured numbers (500 meta-steps, 200 test tasks) are in `examples/README.md`; the script
`examples/maml_sinusoid.py --iters 10000` trains longer."""),
]

THREE = [
    md("""\
# Three levels: source weights above example weights above a classifier

The digits' training labels come from four sources with 0 %, 20 %, 50 % and 80 % label noise.
Example i from source s(i) is weighted by sigmoid(a_s(i) + c_i): a **source** logit a (top level)
plus an **example** offset c (middle level), used by the **classifier** (bottom). The middle level
learns c on one clean set; the top level learns a on another, through the middle level's updates and
the classifier's updates inside them (`Unroll` all the way down)."""),
    code(SETUP + """\
from digits_data import balanced_accuracy
from three_level_sources import L2, NOISE, classifier, make_sources, plain

ITERS, BOTTOM, MIDDLE = (5, 5, 2) if SMALL else (100, 10, 2)
(train, source, corrupted), clean1, clean2, test = make_sources(0)
print(len(source), "training labels; per source noise", NOISE)"""),
    code("""\
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
print(prog.show())      # as text"""),
    md("""\
The level DAG. Solid `depends_on` edges go down (sources → examples → classify); `reads` edges go
up (the classifier reads both weight levels). `sources` also names `classify` without depending on
it: its loss evaluates the classifier, and the unrolled hypergradient follows every path."""),
    code("prog.show()"),
    code("""\
print(prog.schedule)
print(sorted(prog.graph.edges(data="kind")))"""),
    md("The generated step nests the loops exactly as the schedule says:"),
    code("print(prog.code)"),
    code("""\
history = prog.fit(ITERS, progress=False)
base = plain(train, seed=0, steps=ITERS * MIDDLE * BOTTOM)
acc = lambda m: balanced_accuracy(m(test[0]).detach(), test[1])
print(f"balanced test accuracy: plain on noisy labels {acc(base):.4f}, three levels {acc(net):.4f}")"""),
    code(PLOT + """\
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
fig.tight_layout()"""),
]

HPO = [
    md("""\
# Learning the optimizer's hyperparameters by differentiating through it

The per-feature L2 problem of the quickstart, plus the inner SGD's **learning rate** and **weight
decay**: `ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), weight_decay=lambda outer:
outer.log_wd.exp())`. The optimizer *reads* the outer level, so the schedule's inner updates are
functions of (log_lr, log_wd) and `Unroll` differentiates the validation loss through every one of
them. The inner level restarts from 0 each outer step (`start_from="init"`): the outer level tunes
what 30 SGD steps from scratch achieve."""),
    code(SETUP + """\
import math
from hpo_logreg import DATA_DIM, evaluate_w, make_data
from hpo_optimizer import train_fixed

ITERS, INNER = (10, 10) if SMALL else (200, 30)
train, val, test, w_gt = make_data(0)"""),
    code("""\
net = nn.Linear(DATA_DIM, 1, bias=False)
nn.init.zeros_(net.weight)
hyper = ml.Hyper(log_lr=torch.tensor(math.log(0.1)), log_wd=torch.tensor(math.log(1e-3)),
                 log_l2=torch.zeros(DATA_DIM))
opt = ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), weight_decay=lambda outer: outer.log_wd.exp())

@ml.level(net, optimizer=opt, data=train, steps=INNER, hypergrad=ml.hypergrad.Unroll(), start_from="init")
def inner(net, batch, outer):
    x, y = batch
    fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
    return fit + 0.5 * (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

@ml.level(hyper, optimizer=ml.optim.adam(lr=0.05), data=val, depends_on=[inner])
def outer(hyper, batch, inner):
    x, y = batch
    logits = inner(x).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logits, y), {"acc": ((logits > 0).float() == y).float().mean()}

prog = ml.Program(outer, seed=0)
print(prog.schedule)
prog.show()"""),
    md("""\
In the generated step, the inner update is handed the outer level's parameters (its `reads`),
which is how the learning rate and weight decay enter the differentiated computation:"""),
    code("print(prog.code)"),
    code("""\
lrs, wds = [], []
history = prog.fit(ITERS, progress=False, callbacks=[
    lambda p, row: (lrs.append(p.params("outer")["log_lr"].exp().item()),
                    wds.append(p.params("outer")["log_wd"].exp().item()))])
lr, wd, l2 = lrs[-1], wds[-1], hyper.log_l2.detach().exp()
for name, w in {"start (lr 0.1, wd 1e-3, L2 1)": train_fixed(train, 0.1, 1e-3, INNER),
                "learned": train_fixed(train, lr, wd, INNER, l2)}.items():
    vl, va = evaluate_w(w, val)
    print(f"{name:30s} val loss {vl:.4f}  val acc {va:.3f}  test acc {evaluate_w(w, test)[1]:.3f}")"""),
    code(PLOT + """\
fig, ax = plt.subplots(1, 3, figsize=(15, 3.5))
steps = [r["step"] for r in history]
ax[0].plot(steps, [r["outer"] for r in history], label="validation loss after the inner steps")
ax[0].plot(steps, [r["inner"] for r in history], label="inner loss (last inner step)")
ax[0].set_xlabel("outer step"); ax[0].legend(); ax[0].set_title("training curves")
ax[1].plot(steps, lrs, label="learning rate"); ax[1].plot(steps, wds, label="weight decay")
ax[1].set_yscale("log"); ax[1].set_xlabel("outer step"); ax[1].legend(); ax[1].set_title("optimizer hyperparameters")
order = np.argsort(np.abs(w_gt))
ax[2].bar(range(DATA_DIM), l2.numpy()[order]); ax[2].set_yscale("log")
ax[2].set_xticks(range(DATA_DIM), [f"{abs(w_gt[i]):.2f}" for i in order], rotation=90)
ax[2].set_xlabel("feature, by |true weight|"); ax[2].set_title("learned per-feature L2")
fig.tight_layout()"""),
]

NOTEBOOKS = {
    "02_meta_weight_net.ipynb": MWN,
    "03_hyper_cleaning.ipynb": CLEANING,
    "04_darts.ipynb": DARTS,
    "05_maml_sinusoid.ipynb": MAML,
    "06_three_levels.ipynb": THREE,
    "07_hpo_optimizer.ipynb": HPO,
}


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        print(write(name, cells))
