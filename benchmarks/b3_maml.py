"""B3: MAML on sinusoid regression. MLP 1-40-40-1 (ReLU), meta-batch 25 tasks of 10 support and
10 query points (amplitude U[0.1, 5], phase U[0, π], x U[-5, 5]), 5 inner SGD steps (lr 0.01) from
the meta-parameters, second order; Adam (lr 1e-3) on the mean query loss.

Contenders (one outer step = one meta-batch):
* ``mlodsl``: a lower level with ``start_from=<upper>`` and ``tasks=True`` (one vmapped
  computation over the 25 tasks), ``Unroll()``;
* ``higher``: ``higher.innerloop_ctx`` per task, as higher's MAML example;
* ``torchopt``: ``torchopt.MetaSGD`` with ``extract_state_dict``/``recover_state_dict`` per task, as
  TorchOpt's MAML example;
* ``floor``: hand-written ``torch.func``: ``vmap`` over tasks of 5 ``torch.func.grad`` steps, then
  one backward (the same computation as mlodsl's);
* ``floor-loop``: hand-written per-task loop with ``torch.autograd.grad(create_graph=True)``.
Every contender sees the same meta-batches in the same order.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .common import Contender

TASKS, SHOTS, STEPS, INNER_LR, META_LR, NBATCH = 25, 10, 5, 0.01, 1e-3, 8


def configs(quick: bool) -> list:
    return [{"label": "MLP 1-40-40-1, 5 inner steps, 25 tasks"}]


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def data(config):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(NBATCH):
        amp = 0.1 + 4.9 * torch.rand(TASKS, 1, 1, generator=g)
        phase = math.pi * torch.rand(TASKS, 1, 1, generator=g)
        xs = 10 * torch.rand(TASKS, SHOTS, 1, generator=g) - 5
        xq = 10 * torch.rand(TASKS, SHOTS, 1, generator=g) - 5
        batches.append(((xs, amp * torch.sin(xs + phase)), (xq, amp * torch.sin(xq + phase))))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    return batches, net


def _upper(net):
    return lambda: {k: v.detach().clone() for k, v in net.named_parameters()}


def make_mlodsl(data, config):
    import mlodsl as ml
    batches, net0 = data
    meta, fast = copy.deepcopy(net0), copy.deepcopy(net0)

    # A list is drawn from once per update: each support set is repeated for the 5 inner steps.
    support = [b[0] for b in batches for _ in range(STEPS)]

    @ml.level(fast, optimizer=ml.optim.sgd(lr=INNER_LR), data=support, steps=STEPS,
              hypergrad=ml.hypergrad.Unroll(), start_from="maml", tasks=True)
    def adapt(fast, batch):
        x, y = batch
        return mse(fast(x), y)

    @ml.level(meta, optimizer=ml.optim.adam(lr=META_LR), data=[b[1] for b in batches], depends_on=[adapt])
    def maml(meta, batch, adapt):
        x, y = batch
        return mse(adapt(x), y)

    prog = ml.Program(maml)
    return Contender(prog.step, lambda: prog.params("maml"))


def make_higher(data, config):
    import higher
    batches, net0 = data
    net = copy.deepcopy(net0)
    opt = torch.optim.Adam(net.parameters(), lr=META_LR)
    inner_opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)
    it = [0]

    def step():
        (xs, ys), (xq, yq) = batches[it[0] % NBATCH]
        it[0] += 1
        opt.zero_grad()
        for t in range(TASKS):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(STEPS):
                    diffopt.step(mse(fnet(xs[t]), ys[t]))
                (mse(fnet(xq[t]), yq[t]) / TASKS).backward()
        opt.step()
    return Contender(step, _upper(net))


def make_torchopt(data, config):
    import torchopt
    batches, net0 = data
    net = copy.deepcopy(net0)
    opt = torch.optim.Adam(net.parameters(), lr=META_LR)
    inner_opt = torchopt.MetaSGD(net, lr=INNER_LR)
    it = [0]

    def step():
        (xs, ys), (xq, yq) = batches[it[0] % NBATCH]
        it[0] += 1
        opt.zero_grad()
        net_state = torchopt.extract_state_dict(net)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for t in range(TASKS):
            for _ in range(STEPS):
                inner_opt.step(mse(net(xs[t]), ys[t]))
            (mse(net(xq[t]), yq[t]) / TASKS).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        opt.step()
    return Contender(step, _upper(net))


def make_floor(data, config):
    batches, net0 = data
    net = copy.deepcopy(net0)
    opt = torch.optim.Adam(net.parameters(), lr=META_LR)
    it = [0]

    def task_loss(params, xs, ys, xq, yq):
        def support_loss(p):
            return mse(functional_call(net, p, (xs,)), ys)
        p = params
        for _ in range(STEPS):
            g = grad(support_loss)(p)
            p = {k: p[k] - INNER_LR * g[k] for k in p}
        return mse(functional_call(net, p, (xq,)), yq)

    def step():
        (xs, ys), (xq, yq) = batches[it[0] % NBATCH]
        it[0] += 1
        opt.zero_grad()
        params = dict(net.named_parameters())
        vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean().backward()
        opt.step()
    return Contender(step, _upper(net))


def make_floor_loop(data, config):
    batches, net0 = data
    net = copy.deepcopy(net0)
    opt = torch.optim.Adam(net.parameters(), lr=META_LR)
    it = [0]

    def step():
        (xs, ys), (xq, yq) = batches[it[0] % NBATCH]
        it[0] += 1
        opt.zero_grad()
        params = dict(net.named_parameters())
        for t in range(TASKS):
            p = params
            for _ in range(STEPS):
                gs = torch.autograd.grad(mse(functional_call(net, p, (xs[t],)), ys[t]), list(p.values()),
                                         create_graph=True)
                p = {k: v - INNER_LR * g for (k, v), g in zip(p.items(), gs)}
            (mse(functional_call(net, p, (xq[t],)), yq[t]) / TASKS).backward()
        opt.step()
    return Contender(step, _upper(net))


CONTENDERS = {"mlodsl": make_mlodsl, "higher": make_higher, "torchopt": make_torchopt, "floor": make_floor,
              "floor-loop": make_floor_loop}
TARGETS = [("mlodsl", "higher", 0.5), ("mlodsl", "torchopt", 0.8), ("mlodsl", "floor", 1.1)]
SAME_MATH = [("mlodsl", "floor"), ("higher", "floor"), ("torchopt", "floor"), ("floor-loop", "floor")]
