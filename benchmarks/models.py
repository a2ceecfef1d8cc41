"""Real models as lower levels: build, first-step and per-step times, eager and compiled.

The problem is per-example reweighting (the lower level trains the model on sigmoid(w_i)-weighted
cross-entropy for ``--inner-steps`` SGD steps, the upper level learns w on a validation batch
through Unroll), float64, tiny random-init configs (nothing is downloaded):

* ``encoder``: ``nn.TransformerEncoder`` (2 layers, d = 64, 2 heads, feed-forward 128) over float
  features, mean-pooled into a linear head;
* ``bert``: Hugging Face ``BertForSequenceClassification`` (2 layers, hidden 64, 2 heads);
* ``gpt2``: Hugging Face ``GPT2LMHeadModel`` (2 layers, 64, 2 heads), the last position's logits;
* ``lora-bert``: that BERT with peft LoRA adapters (r = 4 on query and value), base frozen.

Modes: ``eager``; ``compiled`` (``compile=True``: levels over the compile budget ``max_ops`` run
eagerly, with a warning); ``compiled-all`` (``compile={"max_ops": None}``: everything compiled).

Each (model, eager | compiled) row runs in a fresh process with an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` in a new temporary directory: a cold cache), and reports the build
time (tracing, capture, checks), the first step (for ``compile=True``: compiling every region it
meets), the median of the next ``--steps`` steps, peak RSS, whether the lower level's graph is
captured, how many operations it holds, and which regions compiled or ran eagerly (and why).
A row that does not finish within ``--timeout`` seconds is reported as such.

    python benchmarks/models.py                       # eager and compile=True, about a minute
    python benchmarks/models.py --models bert --modes compiled-all --timeout 600   # minutes
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = ("encoder", "bert", "gpt2", "lora-bert")
N, T, D, VOCAB, CLASSES = 8, 8, 64, 100, 3


def make(model: str):
    """``(net, logits(net, x), train, val)`` for ``model``, float64, seed 0."""
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if model == "encoder":
        class EncoderClassifier(nn.Module):
            def __init__(self):
                super().__init__()
                layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True)
                self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = nn.Linear(D, CLASSES)

            def forward(self, x):
                return self.head(self.enc(x).mean(1))

        net = EncoderClassifier()
        x = lambda: torch.randn(N, T, D, generator=g, dtype=torch.float64)
        logits = lambda net, x: net(x)
    elif model in ("bert", "lora-bert"):
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * D,
                         vocab_size=VOCAB, num_labels=CLASSES, max_position_embeddings=32,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        net = BertForSequenceClassification(cfg)
        if model == "lora-bert":
            from peft import LoraConfig, get_peft_model
            net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                 lora_dropout=0.0, init_lora_weights=False))
        x = lambda: torch.randint(0, VOCAB, (N, T), generator=g)
        logits = lambda net, ids: net(ids).logits
    elif model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(n_embd=D, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        net = GPT2LMHeadModel(cfg)
        x = lambda: torch.randint(0, VOCAB, (N, T), generator=g)
        logits = lambda net, ids: net(ids).logits[:, -1, :CLASSES]
    else:
        raise ValueError(model)
    net = net.to(torch.float64)
    y = lambda: torch.randint(0, CLASSES, (N,), generator=g)
    return net, logits, (x(), y()), (x(), y())


def program(model: str, compile, inner_steps: int):
    import torch
    import torch.nn.functional as F

    import mlodsl as ml
    net, logits, train, val = make(model)
    hyper = ml.Hyper(w=torch.zeros(N, dtype=torch.float64))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train, steps=inner_steps, hypergrad=ml.hypergrad.Unroll())
    def inner(net, batch, outer):
        x, y = batch
        return (torch.sigmoid(outer.w) * F.cross_entropy(logits(net, x), y, reduction="none")).mean()

    @ml.level(hyper, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.cross_entropy(logits(inner, x), y)

    return ml.Program(outer, compile=compile)


COMPILE = {"eager": False, "compiled": True, "compiled-all": {"max_ops": None}}


def worker(model: str, mode: str, inner_steps: int, steps: int) -> dict:
    import warnings

    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, once per process
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prog = program(model, COMPILE[mode], inner_steps)
        built = time.perf_counter()
        prog.step()
        first = time.perf_counter()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        prog.step()
        times.append(time.perf_counter() - t)
    traced = prog.levels["inner"].traced
    ops = sum(1 for n in traced.graph.graph.nodes if n.op == "call_function") if not traced.opaque else None
    return {"model": model, "mode": mode, "build_s": built - t0, "first_step_s": first - built,
            "step_s": statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "captured": not traced.opaque, "inner_ops": ops,
            "compiler": repr(prog.compiler),
            "compile_warnings": sorted({str(w.message)[:200] for w in caught
                                        if type(w.message).__name__ == "CompileWarning"})}


def run_row(model: str, mode: str, args) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--worker", model, mode, "--inner-steps", str(args.inner_steps),
               "--steps", str(args.steps)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"model": model, "mode": mode, "error": f"unfinished after {args.timeout} s"}
        if proc.returncode != 0:
            return {"model": model, "mode": mode, "error": proc.stderr.strip().splitlines()[-1][:300]}
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - t0
        return row


def table(rows: list) -> str:
    out = ["| model | mode | captured (ops) | build | first step | per step | peak RSS | notes |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['mode']} | | | {r['error']} | | | |")
            continue
        said = r["compile_warnings"]
        notes = ("levels over max_ops run eagerly" if any("max_ops" in m for m in said) else "; ".join(said))
        out.append(f"| {r['model']} | {r['mode']} | {'yes' if r['captured'] else 'no'} ({r['inner_ops']}) | "
                   f"{r['build_s']:.1f} s | {r['first_step_s']:.1f} s | {1e3 * r['step_s']:.0f} ms | "
                   f"{r['peak_rss_mib']:.0f} MiB | {notes} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--modes", default="eager,compiled",
                    help="comma-separated, of eager, compiled (compile=True, with its budget) and compiled-all "
                         "(compile={'max_ops': None}: every level compiled, minutes per row)")
    ap.add_argument("--inner-steps", type=int, default=2, help="SGD steps of the lower level per step (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first (default 3)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per row before it is reported unfinished")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.inner_steps, args.steps)))
        return
    rows = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            rows.append(run_row(model, mode, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
