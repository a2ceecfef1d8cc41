"""Batch streams: a level's ``data=`` as a source of batches that a checkpoint can position.

* a ``tuple``, a single tensor or a dict of tensors is a fixed batch used every step;
* a callable is called for each batch;
* a re-iterable (a list, a DataLoader: anything whose ``iter()`` starts a new pass) is drawn from
  in order and cycled: each pass calls ``iter()`` again;
* a one-shot iterator (a generator: ``iter(it) is it``) is streamed: each batch is drawn when it
  is needed and the stream keeps no reference to it, so an endless generator runs in constant
  memory. It cannot be cycled: when it ends, the next draw raises ``DataExhaustedError`` (pass a
  list, a re-iterable or a callable to cycle). Nor can it be rewound, so a checkpoint restores its
  level only at the position the live iterator already stands at (``mlodsl.checkpoint``).

A level draws one batch per update, or, with ``batch_per="block"``, one per block of ``steps``
updates (``BlockBatches``).
"""
from __future__ import annotations

import torch


class MicroBatches(list):
    """The ``grad_accum`` micro-batches of one update: the level's loss is their mean."""


class DataExhaustedError(ValueError):
    """A level's one-shot data iterator ended; it cannot be cycled."""


class BatchStream:
    def __init__(self, name: str, data):
        self.name, self.data, self.position = name, data, 0  # position: batches handed out so far
        self.kind = ("none" if data is None else
                     "fixed" if isinstance(data, (tuple, torch.Tensor, dict)) else
                     "callable" if callable(data) else "iterable")
        self._iter = None
        if self.kind == "iterable":
            try:
                self._iter = iter(data)  # the first pass (a DataLoader starts its workers once, here)
            except TypeError:
                raise TypeError(f"level '{name}': data must be a batch (tuple/tensor/dict), an iterable or a "
                                f"callable; got {type(data).__name__}") from None
        self.one_shot = self.kind == "iterable" and self._iter is data
        self._returned: list = []  # batches drawn, then given back unused (``give_back``)

    def next(self):
        self.position += 1
        if self._returned:
            return self._returned.pop(0)
        if self.kind == "none":
            return None
        if self.kind == "fixed":
            return self.data
        if self.kind == "callable":
            return self.data()
        try:
            return next(self._iter)
        except StopIteration:
            pass
        if self.one_shot:
            self.position -= 1
            raise DataExhaustedError(
                f"level '{self.name}': its data, a one-shot iterator ({type(self.data).__name__}), is exhausted "
                f"after {self.position} batches. mlodsl streams a one-shot iterator without keeping its batches, so "
                f"it cannot cycle it: pass a list, a re-iterable (e.g. a DataLoader) or a callable that returns a "
                f"batch, or a generator that never ends") from None
        self._iter = iter(self.data)  # a re-iterable: the next pass
        try:
            return next(self._iter)
        except StopIteration:
            raise ValueError(f"level '{self.name}': its data is empty") from None

    def take(self, n: int) -> list:
        """``n`` draws (``next`` ``n`` times); a fixed batch (or none) without a call per draw."""
        if self.kind in ("fixed", "none") and not self._returned:
            self.position += n
            return [self.data if self.kind == "fixed" else None] * n
        return [self.next() for _ in range(n)]

    def give_back(self, batches: list):
        """Return drawn but unused batches: the next draws hand them out again, in order."""
        self._returned = list(batches) + self._returned
        self.position -= len(batches)

    def skip_to(self, position: int):
        """Fast-forward a fresh stream to ``position`` batches drawn (used when resuming)."""
        while self.position < position:
            self.next()


class BlockBatches(list):
    """One step's batches of a level with ``batch_per="block"``, indexed by update as every level's
    are: each drawn batch stands for the ``every`` updates of its block. ``draws`` holds each drawn
    batch once (what the stream handed out, for checkpoints)."""

    def __init__(self, draws: list, every: int):
        super().__init__(b for b in draws for _ in range(every))
        self.draws = list(draws)
