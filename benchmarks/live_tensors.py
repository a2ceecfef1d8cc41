"""Which tensors are alive at the peak of a piece of code: ``with LiveTensors() as live: ...``.

A ``TorchDispatchMode`` that keeps a weak reference to the storage of every op's output (a
DTensor's local part; a collective's result) of at least ``min_bytes``, tracks the sum of the live
ones after every op, and keeps, at its highest, each live storage's size and the op that made it
(with the mlodsl frames of the call when the storage is at least ``stack_bytes``). Storages made
before the mode was entered count from the first op that returns them (a ``detach`` of the state).
The autograd engine runs backward ops under the same mode, so a backward pass's buffers count.
Slow (a scan of the live storages per op): for small widths.
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensors(TorchDispatchMode):
    def __init__(self, min_bytes: int = 1 << 16, stack_bytes: int = 1 << 62):
        super().__init__()
        self.min_bytes, self.stack_bytes = min_bytes, stack_bytes
        self.entries: dict = {}  # storage address -> (weak reference, bytes, what made it)
        self.total = self.peak = self.ops = 0
        self.at_peak: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            self._note(t, func)
        for k in [k for k, (ref, _, _) in self.entries.items() if ref.expired()]:
            self.total -= self.entries.pop(k)[1]
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, [(nb, what) for _, nb, what in self.entries.values()]
        return out

    def _note(self, t, func):
        if not isinstance(t, torch.Tensor):
            return
        t = getattr(t, "_local_tensor", t)  # a DTensor's local part
        t = t.elem if isinstance(getattr(t, "elem", None), torch.Tensor) else t  # a collective's pending result
        try:
            storage = t.untyped_storage()
            address, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if nbytes < self.min_bytes or address in self.entries:
            return
        what = str(func)
        if nbytes >= self.stack_bytes:
            frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}" for f in traceback.extract_stack()[:-2]
                      if "mlodsl" in f.filename or "mlodsl-steps" in f.filename]
            what += " @ " + " < ".join(reversed(frames[-5:]))
        self.entries[address] = (StorageWeakRef(storage), nbytes, what)
        self.total += nbytes

    def report(self, unit: int = 2 ** 20) -> str:
        """The peak, and the storages alive at it grouped by what made them (largest groups first)."""
        groups = collections.defaultdict(list)
        for nbytes, what in self.at_peak:
            groups[what].append(nbytes)
        lines = [f"live tensors at the peak: {self.peak / unit:.1f} MiB (storages of ≥ {self.min_bytes} bytes; "
                 f"{self.ops} ops)"]
        for what, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
            counts = collections.Counter(round(s / unit, 2) for s in sizes)
            shown = ", ".join(f"{n} × {size} MiB" for size, n in sorted(counts.items(), reverse=True))
            lines.append(f"  {sum(sizes) / unit:8.1f} MiB  {shown}  {what}")
        return "\n".join(lines)
