"""The digits data (scikit-learn's bundled 8x8 images; nothing is downloaded) and the permuted stream.

``load(seed)`` gives a fixed, stratified train/test split with pixels scaled to [0, 1] and then
standardised with the training set's mean and standard deviation. ``permuted_stream`` yields
minibatches whose pixels are shuffled by a new fixed permutation every ``shift_every`` steps (the
abrupt distribution shift of the EG experiment, spec §6).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Digits", "load", "minibatches", "permuted_stream", "require"]


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of the ``reproduce`` extra, or raise a clear ImportError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"adaptlr reproduce needs {module.split('.')[0]} for {purpose}; "
            "install it with `pip install adaptlr[reproduce]` (scikit-learn, matplotlib)"
        ) from None


@dataclass(frozen=True)
class Digits:
    """A train/test split of the digits (NumPy arrays).

    Attributes:
        x_train, x_test: float64 images, shape (n, 64), standardised with the training statistics.
        y_train, y_test: int64 labels 0..9.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classes(self) -> int:
        return 10


def load(test_fraction: float = 0.25, split_seed: int = 0) -> Digits:
    """The 1797 digits, split stratified into train (1347) and test (450) with ``split_seed``."""
    datasets = require("sklearn.datasets", "the digits data")
    x, y = datasets.load_digits(return_X_y=True)
    x = x.astype(np.float64) / 16.0
    y = y.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(y == c)
        rng.shuffle(members)
        test_idx.extend(members[: round(test_fraction * len(members))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    x_train, x_test = x[~test_mask], x[test_mask]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 0.1  # constant border pixels would otherwise divide by 0
    return Digits((x_train - mean) / std, y[~test_mask], (x_test - mean) / std, y[test_mask])


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled index batches; the last partial batch is dropped (a fixed S)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def permuted_stream(
    x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, shift_every: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``steps`` minibatches ``(x, y, task)``; the pixel permutation changes every ``shift_every`` steps.

    Task 0 uses the identity permutation; each later task a fresh random one (fixed by ``seed``).
    """
    rng = np.random.default_rng(seed)
    perm = np.arange(x.shape[1])
    for t in range(steps):
        task = t // shift_every
        if t > 0 and t % shift_every == 0:
            perm = rng.permutation(x.shape[1])
        idx = rng.integers(0, x.shape[0], size=batch_size)
        yield x[idx][:, perm], y[idx], task
