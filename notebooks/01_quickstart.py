# %% [markdown]
# # mlodsl quickstart: learning a per-feature L2 penalty
#
# A bilevel problem written as two levels. The **inner** level fits a logistic regression on the
# training half of the data, penalized by `exp(log_l2)` per feature; the **outer** level learns
# `log_l2` so that the inner *solution* does well on the validation half. The outer gradient is a
# hypergradient: it goes through the inner level's SGD steps.
#
# The data are Betty's hello world (1000 points in 20 dimensions, half train, half validation).
# Set `MLODSL_SMALL=1` in the environment to run a few steps only (the test suite does).

# %%
import os
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
import matplotlib.pyplot as plt
import mlodsl as ml

SMALL = os.environ.get("MLODSL_SMALL") == "1"
ITERS, INNER_STEPS = (5, 10) if SMALL else (150, 100)
torch.set_num_threads(1)

# Betty's hello-world data: labels from a random linear model with a little noise
np.random.seed(0)
w_gt = np.random.randn(20)
x = np.random.randn(1000, 20)
y = ((x @ w_gt + 0.1 * np.random.randn(1000)) > 0).astype(float)
x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
train, val = (x[:500], y[:500]), (x[500:], y[500:])

# %% [markdown]
# ## The levels
#
# Each level is a plain function. Its first parameter is the level's own module (called with the
# current parameters), `batch` is the level's batch, and every other parameter names another level.
# `inner` *reads* `outer` (its penalty); `outer` *depends on* `inner` (its loss goes through
# `inner`'s solution), so `outer`'s gradient is a hypergradient.

# %%
net = nn.Linear(20, 1, bias=False)
nn.init.zeros_(net.weight)
hyper = ml.Hyper(log_l2=torch.zeros(20))          # every penalty starts at exp(0) = 1

@ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train, steps=INNER_STEPS,
          hypergrad=ml.hypergrad.Unroll())
def inner(net, batch, outer):
    x, y = batch
    fit = F.binary_cross_entropy_with_logits(net(x).squeeze(-1), y)
    return fit + 0.5 * (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

@ml.level(hyper, optimizer=ml.optim.adam(lr=0.1), data=val, depends_on=[inner])
def outer(hyper, batch, inner):
    x, y = batch
    return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

prog = ml.Program(outer, seed=0)
prog

# %% [markdown]
# ## What mlodsl built
#
# Every stage of the pipeline can be printed. The **schedule** is the planned order of operations
# for one `prog.step()`:

# %%
print(prog.schedule)

# %% [markdown]
# Each level's loss was traced with `torch.fx`; its inputs are the batch and the parameters of the
# levels it uses, named after them:

# %%
print(prog.levels["inner"].graph.code)

# %% [markdown]
# The **generated step** is real Python source built from the plan: this is exactly the code that
# runs on `prog.step()` (inner loops stay loops).

# %%
print(prog.code)

# %% [markdown]
# The level DAG is a `networkx.MultiDiGraph` (`prog.graph`); `prog.show()` draws it (a text drawing
# when printed).

# %%
print(prog.graph.edges(data="kind"))
print(prog.show())

# %%
prog.show()

# %% [markdown]
# ## Fit
#
# `prog.hypergradient("outer")` is the gradient the next step would apply (it changes nothing);
# `prog.fit` runs the steps and records every level's loss in `prog.history`.

# %%
g = prog.hypergradient("outer")["log_l2"]
print("first hypergradient, norm:", g.norm().item())
history = prog.fit(ITERS, progress=False)
history[-1]

# %%
# %matplotlib inline
# (re)selects the inline backend: prog.show()'s PNG drawing above switched pyplot to Agg
fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
steps = [row["step"] for row in history]
for name in ("inner", "outer"):
    ax[0].plot(steps, [row[name] for row in history], label=f"{name} loss")
ax[0].set_xlabel("outer step"); ax[0].set_ylabel("loss"); ax[0].legend()
ax[0].set_title("losses (outer = validation loss of the inner solution)")

penalty = hyper.log_l2.detach().exp().numpy()
order = np.argsort(np.abs(w_gt))
ax[1].bar(range(20), penalty[order])
ax[1].set_yscale("log")
ax[1].set_xticks(range(20), [f"{abs(w_gt[i]):.2f}" for i in order], rotation=90)
ax[1].set_xlabel("feature, by |true weight|"); ax[1].set_ylabel("learned penalty exp(log_l2)")
ax[1].set_title("learned per-feature L2")
fig.tight_layout()

# %%
with torch.no_grad():
    for split, (xs, ys) in {"train": train, "validation": val}.items():
        logits = net(xs).squeeze(-1)
        acc = ((logits > 0).float() == ys).float().mean().item()
        print(f"{split:10s} loss {F.binary_cross_entropy_with_logits(logits, ys).item():.4f}  accuracy {acc:.3f}")

# %% [markdown]
# Try another hypergradient method by changing `hypergrad=` on the inner level:
# `ml.hypergrad.Forward()` computes the same hypergradient in forward mode, `Unroll(last=10)`
# backpropagates through the last 10 inner steps only, and `FirstOrder()` ignores the second-order
# terms (here the outer loss does not touch `log_l2` directly, so its hypergradient is zero).
