"""Peak memory of the first-order hypergradients (F2SA, BOME) at ~100M lower parameters, against
single-level training of the same model.

The model is B5's: ``--layers`` × Linear(``--width``, ``--width``) with tanh (6 × 4096² ≈ 100.7M
parameters by default), fp32, batch ``--batch``, an MSE loss plus a per-layer weight decay
exp(log_wd). Each row runs in a fresh process:

* ``single (torch)``: plain torch: ``loss.backward()`` and ``torch.optim.SGD.step()``;
* ``single (mlodsl)``: the same model and loss as a one-level ``ml.Program`` (log_wd fixed);
* the bilevel rows: that level as the lower level (SGD, one step per outer step) of an upper level
  learning log_wd from a validation batch, with the lower level's hypergradient method as named.

Each process imports torch and mlodsl and builds the data, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), then builds the model and runs ``--steps`` training steps; the figure
is the peak resident memory above the mark (the model's parameters included). malloc is told to
return large blocks to the OS (MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live
tensors. Target: each first-order row ≤ 2× ``single (mlodsl)``.

    python benchmarks/first_order_memory.py                # ~100M parameters, a few minutes on 2 cores
    python benchmarks/first_order_memory.py --width 1024   # a small smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

ROWS = {
    "single (torch)": None,
    "single (mlodsl)": None,
    "F2SA(iters=2)": "F2SA(iters=2, lr=1e-3, penalty=100.0)",
    "F2SA(iters=2, paired=False)": "F2SA(iters=2, lr=1e-3, penalty=100.0, paired=False)",
    "BOME(iters=2, value_iters=2)": "BOME(iters=2, lr=1e-4, value_lr=1e-3, value_iters=2)",
    "FiniteDiff()": "FiniteDiff()",
}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


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


def build(row, net, train, val, layers):
    """A ``step()`` callable for the row."""
    import torch
    import mlodsl as ml
    mse = torch.nn.functional.mse_loss
    if row == "single (torch)":
        log_wd = torch.full((layers,), -8.0)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            x, y = train
            (mse(net(x), y) + weight_decay(net, log_wd)).backward()
            opt.step()

        return step
    if row == "single (mlodsl)":
        log_wd = torch.full((layers,), -8.0)

        @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train)
        def alone(net, batch):
            x, y = batch
            return mse(net(x), y) + weight_decay(net, log_wd)

        return ml.Program(alone).step
    hyper = ml.Hyper(log_wd=torch.full((layers,), -8.0))
    method = eval("ml.hypergrad." + ROWS[row])

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3), data=train, hypergrad=method)
    def inner(net, batch, outer):
        x, y = batch
        return mse(net(x), y) + weight_decay(net, outer.log_wd)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return mse(inner(x), y)

    return ml.Program(outer).step


def child(args) -> dict:
    import torch
    import mlodsl  # noqa: F401  (imported before the mark, as in every row)
    torch.set_num_threads(args.threads)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    net, (train, val) = model_and_data(args.width, args.layers, args.batch)
    step = build(args.row, net, train, val, args.layers)
    for _ in range(args.steps):
        step()
    params = sum(p.numel() for p in net.parameters())
    return {"peak_bytes": (_status_kb("VmHWM") - base) * 1024, "params": params}


def spawn(args, row) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--width", str(args.width),
           "--layers", str(args.layers), "--batch", str(args.batch), "--threads", str(args.threads),
           "--steps", str(args.steps)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--child", default=None, choices=list(ROWS))
    args = p.parse_args(argv)
    if args.child:
        args.row = args.child
        print("RESULT " + json.dumps(child(args)))
        return None
    n = args.layers * (args.width ** 2 + args.width)
    print(f"lower level {args.layers}×Linear({args.width}, {args.width}) = {n / 1e6:.1f}M parameters "
          f"({4 * n / 2**30:.2f} GiB fp32); batch {args.batch}; {args.steps} steps; {args.threads} threads\n")
    print("| row | peak GiB | × parameters | × single (mlodsl) | × single (torch) |")
    print("| --- | --- | --- | --- | --- |")
    results = {}
    for row in ROWS:
        r = results[row] = spawn(args, row)
        if "error" in r:
            print(f"| {row} | error: {r['error']} | | | |", flush=True)
            continue
        peak = r["peak_bytes"]
        ratios = [f"{peak / results[ref]['peak_bytes']:.2f}" if "peak_bytes" in results.get(ref, {}) else "-"
                  for ref in ("single (mlodsl)", "single (torch)")]
        print(f"| {row} | {peak / 2**30:.2f} | {peak / (4 * n):.2f} | {ratios[0]} | {ratios[1]} |", flush=True)
    return results


if __name__ == "__main__":
    main()
