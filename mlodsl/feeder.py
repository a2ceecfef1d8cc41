"""The data feeder: every level's batches for one step, drawn from its stream (``mlodsl.data``).

A step takes, for each level, one batch per update (``batch_per="block"``: one per block of
``steps`` updates, ``BlockBatches``); with ``grad_accum > 1``, an update of a level whose data
changes takes ``grad_accum`` micro-batches (``MicroBatches``). Batches drawn ahead of a step (by
``hypergradient()``, ``explain()`` or the build) are kept pending and used by that step, so asking
about the next step never changes it.
"""
from __future__ import annotations

from .data import BatchStream, BlockBatches
from .data import MicroBatches
from .tree import tree_map


def first_micro_batch(batch):
    """The first micro-batch of an update's batch (the batch itself without accumulation)."""
    return batch[0] if isinstance(batch, MicroBatches) else batch


def single_draws(batches: list) -> list:
    """The single draws behind one level's update batches (micro-batches flattened; a batch shared
    by a block's updates, ``BlockBatches``, once): what its stream handed out for them."""
    batches = getattr(batches, "draws", batches)
    return [b for batch in batches for b in (batch if isinstance(batch, MicroBatches) else [batch])]


def example(batches: dict, name: str, one_task: bool):
    """Level ``name``'s first batch of a step, as one evaluation of its loss takes it: the first
    micro-batch, and with ``one_task`` (a level batched over tasks) the first task's."""
    batch = first_micro_batch(batches[name][0])
    return tree_map(lambda x: x[0], batch) if one_task else batch


class Feeder:
    """Every level's batch stream, and the step's batches drawn from them.

    Args:
        data: ``{level: its data=}``.
        updates_per_step: ``{level: its updates in one step}`` (the plan's).
        batch_every: ``{level: updates per drawn batch}`` (``mlodsl.build.batch_every``).
        grad_accum: micro-batches per update of a level whose data changes.
    """

    def __init__(self, data: dict, updates_per_step: dict, batch_every: dict, grad_accum: int):
        self.data = dict(data)
        self.streams = {n: BatchStream(n, d) for n, d in self.data.items()}
        self.updates_per_step, self.batch_every, self.grad_accum = updates_per_step, batch_every, grad_accum
        self.pending: dict | None = None  # drawn for the next step, not yet used

    def _draw_update(self, stream: BatchStream):
        """One update's batch: ``grad_accum`` micro-batches from a stream that changes."""
        if self.grad_accum == 1 or stream.kind in ("none", "fixed"):
            return stream.next()
        return MicroBatches(stream.next() for _ in range(self.grad_accum))

    def _draw(self) -> dict:
        out = {}
        for n, s in self.streams.items():
            every = self.batch_every[n]
            count = self.updates_per_step[n] // every
            single = self.grad_accum == 1 or s.kind in ("none", "fixed")  # one draw per update
            draws = s.take(count) if single else [self._draw_update(s) for _ in range(count)]
            out[n] = draws if every == 1 else BlockBatches(draws, every)
        return out

    def peek(self) -> dict:
        """The next step's batches, drawn now if they are not yet: the next ``take`` returns them."""
        if self.pending is None:
            self.pending = self._draw()
        return self.pending

    def take(self) -> dict:
        """The batches of the step about to run (the pending ones, if any)."""
        batches, self.pending = (self.pending, None) if self.pending is not None else (self._draw(), None)
        return batches

    # -- checkpoints (mlodsl.checkpoint) ------------------------------------------------------------
    def consumed(self, name: str) -> int:
        """Batches of level ``name`` the program has used (drawn batches still pending are not)."""
        pending = self.pending[name] if self.pending is not None else []
        return self.streams[name].position - len(single_draws(pending))

    def positioned(self, name: str, position: int) -> BatchStream:
        """Level ``name``'s stream at ``position``: the live one where it already stands there, a fresh
        one fast-forwarded otherwise (a one-shot iterator cannot be: the caller checks first)."""
        if position == self.consumed(name):
            return self.streams[name]
        stream = BatchStream(name, self.data[name])
        stream.skip_to(position)
        return stream

    def use(self, streams: dict) -> None:
        """Make ``streams`` the feeder's; a kept stream gets back its drawn but unused batches."""
        for name, stream in streams.items():
            if stream is self.streams[name] and self.pending is not None:
                stream.give_back(single_draws(self.pending[name]))
        self.streams, self.pending = streams, None
