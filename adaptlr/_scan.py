"""``add_all``: many 0-D arrays added in one scan (shared by :mod:`adaptlr._reduce` and
:mod:`adaptlr._ordering`, which depends on nothing else of the sums)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["add_all"]


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
