"""The datasets of the reproductions (nothing is downloaded) and the permuted stream.

``digits``: scikit-learn's bundled 8x8 images; ``load(seed)`` gives a fixed, stratified train/test
split with pixels scaled to [0, 1] and then standardised with the training set's mean and standard
deviation. ``mnist1d``: MNIST-1D (Greydanus 2020, "Scaling down deep learning"), 4000 train / 1000 test
sequences of length 40, generated locally by the ``mnist1d`` package with its default arguments and the
fixed seed :data:`MNIST1D_SEED` (never its ``get_dataset``, which downloads a file). ``load_dataset(name)``
gives either; ``missing_modules(name)`` lists the optional packages a dataset needs that are not
installed, so that the command can stop before any training. ``permuted_stream`` yields minibatches
whose features are shuffled by a new fixed permutation every ``shift_every`` steps (the abrupt
distribution shift of the EG experiment, spec §6).
"""

from __future__ import annotations

import functools
import importlib.util
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DATASETS", "MNIST1D_SEED", "Dataset", "Digits", "load", "load_dataset", "load_mnist1d", "minibatches",
           "missing_modules", "permuted_stream", "require"]

MNIST1D_SEED = 42
"""The seed of the generated MNIST-1D (the package's default, so it is the paper's data set)."""

DATASETS = {"digits": ("sklearn",), "mnist1d": ("mnist1d",)}
"""Each dataset and the optional modules it needs (besides matplotlib, which every experiment needs)."""


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of the ``reproduce`` extra, or raise a clear ImportError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"adaptlr reproduce needs {module.split('.')[0]} for {purpose}; "
            "install it with `pip install adaptlr[reproduce]` (scikit-learn, matplotlib, mnist1d)"
        ) from None


def missing_modules(dataset: str, plots: bool = True) -> list[str]:
    """The optional modules that ``dataset`` (and the plots) need and that cannot be imported."""
    needed = [*DATASETS[dataset], *(("matplotlib",) if plots else ())]
    return [m for m in needed if importlib.util.find_spec(m) is None]


@dataclass(frozen=True)
class Dataset:
    """A train/test split (NumPy arrays).

    Attributes:
        x_train, x_test: float64 inputs, shape (n, features), standardised.
        y_train, y_test: int64 labels 0..9.
        name: ``digits`` or ``mnist1d``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "digits"

    @property
    def classes(self) -> int:
        return 10

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    @property
    def title(self) -> str:
        return {"digits": "digits", "mnist1d": "MNIST-1D"}.get(self.name, self.name)

    def describe(self) -> str:
        return f"{self.title} ({len(self.y_train)} train / {len(self.y_test)} test)"


Digits = Dataset  # the name before MNIST-1D joined


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
    return Dataset((x_train - mean) / std, y[~test_mask], (x_test - mean) / std, y[test_mask], "digits")


@functools.lru_cache(maxsize=2)
def load_mnist1d(seed: int = MNIST1D_SEED) -> Dataset:
    """MNIST-1D generated locally with the package's default arguments and ``seed`` (≈ 3 s, cached).

    ``mnist1d.data.make_dataset`` seeds NumPy's and Python's global generators; their states are
    restored afterwards, so loading the data does not change a caller's random streams.
    """
    generator = require("mnist1d.data", "the MNIST-1D data")
    args = generator.get_dataset_args()
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = generator.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return Dataset(np.asarray(raw["x"], np.float64), np.asarray(raw["y"], np.int64),
                   np.asarray(raw["x_test"], np.float64), np.asarray(raw["y_test"], np.int64), "mnist1d")


def load_dataset(name: str) -> Dataset:
    """``digits`` (:func:`load`) or ``mnist1d`` (:func:`load_mnist1d`)."""
    if name == "digits":
        return load()
    if name == "mnist1d":
        return load_mnist1d()
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled index batches; the last partial batch is dropped (a fixed S)."""
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def permuted_stream(
    x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, shift_every: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``steps`` minibatches ``(x, y, task)``; the feature permutation changes every ``shift_every`` steps.

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
