"""The harness shared by every benchmark: contenders, alternating timing, peak memory, machine info.

A benchmark module defines

* ``configs(quick) -> list[dict]``: the configurations it runs (each has a ``"label"``);
* ``data(config) -> object``: the problem's data, built once per process and shared by contenders;
* ``CONTENDERS: dict[name, factory]`` with ``factory(data, config) -> Contender`` (``None`` when the
  contender does not apply to that configuration);
* ``TARGETS``: ``(contender, reference, bound)`` triples, "contender's time ≤ bound × reference's".

Time: every contender of a configuration is built in one process, warmed up, then timed in rounds
whose order rotates (A B C, B C A, C A B, ...), one outer step per timed sample; the figure is the
median. Memory: each contender runs again in a fresh subprocess (``python -m benchmarks.run
--worker ...``); after the imports and the data are built, the kernel's high-water mark of the
resident set is reset (``/proc/self/clear_refs`` ← 5) and the figure is VmHWM - VmRSS at that
moment after the contender is built and has taken its warm-up and a few timed steps: the extra
resident memory the contender needed at its peak (torch's CPU allocator returns large blocks to
the OS, so the resident set follows the live tensors). Where clear_refs is refused, ru_maxrss is
used instead, with the data's RSS subtracted (an upper bound).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def cg_hypergradient(grad_inner, w, lam, v, iters: int):
    """The floors' implicit hypergradient by hand on the autograd tape: CG(iters) for H x = v from
    x = 0, with H x by one backward of ``grad_inner`` = ∇_w L(w, λ) (built with create_graph),
    then -(∂²L/∂λ∂w) x. No library code, so that the floor is the arithmetic alone."""
    x, r, p = torch.zeros_like(v), v, v
    rr = (r * r).sum()
    for _ in range(iters):
        (hp,) = torch.autograd.grad(grad_inner, w, p, retain_graph=True)
        alpha = rr / (p * hp).sum()
        x, r = x + alpha * p, r - alpha * hp
        rr_new = (r * r).sum()
        p, rr = r + (rr_new / rr) * p, rr_new
    (cross,) = torch.autograd.grad(grad_inner, lam, x)
    return -cross


@dataclasses.dataclass
class Contender:
    """One way of running the problem: ``step()`` is one outer step (every inner step included)."""

    step: Callable[[], object]
    upper: Callable[[], dict] | None = None   # the upper level's parameters, to compare contenders
    note: str = ""


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> tuple[int, bool]:
    """Reset the kernel's peak-RSS mark to the current RSS; returns (current RSS in KiB, reset ok)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS"), True
    except OSError:
        return _status_kb("VmRSS"), False


def peak_kb(reset_ok: bool) -> int:
    if reset_ok:
        return _status_kb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def time_round_robin(contenders: dict, warmup: int, rounds: int, per_round: int = 1,
                     budget_s: float | None = None) -> dict:
    """Median seconds per step of each contender, timed in rotating order in this process.

    ``budget_s``: stop adding rounds once this much wall time has gone (at least 2 rounds run).
    Returns {name: {"median": s, "samples": [...], "first": s}}.
    """
    names = list(contenders)
    out = {n: {"samples": [], "first": None} for n in names}
    for n in names:  # warm-up, and the first step's time (includes one-off costs)
        for w in range(warmup):
            t0 = time.perf_counter()
            contenders[n].step()
            if w == 0:
                out[n]["first"] = time.perf_counter() - t0
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            for _ in range(per_round):
                t0 = time.perf_counter()
                contenders[n].step()
                out[n]["samples"].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    for n in names:
        s = out[n]["samples"]
        out[n]["median"] = statistics.median(s)
        q = statistics.quantiles(s, n=4) if len(s) >= 4 else [min(s), 0, max(s)]
        out[n]["iqr"] = (q[0], q[-1])
    return out


def memory_in_subprocess(bench: str, contender: str, config: dict, threads: int, steps: int,
                         timeout: float = 600) -> dict:
    """Peak extra RSS of one contender in a fresh process (see the module docstring)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--worker", bench, contender, json.dumps(config),
           "--threads", str(threads), "--worker-steps", str(steps)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": tail[0][:200]}


def prime():
    """Load what every contender loads lazily on its first step (autograd engine, torch.func,
    torch.optim), so the one-off ~70 MiB of that is not charged to whoever runs first."""
    import torch
    from torch.func import functional_call, grad, vjp, vmap
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad(lin(x).pow(2).sum(), x, create_graph=True)
    torch.autograd.grad(g.sum(), x)
    params = dict(lin.named_parameters())
    grad(lambda p: functional_call(lin, p, (x,)).sum())(params)
    vjp(lambda p: functional_call(lin, p, (x,)), params)[1](torch.ones(4, 1))
    vmap(lambda v: (v * 2).sum())(torch.randn(2, 3))
    opt = torch.optim.Adam(lin.parameters())
    lin(x).sum().backward()
    opt.step()
    torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9).step()


def worker(module, contender: str, config: dict, steps: int) -> dict:
    """Body of ``--worker``: build the data, reset the peak, build and run one contender."""
    # the same imports for every contender
    for peer in ("mlodsl", "betty", "higher", "torchopt", "betty.engine", "boat_torch", "networkx", "tqdm.auto"):
        try:
            __import__(peer)
        except Exception:
            pass
    data = module.data(config)
    prime()
    base, ok = reset_peak()
    c = module.CONTENDERS[contender](data, config)
    for _ in range(steps):
        c.step()
    peak = peak_kb(ok)
    return {"base_mib": base / 1024, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024,
            "method": "VmHWM after clear_refs" if ok else "ru_maxrss"}


def machine() -> dict:
    import platform

    import torch
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def versions() -> dict:
    out = {}
    for name in ("mlodsl", "betty", "boat", "higher", "torchopt"):
        try:
            from importlib.metadata import version
            out[name] = version({"betty": "betty-ml", "boat": "boat-torch"}.get(name, name))
        except Exception:
            out[name] = "not installed"
    return out
