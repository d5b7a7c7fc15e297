"""Prodigy: Adam whose learning rate is estimated from the distance travelled (issue 18; spec §0.1).

Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner", ICML 2024
(arXiv:2306.06101); oracle ``prodigyopt.Prodigy`` 1.1.2 (``konstmish/prodigy``). With ``d`` the
estimate of the distance to the solution (``d_0`` at the start), ``x_0`` the initial parameters,
``c_t`` the bias correction and ``a = max α`` the largest learning rate of the step::

    g ← g_t + λ·θ_{t-1}                                    (decouple=False: coupled weight decay)
    c_t = sqrt(1-β2^t) / (1-β1^t)   (use_bias_correction; else 1)        η = d·a·c_t
    m_t = β1·m_{t-1} + d·(1-β1)·g
    v_t = β2·v_{t-1} + d²·(1-β2)·g²
    r_t = β3·r_{t-1} + (d/d_0)·η·⟨g, x_0 - θ_{t-1}⟩        (global sum over every tensor)
    s_t = β3·s_{t-1} + (d/d_0)·η·g                         (safeguard_warmup: (d/d_0)·d·g)
    d̂ = d_coef · r_t / Σ|s_t|
    d⁺ = max(d, d̂) if d = d_0 else d;   d_max ← max(d_max, d̂);   d⁺ ← min(d_max, d⁺·growth_rate)
    u_t = -α·d·c_t · (m_t / (sqrt(v_t) + d⁺·ε)  + λ·θ_{t-1})   (decouple=True: decoupled decay)
    (β1 = 0: m_t / … is replaced by d⁺·g / (sqrt(v_t) + d⁺·ε))

``β3 = sqrt(β2)`` unless given. ``x_0``, ``s`` and the sums use every ``slice_p``-th element of each
flattened tensor. A step where ``Σ|s_t| = 0`` (every gradient so far zero) changes the moments but
neither the parameters nor ``d``, as upstream. In adaptlr's decomposition the base direction is
``m_t / (sqrt(v_t) + d⁺·ε)`` and ``d·c_t`` is the base's own multiplier ``κ_t`` of ``α``
(:meth:`adaptlr.core.BaseDirection.step`), applied to decoupled weight decay too.

Differences from the upstream packages, by design: no ``.item()`` (every decision is a ``where``
on 0-D arrays, so the step runs under ``jax.jit`` and ``torch.compile``); the global sums go
through the step's reducer (complete under ``shard_map``); the scalars ``d``, ``d_max``, ``r`` are
0-D arrays in the widest float. ``optax.contrib.prodigy`` is the same algorithm with
``use_bias_correction=True``, ``decouple=True``, ``growth_rate=inf``, ``slice_p=1`` and ``b1 > 0``
(its ``estim_lr0``/``estim_lr_coef`` are ``d0``/``d_coef``); it always applies the bias correction,
while ``prodigyopt`` defaults to ``use_bias_correction=False``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_product_, add_scaled_, mul_donated, mul_for_sum
from adaptlr._precision import largest, scalar_caster, widest_float
from adaptlr._tree import Layout
from adaptlr.adam import step_size_bias_correction
from adaptlr.core import BaseDirection, Optimizer, Schedule, StepContext, StepSize, scalar_device

__all__ = ["ProdigyDirection", "ProdigyState", "prodigy"]


class ProdigyState(NamedTuple):
    """State of Prodigy.

    Attributes:
        mu: ``m``, the first moment (tree like the params; None where ``b1 = 0``).
        nu: ``v``, the second moment (tree like the params).
        s: the weighted gradient sum ``s`` (tree: each parameter's shape, or its flattened
            ``slice_p``-th elements where ``slice_p > 1``).
        p0: ``x_0``, the initial parameters (as ``s``).
        d: the current estimate ``d`` (0-D, widest float), used by the next step.
        d_max: the largest estimate ``d̂`` so far (at least ``d_0``).
        d_hat: the last estimate ``d̂`` (``d_0`` before the first step).
        numerator: ``r``, the weighted sum of ``⟨g, x_0 - θ⟩``.
        lr_scale: ``d·c_{t+1}``, the multiplier of ``α`` the next step applies (what
            :func:`adaptlr.learning_rates` reports).
    """

    mu: Any
    nu: Any
    s: Any
    p0: Any
    d: Any
    d_max: Any
    d_hat: Any
    numerator: Any
    lr_scale: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size.scaled_by(self.lr_scale)

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"d": self.d, "d_hat": self.d_hat, "d_max": self.d_max}


class ProdigyDirection(BaseDirection):
    """Prodigy's base (build it with :func:`prodigy`)."""

    name = "prodigy"
    state_class = ProdigyState

    def __init__(self, learning_rate: float | Schedule, b1: float, b2: float, beta3: float | None, eps: float,
                 weight_decay: float, decouple: bool, use_bias_correction: bool, safeguard_warmup: bool,
                 d0: float, d_coef: float, growth_rate: float, slice_p: int) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        if not callable(self.learning_rate) and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0 (Prodigy estimates d only while it is), got {learning_rate}")
        self.b1 = v.check_beta("b1", b1)
        self.b2 = v.check_beta("b2", b2)
        self.beta3 = math.sqrt(self.b2) if beta3 is None else v.check_beta("beta3", beta3)
        self.eps = v.check_positive("eps", eps)
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        self.decoupled = bool(decouple)
        self.use_bias_correction = bool(use_bias_correction)
        self.safeguard_warmup = bool(safeguard_warmup)
        self.d0 = v.check_positive("d0", d0)
        self.d_coef = v.check_positive("d_coef", d_coef)
        growth_rate = float(growth_rate)
        if not growth_rate >= 1.0:  # also NaN
            raise ValueError(f"growth_rate must be >= 1 (inf: unbounded), got {growth_rate}")
        self.growth_rate = growth_rate
        self.slice_p = v.check_positive_int("slice_p", slice_p)
        # Every sum is over the whole model, so the step is the same on one flat buffer (not on blocks);
        # the strided slices of a flat buffer are not those of each tensor.
        self.flat_safe, self.blockwise = self.slice_p == 1, False
        # sums through ctx.reduce.total, none depending on another: replayable over chunks
        # (adaptlr.backends.fast.sums_replayable); made first, so a part's first pass stops early
        self.replayable_sums = True

    def _sliced(self, xp: Any, x: Any) -> Any:
        """Every ``slice_p``-th element of ``x`` flattened (``x`` itself for ``slice_p = 1`` and for a
        0-D ``x``, whose one element is its slice: state shapes stay those of the parameter)."""
        return x if self.slice_p == 1 or x.ndim == 0 else xp.reshape(x, (-1,))[:: self.slice_p]

    def _bias_correction(self, t: Any) -> Any:
        return step_size_bias_correction(t, self.b1, self.b2, self.use_bias_correction)

    def init(self, params: list, layout: Layout, xp: Any) -> ProdigyState:
        device = scalar_device(params[0])
        wide = widest_float(xp, device)

        def scalar(value: float) -> Any:
            return xp.asarray(value, dtype=wide, device=device)

        zeros = [xp.zeros_like(p) for p in params]
        mu = layout.tree([xp.zeros_like(p) for p in params]) if self.b1 > 0 else None
        p0 = [xp.asarray(self._sliced(xp, p), copy=True) for p in params]
        s = [xp.zeros_like(x) for x in p0]
        first_scale = xp.asarray(self._bias_correction(scalar(1.0)) * self.d0)
        return ProdigyState(mu, layout.tree(zeros), layout.tree(s), layout.tree(p0), scalar(self.d0),
                            scalar(self.d0), scalar(self.d0), scalar(0.0), first_scale)

    def coefficients(self, xp: Any, d: Any, bias_correction: Any, alpha_max: Any) -> tuple:
        """``(d·a·c_t, s's weight, d·(1-β1), d²·(1-β2))`` from ``d``, ``c_t`` and ``a = max α`` (0-D, wide)."""
        dlr = d * alpha_max * bias_correction
        s_coef = (d / self.d0) * (d if self.safeguard_warmup else dlr)
        return dlr, s_coef, d * (1.0 - self.b1), d * d * (1.0 - self.b2)

    def estimate(self, xp: Any, t: Any, dot: Any, denominator: Any, d: Any, dlr: Any, bias_correction: Any,
                 d_max: Any, d_hat: Any, numerator: Any) -> tuple:
        """``(d⁺, d_max, d̂, r_t, κ_t = d·c_t, d⁺·c_{t+1})`` at step ``t`` from the step's sums
        ``⟨g, x_0 - θ⟩`` and ``Σ|s_t|`` (0-D, wide); nothing moves while ``Σ|s_t| = 0`` (no gradient yet)."""
        d0 = self.d0
        new_numerator = self.beta3 * numerator + (d / d0) * dlr * dot
        moved = denominator > 0
        new_d_hat = self.d_coef * new_numerator / xp.where(moved, denominator, xp.ones_like(denominator))
        d_new = xp.where(d == d0, xp.maximum(d, new_d_hat), d)
        new_d_max = xp.maximum(d_max, new_d_hat)
        d_new = xp.where(moved, xp.minimum(new_d_max, d_new * self.growth_rate), d)
        lr_scale = xp.asarray(d_new * self._bias_correction(t + 1.0))  # NumPy: 0-D array, not a scalar
        return (d_new, xp.where(moved, new_d_max, d_max), xp.where(moved, new_d_hat, d_hat),
                xp.asarray(xp.where(moved, new_numerator, numerator)),
                xp.where(moved, d * bias_correction, xp.zeros_like(d)), lr_scale)

    def step(self, ctx: StepContext, size: StepSize, state: ProdigyState) -> tuple[list, StepSize, ProdigyState]:
        xp, layout, scalars, reduce = ctx.xp, ctx.layout, ctx.scalars, ctx.reduce
        wide = scalars.wide
        b1, b2, beta3 = self.b1, self.b2, self.beta3
        grads, params = ctx.objective_grads, ctx.params
        d = state.d

        bias_correction = scalars.step_scalars("prodigy", wide, self._bias_correction)

        def coefficients(d: Any, bias_correction: Any, *alpha: Any) -> tuple:
            return self.coefficients(xp, d, bias_correction, largest(xp, alpha, wide))

        # (0-D work once per step, not once per block: Scalars.once)
        dlr, s_coef, m_coef, v_coef = scalars.once("prodigy", (d, bias_correction, *ctx.alpha), coefficients)
        cast = scalar_caster(xp, scalars)  # each wide scalar cast once per dtype this step

        # The numerator and denominator of d̂ first (the sums; their terms as generators, which a
        # part's second pass, given the whole sums, does not evaluate: adaptlr.backends.part_sums).
        p0s = layout.leaves(state.p0, "state.p0")
        dots = (mul_for_sum(p0 - self._sliced(xp, p), self._sliced(xp, g), wide, x_temporary=True)
                for g, p, p0 in zip(grads, params, p0s))
        dot = reduce.total(dots, wide)
        new_s = [add_scaled_(mul_donated(scalars, s, beta3), self._sliced(xp, g), cast("s", s_coef, g))
                 for g, s in zip(grads, layout.leaves(state.s, "state.s"))]
        denominator = reduce.total((xp.abs(s) for s in new_s), wide)

        # Moments with the current d.
        mus = layout.leaves(state.mu, "state.mu") if state.mu is not None else [None] * len(grads)
        new_mu, new_nu = [], []
        for g, m, nu in zip(grads, mus, layout.leaves(state.nu, "state.nu")):
            if m is not None:
                new_mu.append(add_scaled_(mul_donated(scalars, m, b1), g, cast("m", m_coef, g)))
            new_nu.append(add_product_(mul_donated(scalars, nu, b2), g, g, cast("v", v_coef, g)))

        # d̂ and the new d
        def estimate(*inputs: Any) -> tuple:
            return self.estimate(xp, scalars.t, *inputs)

        d_new, d_max, d_hat, numerator, kappa, lr_scale = scalars.once(
            "prodigy d", (dot, denominator, d, dlr, bias_correction, state.d_max, state.d_hat, state.numerator),
            estimate)

        directions = []
        for i, (g, nu) in enumerate(zip(grads, new_nu)):
            denom = add_(xp.sqrt(nu), cast("eps", d_new * self.eps, g))
            directions.append(new_mu[i] / denom if self.b1 > 0 else g * cast("d", d_new, g) / denom)

        new_state = ProdigyState(layout.tree(new_mu) if state.mu is not None else None, layout.tree(new_nu),
                                 layout.tree(new_s), state.p0, d_new, d_max, d_hat, numerator, lr_scale)
        size = size.scaled([cast("kappa", kappa, g) for g in grads], weight_decay_too=True)
        return directions, size, new_state


