"""D-Adaptation: Adam and SGD with the learning rate estimated from a lower bound on ‖x_0 - x*‖ (issue 18).

Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation", ICML 2023 (arXiv:2301.07733);
oracles ``dadaptation.DAdaptAdam`` and ``DAdaptSGD`` 3.2 (``facebookresearch/dadaptation``).

**D-Adapt Adam**, with ``d`` the estimate (``d_0`` at the start), ``c_t`` the bias correction,
``a = max α`` and ``β̃ = sqrt(β2)``::

    g ← g_t + λ·θ_{t-1}                                          (decouple=False: coupled decay)
    c_t = sqrt(1-β2^t) / (1-β1^t)   (use_bias_correction; else 1)      η = d·a·c_t
    r_t = β̃·r_{t-1} + (1-β̃)·η·⟨g, s_{t-1} / (sqrt(v_{t-1}) + ε)⟩  (global sum over every tensor)
    m_t = β1·m_{t-1} + η·(1-β1)·g
    v_t = β2·v_{t-1} + (1-β2)·g²
    s_t = β̃·s_{t-1} + η·(1-β̃)·g
    d⁺ = max(d, min(r_t / ((1-β̃)·Σ|s_t|), d·growth_rate))
    u_t = -m_t / (sqrt(v_t) + ε)  -  η·λ·θ_{t-1}                 (decouple=True: decoupled decay)

**D-Adapt SGD**, with ``μ`` the momentum and ``‖g_1‖`` the norm of the first raw gradient::

    g ← g_t + λ·θ_{t-1}
    η = d·a / ‖g_1‖
    r_t = r_{t-1} + η·⟨g, s_{t-1}⟩;    s_t = s_{t-1} + η·g
    d⁺ = max(d, min(2·r_t / ‖s_t‖, d·growth_rate))
    θ_t = μ·θ_{t-1} + (1-μ)·(x_0 - s_t)

D-Adapt SGD's ``‖s_t‖`` is summed from terms that no other sum of the step scales: at the step
where ``‖g_1‖`` becomes known, every earlier step added ``0·g`` to ``s``, so ``s_{t-1} = 0`` and
``‖s_t‖² = η²·‖g‖²``; at the others ``η`` comes from the state. The step therefore runs over parts
of the model in two passes (:mod:`adaptlr.backends.part_sums`), as the other bases do.

A step where ``Σ|s_t|`` (``‖s_t‖``) is 0 (every gradient so far zero) leaves the parameters, ``d``
and ``r`` as they are, as upstream. Here the learning rate ``α`` is inside the moments (``m`` and
``s`` accumulate ``η·g``), so the base returns the whole update as its direction and sets the step's
``α`` to 1 (:meth:`adaptlr.core.BaseDirection.step`); decoupled weight decay is scaled by ``d·c_t``
(``-α·λ·d·c_t·θ``). :func:`adaptlr.learning_rates` reports ``η`` of the next step (``α·d·c_{t+1}``,
``α·d/‖g_1‖``), the rate at which a new gradient enters the update.

Differences from upstream: no ``.item()`` or host-side branching (``where`` on 0-D arrays), sums
through the step's reducer (complete under ``shard_map``); the step counter of the bias correction
also counts a skipped all-zero-gradient step (upstream's ``k`` does not). ``optax.contrib.dadapt_adamw``
is D-Adapt Adam with ``use_bias_correction=True``, ``decouple=True``, ``growth_rate=inf``; it always
applies both, while ``DAdaptAdam`` defaults to neither. ``DAdaptSGD`` takes ``‖g_1‖`` of the gradient
without weight decay (its ``grad.add`` is not in place); adaptlr does the same.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_donated, add_product_, add_scaled_, mul_, mul_donated, mul_for_sum
from adaptlr._ordering import wait_for
from adaptlr._precision import cast_like, largest, scalar_caster, widest_float
from adaptlr._tree import Layout
from adaptlr.adam import step_size_bias_correction
from adaptlr.core import BaseDirection, Optimizer, Schedule, StepContext, StepSize, scalar_device

__all__ = ["DAdaptAdamDirection", "DAdaptAdamState", "DAdaptSGDDirection", "DAdaptSGDState", "dadapt_adam",
           "dadapt_sgd"]


def _scale(size: StepSize, lr_scale: Any) -> StepSize:
    return size.scaled_by(lr_scale)


class DAdaptAdamState(NamedTuple):
    """State of D-Adapt Adam: ``mu`` (``m``), ``nu`` (``v``), ``s`` (trees like the params); ``d``,
    ``numerator`` (``r``) and ``lr_scale`` (``d·c_{t+1}``, what :func:`adaptlr.learning_rates`
    multiplies ``α`` by), 0-D in the widest float."""

    mu: Any
    nu: Any
    s: Any
    d: Any
    numerator: Any
    lr_scale: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return _scale(size, self.lr_scale)

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"d": self.d}


class DAdaptSGDState(NamedTuple):
    """State of D-Adapt SGD: ``s`` and ``x0`` (trees like the params); ``d``, ``numerator`` (``r``),
    ``g0_norm`` (``‖g_1‖``, 0 until the first nonzero gradient) and ``lr_scale`` (``d/‖g_1‖``), 0-D in the
    widest float."""

    s: Any
    x0: Any
    d: Any
    numerator: Any
    g0_norm: Any
    lr_scale: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return _scale(size, self.lr_scale)

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"d": self.d}


class _DAdaptDirection(BaseDirection):
    """What D-Adapt Adam and SGD share: α > 0, λ >= 0, ``d0`` > 0, ``growth_rate`` >= 1."""

    flat_safe, blockwise = True, False  # global sums: the same on one flat buffer, not on blocks
    # sums through ctx.reduce.total, none depending on another: replayable over chunks and blocks
    # (adaptlr.backends.fast.sums_replayable); made first, so a part's first pass stops early
    replayable_sums = True

    def __init__(self, learning_rate: Any, weight_decay: float, d0: float, growth_rate: float) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        if not callable(self.learning_rate) and self.learning_rate <= 0:
            raise ValueError(
                f"learning_rate must be > 0 (D-Adaptation estimates d only while it is), got {learning_rate}")
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        self.d0 = v.check_positive("d0", d0)
        growth_rate = float(growth_rate)
        if not growth_rate >= 1.0:  # also NaN
            raise ValueError(f"growth_rate must be >= 1 (inf: unbounded), got {growth_rate}")
        self.growth_rate = growth_rate


def _unit_scales(xp: Any, moved: Any, decay_scale: Any) -> tuple[Any, Any]:
    """``α`` = 1 (0 where nothing moved) and the decoupled decay's ``decay_scale`` (0 where nothing
    moved), in the widest float: the step size of a base whose direction is the whole update."""
    one = xp.where(moved, xp.ones_like(decay_scale), xp.zeros_like(decay_scale))
    return one, xp.where(moved, decay_scale, xp.zeros_like(decay_scale))


def _unit_size(xp: Any, scalars: Any, size: StepSize, one: Any, decay: Any, like: list) -> StepSize:
    """``size`` with ``α`` = ``one`` and the decay's multiplier ``decay`` (:func:`_unit_scales`), each cast
    to the leaves' dtypes (once per step for the same 0-D values: ``Scalars.once``)."""
    return size._replace(alpha=tuple(cast_like(xp, one, like, scalars, "unit alpha")),
                         decay_kappa=tuple(cast_like(xp, decay, like, scalars, "unit decay")))


