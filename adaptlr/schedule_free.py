"""Schedule-Free: any optimizer without a learning-rate schedule (issue 19; spec §0.1).

Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled", NeurIPS 2024
(arXiv:2405.15682); oracles ``schedulefree`` 1.4.1 (``SGDScheduleFree``, ``AdamWScheduleFree`` and
their ``*Reference`` versions, ``facebookresearch/schedule_free``) and ``optax.contrib.schedule_free``.
Three sequences: ``z`` (the inner optimizer's iterates), ``x`` (their weighted average, for
evaluation) and ``y`` (where gradients are taken: the parameters during training). With ``u_t`` the
update the wrapped optimizer computes from ``g_t = ∇f(y_{t-1})`` at ``y_{t-1}``, ``α_t`` the user's
learning rate and ``W`` the warm-up length::

    w_t   = t/W if t <= W else 1                        (warm-up: the inner step is w_t · u_t)
    a_t   = α_t · w_t,     a_max ← max(a_max, a_t)
    ω_t   = t^r · a_max^p                               (p = weight_lr_power)
    c_t   = ω_t / Σ_{i<=t} ω_i                          (0 while the sum is 0)
    z_t   = z_{t-1} + u_t
    x_t   = (1 - c_t)·x_{t-1} + c_t·z_t
    y_t   = (1 - β1)·z_t + β1·x_t

so the applied update is ``y_t - y_{t-1} = c_t·(z_{t-1} - y_{t-1}) + (1 - β1·(1 - c_t))·u_t``. Only
``z`` is stored: ``x = (y - (1-β1)·z) / β1`` (:func:`schedule_free_eval_params`).

This is an :class:`adaptlr.core.UpdateWrapper`: :meth:`ScheduleFree.step` multiplies the inner
step size by ``w_t`` (so that :func:`adaptlr.learning_rates` reports ``α_t·w_t·κ``), and
:meth:`ScheduleFree.wrap` turns ``u_t`` into the update of ``y``. ``lr_summary`` shows ``c`` (the
averaging weight ``c_t`` of the last step), ``weight_sum`` and ``warmup``. The averaging weight uses
the user's ``α_t`` (per parameter: ``schedulefree`` keeps it per param group), not an inner
adaptation's multiplier.

Differences between the upstream implementations (measured in ``docs/algorithms/lr_free.md``):
``optax.contrib.schedule_free`` has no ``r`` (it is ``r = 0``) and takes warm-up as a
``warmup_constant_schedule`` of the learning rate, which is the same ``w_t``; its
``schedule_free_adamw`` is this one's. Keras 3's ``ScheduleFreeAdamW`` is not the same algorithm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree

from adaptlr import _validation as v
from adaptlr._inplace import add_scaled_, mul_
from adaptlr._precision import widest_float
from adaptlr._tree import Layout
from adaptlr.adam import adamw
from adaptlr.core import (
    Optimizer,
    OptimizerState,
    Schedule,
    StepContext,
    StepSize,
    UpdateWrapper,
    scalar_device,
)
from adaptlr.sgd import sgd

__all__ = [
    "ScheduleFree",
    "ScheduleFreeState",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "schedule_free_train_params",
]


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free`.

    Attributes:
        z: the inner optimizer's iterate ``z`` (tree like the params, state dtype).
        b1: ``β1`` (0-D, widest float), so that :func:`schedule_free_eval_params` needs only the state.
        lr_max: ``a_max``, the largest warmed-up learning rate so far, per parameter (0-D, widest float).
        weight_sum: ``Σ ω_i`` per parameter (0-D, widest float).
        c: the averaging weight ``c_t`` of the last step per parameter (0 before the first).
        warmup: the warm-up factor ``w_t`` of the last step (of the first step after ``init``).
    """

    z: Any
    b1: Any
    lr_max: Any
    weight_sum: Any
    c: Any
    warmup: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size.scaled_by(self.warmup, weight_decay_too=True)

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"c": self.c, "weight_sum": self.weight_sum, "warmup": self.warmup}


