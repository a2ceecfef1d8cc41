"""Batch streams: a level's ``data=`` as an endless, checkpointable source of batches.

* a ``tuple``, a single tensor or a dict of tensors is a fixed batch used every step;
* a callable is called for each batch;
* any other iterable (a list, a DataLoader, a generator) is drawn from in order and cycled. A
  one-shot iterator (a generator) is remembered during its first pass so that it can be cycled.
"""
from __future__ import annotations

import torch


class BatchStream:
    def __init__(self, name: str, data):
        self.name, self.data, self.position = name, data, 0
        self.kind = ("none" if data is None else
                     "fixed" if isinstance(data, (tuple, torch.Tensor, dict)) else
                     "callable" if callable(data) else "iterable")
        if self.kind == "iterable":
            try:
                iter(data)
            except TypeError:
                raise TypeError(f"level '{name}': data must be a batch (tuple/tensor/dict), an iterable or a "
                                f"callable; got {type(data).__name__}") from None
        self._iter = None
        self._one_shot = self.kind == "iterable" and iter(data) is data
        self._memory: list = []
        self._replay = None

    def next(self):
        self.position += 1
        if self.kind == "none":
            return None
        if self.kind == "fixed":
            return self.data
        if self.kind == "callable":
            return self.data()
        if self._replay is not None:
            return self._replay[(self.position - 1) % len(self._replay)]
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            batch = next(self._iter)
        except StopIteration:
            if self._one_shot:
                if not self._memory:
                    raise ValueError(f"level '{self.name}': its data iterator yielded nothing") from None
                self._replay = self._memory
                return self._replay[(self.position - 1) % len(self._replay)]
            self._iter = iter(self.data)
            try:
                batch = next(self._iter)
            except StopIteration:
                raise ValueError(f"level '{self.name}': its data is empty") from None
        if self._one_shot:
            self._memory.append(batch)
        return batch

    def skip_to(self, position: int):
        """Fast-forward a fresh stream to ``position`` batches drawn (used when resuming)."""
        while self.position < position:
            self.next()
