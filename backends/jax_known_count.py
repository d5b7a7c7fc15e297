"""A jitted step's count, followed on the host, and the epoch-boundary answers it gives (round 27).

Under ``jax.jit`` the step count is traced, so ActiveLR's and AutoDrop's epoch-boundary work is a loop
run zero times or once (:mod:`adaptlr.backends.jax_boundary`), or, for work that only writes state,
selected with ``where`` where the state is not donated. Without donation both cost every step: the
loop's carry is a copy of each field it carries (AutoDrop's snapshot and displacement, 4 words per
parameter), the ``where`` reads and writes every field (ActiveLR's γ, C and G_prev).

The executor (:func:`adaptlr.backends.fast.jit_step`, ``jit_update``) knows the count on the host,
though: the count array it returned last, and its value; a state made elsewhere (``init``, a restored
checkpoint) is read once (one host read, of an array that is usually ready). :class:`KnownCount`
records, at the step's first trace, each boundary's ``due`` rule of the count
(:func:`adaptlr._boundary.known_due`), and answers them for each later step: the answers are a static
argument of the jitted step, so there is one executable per pattern of answers (usually two: an
ordinary step, whose boundary work is left out and whose fields are the inputs' own arrays, which
the executor then forwards without a copy; and an epoch boundary, traced as before). A step given a
count it cannot read (traced inside another function) runs the first trace, which decides on the
device as before, and so does every step of an optimizer whose steps may leave the count unchanged
(``adaptlr.skip_nonfinite``'s skipped steps: ``Optimizer.counts_every_step``).
"""

from __future__ import annotations

from typing import Any

from adaptlr._precision import INT32_MAX

__all__ = ["KnownCount"]


class KnownCount:
    """The host's side of a jitted step's count (module docstring)."""

    def __init__(self, follows: bool = True) -> None:
        # the boundary rules of the step, in its order (None: not traced yet; [] none, or a count the
        # host cannot follow: an optimizer whose steps may leave it unchanged, Optimizer.counts_every_step)
        self.rules: list | None = None if follows else []
        self._returned: Any = None  # the count array the step returned last (kept: identity is sameness)
        self._value: int | None = None  # its value

    def answers(self, count: Any) -> tuple[tuple[bool, ...] | None, int | None]:
        """``(answers, t)`` for the step given ``count``: one bool per rule (None: trace every
        boundary as usual, where every answer is True, there is no rule, or the count is unknown), and
        the step's count ``t`` where it is known."""
        if self.rules == []:  # nothing to answer: never read the count
            return None, None
        t = self._step(count)
        if t is None or self.rules is None:
            return None, t
        answers = tuple(bool(rule(t)) for rule in self.rules)
        return (None if all(answers) else answers), t

    def traced(self, rules: list, answers: tuple[bool, ...] | None) -> None:
        """Record the rules a trace asked about (the first trace's; a later one must ask the same)."""
        if answers is not None and len(rules) != len(answers):
            raise RuntimeError(f"a traced step asked about {len(rules)} boundaries, answered for {len(answers)}")
        if self.rules is None:
            self.rules = list(rules)

    def returning(self, count: Any, t: int | None) -> None:
        """The step returned ``count``, whose value is ``t`` where known."""
        self._returned, self._value = (count, t) if t is not None else (None, None)

    def _step(self, count: Any) -> int | None:
        """The count of the step given ``count`` (``count + 1``, an int32 count saturating as
        :func:`adaptlr._precision.next_count`), or None where it cannot be read on the host."""
        if count is self._returned and self._value is not None:
            value = self._value
        else:
            import jax
            from jax.core import Tracer

            if (not isinstance(count, jax.Array) or isinstance(count, Tracer) or count.ndim
                    or not count.is_fully_addressable):
                return None
            value = int(count)  # one read of a state made elsewhere (module docstring)
        if str(getattr(count, "dtype", "")) == "int32":
            return min(value + 1, INT32_MAX)
        return value + 1
