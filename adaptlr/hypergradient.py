"""Hypergradient descent, HD (spec §4): the learning rate follows the loss's derivative in it.

Baydin, Cornish, Martínez Rubio, Schmidt, Wood, "Online Learning Rate Adaptation with Hypergradient
Descent", ICLR 2018 (public code: ``gbaydin/hypergradient-descent``). The derivative of the loss at
``θ_{t-1}`` with respect to the previous step's learning rate is ``-⟨g_t, d_{t-1}⟩``, so HD keeps the
learning rate ``a`` itself (initially α, the base's learning rate) and each step, before the base
step::

    g = g_t (+ λ·θ_{t-1} under coupled L2 decay)          the gradient of what the base minimises
    H = Σ g ⊙ d_prev                                      summed per granularity:
                                                          global (all tensors) / tensor / element
    additive:        a ← a + β·H
    multiplicative:  a ← a·(1 + β·cos),  cos = H / (‖g‖·‖d_prev‖)  (0 where a norm is 0;
                                          element granularity: cos = sign(g ⊙ d_prev))
    a ← clip(a, min_lr, max_lr)                           where given
    u_t = -a·κ ⊙ d_t                                      a replaces α in the step size
    d_prev ← κ ⊙ d_t                                      κ: the multiplier of wrapped adaptations (1 alone)

At t = 1, ``d_prev = 0`` and ``a`` does not move. ``a`` may become negative unless clipped. Global
sums are accumulated in float64 where the backend has it.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, is_donated, mul_, mul_for_sum
from adaptlr._precision import cast_like, widest_float
from adaptlr._reduce import Term
from adaptlr._tree import Layout
from adaptlr.adam import adam
from adaptlr.core import Adaptation, BaseDirection, Optimizer, StepContext, StepSize, scalar_device
from adaptlr.sgd import sgd

__all__ = [
    "Hypergradient",
    "HypergradientState",
    "adam_hd",
    "hypergradient",
    "sgd_hd",
    "sgdn_hd",
]

MODES = ("additive", "multiplicative")
GRANULARITIES = ("global", "tensor", "element")


class HypergradientState(NamedTuple):
    """State of hypergradient descent.

    Attributes:
        lr: the adapted learning rate ``a`` the last step used: a 0-D array for ``granularity="global"``
            (in the widest dtype of the params), else a tree shaped like the params of 0-D arrays
            (``"tensor"``) or of param-shaped arrays (``"element"``).
        d_prev: ``κ ⊙ d_{t-1}``, the direction ``a`` multiplied in the last step (tree like params).
    """

    lr: Any
    d_prev: Any

    def _lr_leaves(self, layout: Layout, like: tuple) -> list:
        if v.is_array(self.lr):  # global: one number for every tensor
            xp = v.namespace_of(self.lr)
            return [xp.astype(self.lr, a.dtype) for a in like]
        return layout.leaves(self.lr, "state.lr")

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size._replace(alpha=tuple(self._lr_leaves(layout, size.alpha)))

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"lr": self.lr}


class Hypergradient(Adaptation):
    """The HD adaptation (build it with :func:`hypergradient`)."""

    name = "hd"
    state_class = HypergradientState
    # sums through ctx.reduce.total, none depending on another: replayable over chunks
    # (adaptlr.backends.fast.sums_replayable)
    replayable_sums = True
    # ... and all in before_direction, from the step's inputs (adaptlr.backends.fast.sums_cheaply)
    sums_before_direction = True

    def __init__(
        self, hyper_lr: float, mode: str, granularity: str, min_lr: float | None, max_lr: float | None
    ) -> None:
        self.hyper_lr = hyper_lr
        self.mode = mode
        self.granularity = granularity
        self.min_lr = min_lr
        self.max_lr = max_lr

    def check_base(self, base: BaseDirection) -> None:
        if callable(base.learning_rate):
            raise ValueError(
                "hypergradient descent adapts the learning rate itself and replaces the base's "
                "learning_rate after the first step, so it cannot follow a schedule; give the base a "
                "float learning_rate (the initial value of the adapted rate)"
            )

    def row_block_temporaries(self, ndim: int) -> int:
        # HD per tensor (AdamW) keeps 2.03 blocks alive: two and its row-sized sums (2 put a step 0.01 % over)
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 3

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> HypergradientState:
        if self.granularity == "global":  # one scalar: kept in the widest float (adaptlr._precision)
            dtype = widest_float(xp, scalar_device(params[0]))
            widest = max(alpha, key=lambda a: xp.finfo(a.dtype).bits)  # α least rounded
            lr = xp.astype(widest, dtype, copy=True)  # its own buffer (donatable)
        elif self.granularity == "tensor":
            lr = layout.tree([xp.astype(a, p.dtype, copy=True) for a, p in zip(alpha, params, strict=True)])
        else:
            lr = layout.tree([a * xp.ones_like(p) for a, p in zip(alpha, params, strict=True)])
        return HypergradientState(lr, layout.tree([xp.zeros_like(p) for p in params]))

    def before_direction(self, ctx: StepContext, state: HypergradientState) -> HypergradientState:
        """``a_t`` from ``a_{t-1}``, the gradient and ``d_prev``: the sums read nothing else."""
        scalars, grads = ctx.scalars, ctx.objective_grads
        d_prev = ctx.layout.leaves(state.d_prev, "state.d_prev")
        new_state = self._adapted(ctx, state, grads, d_prev, self.mode == "multiplicative")
        # What reads d_{t-1} is done: where the executor donated it, the base may write its
        # direction there (the new d_prev; Scalars.directions_into), and nothing is copied back.
        if scalars.donated:
            scalars.directions_into.update((id(g), d) for g, d in zip(grads, d_prev) if is_donated(scalars, d))
        return new_state

    def _adapted(self, ctx: StepContext, state: HypergradientState, grads: list, d_prev: list,
                 multiplicative: bool) -> HypergradientState:
        xp, layout, scalars = ctx.xp, ctx.layout, ctx.scalars

        if self.granularity == "global":
            acc = scalars.wide
            total = ctx.reduce.total
            # (each product stored in the sum's float as it is made: mul_for_sum)
            h = total((mul_for_sum(g, d, acc) for g, d in zip(grads, d_prev, strict=True)), acc)
            sums = (h,)
            if multiplicative:
                sums += (total((mul_for_sum(g, g, acc) for g in grads), acc),
                         total((mul_for_sum(d, d, acc) for d in d_prev), acc))

            def adapted(lr: Any, h: Any, *norms: Any) -> Any:
                if norms:
                    h = _cosine(xp, h, *norms)
                return self._adapt(xp, lr, xp.astype(h, lr.dtype), scalars)

            # (once per step, not once per block: Scalars.once; another HD has another rate)
            return state._replace(lr=scalars.once(("hd lr", id(self)), (state.lr, *sums), adapted))
        lrs = []
        for i, (a, g, d) in enumerate(zip(layout.leaves(state.lr, "state.lr"), grads, d_prev, strict=True)):
            if self.granularity == "tensor":  # sums in the widest float, then the state dtype
                wide, leaf_sum = scalars.wide, ctx.reduce.leaf_sum
                # (terms made where a sum reads them: a row block's second pass does not)
                h = leaf_sum(i, Term(operator.mul, (g, d), g.ndim), dtype=wide)
                if multiplicative:
                    h = _cosine(xp, h, leaf_sum(i, Term(operator.mul, (g, g), g.ndim), dtype=wide),
                                leaf_sum(i, Term(operator.mul, (d, d), d.ndim), dtype=wide))
                h = xp.astype(h, a.dtype)
            else:
                h = xp.sign(g * d) if multiplicative else g * d
            lrs.append(self._adapt(xp, a, h, scalars))
        return state._replace(lr=layout.tree(lrs))

    def step(
        self, ctx: StepContext, size: StepSize, state: HypergradientState
    ) -> tuple[StepSize, HypergradientState]:
        if self.granularity == "global":  # the rate in each gradient's dtype, once per step for this rate
            lrs = cast_like(ctx.xp, state.lr, ctx.objective_grads, ctx.scalars, "hd lr")
        else:
            lrs = ctx.layout.leaves(state.lr, "state.lr")
        # The step is -a·κ ⊙ d, so the direction a multiplies (what the next H needs) is κ ⊙ d.
        new_d_prev = [d if k is None else k * d for k, d in zip(size.factors(), ctx.directions, strict=True)]
        return size._replace(alpha=tuple(lrs)), state._replace(d_prev=ctx.layout.tree(new_d_prev))

    def _adapt(self, xp: Any, a: Any, h: Any, scalars: Any) -> Any:
        """``a + β·H`` or ``a·(1 + β·cos)``, then clipped to ``[min_lr, max_lr]``."""
        beta = scalars.constant(self.hyper_lr, a.dtype)
        if self.mode == "additive":
            a = add_(beta * h, a)
        else:
            a = mul_(add_(beta * h, scalars.constant(1.0, a.dtype)), a)
        if self.min_lr is not None:
            a = xp.maximum(a, scalars.constant(self.min_lr, a.dtype))
        if self.max_lr is not None:
            a = xp.minimum(a, scalars.constant(self.max_lr, a.dtype))
        return a


def _cosine(xp: Any, dot: Any, g_sq: Any, d_sq: Any) -> Any:
    """``dot / (‖g‖·‖d‖)``, and 0 where a norm is 0."""
    norms = xp.sqrt(g_sq) * xp.sqrt(d_sq)
    positive = norms > 0
    return xp.where(positive, dot / xp.where(positive, norms, xp.ones_like(norms)), xp.zeros_like(norms))


def _check_bounds(min_lr: Any, max_lr: Any) -> tuple[float | None, float | None]:
    if min_lr is not None:
        min_lr = v.check_finite("min_lr", min_lr)
    if max_lr is not None:
        max_lr = v.check_finite("max_lr", max_lr)
    if min_lr is not None and max_lr is not None and min_lr > max_lr:
        raise ValueError(f"min_lr must be <= max_lr, got min_lr={min_lr} and max_lr={max_lr}")
    return min_lr, max_lr


def _check_optimizer(opt: Any, what: str) -> None:
    if not isinstance(opt, Optimizer):
        raise TypeError(f"{what} wraps an adaptlr Optimizer (such as adaptlr.sgd(0.1)), got {type(opt).__name__}")


def hypergradient(
    opt: Optimizer,
    hyper_lr: float,
    mode: str = "additive",
    granularity: str = "global",
    min_lr: float | None = None,
    max_lr: float | None = None,
) -> Optimizer:
    """Hypergradient descent on the learning rate of ``opt`` (spec §4; Baydin et al., ICLR 2018).

    The base's ``learning_rate`` is the initial value of the adapted rate ``a`` (0 is allowed) and
    must be a float: HD replaces it. Decoupled weight decay keeps using the base's α.

    Args:
        opt: the optimizer to wrap, an :class:`adaptlr.core.Optimizer`.
        hyper_lr: ``β`` >= 0, the learning rate of the learning rate.
        mode: ``"additive"`` (``a ← a + β·H``, the paper's rule) or ``"multiplicative"``
            (``a ← a·(1 + β·cos)``, scale-free).
        granularity: ``"global"`` (one rate for the model, sums over every tensor), ``"tensor"``
            (one per parameter tensor) or ``"element"`` (one per parameter element).
        min_lr: an optional lower bound on ``a`` (an extension; ``a`` may go negative without one).
        max_lr: an optional upper bound on ``a`` (an extension).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.1)
        >>> params = {"x": np.array(1.0)}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update(params, state, params)   # f = x²/2, grad = x
        ...     params = adaptlr.apply_updates(params, updates)
        >>> float(adaptlr.learning_rates(state)["x"])
        0.19
    """
    _check_optimizer(opt, "hypergradient")
    hyper_lr = v.check_nonnegative("hyper_lr", hyper_lr)
    v.check_choice("mode", mode, MODES)
    v.check_choice("granularity", granularity, GRANULARITIES)
    min_lr, max_lr = _check_bounds(min_lr, max_lr)
    return opt.wrapped(Hypergradient(hyper_lr, mode, granularity, min_lr, max_lr))


def sgd_hd(
    learning_rate: float,
    hyper_lr: float = 1e-6,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """SGD-HD: SGD (with optional momentum) and global additive hypergradient descent.

    Args:
        learning_rate: the initial learning rate ``α`` >= 0 (a float).
        hyper_lr: ``β`` >= 0 (default 1e-6, the reference code's).
        momentum: as in :func:`adaptlr.sgd`.
        dampening: as in :func:`adaptlr.sgd`.
        weight_decay: as in :func:`adaptlr.sgd` (coupled L2).
        state_dtype: the dtype of the state and the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    base = sgd(learning_rate, momentum, dampening, False, weight_decay, state_dtype=state_dtype)
    return hypergradient(base, hyper_lr)


def sgdn_hd(
    learning_rate: float,
    hyper_lr: float = 1e-6,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """SGDN-HD: SGD with Nesterov momentum and global additive hypergradient descent.

    Args:
        learning_rate: the initial learning rate ``α`` >= 0 (a float).
        hyper_lr: ``β`` >= 0 (default 1e-6, the reference code's).
        momentum: ``μ`` in (0, 1).
        weight_decay: ``λ`` >= 0, coupled L2.
        state_dtype: the dtype of the state and the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return hypergradient(sgd(learning_rate, momentum, 0.0, True, weight_decay, state_dtype=state_dtype), hyper_lr)


def adam_hd(
    learning_rate: float = 1e-3,
    hyper_lr: float = 1e-8,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """Adam-HD: Adam (coupled L2 weight decay) and global additive hypergradient descent.

    Args:
        learning_rate: the initial learning rate ``α`` >= 0 (a float).
        hyper_lr: ``β`` >= 0 (default 1e-8, the reference code's).
        b1: ``β1``, as in :func:`adaptlr.adam`.
        b2: ``β2``, as in :func:`adaptlr.adam`.
        eps: ``ε``, as in :func:`adaptlr.adam`.
        weight_decay: ``λ``, as in :func:`adaptlr.adam`.
        state_dtype: the dtype of the state and the step's arithmetic (see :func:`adaptlr.adam`).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return hypergradient(adam(learning_rate, b1, b2, eps, weight_decay, state_dtype=state_dtype), hyper_lr)