class DAdaptAdamDirection(_DAdaptDirection):
    """D-Adapt Adam's base (build it with :func:`dadapt_adam`)."""

    state_class = DAdaptAdamState

    def __init__(self, learning_rate: float | Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                 decouple: bool, use_bias_correction: bool, d0: float, growth_rate: float) -> None:
        super().__init__(learning_rate, weight_decay, d0, growth_rate)
        self.b1 = v.check_beta("b1", b1)
        self.b2 = v.check_beta("b2", b2)
        self.eps = v.check_positive("eps", eps)
        self.decoupled = bool(decouple)
        self.use_bias_correction = bool(use_bias_correction)
        self.name = "dadapt_adamw" if self.decoupled else "dadapt_adam"

    def _bias_correction(self, t: Any) -> Any:
        return step_size_bias_correction(t, self.b1, self.b2, self.use_bias_correction)

    def init(self, params: list, layout: Layout, xp: Any) -> DAdaptAdamState:
        device = scalar_device(params[0])
        wide = widest_float(xp, device)

        def zeros() -> Any:
            return layout.tree([xp.zeros_like(p) for p in params])

        d0 = xp.asarray(self.d0, dtype=wide, device=device)
        return DAdaptAdamState(zeros(), zeros(), zeros(), d0, xp.zeros_like(d0),
                               xp.asarray(d0 * self._bias_correction(xp.ones_like(d0))))

    def coefficients(self, d: Any, bias_correction: Any, alpha_max: Any) -> tuple:
        """``(η = d·a·c_t, η·(1-β1), η·(1-β̃))`` from ``d``, ``c_t`` and ``a = max α`` (0-D, wide)."""
        dlr = d * alpha_max * bias_correction
        return dlr, dlr * (1.0 - self.b1), dlr * (1.0 - math.sqrt(self.b2))

    def estimate(self, xp: Any, t: Any, dot: Any, s_l1: Any, d: Any, dlr: Any, bias_correction: Any,
                 numerator: Any) -> tuple:
        """``(d⁺, r_t, d⁺·c_{t+1}, the step's α (1, or 0 where nothing moved), the decay's d·c_t)`` at
        step ``t`` from the step's sums ``⟨g, s/(sqrt(v)+ε)⟩`` and ``Σ|s_t|`` (0-D, wide)."""
        sqrt_b2 = math.sqrt(self.b2)
        new_numerator = sqrt_b2 * numerator + (1.0 - sqrt_b2) * (dlr * dot)
        moved = s_l1 > 0
        d_hat = new_numerator / ((1.0 - sqrt_b2) * xp.where(moved, s_l1, xp.ones_like(s_l1)))
        d_new = xp.where(moved, xp.maximum(d, xp.minimum(d_hat, d * self.growth_rate)), d)
        one, decay = _unit_scales(xp, moved, d * bias_correction)
        return (d_new, xp.asarray(xp.where(moved, new_numerator, numerator)),
                xp.asarray(d_new * self._bias_correction(t + 1.0)), one, decay)

    def step(self, ctx: StepContext, size: StepSize, state: DAdaptAdamState
             ) -> tuple[list, StepSize, DAdaptAdamState]:
        xp, layout, scalars, reduce = ctx.xp, ctx.layout, ctx.scalars, ctx.reduce
        wide, b1, b2, eps = scalars.wide, self.b1, self.b2, self.eps
        sqrt_b2 = math.sqrt(b2)
        grads, d = ctx.objective_grads, state.d

        bias_correction = scalars.step_scalars("dadapt_adam", wide, self._bias_correction)

        def coefficients(d: Any, bias_correction: Any, *alpha: Any) -> tuple:
            return self.coefficients(d, bias_correction, largest(xp, alpha, wide))

        # (0-D work once per step, not once per block: Scalars.once)
        dlr, m_coef, s_coef = scalars.once("dadapt_adam", (d, bias_correction, *ctx.alpha), coefficients)
        cast = scalar_caster(xp, scalars)  # each wide scalar cast once per dtype this step

        # The sums first (their terms as generators, which a part's second pass, given the whole
        # sums, does not evaluate: adaptlr.backends.part_sums), then the moments.
        old_s, old_nu = layout.leaves(state.s, "state.s"), layout.leaves(state.nu, "state.nu")
        terms = (mul_for_sum(s / add_(xp.sqrt(nu), eps), g, wide, x_temporary=True)  # previous s and v
                 for g, s, nu in zip(grads, old_s, old_nu))
        dot = reduce.total(terms, wide)
        grads = wait_for(xp, grads, (dot,))  # the old s and v read before they are overwritten (under jit)
        ss = [add_scaled_(mul_donated(scalars, s, sqrt_b2), g, cast("s", s_coef, g)) for g, s in zip(grads, old_s)]
        s_l1 = reduce.total((xp.abs(s) for s in ss), wide)
        mus = [add_scaled_(mul_donated(scalars, m, b1), g, cast("m", m_coef, g))
               for g, m in zip(grads, layout.leaves(state.mu, "state.mu"))]
        nus = [add_product_(mul_donated(scalars, nu, b2), g, g, 1.0 - b2) for g, nu in zip(grads, old_nu)]

        def estimate(*inputs: Any) -> tuple:
            return self.estimate(xp, scalars.t, *inputs)

        d_new, numerator, lr_scale, one, decay = scalars.once(
            "dadapt_adam d", (dot, s_l1, d, dlr, bias_correction, state.numerator), estimate)
        directions = [m / add_(xp.sqrt(nu), eps) for m, nu in zip(mus, nus)]
        size = _unit_size(xp, scalars, size, one, decay, grads)
        new_state = DAdaptAdamState(layout.tree(mus), layout.tree(nus), layout.tree(ss), d_new, numerator, lr_scale)
        return directions, size, new_state