def prodigy(
    learning_rate: float | Schedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    beta3: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decouple: bool = True,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: float = 1e-6,
    d_coef: float = 1.0,
    growth_rate: float = math.inf,
    slice_p: int = 1,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """Prodigy (Mishchenko & Defazio, ICML 2024), as ``prodigyopt.Prodigy`` 1.1.2 with the same defaults.

    The learning rate is ``α·d·c_t``: ``α`` (usually 1, or a schedule with 1 as its peak) times the
    estimate ``d`` (module docstring); :func:`adaptlr.learning_rates` reports it and
    :func:`adaptlr.lr_summary` shows ``d``, ``d_hat`` and ``d_max``.

    Args:
        learning_rate: ``α`` > 0, or a schedule ``t ↦ α_t``.
        b1: ``β1`` in [0, 1) (``prodigyopt``'s ``betas[0]``).
        b2: ``β2`` in [0, 1) (``prodigyopt``'s ``betas[1]``).
        beta3: ``β3`` in [0, 1) for the estimate's sums (None: ``sqrt(β2)``).
        eps: ``ε`` > 0, added to ``sqrt(v)`` times ``d``.
        weight_decay: ``λ`` >= 0.
        decouple: True: AdamW-style decay ``-α·d·c_t·λ·θ``; False: coupled L2 (``g ← g + λθ``).
        use_bias_correction: multiply the step by Adam's ``c_t = sqrt(1-β2^t)/(1-β1^t)``.
        safeguard_warmup: leave ``α`` out of the denominator's weights (for warm-up schedules).
        d0: the initial estimate ``d_0`` > 0.
        d_coef: ``d̂`` is multiplied by this (> 0).
        growth_rate: ``d`` grows at most by this factor per step (>= 1; inf: unbounded).
        slice_p: estimate ``d`` from every ``slice_p``-th element of each tensor (>= 1; saves memory).
        state_dtype: the dtype of the moments and of the step's arithmetic (None: each parameter's).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.prodigy()
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> for _ in range(3):                                      # f = ‖w‖²/2
        ...     updates, state = opt.update(params, state, params)
        ...     params = adaptlr.apply_updates(params, updates)
        >>> float(state.base.d) > 1e-6   # d_0 = 1e-6; the first step moves x away from x_0, then d grows
        True
    """
    base = ProdigyDirection(learning_rate, b1, b2, beta3, eps, weight_decay, decouple, use_bias_correction,
                            safeguard_warmup, d0, d_coef, growth_rate, slice_p)
    return Optimizer(base, state_dtype=state_dtype)
