"""DoG and DoWG on torch's CPU: their two norms over blocks, then ``θ ← θ - α·η·g`` (:mod:`adaptlr.dog`).

Pass 1 sums ``‖θ - x_0‖²`` and ``‖g‖²`` (``g ← g + λθ``: coupled decay) over blocks of each
parameter (:mod:`adaptlr.backends.torch_block_sums`); :meth:`~adaptlr.dog.DoGDirection.estimate`
(the array-API step's own 0-D code) gives ``η``; pass 2 is one ``add_`` per block. The upstream
``dog_optimizer`` makes the same two norms per tensor (each with a host sync) and the same ``add_``.
LDoG (``layerwise=True``, one ``η`` per tensor) takes the adapter's other paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import array_api_compat.torch as xp_torch
import torch

from adaptlr.backends.torch_block_sums import Buffers, blocks, coupled
from adaptlr.dog import DoGDirection, DoWGDirection

__all__ = ["eligible", "step"]


def eligible(base: object) -> bool:
    """DoG with one ``η`` for the model, and DoWG."""
    return (type(base) is DoGDirection and not base.layerwise) or type(base) is DoWGDirection


def shared_fields(base: DoGDirection | DoWGDirection) -> tuple[str, ...]:
    """The shared 0-D state fields :func:`step` returns, in the adapter's names."""
    if type(base) is DoGDirection:
        return "base.rbar", "base.grad_sq_sum", "base.eta"
    return "base.estim_sq_dist", "base.weighted_sq_norm_grads", "base.eta"


@torch.no_grad()
def step(base: DoGDirection | DoWGDirection, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
         entries: Sequence[dict], shared: dict, alphas: Sequence[torch.Tensor], decays: Sequence[float],
         count: torch.Tensor, block: int | None = None) -> dict:
    """One DoG or DoWG step on ``params`` (in place; ``entries``: their state, read) with the shared
    0-D fields ``shared``; returns the new shared fields (:func:`shared_fields`). Arguments as
    :func:`adaptlr.backends.torch_fused_prodigy.step`'s."""
    names = shared_fields(base)
    wide = shared[names[0]].dtype
    buffers = Buffers(params, block, 2)
    distances, magnitudes = buffers.sums(wide, squares=True), buffers.sums(wide, squares=True)
    for p, g, entry, lam in zip(params, grads, entries, decays):
        for pb, gb, x0b in blocks(buffers.block, p, g, entry["base.init_params"]):
            distances.add(torch.sub(pb, x0b, out=buffers(0, pb)))
            magnitudes.add(coupled(gb, pb, lam, buffers(1, pb)))
    sums = (distances.total(), magnitudes.total(), shared[names[0]], shared[names[1]])
    if type(base) is DoGDirection:
        new = base.estimate(xp_torch, *sums, alphas[0], count == 1)
    else:
        new = base.estimate(xp_torch, *sums)
    eta = float(new[2])
    for p, g, alpha, lam in zip(params, grads, alphas, decays):
        rate = -float(alpha) * eta
        if not lam:
            p.view(-1).add_(g.view(-1), alpha=rate)
            continue
        for pb, gb in blocks(buffers.block, p, g):
            pb.add_(coupled(gb, pb, lam, buffers(0, pb)), alpha=rate)
    return dict(zip(names, new, strict=True))
