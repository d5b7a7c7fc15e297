"""Mechanic: a learned scale ``s`` of any optimizer's updates (issue 19; spec §0.1).

Cutkosky, Defazio, Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023 (arXiv:2306.00144);
oracle ``mechanic_pytorch.mechanize`` 0.0.1 (``optimizedlearning/mechanic``). With ``x_ref`` the
initial parameters, ``u_t`` the wrapped optimizer's update from ``g_t`` at ``x_{t-1}``, ``n`` betas
``β_j`` and ``S = Σ_j s_j`` (``s_j = 0`` at the start)::

    Δ     = (x_{t-1} - x_ref) / (S + ε)                 (store_delta: the stored Δ instead)
    x⁺    = x_{t-1} + u_t                               (the inner optimizer's new iterate)
    h     = ⟨Δ, g_t + λ_s·S·‖g_t‖/(‖x⁺‖ + ε)·x⁺⟩       (global sums over every tensor: ⟨Δ, g_t⟩ and ⟨Δ, x⁺⟩)
    Δ    ← Δ + u_t
    m_j   = max(β_j·m_j, |h|)                           (m_j = 1e-6 at the start)
    v_j   = β_j²·v_j + h²
    r_j   = max(β_j·r_j - s_j·h, 0)
    s_j   = (s_init/n·m_j + r_j) / (sqrt(v_j) + ε)
    x_t   = x_ref + Δ·max(Σ_j s_j, 0)

``λ_s`` is ``s_decay``. The applied update is ``x_t - x_{t-1}``. This is an
:class:`adaptlr.core.UpdateWrapper`: :func:`adaptlr.learning_rates` multiplies the inner step size
by ``S`` (the scale of the last step) and :func:`adaptlr.lr_summary` shows ``s`` (``S``) and
``s_per_beta``. The sums go through the step's reducer, so they are complete inside
``jax.shard_map`` (``update(..., axis_name=...)``) and, through the torch adapter, under FSDP2.

``optax.contrib.mechanize`` is a different variant (measured in ``docs/algorithms/lr_free.md``):
``s_j`` starts at ``s_init`` (not 0), ``m_j`` at 0 with ``m_j = max(β_j·m_j, |h| + ε)``, ``h`` is
clipped to ``[-m_j, m_j]`` before ``r_j``, the decay term uses ``x_{t-1}`` (not ``x⁺``), the betas
are ``1 - 0.1^k`` and the final scale is ``Σ s_j`` without ``max(·, 0)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._precision import scalar_caster, widest_float
from adaptlr._tree import Layout
from adaptlr.core import Optimizer, StepContext, StepSize, UpdateWrapper, scalar_device

__all__ = ["Mechanic", "MechanicState", "mechanic"]

DEFAULT_BETAS = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)


class MechanicState(NamedTuple):
    """State of :func:`mechanic`.

    Attributes:
        ref: ``x_ref``, the initial parameters (tree like the params).
        delta: ``Δ`` (tree like the params) with ``store_delta``; None otherwise (recomputed).
        s: ``s_j`` per beta (a tuple of 0-D arrays in the widest float: 0-D values mix with the
            replicated 0-D sums of DTensor parameters under FSDP2, a 1-D array would not).
        m: ``m_j``, the running maximum of ``|h|`` (as ``s``).
        v: ``v_j``, the discounted sum of ``h²`` (as ``s``).
        r: ``r_j``, the reward (as ``s``).
    """

    ref: Any
    delta: Any
    s: Any
    m: Any
    v: Any
    r: Any

    def total(self) -> Any:
        """``max(Σ_j s_j, 0)``, the scale of the last step (0-D)."""
        xp = v.namespace_of(self.s[0])
        return xp.maximum(_sum(self.s), xp.zeros_like(self.s[0]))

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size.scaled_by(self.total(), weight_decay_too=True)

    def signals(self, layout: Layout) -> dict[str, Any]:
        xp = v.namespace_of(self.s[0])
        return {"s": self.total(), "s_per_beta": xp.stack(list(self.s))}


def _sum(values: tuple) -> Any:
    total = values[0]
    for x in values[1:]:
        total = total + x
    return total


class Mechanic(UpdateWrapper):
    """The wrapper of :func:`mechanic`."""

    name = "mechanic"
    state_class = MechanicState
    # Global sums over every element: the same on one flat buffer, not block by block; none depends
    # on another, so they are replayable over chunks and blocks (adaptlr.backends.fast.sums_replayable)
    flat_safe = True
    blockwise = False
    replayable_sums = True

    def __init__(self, s_decay: float, betas: tuple, s_init: float, eps: float, store_delta: bool) -> None:
        self.s_decay = v.check_nonnegative("s_decay", s_decay)
        betas = tuple(float(b) for b in betas)
        if not betas:
            raise ValueError("betas must hold at least one value in [0, 1)")
        self.betas = tuple(v.check_beta("betas", b) for b in betas)
        self.s_init = v.check_nonnegative("s_init", s_init)
        self.eps = v.check_positive("eps", eps)
        self.store_delta = bool(store_delta)

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> MechanicState:
        device = scalar_device(params[0])
        wide = widest_float(xp, device)
        n = len(self.betas)
        ref = layout.tree([xp.asarray(p, copy=True) for p in params])
        delta = layout.tree([xp.zeros_like(p) for p in params]) if self.store_delta else None

        def values(value: float) -> tuple:
            return tuple(xp.asarray(value, dtype=wide, device=device) for _ in range(n))

        return MechanicState(ref, delta, values(0.0), values(1e-6), values(0.0), values(0.0))

    def wrap(self, ctx: StepContext, size: StepSize, updates: list,
             state: MechanicState) -> tuple[list, MechanicState]:
        xp, layout, reduce, scalars = ctx.xp, ctx.layout, ctx.reduce, ctx.scalars
        wide = scalars.wide
        eps = self.eps
        refs = layout.leaves(state.ref, "state.ref")
        s_sum = _sum(state.s)

        cast = scalar_caster(xp)  # each wide scalar cast once per dtype this step

        if self.store_delta:
            deltas = layout.leaves(state.delta, "state.delta")
        else:
            deltas = [(p - ref) / cast("denominator", s_sum + eps, p) for p, ref in zip(ctx.params, refs)]
        moved = [p + u for p, u in zip(ctx.params, updates)]
        param_norm = xp.sqrt(reduce.total([x * x for x in moved], wide))
        grad_norm = xp.sqrt(reduce.total([g * g for g in ctx.grads], wide))
        decay = self.s_decay * s_sum * grad_norm / (param_norm + eps)
        # h = ⟨Δ, g⟩ + decay·⟨Δ, x⁺⟩: no sum's terms depend on another sum of the step, so the sums
        # may be made over parts of the model and completed (adaptlr.backends.part_sums)
        h = reduce.total([d * g for d, g in zip(deltas, ctx.grads)], wide) + decay * reduce.total(
            [d * x for d, x in zip(deltas, moved)], wide)
        new_deltas = [d + u for d, u in zip(deltas, updates)]

        n = len(self.betas)
        m, v_, r, s = [], [], [], []
        for beta, m_j, v_j, r_j, s_j in zip(self.betas, state.m, state.v, state.r, state.s):
            m_j = xp.maximum(beta * m_j, xp.abs(h))
            v_j = beta * beta * v_j + h * h
            r_j = xp.maximum(beta * r_j - s_j * h, xp.zeros_like(r_j))
            s.append((m_j * (self.s_init / n) + r_j) / (xp.sqrt(v_j) + eps))
            m.append(m_j)
            v_.append(v_j)
            r.append(r_j)
        scale = xp.maximum(_sum(tuple(s)), xp.zeros_like(s_sum))

        new_updates = [ref + d * cast("scale", scale, d) - p for ref, d, p in zip(refs, new_deltas, ctx.params)]
        new_state = MechanicState(state.ref, layout.tree(new_deltas) if self.store_delta else None, tuple(s),
                                  tuple(m), tuple(v_), tuple(r))
        return new_updates, new_state


def mechanic(opt: Optimizer, s_decay: float = 0.01,
             betas: tuple = DEFAULT_BETAS, s_init: float = 1e-8,
             eps: float = 1e-8, store_delta: bool = False) -> Optimizer:
    """Mechanic (Cutkosky, Defazio, Mehta, NeurIPS 2023) around any adaptlr optimizer, as
    ``mechanic_pytorch.mechanize`` 0.0.1 (same names and defaults).

    Args:
        opt: any adaptlr optimizer (``adaptlr.sgd(1.0)``, ``adaptlr.adamw(1e-3)``, ``autodrop(...)``).
        s_decay: ``λ_s`` >= 0, Mechanic's own weight decay on the scale (the paper's ``λ``).
        betas: the ``β_j`` in [0, 1), one scale ``s_j`` each.
        s_init: the initial wealth ``s_init`` >= 0.
        eps: ``ε`` > 0.
        store_delta: keep ``Δ`` in the state (one more tensor per parameter) instead of recomputing it
            from ``(x - x_ref)/(S + ε)``. The two are different runs (upstream too): the recomputed
            ``Δ`` is scaled by ``S/(S + ε)`` at every step.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.mechanic(adaptlr.sgd(1.0))
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> updates, state = opt.update(params, state, params)   # f = ‖w‖²/2
        >>> float(adaptlr.lr_summary(state)["s"]) > 0
        True
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (for example adaptlr.adamw(...)), got {type(opt).__name__}")
    return opt.wrapped(Mechanic(s_decay, betas, s_init, eps, store_delta))
