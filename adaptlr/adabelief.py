"""AdaBelief (spec §1; oracle ``adabelief-pytorch`` 0.2.1 ``AdaBelief``). Zhuang et al., NeurIPS 2020.

    g ← g_t + λ·θ_{t-1}                           (unless decoupled_weight_decay)
    m_t = β1·m_{t-1} + (1-β1)·g
    s_t = β2·s_{t-1} + (1-β2)·(g - m_t)² + ε      (the ε stays in the state)
    rectify=False:  d_t = (m_t/(1-β1^t)) / (sqrt(s_t)/sqrt(1-β2^t) + ε)
    rectify=True, ρ_t ≥ 5:  d_t = r_t·sqrt(1-β2^t)/(1-β1^t) · m_t / (sqrt(s_t) + ε)
                  else:     d_t = m_t/(1-β1^t)
    u_t = -α·d_t                                  (decoupled: - α·λ·θ_{t-1})

with ρ_t and r_t as in RAdam (:mod:`adaptlr._rectification`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_product_, ema_donated, mul_, mul_donated
from adaptlr._rectification import rectification, rectification_condition
from adaptlr._tree import Layout
from adaptlr.adam import bias_correction_condition
from adaptlr.core import BaseDirection, Optimizer, Scalars, Schedule

__all__ = ["AdaBeliefDirection", "AdaBeliefState", "adabelief"]


class AdaBeliefState(NamedTuple):
    """``mu``: ``m_t``; ``belief``: ``s_t``, the EMA of ``(g - m)²`` (plus ε), trees like params."""

    mu: Any
    belief: Any


class AdaBeliefDirection(BaseDirection):
    name = "adabelief"
    state_class = AdaBeliefState

    def __init__(self, learning_rate: float | Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                 decoupled: bool, rectify: bool) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        self.b1 = v.check_beta("b1", b1)
        self.b2 = v.check_beta("b2", b2)
        self.eps = v.check_nonnegative("eps", eps)
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        self.decoupled = bool(decoupled)
        self.rectify = bool(rectify)

    def init(self, params: list, layout: Layout, xp: Any) -> AdaBeliefState:
        return AdaBeliefState(layout.tree([xp.zeros_like(p) for p in params]),
                              layout.tree([xp.zeros_like(p) for p in params]))

    def row_block_temporaries(self, ndim: int) -> int:
        # DSA(AdaBelief) 4.62 blocks against DSA(AdamW)'s 3.49
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 1

    def scalar_condition(self) -> float:
        bias = bias_correction_condition(self.b1, self.b2)
        return max(bias, rectification_condition(self.b2)) if self.rectify else bias

    def direction(self, grads: list, state: AdaBeliefState, scalars: Scalars,
                  layout: Layout) -> tuple[list, AdaBeliefState]:
        xp, b1, b2, eps = scalars.xp, self.b1, self.b2, self.eps

        def step_scalars(t: Any) -> tuple[Any, Any, Any, Any, Any]:
            inv_bc1 = 1.0 / (1.0 - b1**t)
            sqrt_bc2 = xp.sqrt(1.0 - b2**t)
            rho_t, r_t = rectification(xp, t, b2)
            return rho_t >= 5.0, inv_bc1, sqrt_bc2 * inv_bc1, eps * sqrt_bc2, r_t * sqrt_bc2 * inv_bc1

        mus, beliefs, directions = [], [], []
        for g, m, s in zip(grads, layout.leaves(state.mu, "state.mu"), layout.leaves(state.belief, "state.belief")):
            rectified, inv_bc1, scale, eps_t, rect_scale = scalars.step_scalars("adabelief", g.dtype, step_scalars)
            m = ema_donated(scalars, m, g, b1)
            residual = g - m
            s = add_(add_product_(mul_donated(scalars, s, b2), residual, residual, 1.0 - b2, x_temporary=True), eps)
            if self.rectify:
                d = xp.where(rectified, m * rect_scale / add_(xp.sqrt(s), eps), m * inv_bc1)
            else:
                d = mul_(m / add_(xp.sqrt(s), eps_t), scale)  # (m·inv_bc1) / (sqrt(s)/sqrt_bc2 + ε), one pass fewer
            directions.append(d)
            mus.append(m)
            beliefs.append(s)
        return directions, AdaBeliefState(layout.tree(mus), layout.tree(beliefs))


def adabelief(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    rectify: bool = True,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """AdaBelief, matching ``adabelief_pytorch.AdaBelief`` 0.2.1 (``amsgrad=False``,
    ``fixed_decay=False``, ``degenerated_to_sgd=True``).

    Args:
        learning_rate: ``α``, a float >= 0 or a schedule ``t ↦ α_t`` (t = 1 on the first step).
        b1: ``β1`` in [0, 1), the decay rate of the first moment ``m``.
        b2: ``β2`` in [0, 1), the decay rate of ``s``, the moment of ``(g - m)²``.
        eps: ``ε`` >= 0; added to ``s`` every step and to ``sqrt(s)``.
        weight_decay: ``λ`` >= 0; decoupled ``-α·λ·θ`` unless ``decoupled_weight_decay=False`` (L2).
        decoupled_weight_decay: True: ``u ← u - α·λ·θ`` (AdamW-style, the default); False: coupled
            L2, ``g ← g + λθ``.
        rectify: use the RAdam rectification (SGD-with-momentum steps while ``ρ_t < 5``).
        state_dtype: the dtype of the state and the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(AdaBeliefDirection(learning_rate, b1, b2, eps, weight_decay, decoupled_weight_decay, rectify),
                     state_dtype=state_dtype)