class ScheduleFree(UpdateWrapper):
    """The wrapper of :func:`schedule_free`."""

    name = "schedule_free"
    state_class = ScheduleFreeState
    # Elementwise, with scalars that depend on α and t only: the same on flat buffers. Not blockwise
    # (its 0-D state is per parameter), but it sums nothing over elements: the torch adapter's
    # foreach step may run it over chunks of the elements (adaptlr.backends.fast.partitionable).
    flat_safe = True
    blockwise = False
    sums = False

    def __init__(self, b1: float, warmup_steps: int, r: float, weight_lr_power: float) -> None:
        b1 = v.check_beta("b1", b1)
        if b1 <= 0.0:
            raise ValueError("b1 must be in (0, 1) for schedule_free: x = (y - (1-b1)·z)/b1 needs b1 > 0")
        self.b1 = b1
        self.warmup_steps = v.check_nonnegative_int("warmup_steps", warmup_steps)
        self.r = v.check_nonnegative("r", r)
        self.weight_lr_power = v.check_nonnegative("weight_lr_power", weight_lr_power)

    def _warmup(self, t: Any) -> Any:
        if self.warmup_steps == 0:
            return t * 0.0 + 1.0
        xp = v.namespace_of(t)
        return xp.where(t <= self.warmup_steps, t / self.warmup_steps, xp.ones_like(t))

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> ScheduleFreeState:
        device = scalar_device(params[0])
        wide = widest_float(xp, device)

        def zeros() -> Any:
            return layout.tree([xp.asarray(0.0, dtype=wide, device=device) for _ in params])

        warmup = xp.asarray(self._warmup(xp.asarray(1.0, dtype=wide, device=device)))
        return ScheduleFreeState(layout.tree([xp.asarray(p, copy=True) for p in params]),
                                 xp.asarray(self.b1, dtype=wide, device=device), zeros(), zeros(), zeros(), warmup)

    def step(self, ctx: StepContext, size: StepSize, state: ScheduleFreeState) -> tuple[StepSize, ScheduleFreeState]:
        xp, layout, scalars = ctx.xp, ctx.layout, ctx.scalars
        wide = scalars.wide

        def make(t: Any) -> tuple[Any, Any]:
            return self._warmup(t), (t**self.r if self.r else t * 0.0 + 1.0)

        warmup, weight_t = scalars.step_scalars("schedule_free", wide, make)
        lr_max, weight_sum, c = [], [], []
        for a, m, s in zip(ctx.alpha, layout.leaves(state.lr_max, "state.lr_max"),
                           layout.leaves(state.weight_sum, "state.weight_sum")):
            m = xp.maximum(m, xp.astype(a, wide) * warmup)
            weight = weight_t * m**self.weight_lr_power if self.weight_lr_power else weight_t
            s = s + weight
            positive = s > 0
            c.append(xp.where(positive, weight / xp.where(positive, s, xp.ones_like(s)), xp.zeros_like(s)))
            lr_max.append(m)
            weight_sum.append(s)
        size = size.scaled([scalars.step_scalars("schedule_free", g.dtype, make)[0] for g in ctx.grads],
                           weight_decay_too=True)
        return size, state._replace(lr_max=layout.tree(lr_max), weight_sum=layout.tree(weight_sum),
                                    c=layout.tree(c), warmup=xp.asarray(warmup))

    def wrap(self, ctx: StepContext, size: StepSize, updates: list,
             state: ScheduleFreeState) -> tuple[list, ScheduleFreeState]:
        xp, layout, b1 = ctx.xp, ctx.layout, self.b1
        new_updates, new_z = [], []
        zs, cs = layout.leaves(state.z, "state.z"), layout.leaves(state.c, "state.c")
        for u, y, z, c in zip(updates, ctx.params, zs, cs):
            keep = xp.astype(1.0 - b1 * (1.0 - c), u.dtype)
            new_updates.append(add_scaled_(mul_(z - y, xp.astype(c, u.dtype)), u, keep))  # + keep·u: one pass on torch
            new_z.append(z + u)
        return new_updates, state._replace(z=layout.tree(new_z))


