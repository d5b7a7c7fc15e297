"""The new state computed after the sums that read the old one, where a compiler could reorder them.

Under ``jax.jit`` with the state donated, each new state buffer is written into its old one. HD's
``H = Σ g ⊙ d_{t-1}`` and EG's ``⟨v_{t-1}, g⟩`` (in :meth:`adaptlr.core.Adaptation.before_direction`)
and D-Adaptation's ``⟨g, s_{t-1}⟩`` read state that the same step overwrites; the new state does not
depend on those sums, so nothing orders the read before the write, and XLA's copy insertion copies
each such buffer (round 16: HD 2.00, EG 3.00, D-Adapt Adam 2.00, D-Adapt SGD 1.00 f32 copies per
parameter and step on ResNet-18 shapes). ``jax.lax.optimization_barrier`` does not help on the CPU:
XLA:CPU expands barriers before copy insertion. Here the gradients that make the new state depend on
those 0-D values through ``g' = where(s > ∞, NaN, g)``, which is ``g`` for every ``s`` (NaN
included) and which XLA cannot fold, so the sums run first and the state is updated in place (HD
and D-Adaptation no copy left, EG one; docs/performance.md, round 17):

- :func:`ordered_after` (the core, between the adaptations' ``before_direction`` and the base): on
  the 0-D values the adaptations computed, and on the first element of the other arrays they
  computed (an elementwise HD rate: 2.00 f32 copies per parameter before round 23, none after);
- :func:`wait_for` (a base's own step, D-Adaptation): on the sums it names;
- :func:`after_first_element` (EG's step): on a new state array that read an old one, through its
  first element: EG's gains read the old gradient average, which its new average overwrites (round
  23: XLA copied the old average first, 1.00 f32 copy per parameter, 4.95 × the largest tensor of
  temporaries on ResNet-18 shapes; none after).
- :func:`adaptlr._boundary.carry_after` and :func:`adaptlr._boundary.carry_in_place_of` (the
  epoch-boundary work of ActiveLR and AutoDrop, traced as the body of the loop whose carry is their
  state): each field written after what reads its old value (round 26).

Only under JAX tracing; everything else runs the step in program order already, and the values
come back as they are (no extra pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optree

from adaptlr import _validation as v
from adaptlr._scan import add_all

__all__ = ["after_first_element", "as_loop_fusion", "first_elements_of", "jax_traced", "never_true", "ordered_after",
           "wait_for"]


def ordered_after(xp: Any, values: list, before: Any, after: Any, *, first_elements: bool = True) -> list:
    """``values`` (arrays), made to depend on the arrays of ``after`` that are not arrays of
    ``before`` (what the adaptations computed from it: their 0-D values, and with
    ``first_elements`` the first element of the others, as HD's rate per element) when JAX traces
    the step; else ``values``. Not ``first_elements`` inside ``shard_map``, where an array's first
    element is one device's (the 0-D values there are whole-model sums, the same on every device)."""
    if not jax_traced(values):
        return values
    old = set(map(id, optree.tree_leaves(before, none_is_leaf=False)))
    new = [x for x in optree.tree_leaves(after, none_is_leaf=False)
           if id(x) not in old and hasattr(x, "shape") and (first_elements or x.ndim == 0)]
    return wait_for(xp, values, first_elements_of(new))


def wait_for(xp: Any, values: list, sums: Sequence[Any]) -> list:
    """``values`` (arrays), made to depend on the 0-D ``sums`` when JAX traces the step; else ``values``.

    A base that reads its old state in sums and then writes the new state (D-Adaptation) passes
    its gradients through this between the two."""
    if not sums or not jax_traced(values):
        return values
    never = never_true(xp, sums)
    ordered: dict[int, Any] = {}
    for x in values:  # grads and objective_grads share their arrays where there is no coupled decay
        if id(x) not in ordered:
            ordered[id(x)] = xp.where(never, xp.asarray(xp.nan, dtype=x.dtype), x)
    return [ordered[id(x)] for x in values]


def after_first_element(xp: Any, value: Any, written: Any) -> Any:
    """``value`` made to wait for the array ``written`` (through its first element) when JAX traces
    the step; else ``value``. For a new state array whose computation read an old one that another
    computation then overwrites: the overwriting one takes ``value`` and runs after it."""
    if not jax_traced([value]):
        return value
    return wait_for(xp, [value], first_elements_of([written]))[0]


def first_elements_of(arrays: Sequence[Any]) -> list:
    """The first element of each array, 0-D arrays as they are, empty ones left out: 0-D values that
    a computation waiting for them waits for the whole array through."""
    return [x if x.ndim == 0 else x[(0,) * x.ndim] for x in arrays if math.prod(x.shape)]


def never_true(xp: Any, values: Sequence[Any]) -> Any:
    """A 0-D boolean that is false for every value of the 0-D ``values`` (NaN included) and that
    XLA cannot fold: whatever reads it waits for them. Over many values one scan, not a chain of
    ``n - 1`` operations, which XLA would copy into every reader's loop (adaptlr._scan.add_all)."""
    if len(values) == 1:
        return values[0] > xp.inf
    return add_all(xp, [xp.astype(x > xp.inf, xp.int32) for x in values]) > 0


def as_loop_fusion(xp: Any, values: list, t: Any) -> list:
    """``values`` (arrays), each made a select on the 0-D step count ``t`` (``where(t > ∞, NaN, x)``:
    ``x`` for every value) when JAX traces the step and the array has more than one dimension; else
    ``values``. For a new array that is one elementwise operation of the step's inputs (ActiveLR's
    ``C + g``): XLA:CPU emits such a lone operation on a tensor whose last dimension is small (a 3×3
    convolution's) tile by tile along that dimension, 4× slower than a loop fusion of two operations
    (jax 0.10.2, ``wrapped_add`` against ``(c + g)·1.5``: 1.5 and 0.35 ns per element, round 27)."""
    if not jax_traced(values):
        return values
    selected = iter(wait_for(xp, [x for x in values if x.ndim > 1], [t]))
    return [next(selected) if x.ndim > 1 else x for x in values]


def jax_traced(values: list) -> bool:
    """Whether JAX traces ``values`` (torch.compile orders the step itself: nothing to do)."""
    return bool(values) and v.library_of(values[0]) == "jax" and v.is_traced(values[0])
