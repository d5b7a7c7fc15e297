"""Prodigy on torch's CPU: its sums over blocks, its moments and update in torch's fused AdamW kernel.

Prodigy's moments are Adam's moments of the scaled gradient ``d·g`` (:mod:`adaptlr.prodigy`, with
``g ← g + λθ`` under coupled decay)::

    m_t = β1·m_{t-1} + (1-β1)·(d·g)          v_t = β2·v_{t-1} + (1-β2)·(d·g)²
    θ_t = θ_{t-1} - α·d·c_t·(m_t / (sqrt(v_t) + d⁺·ε) + λ·θ_{t-1})      (decoupled decay)

which is one call of ``torch._fused_adamw_`` (the kernel of ``torch.optim.AdamW(fused=True)``: one
vectorized pass that reads ``θ, g, m, v`` and writes ``θ, m, v``) with the gradient ``d·g``, the
learning rate ``α·d·c_t``, ``eps = d⁺·ε``, weight decay ``λ`` (0 under coupled decay) and Adam's bias
corrections switched off (its step count is +inf, so ``1 - β^t = 1``; ``c_t`` is in the learning
rate).

The step, in two passes over blocks of each parameter (:mod:`adaptlr.backends.torch_block_sums`):

1. ``⟨g, x_0 - θ⟩``, ``s ← β3·s + (d/d_0)·η·g`` in place, ``Σ|s|``;
2. :meth:`~adaptlr.prodigy.ProdigyDirection.estimate` (the array-API step's own 0-D code) gives
   ``d⁺``; then per block ``d·g`` into a block buffer (the caller's gradient is not written) and
   the fused kernel.

The kernel takes ``eps`` and the learning rate as host numbers, read from 0-D CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import array_api_compat.torch as xp_torch
import torch

from adaptlr.backends.torch_block_sums import Buffers, blocks, coupled, largest_rate, weighted_sum_pass
from adaptlr.prodigy import ProdigyDirection

__all__ = ["eligible", "step"]

_SHARED = ("base.d", "base.d_max", "base.d_hat", "base.numerator", "base.lr_scale")


def eligible(base: object) -> bool:
    """Prodigy with ``β1 > 0`` (``β1 = 0`` divides by the new ``d``, which the kernel cannot) and
    ``slice_p = 1``."""
    return type(base) is ProdigyDirection and base.slice_p == 1 and base.b1 > 0


@torch.no_grad()
def step(base: ProdigyDirection, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
         entries: Sequence[dict], shared: dict, alphas: Sequence[torch.Tensor], decays: Sequence[float],
         count: torch.Tensor, block: int | None = None) -> dict:
    """One Prodigy step on ``params`` (in place), their state ``entries`` (``"base.mu"``, ``"base.nu"``,
    ``"base.s"``, ``"base.p0"``: written in place) and the shared 0-D fields ``shared`` (read);
    returns the new shared fields. ``count``: this step's count ``t``; ``alphas`` (0-D) and
    ``decays``: each parameter's ``α`` and ``λ``; ``block``: elements per block (None: the default)."""
    xp = xp_torch
    dtype, wide = params[0].dtype, shared["base.d"].dtype
    t, d = count.to(wide), shared["base.d"]
    bias_correction = base._bias_correction(t)
    dlr, s_coef, _, _ = base.coefficients(xp, d, bias_correction, largest_rate(alphas, wide))
    s_weight = s_coef.to(dtype)
    coupled_decays = decays if not base.decoupled else [0.0] * len(decays)
    buffers = Buffers(params, block, 2)

    # Pass 1: ⟨g, x_0 - θ⟩, s and Σ|s|.
    def term(p: torch.Tensor, g: torch.Tensor, s: torch.Tensor, p0: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        return torch.sub(p0, p, out=into).mul_(g)

    dot, magnitude = weighted_sum_pass(buffers, params, grads, entries, coupled_decays, "base.p0", term,
                                       base.beta3, s_weight, wide)
    d_new, d_max, d_hat, numerator, kappa, lr_scale = base.estimate(
        xp, t, dot, magnitude, d, dlr, bias_correction, shared["base.d_max"], shared["base.d_hat"],
        shared["base.numerator"])

    # Pass 2: d·g into a block buffer, then the fused kernel on the block.
    eps, kappa_value, scale = float(d_new) * base.eps, float(kappa), d.to(dtype)
    steps = [torch.tensor(math.inf, dtype=torch.float32)]  # 1 - β^∞ = 1: no bias correction in the kernel
    for p, g, entry, alpha, lam, coupled_lam in zip(params, grads, entries, alphas, decays, coupled_decays):
        lr = float(alpha) * kappa_value
        for pb, gb, mb, vb in blocks(buffers.block, p, g, entry["base.mu"], entry["base.nu"]):
            if coupled_lam:
                scaled = coupled(gb, pb, coupled_lam, buffers(0, pb)).mul_(scale)
            else:
                scaled = torch.mul(gb, scale, out=buffers(0, pb))
            torch._fused_adamw_([pb], [scaled], [mb], [vb], [], steps, lr=lr, beta1=base.b1, beta2=base.b2,
                                weight_decay=lam - coupled_lam, eps=eps, amsgrad=False, maximize=False)
    return dict(zip(_SHARED, (d_new, d_max, d_hat, numerator, lr_scale), strict=True))
