"""Mixed precision: autocast around a level's loss, and dynamic loss scaling for fp16 levels.

Both are handed to the generated step as functions and numbers (``Runtime.evaluate`` runs a level's
loss under its ``Autocast``; ``Runtime.partials`` multiplies the loss by the level's current scale
before differentiating and divides the gradients by it after); nothing inside a hypergradient method
knows about them. Parameters, optimizer states and losses stay in the modules' dtype (fp32); only
the operations autocast selects run in bf16/fp16.

Loss scaling (fp16 only: bf16 has fp32's exponent range) follows ``torch.amp.GradScaler``: a step
whose gradients overflow is skipped (``Program.step`` keeps every state as it was) and the scale of
each level that overflowed is multiplied by ``backoff``; after ``growth_interval`` finite steps in a
row the scale is multiplied by ``growth``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check(precision, where: str) -> None:
    if precision not in DTYPES:
        raise ValueError(f"{where}: precision must be one of {sorted(DTYPES)}, got {precision!r}")


class Autocast:
    """``autocast(device_type, dtype)`` as a context for one level's loss; ``Autocast(None)`` is fp32."""

    def __init__(self, precision: str, device_type: str = "cpu"):
        self.precision, self.dtype, self.device_type = precision, DTYPES[precision], device_type

    def __call__(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"Autocast({self.precision!r}, {self.device_type!r})"


@dataclass
class LossScaler:
    """Dynamic loss scale of one fp16 level (the defaults are ``torch.amp.GradScaler``'s)."""

    scale: float = 2.0 ** 16
    growth: float = 2.0
    backoff: float = 0.5
    growth_interval: int = 2000
    good_steps: int = 0
    overflows: int = 0

    def update(self, overflowed: bool) -> None:
        """After a step: back off on overflow, grow after ``growth_interval`` finite steps in a row."""
        if overflowed:
            self.scale *= self.backoff
            self.good_steps = 0
            self.overflows += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "overflows": self.overflows}

    def load_state_dict(self, sd: dict) -> None:
        self.scale, self.good_steps, self.overflows = float(sd["scale"]), int(sd["good_steps"]), int(sd["overflows"])
