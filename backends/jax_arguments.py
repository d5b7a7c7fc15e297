"""The arguments of a jitted adaptlr step (:func:`adaptlr.backends.fast.jit_step`, ``jit_update``).

A jitted call pays for every array it is given, and for the check that no donated buffer is given
twice. On 500 tensors of 32×64 (CPU) the state's 500 learning-rate leaves, one 0-D array per
parameter, and the check took 2.2 ms of a 9.6 ms donated AdamW step (docs/performance.md, round
22). Two things here keep both off the usual step:

- **Rates passed once per value.** ``init`` makes one 0-D rate per parameter (its own buffer, so
  that a user's own ``jax.jit`` may donate the state), all of them equal for a float learning rate,
  and the step returns them unchanged. The first time a step is given a set of rate arrays, they
  are grouped by value, dtype and placement (one read of the 0-D values to the host, once); the
  jitted function receives one array per group and a static :class:`RateLayout` that rebuilds the
  tree. JAX arrays are immutable, so the same arrays (by identity) keep the same values: later calls
  with those arrays reuse the grouping. Rates that differ from them (set by the user, or a step
  that computes new ones) are grouped by identity, never read to the host again: no host sync per
  step. A schedule's rates are not read by the step at all and are grouped by identity.
- **The donation check once.** :func:`donatable` copies a donated array that is also given
  elsewhere (``init`` shares arrays between state fields; a caller may pass gradients that are the
  parameters). A call with the state and params this step returned last (by identity) skips it:
  their buffers are the executable's fresh outputs. Should JAX refuse such a call all the same
  (a buffer donated twice, or donated and also given: the caller changed the containers), the call
  is made again with the check, and every later call checks; JAX refuses before it runs anything,
  so no buffer is lost.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import chain
from typing import Any, NamedTuple

import optree

__all__ = ["RateLayout", "StepArguments", "donatable"]


def donatable(args: tuple, donated: tuple[int, ...]) -> tuple:
    """``args`` with every donated array that is also used elsewhere replaced by a copy.

    ``init`` shares arrays between state fields (an adaptation's initial rate); XLA cannot donate
    one buffer twice, nor a buffer that is also a plain input.
    """
    if not donated:
        return args
    import jax

    leaves = [jax.tree_util.tree_leaves(arg) for arg in args]  # 5× faster than optree on jax.Array leaves
    # (map(id, ...) and chain: the ids taken in C, not a comprehension)
    seen = set(map(id, chain.from_iterable(leaves[k] for k in range(len(args)) if k not in donated)))
    given = list(map(id, chain.from_iterable(leaves[k] for k in donated)))
    if seen.isdisjoint(given) and len(set(given)) == len(given):
        return args  # nothing shared, nothing to copy
    out = list(args)

    def own(x: Any) -> Any:
        if id(x) in seen:
            return jax.numpy.copy(x)
        seen.add(id(x))
        return x

    for k in donated:
        out[k] = optree.tree_map(own, args[k])
    return tuple(out)


class RateLayout(NamedTuple):
    """How the learning-rate tree is rebuilt from the arrays a jitted step is given (a static
    argument of the step: one trace per layout)."""

    treedef: Any
    pattern: tuple[int, ...]  # leaf i is rates[pattern[i]]

    def rebuild(self, rates: list) -> Any:
        return self.treedef.unflatten([rates[i] for i in self.pattern])


def _grouped(keys: list) -> tuple[list[int], tuple[int, ...]]:
    """The first index of each distinct key, and each key's group."""
    index: dict[Any, int] = {}
    first: list[int] = []
    for i, key in enumerate(keys):
        if key not in index:
            index[key] = len(first)
            first.append(i)
    return first, tuple(index[key] for key in keys)


def _value_keys(leaves: list) -> list | None:
    """A key per 0-D leaf that is equal for equal value, dtype and placement; None where a leaf
    cannot be read (a tracer: the step is being traced inside another function; an array not all
    on this process's devices)."""
    import jax
    from jax.core import Tracer

    if not all(isinstance(x, jax.Array) and not isinstance(x, Tracer) and x.ndim == 0
               and x.is_fully_addressable for x in leaves):
        return None
    values = jax.device_get(leaves)  # once per set of rate arrays (module docstring)
    return [(bytes(memoryview(v)), str(x.dtype), x.sharding) for v, x in zip(values, leaves)]


class StepArguments:
    """``(grads, state, params)`` → the positional arguments ``(grads, count, rates, base,
    adaptations, params)`` of a jitted step and its :class:`RateLayout`, and the call itself
    (module docstring).

    Args:
        donated: the positions donated (base 3, adaptations 4, params 5).
        rates_by_value: group the rates by value the first time (False: a schedule's rates,
            which the step does not read, grouped by identity).
    """

    def __init__(self, donated: tuple[int, ...], rates_by_value: bool) -> None:
        self.donated = donated
        self.rates_by_value = rates_by_value
        self.grouped: tuple | None = None  # the rate arrays last grouped, and their (first, pattern)
        self.returned: tuple | None = None  # ids of the state and (donated) params the step returned
        self.always_check = False

    def rates(self, learning_rate: Any) -> tuple[list, RateLayout]:
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(learning_rate)
        grouped = self.grouped
        if grouped is None or len(grouped[0]) != len(leaves) or not all(map(operator.is_, leaves, grouped[0])):
            keys = _value_keys(leaves) if self.rates_by_value and grouped is None else None
            grouping = _grouped(keys if keys is not None else list(map(id, leaves)))
            # The arrays are kept (0-D each): an id is not reused while they live, so identity is
            # sameness of value.
            grouped = self.grouped = (tuple(leaves), grouping)
        first, pattern = grouped[1]
        return [leaves[i] for i in first], RateLayout(treedef, pattern)

    def __call__(self, grads: Any, state: Any, params: Any) -> tuple[tuple, RateLayout]:
        rates, layout = self.rates(state.learning_rate)
        return (grads, state.count, rates, state.base, state.adaptations, params), layout

    def call(self, function: Callable, args: tuple, state: Any, params: Any) -> Any:
        """``function(*args)``, with the donation check where the arguments may share buffers."""
        if not self.donated:
            return function(*args)
        if self.always_check or self.returned != self._identity(state, params):
            return function(*donatable(args, self.donated))
        try:
            return function(*args)
        except (RuntimeError, ValueError) as error:  # a buffer donated twice, or also given: JAX's
            # JaxRuntimeError from a compiled executable, ValueError from a jitted function
            if "donate" not in str(error):
                raise
            self.always_check = True
            return function(*donatable(args, self.donated))

    def _identity(self, state: Any, params: Any) -> tuple:
        return id(state), id(params) if 5 in self.donated else None

    def returning(self, state: Any, params: Any) -> None:
        """Record the state and (where donated) params the step returns: their buffers are the
        executable's own outputs."""
        self.returned = self._identity(state, params)
