"""Random numbers in levels' losses: which levels draw them, and the seed of each update, so that
every evaluation of one update's loss (the update, Unroll's replays of it, a finite difference's
two sides, an implicit method's products at the block's end) sees the same dropout masks."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .data import MicroBatches


_RANDOM_PREFIXES = ("rand", "bernoulli", "normal_", "multinomial", "poisson", "uniform_", "exponential_",
                    "cauchy_", "geometric_", "log_normal_", "random_", "rrelu")


def draws_random(traced) -> bool | None:
    """Whether a level's loss draws random numbers (dropout, ``torch.rand``...): an fx node of a
    random op; None for an opaque level, whose graph cannot be read (``Seeds.seeded`` runs it once)."""
    if getattr(traced, "opaque", True):
        return None
    for node in traced.graph.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = str(getattr(node.target, "__name__", node.target)).lower()
            if "dropout" in name and dropout_is_identity(node):
                continue
            if "dropout" in name or name == "normal" or name.startswith(_RANDOM_PREFIXES):
                return True
    return False


def dropout_is_identity(node) -> bool:
    """A dropout node whose probability is the constant 0, or whose training flag is the constant
    False (``F.dropout(x, p, training)``, ``aten.dropout(x, p, train)``): it draws nothing. Models
    configured without dropout (``dropout=0.0``, Hugging Face's ``*_dropout_prob=0``) keep such
    calls; seeding their updates would cost a generator fork per evaluation for nothing."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    train = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return (isinstance(p, (int, float)) and p == 0) or train is False


class RandomOps(TorchDispatchMode):
    """Notes whether any operation that runs under it draws from a generator."""

    found = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.found = self.found or torch.Tag.nondeterministic_seeded in func.tags
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class SeededBatch:
    """One update's batch with the seed of its random draws: every evaluation of that update's loss
    (the update itself, Unroll's replays of it, a finite difference's two sides, an implicit
    method's products at the block's end) sees the same dropout masks."""

    batch: object
    seed: int


@contextlib.contextmanager
def fixed_rng(seed: int):
    """torch's generators seeded with ``seed`` inside, as they were outside (``fork_rng``)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Seeds:
    """Draws the seeds of a step's updates for the lower levels whose losses draw random numbers.

    ``stochastic``: level -> whether its loss draws random numbers (``draws_random``; None for an
    opaque level until its loss has run once); ``evaluate(name, params, batch)``: a level's loss."""

    def __init__(self, stochastic: dict, evaluate: Callable):
        self.stochastic, self.evaluate = stochastic, evaluate

    def seeded(self, state: dict, B: dict, exclude=()) -> dict:
        """The step's batches with a seed for each update of a lower level whose loss draws random
        numbers (``SeededBatch``), drawn here from torch's generator: that update's loss is evaluated
        under that seed every time (a finite difference's two sides, every replay) and so sees the
        same dropout mask. ``exclude``: levels batched over tasks (``vmap`` draws their masks)."""
        for n, random in self.stochastic.items():
            if random is None and n not in exclude and n in B:  # an opaque level: run it once and see
                self.stochastic[n] = self._draws_random_when_run(n, state, B[n][0])
        levels = [n for n, random in self.stochastic.items() if random and n not in exclude and n in B]
        if not levels:
            return B
        sizes = {n: sum(len(b) if isinstance(b, MicroBatches) else 1 for b in B[n]) for n in levels}
        seeds = iter(torch.randint(0, 2 ** 62, (sum(sizes.values()),)).tolist())  # one draw for the step
        out = dict(B)
        for n in levels:
            out[n] = [MicroBatches(SeededBatch(mb, next(seeds)) for mb in b) if isinstance(b, MicroBatches)
                      else SeededBatch(b, next(seeds)) for b in B[n]]
        return out

    def _draws_random_when_run(self, name: str, state: dict, batch) -> bool:
        """Whether level ``name``'s loss draws random numbers, seen by evaluating it once (the
        generators as they were afterwards); True where the evaluation fails here."""
        params = {n: s["params"] for n, s in state.items()}
        try:
            with fixed_rng(0), torch.no_grad(), RandomOps() as mode:
                self.evaluate(name, params, batch[0] if isinstance(batch, MicroBatches) else batch)
        except Exception:  # noqa: BLE001 - the step itself will report it; seeding is then harmless
            return True
        return mode.found
