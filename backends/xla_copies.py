"""The ``copy`` instructions in XLA's optimized HLO of a jitted step, and the elements they copy.

XLA adds a copy where a buffer cannot be reused in place: an input returned as an output without
donation, the operands of a conditional's branches (every output of a conditional is a fresh
buffer), a donated input still read after it is overwritten. On the CPU each copied element is read
and written: two words of traffic on top of the step's own. Used by
``docs/scripts/jax_step_copies.py`` (docs/performance.md, rounds 4 and 5). :func:`instruction_count`
gives the size of the optimized HLO (``docs/scripts/jax_compile_sizes.py``, round 15).
"""

from __future__ import annotations

import math
import re

__all__ = ["ENTRY", "copies_per_computation", "instruction_count"]

ENTRY = "ENTRY"  # the key of the entry computation (the step itself, outside any branch)

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = ", flags=re.M)
_COPY = re.compile(r"= ([a-z]+[0-9]*)\[([0-9,]*)\]\{[^}]*\} copy\(")


def copies_per_computation(hlo: str, dtype: str = "f32") -> dict[str, tuple[int, int]]:
    """``{computation: (copy instructions, elements copied)}`` for arrays of ``dtype`` (HLO's name).

    The entry computation is keyed :data:`ENTRY`; the others (a conditional's branches) by name.
    """
    counts: dict[str, tuple[int, int]] = {}
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = ENTRY if header.group(1) else header.group(2)
            continue
        for match in _COPY.finditer(line):
            if match.group(1) == dtype:
                elements = math.prod(int(d) for d in match.group(2).split(",") if d)
                count, total = counts.get(computation, (0, 0))
                counts[computation] = (count + 1, total + elements)
    return counts


def instruction_count(hlo: str) -> int:
    """The instructions of every computation of ``hlo`` (the text of a compiled step's optimized HLO,
    ``jax.jit(f).lower(...).compile().as_text()``), fusions' bodies included."""
    return len(_INSTRUCTION.findall(hlo))
