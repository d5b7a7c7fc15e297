"""The sums of a step run over parts of the elements: refused, recorded, or replayed whole.

An execution path that runs one step over parts of the model one after the other (the torch
adapter's foreach chunks, :mod:`adaptlr.backends.foreach_chunks`; the blocks of
:class:`~adaptlr.backends.fast.FlatOptimizer`) writes each part before computing the next, so its
temporaries are one part's. That is the same step only where a part needs nothing from the others.
An algorithm's sums over elements (AutoDrop's angle, HD's and EG's inner products, the
learning-rate-free bases' dot products and norms) all go through ``ctx.reduce.total``
(:class:`adaptlr._reduce.Reducer`); these reducers take its place for a part's update:

- :class:`NoSums` raises :class:`SumsRequested` at the first sum: a step that makes none (AutoDrop
  between epoch boundaries, where the boundary is a host value) runs in one pass; the first part
  raises before anything is written, and the path takes two passes instead;
- :class:`Recorder` (first pass) keeps each part's partial sums and the part writes nothing; from
  the second part on, it stops the part at its last sum (:class:`PartSummed`);
- :class:`Replayer` (second pass) answers the ``k``-th sum with the whole model's ``k``-th sum,
  :func:`whole_sums` of the partials, and the part writes (a row block's sums within its rows: the
  ones its first pass made).

:func:`run_parts` runs a step over its parts in one of these ways; the paths supply how one part runs.
With ``rows=True`` the parts are blocks of rows of one tensor (:mod:`adaptlr.backends.torch_rows`):
per-leaf sums then have whole-tensor values too, those over dimensions that include the first.

Two passes give the step of the whole model where no sum's terms depend on another sum of the same
step (:func:`adaptlr.backends.fast.sums_replayable`); they repeat the step's arithmetic up to its
last sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from adaptlr._reduce import Reducer, reduced_dims, term_value

__all__ = ["NoSums", "PartSummed", "Recorder", "Replayer", "RowGroupRecorder", "SumsRequested", "run_parts",
           "whole_sums"]


class SumsRequested(Exception):
    """A part's step asked :class:`NoSums` for a sum over elements."""


class _PartSums(Reducer):
    """A reducer of one part's step.

    Parts of a flat buffer or of the model's lists (``rows=False``): only ``total`` sums have a
    whole-model value. Row blocks of one tensor (``rows=True``, :mod:`adaptlr.backends.torch_rows`):
    the rows are shards of the leading dimension, so a leaf sum over dimensions that include the
    first one, and every ``total``, is completed across the blocks (:meth:`_across`); a sum over the
    other dimensions only (DSA's row sums) is the block's own.
    """

    __slots__ = ("rows",)

    def __init__(self, xp: Any, rows: bool = False) -> None:
        super().__init__(xp)
        self.rows = rows

    def total(self, terms: Iterable[Any], dtype: Any = None) -> Any:
        # the terms are evaluated only where the part's share is (generators: a second pass skips them)
        return self._across(lambda: Reducer.total(self, terms, dtype))

    def leaf_sum(self, i: int, x: Any, axis: Any = None, *, keepdims: bool = False, dtype: Any = None) -> Any:
        if not self.rows:
            raise RuntimeError("a per-leaf sum has no whole-model value to replay; this algorithm cannot run in "
                               "parts")

        def part() -> Any:
            return self.xp.sum(term_value(x), axis=axis, keepdims=keepdims, dtype=dtype)

        return self._across(part) if 0 in reduced_dims(x.ndim, axis) else self._own(part)

    def _across(self, part: Callable[[], Any]) -> Any:
        """What the step is to use for a sum over every part, of which ``part()`` is this part's share
        (a replayed sum does not compute it)."""
        raise NotImplementedError

    def _own(self, part: Callable[[], Any]) -> Any:
        """A row block's sum within its rows (DSA's row sums), complete in the block: ``part()``."""
        return part()


class NoSums(_PartSums):
    """A part's step that may make no sum over elements: the first one raises :class:`SumsRequested`."""

    __slots__ = ()

    def replayed(self, results: list) -> None:
        """A replay of another part's step, which made no sum (:mod:`adaptlr.backends.block_tape`)."""

    def _across(self, part: Callable[[], Any]) -> Any:
        raise SumsRequested("this step sums over elements")


class PartSummed(Exception):
    """A :class:`Recorder` has the part's last partial sum: the rest of its first pass is not needed."""


