"""B2: Meta-Weight-Net reweighting. A classifier MLP 64-256-256-10 on synthetic 10-class data with
40% of the training labels flipped at random, batch 128; a weight net 1-100-1 maps each example's
loss (detached) to a sigmoid weight; the classifier takes 1 SGD step (lr 0.1, momentum 0.9, weight
decay 5e-4) on the weighted loss per outer step (as MWN does), and the weight net one Adam step
(lr 1e-3, weight decay 1e-4) on the clean meta batch's cross-entropy through the classifier's
response.

Contenders, one per hypergradient method (mlodsl / Betty 0.2.1 / hand-written floor):
* ``*-fd``: finite differences (mlodsl ``FiniteDiff(eps=0.01)``, Betty ``type="darts"``);
* ``*-cg``: ``CG(iters=3)`` (Betty ``type="cg"``, cg_iterations=3);
* ``*-neumann``: ``Neumann(iters=3, alpha=0.1)`` (Betty ``neumann_iterations=3, neumann_alpha=0.1``).
The floors use ``torch.func.functional_call`` and the autograd tape (``torch.autograd.grad``).
Every contender sees the same batches in the same order.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .common import Contender

DIM, CLASSES, BATCH, NOISE, NBATCH = 64, 10, 128, 0.4, 16
LR, MOM, WD, META_LR, META_WD = 0.1, 0.9, 5e-4, 1e-3, 1e-4
METHODS = {"fd": "darts", "cg": "cg", "neumann": "neumann"}


def configs(quick: bool) -> list:
    return [{"label": "MLP 64-256-256-10, batch 128, 1 inner step"}]


def data(config):
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(CLASSES, DIM, generator=g)

    def draw(n, noisy):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        x = means[y] + torch.randn(n, DIM, generator=g)
        if noisy:
            flip = torch.rand(n, generator=g) < NOISE
            y = torch.where(flip, torch.randint(0, CLASSES, (n,), generator=g), y)
        return x, y

    train = [draw(BATCH, True) for _ in range(NBATCH)]
    meta = [draw(BATCH, False) for _ in range(NBATCH)]
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Linear(DIM, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1))
    return train, meta, clf, wnet


def weighted_loss(logits, y, wnet_out_fn):
    losses = F.cross_entropy(logits, y, reduction="none")
    w = torch.sigmoid(wnet_out_fn(losses.detach().unsqueeze(1))).squeeze(1)
    return (w * losses).mean()


def _mlodsl(method, compile=False):
    def make(data, config):
        import mlodsl as ml
        train, meta, clf0, wnet0 = data
        clf, wnet = copy.deepcopy(clf0), copy.deepcopy(wnet0)
        hg = {"fd": lambda: ml.hypergrad.FiniteDiff(eps=0.01), "cg": lambda: ml.hypergrad.CG(iters=3),
              "neumann": lambda: ml.hypergrad.Neumann(iters=3, alpha=0.1)}[method]()

        @ml.level(clf, optimizer=ml.optim.sgd(lr=LR, momentum=MOM, weight_decay=WD), data=train, steps=1,
                  hypergrad=hg)
        def classifier(clf, batch, reweight):
            x, y = batch
            return weighted_loss(clf(x), y, reweight)

        @ml.level(wnet, optimizer=ml.optim.adam(lr=META_LR, weight_decay=META_WD), data=meta,
                  depends_on=[classifier])
        def reweight(wnet, batch, classifier):
            x, y = batch
            return F.cross_entropy(classifier(x), y)

        prog = ml.Program(reweight, compile=compile)
        return Contender(prog.step, lambda: prog.params("reweight"))
    return make


def _betty(method):
    def make(data, config):
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem
        train, meta, clf0, wnet0 = data

        class Reweight(ImplicitProblem):
            def training_step(self, batch):
                x, y = batch
                return F.cross_entropy(self.classifier(x), y)

        class Classifier(ImplicitProblem):
            def training_step(self, batch):
                x, y = batch
                return weighted_loss(self.module(x), y, self.reweight)

        rw_mod, clf_mod = copy.deepcopy(wnet0), copy.deepcopy(clf0)
        outer = Reweight(name="reweight", module=rw_mod, train_data_loader=list(meta),
                         optimizer=torch.optim.Adam(rw_mod.parameters(), lr=META_LR, weight_decay=META_WD),
                         config=Config(log_step=-1, first_order=True, retain_graph=True))
        extra = {"fd": dict(darts_alpha=0.01), "cg": dict(cg_iterations=3),
                 "neumann": dict(neumann_iterations=3, neumann_alpha=0.1)}[method]
        inner = Classifier(name="classifier", module=clf_mod, train_data_loader=list(train),
                           optimizer=torch.optim.SGD(clf_mod.parameters(), lr=LR, momentum=MOM, weight_decay=WD),
                           config=Config(type=METHODS[method], unroll_steps=1, **extra))
        engine = Engine(config=EngineConfig(train_iters=0, logger_type="none"), problems=[outer, inner],
                        dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
        engine.train()

        def step():
            engine.global_step += 1
            engine.train_step()
        return Contender(step, lambda: {k: v.detach().clone() for k, v in rw_mod.named_parameters()},
                         note=f"Betty type={METHODS[method]}")
    return make


class _Floor:
    """The same math by hand: functional_call + torch.autograd.grad, torch.optim.Adam outer."""

    def __init__(self, data, method):
        train, meta, clf0, wnet0 = data
        self.train, self.meta, self.method, self.i = train, meta, method, 0
        self.clf = copy.deepcopy(clf0)
        self.p = {k: v.detach().clone() for k, v in self.clf.named_parameters()}
        self.buf = None
        self.wnet = copy.deepcopy(wnet0)
        self.wp = list(self.wnet.parameters())
        self.opt = torch.optim.Adam(self.wp, lr=META_LR, weight_decay=META_WD)

    def inner_loss(self, p, batch):
        x, y = batch
        return weighted_loss(functional_call(self.clf, p, (x,)), y, self.wnet)

    def step(self):
        batch, mbatch = self.train[self.i % NBATCH], self.meta[self.i % NBATCH]
        self.i += 1
        names = list(self.p)
        # the classifier's update (the weight net read as a constant)
        p = {k: v.requires_grad_() for k, v in self.p.items()}
        with torch.enable_grad():
            x, y = batch
            losses = F.cross_entropy(functional_call(self.clf, p, (x,)), y, reduction="none")
            with torch.no_grad():
                w = torch.sigmoid(self.wnet(losses.detach().unsqueeze(1))).squeeze(1)
            grads = torch.autograd.grad((w * losses).mean(), list(p.values()))
        with torch.no_grad():
            grads = [g + WD * p[k] for k, g in zip(names, grads)]
            self.buf = grads if self.buf is None else [MOM * b + g for b, g in zip(self.buf, grads)]
            self.p = {k: p[k].detach() - LR * b for k, b in zip(names, self.buf)}
        # the weight net's hypergradient at the new classifier parameters
        p = {k: v.detach().requires_grad_() for k, v in self.p.items()}
        xm, ym = mbatch
        v = torch.autograd.grad(F.cross_entropy(functional_call(self.clf, p, (xm,)), ym), list(p.values()))
        if self.method == "fd":
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            eps = 0.01 / norm
            with torch.no_grad():
                plus = {k: p[k] + eps * t for k, t in zip(names, v)}
                minus = {k: p[k] - eps * t for k, t in zip(names, v)}
            gp = torch.autograd.grad(self.inner_loss(plus, batch), self.wp)
            gm = torch.autograd.grad(self.inner_loss(minus, batch), self.wp)
            hg = [-(a - b) / (2 * eps) for a, b in zip(gp, gm)]
        else:
            gl = torch.autograd.grad(self.inner_loss(p, batch), list(p.values()), create_graph=True)

            def hvp(vec):
                return torch.autograd.grad(gl, list(p.values()), vec, retain_graph=True)

            def dot(a, b):
                return sum((s * t).sum() for s, t in zip(a, b))

            if self.method == "cg":
                x, r, d = [torch.zeros_like(t) for t in v], list(v), list(v)
                rr = dot(r, r)
                for _ in range(3):
                    hd = hvp(d)
                    alpha = rr / dot(d, hd)
                    x = [a + alpha * b for a, b in zip(x, d)]
                    r = [a - alpha * b for a, b in zip(r, hd)]
                    rr_new = dot(r, r)
                    d = [a + (rr_new / rr) * b for a, b in zip(r, d)]
                    rr = rr_new
            else:  # Neumann(3, alpha=0.1)
                term, total = list(v), list(v)
                for _ in range(3):
                    term = [t - 0.1 * h for t, h in zip(term, hvp(term))]
                    total = [a + b for a, b in zip(total, term)]
                x = [0.1 * t for t in total]
            hg = [-t for t in torch.autograd.grad(gl, self.wp, x)]
        for prm, g in zip(self.wp, hg):
            prm.grad = g
        self.opt.step()

    def upper(self):
        return {k: v.detach().clone() for k, v in self.wnet.named_parameters()}


def _floor(method):
    def make(data, config):
        f = _Floor(data, method)
        return Contender(f.step, f.upper)
    return make


CONTENDERS = {}
for _m in METHODS:
    CONTENDERS[f"mlodsl-{_m}"] = _mlodsl(_m)
    CONTENDERS[f"betty-{_m}"] = _betty(_m)
    CONTENDERS[f"floor-{_m}"] = _floor(_m)
CONTENDERS["mlodsl-fd-compiled"] = _mlodsl("fd", compile=True)

TARGETS = []
for _m in METHODS:
    TARGETS += [(f"mlodsl-{_m}", f"betty-{_m}", 0.9), (f"mlodsl-{_m}", f"betty-{_m}", 1.0, "memory"),
                (f"mlodsl-{_m}", f"floor-{_m}", 1.1)]
SAME_MATH = [(f"mlodsl-{_m}", f"floor-{_m}") for _m in METHODS] + [
    ("mlodsl-fd-compiled", "floor-fd")]
TARGETS += [("mlodsl-fd-compiled", "betty-fd", 0.9)]
