"""Run in a fresh process: peak RSS a hypergradient adds, against prog.explain()'s estimate."""
import gc
import sys

import torch

import mlodsl as ml

torch.set_num_threads(1)
d, K = int(sys.argv[1]), int(sys.argv[2])
ck = None if sys.argv[3] == "none" else (sys.argv[3] if sys.argv[3] == "sqrt" else int(sys.argv[3]))
target = torch.linspace(-1, 1, d, dtype=torch.float64)
low = ml.Hyper(w=torch.zeros(d, dtype=torch.float64))
up = ml.Hyper(h=torch.zeros(d, dtype=torch.float64))
@ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=K, hypergrad=ml.hypergrad.Unroll(checkpoint=ck))
def inner(m, outer):
    return (outer.h.exp() * (m.w - target) ** 2).sum()
@ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
def outer(m, inner):
    return ((inner.w - 0.5) ** 2).sum()
prog = ml.Program(outer)
rep = prog.explain()
gc.collect()


def status(key):  # bytes of a /proc/self/status line (VmRSS, VmHWM)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


# The state is already resident; the hypergradient adds iterates and workspace on top. The
# high-water mark is reset first (clear_refs 5): a baseline taken from ru_maxrss would include
# explain()'s own peak, which varies from run to run and hid part of the hypergradient's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
g = prog.hypergradient("outer")
peak = status("VmHWM")
extra = rep.total - sum(r.params + r.optimizer for r in rep)
print(f"{peak - base} {extra}")
