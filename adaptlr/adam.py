"""Adam and AdamW (spec §1; oracles ``torch.optim.Adam`` and ``torch.optim.AdamW``).

    g ← g_t + λ·θ_{t-1}                       (Adam: coupled weight decay)
    m_t = β1·m_{t-1} + (1-β1)·g
    v_t = β2·v_{t-1} + (1-β2)·g²
    d_t = (m_t / (1-β1^t)) / (sqrt(v_t) / sqrt(1-β2^t) + ε)
    u_t = -α·d_t                              (AdamW: - α·λ·θ_{t-1}, decoupled)

``d_t`` is evaluated as ``(m_t · (sqrt(1-β2^t) / (1-β1^t))) / (sqrt(v_t) + ε·sqrt(1-β2^t))``, the same
number up to rounding, in four passes over the elements instead of five (the two step scalars are 0-D),
the division last (round 23: under ``jax.jit``, where the direction is also kept in state, XLA repeats a
last multiplication in each reader and keeps its operand in a temporary, not a last division).

Adam: Kingma & Ba, ICLR 2015. AdamW: Loshchilov & Hutter, ICLR 2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_product_, div_into_donated, ema_donated, mul_donated
from adaptlr._tree import Layout
from adaptlr.core import BaseDirection, Optimizer, Scalars, Schedule

__all__ = ["AdamDirection", "AdamState", "adam", "adamw", "bias_correction_condition", "step_size_bias_correction"]


def step_size_bias_correction(t: Any, b1: float, b2: float, enabled: bool = True) -> Any:
    """``c_t = sqrt(1-β2^t) / (1-β1^t)``: Adam's two bias corrections folded into the step size (1 when
    not ``enabled``), as the learning-rate-free methods (Prodigy, D-Adapt Adam) apply them."""
    if not enabled:
        return t * 0.0 + 1.0
    return (1.0 - b2**t) ** 0.5 / (1.0 - b1**t)


def bias_correction_condition(b1: float, b2: float) -> float:
    """``max_t |∂ log(1-β^t) / ∂ log β^t| = β/(1-β)`` (at t = 1), halved for ``sqrt(1-β2^t)``."""
    return max(1.0, b1 / (1.0 - b1), 0.5 * b2 / (1.0 - b2))


class AdamState(NamedTuple):
    """``mu``: the first moment ``m_t``; ``nu``: the second moment ``v_t`` (trees like params)."""

    mu: Any
    nu: Any


class AdamDirection(BaseDirection):
    state_class = AdamState

    def __init__(self, learning_rate: float | Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                 decoupled: bool) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        self.b1 = v.check_beta("b1", b1)
        self.b2 = v.check_beta("b2", b2)
        self.eps = v.check_nonnegative("eps", eps)
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        self.decoupled = decoupled
        self.name = "adamw" if decoupled else "adam"

    def init(self, params: list, layout: Layout, xp: Any) -> AdamState:
        return AdamState(layout.tree([xp.zeros_like(p) for p in params]),
                         layout.tree([xp.zeros_like(p) for p in params]))

    def row_block_temporaries(self, ndim: int) -> int:
        # none beyond the adaptation's
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 0

    def scalar_condition(self) -> float:
        return bias_correction_condition(self.b1, self.b2)

    def direction(self, grads: list, state: AdamState, scalars: Scalars, layout: Layout) -> tuple[list, AdamState]:
        xp, b1, b2, eps = scalars.xp, self.b1, self.b2, self.eps

        def corrections(t: Any) -> tuple[Any, Any]:
            sqrt_bc2 = xp.sqrt(1.0 - b2**t)
            return sqrt_bc2 / (1.0 - b1**t), eps * sqrt_bc2

        into = scalars.directions_into  # (empty unless an executor donated a state field that keeps d)
        mus, nus, directions = [], [], []
        for g, m, nu in zip(grads, layout.leaves(state.mu, "state.mu"), layout.leaves(state.nu, "state.nu")):
            scale, eps_t = scalars.step_scalars("adam", g.dtype, corrections)
            m = ema_donated(scalars, m, g, b1)
            nu = add_product_(mul_donated(scalars, nu, b2), g, g, 1.0 - b2)
            # the last pass a division, into the state array that keeps the direction where one is
            # donated (HD): under jax.jit XLA repeats a last multiplication in each loop that reads d
            # (HD's d_t, the update) and keeps its operand in a temporary; not a division (round 23)
            directions.append(div_into_donated(scalars, into.get(id(g)) if into else None,
                                               m * scale, add_(xp.sqrt(nu), eps_t), x_temporary=True))
            mus.append(m)
            nus.append(nu)
        return directions, AdamState(layout.tree(mus), layout.tree(nus))


def adam(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """Adam, matching ``torch.optim.Adam``; ``weight_decay`` is coupled (L2: ``g ← g + λθ``).

    Args:
        learning_rate: ``α``, a float >= 0 or a schedule ``t ↦ α_t`` (t = 1 on the first step).
        b1: ``β1`` in [0, 1), the decay rate of the first moment ``m``.
        b2: ``β2`` in [0, 1), the decay rate of the second moment ``v``.
        eps: ``ε`` >= 0 added to the bias-corrected ``sqrt(v)``.
        weight_decay: ``λ`` >= 0.
        state_dtype: the dtype of ``m`` and ``v`` and of the step's arithmetic (None: each
            parameter's dtype, as ``torch.optim``; ``"float32"`` for bfloat16/float16 params).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(AdamDirection(learning_rate, b1, b2, eps, weight_decay, decoupled=False), state_dtype=state_dtype)


def adamw(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """AdamW, matching ``torch.optim.AdamW``: Adam with decoupled weight decay ``-α·λ·θ``.

    ``weight_decay`` is decoupled and not scaled by an adaptation's κ unless that adaptation is
    created with ``scale_weight_decay=True``. The update rule is in the module docstring.

    Args:
        learning_rate: ``α``, a float >= 0 or a schedule ``t ↦ α_t`` (t = 1 on the first step).
        b1: ``β1`` in [0, 1), the decay rate of the first moment ``m``.
        b2: ``β2`` in [0, 1), the decay rate of the second moment ``v``.
        eps: ``ε`` >= 0 added to the bias-corrected ``sqrt(v)``.
        weight_decay: ``λ`` >= 0, decoupled: ``u ← u - α·λ·θ``.
        state_dtype: the dtype of ``m`` and ``v`` and of the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`; wrap it in an adaptation (:func:`adaptlr.active`, ...) or use it as is.
    """
    return Optimizer(AdamDirection(learning_rate, b1, b2, eps, weight_decay, decoupled=True), state_dtype=state_dtype)
