"""Work that happens only at an epoch boundary, without Python branching on array values.

ActiveLR's γ and ``G_prev``, AutoDrop's snapshot and angle change only at an epoch boundary. Written
with ``where``, every step would read and write every element for them. :func:`at_boundary` runs
the boundary work only when it is due, and the algorithm stays written once:

- eager on the host (NumPy, array-api-strict, torch on the CPU): the step count is a host value,
  so a Python ``if`` on it (not on the parameters or gradients) picks one branch;
- JAX traced (``jax.jit``, ``vmap``, ...): a ``lax.while_loop`` that runs the work zero times or once
  (``adaptlr.backends.jax_boundary.only_when``); eager JAX on the CPU: the Python branch (an eager
  loop would compile its body every step);
- elsewhere (torch or eager JAX on a GPU, where reading the count would wait for the device; code that
  ``torch.compile`` traces; CuPy): both branches, selected with ``where`` (the formulation
  before this hook, at the old cost).

``boundary`` takes the operands and returns the same structure of arrays; on every other step the
operands come back unchanged.

Work whose outputs this step only stores in the new state (``state_only``: ActiveLR's γ, C and
G_prev, which the step reads only as they were) may run later in the traced step. Within
:func:`deferring` (``adaptlr.backends.fast.jit_step`` and ``jit_update`` while they trace), a
JAX-traced ``at_boundary`` with ``state_only`` records the work and returns the operands; the step
runs it once its outputs are made (:func:`adaptlr.backends.jax_boundary.run_deferred`): with the
state donated in the loop, ordered after them, so that XLA writes the state in place instead of
copying what the update still reads; without donation selected with ``where`` (round 22).

In the loop's body each field of the carry is written into its own buffer. Nothing orders a field's
write after the computations that read its old value (ActiveLR's ``G_prev ← C`` while ``γ`` reads
``G_prev``; AutoDrop's ``x_{e-1} ← x_e`` while ``s_e`` reads ``x_{e-1}``), so XLA copies the old
values first: 83 MiB of temporaries for ActiveLR's donated step on ResNet-18 shapes, 104 and 134 MiB
for AutoDrop's (round 26). The work orders them with :func:`carry_after` and
:func:`carry_in_place_of`, which do so only while :func:`carrying` (the loop's body is traced) and
give their values back untouched everywhere else (eager, and the ``where`` formulation, which runs
the work at every step and writes no carry in place: there the ordering would only cost).

A loop's carry that the state is not donated to is a copy of each field it carries (AutoDrop's
snapshot and displacement: 4 words per parameter and step, 1.33× AdamW's ``jit`` step on ResNet-18
shapes, round 26), and the ``where`` formulation reads and writes every field. A jitted step knows
its count on the host, though, where the executor follows it (:func:`adaptlr.backends.fast.jit_step`:
the count it returned, one read of a state made elsewhere): it traces the step once as above,
recording each work's ``due`` rule of the count, and then, for each pattern of answers the rules give
(usually two: an ordinary step and an epoch boundary), a step whose work that is not due is left out
(:func:`known_due`): its fields are the inputs' own arrays, which the executor forwards (round 27).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import optree

from adaptlr import _validation as v
from adaptlr._ordering import first_elements_of, jax_traced, never_true, wait_for

__all__ = ["KnownDue", "at_boundary", "carry_after", "carry_in_place_of", "carrying", "deferring", "is_carrying",
           "known_due", "select_both"]

_DEFERRED: ContextVar[list | None] = ContextVar("adaptlr_deferred_boundaries", default=None)
_CARRYING: ContextVar[bool] = ContextVar("adaptlr_boundary_carrying", default=False)


class KnownDue:
    """The host's answers, for one traced step, to "is this boundary work due?" (:func:`known_due`).

    ``decisions``: one bool per call of :func:`at_boundary` with a ``due`` rule, in the order the step
    makes them (the step's code fixes it); False leaves that work out of the trace (its operands come
    back unchanged), True traces it as usual (it runs where its traced predicate says). None: every
    work traced as usual. Each call's rule is recorded in :attr:`rules`, so that the executor can
    answer for the next step's count without tracing it.
    """

    def __init__(self, decisions: tuple[bool, ...] | None) -> None:
        self.decisions = decisions
        self.rules: list[Callable[[int], bool]] = []

    def may_be_due(self, due: Callable[[int], bool]) -> bool:
        index = len(self.rules)
        self.rules.append(due)
        if self.decisions is None:
            return True
        if index >= len(self.decisions):  # the executor answered for another step's code
            raise RuntimeError(f"a traced step asked about boundary work {index + 1}, answered for "
                               f"{len(self.decisions)}")
        return self.decisions[index]


_KNOWN_DUE: ContextVar[KnownDue | None] = ContextVar("adaptlr_known_due", default=None)


@contextmanager
def known_due(decisions: tuple[bool, ...] | None) -> Iterator[KnownDue]:
    """Within the block, a JAX-traced :func:`at_boundary` with a ``due`` rule takes the host's answer
    from ``decisions`` (:class:`KnownDue`, which it yields): set by
    :func:`adaptlr.backends.fast.jit_step` while it traces a step for a count it knows on the host
    (module docstring)."""
    known = KnownDue(decisions)
    token = _KNOWN_DUE.set(known)
    try:
        yield known
    finally:
        _KNOWN_DUE.reset(token)


@contextmanager
def deferring() -> Iterator[list]:
    """Within the block, JAX-traced boundary work with ``state_only`` is recorded in the list this
    yields, as ``(pred, boundary, operands)``, and not traced (module docstring)."""
    recorded: list = []
    token = _DEFERRED.set(recorded)
    try:
        yield recorded
    finally:
        _DEFERRED.reset(token)


@contextmanager
def carrying() -> Iterator[None]:
    """Within the block, boundary work is traced as the body of the loop whose carry its operands are
    (:func:`adaptlr.backends.jax_boundary.only_when`): :func:`carry_after` and
    :func:`carry_in_place_of` order its writes (module docstring)."""
    token = _CARRYING.set(True)
    try:
        yield
    finally:
        _CARRYING.reset(token)


def is_carrying(arrays: Sequence[Any]) -> bool:
    """Whether boundary work on ``arrays`` is being traced as the body of the loop whose carry its
    operands are (:func:`carrying`). JAX-traced ``arrays`` are asked first: a step that
    ``torch.compile`` traces never reads the context variable, which TorchDynamo cannot trace."""
    return jax_traced(list(arrays)) and _CARRYING.get()


def _waited_for(values: list, after: Sequence[Any], first_elements: bool) -> list:
    """The 0-D values to wait for: the 0-D arrays of ``after``, and with ``first_elements`` the first
    element of the others (not inside ``shard_map``, where an array's first element is one device's:
    a value that varies over the mesh, which the loop's carry must not become)."""
    if not is_carrying(values):
        return []
    return first_elements_of([x for x in after if first_elements or x.ndim == 0])


def carry_after(xp: Any, values: list, after: Sequence[Any], *, first_elements: bool = True) -> list:
    """``values`` (arrays of the carry), made to wait for the arrays ``after`` (0-D ones as they are,
    the others through their first element where ``first_elements``) while :func:`carrying`; else
    ``values``. As :func:`adaptlr._ordering.wait_for`: ``where(never, NaN, value)``, the same numbers."""
    firsts = _waited_for(values, after, first_elements)
    return wait_for(xp, values, firsts) if firsts else values


def carry_in_place_of(xp: Any, old: list, new: list, after: Sequence[Any], *, first_elements: bool = True) -> list:
    """``new`` (arrays), each to be written into ``old``'s array at the same position (a field of the
    carry), made to wait for the arrays ``after`` while :func:`carrying` (as :func:`carry_after`);
    else ``new``. Written ``where(never, old, new)``: the computation reads the buffer it
    overwrites, so XLA writes it there once ``after`` is made; :func:`carry_after`'s form reads
    only ``new``, and XLA then copies ``old`` first (ActiveLR's ``G_prev ← C``: 4.5 × the largest
    tensor, round 26)."""
    firsts = _waited_for(new, after, first_elements)
    if not firsts:
        return new
    never = never_true(xp, firsts)
    return [xp.where(never, o, n) for o, n in zip(old, new, strict=True)]


def at_boundary(xp: Any, pred: Any, boundary: Callable[..., Any], operands: tuple, scalars: Any = None,
                *, state_only: bool = False, due: Callable[[int], bool] | None = None) -> tuple:
    """``boundary(*operands)`` where the 0-D boolean ``pred`` is true, else ``operands`` unchanged.

    ``scalars`` (the step's :class:`adaptlr.core.Scalars`): the host's reading of ``pred`` is made once
    per step, not once per part of a step run over parts (the torch adapter's blocks).
    ``state_only``: the caller only puts the results into its new state (this step reads none of
    them), so the work may run later in a traced step (:func:`deferring`).
    ``due``: ``pred`` as a rule of the step's count ``t`` on the host (``t ↦ bool``, the same answer
    for every ``t``): a JAX-traced step made for a count the executor knows leaves work that is not
    due out of its trace (:func:`known_due`).
    """
    if isinstance(pred, (bool, np.bool_)):  # NumPy gives 0-D results as scalars
        return tuple(boundary(*operands)) if pred else tuple(operands)
    library = v.library_of(pred)
    if library == "jax" and _is_traced(pred):
        known = _KNOWN_DUE.get() if due is not None else None
        if known is not None and not known.may_be_due(due):  # type: ignore[arg-type]  # due is set
            return tuple(operands)
        recorded = _DEFERRED.get()
        if state_only and recorded is not None:
            recorded.append((pred, boundary, tuple(operands)))
            return tuple(operands)
        from adaptlr.backends.jax_boundary import only_when  # pyright: ignore[reportMissingImports]

        return only_when(pred, boundary, operands)
    if scalars is None:
        read = _host_value(pred, library)
    else:
        read = scalars.once(("boundary due", id(pred)), (pred,), lambda p: _host_value(p, library))
    if read is not None:
        return tuple(boundary(*operands)) if read else tuple(operands)
    return select_both(xp, pred, boundary, operands)


def select_both(xp: Any, pred: Any, boundary: Callable[..., Any], operands: tuple, scalars: Any = None,
                *, state_only: bool = False, due: Callable[[int], bool] | None = None) -> tuple:
    """The boundary work at every step, selected elementwise with ``xp.where(pred, ...)`` (``scalars``,
    ``state_only``, ``due``: unused; :func:`at_boundary`'s signature, so that tests can put one in the
    other's place)."""
    done: Any = tuple(boundary(*operands))  # optree's PyTree type does not take a tuple of Any
    unchanged: Any = tuple(operands)
    return tuple(optree.tree_map(lambda a, b: xp.where(pred, a, b), done, unchanged, none_is_leaf=False))


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
