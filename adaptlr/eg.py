"""EG: step-size adaptation with exponentiated-gradient updates (spec §6).

A step-size scale ``s`` (one number for the model, or one per tensor) and a per-element gain ``p``
are both updated multiplicatively from how the new gradient aligns with the past (spec §6):

    p_t = p_{t-1} ⊙ exp(clip(γ_p · m_{t-1} ⊙ g_t))          m = EMA of past gradients
    s_t = s_{t-1} · exp(clip(γ_s · ⟨v_{t-1}, g_t⟩))          ⟨·,·⟩ over every tensor ("global")
                                                             or over each tensor ("tensor")
    v_t = α·κ_in · p_t ⊙ d_t                                 the unscaled step (d: base direction)
    u_t = -s_t · v_t   (+ decoupled decay)                   κ = κ_in · s_t · p_t
    m_t = β·m_{t-1} + (1-β)·g_t                              (after it was used)

``clip`` bounds each exponent to ``±max_log_step`` (an adaptlr extension; ``None`` disables it), so
each factor changes by at most ``e^max_log_step`` per step. ``κ_in`` is the multiplier of the
adaptations EG wraps (1 around a plain base). ``g_t`` is the gradient of what the base minimises:
the raw gradient plus ``λθ`` when the base uses coupled (L2) weight decay, as in HD (§4); the two
agree without coupled decay. ``⟨v, g⟩`` over every tensor is accumulated in float64 where the
backend has it. State: ``s = 1``, ``p = 1``, ``m = 0``, ``v = 0``, so nothing moves at ``t = 1``.

Paper: Amid, Anil, Fifty, Warmuth, "Step-size Adaptation Using Exponentiated Gradient Updates"
(2022). No public code exists; the equations follow a published summary of the paper (SGDM form),
see ``docs/algorithms/eg.md`` for what is known and what is our choice.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import clip_, ema_donated, exp_, mul_, mul_donated, mul_for_sum, mul_into_donated
from adaptlr._ordering import after_first_element
from adaptlr._precision import widest_float
from adaptlr._reduce import Term
from adaptlr._tree import Layout
from adaptlr.core import Adaptation, Optimizer, StepContext, StepSize, scalar_device

__all__ = ["EGState", "EGStepSize", "eg_step_size"]

SCALES = ("global", "tensor")


class EGState(NamedTuple):
    """State of :func:`eg_step_size`.

    Attributes:
        scale: ``s``: a 0-D array (``scale="global"``, float64 where the backend has it, else the
            widest parameter dtype) or a tree shaped like the params of 0-D arrays (``"tensor"``).
        gain: ``p`` per element, a tree shaped like the params.
        grad_ema: ``m``, the exponential moving average of past gradients, shaped like the params.
        prev_step: ``v``, the previous unscaled step ``α·κ_in·p ⊙ d``, shaped like the params.
    """

    scale: Any
    gain: Any
    grad_ema: Any
    prev_step: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        """``size`` times ``s·p``: the learning rate the last step used (spec §0.1)."""
        return size.scaled(_factors(self, layout))

    def signals(self, layout: Layout) -> dict[str, Any]:
        """``{"scale": s, "gain": p}`` (``s``: a 0-D array or a tree of 0-D arrays)."""
        return {"scale": self.scale, "gain": self.gain}


def _factors(state: EGState, layout: Layout) -> list:
    """``s·p`` per leaf, in each leaf's dtype."""
    gains = layout.leaves(state.gain, "state.gain")
    if hasattr(state.scale, "dtype"):  # one global scale
        scales = [state.scale] * len(gains)
    else:
        scales = layout.leaves(state.scale, "state.scale")
    xp = v.namespace_of(gains[0])
    return [xp.astype(s, p.dtype) * p for s, p in zip(scales, gains, strict=True)]


