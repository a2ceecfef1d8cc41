"""Run in a fresh process: peak RSS a hypergradient adds, against prog.explain()'s estimate."""
import resource, sys, torch
import mlodsl as ml
torch.set_num_threads(1)
d, K = int(sys.argv[1]), int(sys.argv[2])
ck = None if sys.argv[3] == "none" else (sys.argv[3] if sys.argv[3] == "sqrt" else int(sys.argv[3]))
target = torch.linspace(-1, 1, d, dtype=torch.float64)
low = ml.Hyper(w=torch.zeros(d, dtype=torch.float64)); up = ml.Hyper(h=torch.zeros(d, dtype=torch.float64))
@ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=K, hypergrad=ml.hypergrad.Unroll(checkpoint=ck))
def inner(m, outer):
    return (outer.h.exp() * (m.w - target) ** 2).sum()
@ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
def outer(m, inner):
    return ((inner.w - 0.5) ** 2).sum()
prog = ml.Program(outer)
rep = prog.explain()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import gc; gc.collect()
# the state is already resident; the hypergradient adds iterates and workspace on top
g = prog.hypergradient("outer")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
extra = rep.total - sum(r.params + r.optimizer for r in rep)
print(f"{peak - base} {extra}")