class Recorder(_PartSums):
    """The first pass over a part: each sum is this part's partial sum, kept in ``partials``.

    ``sums``: how many sums the step makes (known once the first part has run to its end); the
    ``sums``-th one raises :class:`PartSummed` instead of returning, so the part's first pass
    stops there (what follows its last sum is computed in the second pass only). None: run to
    the end.
    """

    __slots__ = ("own", "partials", "sums")

    def __init__(self, xp: Any, sums: int | None = None, rows: bool = False) -> None:
        super().__init__(xp, rows)
        self.partials: list = []
        self.own: list = []  # a row block's sums within its rows, complete here: its second pass reads them
        self.sums = sums

    def replayed(self, results: list) -> None:
        """The part's step was a replay of another part's (:mod:`adaptlr.backends.block_tape`):
        ``results`` are its partial sums."""
        self.partials.extend(results)

    def _across(self, part: Callable[[], Any]) -> Any:
        value = part()
        self.partials.append(value)
        if len(self.partials) == self.sums:
            raise PartSummed
        return value

    def _own(self, part: Callable[[], Any]) -> Any:
        value = part()
        self.own.append(value)
        return value


class RowGroupRecorder(Recorder):
    """The first pass over a group of row blocks of one tensor in one step, each block a leaf
    (``run_parts``'s ``first_pass_groups`` with ``rows=True``): each sum is kept with the leaf that
    made it, so :meth:`split` gives each block the :class:`Recorder` it would have had alone (its
    partial sums, and its own row sums for its second pass). A sum over several leaves (``total``)
    has no block of its own: the algorithm cannot run its first pass in groups of row blocks."""

    __slots__ = ("_leaf", "leaf_of_own", "leaf_of_partial")

    def __init__(self, xp: Any, sums: int | None = None) -> None:
        super().__init__(xp, sums, rows=True)
        self._leaf = 0
        self.leaf_of_partial: list[int] = []
        self.leaf_of_own: list[int] = []

    def leaf_sum(self, i: int, x: Any, axis: Any = None, *, keepdims: bool = False, dtype: Any = None) -> Any:
        self._leaf = i
        return super().leaf_sum(i, x, axis, keepdims=keepdims, dtype=dtype)

    def total(self, terms: Iterable[Any], dtype: Any = None) -> Any:
        raise RuntimeError("a sum over every leaf in a first pass over a group of row blocks (which are its "
                           "leaves); this algorithm's sums must stay within tensors")

    def _across(self, part: Callable[[], Any]) -> Any:
        made = len(self.partials)
        try:
            return super()._across(part)
        finally:  # (also where the last sum raises PartSummed)
            self.leaf_of_partial.extend([self._leaf] * (len(self.partials) - made))

    def _own(self, part: Callable[[], Any]) -> Any:
        made = len(self.own)
        try:
            return super()._own(part)
        finally:
            self.leaf_of_own.extend([self._leaf] * (len(self.own) - made))

    def split(self, leaves: int) -> list[Recorder]:
        """One :class:`Recorder` per leaf (block), in order, with its sums."""
        out = [Recorder(self.xp, None, rows=True) for _ in range(leaves)]
        for leaf, value in zip(self.leaf_of_partial, self.partials, strict=True):
            out[leaf].partials.append(value)
        for leaf, value in zip(self.leaf_of_own, self.own, strict=True):
            out[leaf].own.append(value)
        return out


class Replayer(_PartSums):
    """The second pass over a part: the ``k``-th sum is the whole model's ``k``-th sum (this part's
    share is not computed again); :meth:`check_all_used` after the part's step."""

    __slots__ = ("own", "own_used", "sums", "used")

    def __init__(self, xp: Any, sums: list, rows: bool = False, own: Sequence[Any] = ()) -> None:
        super().__init__(xp, rows)
        self.sums = sums
        self.used = 0
        # a row block's own sums from its first pass (the same operations on the same rows: the
        # same numbers), read in order; a sum after the first pass's last is computed
        self.own = own
        self.own_used = 0

    def _across(self, part: Callable[[], Any]) -> Any:
        if self.used >= len(self.sums):
            raise RuntimeError("a part's second pass asked for more sums than its first pass made")
        self.used += 1
        return self.sums[self.used - 1]

    def _own(self, part: Callable[[], Any]) -> Any:
        if self.own_used < len(self.own):
            self.own_used += 1
            return self.own[self.own_used - 1]
        return part()

    def replayed(self, results: list) -> None:
        """The part's step was a replay of another part's (:mod:`adaptlr.backends.block_tape`), which
        used every sum: so does this one."""
        self.used = len(self.sums)
        self.own_used = len(self.own)

    def check_all_used(self) -> None:
        if self.used != len(self.sums) or self.own_used != len(self.own):
            raise RuntimeError("a part's second pass made fewer sums than its first; this algorithm cannot run in "
                               "parts")


def whole_sums(partials: list[list]) -> list:
    """The whole model's sums from each part's partial sums (one list per part, in call order)."""
    if any(len(p) != len(partials[0]) for p in partials):
        raise RuntimeError("the parts of one step made different numbers of sums; this algorithm cannot run in "
                           "parts")
    sums = list(partials[0])
    for part in partials[1:]:
        sums = [a + b for a, b in zip(sums, part)]
    return sums


