"""``lr_summary(state)``: the learning rates and the adaptations' signals, summarised for logging.

::

    for name, value in adaptlr.lr_summary(state, flat=True).items():
        writer.add_scalar(name, value, step)        # TensorBoard; or print(name, value)

This reads the state back to the host (a device sync): call it every few hundred steps, not in the
compiled step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optree

from adaptlr._state_tree import to_numpy
from adaptlr._tree import Layout
from adaptlr.core import OptimizerState, learning_rates

__all__ = ["lr_summary"]


def lr_summary(
    state: OptimizerState, *, names: Sequence[str] | None = None, flat: bool = False
) -> dict[str, Any]:
    """Per-tensor min / median / max of the effective learning rate and of the adaptations' signals.

    Args:
        state: an :class:`adaptlr.OptimizerState` (for the torch adapter, ``optimizer.functional_state``).
        names: a name per parameter in leaf order (default: the tree paths, ``"['w']"``, ``"[0]"``).
        flat: False: ``{"learning_rate": {name: {"min", "median", "max"}}, signal: ...}``; True: one
            level, ``{"learning_rate/name/min": value, ...}``, ready for ``add_scalar``.

    Returns:
        ``"learning_rate"`` (:func:`adaptlr.learning_rates`, spec §0.1) and each signal of each
        adaptation (``gamma`` for ActiveLR; ``omega``, ``theta``, ``kappa`` ... for AutoDrop;
        ``skipped_steps``, ``consecutive_skips`` for :func:`adaptlr.skip_nonfinite`): a
        signal shaped like the params becomes per-tensor statistics, a 0-D array a float, any other
        array its min / median / max. A name used by two adaptations gets the suffix ``#i`` (their
        position, innermost first). Values are Python floats.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=2)
        >>> state = opt.init({"w": np.array([1.0, -2.0, 3.0])})
        >>> adaptlr.lr_summary(state)["gamma"]
        {"['w']": {'min': 1.0, 'median': 1.0, 'max': 1.0}}
        >>> adaptlr.lr_summary(state, flat=True)["learning_rate/['w']/max"]
        0.1
    """
    if not isinstance(state, OptimizerState):
        raise TypeError(f"lr_summary needs an adaptlr OptimizerState, got {type(state).__name__}")
    _, treespec = optree.tree_flatten(state.learning_rate)
    layout = Layout(treespec, state.learning_rate)
    if names is None:
        names = layout.paths()
    else:
        names = [str(n) for n in names]
        if len(names) != layout.num_leaves:
            raise ValueError(f"names has {len(names)} entries but the state has {layout.num_leaves} parameters")

    out: dict[str, Any] = {"learning_rate": _per_tensor(layout.leaves(learning_rates(state), "learning rates"), names)}
    signals: list[tuple[int | str, str, Any]] = []
    base_signals = getattr(state.base, "signals", None)
    if base_signals is not None:  # a learning-rate-free base's estimate (Prodigy's d)
        signals.extend(("base", key, value) for key, value in base_signals(layout).items())
    for i, adaptation_state in enumerate(state.adaptations):
        for key, value in adaptation_state.signals(layout).items():
            signals.append((i, key, value))
    counts: dict[str, int] = {}
    for _, key, _ in signals:
        counts[key] = counts.get(key, 0) + 1
    for i, key, value in signals:
        name = key if counts[key] == 1 and key != "learning_rate" else f"{key}#{i}"
        out[name] = _summarise(value, layout, names)
    return _flatten(out) if flat else out


def _summarise(value: Any, layout: Layout, names: Sequence[str]) -> Any:
    if value is None:
        return None
    try:
        leaves = layout.treespec.flatten_up_to(value) if not layout.treespec.is_leaf() else None
    except (ValueError, TypeError):
        leaves = None
    if leaves is not None:
        return _per_tensor(leaves, names)
    host = to_numpy(value)
    if host.ndim == 0:
        return float(host)
    return _stats(host)


def _per_tensor(leaves: list, names: Sequence[str]) -> dict[str, Any]:
    out = {}
    for name, leaf in zip(names, leaves):
        if isinstance(leaf, dict):  # a small tree per parameter (DSA's factors): one entry per key
            for key, sub in leaf.items():
                out[f"{name}/{key}"] = _stats(to_numpy(sub))
        else:
            out[name] = _stats(to_numpy(leaf))
    return out


def _stats(host: np.ndarray) -> dict[str, float]:
    host = np.asarray(host, dtype=np.float64)
    if host.size == 0:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": float(np.min(host)), "median": float(np.median(host)), "max": float(np.max(host))}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif value is not None:
            out[name] = value
    return out
