"""Instructions per outer step of one benchmark contender, counted by valgrind (deterministic,
unlike wall time on a shared machine): the eager step's overhead over its floor, measured.

    python -m benchmarks.instructions b1 mlodsl-cg floor-cg        # M instructions per step, each
    python -m benchmarks.instructions b4 mlodsl-cg --config 0 --steps 4
    python -m benchmarks.instructions b1 mlodsl-cg --profile        # cProfile of the same steps

Each contender runs in its own ``valgrind --tool=callgrind`` process (one thread), is built and
takes ``--warmup`` steps uninstrumented, then ``--steps`` steps with instrumentation switched on
(``callgrind_control -i on``); the figure is the instructions of those steps over their number.
``--keep DIR`` keeps each callgrind file (``callgrind_annotate`` reads it) in DIR.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings

BENCHES = {"b1": "benchmarks.b1_hpo", "b4": "benchmarks.b4_scaling"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _instrument(on: bool) -> None:
    """Switch callgrind's instrumentation of this process on or off (and wait until it has)."""
    proc = subprocess.Popen(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:  # keep running Python so that valgrind serves the request
        sum(range(1000))


def _contender(bench: str, name: str, config_index: int, inner_steps: int | None):
    mod = importlib.import_module(BENCHES[bench])
    config = dict(mod.configs(quick=bench == "b4")[config_index])
    if inner_steps is not None:
        config["inner_steps" if bench == "b1" else "K"] = inner_steps
    contender = mod.CONTENDERS[name](mod.data(config), config)
    if contender is None:
        raise SystemExit(f"{name} does not run on {config['label']}")
    return contender


def measured(args) -> None:
    """The steps themselves (inside valgrind, or under cProfile with ``--profile``)."""
    import torch
    torch.set_num_threads(1)
    contender = _contender(args.bench, args.contenders[0], args.config, args.inner_steps)
    for _ in range(args.warmup):
        contender.step()
    if args.profile:
        import cProfile
        import pstats
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            contender.step()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_lines)
        return
    _instrument(True)
    for _ in range(args.steps):
        contender.step()
    _instrument(False)


def count(args, name: str) -> float:
    """Instructions per step of contender ``name``, from a valgrind process of its own."""
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    out = os.path.join(args.keep or tempfile.mkdtemp(), f"callgrind.{args.bench}.{name}.out")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no",
           sys.executable, "-m", "benchmarks.instructions", args.bench, name, "--inside",
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--config", str(args.config)]
    if args.inner_steps is not None:
        cmd += ["--inner-steps", str(args.inner_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode or refs is None:
        raise SystemExit(f"{name}: valgrind failed\n{done.stderr[-3000:]}")
    return int(refs.group(1).replace(",", "")) / args.steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("contenders", nargs="+")
    parser.add_argument("--steps", type=int, default=2, help="instrumented outer steps")
    parser.add_argument("--warmup", type=int, default=2, help="uninstrumented outer steps first")
    parser.add_argument("--config", type=int, default=0, help="index in the benchmark's configs (B4: --quick's)")
    parser.add_argument("--inner-steps", type=int, default=None, help="override the inner steps per outer step")
    parser.add_argument("--keep", default=None, help="a folder to keep the callgrind files in")
    parser.add_argument("--profile", action="store_true", help="cProfile the steps instead (no valgrind)")
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore")
    if args.inside or args.profile:
        measured(args)
        return
    for name in args.contenders:
        print(f"{name}: {count(args, name) / 1e6:.2f} M instructions per step", flush=True)


if __name__ == "__main__":
    main()
