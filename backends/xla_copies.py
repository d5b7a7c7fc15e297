"""The ``copy`` instructions in XLA's optimized HLO of a jitted step, and the elements they copy.

XLA adds a copy where a buffer cannot be reused in place: an input returned as an output without
donation, the operands of a conditional's branches (every output of a conditional is a fresh
buffer), a donated input still read after it is overwritten. On the CPU each copied element is read
and written: two words of traffic on top of the step's own. Used by
``docs/scripts/jax_step_copies.py`` (docs/performance.md) and the epoch-boundary tests.
"""

from __future__ import annotations

import math
import re

__all__ = ["copies_per_computation", "loop_bodies", "ordinary_step_copies"]

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_COPY = re.compile(r"= ([a-z]+[0-9]*)\[([0-9,]*)\]\{[^}]*\} copy\(")
_LOOP_BODY = re.compile(r"\bwhile\(.*\bbody=%([\w.\-]+)")


def copies_per_computation(hlo: str, dtype: str = "f32") -> dict[str, tuple[int, int]]:
    """``{computation: (copy instructions, elements copied)}`` for arrays of ``dtype`` (HLO's name)."""
    counts: dict[str, tuple[int, int]] = {}
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        for match in _COPY.finditer(line):
            if match.group(1) == dtype:
                elements = math.prod(int(d) for d in match.group(2).split(",") if d)
                count, total = counts.get(computation, (0, 0))
                counts[computation] = (count + 1, total + elements)
    return counts


def loop_bodies(hlo: str) -> set[str]:
    """The names of the computations that are the bodies of ``while`` loops."""
    return {match.group(1) for match in _LOOP_BODY.finditer(hlo)}


def ordinary_step_copies(hlo: str, dtype: str = "f32") -> int:
    """Elements copied outside every loop body: what a step copies when its loops run no iteration.

    For a step whose epoch-boundary work is a loop run zero or one time (``only_when``), this is
    what every ordinary step copies. Copies in the branches of a conditional count (one branch runs
    every step).
    """
    bodies = loop_bodies(hlo)
    return sum(elements for name, (_, elements) in copies_per_computation(hlo, dtype).items() if name not in bodies)
