"""The epoch-boundary hook under JAX tracing: the boundary work runs only when due, in place.

:func:`adaptlr._boundary.at_boundary` calls :func:`only_when` while ``jax.jit`` (or ``vmap``, ...)
traces ActiveLR's or AutoDrop's step. The work must leave the operands unchanged on every other
step, without reading or writing them.

``jax.lax.cond`` does not: every output of an XLA conditional is a fresh buffer, so on an ordinary
step its identity branch copies every operand. For ActiveLR(AdamW) on ResNet-18 shapes that is
three parameters' worth of elements per step (``docs/scripts/jax_step_copies.py``). A
``jax.lax.while_loop`` that runs its body zero or one time updates its carry in place. It copies
only the operands it may not overwrite: inputs of the jitted function that come back as outputs.

``while_loop`` has no reverse-mode derivative, so :func:`only_when` is a ``jax.custom_jvp`` whose
tangents are those of the ``lax.cond`` formulation. ``jax.grad`` through a jitted step then
works as before. Closed-over arrays (the step's parameters, scalars) become explicit arguments with
``jax.closure_convert``, so their derivatives are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["only_when"]


def only_when(pred: Any, work: Callable[..., Any], operands: tuple) -> Any:
    """``work(*operands)`` where the 0-D boolean ``pred`` is true, else ``operands`` unchanged.

    ``work`` must return the structure, shapes and dtypes of ``operands``.
    """
    work_fn, consts = jax.closure_convert(work, *operands)

    @jax.custom_jvp
    def run(pred: Any, operands: tuple, consts: list) -> Any:
        def body(carry: tuple) -> tuple:
            return jnp.zeros_like(carry[0]), tuple(work_fn(*carry[1], *consts))

        return jax.lax.while_loop(lambda carry: carry[0], body, (pred, tuple(operands)))[1]

    @run.defjvp
    def run_jvp(primals: tuple, tangents: tuple) -> tuple:
        pred, operands, consts = primals

        def as_cond(operands: tuple, consts: list) -> Any:
            return jax.lax.cond(pred, lambda *ops: tuple(work_fn(*ops, *consts)), lambda *ops: ops, *operands)

        _, out_tangents = jax.jvp(as_cond, (operands, consts), tangents[1:])
        return run(pred, operands, consts), out_tangents

    return run(pred, tuple(operands), consts)
