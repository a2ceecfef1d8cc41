"""Shared offline data for the zoo examples: scikit-learn's 8x8 digits (1797 images, 10 classes).

Nothing downloads: ``sklearn.datasets.load_digits`` ships with scikit-learn.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

CLASSES = 10


def digits(seed: int = 0, meta_per_class: int = 10, test_per_class: int = 50):
    """Standardized digits split per class into a training pool, a small balanced meta (validation)
    set and a balanced test set. Returns ``(train, meta, test)``, each a ``(x float32, y int64)`` pair."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.5) * 2.0                                # pixels 0..16 -> [-1, 1]
    rng = np.random.RandomState(seed)
    parts = {"train": [], "meta": [], "test": []}
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        parts["meta"].append(idx[:meta_per_class])
        parts["test"].append(idx[meta_per_class:meta_per_class + test_per_class])
        parts["train"].append(idx[meta_per_class + test_per_class:])

    def pack(ids):
        ids = rng.permutation(np.concatenate(ids))
        return torch.from_numpy(x[ids]).float(), torch.from_numpy(y[ids]).long()

    return pack(parts["train"]), pack(parts["meta"]), pack(parts["test"])


def long_tailed(train, imbalance: float, seed: int = 0):
    """Subsample ``train`` so that class c keeps n_max * imbalance^(-c/9) examples (Cui et al. 2019):
    class 0 keeps all of its examples, class 9 keeps 1/imbalance of them (at least one)."""
    x, y = train
    counts = torch.bincount(y, minlength=CLASSES)
    n_max = int(counts.min())
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(CLASSES):
        n = max(1, int(round(n_max * imbalance ** (-c / (CLASSES - 1)))))
        idx = torch.nonzero(y == c).squeeze(1)
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    keep = torch.cat(keep)
    keep = keep[torch.randperm(len(keep), generator=g)]
    return x[keep], y[keep]


def corrupt(train, fraction: float, seed: int = 0):
    """Replace the labels of ``fraction`` of the examples by a different class drawn uniformly.
    Returns ``(x, noisy_y), is_corrupted`` (a bool mask)."""
    x, y = train
    g = torch.Generator().manual_seed(seed)
    bad = torch.randperm(len(y), generator=g)[: int(round(fraction * len(y)))]
    noisy = y.clone()
    noisy[bad] = (y[bad] + torch.randint(1, CLASSES, (len(bad),), generator=g)) % CLASSES
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[bad] = True
    return (x, noisy), mask


def sampler(data, batch_size: int, seed: int = 0):
    """A callable returning random minibatches (without replacement within an epoch), seeded."""
    g = torch.Generator().manual_seed(seed)
    n = len(data[0])
    order, pos = torch.randperm(n, generator=g), 0

    def draw():
        nonlocal order, pos
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        return tuple(t[idx] for t in data)

    return draw


@torch.no_grad()
def balanced_accuracy(logits, y):
    """Mean per-class recall (equals accuracy on a balanced set)."""
    pred = logits.argmax(-1)
    return float(torch.stack([(pred[y == c] == c).float().mean() for c in range(CLASSES) if (y == c).any()]).mean())
