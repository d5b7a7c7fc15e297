"""Work that happens only at an epoch boundary, without Python branching on array values.

ActiveLR's γ and ``G_prev``, AutoDrop's snapshot and angle change only at an epoch boundary. Written
with ``where``, every step would read and write every element for them. :func:`at_boundary` runs
the boundary work only when it is due, and the algorithm stays written once:

- eager on the host (NumPy, array-api-strict, torch on the CPU): the step count is a host value,
  so a Python ``if`` on it (not on the parameters or gradients) picks one branch;
- JAX traced (``jax.jit``, ``vmap``, ...): ``jax.lax.cond`` (``adaptlr.backends.jax.cond``); eager
  JAX on the CPU: the Python branch (an eager ``lax.cond`` would compile its branches every step);
- elsewhere (torch or eager JAX on a GPU, where reading the count would wait for the device; code that
  ``torch.compile`` traces; CuPy): both branches, selected with ``where`` (the formulation
  before this hook, at the old cost).

Both branches take the same operands and must return the same structure of arrays (``lax.cond``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import optree

from adaptlr import _validation as v

__all__ = ["at_boundary", "select_both"]


def at_boundary(xp: Any, pred: Any, boundary: Callable[..., Any], ordinary: Callable[..., Any],
                operands: tuple) -> Any:
    """``boundary(*operands)`` where the 0-D boolean ``pred`` is true, else ``ordinary(*operands)``."""
    if isinstance(pred, (bool, np.bool_)):  # NumPy gives 0-D results as scalars
        return boundary(*operands) if pred else ordinary(*operands)
    library = v.library_of(pred)
    if library == "jax" and _is_traced(pred):
        from adaptlr.backends.jax import cond  # pyright: ignore[reportMissingImports]

        return cond(pred, boundary, ordinary, operands)
    due = _host_value(pred, library)
    if due is not None:
        return boundary(*operands) if due else ordinary(*operands)
    return select_both(xp, pred, boundary, ordinary, operands)


def select_both(xp: Any, pred: Any, boundary: Callable[..., Any], ordinary: Callable[..., Any],
                operands: tuple) -> Any:
    """Both branches, selected elementwise with ``xp.where(pred, ...)`` (every element every step)."""
    return optree.tree_map(lambda a, b: xp.where(pred, a, b), boundary(*operands), ordinary(*operands),
                           none_is_leaf=False)


def _is_traced(x: Any) -> bool:
    from jax.core import Tracer  # the array is a JAX array: jax is imported

    return isinstance(x, Tracer)


def _host_value(pred: Any, library: str | None) -> bool | None:
    """``bool(pred)`` where that is a host read (no device wait, no graph break), else None."""
    if library == "torch":
        import torch  # the array is a torch tensor: torch is imported

        if pred.device.type != "cpu" or torch.compiler.is_compiling():
            return None
    elif library == "jax":  # a concrete (eager) array: read it where that is a host read
        if any(d.platform != "cpu" for d in pred.devices()):
            return None
    elif library not in ("numpy", "array_api_strict"):
        return None
    try:
        return bool(pred)
    except (TypeError, ValueError, RuntimeError):  # array-api-strict arrays on a non-CPU device
        return None
