"""ActiveLR: a per-element learning-rate multiplier driven by the sign of the epoch-summed gradient (spec §2).

"Read the Signs: Towards Invariance to Gradient Descent's Hyperparameter Values", Wadi, Fredette,
Senecal (2023); reference code ``davoodwadi/active-lr``. γ grows by ``h`` at the end of every epoch
whose gradient sum kept the sign of the previous epoch's, and shrinks by the factor ``ℓ`` where it
flipped (a zero product counts as a flip). With ``S`` = steps per epoch, at step ``t``::

    C ← C + g_t                                        (raw gradient, before any weight decay)
    u_t = -(α·γ) ⊙ d_t - α·λ·θ_{t-1}                   (κ_t = γ from before this step's adjustment;
                                                        the decay term is ·γ only if scale_weight_decay)
    if t mod S = 0 and t ≥ 2S:
        γ ← where(G_prev·C ≤ 0, ℓ·γ, γ + h)                (a NaN or infinite G_prev or C counts as
                                                        a flip: γ never grows from a non-finite sum)
        γ ← clip(γ, min_gamma, max_gamma)              (where given; an adaptlr extension)
    if t mod S = 0:
        G_prev ← C,  C ← 0

Epochs 1 and 2 run with γ = 1; with ``h = 0, ℓ = 1`` the wrapped optimizer is unchanged. The two
epoch-boundary tests are 0-D masks fed to ``where``, so one compiled step serves every ``t``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._boundary import at_boundary, carry_in_place_of
from adaptlr._inplace import add_donated
from adaptlr._ordering import as_loop_fusion
from adaptlr._tree import Layout
from adaptlr.adabelief import adabelief
from adaptlr.adam import adamw
from adaptlr.core import Adaptation, Optimizer, Schedule, StepContext, StepSize
from adaptlr.radam import radam
from adaptlr.sgd import sgd

__all__ = ["ActiveLR", "ActiveState", "active", "active_adabelief", "active_adamw", "active_radam", "active_sgd"]

_INT32_MAX = 2**31 - 1


class ActiveState(NamedTuple):
    """State of ActiveLR (trees shaped like the params, in each parameter's dtype).

    Attributes:
        gamma: the multiplier ``γ`` the next step will use.
        epoch_grad_sum: ``C``, the sum of the raw gradients of the current epoch so far.
        prev_epoch_grad_sum: ``G_prev``, the gradient sum of the last completed epoch.
    """

    gamma: Any
    epoch_grad_sum: Any
    prev_epoch_grad_sum: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        """``α·γ`` with γ after the last epoch-boundary adjustment (spec §0.1)."""
        return size.scaled(layout.leaves(self.gamma, "state.gamma"))

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"gamma": self.gamma}


class ActiveLR(Adaptation):
    """The ActiveLR adaptation; build it with :func:`active`."""

    name = "active"
    state_class = ActiveState

    def __init__(self, steps_per_epoch: int, increase: float, decrease: float, min_gamma: float | None,
                 max_gamma: float | None, scale_weight_decay: bool) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.increase = increase
        self.decrease = decrease
        self.min_gamma = min_gamma
        self.max_gamma = max_gamma
        self.scale_weight_decay = scale_weight_decay

    def row_block_temporaries(self, ndim: int) -> int:
        # at an epoch boundary: HD per tensor (ActiveLR(AdamW)) 5.08 blocks against HD's 2.03
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 3

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> ActiveState:
        return ActiveState(
            layout.tree([xp.ones_like(p) for p in params]),
            layout.tree([xp.zeros_like(p) for p in params]),
            layout.tree([xp.zeros_like(p) for p in params]),
        )

    def _epoch_end(self, t: int) -> bool:
        """Whether step ``t`` ends an epoch (``epoch_end`` of :meth:`step`, on the host)."""
        return t % self.steps_per_epoch == 0

    def step(self, ctx: StepContext, size: StepSize, state: ActiveState) -> tuple[StepSize, ActiveState]:
        xp, layout, scalars, S = ctx.xp, ctx.layout, ctx.scalars, self.steps_per_epoch
        t = ctx.count
        epoch_end = scalars.per_step(("epoch_end", S), lambda: (t % S) == 0)
        # t ≥ 2S, without forming 2S in int32
        adjust = scalars.per_step(("epoch_end_adjust", S), lambda: xp.logical_and(epoch_end, (t // S) >= 2))

        gammas = layout.leaves(state.gamma, "state.gamma")
        # C + g: into C where the executor donated it (G_prev may become this array at the boundary:
        # the executors read a new field that is another's old buffer before writing)
        sums = [add_donated(scalars, c, g)
                for c, g in zip(layout.leaves(state.epoch_grad_sum, "state.epoch_grad_sum"), ctx.grads)]
        # (under jax.jit, where the step leaves the boundary work out, C + g is a lone addition, which
        # XLA:CPU emits 4× slower on a 3×3 convolution's tensor than a loop fusion: _ordering)
        sums = as_loop_fusion(xp, sums, scalars.t)
        prev_sums = layout.leaves(state.prev_epoch_grad_sum, "state.prev_epoch_grad_sum")

        def boundary(gammas: list, sums: list, prev_sums: list) -> tuple[list, list, list]:
            """The epoch's last step: γ adjusted (from the third epoch), G_prev ← C, C ← 0."""
            new_gammas = []
            for gamma, epoch_sum, prev_sum in zip(gammas, sums, prev_sums):
                # A non-finite sum counts as a flip (NaN·x ≤ 0 is False, so test "kept" instead).
                kept = xp.logical_and(prev_sum * epoch_sum > 0,
                                      xp.logical_and(xp.isfinite(prev_sum), xp.isfinite(epoch_sum)))
                adjusted = xp.where(kept, gamma + self.increase, self.decrease * gamma)
                if self.min_gamma is not None:
                    adjusted = xp.maximum(adjusted, scalars.constant(self.min_gamma, gamma.dtype))
                if self.max_gamma is not None:
                    adjusted = xp.minimum(adjusted, scalars.constant(self.max_gamma, gamma.dtype))
                new_gammas.append(xp.where(adjust, adjusted, gamma))
            # Under jax.jit the fields are the carry of a loop, each written in place (where the state
            # is donated) once what reads its old value is made: G_prev ← C after γ read G_prev, C ← 0
            # after γ and G_prev read C (adaptlr._boundary.carrying; nothing is done elsewhere; not
            # through first elements inside shard_map, where they are each device's own).
            whole = ctx.reduce.complete is None
            new_prev_sums = carry_in_place_of(xp, prev_sums, sums, new_gammas, first_elements=whole)
            zeros = carry_in_place_of(xp, sums, [xp.zeros_like(c) for c in sums], [*new_gammas, *new_prev_sums],
                                      first_elements=whole)
            return new_gammas, zeros, new_prev_sums

        # Only at the boundary (a Python branch on the host-side count, a loop run at most once under JAX; _boundary).
        # Otherwise γ, C + g and G_prev come back unchanged.
        # (the results only go into the new state: a traced step may run this after its update)
        new_gammas, new_sums, new_prev_sums = at_boundary(xp, epoch_end, boundary, (gammas, sums, prev_sums),
                                                                scalars, state_only=True, due=self._epoch_end)

        # This step uses the γ from before the adjustment above.
        size = size.scaled(gammas, weight_decay_too=self.scale_weight_decay)
        return size, ActiveState(layout.tree(new_gammas), layout.tree(new_sums), layout.tree(new_prev_sums))


def active(
    opt: Optimizer,
    steps_per_epoch: int,
    increase: float = 0.2,
    decrease: float = 0.5,
    min_gamma: float | None = None,
    max_gamma: float | None = None,
    scale_weight_decay: bool = False,
) -> Optimizer:
    """Wrap ``opt`` in ActiveLR (spec §2): a per-element multiplier γ on its learning rate.

    Args:
        opt: any adaptlr optimizer (a base optimizer or one already wrapped by other adaptations).
        steps_per_epoch: ``S``, the number of ``update`` calls per epoch (usually ``len(train_loader)``),
            a positive integer. γ is adjusted at the end of every epoch from the third on.
        increase: ``h`` >= 0, added to γ where the epoch gradient sum kept its sign. The paper's
            experiments used 2; the default 0.2 is the reference library's later default.
        decrease: ``ℓ`` in (0, 1], the factor on γ where the sign flipped (or a sum was zero).
        min_gamma: if given (>= 0), γ is clipped from below after each adjustment.
        max_gamma: if given (> 0, >= ``min_gamma``), γ is clipped from above after each adjustment.
        scale_weight_decay: multiply the base's decoupled weight decay ``-α·λ·θ`` by γ too (default:
            decoupled decay keeps the user's α). Coupled (L2) decay is inside the direction and
            always scaled.

    Returns:
        the wrapped optimizer; ``adaptlr.learning_rates(state)`` gives ``α·γ`` per element and
        ``state.adaptations[i].gamma`` the γ tree.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0)
        >>> params = {"w": np.ones(2)}
        >>> state = opt.init(params)
        >>> for _ in range(3):
        ...     updates, state = opt.update(params, state, params)
        ...     params = adaptlr.apply_updates(params, updates)
        >>> adaptlr.learning_rates(state)["w"]
        array([0.5, 0.5])
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (for example adaptlr.adamw(...)), got {type(opt).__name__}")
    steps_per_epoch = v.check_positive_int("steps_per_epoch", steps_per_epoch)
    if steps_per_epoch > _INT32_MAX:
        raise ValueError(f"steps_per_epoch must be < 2**31 (the step counter is int32), got {steps_per_epoch}")
    increase = v.check_nonnegative("increase", increase)
    decrease = v.check_range("decrease", decrease, 0.0, 1.0, low_open=True, high_open=False)
    if min_gamma is not None:
        min_gamma = v.check_nonnegative("min_gamma", min_gamma)
    if max_gamma is not None:
        max_gamma = v.check_positive("max_gamma", max_gamma)
    if min_gamma is not None and max_gamma is not None and min_gamma > max_gamma:
        raise ValueError(f"min_gamma ({min_gamma}) must be <= max_gamma ({max_gamma})")
    if not isinstance(scale_weight_decay, bool):
        raise TypeError(f"scale_weight_decay must be a bool, got {type(scale_weight_decay).__name__}")
    return opt.wrapped(ActiveLR(steps_per_epoch, increase, decrease, min_gamma, max_gamma, scale_weight_decay))


def active_sgd(
    learning_rate: float | Schedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    steps_per_epoch: int,
    increase: float = 0.2,
    decrease: float = 0.5,
    min_gamma: float | None = None,
    max_gamma: float | None = None,
    scale_weight_decay: bool = False,
    state_dtype: Any = None,
) -> Optimizer:
    """Active SGD: ``active(sgd(...), ...)``; the arguments of :func:`adaptlr.sgd` and, keyword-only,
    those of :func:`adaptlr.active` (``steps_per_epoch`` is required).

    Returns:
        ``active(base, steps_per_epoch, ...)``: an :class:`adaptlr.Optimizer` whose state holds the
        per-element γ (``adaptlr.lr_summary(state)["gamma"]``).
    """
    base = sgd(learning_rate, momentum, dampening, nesterov, weight_decay, state_dtype=state_dtype)
    return active(base, steps_per_epoch, increase, decrease, min_gamma, max_gamma, scale_weight_decay)


def active_adamw(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    steps_per_epoch: int,
    increase: float = 0.2,
    decrease: float = 0.5,
    min_gamma: float | None = None,
    max_gamma: float | None = None,
    scale_weight_decay: bool = False,
    state_dtype: Any = None,
) -> Optimizer:
    """Active AdamW: ``active(adamw(...), ...)``; the arguments of :func:`adaptlr.adamw` and, keyword-only,
    those of :func:`adaptlr.active` (``steps_per_epoch`` is required).

    Returns:
        ``active(base, steps_per_epoch, ...)``: an :class:`adaptlr.Optimizer` whose state holds the
        per-element γ (``adaptlr.lr_summary(state)["gamma"]``).
    """
    base = adamw(learning_rate, b1, b2, eps, weight_decay, state_dtype=state_dtype)
    return active(base, steps_per_epoch, increase, decrease, min_gamma, max_gamma, scale_weight_decay)


def active_radam(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    steps_per_epoch: int,
    increase: float = 0.2,
    decrease: float = 0.5,
    min_gamma: float | None = None,
    max_gamma: float | None = None,
    scale_weight_decay: bool = False,
    state_dtype: Any = None,
) -> Optimizer:
    """Active RAdam: ``active(radam(...), ...)``; the arguments of :func:`adaptlr.radam` and, keyword-only,
    those of :func:`adaptlr.active` (``steps_per_epoch`` is required).

    Returns:
        ``active(base, steps_per_epoch, ...)``: an :class:`adaptlr.Optimizer` whose state holds the
        per-element γ (``adaptlr.lr_summary(state)["gamma"]``).
    """
    base = radam(learning_rate, b1, b2, eps, weight_decay, decoupled_weight_decay, state_dtype=state_dtype)
    return active(base, steps_per_epoch, increase, decrease, min_gamma, max_gamma, scale_weight_decay)


def active_adabelief(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    rectify: bool = True,
    *,
    steps_per_epoch: int,
    increase: float = 0.2,
    decrease: float = 0.5,
    min_gamma: float | None = None,
    max_gamma: float | None = None,
    scale_weight_decay: bool = False,
    state_dtype: Any = None,
) -> Optimizer:
    """Active AdaBelief: ``active(adabelief(...), ...)``; the arguments of :func:`adaptlr.adabelief`
    and, keyword-only, those of :func:`adaptlr.active` (``steps_per_epoch`` is required).

    Returns:
        ``active(base, steps_per_epoch, ...)``: an :class:`adaptlr.Optimizer` whose state holds the
        per-element γ (``adaptlr.lr_summary(state)["gamma"]``).
    """
    base = adabelief(learning_rate, b1, b2, eps, weight_decay, decoupled_weight_decay, rectify, state_dtype=state_dtype)
    return active(base, steps_per_epoch, increase, decrease, min_gamma, max_gamma, scale_weight_decay)
