"""The epoch-boundary hook under JAX tracing: a loop that runs the boundary work zero times or once.

:func:`adaptlr._boundary.at_boundary` calls :func:`only_when` while ``jax.jit`` (or ``vmap``, ...)
traces ActiveLR's or AutoDrop's step. Only JAX is imported (not optax, which
:mod:`adaptlr.backends.jax` needs).

The work runs in a ``lax.while_loop`` whose body runs while the predicate it carries is true and
clears it: on an ordinary step not at all, and the loop's carry, the operands, keeps its buffers.
``lax.cond`` was the hook until round 22: every output of an XLA conditional is a fresh buffer, so
its identity branch copied the operands every ordinary step, and more with the state donated.
Round 5 measured the loop and kept ``lax.cond`` (the loop was slower with donation); that was before
round 16 ordered the jitted steps' outputs like their donated inputs, and on the jitted steps of
today the loop is the faster of the two, much faster with donation (docs/performance.md, round 22:
ResNet-18 shapes on the CPU, AutoDrop(AdamW) donated 2.85× → 1.12× AdamW, ActiveLR(AdamW) 4.58× →
2.77×).

A ``while_loop`` with a traced trip count has no reverse-mode derivative, so the hook is a
``jax.custom_jvp`` whose tangents are those of the same work under ``lax.cond`` (which has one):
``jax.grad`` through a jitted step works as before. Values that the work reads from its closure
(AutoDrop reads the parameters) become explicit arguments (``jax.closure_convert``), so they are
differentiated too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax

__all__ = ["only_when", "run_deferred"]


def only_when(pred: Any, work: Callable[..., Any], operands: tuple) -> tuple:
    """``work(*operands)`` where the 0-D boolean ``pred`` is true, else ``operands`` unchanged.

    ``work`` must return the structure, shapes and dtypes of ``operands``.
    """
    from adaptlr._boundary import carrying

    operands = tuple(operands)
    with carrying():  # (traced here: the work orders the writes into its carry)
        closed, consts = jax.closure_convert(lambda *ops: tuple(work(*ops)), *operands)
    return _loop_when(closed, pred, tuple(consts), operands)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _loop_when(work: Callable[..., Any], pred: Any, consts: tuple, operands: tuple) -> tuple:
    """``work(*operands, *consts)`` if ``pred``, else ``operands``: a loop run at most once."""

    def body(carry: tuple) -> tuple:
        due, ops = carry
        return jax.numpy.zeros_like(due), tuple(work(*ops, *consts))

    return jax.lax.while_loop(lambda carry: carry[0], body, (jax.numpy.asarray(pred, dtype=bool), operands))[1]


@_loop_when.defjvp
def _loop_when_jvp(work: Callable[..., Any], primals: tuple, tangents: tuple) -> tuple:
    """The tangents of the same selection written with ``lax.cond`` (differentiable both ways)."""
    pred, consts, operands = primals
    _, consts_dot, operands_dot = tangents

    def selected(consts: tuple, operands: tuple) -> tuple:
        return jax.lax.cond(pred, lambda c, o: tuple(work(*o, *c)), lambda c, o: tuple(o), consts, operands)

    return jax.jvp(selected, (consts, operands), (consts_dot, operands_dot))


def run_deferred(recorded: list, new_state: Any, after: list, in_place: bool = True) -> Any:
    """``new_state`` with the boundary work that :func:`adaptlr._boundary.deferring` recorded done,
    each loop ordered after the arrays ``after`` (the step's outputs: the new parameters of
    ``jit_step``, the updates of ``jit_update``).

    The work's operands came back in place of its results; each leaf of ``new_state`` that is one of
    them is replaced by the result. The order comes from a 0-D value made from the first element of
    each array of ``after`` and made part of the loop's predicate (``pred ∧ ¬never``,
    :func:`adaptlr._ordering.never_true`: false for every value, NaN included, not folded by XLA):
    every fusion that computes a new parameter, and so reads the old state, runs before the loop may
    write it, and XLA's copy insertion then
    leaves the donated state in place (``docs/scripts/round22_ab.py order-token``: a dependency on
    updates that the same computation then applies does not order them, XLA duplicates them into
    the parameters' fusions; ``jit_update``'s updates are its outputs).

    ``in_place`` False (the state is not donated): the loop's carry would be a copy of each operand
    anyway, so the work is selected with ``where`` (one read and write of each field, no copy:
    ActiveLR's ``jit`` step 1.94× → 1.4× AdamW, docs/performance.md, round 22).
    """
    if not recorded:
        return new_state
    import jax.numpy as jnp

    from adaptlr._boundary import select_both
    from adaptlr._ordering import first_elements_of, never_true

    never = None
    if in_place:
        firsts = first_elements_of(jax.tree_util.tree_leaves(after))
        never = never_true(jnp, firsts) if firsts else None
    results: dict[int, Any] = {}
    for pred, work, operands in recorded:
        if not in_place:
            outputs = select_both(jnp, pred, work, operands)
        else:
            outputs = only_when(pred if never is None else jnp.logical_and(pred, jnp.logical_not(never)), work,
                                operands)
        results.update(zip(map(id, jax.tree_util.tree_leaves(operands)), jax.tree_util.tree_leaves(outputs)))
    found: set[int] = set()

    def result(x: Any) -> Any:
        new = results.get(id(x))
        if new is None:
            return x
        found.add(id(x))
        return new

    new_state = jax.tree_util.tree_map(result, new_state)
    if len(found) != len(results):  # a step that rebuilt its new state must not defer (fast.jit_step)
        raise RuntimeError("deferred epoch-boundary work: its state arrays are not in the step's new state")
    return new_state
