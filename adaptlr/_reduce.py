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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Reducer", "Term", "add_all", "leaf_split_axes", "reduced_dims", "term_value"]

Completer = Callable[[Any, tuple], Any]


def add_all(xp: Any, parts: Sequence[Any]) -> Any:
    """``parts[0] + parts[1] + …`` (0-D arrays, promoted as ``xp.stack`` promotes), in one scan.

    One ``cumulative_sum`` of the stacked parts, not a chain of ``+``. NumPy and torch on the CPU
    add left to right (the chain's numbers exactly); JAX's scan adds in a tree
    (``jax.lax.associative_scan``), which rounds differently in the last bits. Under ``jax.jit``,
    XLA fuses a chain of cheap 0-D operations into every elementwise loop that reads its result, so
    a sum over ``n`` leaves that every leaf reads (``Σ|s|`` deciding whether Prodigy's ``d`` moves)
    was copied into each of the ``n`` leaves' loops: ``n²`` instructions, and a Prodigy step over
    500 leaves took 5 minutes and 7.5 GB to compile. A scan is not fused into its readers, so the
    sum is made once. Eager backends dispatch three operations instead of ``n - 1``.
    """
    if len(parts) == 1:
        return parts[0]
    return xp.cumulative_sum(xp.stack(list(parts)))[-1]


class Term:
    """A leaf's term of a sum (``g ⊙ d``), made when a sum first reads it (:meth:`Reducer.leaf_sum`),
    then kept: a part's second pass, given the whole sums, does not make it
    (:mod:`adaptlr.backends.part_sums`), as generators of ``total``'s terms are not evaluated there.
    ``ndim``: the term's number of dimensions, known without making it."""

    __slots__ = ("_make", "_value", "ndim")

    def __init__(self, make: Callable[[], Any], ndim: int) -> None:
        self._make: Callable[[], Any] | None = make
        self._value: Any = None
        self.ndim = ndim

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
        x = term_value(x)
        total = self.xp.sum(x, axis=axis, keepdims=keepdims, dtype=dtype)
        if self.complete is None:
            return total
        names = self._axes_of(i, x.ndim, axis)
        return self.complete(total, names) if names else total

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
