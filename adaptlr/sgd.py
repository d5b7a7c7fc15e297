"""SGD with optional momentum, dampening and Nesterov momentum (spec §1; oracle ``torch.optim.SGD``).

    g ← g_t + λ·θ_{t-1}                                   (coupled weight decay)
    μ = 0:  d_t = g
    μ > 0:  b_1 = g,  b_t = μ·b_{t-1} + (1-τ)·g  (t > 1)
            d_t = g + μ·b_t  (Nesterov)   or   d_t = b_t
    u_t = -α·d_t

Momentum: Polyak (1964); Nesterov momentum in the form of Sutskever et al. (ICML 2013).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_scaled_, mul_donated
from adaptlr._tree import Layout
from adaptlr.core import BaseDirection, Optimizer, Scalars, Schedule

__all__ = ["SGDDirection", "SGDState", "sgd"]


class SGDState(NamedTuple):
    """``momentum_buffer``: ``b_t`` per parameter (None without momentum)."""

    momentum_buffer: Any


class SGDDirection(BaseDirection):
    name = "sgd"
    state_class = SGDState

    def __init__(self, learning_rate: float | Schedule, momentum: float, dampening: float, nesterov: bool,
                 weight_decay: float) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        self.momentum = v.check_beta("momentum", momentum)
        self.dampening = v.check_range("dampening", dampening, 0.0, 1.0, low_open=False, high_open=False)
        self.nesterov = bool(nesterov)
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        self.name = "sgdn" if self.nesterov else ("sgdm" if self.momentum else "sgd")

    def row_block_temporaries(self, ndim: int) -> int:
        # none beyond the adaptation's, with or without momentum or Nesterov's
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 0

    def init(self, params: list, layout: Layout, xp: Any) -> SGDState:
        if not self.momentum:
            return SGDState(None)
        return SGDState(layout.tree([xp.zeros_like(p) for p in params]))

    def direction(self, grads: list, state: SGDState, scalars: Scalars, layout: Layout) -> tuple[list, SGDState]:
        if not self.momentum:
            return list(grads), state
        xp, mu = scalars.xp, self.momentum
        buffers = layout.leaves(state.momentum_buffer, "state.momentum_buffer")
        new_buffers, directions = [], []
        for g, b in zip(grads, buffers):
            # b_0 = 0, so b_1 = μ·0 + c·g with c = 1 at t = 1 and c = 1 - τ after: no full-size where.
            c = scalars.per_dtype("sgd_c", g.dtype, lambda dt: xp.where(
                scalars.count == 1, scalars.constant(1.0, dt), scalars.constant(1.0 - self.dampening, dt)))
            b = add_scaled_(mul_donated(scalars, b, mu), g, c)
            new_buffers.append(b)
            directions.append(add_(mu * b, g) if self.nesterov else b)
        return directions, SGDState(layout.tree(new_buffers))


def sgd(
    learning_rate: float | Schedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """Stochastic gradient descent, matching ``torch.optim.SGD``.

    Args:
        learning_rate: ``α``, a float >= 0 or a schedule ``t ↦ α_t`` (t = 1 on the first step).
        momentum: ``μ`` in [0, 1).
        dampening: ``τ`` in [0, 1]: the gradient enters the buffer with weight ``1 - τ`` after step 1.
        nesterov: use Nesterov momentum ``d = g + μ·b`` (needs momentum > 0 and dampening 0).
        weight_decay: ``λ`` >= 0, coupled (L2): ``g ← g + λθ``.
        state_dtype: the dtype of the momentum buffer and the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.sgd(0.1, momentum=0.9)
        >>> params = {"w": np.ones(3)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": params["w"]}, state, params)
        >>> adaptlr.apply_updates(params, updates)["w"]
        array([0.9, 0.9, 0.9])
    """
    return Optimizer(SGDDirection(learning_rate, momentum, dampening, nesterov, weight_decay), state_dtype=state_dtype)
