"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--only b1,b3]``  (see README.md).

Prints one table per benchmark configuration and the target ratios, and writes BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
import subprocess
import warnings

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import torch

from benchmarks.common import machine, memory_in_subprocess, time_round_robin, versions, worker

BENCHES = {"b1": "benchmarks.b1_hpo", "b2": "benchmarks.b2_mwn", "b3": "benchmarks.b3_maml",
           "b4": "benchmarks.b4_scaling"}
# Scripts with tables of their own, run in a subprocess: B5 (100M parameters, ~30 min), B6 (tasks),
# B7 (Unroll against MixedUnroll's peak memory, ~10 min).
SCRIPTS = {"b5": "b5_scale.py", "b6": "b6_tasks.py", "b7": "mixed_unroll.py"}
# warm-up steps, timed rounds, time budget (s) of the timed rounds per configuration
SETTINGS = {False: {"warmup": 2, "rounds": 12, "budget": 25.0, "mem_steps": 3},
            True: {"warmup": 1, "rounds": 3, "budget": 5.0, "mem_steps": 1}}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet():
    logging.disable(logging.INFO)  # Betty logs every problem at INFO
    warnings.filterwarnings("ignore")


def floor_of(name: str, names, floors=None) -> str | None:
    if name.startswith("floor"):
        return None
    if floors and name in floors:
        return floors[name] if floors[name] in names else None
    method = name.split("-", 1)[1] if "-" in name else ""
    for cand in (f"floor-{method}", "floor"):
        if cand in names:
            return cand
    return None


