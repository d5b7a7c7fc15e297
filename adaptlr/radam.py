"""RAdam, rectified Adam (spec §1; oracle ``torch.optim.RAdam``). Liu et al., ICLR 2020.

    g ← g_t + λ·θ_{t-1}                       (unless decoupled_weight_decay)
    m_t = β1·m_{t-1} + (1-β1)·g,   v_t = β2·v_{t-1} + (1-β2)·g²,   m̂_t = m_t / (1-β1^t)
    ρ∞ = 2/(1-β2) - 1,   ρ_t = ρ∞ - 2t·β2^t/(1-β2^t)
    ρ_t > 5:  d_t = m̂_t · r_t · sqrt(1-β2^t) / (sqrt(v_t) + ε),
              r_t = sqrt((ρ_t-4)(ρ_t-2)ρ∞ / ((ρ∞-4)(ρ∞-2)ρ_t))
    else:     d_t = m̂_t
    u_t = -α·d_t                              (decoupled: - α·λ·θ_{t-1})
"""

from __future__ import annotations

from typing import Any

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_product_, ema_donated, mul_donated
from adaptlr._rectification import rectification, rectification_condition
from adaptlr._tree import Layout
from adaptlr.adam import AdamState, bias_correction_condition
from adaptlr.core import BaseDirection, Optimizer, Scalars, Schedule

__all__ = ["RAdamDirection", "radam"]


class RAdamDirection(BaseDirection):
    name = "radam"
    state_class = AdamState

    def __init__(self, learning_rate: float | Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                 decoupled: bool) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        self.b1 = v.check_beta("b1", b1)
        self.b2 = v.check_beta("b2", b2)
        self.eps = v.check_nonnegative("eps", eps)
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        self.decoupled = bool(decoupled)

    def init(self, params: list, layout: Layout, xp: Any) -> AdamState:
        return AdamState(layout.tree([xp.zeros_like(p) for p in params]),
                         layout.tree([xp.zeros_like(p) for p in params]))

    def row_block_temporaries(self, ndim: int) -> int:
        # DSA(RAdam) 4.62 blocks against DSA(AdamW)'s 3.49
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 1

    def scalar_condition(self) -> float:
        return max(bias_correction_condition(self.b1, self.b2), rectification_condition(self.b2))

    def direction(self, grads: list, state: AdamState, scalars: Scalars, layout: Layout) -> tuple[list, AdamState]:
        xp, b1, b2, eps = scalars.xp, self.b1, self.b2, self.eps

        def step_scalars(t: Any) -> tuple[Any, Any, Any]:
            rho_t, r_t = rectification(xp, t, b2)
            return rho_t > 5.0, 1.0 / (1.0 - b1**t), r_t * xp.sqrt(1.0 - b2**t)

        mus, nus, directions = [], [], []
        for g, m, nu in zip(grads, layout.leaves(state.mu, "state.mu"), layout.leaves(state.nu, "state.nu")):
            rectified, inv_bc1, scale = scalars.step_scalars("radam", g.dtype, step_scalars)
            m = ema_donated(scalars, m, g, b1)
            nu = add_product_(mul_donated(scalars, nu, b2), g, g, 1.0 - b2)
            m_hat = m * inv_bc1
            directions.append(xp.where(rectified, m_hat * scale / add_(xp.sqrt(nu), eps), m_hat))
            mus.append(m)
            nus.append(nu)
        return directions, AdamState(layout.tree(mus), layout.tree(nus))


def radam(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """RAdam, matching ``torch.optim.RAdam``.

    Args:
        learning_rate: ``α``, a float >= 0 or a schedule ``t ↦ α_t`` (t = 1 on the first step).
        b1: ``β1`` in [0, 1), the decay rate of the first moment.
        b2: ``β2`` in [0, 1), the decay rate of the second moment.
        eps: ``ε`` >= 0.
        weight_decay: ``λ`` >= 0; coupled (L2) unless ``decoupled_weight_decay`` (then ``-α·λ·θ``).
        decoupled_weight_decay: apply ``weight_decay`` as ``u ← u - α·λ·θ`` (AdamW-style) instead of
            ``g ← g + λθ``.
        state_dtype: the dtype of the state and the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(RAdamDirection(learning_rate, b1, b2, eps, weight_decay, decoupled_weight_decay),
                     state_dtype=state_dtype)
