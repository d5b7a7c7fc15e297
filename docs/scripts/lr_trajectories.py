"""The learning-rate trajectory figure at the top of each algorithm page (docs/algorithms/*.md).

Each panel runs one optimizer configuration of the conformance suite (``adaptlr.conformance``'s
registry, or a base with a schedule) on one of its problems, in NumPy float64 through
``adaptlr.conformance.runner.run_trajectory``, and plots ``adaptlr.learning_rates(state)`` after
every step: one thin line per parameter element, coloured by tensor (elements that share one rate
draw one line). Panels whose ``median`` flag is set draw one line per configuration instead: the
median over the elements of the rates.

Usage: ``python docs/scripts/lr_trajectories.py [PAGE ...]`` (pages: the keys of ``FIGURES``; default
all). Writes ``docs/algorithms/figures/lr_PAGE.png``. Needs matplotlib (``pip install -e
".[reproduce]"``); runs in about ten seconds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optree

import adaptlr
from adaptlr.conformance import ALGORITHMS, PROBLEMS
from adaptlr.conformance.backends import BACKENDS
from adaptlr.conformance.runner import run_trajectory

OUT = Path(__file__).resolve().parent.parent / "algorithms" / "figures"
STEPS = 200


@dataclass(frozen=True)
class Curve:
    """One run: a conformance registry entry (``algorithm``) or a factory, on a conformance problem."""

    label: str
    problem: str
    algorithm: str | None = None
    factory: Callable[[], Any] | None = None

    def optimizer(self) -> Any:
        return self.factory() if self.factory is not None else ALGORITHMS[self.algorithm].build()


@dataclass(frozen=True)
class Panel:
    title: str
    curves: tuple[Curve, ...]
    median: bool = False  # one line per curve (median over elements) instead of one per element
    log: bool = True


def _cosine(t: Any) -> Any:
    """A warm-up of 20 steps, then a cosine decay to 0 at step 200 (array operations only)."""
    import array_api_compat

    xp = array_api_compat.array_namespace(t)
    warm = t / 20.0
    decay = 0.5 * (1.0 + xp.cos(math.pi * xp.clip(t - 20.0, 0.0, 180.0) / 180.0))
    return 0.05 * xp.minimum(warm, decay)


FIGURES: dict[str, tuple[Panel, ...]] = {
    "base": (
        Panel("adamw(0.05): κ = 1", (Curve("adamw", "noisy_quadratic", "adamw"),), log=False),
        Panel("adamw(schedule): the rate is α_t", (Curve("adamw", "noisy_quadratic", factory=lambda: adaptlr.adamw(
            _cosine, weight_decay=0.01)),), log=False),
    ),
    "activelr": (
        Panel("active(sgd(0.02)), S = 5", (Curve("active(sgd)", "noisy_quadratic", "active(sgd)"),)),
        Panel("active(adamw(0.05)), S = 5", (Curve("active(adamw)", "noisy_quadratic", "active(adamw)"),)),
    ),
    "autodrop": (
        Panel("autodrop(sgd(0.1, Nesterov)), S = 5", (Curve("autodrop(sgdn)", "rotating_target", "autodrop(sgdn)"),)),
        Panel("autodrop(adam(0.1)), S = 5", (Curve("autodrop(adam)", "rotating_target", "autodrop(adam)"),)),
    ),
    "hypergradient": (
        Panel("sgd_hd: one global α", (Curve("sgd_hd", "noisy_quadratic", "sgd_hd"),)),
        Panel("adam, multiplicative, per tensor",
              (Curve("hd-mult-tensor(adam)", "noisy_quadratic", "hd-mult-tensor(adam)"),)),
        Panel("adam, multiplicative, per element",
              (Curve("hd-mult-element(adam)", "noisy_quadratic", "hd-mult-element(adam)"),)),
    ),
    "dsa": (
        Panel("dsa(sgd(0.05)): tensor × row × col", (Curve("dsa(sgd)", "noisy_quadratic", "dsa(sgd)"),)),
        Panel("dsa(adam(0.02)): tensor × row × col", (Curve("dsa(adam)", "noisy_quadratic", "dsa(adam)"),)),
    ),
    "eg": (
        Panel("eg_step_size(sgd momentum), global scale",
              (Curve("eg-global(sgdm)", "noisy_quadratic", "eg-global(sgdm)"),)),
        Panel("eg_step_size(adam), per-tensor scale",
              (Curve("eg-tensor(adam)", "noisy_quadratic", "eg-tensor(adam)"),)),
    ),
    "lr_free": (
        Panel("learning-rate-free bases (median over elements)", tuple(
            Curve(name, "noisy_quadratic", name)
            for name in ("prodigy", "dadapt_adam", "dadapt_sgd", "dog", "ldog", "dowg")
        ), median=True),
    ),
}


def rates(curve: Curve) -> tuple[np.ndarray, list[tuple[str, slice]]]:
    """``(steps × elements)`` learning rates of every parameter element, and each tensor's columns."""
    trajectory = run_trajectory(curve.optimizer(), PROBLEMS[curve.problem], BACKENDS["numpy"], "float64", STEPS)
    if trajectory.lrs is None:
        raise TypeError(f"{curve.label} is not an adaptlr optimizer: it has no learning rates")
    names = list(_tensor_names(PROBLEMS[curve.problem].params()))
    sizes = [lr.size for lr in trajectory.lrs[0]]
    columns, start = [], 0
    for name, size in zip(names, sizes):
        columns.append((name, slice(start, start + size)))
        start += size
    return np.array([np.concatenate([lr.ravel() for lr in step]) for step in trajectory.lrs]), columns


def _tensor_names(params: Any) -> list[str]:
    """``"w (3, 4)"`` per leaf, in the leaf order of the state (optree's: dict keys sorted)."""
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    return [f"{'.'.join(map(str, path))} {tuple(np.shape(leaf))}" for path, leaf in zip(paths, leaves)]


def plot(page: str, panels: tuple[Panel, ...]) -> Path:
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2 * len(panels), 6.4), 3.1), squeeze=False)
    steps = np.arange(1, STEPS + 1)
    for ax, panel in zip(axes[0], panels):
        for k, curve in enumerate(panel.curves):
            lrs, columns = rates(curve)
            if panel.median:
                ax.plot(steps, np.median(lrs, axis=1), color=f"C{k}", lw=1.4, label=curve.label)
                continue
            for j, (name, cols) in enumerate(columns):
                lines = ax.plot(steps, lrs[:, cols], color=f"C{j}", lw=0.8, alpha=0.6)
                lines[0].set_label(name)
        ax.set_yscale("log" if panel.log else "linear")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step t", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("learning_rates(state): α·κ", fontsize=8)
    problems = sorted({c.problem for p in panels for c in p.curves})
    fig.suptitle(f"conformance problem: {', '.join(problems)} (NumPy float64, {STEPS} steps)", fontsize=8)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"lr_{page}.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version string: reruns give the same file
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", help=f"any of {', '.join(FIGURES)} (default: all)")
    pages = parser.parse_args().pages or list(FIGURES)
    unknown = [p for p in pages if p not in FIGURES]
    if unknown:
        parser.error(f"unknown pages {unknown}; valid: {', '.join(FIGURES)}")
    for page in pages:
        print(plot(page, FIGURES[page]))


if __name__ == "__main__":
    main()