class EGStepSize(Adaptation):
    """The EG adaptation (spec §6); build it with :func:`eg_step_size`."""

    name = "eg"
    state_class = EGState
    # sums through ctx.reduce.total, none depending on another: replayable over chunks
    # (adaptlr.backends.fast.sums_replayable)
    replayable_sums = True
    # ... and all in before_direction, from the step's inputs (adaptlr.backends.fast.sums_cheaply)
    sums_before_direction = True

    def __init__(
        self,
        scale_lr: float,
        gain_lr: float,
        gain_decay: float,
        scale: str,
        max_log_step: float | None,
        scale_weight_decay: bool,
    ) -> None:
        self.scale_lr = v.check_nonnegative("scale_lr", scale_lr)
        self.gain_lr = v.check_nonnegative("gain_lr", gain_lr)
        self.gain_decay = v.check_beta("gain_decay", gain_decay)
        self.scale = v.check_choice("scale", scale, SCALES)
        self.max_log_step = None if max_log_step is None else v.check_positive("max_log_step", max_log_step)
        if not isinstance(scale_weight_decay, bool):
            raise TypeError(f"scale_weight_decay must be a bool, got {type(scale_weight_decay).__name__}")
        self.scale_weight_decay = scale_weight_decay

    def row_block_temporaries(self, ndim: int) -> int:
        # EG per tensor (AdamW) keeps 2.03 blocks alive: two and its row-sized sums
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 3

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> EGState:
        device = scalar_device(params[0])
        if self.scale == "global":
            scale = xp.asarray(1.0, dtype=widest_float(xp, device), device=device)
        else:
            scale = layout.tree([xp.asarray(1.0, dtype=p.dtype, device=device) for p in params])
        return EGState(
            scale=scale,
            gain=layout.tree([xp.ones_like(p) for p in params]),
            grad_ema=layout.tree([xp.zeros_like(p) for p in params]),
            prev_step=layout.tree([xp.zeros_like(p) for p in params]),
        )

    def before_direction(self, ctx: StepContext, state: EGState) -> EGState:
        """``s_t`` from ``s_{t-1}``, ``v_{t-1}`` and the gradient: the sums read nothing else."""
        xp, layout, scalars = ctx.xp, ctx.layout, ctx.scalars
        grads = ctx.objective_grads
        prev_steps = layout.leaves(state.prev_step, "state.prev_step")
        # s_t = s_{t-1} · exp(clip(γ_s · ⟨v_{t-1}, g_t⟩))
        if self.scale == "global":
            acc = state.scale.dtype
            products = (mul_for_sum(pv, g, acc) for pv, g in zip(prev_steps, grads, strict=True))
            alignment = ctx.reduce.total(products, acc)

            def rescaled(scale: Any, alignment: Any) -> Any:
                return scale * xp.exp(self._clip(ctx, scalars.constant(self.scale_lr, acc) * alignment))

            # (once per step, not once per block: Scalars.once; another EG has another s)
            return state._replace(scale=scalars.once(("eg scale", id(self)), (state.scale, alignment), rescaled))
        wide_lr = scalars.constant(self.scale_lr, scalars.wide)  # ⟨v, g⟩ and exp in the widest float
        # (terms made where a sum reads them: a row block's second pass does not)
        scales = [
            s * xp.astype(xp.exp(self._clip(ctx, wide_lr * ctx.reduce.leaf_sum(
                i, Term(operator.mul, (pv, g), g.ndim), dtype=scalars.wide))), s.dtype)
            for i, (s, pv, g) in enumerate(zip(layout.leaves(state.scale, "state.scale"), prev_steps, grads,
                                               strict=True))
        ]
        return state._replace(scale=layout.tree(scales))

    def step(self, ctx: StepContext, size: StepSize, state: EGState) -> tuple[StepSize, EGState]:
        xp, layout, scalars = ctx.xp, ctx.layout, ctx.scalars
        grads = ctx.objective_grads
        gains = layout.leaves(state.gain, "state.gain")
        grad_emas = layout.leaves(state.grad_ema, "state.grad_ema")

        # p_t = p_{t-1} ⊙ exp(clip(γ_p · m_{t-1} ⊙ g_t))
        gains = [
            mul_donated(scalars, p, exp_(xp, self._clip(ctx, mul_(scalars.constant(self.gain_lr, g.dtype) * m, g),
                                                        temporary=True)),
                        b_temporary=True)
            for p, m, g in zip(gains, grad_emas, grads, strict=True)
        ]

        # s_t (before_direction), in each gradient's dtype
        if self.scale == "global":
            # s and -s in each gradient's dtype, once per step for this s (another EG has its own)
            def in_dtype(s: Any, dt: Any) -> tuple:
                return xp.astype(s, dt), -xp.astype(s, dt)

            by_dtype = {dt: scalars.once(("eg s", id(self), dt), (state.scale,), lambda s, dt=dt: in_dtype(s, dt))
                        for dt in {g.dtype for g in grads}}
            scales = [by_dtype[g.dtype][0] for g in grads]
            negated = [by_dtype[g.dtype][1] for g in grads]
        else:
            scales = layout.leaves(state.scale, "state.scale")
            negated = [-s for s in scales]

        # v_t = α·κ_in · p_t ⊙ d_t (into v_{t-1}'s array where the executor donated it: the sum that
        # read v_{t-1} was made in before_direction)
        prev_steps = [mul_(mul_into_donated(scalars, v, a, p), d) for v, a, p, d in
                      zip(layout.leaves(state.prev_step, "state.prev_step"), size.effective(), gains,
                          ctx.directions, strict=True)]

        # m_t = β·m_{t-1} + (1-β)·g_t (Python floats: weak scalars, the arrays' dtype; torch's lerp),
        # after the gains read m_{t-1}: under jax.jit nothing else orders the two, and with the state
        # donated XLA copied m_{t-1} to write m_t in its place (adaptlr._ordering; round 23)
        beta = self.gain_decay
        grad_emas = [ema_donated(scalars, m, after_first_element(xp, g, p), beta, 1.0 - beta)
                     for m, g, p in zip(grad_emas, grads, gains, strict=True)]

        new_state = EGState(state.scale, layout.tree(gains), layout.tree(grad_emas), layout.tree(prev_steps))
        # s (0-D) and p apart: α·s is multiplied first, then p once (not s·p, then α·(s·p)); the
        # step -α·κ_in·s·p ⊙ d is v_t·(-s), one pass, handed to the update (StepSize.with_step)
        size = size.scaled(scales, weight_decay_too=self.scale_weight_decay)
        size = size.scaled(gains, weight_decay_too=self.scale_weight_decay)
        return size.with_step([v * s for v, s in zip(prev_steps, negated, strict=True)]), new_state

    def _clip(self, ctx: StepContext, exponent: Any, *, temporary: bool = False) -> Any:
        """``exponent`` bounded to ``±max_log_step`` (unchanged when that is None); written into it
        where it is a temporary of the step (``temporary``: :func:`adaptlr._inplace.clip_`)."""
        if self.max_log_step is None:
            return exponent
        # one pass (xp.maximum then xp.minimum is two); Python-float bounds keep the exponent's dtype
        if temporary:
            return clip_(ctx.xp, exponent, -self.max_log_step, self.max_log_step)
        return ctx.xp.clip(exponent, -self.max_log_step, self.max_log_step)


