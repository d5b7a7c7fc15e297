"""Sums over parameter elements, completed across the devices that hold the other shards.

Every reduction an algorithm makes over parameters (AutoDrop's angle, HD's and EG's inner products,
DSA's slice sums) goes through :class:`Reducer`. Without sharding it is ``xp.sum``. Inside
``jax.shard_map``, where each device holds one block of a parameter, a local sum covers one block:
``Optimizer.update(..., axis_name=...)`` then completes it with the backend's collective (``psum``
for JAX, :func:`adaptlr.backends.jax.complete_sum`) over the mesh axes along which the reduced
dimensions are split.

Which dimensions are split across which axes comes from ``axis_name``:

- a mesh axis name or a tuple of names: every parameter of ``ndim ≥ 1`` is split along its
  leading dimension across those axes (``PartitionSpec("d")`` on every parameter: FSDP's layout);
  0-D parameters are replicated;
- a tree shaped like the params of partition specs (``jax.sharding.PartitionSpec`` or any tuple
  with one entry per dimension: an axis name, a tuple of names, or None), as given to
  ``shard_map``'s ``in_specs``; ``None`` for a replicated parameter.

The torch counterpart (a ``process_group`` for locally sharded parameters without DTensor, as in
ZeRO-style optimizers) is a completer that calls ``torch.distributed.all_reduce``; it is not
implemented yet.

**Terms that several sums read, made one after another under JAX tracing** (:func:`chained_sums`).
XLA:CPU fuses an elementwise term into the reduction that reads it, but a term that two reductions
read (DSA's ``G ⊙ P``, ``G ⊙ G`` and ``P ⊙ P``, each summed over rows and over columns) becomes an
array as large as its leaf, and XLA's scheduler makes the terms of every leaf before it reduces
any: their buffers are live together (DSA(AdamW) on ResNet-18 shapes, donated: 89 MiB of
temporaries, twice the model, and 4–6× AdamW's step). Within :func:`chained_sums`
(``Optimizer.update_leaves`` while JAX traces it; a boundary's work in its own chain), such a
:class:`Term` (``reads > 1``) waits for the sums of the one before it (``where(s > ∞, NaN, term)``,
:func:`adaptlr._ordering.wait_for`, fused into the term's own loop: no pass more), so one is live
at a time and the next reuses its buffer (9 MiB, 1.9× AdamW: docs/performance.md, round 23). Not
the terms one sum reads: the select would keep XLA from fusing them into their reduction
(measured: D-Adaptation and DoG slower). Eager backends sum in program order already.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from adaptlr._ordering import first_elements_of, jax_traced, wait_for
from adaptlr._scan import add_all

__all__ = ["Reducer", "Term", "add_all", "chained_sums", "in_own_chain", "leaf_split_axes", "reduced_dims",
           "term_value"]

# the smallest term that is chained: smaller ones are cheap to keep live together, and chaining
# the 1,500 terms of DSA on 500 tensors of 2,048 elements made its step compile 50 % longer (round 23)
CHAINED_ELEMENTS = 1 << 16
# the sums made since the last chained term, within chained_sums (None outside)
_CHAIN: ContextVar[list | None] = ContextVar("adaptlr_sum_chain", default=None)


@contextmanager
def chained_sums() -> Iterator[None]:
    """Within the block, each :class:`Term` that several sums read (of at least
    :data:`CHAINED_ELEMENTS` elements) waits for the sums of the one before it, where JAX traces
    them (module docstring); a block within the block starts its own chain and gives the outer one
    back at its end."""
    token = _CHAIN.set([])
    try:
        yield
    finally:
        _CHAIN.reset(token)


def in_own_chain(work: Callable[..., Any]) -> Callable[..., Any]:
    """``work`` run in a chain of its own (:func:`chained_sums`): for work traced inside another
    trace (an epoch boundary's loop body), whose sums must not be waited for outside it, nor wait
    for sums outside it."""

    def run(*args: Any) -> Any:
        with chained_sums():
            return work(*args)

    return run


def _after_chain(xp: Any, term: Any) -> Any:
    """``term`` (the array of a :class:`Term` several sums read, just made) made to wait for the
    sums of the chain, which it then starts again; ``term`` itself outside a chain, where nothing
    is traced, below :data:`CHAINED_ELEMENTS`, or for a term that is not floating (no NaN to
    select)."""
    chain = _CHAIN.get()
    if not chain or math.prod(term.shape) < CHAINED_ELEMENTS:
        return term
    sums = first_elements_of(chain)
    chain.clear()
    if not xp.isdtype(term.dtype, "real floating"):
        return term
    return wait_for(xp, [term], sums)[0]


def _chained(total: Any) -> Any:
    """``total``, a sum of such a term just made, added to the chain (where there is one)."""
    chain = _CHAIN.get()
    if chain is not None:
        chain.append(total)
    return total


Completer = Callable[[Any, tuple], Any]


class Term:
    """A leaf's term of a sum (``g ⊙ d``), made when a sum first reads it (:meth:`Reducer.leaf_sum`),
    then kept: a part's second pass, given the whole sums, does not make it
    (:mod:`adaptlr.backends.part_sums`), as generators of ``total``'s terms are not evaluated there.
    ``ndim``: the term's number of dimensions, known without making it. ``reads``: how many sums
    read it (DSA's products: over rows and over columns); a term more than one sum reads is made
    after the sums of the one before it (:func:`chained_sums`)."""

    __slots__ = ("_make", "_value", "ndim", "reads")

    def __init__(self, make: Callable[[], Any], ndim: int, reads: int = 1) -> None:
        self._make: Callable[[], Any] | None = make
        self._value: Any = None
        self.ndim = ndim
        self.reads = reads

    def value(self) -> Any:
        """The term's array (made on the first call)."""
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value


def term_value(x: Any) -> Any:
    """``x``'s array: a :class:`Term` made, anything else as it is."""
    return x.value() if isinstance(x, Term) else x


def _names(entry: Any) -> tuple:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def leaf_split_axes(axis_name: Any, ndims: Sequence[int], specs: Sequence[Any] | None) -> list[tuple]:
    """Per leaf, per dimension, the mesh axes it is split across (see the module docstring)."""
    if specs is None:
        names = _names(axis_name)
        return [((names,) + ((),) * (n - 1)) if n else () for n in ndims]
    out = []
    for n, spec in zip(ndims, specs, strict=True):
        entries = [] if spec is None else [_names(e) for e in spec]
        if len(entries) > n:
            raise ValueError(f"a partition spec has {len(entries)} entries for a parameter with {n} dimensions")
        out.append(tuple(entries) + ((),) * (n - len(entries)))
    return out


def reduced_dims(ndim: int, axis: Any) -> tuple[int, ...]:
    """The dimensions (0 <= d < ndim) a sum over ``axis`` (None, an int or a tuple) reduces."""
    if axis is None:
        return tuple(range(ndim))
    return tuple(d % ndim for d in ((axis,) if isinstance(axis, int) else axis))


class Reducer:
    """``xp.sum`` over parameter elements, completed across shards where ``complete`` is set."""

    __slots__ = ("complete", "split_axes", "xp")

    def __init__(self, xp: Any, complete: Completer | None = None, split_axes: list[tuple] | None = None) -> None:
        self.xp = xp
        self.complete = complete
        self.split_axes = split_axes

    def _axes_of(self, i: int, ndim: int, axis: Any) -> tuple:
        assert self.split_axes is not None  # only asked for where there is a completer
        names: list = []
        for d in reduced_dims(ndim, axis):
            names.extend(n for n in self.split_axes[i][d] if n not in names)
        return tuple(names)

    def leaf_sum(self, i: int, x: Any, axis: Any = None, *, keepdims: bool = False, dtype: Any = None) -> Any:
        """``Σ`` of leaf ``i``'s array ``x`` (or :class:`Term`) over ``axis`` (all by default), over every shard."""
        chained = False
        if isinstance(x, Term):
            term, made_here = x, x._make is not None
            x = term.value()
            # (JAX traces only: torch.compile does not trace a ContextVar, and orders the step itself)
            chained = term.reads > 1 and jax_traced([x])
            if chained and made_here:  # made now: after the sums of the chain, and kept so
                x = term._value = _after_chain(self.xp, x)
        total = self.xp.sum(x, axis=axis, keepdims=keepdims, dtype=dtype)
        if self.complete is not None:
            names = self._axes_of(i, x.ndim, axis)
            total = self.complete(total, names) if names else total
        return _chained(total) if chained else total

    def total(self, terms: Iterable[Any], dtype: Any = None) -> Any:
        """``Σ`` over every element of every leaf's term (``terms[i]`` shaped like leaf ``i``).

        Local sums of the leaves split across the same axes are added first, so there is one
        collective per distinct set of axes, not one per leaf.
        """
        groups: dict[tuple, list] = {}
        for i, term in enumerate(terms):
            names = () if self.complete is None else self._axes_of(i, term.ndim, None)
            groups.setdefault(names, []).append(self.xp.sum(term, dtype=dtype))
        totals = []
        for names, parts in groups.items():
            part = add_all(self.xp, parts)
            totals.append(self.complete(part, names) if names and self.complete else part)
        return add_all(self.xp, totals)