def schedule_free(opt: Optimizer, b1: float = 0.9, warmup_steps: int = 0, r: float = 0.0,
                  weight_lr_power: float = 2.0) -> Optimizer:
    """Schedule-Free (Defazio et al., NeurIPS 2024) around any adaptlr optimizer, as ``optax.contrib.schedule_free``.

    The wrapped optimizer should have no momentum of its own (``adaptlr.adamw(lr, b1=0.0)``,
    ``adaptlr.sgd(lr)``): Schedule-Free's interpolation replaces it. Train with the parameters
    (``y``); evaluate and checkpoint ``schedule_free_eval_params(state, params)`` (``x``).

    Args:
        opt: any adaptlr optimizer, with adaptations (``adaptlr.active(adaptlr.adamw(lr, b1=0.0), ...)``).
        b1: ``β1`` in (0, 1), the interpolation between ``z`` and ``x``.
        warmup_steps: ``W`` >= 0, linear warm-up of the learning rate over the first ``W`` steps.
        r: ``r`` >= 0, polynomial weighting ``t^r`` of the average.
        weight_lr_power: ``p`` >= 0: the average's weights are ``a_max^p`` (0: uniform).

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.schedule_free(adaptlr.sgd(0.5))
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> updates, state = opt.update(params, state, params)   # f = ‖w‖²/2
        >>> params = adaptlr.apply_updates(params, updates)
        >>> adaptlr.schedule_free_eval_params(state, params)["w"]   # x_1 = z_1 (c_1 = 1)
        array([ 0.5, -1. ])
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (for example adaptlr.adamw(...)), got {type(opt).__name__}")
    return opt.wrapped(ScheduleFree(b1, warmup_steps, r, weight_lr_power))


def schedule_free_sgd(learning_rate: float | Schedule = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                      warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, *,
                      state_dtype: Any = None) -> Optimizer:
    """Schedule-Free SGD, as ``schedulefree.SGDScheduleFree`` 1.4.1 (same names and defaults).

    ``schedule_free(sgd(learning_rate, weight_decay=weight_decay), b1=momentum, ...)``: the weight
    decay is coupled (``g ← g + λ·y``), as upstream.
    """
    inner = sgd(learning_rate, weight_decay=weight_decay, state_dtype=state_dtype)
    return schedule_free(inner, momentum, warmup_steps, r, weight_lr_power)


def schedule_free_adamw(learning_rate: float | Schedule = 0.0025, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                        weight_lr_power: float = 2.0, *, state_dtype: Any = None) -> Optimizer:
    """Schedule-Free AdamW, as ``schedulefree.AdamWScheduleFree`` 1.4.1 (same names and defaults).

    ``schedule_free(adamw(learning_rate, b1=0, b2, eps, weight_decay), b1, ...)``: the inner step is
    ``-a_t·(g/(sqrt(v_t/(1-β2^t)) + ε) + λ·y)`` (weight decay at ``y``, scaled by the warmed-up rate).
    The inner AdamW's first moment is kept (it equals ``g``); ``adaptlr.adamw`` has no momentum-free mode.
    """
    inner = adamw(learning_rate, 0.0, b2, eps, weight_decay, state_dtype=state_dtype)
    return schedule_free(inner, b1, warmup_steps, r, weight_lr_power)


def _own_state(state: Any, what: str) -> ScheduleFreeState:
    if not isinstance(state, OptimizerState):
        raise TypeError(f"{what} needs an adaptlr OptimizerState, got {type(state).__name__}")
    found = [s for s in state.adaptations if isinstance(s, ScheduleFreeState)]
    if len(found) != 1:
        raise ValueError(f"{what} needs the state of an optimizer wrapped once in adaptlr.schedule_free; "
                         f"this state has {len(found)} Schedule-Free states")
    return found[0]


def _combine(params: Any, z: Any, b1: Any, fn: Any, what: str) -> Any:
    """``fn(param, z, β1)`` leaf by leaf; ``z``'s leaves match the params' in order (a state made for a
    list of leaves, as ``to_optax`` and the torch adapter make it, serves a tree of the same leaves)."""
    layout, leaves = Layout.of(params)
    zs = optree.tree_leaves(z)
    if len(zs) != len(leaves):
        raise ValueError(f"{what} has {len(zs)} arrays but params have {len(leaves)}: not the state of these params")
    xp = v.namespace_of_leaves(leaves, "params", layout.paths)
    out = []
    for p, zi in zip(leaves, zs):
        beta = xp.astype(b1, zi.dtype)
        result = fn(xp.astype(p, zi.dtype) if p.dtype != zi.dtype else p, zi, beta)
        out.append(xp.asarray(xp.astype(result, p.dtype) if result.dtype != p.dtype else result))
    return layout.tree(out)


def schedule_free_eval_params(state: OptimizerState, params: Any) -> Any:
    """The evaluation parameters ``x = (y - (1-β1)·z) / β1`` from the training parameters ``y``.

    Works on every backend and through wrappers (``skip_nonfinite(schedule_free(...))``): it finds
    the one Schedule-Free state among ``state.adaptations``. Evaluate, and save for inference, these.
    """
    own = _own_state(state, "schedule_free_eval_params")
    return _combine(params, own.z, own.b1, lambda y, z, b: (y - (1.0 - b) * z) / b,
                    "schedule_free_eval_params: state.z")


def schedule_free_train_params(state: OptimizerState, eval_params: Any) -> Any:
    """The inverse of :func:`schedule_free_eval_params`: ``y = (1-β1)·z + β1·x`` (to rounding)."""
    own = _own_state(state, "schedule_free_train_params")
    return _combine(eval_params, own.z, own.b1, lambda x, z, b: (1.0 - b) * z + b * x,
                    "schedule_free_train_params: state.z")
