"""The torch adapter's CPU steps of the learning-rate-free bases, written for torch (``fast="fused"``).

The array-API step of Prodigy, D-Adaptation or DoG makes about twenty elementwise passes over
memory and sums its terms in float64; ``prodigyopt``, ``dadaptation`` and ``dog_optimizer`` make
about ten in-place passes per tensor, with a host sync per tensor. These steps make the same
updates in two passes over cache-sized blocks of each parameter's own storage, with in-place torch
operations (Prodigy's moments and update in torch's fused AdamW kernel) and the algorithms' own 0-D
code between the passes (:mod:`adaptlr.backends.torch_block_sums`):

- :mod:`adaptlr.backends.torch_fused_prodigy`: Prodigy (``β1 > 0``, ``slice_p = 1``);
- :mod:`adaptlr.backends.torch_blocked_dadapt`: D-Adapt Adam, D-Adapt SGD;
- :mod:`adaptlr.backends.torch_blocked_dog`: DoG (not LDoG), DoWG;
- :mod:`adaptlr.backends.torch_fused_adam`: Adam and AdamW on torch's fused kernels, where
  ``fast="fused"`` is asked for (as ``fused=True`` in ``torch.optim``; ``"auto"`` keeps the
  array-API step for them).

Each module has ``eligible(base)`` and ``step(base, params, grads, entries, shared, alphas, decays,
count)``, which updates the parameters and the per-parameter state in place and returns the new
shared 0-D fields. They read 0-D CPU tensors on the host (a read of memory, not a device sync), so
they serve plain CPU tensors (:func:`~adaptlr.backends.torch_block_sums.plain_tensors`): the torch
adapter's ``fast="auto"`` runs them on the parameters for models above 16 MiB, and on the flat
buffers of :class:`~adaptlr.backends.fast.FlatOptimizer` (``"flat"``, below) for smaller ones
(docs/performance.md, round 31).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

__all__ = ["step_module"]


def step_module(opt: Any, asked: bool = False) -> tuple[ModuleType, Any] | None:
    """``(module, base)``: the module whose ``step`` runs the adaptlr optimizer ``opt`` (its base
    alone, no adaptations, no ``state_dtype`` of its own; the torch adapter's per-parameter step
    counts unwrapped) and the base it takes; None where there is none. ``asked``: ``fast="fused"``
    was asked for, which also takes Adam and AdamW (:mod:`adaptlr.backends.torch_fused_adam`)."""
    if opt.adaptations or opt.state_dtype is not None:
        return None
    from adaptlr.backends import torch_blocked_dadapt, torch_blocked_dog, torch_fused_adam, torch_fused_prodigy
    from adaptlr.backends.torch_steps import PerParameterSteps

    base = opt.base.base if isinstance(opt.base, PerParameterSteps) else opt.base
    for module in (torch_fused_prodigy, torch_blocked_dadapt, torch_blocked_dog, torch_fused_adam):
        if module.eligible(base) and (asked or getattr(module, "DEFAULT", True)):
            return module, base
    return None
