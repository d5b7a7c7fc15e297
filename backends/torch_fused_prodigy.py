"""Prodigy on torch's CPU: its sums over cache-sized blocks, its moments and update in torch's fused AdamW kernel.

Prodigy's moments are Adam's moments of the scaled gradient ``d·g`` (:mod:`adaptlr.prodigy`, with
``g ← g + λθ`` under coupled decay)::

    m_t = β1·m_{t-1} + (1-β1)·(d·g)          v_t = β2·v_{t-1} + (1-β2)·(d·g)²
    θ_t = θ_{t-1} - α·d·c_t·(m_t / (sqrt(v_t) + d⁺·ε) + λ·θ_{t-1})      (decoupled decay)

which is one call of ``torch._fused_adamw_`` (the kernel of ``torch.optim.AdamW(fused=True)``: one
vectorized pass that reads ``θ, g, m, v`` and writes ``θ, m, v``) with the gradient ``d·g``, the
learning rate ``α·d·c_t``, ``eps = d⁺·ε``, weight decay ``λ`` (0 under coupled decay) and Adam's bias
corrections switched off (its step count is +inf, so ``1 - β^t = 1``; ``c_t`` is in the learning
rate). ``prodigyopt`` makes these in about ten in-place passes per tensor, adaptlr's array-API step
in about twenty (docs/performance.md, round 31).

The step, in two passes over blocks of at most ``block`` elements of each parameter (views of its
own storage; the temporaries are a block's):

1. ``⟨g, x_0 - θ⟩`` (float32 products summed in float64, as :func:`adaptlr._inplace.mul_for_sum`
   makes them), ``s ← β3·s + (d/d_0)·η·g`` in place and ``Σ|s|`` (summed in float64);
2. :meth:`ProdigyDirection.estimate` (the array-API step's own 0-D code) gives ``d⁺``; then per
   block ``d·g`` into a block buffer (the caller's gradient is not written) and the fused kernel.

The kernel takes ``eps`` and the learning rate as host numbers, read from 0-D CPU tensors
(``float()``: a read of host memory, not a device sync); the path is for CPU tensors only, where
it is the torch adapter's default (:meth:`adaptlr.backends.torch.Optimizer`). Same numbers as the
array-API step to rounding (``tests/test_fused_prodigy.py``: float64 against ``prodigyopt`` and the
list path to 1e-12, float32 by the suite's rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import array_api_compat.torch as xp_torch
import torch

from adaptlr._precision import largest
from adaptlr.prodigy import ProdigyDirection

__all__ = ["BLOCK_ELEMENTS", "ROW", "eligible", "step", "wide_sum"]

# Elements per block: the block's two float32 temporaries (the product, |s|) and the fused kernel's
# gradient buffer stay in a 2 MiB L2 cache (ResNet-18 shapes: docs/performance.md, round 31).
BLOCK_ELEMENTS = 1 << 17
ROW = 256  # elements per partial sum in the parameter dtype (wide_sum)
_SHARED = ("base.d", "base.d_max", "base.d_hat", "base.numerator", "base.lr_scale")


def eligible(opt: Any, params: Sequence[torch.Tensor], state_dtype: torch.dtype | None) -> bool:
    """Whether this step of the adaptlr optimizer ``opt`` can run here: Prodigy alone (no adaptations),
    ``β1 > 0`` (``β1 = 0`` divides by the new ``d``, which the kernel cannot), ``slice_p = 1``; plain
    contiguous float32 or float64 CPU tensors of one dtype, gradients alike, the state in that dtype."""
    base = opt.base
    if type(base) is not ProdigyDirection or opt.adaptations or opt.state_dtype is not None:
        return False
    if base.slice_p != 1 or base.b1 <= 0:
        return False
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64) or state_dtype not in (None, dtype):
        return False
    for p in params:
        g = p.grad
        if (type(p.detach()) is not torch.Tensor or p.device.type != "cpu" or p.dtype != dtype
                or not p.is_contiguous() or g is None or type(g) is not torch.Tensor or g.layout != torch.strided
                or g.dtype != dtype or not g.is_contiguous()):
            return False
    return True


def wide_sum(x: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """``Σ x`` of a 1-D block in ``wide``: sums of :data:`ROW` consecutive elements in ``x``'s dtype
    (torch's vectorized cascade sum: error ≤ ~log2(ROW)·ε·Σ|x_i| each), added in ``wide``.
    ``x.sum(dtype=wide)`` converts the whole block to ``wide`` first (a copy per block: 8 ms of a
    30 ms ResNet-18 step, docs/performance.md, round 31)."""
    if x.dtype == wide:
        return x.sum()
    n = x.numel()
    whole = n - n % ROW
    if whole == 0:
        return x.sum(dtype=wide)
    total = x[:whole].view(-1, ROW).sum(1).sum(dtype=wide)
    return total if whole == n else total + x[whole:].sum(dtype=wide)


@torch.no_grad()
def step(base: ProdigyDirection, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
         entries: Sequence[dict], shared: dict, alphas: Sequence[torch.Tensor], decays: Sequence[float],
         count: torch.Tensor, block: int | None = None) -> dict:
    """One Prodigy step on ``params`` (in place), their state ``entries`` (``"base.mu"``, ``"base.nu"``,
    ``"base.s"``, ``"base.p0"``: written in place) and the shared 0-D fields ``shared`` (read);
    returns the new shared fields. ``count``: this step's count ``t``; ``alphas`` (0-D) and
    ``decays``: each parameter's ``α`` and ``λ``; ``block``: elements per block (None:
    :data:`BLOCK_ELEMENTS`)."""
    xp = xp_torch
    block = block or BLOCK_ELEMENTS
    dtype = params[0].dtype
    wide = shared["base.d"].dtype
    t = count.to(wide)
    d = shared["base.d"]
    bias_correction = base._bias_correction(t)
    dlr, s_coef, _, _ = base.coefficients(xp, d, bias_correction, largest(xp, list({id(a): a for a in alphas}.values()),
                                                                        wide))
    s_weight = s_coef.to(dtype)
    coupled = not base.decoupled
    block = min(block, max(p.numel() for p in params))
    buffer = torch.empty(block, dtype=dtype)
    objective = torch.empty(block, dtype=dtype) if coupled and any(decays) else None
    flat = [(p.view(-1), g.view(-1), e) for p, g, e in zip(params, grads, entries)]

    # Pass 1: the sums (the terms in a block buffer) and s.
    dots, magnitudes = [], []
    for (p, g, entry), lam in zip(flat, decays):
        blocks = zip(p.split(block), g.split(block), entry["base.s"].view(-1).split(block),
                     entry["base.p0"].view(-1).split(block))
        for pb, gb, sb, p0b in blocks:
            into = buffer if pb.numel() == block else buffer[: pb.numel()]
            if coupled and lam:
                gb = torch.add(gb, pb, alpha=lam, out=objective[: pb.numel()])
            dots.append(wide_sum(torch.sub(p0b, pb, out=into).mul_(gb), wide))
            sb.mul_(base.beta3).addcmul_(gb, s_weight)
            magnitudes.append(wide_sum(torch.abs(sb, out=into), wide))
    dot, denominator = torch.stack(dots).sum(), torch.stack(magnitudes).sum()
    d_new, d_max, d_hat, numerator, kappa, lr_scale = base.estimate(
        xp, t, dot, denominator, d, dlr, bias_correction, shared["base.d_max"], shared["base.d_hat"],
        shared["base.numerator"])

    # Pass 2: d·g into the block buffer, then the fused kernel on the block.
    eps = float(d_new) * base.eps
    kappa_value = float(kappa)
    scale = d.to(dtype)
    steps = [torch.tensor(math.inf, dtype=torch.float32)]  # 1 - β^∞ = 1: no bias correction in the kernel
    lr_of: dict[int, float] = {}
    for (p, g, entry), alpha, lam in zip(flat, alphas, decays):
        lr = lr_of.get(id(alpha))
        if lr is None:
            lr = lr_of[id(alpha)] = float(alpha) * kappa_value
        blocks = zip(p.split(block), g.split(block), entry["base.mu"].view(-1).split(block),
                     entry["base.nu"].view(-1).split(block))
        for pb, gb, mb, vb in blocks:
            into = buffer if pb.numel() == block else buffer[: pb.numel()]
            if coupled and lam:
                scaled = torch.add(gb, pb, alpha=lam, out=into).mul_(scale)
            else:
                scaled = torch.mul(gb, scale, out=into)
            torch._fused_adamw_([pb], [scaled], [mb], [vb], [], steps, lr=lr,
                                beta1=base.b1, beta2=base.b2, weight_decay=0.0 if coupled else lam, eps=eps,
                                amsgrad=False, maximize=False)
    return dict(zip(_SHARED, (d_new, d_max, d_hat, numerator, lr_scale), strict=True))
