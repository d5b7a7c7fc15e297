"""D-Adapt Adam and D-Adapt SGD on torch's CPU: their sums, then their updates, over blocks (:mod:`adaptlr.dadapt`).

Both run in two passes over blocks of each parameter (:mod:`adaptlr.backends.torch_block_sums`),
with the array-API step's own 0-D code (``coefficients``, ``rate_before``, ``estimate``) between
them, and write every state field in place:

- **D-Adapt Adam**: pass 1 sums ``⟨g, s_{t-1}/(sqrt(v_{t-1}) + ε)⟩``, updates
  ``s ← β̃·s + η·(1-β̃)·g`` and sums ``|s|``; pass 2 updates ``m ← β1·m + η·(1-β1)·g`` and
  ``v ← β2·v + (1-β2)·g²``, then ``θ ← θ·(1 - α·λ·d·c_t) - m/(sqrt(v) + ε)`` (decoupled decay;
  coupled: ``g ← g + λθ`` in both passes).
- **D-Adapt SGD** (coupled decay, ``g ← g + λθ``): pass 1 sums ``‖g‖²`` (raw), ``⟨g, s_{t-1}⟩`` and
  ``‖s_{t-1} + η_before·g‖²``; pass 2 updates ``s ← s + η·g`` and
  ``θ ← μ·θ + (1-μ)·(x_0 - s)`` (``lerp``). Once ``‖g_1‖`` is known (every step after the first
  nonzero gradient), ``η`` is known before the sums: pass 1 updates ``s`` and sums ``⟨g, s_{t-1}⟩``
  and ``‖s_t‖²``; pass 2 is the parameters' update alone.

Where nothing moved (``Σ|s_t| = 0``: every gradient so far zero) the parameters stay, as on the
array-API step (whose step size is then 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import array_api_compat.torch as xp_torch
import torch

from adaptlr.backends.torch_block_sums import Buffers, blocks, coupled, largest_rate, weighted_sum_pass
from adaptlr.dadapt import DAdaptAdamDirection, DAdaptSGDDirection

__all__ = ["eligible", "step"]


def eligible(base: object) -> bool:
    """D-Adapt Adam and D-Adapt SGD."""
    return type(base) in (DAdaptAdamDirection, DAdaptSGDDirection)


def step(base: DAdaptAdamDirection | DAdaptSGDDirection, params: Sequence[torch.Tensor],
         grads: Sequence[torch.Tensor], entries: Sequence[dict], shared: dict, alphas: Sequence[torch.Tensor],
         decays: Sequence[float], count: torch.Tensor, block: int | None = None) -> dict:
    """One step on ``params`` (in place) and their state ``entries`` (in place); returns the new
    shared 0-D fields. Arguments as :func:`adaptlr.backends.torch_fused_prodigy.step`'s."""
    alpha_max = largest_rate(alphas, shared["base.d"].dtype)
    if type(base) is DAdaptAdamDirection:
        return _adam(base, params, grads, entries, shared, alphas, decays, count, alpha_max, block)
    return _sgd(base, params, grads, entries, shared, decays, alpha_max, block)