def eg_step_size(
    opt: Optimizer,
    scale_lr: float,
    gain_lr: float,
    gain_decay: float = 0.9,
    scale: str = "global",
    max_log_step: float | None = 1.0,
    scale_weight_decay: bool = False,
) -> Optimizer:
    """Wrap ``opt`` with exponentiated-gradient step-size adaptation (Amid et al. 2022; spec §6).

    The learning rate becomes ``α·s·p``: a scale ``s`` that grows while successive steps point the
    same way as the new gradient (``⟨v_{t-1}, g_t⟩ > 0``) and shrinks when they oppose it, and a gain
    ``p`` per element that does the same from the average of past gradients. Both change by
    ``exp(·)`` factors, so they stay positive. With an SGD-with-momentum base the gains multiply the
    momentum direction (the paper's summary applies them before the momentum; identical at μ = 0).

    Example::

        opt = adaptlr.eg_step_size(adaptlr.sgd(0.1, momentum=0.9), scale_lr=1e-2, gain_lr=1e-2)

    Args:
        opt: the adaptlr optimizer to wrap (any base, possibly already wrapped).
        scale_lr: ``γ_s`` >= 0, the learning rate of ``log s`` (0 keeps ``s = 1``).
        gain_lr: ``γ_p`` >= 0, the learning rate of ``log p`` (0 keeps ``p = 1``).
        gain_decay: ``β`` in [0, 1), the decay of the gradient average ``m`` used by the gains.
        scale: ``"global"`` (one ``s`` for the whole model, ``⟨v, g⟩`` summed over every tensor) or
            ``"tensor"`` (one ``s`` per parameter tensor).
        max_log_step: clip each exponent to ``±max_log_step`` (> 0), so ``s`` and each gain change by
            at most a factor ``e^max_log_step`` per step; ``None`` disables the clip (the paper's
            rule; ``exp`` may then overflow on badly scaled problems).
        scale_weight_decay: multiply the decoupled weight decay by ``s·p`` too.

    Returns:
        the wrapped optimizer; its state's ``adaptations[-1]`` is an :class:`EGState`.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (for example adaptlr.sgd(0.1)), got {type(opt).__name__}")
    return opt.wrapped(EGStepSize(scale_lr, gain_lr, gain_decay, scale, max_log_step, scale_weight_decay))
