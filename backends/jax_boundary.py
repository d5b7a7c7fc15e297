"""The epoch-boundary hook under JAX tracing: ``jax.lax.cond``, the work in one branch.

:func:`adaptlr._boundary.at_boundary` calls :func:`only_when` while ``jax.jit`` (or ``vmap``, ...)
traces ActiveLR's or AutoDrop's step: one branch runs, the boundary work or the identity. Only JAX
is imported (not optax, which :mod:`adaptlr.backends.jax` needs).

Every output of an XLA conditional is a fresh buffer, so the identity branch copies its operands
(ActiveLR(AdamW) 3.0 parameters' worth of elements per ordinary step, AutoDrop 2.0; counted by
``docs/scripts/jax_step_copies.py``). A ``lax.while_loop`` run zero or one time keeps its carry
in place (2.0 and 2.0) and was measured in docs/performance.md, round 5: 2–7 % faster without
donation, 7–26 % slower with the state donated on XLA:CPU, so it was not kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["only_when"]


def only_when(pred: Any, work: Callable[..., Any], operands: tuple) -> tuple:
    """``work(*operands)`` where the 0-D boolean ``pred`` is true, else ``operands`` unchanged.

    ``work`` must return the structure, shapes and dtypes of ``operands``.
    """
    return jax.lax.cond(pred, lambda *ops: tuple(work(*ops)), lambda *ops: tuple(ops), *operands)
