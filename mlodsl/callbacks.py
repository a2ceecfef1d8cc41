"""Callbacks for ``Program.fit``: logging to CSV or TensorBoard, and early stopping.

A callback is any ``cb(prog, row) -> bool``: ``fit`` calls it after every step with the step's
history row (losses, metrics, ``val`` when validated) and stops when one returns ``True``. Under
data parallel, callbacks run on rank 0 only and its decision to stop is sent to every rank.
"""
from __future__ import annotations

import csv
import math
import os


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class CSVLogger:
    """Appends every row to a CSV file; a column first seen later widens the file (it is rewritten)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.columns: list = []
        self.rows: list = []

    def __call__(self, prog, row) -> bool:
        row = _numbers(row)
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new or not os.path.exists(self.path):
            self.columns += new
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(self.rows)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        return False


class TensorBoardLogger:
    """Writes every number of every row as a TensorBoard scalar (tag = column, x = step).

    Needs the optional ``tensorboard`` package (``pip install tensorboard``).
    """

    def __init__(self, logdir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                              f"(or pip install 'mlodsl[tensorboard]'); importing it failed with: {err}") from err
        self.writer = SummaryWriter(os.fspath(logdir))

    def __call__(self, prog, row) -> bool:
        step = int(row.get("step", prog.step_count))
        for k, v in _numbers(row).items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        return False

    def close(self):
        self.writer.close()


class EarlyStopping:
    """Stops ``fit`` when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    rows in which it was logged (``mode="min"`` or ``"max"``). Rows without ``monitor`` (steps
    that were not validated) are ignored. ``best`` and ``best_step`` say where it was best."""

    def __init__(self, monitor: str = "val", patience: int = 5, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be at least 1, got {patience!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best, self.best_step, self.bad = math.inf if mode == "min" else -math.inf, None, 0

    def __call__(self, prog, row) -> bool:
        if self.monitor not in row:
            return False
        value = float(row[self.monitor])
        better = (value < self.best - self.min_delta) if self.mode == "min" else (value > self.best + self.min_delta)
        if better:
            self.best, self.best_step, self.bad = value, row.get("step"), 0
            return False
        self.bad += 1
        return self.bad >= self.patience