@torch.no_grad()
def _adam(base: DAdaptAdamDirection, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
          entries: Sequence[dict], shared: dict, alphas: Sequence[torch.Tensor], decays: Sequence[float],
          count: torch.Tensor, alpha_max: torch.Tensor, block: int | None) -> dict:
    dtype, wide, d = params[0].dtype, shared["base.d"].dtype, shared["base.d"]
    t = count.to(wide)
    bias_correction = base._bias_correction(t)
    dlr, m_coef, s_coef = base.coefficients(d, bias_correction, alpha_max)
    m_weight, s_weight = m_coef.to(dtype), s_coef.to(dtype)
    coupled_decays = decays if not base.decoupled else [0.0] * len(decays)
    buffers = Buffers(params, block, 2)

    def term(p: torch.Tensor, g: torch.Tensor, s: torch.Tensor, v: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        denominator = torch.sqrt(v, out=into).add_(base.eps)  # the old v: pass 2 updates it
        return torch.div(s, denominator, out=denominator).mul_(g)

    dot, magnitude = weighted_sum_pass(buffers, params, grads, entries, coupled_decays, "base.nu", term,
                                       math.sqrt(base.b2), s_weight, wide)
    d_new, numerator, lr_scale, one, decay = base.estimate(
        xp_torch, t, dot, magnitude, d, dlr, bias_correction, shared["base.numerator"])

    moved, decay_value = float(one) > 0, float(decay)
    for p, g, entry, alpha, lam, coupled_lam in zip(params, grads, entries, alphas, decays, coupled_decays):
        shrink = 1.0 - float(alpha) * (lam - coupled_lam) * decay_value
        for pb, gb, mb, vb in blocks(buffers.block, p, g, entry["base.mu"], entry["base.nu"]):
            gb = coupled(gb, pb, coupled_lam, buffers(1, pb))
            mb.mul_(base.b1).addcmul_(gb, m_weight)
            vb.mul_(base.b2).addcmul_(gb, gb, value=1.0 - base.b2)
            if shrink != 1.0:
                pb.mul_(shrink)
            if moved:
                pb.addcdiv_(mb, torch.sqrt(vb, out=buffers(0, pb)).add_(base.eps), value=-1.0)
    return {"base.d": d_new, "base.numerator": numerator, "base.lr_scale": lr_scale}


@torch.no_grad()
def _sgd(base: DAdaptSGDDirection, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
         entries: Sequence[dict], shared: dict, decays: Sequence[float], alpha_max: torch.Tensor,
         block: int | None) -> dict:
    dtype, wide, d, g0_before = params[0].dtype, shared["base.d"].dtype, shared["base.d"], shared["base.g0_norm"]
    rate_or_one = base.rate_before(xp_torch, d, g0_before, alpha_max).to(dtype)
    buffers = Buffers(params, block, 2)
    # Once ‖g_1‖ is known, η = d·a/‖g_1‖ is known before the sums: s ← s + η·g in the first pass,
    # whose Σ s_t² is then the step's (and ‖g‖², which only the first step needs, is not made).
    known = float(g0_before) > 0

    raw, dots, squares = buffers.sums(wide, squares=True), buffers.sums(wide), buffers.sums(wide, squares=True)
    for p, g, entry, lam in zip(params, grads, entries, decays):
        for pb, gb, sb in blocks(buffers.block, p, g, entry["base.s"]):
            if not known:
                raw.add(gb)
            gb = coupled(gb, pb, lam, buffers(1, pb))
            dots.add(torch.mul(gb, sb, out=buffers(0, pb)))
            if known:
                squares.add(sb.addcmul_(gb, rate_or_one))
            else:
                squares.add(torch.mul(gb, rate_or_one, out=buffers(0, pb)).add_(sb))
    dlr, d_new, numerator, g0_norm, lr_scale, one, _ = base.estimate(
        xp_torch, raw.total(), dots.total(), squares.total(), d, g0_before, shared["base.numerator"], alpha_max)

    moved, rate, mu = float(one) > 0, dlr.to(dtype), base.momentum
    for p, g, entry, lam in zip(params, grads, entries, decays):
        for pb, gb, sb, x0b in blocks(buffers.block, p, g, entry["base.s"], entry["base.x0"]):
            if not known:
                sb.addcmul_(coupled(gb, pb, lam, buffers(1, pb)), rate)
            if moved and mu:
                pb.lerp_(torch.sub(x0b, sb, out=buffers(0, pb)), 1.0 - mu)
            elif moved:
                torch.sub(x0b, sb, out=pb)
    return {"base.d": d_new, "base.numerator": numerator, "base.g0_norm": g0_norm, "base.lr_scale": lr_scale}
