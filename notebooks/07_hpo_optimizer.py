# %% [markdown]
# # Learning the optimizer's hyperparameters by differentiating through it
#
# The per-feature L2 problem of the quickstart, plus the inner SGD's **learning rate** and **weight
# decay**: `ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), weight_decay=lambda outer:
# outer.log_wd.exp())`. The optimizer *reads* the outer level, so the schedule's inner updates are
# functions of (log_lr, log_wd) and `Unroll` differentiates the validation loss through every one of
# them. The inner level restarts from 0 each outer step (`start_from="init"`): the outer level tunes
# what 30 SGD steps from scratch achieve.

# %%
import math
import os
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml
from mlodsl_examples.hpo_logreg import DATA_DIM, evaluate_w, make_data
from mlodsl_examples.hpo_optimizer import train_fixed

SMALL = os.environ.get("MLODSL_SMALL") == "1"
torch.set_num_threads(1)

ITERS, INNER = (10, 10) if SMALL else (200, 30)
train, val, test, w_gt = make_data(0)

# %%
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
prog.show()

# %% [markdown]
# In the generated step, the inner update is handed the outer level's parameters (its `reads`),
# which is how the learning rate and weight decay enter the differentiated computation:

# %%
print(prog.code)

# %%
lrs, wds = [], []
history = prog.fit(ITERS, progress=False, callbacks=[
    lambda p, row: (lrs.append(p.params("outer")["log_lr"].exp().item()),
                    wds.append(p.params("outer")["log_wd"].exp().item()))])
lr, wd, l2 = lrs[-1], wds[-1], hyper.log_l2.detach().exp()
for name, w in {"start (lr 0.1, wd 1e-3, L2 1)": train_fixed(train, 0.1, 1e-3, INNER),
                "learned": train_fixed(train, lr, wd, INNER, l2)}.items():
    vl, va = evaluate_w(w, val)
    print(f"{name:30s} val loss {vl:.4f}  val acc {va:.3f}  test acc {evaluate_w(w, test)[1]:.3f}")

# %%
# %matplotlib inline
# (re)selects the inline backend: prog.show()'s PNG drawing switches pyplot to Agg
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
fig.tight_layout()
