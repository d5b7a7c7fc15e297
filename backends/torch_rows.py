"""Row blocks of one tensor: the torch adapter's list step for algorithms whose sums stay within a tensor.

DSA (its row, column and tensor sums), HD with one rate per tensor, EG with one scale per tensor
and LDoG sum over each tensor's own elements (:func:`adaptlr.backends.fast.tensorwise`), so the
adapter's list path updates them a few whole tensors at a time, and a step's temporaries are those
of its largest tensor: about three of them for DSA (3.0× the largest tensor on ResNet-18 shapes
with the state donated, round 24; 9.0× before round 13; docs/performance.md). On a large CPU model
the adapter runs each tensor above the budget in blocks of rows of its leading dimension, views of
its own storage, in the two passes of :mod:`adaptlr.backends.part_sums` (``rows=True``; the first
pass, for algorithms whose sums all come before the direction, several blocks to a call, each a
leaf: :class:`~adaptlr.backends.part_sums.RowGroupRecorder`):

- the rows are shards of the leading dimension: a sum over dimensions that include the first one
  (a tensor's total, DSA's column sums) is recorded per block in the first pass, which writes
  nothing and stops at the block's last sum, and answered with the whole tensor's sum in the
  second; a sum within rows (DSA's row sums) is the block's own, made in the first pass and read
  back in the second, which, given every sum, makes none of their terms (:class:`adaptlr._reduce.Term`);
- state fields with one entry per row (per element, DSA's row factors: :func:`per_row`) are cut like
  the parameter; the others (DSA's column and tensor factors, 0-D values) are read whole, and
  their new values, the same in every block (they come from the whole sums), are written after
  the last block; a writing block after the first takes the per-row fields' new values in place
  (:func:`adaptlr._inplace.donating`).

The algorithms must make their sums replayable (:func:`adaptlr.backends.fast.sums_replayable_by_rows`:
no sum's terms depend on another sum of the same step).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["per_row", "row_blocks"]


def row_blocks(shape: tuple, budget: int) -> list[slice] | None:
    """Slices of the leading dimension of a tensor of ``shape``, each of at most ``budget`` elements
    (at least one row), or None where the tensor has at most ``budget`` elements or fewer than two
    rows (it runs whole)."""
    if budget < 1:
        raise ValueError(f"the row-block budget must be at least 1 element, got {budget}")
    numel = math.prod(shape)
    if len(shape) == 0 or shape[0] < 2 or numel <= budget:
        return None
    rows = shape[0]
    per_block = max(1, budget // max(1, numel // rows))
    return [slice(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


def per_row(t: Any, param_shape: tuple) -> bool:
    """Whether the state tensor ``t`` of a parameter of ``param_shape`` has one entry per row of its
    leading dimension (cut with the parameter), rather than one shared by every row (read whole)."""
    return t.ndim == len(param_shape) and t.ndim > 0 and t.shape[0] == param_shape[0]