class DAdaptSGDDirection(_DAdaptDirection):
    """D-Adapt SGD's base (build it with :func:`dadapt_sgd`)."""

    name = "dadapt_sgd"
    state_class = DAdaptSGDState
    decoupled = False

    def __init__(self, learning_rate: float | Schedule, momentum: float, weight_decay: float, d0: float,
                 growth_rate: float) -> None:
        super().__init__(learning_rate, weight_decay, d0, growth_rate)
        self.momentum = v.check_beta("momentum", momentum)

    def init(self, params: list, layout: Layout, xp: Any) -> DAdaptSGDState:
        device = scalar_device(params[0])
        d0 = xp.asarray(self.d0, dtype=widest_float(xp, device), device=device)
        zero = xp.zeros_like(d0)
        return DAdaptSGDState(layout.tree([xp.zeros_like(p) for p in params]),
                              layout.tree([xp.asarray(p, copy=True) for p in params]), d0, zero, zero, zero)

    @staticmethod
    def _per_norm(xp: Any, g0_norm: Any, value: Any) -> Any:
        """``value / ‖g_1‖`` (0 while ``‖g_1‖`` is 0)."""
        known = g0_norm > 0
        return xp.where(known, value / xp.where(known, g0_norm, xp.ones_like(g0_norm)), xp.zeros_like(value))

    def rate_before(self, xp: Any, d: Any, g0_norm: Any, alpha_max: Any) -> Any:
        """``η = d·a/‖g_1‖`` of a ``‖g_1‖`` known before this step (``a = max α``); 1 if none (then
        ``s_{t-1} = 0``: :meth:`step`)."""
        return xp.where(g0_norm > 0, self._per_norm(xp, g0_norm, d * alpha_max), xp.ones_like(d))

    def estimate(self, xp: Any, raw_sq: Any, dot: Any, s_sq_before: Any, d: Any, g0_before: Any, numerator: Any,
                 alpha_max: Any) -> tuple:
        """``(η, d⁺, r_t, ‖g_1‖, d⁺/‖g_1‖, the step's α (1, or 0 where nothing moved), 0)`` from the
        step's sums ``‖g‖²`` (raw), ``⟨g, s_{t-1}⟩`` and ``Σ(s_{t-1} + η_before·g)²`` (0-D, wide)."""
        g0_norm = xp.where(g0_before > 0, g0_before, xp.sqrt(raw_sq))
        dlr = self._per_norm(xp, g0_norm, d * alpha_max)
        new_numerator = numerator + dlr * dot
        # ‖g_1‖ known from this step on: every earlier step added 0·g to s (η = 0), so s_{t-1} = 0
        # and Σ s_t² = η²·Σ g² (the sum's terms were g²); otherwise η is the one its terms used.
        s_sq = xp.where(g0_before > 0, s_sq_before, dlr * dlr * s_sq_before)
        moved = s_sq > 0
        d_hat = 2.0 * new_numerator / xp.sqrt(xp.where(moved, s_sq, xp.ones_like(s_sq)))
        d_new = xp.where(moved, xp.maximum(d, xp.minimum(d_hat, d * self.growth_rate)), d)
        one, decay = _unit_scales(xp, moved, xp.zeros_like(d))
        return (dlr, d_new, xp.asarray(xp.where(moved, new_numerator, numerator)), g0_norm,
                xp.asarray(self._per_norm(xp, g0_norm, d_new)), one, decay)

    def step(self, ctx: StepContext, size: StepSize, state: DAdaptSGDState) -> tuple[list, StepSize, DAdaptSGDState]:
        xp, layout, scalars, reduce = ctx.xp, ctx.layout, ctx.scalars, ctx.reduce
        wide, mu = scalars.wide, self.momentum
        grads, params = ctx.objective_grads, ctx.params
        old_ss = layout.leaves(state.s, "state.s")
        cast = scalar_caster(xp, scalars)  # each wide scalar cast once per dtype this step

        # The sums first, each from the step's inputs and the state only (none from another sum of the
        # step), so the step runs over parts in two passes (adaptlr.backends.part_sums); generators,
        # which a part's second pass, given the whole sums, does not evaluate.
        # ‖g_t‖² of the raw gradient (DAdaptSGD's decay there is not in place): ‖g_1‖ once nonzero
        # (upstream divides by zero after an all-zero first gradient; here nothing moves until then).
        raw_sq = reduce.total((mul_for_sum(g, g, wide) for g in ctx.grads), wide)
        dot = reduce.total((mul_for_sum(g, s, wide) for g, s in zip(grads, old_ss)), wide)

        def rate_before(d: Any, g0_norm: Any, *alpha: Any) -> Any:
            return self.rate_before(xp, d, g0_norm, largest(xp, alpha, wide))

        # Σ (s_{t-1} + η·g)² with the η of a ‖g_1‖ known before this step, else Σ g² (of g + λθ:
        # every earlier step added 0·g to s, so s_{t-1} = 0 and the terms are (0 + 1·g)² = g², the
        # same numbers): one sum for both, from the step's inputs and the state only
        rate_or_one = scalars.once("dadapt_sgd rate before", (state.d, state.g0_norm, *ctx.alpha), rate_before)
        s_ts = (add_(g * cast("s before", rate_or_one, g), s) for g, s in zip(grads, old_ss))
        s_sq_before = reduce.total((mul_for_sum(s_t, s_t, wide, x_temporary=True) for s_t in s_ts), wide)

        def estimate(raw_sq: Any, dot: Any, s_sq_before: Any, d: Any, g0_before: Any,
                     numerator: Any, *alpha: Any) -> tuple:
            return self.estimate(xp, raw_sq, dot, s_sq_before, d, g0_before, numerator, largest(xp, alpha, wide))

        # (0-D work once per step, not once per block: Scalars.once)
        dlr, d_new, numerator, g0_norm, lr_scale, one, decay = scalars.once(
            "dadapt_sgd d", (raw_sq, dot, s_sq_before, state.d, state.g0_norm, state.numerator, *ctx.alpha),
            estimate)
        grads = wait_for(xp, grads, (dot, s_sq_before))  # the old s read before it is overwritten (under jit)
        ss = [add_donated(scalars, s, g * cast("s", dlr, g)) for g, s in zip(grads, old_ss)]

        # θ_t = μ·θ + (1-μ)·(x_0 - s): the direction is θ - θ_t, taken with α = 1.
        directions = []
        for p, x0, s in zip(params, layout.leaves(state.x0, "state.x0"), ss):
            new = add_(p * (1.0 - (1.0 - mu)), mul_(x0 - s, 1.0 - mu)) if mu else x0 - s
            directions.append(p - new)
        size = _unit_size(xp, scalars, size, one, decay, grads)
        new_state = DAdaptSGDState(layout.tree(ss), state.x0, d_new, numerator, g0_norm, lr_scale)
        return directions, size, new_state


