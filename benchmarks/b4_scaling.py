"""B4: scaling: time and peak memory against unroll length K and parameter count d. Lower level: a
ridge regression w ∈ R^d on 16 points (features scaled by 1/√d), loss ½ mean((Xw - y)²) +
½ Σ exp(λ) w², K SGD steps (lr 0.1) per outer step, warm-started; upper level: the validation MSE
of w on 16 other points, one SGD step on λ (lr 0.01·d for λ ∈ R^d, 1 for a scalar λ).

* ``*-unroll``: ``Unroll()``, λ ∈ R^d (one penalty per weight); memory O(K·d);
* ``*-cg``: ``CG(iters=3)``, λ ∈ R^d; memory O(d);
* ``*-forward``: ``Forward()`` with a tiny upper level (one scalar λ: Forward costs one jvp through
  the K steps per upper parameter), run at d ≤ 1e5 only.
Floors: ``floor-unroll`` a ``torch.autograd.grad(create_graph=True)`` loop and one backward;
``floor-cg`` K plain steps then CG(3) on Hessian-vector products; ``floor-forward``
``torch.func.jvp`` of λ ↦ w_K.
"""
from __future__ import annotations

import torch

from .common import Contender, cg_hypergradient

N, LR, CG_ITERS = 16, 0.1, 3


def outer_lr(config, method):
    """A step that moves λ visibly (its per-weight hypergradient shrinks like 1/d)."""
    return 1.0 if method == "forward" else 0.01 * config["d"]


def configs(quick: bool) -> list:
    if quick:
        grid = [(10_000, 1), (100_000, 10)]
    else:
        grid = [(d, k) for d in (10_000, 100_000, 1_000_000) for k in (1, 10, 100)]
    out = []
    for d, k in grid:
        cfg = {"label": f"d={d:.0e}, K={k}", "d": d, "K": k}
        if d * k >= 100_000_000:  # several seconds per step: the fewest rounds
            cfg["settings"] = {"warmup": 1, "rounds": 2, "budget": 1.0, "mem_steps": 1}
        elif d * k >= 10_000_000:
            cfg["settings"] = {"warmup": 1, "rounds": 3, "budget": 10.0, "mem_steps": 1}
        elif d * k >= 1_000_000:
            cfg["settings"] = {"warmup": 1, "rounds": 6, "budget": 15.0}
        out.append(cfg)
    return out


def data(config):
    d = config["d"]
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(d, generator=g)
    scale = d ** -0.5

    def split():
        x = scale * torch.randn(N, d, generator=g)
        return x, x @ w_true + 0.1 * torch.randn(N, generator=g)

    return split(), split()


def inner_loss(w, lam, batch):
    x, y = batch
    return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w ** 2).sum()


def outer_loss(w, batch):
    x, y = batch
    return 0.5 * ((x @ w - y) ** 2).mean()


def _lam0(config, method):
    return torch.full(() if method == "forward" else (config["d"],), -3.0)


def _applies(config, method):
    return not (method == "forward" and config["d"] > 100_000)


def _mlodsl(method):
    def make(data, config):
        if not _applies(config, method):
            return None
        import mlodsl as ml
        train, val = data
        low = ml.Hyper(w=torch.zeros(config["d"]))
        hyper = ml.Hyper(lam=_lam0(config, method))
        hg = {"unroll": lambda: ml.hypergrad.Unroll(), "cg": lambda: ml.hypergrad.CG(iters=CG_ITERS),
              "forward": lambda: ml.hypergrad.Forward()}[method]()

        @ml.level(low, optimizer=ml.optim.sgd(lr=LR), data=train, steps=config["K"], hypergrad=hg)
        def ridge(m, batch, penalty):
            return inner_loss(m.w, penalty.lam, batch)

        @ml.level(hyper, optimizer=ml.optim.sgd(lr=outer_lr(config, method)), data=val, depends_on=[ridge])
        def penalty(h, batch, ridge):
            return outer_loss(ridge.w, batch)

        prog = ml.Program(penalty)
        return Contender(prog.step, lambda: prog.params("penalty"))
    return make


class _Floor:
    def __init__(self, data, config, method):
        self.train, self.val = data
        self.K, self.method = config["K"], method
        self.w = torch.zeros(config["d"])
        self.lam = _lam0(config, method)
        self.outer_lr = outer_lr(config, method)

    def step(self):
        K, train = self.K, self.train
        if self.method == "unroll":
            lam = self.lam.requires_grad_()
            w = self.w.requires_grad_()
            for _ in range(K):
                (g,) = torch.autograd.grad(inner_loss(w, lam, train), w, create_graph=True)
                w = w - LR * g
            (hg,) = torch.autograd.grad(outer_loss(w, self.val), lam)
            self.w = w.detach()
            self.lam = lam.detach()
        elif self.method == "forward":
            w0 = self.w

            def final(lam):
                w = w0
                for _ in range(K):
                    w = w - LR * torch.func.grad(inner_loss)(w, lam, train)
                return w

            w, dw = torch.func.jvp(final, (self.lam,), (torch.ones_like(self.lam),))
            w = w.requires_grad_()
            (v,) = torch.autograd.grad(outer_loss(w, self.val), w)
            hg = (v * dw).sum()
            self.w = w.detach()
        else:
            w = self.w
            for _ in range(K):
                w = w.requires_grad_()
                (g,) = torch.autograd.grad(inner_loss(w, self.lam, train), w)
                w = (w - LR * g).detach()
            self.w = w
            w, lam = w.requires_grad_(), self.lam.requires_grad_()
            (v,) = torch.autograd.grad(outer_loss(w, self.val), w)
            (g,) = torch.autograd.grad(inner_loss(w, lam, train), w, create_graph=True)
            hg = cg_hypergradient(g, w, lam, v, iters=CG_ITERS)
            self.w, self.lam = self.w.detach(), lam.detach()
        self.lam = (self.lam - self.outer_lr * hg).detach()

    def upper(self):
        return {"lam": self.lam.clone()}


def _floor(method):
    def make(data, config):
        if not _applies(config, method):
            return None
        f = _Floor(data, config, method)
        return Contender(f.step, f.upper)
    return make


METHODS = ("unroll", "cg", "forward")
CONTENDERS = {}
for _m in METHODS:
    CONTENDERS[f"mlodsl-{_m}"] = _mlodsl(_m)
    CONTENDERS[f"floor-{_m}"] = _floor(_m)
TARGETS = [(f"mlodsl-{_m}", f"floor-{_m}", 1.1) for _m in METHODS]
SAME_MATH = [(f"mlodsl-{_m}", f"floor-{_m}") for _m in METHODS]


def summary(results) -> list:
    """One grid: rows (d, K), columns contenders, cells 'ms / MiB'."""
    names = [n for n in CONTENDERS if any(n in r["rows"] for r in results)]
    lines = ["### B4 summary: ms per outer step / peak extra RSS MiB (× floor time)", "",
             "| config | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for r in results:
        cells = []
        for n in names:
            row = r["rows"].get(n)
            if not row or "ms" not in row:
                cells.append("–" if not row else "failed")
                continue
            mem = row.get("mem", {}).get("delta_mib")
            cell = f"{row['ms']:.1f} / {mem:.0f}" if mem is not None else f"{row['ms']:.1f}"
            if "x_floor" in row:
                cell += f" ({row['x_floor']:.2f}×)"
            cells.append(cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines + [""]
