"""B5: one hypergradient through a 100M-parameter lower level on this CPU.

The lower level is a stack of wide linear layers (``--layers`` × ``--width``², about 100M
parameters by default) fitted by SGD to random targets, with a per-layer weight decay
``exp(log_wd)`` learned by a small upper level from a validation loss. For each method and
precision, a fresh process builds the program and computes ``prog.hypergradient("outer")`` once
(after one warm-up), and reports:

* peak memory: peak RSS minus RSS before the model existed, against the fp32
  parameters-plus-gradients footprint (2 × 4 bytes × parameters);
* time: the hypergradient against the sum of the products it needs (gradients and
  Hessian-vector products of the same losses) timed alone with plain autograd in the same process;
* Betty 0.2.1's peak memory for the same model and method (``darts``, ``cg``), if Betty imports.

malloc is told to return large blocks (MALLOC_MMAP_THRESHOLD_) so that RSS measures tensors.

    python benchmarks/b5_scale.py                 # every row, ~100M parameters
    python benchmarks/b5_scale.py --width 1024    # a small smoke run
    python -m benchmarks.b5_scale --method cg3 --precision fp32   # one row
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# CG warns instead of raising on negative curvature: the random tanh network is not at a minimum
# (at 20M parameters CG meets pᵀHp < 0), and this benchmark measures memory and time, as Betty's
# cg (which does not check) does.
# unroll16_ckpt8: segments of 8, each reversed by bisection (3 recomputed iterates alive, 1 kept
# inside the block) against √16 = 4 (2 recomputed, 3 kept): less memory for more recomputation.
# cg3: the build chooses how CG takes its products (here, at 100M parameters, reverse over forward);
# cg3_lowmem asks for reverse over forward, cg3_linearized for the linearization held through the solve.
METHODS = {"finitediff": "FiniteDiff()", "cg3": "CG(iters=3, on_divergence='warn')",
           "cg3_lowmem": "CG(iters=3, on_divergence='warn', low_memory=True)",
           "cg3_linearized": "CG(iters=3, on_divergence='warn', low_memory=False)",
           "unroll16_ckpt": "Unroll(checkpoint='sqrt')", "unroll16_ckpt8": "Unroll(checkpoint=8)"}
# (inner steps + upper + the method's products)
PRODUCTS = {"finitediff": dict(grads=4, hvps=0), "cg3": dict(grads=2, hvps=4), "cg3_lowmem": dict(grads=2, hvps=4),
            "cg3_linearized": dict(grads=2, hvps=4),
            "unroll16_ckpt": dict(grads=17, hvps=16), "unroll16_ckpt8": dict(grads=17, hvps=16)}
BETTY = {"finitediff": "darts", "cg3": "cg", "cg3_lowmem": "cg", "cg3_linearized": "cg"}  # Betty's, for the same row


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_and_data(width, layers, batch, seed=0):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)) for _ in range(2)]
    return net, data


def weight_decay(net, log_wd):
    return sum(log_wd[i].exp() * (lin.weight ** 2).sum() for i, lin in enumerate(net[::2]))


def run_mlodsl(args) -> dict:
    import torch
    import mlodsl as ml
    torch.set_num_threads(args.threads)
    before = rss()
    net, (train, val) = model_and_data(args.width, args.layers, args.batch)
    steps = 16 if args.method.startswith("unroll") else 1
    hyper = ml.Hyper(log_wd=torch.full((args.layers,), -8.0))
    method = eval("ml.hypergrad." + METHODS[args.method])
    loss_fn = torch.nn.functional.mse_loss

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train, steps=steps, hypergrad=method,
              precision=None if args.precision == "fp32" else args.precision)
    def inner(net, batch, outer):
        x, y = batch
        return loss_fn(net(x), y) + weight_decay(net, outer.log_wd)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return loss_fn(inner(x), y)

    prog = ml.Program(outer)
    n_params = sum(p.numel() for p in net.parameters())
    prog.hypergradient("outer")  # warm-up
    t0 = time.perf_counter()
    prog.hypergradient("outer")
    elapsed = time.perf_counter() - t0
    mem = peak() - before
    floor = product_times(net, train, hyper.log_wd.detach(), args.threads)
    need = PRODUCTS[args.method]
    return dict(params=n_params, peak=mem, time=elapsed,
                floor=need["grads"] * floor["grad"] + need["hvps"] * floor["hvp"])


def product_times(net, batch, log_wd, threads) -> dict:
    """Median time of one gradient and one Hessian-vector product of the lower loss (autograd)."""
    import torch
    x, y = batch
    params = [p for p in net.parameters()]

    def loss():
        return torch.nn.functional.mse_loss(net(x), y) + weight_decay(net, log_wd)

    def grad():
        return torch.autograd.grad(loss(), params)

    def hvp():
        g = torch.autograd.grad(loss(), params, create_graph=True)
        return torch.autograd.grad(g, params, [torch.ones_like(p) for p in params])

    out = {}
    for name, fn in (("grad", grad), ("hvp", hvp)):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[1]
    return out


def run_betty(args) -> dict:
    import torch
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem
    torch.set_num_threads(args.threads)
    before = rss()
    net, (train, val) = model_and_data(args.width, args.layers, args.batch)

    class Hyper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log_wd = torch.nn.Parameter(torch.full((args.layers,), -8.0))

    class Outer(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(self.inner(x), y)

    class Inner(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(self.module(x), y) + weight_decay(self.module, self.outer.module.log_wd)

    kind = BETTY[args.method]
    extra = dict(cg_iterations=3) if kind == "cg" else {}
    outer = Outer(name="outer", module=Hyper(), optimizer=None, train_data_loader=[val],
                  config=Config(log_step=-1, first_order=True, retain_graph=True))
    outer.optimizer = torch.optim.SGD(outer.module.parameters(), lr=0.1)
    inner = Inner(name="inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1e-3),
                  train_data_loader=[train], config=Config(type=kind, unroll_steps=1, **extra))
    engine = Engine(config=EngineConfig(train_iters=0, logger_type="none"), problems=[outer, inner],
                    dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    engine.train()
    for _ in range(2):  # an inner step then the outer hypergradient step, twice
        engine.global_step += 1
        engine.train_step()
    return dict(peak=peak() - before)


def child(args):
    out = run_betty(args) if args.betty else run_mlodsl(args)
    print("RESULT " + json.dumps(out))


def spawn(args, method, precision, betty=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", method, "--precision", precision,
           "--width", str(args.width), "--layers", str(args.layers), "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--betty"] if betty else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", default=None, choices=list(METHODS), help="only this method's rows")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="only this precision's rows")
    p.add_argument("--betty", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--no-betty", action="store_true", help="skip Betty's rows")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    n = args.layers * (args.width ** 2 + args.width)
    footprint = 2 * 4 * n
    print(f"B5: lower level {args.layers}×Linear({args.width}, {args.width}) = {n / 1e6:.1f}M parameters; "
          f"fp32 params+grads footprint {footprint / 2**30:.2f} GiB; {args.threads} threads")
    header = (f"{'method':<16}{'prec':<6}{'peak GiB':>9}{'×footprint':>11}{'time s':>8}{'×products':>10}"
              f"{'betty GiB':>10}{'×betty':>8}")
    print(header)
    for method in [args.method] if args.method else METHODS:
        betty = None
        if not args.no_betty and method in BETTY:
            betty = spawn(args, method, "fp32", betty=True)
        for precision in [args.precision] if args.precision else ("fp32", "bf16"):
            r = spawn(args, method, precision)
            if "error" in r:
                line = f"{method:<16}{precision:<6}  error: {r['error']}"
            else:
                b = betty.get("peak") if betty else None
                line = (f"{method:<16}{precision:<6}{r['peak'] / 2**30:>9.2f}{r['peak'] / footprint:>11.2f}"
                        f"{r['time']:>8.2f}{r['time'] / r['floor']:>10.2f}"
                        + (f"{b / 2**30:>10.2f}{r['peak'] / b:>8.2f}" if b else f"{'-':>10}{'-':>8}"))
            print(line, flush=True)
            rows.append(line)
        if betty and "error" in betty:
            print(f"  betty {method}: {betty['error']}")
    return rows


if __name__ == "__main__":
    main()