def dadapt_adam(
    learning_rate: float | Schedule = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decouple: bool = False,
    use_bias_correction: bool = False,
    d0: float = 1e-6,
    growth_rate: float = math.inf,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """D-Adapt Adam (Defazio & Mishchenko, ICML 2023), as ``dadaptation.DAdaptAdam`` 3.2 with its defaults.

    Args:
        learning_rate: ``α`` > 0 (1, or a schedule with 1 as its peak).
        b1: ``β1`` in [0, 1) (``DAdaptAdam``'s ``betas[0]``).
        b2: ``β2`` in [0, 1) (``DAdaptAdam``'s ``betas[1]``).
        eps: ``ε`` > 0 added to ``sqrt(v)``.
        weight_decay: ``λ`` >= 0.
        decouple: True: AdamW-style decay ``-α·d·c_t·λ·θ``; False: coupled L2 (``g ← g + λθ``).
        use_bias_correction: multiply ``η`` by Adam's ``c_t = sqrt(1-β2^t)/(1-β1^t)``.
        d0: the initial estimate ``d_0`` > 0.
        growth_rate: ``d`` grows at most by this factor per step (>= 1; inf: unbounded).
        state_dtype: the dtype of the moments and of the step's arithmetic (None: each parameter's).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(DAdaptAdamDirection(learning_rate, b1, b2, eps, weight_decay, decouple, use_bias_correction,
                                         d0, growth_rate), state_dtype=state_dtype)


def dadapt_sgd(
    learning_rate: float | Schedule = 1.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    d0: float = 1e-6,
    growth_rate: float = math.inf,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """D-Adapt SGD (Defazio & Mishchenko, ICML 2023), as ``dadaptation.DAdaptSGD`` 3.2 with its defaults.

    Args:
        learning_rate: ``α`` > 0 (1, or a schedule with 1 as its peak).
        momentum: ``μ`` in [0, 1), the weight of the previous iterate (primal averaging).
        weight_decay: ``λ`` >= 0, coupled L2 (``g ← g + λθ``).
        d0: the initial estimate ``d_0`` > 0.
        growth_rate: ``d`` grows at most by this factor per step (>= 1; inf: unbounded).
        state_dtype: the dtype of ``s`` and ``x_0`` and of the step's arithmetic (None: each parameter's).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(DAdaptSGDDirection(learning_rate, momentum, weight_decay, d0, growth_rate),
                     state_dtype=state_dtype)