def run_parts(xp: Any, parts: Sequence[Any], run_part: Callable[[Any, Reducer | None, bool, bool], None],
              sums: str, rows: bool = False,
              first_pass_groups: tuple[int, Callable[[list, Reducer], None]] | None = None,
              sums_made: int | None = None) -> int | None:
    """One step over ``parts``, each part written before the next is computed.

    Args:
        xp: the array namespace of the parts' arrays (the reducers' sums).
        parts: the parts, in order.
        run_part: ``run_part(part, reducer, write, donate)`` runs the step on ``part`` with ``reducer``
            as its ``ctx.reduce`` (None: plain sums) and writes its results where ``write`` is true.
            ``donate``: the part's step may write into the part's own state
            (:func:`adaptlr._inplace.donating`): true in a writing pass once an earlier part of it has
            completed, so that no part that may still be abandoned (``"try"``'s first part, or a
            path's fallback when the first part meets an operation it lacks) and run again has
            changed its state.
        sums: ``"none"`` (the step makes no sum over elements: one pass); ``"replay"`` (two passes:
            :class:`Recorder`, then :class:`Replayer` with the :func:`whole_sums`); ``"try"`` (one pass
            with :class:`NoSums`; a step that sums makes its first part ask before anything is
            written, and then takes the two passes).
        rows: the parts are row blocks of one tensor (leaf sums over the first dimension are
            completed across them; see :class:`_PartSums`).
        first_pass_groups: ``(size, run_group)``: the first pass, after its first part, runs
            ``run_group(group, recorder)`` on groups of up to ``size`` consecutive parts, one step
            over all of them (a step whose sums come before anything else it computes, so a group
            holds only its sums' temporaries: :func:`adaptlr.backends.fast.sums_before_direction`).
            The first part runs alone: it runs to the step's end, to count the sums (unless
            ``sums_made``). With ``rows``, each part of a group is a leaf of its step and the
            recorder a :class:`RowGroupRecorder`.
        sums_made: how many sums the step makes, where the caller counted them in an earlier step
            of the same optimizer on parts of the same shapes (the count is fixed by the step's
            code: no branching on array values; :func:`run_parts` returns it): the first part's
            first pass then stops at its last sum too, as the others do, instead of running to the
            step's end. A count too small is found in the second pass (a part asks for a sum the
            first pass did not make: ``RuntimeError``), before that part has written anything.

    Returns:
        How many sums the step made (two passes), else None.
    """
    if sums not in ("none", "replay", "try"):
        raise ValueError(f"sums must be 'none', 'replay' or 'try', got {sums!r}")
    if sums == "none" or not parts:
        for k, part in enumerate(parts):
            run_part(part, None, True, k > 0)
        return None
    if sums == "try":
        try:
            for k, part in enumerate(parts):
                try:
                    run_part(part, NoSums(xp, rows), True, k > 0)
                except SumsRequested as error:
                    if k:  # every part runs the same operations: the first one asks
                        raise RuntimeError("a part asked for a sum after earlier parts were written") from error
                    raise
            return None
        except SumsRequested:
            pass
    recorders: list[Recorder] = []

    def record(run: Callable[[Recorder], None]) -> None:
        # Every part makes the sums the first one made (the same operations): from the second part
        # on, the pass stops at the last of them.
        recorder = Recorder(xp, len(recorders[0].partials) if recorders else sums_made, rows)
        try:
            run(recorder)
        except PartSummed:
            pass
        recorders.append(recorder)

    # first pass: each part's partial sums, nothing written
    record(lambda recorder: run_part(parts[0], recorder, False, False))
    if first_pass_groups is not None and recorders[0].partials:
        size, run_group = first_pass_groups
        per_part = len(recorders[0].partials)
        for k in range(1, len(parts), size):
            group = list(parts[k:k + size])
            if not rows:
                record(lambda recorder, group=group: run_group(group, recorder))
                continue
            # row blocks: each block's sums are its own (its row sums), so the group's are split
            recorder = RowGroupRecorder(xp, per_part * len(group))
            try:
                run_group(group, recorder)
            except PartSummed:
                pass
            recorders.extend(recorder.split(len(group)))
    else:
        for part in parts[1:]:
            record(lambda recorder, part=part: run_part(part, recorder, False, False))
    sums_of_model = whole_sums([r.partials for r in recorders])
    for k, part in enumerate(parts):
        # (a row block's own sums: one recorder per part where the first pass ran block by block)
        own = recorders[k].own if rows and len(recorders) == len(parts) else ()
        replayer = Replayer(xp, sums_of_model, rows, own)
        run_part(part, replayer, True, k > 0)
        replayer.check_all_used()
    return len(sums_of_model)
