"""Betty's own hello world (per-feature L2 for logistic regression) timed per outer step.

The problem is Betty 0.2.1's ``betty/test_install.py`` (the "Hello (Betty) World"): ChildNet w at
0, 100 inner SGD steps (lr 0.1), ParentNet penalties at 1, SGD (lr 1, momentum 0.9), CG with 3
iterations (cg_alpha 0.1). The data come from ``examples/hpo_logreg.make_data`` (the same NumPy
draws Betty makes), so the mlodsl example and this script see the same numbers. One outer step is
100 calls of ``engine.train_step()`` (Betty steps the leaf; the upper steps every 100th call).

    pip install --no-deps --ignore-requires-python betty-ml==0.2.1   # never a dependency of mlodsl
    python benchmarks/betty_hello.py --iters 30                        # CG, DARTS, Neumann
    python examples/hpo_logreg.py --iters 30 --no-progress             # mlodsl, same data
    python benchmarks/betty_hello.py --compare --iters 40              # both in one process

``--compare`` times Betty and the mlodsl programs of ``examples/hpo_logreg.py`` (each inner solve
from 0, as Betty's) in one process, one outer step of each in turn, so that a machine whose load
changes during the run slows every contender alike; it prints medians and ratios to Betty CG.

Betty 0.2.1 runs unpatched on torch 2.13 for this problem (no monkeypatches needed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from hpo_logreg import DATA_DIM, build, evaluate_w, make_data, methods  # noqa: E402

from betty.configs import Config, EngineConfig  # noqa: E402
from betty.engine import Engine  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402


class ChildNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DATA_DIM))

    def forward(self, inputs):
        return inputs @ self.w, self.w


class ParentNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(DATA_DIM))

    def forward(self):
        return self.w


def make_engine(train, val, method: str, inner_steps: int):
    class Parent(ImplicitProblem):
        def training_step(self, batch):
            inputs, targets = batch
            return F.binary_cross_entropy_with_logits(self.inner(inputs)[0], targets)

        def configure_train_data_loader(self):
            return [val]

        def configure_module(self):
            return ParentNet()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=1, momentum=0.9)

        def param_callback(self):
            for p in self.trainable_parameters():
                p.data.clamp_(min=1e-8)

    class Child(ImplicitProblem):
        def training_step(self, batch):
            inputs, targets = batch
            outs, params = self.module(inputs)
            return (F.binary_cross_entropy_with_logits(outs, targets)
                    + 0.5 * (params.unsqueeze(0) @ torch.diag(self.outer()) @ params.unsqueeze(1)).sum())

        def configure_train_data_loader(self):
            return [train]

        def configure_module(self):
            return ChildNet()

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.1)

        def on_inner_loop_start(self):
            self.module.w.data.zero_()

    extra = {"cg": dict(cg_iterations=3, cg_alpha=0.1), "darts": {}, "neumann": dict(neumann_iterations=3,
                                                                                        neumann_alpha=0.1)}[method]
    parent = Parent(name="outer", config=Config(log_step=-1, first_order=True, retain_graph=True))
    child = Child(name="inner", config=Config(type=method, unroll_steps=inner_steps, **extra))
    deps = {"u2l": {parent: [child]}, "l2u": {child: [parent]}}
    engine = Engine(config=EngineConfig(train_iters=0, logger_type="none"), problems=[parent, child],
                    dependencies=deps)
    return engine, parent, child


def run(method: str, iters: int, inner_steps: int, seed: int):
    torch.manual_seed(seed)
    train, val, test, _ = make_data(seed)
    engine, parent, child = make_engine(train, val, method, inner_steps)
    engine.train()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(inner_steps):
            engine.global_step += 1
            engine.train_step()
        times.append(time.perf_counter() - t0)
    warm = times[min(5, len(times) // 2):] or times
    w = child.module.w.detach()
    val_loss, val_acc = evaluate_w(w, val)
    _, test_acc = evaluate_w(w, test)
    lam = parent.module.w.detach()
    print(f"betty {method:8s}: {1e3 * statistics.median(warm):8.2f} ms per outer step "
          f"(median of {len(warm)}; {inner_steps} inner steps), val loss {val_loss:.4f}, "
          f"val acc {val_acc:.4f}, test acc {test_acc:.4f}, penalties min {lam.min():.3g} "
          f"median {lam.median():.3g} max {lam.max():.3g}")


def compare(iters: int, inner_steps: int, seed: int, betty_methods, mlodsl_methods):
    """Interleaved timing: each round takes one outer step of every contender, in turn."""
    train, val, _, _ = make_data(seed)
    steps = {}
    for method in betty_methods:
        torch.manual_seed(seed)
        engine, _, _ = make_engine(train, val, method, inner_steps)
        engine.train()

        def betty_step(engine=engine):
            for _ in range(inner_steps):
                engine.global_step += 1
                engine.train_step()
        steps[f"betty {method}"] = betty_step
    for method in mlodsl_methods:
        prog, _, _ = build(train, val, inner_steps=inner_steps, method=method, restart=True, seed=seed)
        steps[f"mlodsl {method}"] = prog.step
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    ref = None
    for name, ts in times.items():
        med = statistics.median(ts[min(5, len(ts) // 2):])
        ref = ref or med
        print(f"{name:18s} {1e3 * med:8.2f} ms per outer step   {med / ref:5.2f}x {next(iter(times))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=30, help="outer steps per method (default 30)")
    ap.add_argument("--inner-steps", type=int, default=100)
    ap.add_argument("--methods", default="cg,darts,neumann", help="Betty hypergradient types (comma separated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", action="store_true", help="time Betty and mlodsl in turn, in one process")
    ap.add_argument("--mlodsl-methods", default="unroll,cg,firstorder", help="mlodsl methods for --compare")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import betty
    print(f"betty {getattr(betty, '__version__', '0.2.1')}, torch {torch.__version__}, {args.threads} thread(s)")
    if args.compare:
        mine = [m for m in args.mlodsl_methods.split(",") if m in methods()]
        compare(args.iters, args.inner_steps, args.seed, args.methods.split(","), mine)
        return
    for method in args.methods.split(","):
        run(method, args.iters, args.inner_steps, args.seed)


if __name__ == "__main__":
    main()
