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

**Terms that several sums read, made again for each sum under JAX tracing** (:class:`Term`).
XLA:CPU fuses an elementwise term into the reduction that reads it, but a term that two reductions
read (DSA's ``G ⊙ P``, ``G ⊙ G`` and ``P ⊙ P``, each summed over rows and over columns) became an
array as large as its leaf, written by a lone elementwise loop and read back by each reduction: 7
words per parameter to make DSA's three products and 6 to read them, where reading ``G`` and ``P``
in each reduction is at most 8 (6 on ResNet-18's shapes, where XLA fuses the three column sums
into one loop), and XLA's scheduler made the terms of every leaf before it reduced any:
89 MiB of temporaries on ResNet-18 shapes until round 23 made them wait for each other, 9 MiB
since. So under JAX tracing a :class:`Term` of at least :data:`READ_AGAIN_ELEMENTS` elements is
not kept: the first sum makes it from its inputs, each later one from the inputs passed through
``jax.lax.optimization_barrier`` (:func:`adaptlr.backends.jax_reads.read_again`), which XLA cannot
see through, so it does not merge the products into one (common subexpressions) and fuses each into
its own reduction: no temporaries, the same numbers (docs/performance.md, round 28: DSA(AdamW)
×AdamW 2.2 → 1.8 jitted, 1.9 → 1.6 donated). Eager backends keep the term made by the first sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from adaptlr._ordering import jax_traced
from adaptlr._scan import add_all

__all__ = ["READ_AGAIN_ELEMENTS", "Reducer", "Term", "add_all", "leaf_split_axes", "reduced_dims", "term_value"]

# the smallest term made again for each sum under JAX tracing: smaller ones are made once (fewer
# instructions to compile: DSA on 500 tensors of 2,048 elements has 1,500 such terms)
READ_AGAIN_ELEMENTS = 1 << 16


Completer = Callable[[Any, tuple], Any]


class Term:
    """A leaf's term of a sum, ``make(*inputs)`` (``g ⊙ d``: ``Term(operator.mul, (g, d), g.ndim)``),
    made when a sum first reads it (:meth:`Reducer.leaf_sum`), then kept: a part's second pass,
    given the whole sums, does not make it (:mod:`adaptlr.backends.part_sums`), as generators of
    ``total``'s terms are not evaluated there. ``ndim``: the term's number of dimensions, known
    without making it. ``reads``: how many sums read it (DSA's products: over rows and over
    columns); under JAX tracing such a term is made again for each sum (module docstring)."""

    __slots__ = ("_inputs", "_make", "_reads_made", "_value", "ndim", "reads")

    def __init__(self, make: Callable[..., Any], inputs: Sequence[Any], ndim: int, reads: int = 1) -> None:
        self._make: Callable[..., Any] | None = make
        self._inputs: tuple | None = tuple(inputs)
        self._value: Any = None
        self._reads_made = 0
        self.ndim = ndim
        self.reads = reads

    def value(self) -> Any:
        """The term's array (made on the first call)."""
        if self._make is not None:
            self._value = self._make(*self._inputs)  # type: ignore[misc]  # set with _make
            self._make = self._inputs = None
        return self._value

    def made_for_one_sum(self) -> Any:
        """The term made for one of the several sums that read it under JAX tracing, or None (an
        eager backend, a term below :data:`READ_AGAIN_ELEMENTS` or already kept: :meth:`value`).
        The first from the inputs themselves, each later one from the inputs passed through
        ``jax.lax.optimization_barrier`` (module docstring)."""
        inputs = self._inputs
        if self.reads < 2 or self._make is None or inputs is None or not jax_traced(list(inputs)):
            return None
        if max(math.prod(x.shape) for x in inputs) < READ_AGAIN_ELEMENTS:
            return None
        if self._reads_made:
            from adaptlr.backends.jax_reads import read_again  # pyright: ignore[reportMissingImports]

            inputs = read_again(inputs)
        self._reads_made += 1
        return self._make(*inputs)


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
        if isinstance(x, Term):
            made = x.made_for_one_sum()
            x = x.value() if made is None else made
        total = self.xp.sum(x, axis=axis, keepdims=keepdims, dtype=dtype)
        if self.complete is not None:
            names = self._axes_of(i, x.ndim, axis)
            total = self.complete(total, names) if names else total
        return total

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
