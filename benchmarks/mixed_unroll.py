"""B7: peak memory of an unrolled hypergradient, reverse-over-reverse (``Unroll``) against mixed
mode (``MixedUnroll``: forward-over-reverse Hessian products, one update rematerialized at a time).

Lower level: T SGD-momentum steps of a classifier on a fixed batch, its learning rate learned and a
learned L2 penalty on its last layer's weight in its loss; upper level: the validation
cross-entropy at θ_T, two hyperparameters (log lr, log L2), so that both ways θ_U enters an update
are differentiated. Models:

* ``mlp``: 64-256-256-256-10, tanh, batch 512 (0.15 M parameters);
* ``transformer``: ``nn.TransformerEncoder`` (d_model 64, 4 heads, feed-forward 128, 2 layers),
  sequences of 32 tokens of 16 features, batch 32, mean-pooled into 10 classes (0.07 M parameters).

Contenders: ``unroll`` (``Unroll()``: the T updates recorded on the autograd tape with their
gradients' graphs, one backward), ``replay`` (``Unroll(checkpoint=1)``: the iterates kept, each
update's VJP by reverse-over-reverse in the reverse pass) and ``mixed`` (``MixedUnroll()``).
Memory: each (model, T, contender) runs in a fresh process (as ``benchmarks.common.worker``): the
program is built and its hypergradient taken once, then the kernel's peak-RSS mark is reset and the
figure is the peak extra resident memory of one more ``prog.hypergradient``, float32. A second
table measures one Hessian-vector product of the lower loss alone, by reverse-over-reverse and by
forward-over-reverse, on the autograd tape and by torch.func (what one update of the reverse pass
holds besides the iterates); the last compares the three hypergradients in float64 at T = 8.

    python benchmarks/mixed_unroll.py [--T 8,16,32] [--models mlp,transformer] [--threads 1]
    python benchmarks/mixed_unroll.py --T ''     # the product and error tables only (about a minute)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/mixed_unroll.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from benchmarks.common import prime, peak_kb, reset_peak

METHODS = {"unroll": lambda: ml.hypergrad.Unroll(), "replay": lambda: ml.hypergrad.Unroll(checkpoint=1),
           "mixed": lambda: ml.hypergrad.MixedUnroll()}
CLASSES = 10


class PooledTransformer(nn.Module):
    def __init__(self, features=16, d=64, heads=4, ff=128, layers=2):
        super().__init__()
        self.embed = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def last_layer(net) -> nn.Linear:
    return net.head if isinstance(net, PooledTransformer) else net[-1]


def model_and_data(name: str, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        net = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                            nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, CLASSES))
        shape = (512, 64)
    else:
        net = PooledTransformer()
        shape = (32, 32, 16)

    def batch():
        return (torch.randn(*shape, generator=g, dtype=dtype),
                torch.randint(0, CLASSES, (shape[0],), generator=g))

    return net.to(dtype), batch(), batch()


def program(model: str, T: int, method: str, dtype=torch.float32):
    net, train, val = model_and_data(model, dtype)
    hyper = ml.Hyper(log_lr=torch.tensor(math.log(0.05), dtype=dtype),
                     log_l2=torch.tensor(math.log(1e-3), dtype=dtype))

    @ml.level(net, optimizer=ml.optim.sgd(lr=lambda outer: outer.log_lr.exp(), momentum=0.9), data=train,
              steps=T, hypergrad=METHODS[method]())
    def inner(net, batch, outer):
        x, y = batch
        return F.cross_entropy(net(x), y) + outer.log_l2.exp() * (last_layer(net).weight ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.cross_entropy(inner(x), y)

    return ml.Program(outer)


def flat(g: dict) -> torch.Tensor:
    return torch.stack([g[k].reshape(()) for k in sorted(g)])


def worker(model: str, T: int, method: str) -> dict:
    """In a fresh process: peak extra RSS and time of one hypergradient (after a warm-up one)."""
    prime()
    prog = program(model, T, method)
    prog.hypergradient("outer")  # warm-up: lazy initialisation, the first batch drawn
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back to the OS
    base, ok = reset_peak()
    t0 = time.perf_counter()
    g = prog.hypergradient("outer")
    seconds = time.perf_counter() - t0
    peak = peak_kb(ok)
    return {"delta_mib": (peak - base) / 1024, "seconds": seconds, "grad": flat(g).tolist(),
            "method": "VmHWM after clear_refs" if ok else "ru_maxrss"}


PRODUCTS = {  # one Hessian-vector product of the lower loss, four ways
    "reverse-over-reverse, tape": ("tape", "reverse"), "reverse-over-reverse, torch.func": ("func", "reverse"),
    "forward-over-reverse, tape (forward_ad)": ("tape", "forward"),
    "forward-over-reverse, torch.func": ("func", "forward")}


def product(model: str, kind: str) -> dict:
    """In a fresh process: peak extra RSS of one HVP H u of the lower loss (float32), the way
    ``kind`` names (``PRODUCTS``); what one update of the reverse pass holds besides the iterates."""
    from mlodsl import autodiff
    from mlodsl.kernels import attention_kernel
    prime()
    net, (x, y), _ = model_and_data(model, torch.float32)
    params = {k: v.detach() for k, v in net.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(p):
        return F.cross_entropy(torch.func.functional_call(net, p, (x,)), y)

    where, mode = PRODUCTS[kind]

    def hvp():
        with attention_kernel(), autodiff.torch_func_products(where == "func"):
            if mode == "forward":
                return autodiff.forward_over_reverse(loss, (params,), (u,))
            return autodiff.vjp(autodiff.grad(loss), (params,), u)[0]

    hvp()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, ok = reset_peak()
    hvp()
    return {"delta_mib": (peak_kb(ok) - base) / 1024}


def _run(args: list, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--threads", str(threads)]
    # A fixed mmap threshold: glibc otherwise raises it after the first large free, and the blocks
    # of the warm-up hypergradient then stay resident, hiding the measured one's peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": tail[0][:200]}


def measure(model: str, T: int, method: str, threads: int) -> dict:
    return _run(["--worker", model, str(T), method], threads)


def products(models, threads: int) -> list:
    lines = ["Peak extra RSS of one Hessian-vector product of the lower loss (MiB, float32):", "",
             "| product | " + " | ".join(models) + " |", "| --- |" + " ---: |" * len(models)]
    for kind in PRODUCTS:
        cells = []
        for model in models:
            r = _run(["--product", model, kind], threads)
            cells.append(f"{r['delta_mib']:.1f}" if "delta_mib" in r else f"failed: {r['error']}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines + [""]


def errors(models, T: int = 8) -> list:
    """Max |g - g_unroll| / max |g_unroll| in float64 for each model and contender."""
    lines = [f"Error against Unroll(), float64, T = {T} (max |g - g_unroll| / max |g_unroll| over (log lr, log L2)):",
             "", "| model | replay | mixed |", "| --- | ---: | ---: |"]
    for model in models:
        gs = {m: flat(program(model, T, m, torch.float64).hypergradient("outer")) for m in METHODS}
        ref = gs["unroll"].abs().max()
        rel = {m: float((gs[m] - gs["unroll"]).abs().max() / ref) for m in ("replay", "mixed")}
        lines.append(f"| {model} | {rel['replay']:.1e} | {rel['mixed']:.1e} |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="8,16,32")
    p.add_argument("--models", default="mlp,transformer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "T", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--product", nargs=2, metavar=("MODEL", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        model, T, method = args.worker
        print(json.dumps(worker(model, int(T), method)))
        return
    if args.product:
        print(json.dumps(product(*args.product)))
        return
    models = args.models.split(",")
    lines = ["Peak extra RSS of one hypergradient (MiB, float32) and its time (s); ratios: Unroll's peak "
             "over MixedUnroll's.", "",
             "| model | T | unroll MiB | replay MiB | mixed MiB | unroll / mixed | replay / mixed "
             "| unroll s | replay s | mixed s | max rel diff mixed vs unroll |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for model in models:
        for T in (int(t) for t in args.T.split(",") if t):
            r = {m: measure(model, T, m, args.threads) for m in METHODS}
            bad = [f"{m}: {r[m]['error']}" for m in METHODS if "error" in r[m]]
            if bad:
                line = f"| {model} | {T} | failed: {'; '.join(bad)} |"
            else:
                mib = {m: r[m]["delta_mib"] for m in METHODS}
                ref = torch.tensor(r["unroll"]["grad"])
                diff = float((torch.tensor(r["mixed"]["grad"]) - ref).abs().max() / ref.abs().max())
                line = (f"| {model} | {T} | {mib['unroll']:.1f} | {mib['replay']:.1f} | {mib['mixed']:.1f} | "
                        f"{mib['unroll'] / mib['mixed']:.1f}× | {mib['replay'] / mib['mixed']:.1f}× | "
                        f"{r['unroll']['seconds']:.2f} | {r['replay']['seconds']:.2f} | {r['mixed']['seconds']:.2f} | "
                        f"{diff:.1e} |")
            lines.append(line)
            print(line, flush=True)
    print()
    print("\n".join(products(models, args.threads)))
    print("\n".join(errors(models)))


if __name__ == "__main__":
    main()
