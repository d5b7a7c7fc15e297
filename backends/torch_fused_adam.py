"""Adam and AdamW on torch's CPU through torch's fused kernels (opt-in: ``fast="fused"``).

``torch._fused_adam_`` and ``torch._fused_adamw_`` are the kernels of ``torch.optim.Adam``/``AdamW``
with ``fused=True``: one vectorized pass per tensor that reads ``θ, g, m, v`` and writes ``θ, m, v``,
the bias corrections computed in double from each parameter's step count, which is spec §1's Adam
and AdamW (:mod:`adaptlr.adam`) with the reference's own arithmetic::

    g ← g + λθ (Adam)       m ← β1·m + (1-β1)·g       v ← β2·v + (1-β2)·g²
    θ ← θ·(1 - αλ) (AdamW)  θ ← θ - α/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + ε)

One kernel call per set of parameters with the same ``α``, ``λ`` and step count tensor (the
adapter's per-parameter counts, ``state[p]["step"]``, already advanced for this step). The
adapter's ``"auto"`` does not take it: as in ``torch.optim``, where ``fused=True`` is asked for, the
array-API step stays the default (and the base every wrapper's time is compared with).
ResNet-18 shapes: docs/performance.md, round 31.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaptlr.adam import AdamDirection

__all__ = ["DEFAULT", "eligible", "step"]

DEFAULT = False  # fast="fused" only (torch_lr_free.step_module)


def eligible(base: object) -> bool:
    """Adam and AdamW."""
    return type(base) is AdamDirection


@torch.no_grad()
def step(base: AdamDirection, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
         entries: Sequence[dict], shared: dict, alphas: Sequence[torch.Tensor], decays: Sequence[float],
         count: torch.Tensor, block: int | None = None) -> dict:
    """One Adam or AdamW step on ``params`` and their ``"base.mu"``, ``"base.nu"`` (in place), each
    with the adapter's step count of its parameter, ``entries[i]["step"]`` (already advanced; the
    optimizer's ``count`` is not used). Returns no shared fields. Arguments as
    :func:`adaptlr.backends.torch_fused_prodigy.step`'s."""
    kernel = torch._fused_adamw_ if base.decoupled else torch._fused_adam_
    calls: dict[tuple, list[list]] = {}
    for p, g, entry, alpha, lam in zip(params, grads, entries, alphas, decays):
        steps = entry["step"]
        members = calls.setdefault((float(alpha), lam, id(steps)), [[], [], [], [], [steps]])
        for into, x in zip(members, (p, g, entry["base.mu"], entry["base.nu"])):
            into.append(x)
    for (lr, lam, _), (ps, gs, ms, vs, (steps,)) in calls.items():
        kernel(ps, gs, ms, vs, [], [steps] * len(ps), lr=lr, beta1=base.b1, beta2=base.b2, weight_decay=lam,
               eps=base.eps, amsgrad=False, maximize=False)
    return {}