def run_config(mod, config, settings, threads, memory: bool) -> dict:
    settings = {**settings, **config.get("settings", {})}
    data = mod.data(config)
    contenders, notes = {}, {}
    for name, factory in mod.CONTENDERS.items():
        if name in config.get("skip", ()):
            continue
        try:
            c = factory(data, config)
        except Exception as err:  # a contender that cannot run is reported, not fatal
            notes[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            traceback.print_exc(limit=3)
            continue
        if c is None:
            continue
        contenders[name] = c
    try:
        times = time_round_robin(contenders, settings["warmup"], settings["rounds"], budget_s=settings["budget"])
    except Exception:  # one contender failing while stepping: time the others alone
        traceback.print_exc(limit=5)
        bad = []
        for name, c in list(contenders.items()):
            try:
                c.step()
            except Exception as e:
                notes[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                bad.append(name)
        for name in bad:
            contenders.pop(name)
        times = time_round_robin(contenders, settings["warmup"], settings["rounds"], budget_s=settings["budget"])
    agree = {}
    for a, b in getattr(mod, "SAME_MATH", ()):
        if a in contenders and b in contenders and contenders[a].upper and contenders[b].upper:
            ua, ub = contenders[a].upper(), contenders[b].upper()
            agree[a] = max(float((ua[k].reshape(-1) - ub[k].reshape(-1)).abs().max()) for k in ub)
    rows = {}
    for name in contenders:
        rows[name] = {"ms": 1e3 * times[name]["median"], "iqr": [1e3 * q for q in times[name]["iqr"]],
                      "first_ms": 1e3 * times[name]["first"], "n": len(times[name]["samples"]),
                      "note": notes.get(name, contenders[name].note)}
    for name, note in notes.items():
        rows.setdefault(name, {"note": note})
    del contenders, data
    if memory:
        for name in rows:
            if "ms" not in rows[name]:
                continue
            m = memory_in_subprocess(mod.__name__.split(".")[-1], name, config, threads,
                                     settings["warmup"] + settings["mem_steps"])
            rows[name]["mem"] = m
    for name, row in rows.items():
        fl = floor_of(name, rows, getattr(mod, "FLOORS", None))
        if fl and "ms" in row and "ms" in rows[fl]:
            row["x_floor"] = row["ms"] / rows[fl]["ms"]
        if name in agree:
            row["agree"] = agree[name]
    targets = []
    for t in getattr(mod, "TARGETS", ()):
        a, b, bound, *kind = t
        kind = kind[0] if kind else "time"
        if config.get("targets") is False or (a not in rows and b not in rows):
            continue
        ra, rb = rows.get(a, {}), rows.get(b, {})
        if kind == "time":
            va, vb = ra.get("ms"), rb.get("ms")
        else:
            va, vb = ra.get("mem", {}).get("delta_mib"), rb.get("mem", {}).get("delta_mib")
        ratio = va / vb if va is not None and vb else None
        targets.append({"a": a, "b": b, "bound": bound, "kind": kind, "ratio": ratio,
                        "ok": None if ratio is None else ratio <= bound})
    return {"label": config["label"], "rows": rows, "targets": targets}


def fmt_mem(row):
    m = row.get("mem")
    if not m:
        return "–"
    if "error" in m:
        return "err"
    return f"{m['delta_mib']:.1f}"


def table(bench: str, title: str, result: dict) -> list[str]:
    lines = [f"### {bench.upper()} {title}: {result['label']}", "",
             "| contender | ms / outer step (median) | IQR | first step ms | peak extra RSS MiB | × floor | "
             "max diff vs floor | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in result["rows"].items():
        if "ms" not in r:
            lines.append(f"| {name} | – | – | – | – | – | – | {r['note']} |")
            continue
        xf = f"{r['x_floor']:.2f}" if "x_floor" in r else "–"
        ag = f"{r['agree']:.1e}" if "agree" in r else "–"
        lines.append(f"| {name} | {r['ms']:.2f} | {r['iqr'][0]:.1f}–{r['iqr'][1]:.1f} | {r['first_ms']:.0f} | "
                     f"{fmt_mem(r)} | {xf} | {ag} | {r['note']} |")
    if result["targets"]:
        lines.append("")
        for t in result["targets"]:
            what = "time" if t["kind"] == "time" else "peak memory"
            if t["ratio"] is None:
                lines.append(f"- {what} {t['a']} / {t['b']}: n/a (target ≤ {t['bound']:.3g})")
                continue
            mark = "met" if t["ok"] else "**missed**"
            lines.append(f"- {what} {t['a']} / {t['b']} = {t['ratio']:.2f} (target ≤ {t['bound']:.3g}): {mark}")
    lines.append("")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description="mlodsl benchmarks against Betty, higher, TorchOpt and floors")
    ap.add_argument("--quick", action="store_true", help="a short run (≤ 3 minutes on 2 cores)")
    ap.add_argument("--only", default="b1,b2,b3,b4,b6",
                    help="comma-separated subset of b1,...,b7 (b5, 100M parameters, and b7, mixed-mode "
                         "unrolling's memory, only when named)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"), help="markdown report ('' for none)")
    ap.add_argument("--json", default="", help="also write the raw results as JSON here")
    ap.add_argument("--worker", nargs=3, metavar=("BENCH", "CONTENDER", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()

    if args.worker:
        bench, contender, config = args.worker
        mod = importlib.import_module(f"benchmarks.{bench}")
        print(json.dumps(worker(mod, contender, json.loads(config), args.worker_steps)))
        return

    t_start = time.time()
    info, vers = machine(), versions()
    cmd = "python -m benchmarks.run" + (" --quick" if args.quick else "") + \
          (f" --only {args.only}" if args.only != "b1,b2,b3,b4,b6" else "") + \
          (f" --threads {args.threads}" if args.threads != 1 else "") + (" --no-memory" if args.no_memory else "")
    head = [f"command: `{cmd}`",
            f"machine: {info['cpu']}, {info['cores']} cores, torch.set_num_threads({info['threads']}); "
            f"torch {info['torch']}, Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in vers.items()),
            f"date: {info['date']}"]
    print("\n".join(head) + "\n", flush=True)
    results, out_lines = {}, []
    for bench in args.only.split(","):
        if bench in SCRIPTS:
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", SCRIPTS[bench]), "--threads", str(args.threads)]
            if bench == "b6" and args.quick:
                cmd += ["--repeats", "2"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip().splitlines()
            lines = [f"## {bench.upper()} (`python benchmarks/{SCRIPTS[bench]}`)", "", "```", *out, "```", ""]
            print("\n".join(lines), flush=True)
            out_lines += lines
            continue
        mod = importlib.import_module(BENCHES[bench])
        title = mod.__doc__.split(".")[0].split(":", 1)[1].strip() if ":" in mod.__doc__.split(".")[0] else ""
        for config in mod.configs(args.quick):
            t0 = time.time()
            res = run_config(mod, config, SETTINGS[args.quick], args.threads, not args.no_memory)
            lines = table(bench, title, res)
            print("\n".join(lines) + f"({time.time() - t0:.0f} s)\n", flush=True)
            results.setdefault(bench, []).append(res)
            out_lines += lines
        if hasattr(mod, "summary"):
            lines = mod.summary(results[bench])
            print("\n".join(lines), flush=True)
            out_lines += lines
    total = time.time() - t_start
    print(f"total {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head": head, "results": results}, f, indent=1)
    if args.out:
        write_report(args.out, head, out_lines, total)


def write_report(path, head, lines, total):
    readme = ("What each row means, how memory is measured and how to run: `benchmarks/README.md`. "
              "Times are medians of outer steps after warm-up, contenders alternating in one process; "
              "peak memory is the extra resident set of each contender in a fresh process "
              "(VmHWM after resetting it with /proc/self/clear_refs, minus the RSS at the reset); "
              "× floor is the time over the hand-written floor of the same method.")
    body = ["# Benchmarks", "", *[f"- {h}" for h in head], f"- wall time of the run: {total:.0f} s", "",
            readme, "", *lines]
    with open(path, "w") as f:
        f.write("\n".join(body) + "\n")


if __name__ == "__main__":
    main()
