"""Sharded lower level (``shard=True``) against the unsharded program, two gloo ranks on this CPU.

B5's lower level (a stack of ``--layers`` linear layers of ``--width``², about 100M parameters by
default, fitted by SGD with momentum to random targets, with a per-layer weight decay
``exp(log_wd)`` learned by a small upper level) on two data-parallel ranks, each with half of
every batch, once with the lower level sharded and once replicated. Each rank builds the program,
takes one warm-up outer step, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), takes
one outer step and reports:

* peak RSS during that step (VmHWM: torch's own footprint included), and the RSS before it;
* the bytes of the lower level's state (parameters and optimizer state) the rank holds;
* the step's time.

malloc is told to return large blocks (MALLOC_MMAP_THRESHOLD_) so that RSS measures tensors.

    python benchmarks/sharding.py                          # ~100M parameters, FiniteDiff
    python benchmarks/sharding.py --method cg3 --width 1024  # a small run of another method
    python benchmarks/sharding.py --method cg3 --width 512 --live 1000000  # the tensors alive at the peak
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import peak_kb, reset_peak  # noqa: E402

METHODS = {"finitediff": "FiniteDiff()", "cg3": "CG(iters=3, on_divergence='warn')", "unroll4": "Unroll()",
           "unroll16_ckpt": "Unroll(checkpoint='sqrt')"}
STEPS = {"finitediff": 1, "cg3": 1, "unroll4": 4, "unroll16_ckpt": 16}


def worker(args) -> dict:
    import torch
    from torch import nn
    import mlodsl as ml
    from mlodsl.sharding import local_bytes
    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(args.layers) for m in (nn.Linear(args.width, args.width), nn.Tanh())])
    g = torch.Generator().manual_seed(0)
    train, val = [(torch.randn(args.batch, args.width, generator=g)[rank::world],
                   torch.randn(args.batch, args.width, generator=g)[rank::world]) for _ in range(2)]
    hyper = ml.Hyper(log_wd=torch.full((args.layers,), -8.0))
    mse = torch.nn.functional.mse_loss

    def weight_decay(net, log_wd):
        return sum(log_wd[i].exp() * (lin.weight ** 2).sum() for i, lin in enumerate(net[::2]))

    @ml.level(net, optimizer=ml.optim.sgd(lr=1e-3, momentum=0.9), data=train, steps=STEPS[args.method],
              hypergrad=eval("ml.hypergrad." + METHODS[args.method]), shard=args.shard)
    def inner(net, batch, outer):
        x, y = batch
        return mse(net(x), y) + weight_decay(net, outer.log_wd)

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return mse(inner(x), y)

    prog = ml.Program(outer)
    n_params = sum(v.numel() for v in prog.params("inner").values())
    prog.step()  # warm-up
    if args.live:  # which tensors are alive at the step's peak (slow: small widths only)
        from benchmarks.live_tensors import LiveTensors
        live = LiveTensors(stack_bytes=args.live)
        with live:
            prog.step()
        return dict(rank=rank, live=live.report(), outer_loss=prog.history[-1]["outer"])
    rss_kb, ok = reset_peak()
    t0 = time.perf_counter()
    prog.step()
    elapsed = time.perf_counter() - t0
    return dict(rank=rank, shard=args.shard, params=n_params, rss_before_mib=rss_kb / 1024,
                peak_mib=peak_kb(ok) / 1024, peak_method="VmHWM after clear_refs" if ok else "ru_maxrss",
                state_mib=local_bytes(prog._state["inner"]) / 2 ** 20, step_s=elapsed,
                outer_loss=prog.history[-1]["outer"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, shard: bool) -> list:
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads),
               "MALLOC_MMAP_THRESHOLD_": "65536", "MLODSL_DIST_TIMEOUT": "1800",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--child", "--width", str(args.width), "--layers", str(args.layers),
               "--batch", str(args.batch), "--threads", str(args.threads), "--method", args.method,
               "--live", str(args.live)]
        procs.append(subprocess.Popen(cmd + (["--shard"] if shard else []), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a rank failed (shard={shard}):\n{err[-4000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="finitediff", choices=list(METHODS))
    p.add_argument("--shard", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--json", default="")
    p.add_argument("--live", type=int, default=0, metavar="BYTES",
                   help="instead of timing, list the tensors alive at the step's peak (rank 0), with the "
                        "mlodsl frames that made those of at least BYTES (benchmarks/live_tensors.py)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(worker(args)), flush=True)
        return
    results = {"unsharded": launch(args, False), "sharded": launch(args, True)}
    if args.live:
        for kind, rows in results.items():
            print(f"{kind} (rank 0), {args.method}, width {args.width}, outer loss {rows[0]['outer_loss']:.6g}")
            print(rows[0]["live"])
        return
    print(f"{results['sharded'][0]['params'] / 1e6:.1f}M parameters, {args.method}, 2 gloo ranks, "
          f"{args.threads} thread(s) each")
    print("| program | rank | peak RSS in the step | RSS before it | lower level's state held | step time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, rows in results.items():
        for r in rows:
            print(f"| {kind} | {r['rank']} | {r['peak_mib']:.0f} MiB | {r['rss_before_mib']:.0f} MiB | "
                  f"{r['state_mib']:.0f} MiB | {r['step_s']:.2f} s |")
    ratio = max(r["peak_mib"] for r in results["sharded"]) / max(r["peak_mib"] for r in results["unsharded"])
    print(f"peak RSS per rank, sharded / unsharded: {ratio:.2f}x; outer loss "
          f"{results['sharded'][0]['outer_loss']:.6g} (sharded) vs {results['unsharded'][0]['outer_loss']:.6g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
