"""The training loop shared by the experiments, the progress bar, and the settings of one run.

``train`` runs one optimizer on one model for a number of epochs of shuffled minibatches and logs
what the experiments plot: the minibatch loss and the effective learning rate (``adaptlr.learning_rates``,
averaged over all parameter elements) per step, and per epoch the full training loss, the test
accuracy and the angular velocity ω of the parameter vector (spec §3's definition, measured here for
every optimizer from parameter snapshots at epoch boundaries).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import adaptlr
from adaptlr.reproduce import models
from adaptlr.reproduce.data import Dataset, load_dataset, minibatches

__all__ = ["AlgorithmMissing", "Progress", "RunLog", "Settings", "algorithm", "angle_degrees", "as_model", "flat",
           "train"]


@dataclass(frozen=True)
class Settings:
    """What the command line chose.

    Attributes:
        quick: the small configuration (under a minute per experiment on 2 CPU cores).
        backend: an :class:`adaptlr.conformance.backends.Backend`.
        seeds: the number of seeds (None: the experiment's default).
        out: the folder for the table and the plots.
        progress: show a progress bar on stderr.
        dataset: ``digits`` (the default) or ``mnist1d`` (:data:`adaptlr.reproduce.data.DATASETS`).
    """

    quick: bool
    backend: Any
    seeds: int | None
    out: Path
    progress: bool = True
    dataset: str = "digits"

    def seed_count(self, full: int, quick: int = 1) -> int:
        return self.seeds if self.seeds is not None else (quick if self.quick else full)

    def tag(self, name: str) -> str:
        """A file name for this dataset: ``name`` on digits (the names before MNIST-1D), else ``name_<dataset>``."""
        return name if self.dataset == "digits" else f"{name}_{self.dataset}"

    def load(self) -> Dataset:
        return load_dataset(self.dataset)


class AlgorithmMissing(RuntimeError):
    """An experiment needs an algorithm this adaptlr does not (yet) export."""


def algorithm(name: str) -> Callable[..., Any]:
    """``adaptlr.<name>``, or :class:`AlgorithmMissing` naming it."""
    found = getattr(adaptlr, name, None)
    if found is None:
        raise AlgorithmMissing(f"adaptlr.{name} is not available in this version of adaptlr")
    return found


class Progress:
    """A progress bar: tqdm when it is installed, else a one-line counter on stderr."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.total, self.done, self.description, self.enabled = total, 0, description, enabled
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=description, unit="step", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or self.done >= self.total:
            self._last = now
            width = 30
            filled = int(width * min(self.done, self.total) / max(self.total, 1))
            sys.stderr.write(f"\r{self.description} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")


@dataclass
class RunLog:
    """What one training run logged (Python floats; NaN where a run diverged)."""

    step_loss: list[float] = field(default_factory=list)
    step_lr: list[float] = field(default_factory=list)
    epoch_train_loss: list[float] = field(default_factory=list)
    epoch_test_loss: list[float] = field(default_factory=list)
    epoch_test_acc: list[float] = field(default_factory=list)
    epoch_omega: list[float] = field(default_factory=list)
    epoch_lr: list[float] = field(default_factory=list)
    diverged: bool = False

    @property
    def final_test_acc(self) -> float:
        return self.epoch_test_acc[-1]

    @property
    def final_train_loss(self) -> float:
        return self.epoch_train_loss[-1]


def flat(params: Any, backend: Any) -> np.ndarray:
    """All parameters as one float64 NumPy vector (for ω)."""
    import optree

    return np.concatenate([backend.to_numpy(p).ravel() for p in optree.tree_leaves(params)]).astype(np.float64)


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """The angle between two vectors in degrees (NaN where either is 0), as in spec §3."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0 or not (np.isfinite(na) and np.isfinite(nb)):
        return math.nan
    return math.degrees(math.acos(float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))))


def mean_learning_rate(state: Any, params: Any, backend: Any) -> float:
    """``adaptlr.learning_rates(state)`` averaged over every parameter element."""
    import optree

    rates = optree.tree_leaves(adaptlr.learning_rates(state))
    leaves = optree.tree_leaves(params)
    total = sum(float(np.sum(np.broadcast_to(backend.to_numpy(r), tuple(p.shape)))) for r, p in zip(rates, leaves))
    return total / sum(math.prod(p.shape) for p in leaves)


def as_model(model: Any) -> Any:
    """A model object (:class:`models.MLP`, :class:`adaptlr.reproduce.cnn.CNN1d`); a list of sizes is an MLP."""
    return models.MLP(tuple(model)) if isinstance(model, (list, tuple)) else model


def train(
    opt: adaptlr.Optimizer,
    data: Dataset,
    model: Any,
    *,
    backend: Any,
    seed: int,
    epochs: int,
    batch_size: int,
    progress: Progress | None = None,
    log_lr: bool = False,
    dtype: str = "float64",
) -> RunLog:
    """Train ``model`` (or an MLP of layer sizes ``model``) on ``data`` with ``opt``; ``seed`` fixes init and batches.

    Per-step learning rates are logged only with ``log_lr`` (one host copy per step); the learning
    rate at each epoch's end always is. A run whose loss stops being finite stops there and is
    marked ``diverged``; its remaining epochs are filled with chance accuracy and NaN losses.
    """
    with np.errstate(all="ignore"):  # a diverging run overflows on NumPy; it is reported, not warned about
        return _train(opt, data, as_model(model), backend, seed, epochs, batch_size, progress, log_lr, dtype)


def _train(opt, data, model, backend, seed, epochs, batch_size, progress, log_lr, dtype) -> RunLog:
    xp = backend.xp
    params = model.init(seed, backend, dtype)
    x_train, x_test = backend.asarray(data.x_train, dtype), backend.asarray(data.x_test, dtype)
    y_train = models.one_hot(data.y_train, data.classes, backend, dtype)
    y_test = models.one_hot(data.y_test, data.classes, backend, dtype)
    rng = np.random.default_rng(10_000 + seed)
    n = data.x_train.shape[0]
    steps_per_epoch = n // batch_size
    state = opt.init(params)
    log = RunLog()
    snapshots = [flat(params, backend)]
    moves: list[np.ndarray] = []
    for epoch in range(epochs):
        for idx in minibatches(n, batch_size, rng):
            index = backend.asarray(idx, "int64")
            xb, yb = xp.take(x_train, index, axis=0), xp.take(y_train, index, axis=0)
            loss, grads = model.loss_and_grad(params, xb, yb, xp)
            updates, state = opt.update(grads, state, params)
            params = adaptlr.apply_updates(params, updates)
            log.step_loss.append(float(backend.to_numpy(loss)))
            if log_lr:
                log.step_lr.append(mean_learning_rate(state, params, backend))
        if progress is not None:
            progress.update(steps_per_epoch)
        train_loss = float(backend.to_numpy(model.loss_value(params, x_train, y_train, xp)))
        if not math.isfinite(train_loss):
            log.diverged = True
            if progress is not None:
                progress.update(steps_per_epoch * (epochs - epoch - 1))
            for _ in range(epochs - epoch):
                log.epoch_train_loss.append(math.nan)
                log.epoch_test_loss.append(math.nan)
                log.epoch_test_acc.append(0.1)
                log.epoch_omega.append(math.nan)
                log.epoch_lr.append(math.nan)
            return log
        log.epoch_train_loss.append(train_loss)
        log.epoch_test_loss.append(float(backend.to_numpy(model.loss_value(params, x_test, y_test, xp))))
        log.epoch_test_acc.append(models.accuracy(params, x_test, data.y_test, xp, backend, model))
        log.epoch_lr.append(mean_learning_rate(state, params, backend))
        snapshots.append(flat(params, backend))
        moves.append(snapshots[-1] - snapshots[-2])
        log.epoch_omega.append(angle_degrees(moves[-1], moves[-2]) if len(moves) >= 2 else math.nan)
        snapshots = snapshots[-1:]
        moves = moves[-1:]
    return log
