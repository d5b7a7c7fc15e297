"""Step scalars computed once per step under ``torch.compile`` (:func:`adaptlr._precision.computed_once`).

Inductor inlines a pointwise computation into every loop that reads it unless the result is
realized as a buffer, and a 0-D step scalar read by the loop of every tensor is inlined too (its
heuristics realize a reused result only for a few heavy operations, or when it reads many
buffers). A bias correction ``1/(1 - β^t)`` computed in float64 then costs a ``pow`` per vector of
every tensor: the adapter's compiled AdamW step on ResNet-18 shapes took 1.61× the fused one, 1.10×
with the scalars as buffers (docs/performance.md, round 4). ``as_strided`` needs its input realized
(Inductor lowers it to a view of a buffer), so ``torch.as_strided(x, (), ())``, the same value,
makes the scalar a buffer computed once by a small kernel of its own; the elementwise loops load it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["computed_once"]


def computed_once(x: Any) -> Any:
    """``x``; while ``torch.compile`` traces, a 0-D plain tensor comes back as a view of a buffer
    of its own (computed once per step). Tensor subclasses (DTensor) and eager calls: ``x``."""
    if type(x) is not torch.Tensor or x.ndim != 0 or not torch.compiler.is_compiling():
        return x
    return torch.as_strided(x, (), ())
