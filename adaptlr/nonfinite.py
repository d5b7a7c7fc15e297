"""Non-finite gradients: the default policy, and ``skip_nonfinite(opt)`` that skips such steps.

**Default: propagate.** Like ``torch.optim`` and optax, an adaptlr optimizer computes with whatever
gradient it is given. One NaN or Inf element makes that element's update and state non-finite (Adam's
moments stay NaN for good); hypergradient's global α and EG's global scale make every parameter
NaN, and AutoDrop's angle ω becomes undefined. ActiveLR never *increases* γ from a non-finite epoch
sum (it counts as a sign flip). Use ``torch.amp.GradScaler`` (which skips
the step itself), ``optax.apply_if_finite`` or this module's wrapper to skip such steps instead.

**skip_nonfinite(opt, max_consecutive=k)** wraps any optimizer. With ``n`` the number of consecutive
skipped steps before step t::

    ok_t   = all(isfinite(g_t)) and all(isfinite(u_t))    (every element of every leaf)
    skip_t = not ok_t and (k is None or n < k)
    u_t    ← where(skip_t, 0, u_t)
    state  ← where(skip_t, state_{t-1}, state_t)          (count, learning rate, base and every
                                                            adaptation's state: all of it)
    skipped ← skipped + skip_t,   n ← where(skip_t, n + 1, 0)

A skipped step leaves the parameters and the state exactly as they were (bit for bit) and does not
advance the step counter ``t``; only ``skipped`` (``skipped_steps`` in :func:`adaptlr.lr_summary`)
and ``n`` (``consecutive_skips``) change. The decision is a 0-D mask fed to ``where``: no host sync,
the same code under ``jax.jit`` and ``torch.compile``.

With ``max_consecutive=k``, the (k+1)-th consecutive non-finite step:

- in eager mode raises ``FloatingPointError`` (parameters and state untouched). Eager mode reads
  one boolean per step for this (a device sync on a GPU); without ``max_consecutive`` nothing is read.
- under ``jax.jit`` / ``torch.compile`` (where nothing can be raised) is let through: it is applied
  as without the wrapper (the non-finite values propagate) and ``n`` restarts from 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import optree

from adaptlr import _validation as v
from adaptlr._tree import Layout
from adaptlr.core import Adaptation, Optimizer, OptimizerState, StepContext, StepSize, scalar_device

__all__ = ["SkipNonfinite", "SkipState", "skip_nonfinite", "step_was_skipped"]


class SkipState(NamedTuple):
    """State of :func:`skip_nonfinite` (0-D int32 arrays on the params' device).

    Attributes:
        skipped: the number of steps skipped so far.
        consecutive: ``n``, the number of consecutive steps skipped up to the last one (0 after a
            step that was applied).
    """

    skipped: Any
    consecutive: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"skipped_steps": self.skipped, "consecutive_skips": self.consecutive}


class SkipNonfinite(Adaptation):
    """The step guard of :func:`skip_nonfinite`; it does not change the step size."""

    name = "skip_nonfinite"
    state_class = SkipState
    # One global "all finite" decision: the same on flat buffers, not block by block.
    flat_safe = True
    blockwise = False
    shapes_step_size = False

    def __init__(self, max_consecutive: int | None) -> None:
        self.max_consecutive = max_consecutive

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> SkipState:
        zero = xp.asarray(0, dtype=xp.int32, device=scalar_device(params[0]))
        return SkipState(zero, zero)

    def step(self, ctx: StepContext, size: StepSize, state: SkipState) -> tuple[StepSize, SkipState]:
        return size, state

    def guard(
        self, ctx: StepContext, state: OptimizerState, new_state: OptimizerState, updates: list, index: int
    ) -> tuple[list, OptimizerState]:
        """Undo the step (zero updates, the old state) where a gradient or update is not finite."""
        xp = ctx.xp
        ok = _all_finite(ctx, updates)
        own = state.adaptations[index]
        n = own.consecutive
        if self.max_consecutive is None:
            skip = xp.logical_not(ok)
        else:
            at_limit = n >= self.max_consecutive
            if not v.is_traced(n):
                if bool(xp.logical_and(xp.logical_not(ok), at_limit)):
                    raise FloatingPointError(
                        f"skip_nonfinite: {self.max_consecutive + 1} consecutive steps with non-finite "
                        f"gradients or updates (max_consecutive={self.max_consecutive}); parameters and "
                        "optimizer state are left as before this step. Lower the learning rate, check the "
                        "loss for overflow, or use a larger max_consecutive"
                    )
            skip = xp.logical_and(xp.logical_not(ok), xp.logical_not(at_limit))

        updates = [xp.where(skip, ctx.scalars.constant(0.0, u.dtype), u) for u in updates]
        kept: Any = optree.tree_map(lambda old, new: xp.where(skip, old, new), cast(Any, state), cast(Any, new_state))
        one = xp.asarray(1, dtype=n.dtype, device=scalar_device(n))
        zero = xp.zeros_like(one)
        counted = SkipState(xp.where(skip, own.skipped + one, own.skipped), xp.where(skip, n + one, zero))
        adaptations = list(kept.adaptations)
        adaptations[index] = counted
        return updates, kept._replace(adaptations=tuple(adaptations))


def step_was_skipped(opt: Optimizer, state: OptimizerState, new_state: OptimizerState) -> Any:
    """A 0-D bool array: whether ``skip_nonfinite`` skipped the step from ``state`` to ``new_state``
    (None if ``opt`` has no such wrapper). For adapters that keep counters of their own outside the
    state (the torch adapter's ``state[p]["step"]``): ``where(skipped, old, new)``, no host sync."""
    for i, adaptation in enumerate(opt.adaptations):
        if isinstance(adaptation, SkipNonfinite):
            return new_state.adaptations[i].skipped > state.adaptations[i].skipped
    return None


def _all_finite(ctx: StepContext, updates: list) -> Any:
    """A 0-D bool: every element of every gradient and update is finite (no host sync).

    Inside ``jax.shard_map`` (``update(..., axis_name=...)``) each device holds one block of a
    parameter: the non-finite elements are counted and the count completed across the shards
    (``ctx.reduce``), so that every device takes the same decision.
    """
    xp, reduce = ctx.xp, ctx.reduce
    if reduce.complete is None:
        ok = None
        for x in ctx.grads + updates:
            finite = xp.all(xp.isfinite(x))
            ok = finite if ok is None else xp.logical_and(ok, finite)
        return ok
    bad = None
    for i, (g, u) in enumerate(zip(ctx.grads, updates)):
        for x in (g, u):
            count = reduce.leaf_sum(i, xp.astype(xp.logical_not(xp.isfinite(x)), xp.int32))
            bad = count if bad is None else bad + count
    return bad == 0


def skip_nonfinite(opt: Optimizer, max_consecutive: int | None = None) -> Optimizer:
    """Wrap ``opt`` so that a step with a non-finite gradient or update changes nothing.

    Args:
        opt: any adaptlr optimizer (base or already wrapped; wrapping further afterwards is fine too:
            the guard always covers the whole state).
        max_consecutive: None (skip every non-finite step), or ``k >= 0``: the (k+1)-th consecutive
            non-finite step raises ``FloatingPointError`` in eager mode and is let through under
            ``jax.jit`` / ``torch.compile`` (see the module docstring).

    Returns:
        the wrapped optimizer; its state's last adaptation entry is a :class:`SkipState`
        (``skipped_steps`` and ``consecutive_skips`` in :func:`adaptlr.lr_summary`).

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.skip_nonfinite(adaptlr.adamw(0.1))
        >>> params = {"w": np.ones(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": np.array([1.0, np.nan])}, state, params)
        >>> updates["w"], int(state.count), int(state.adaptations[-1].skipped)
        (array([0., 0.]), 0, 1)
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (for example adaptlr.adamw(...)), got {type(opt).__name__}")
    if any(isinstance(a, SkipNonfinite) for a in opt.adaptations):
        raise ValueError(f"{opt.name} is already wrapped in skip_nonfinite")
    if max_consecutive is not None:
        max_consecutive = v.check_nonnegative_int("max_consecutive", max_consecutive)
    return opt.wrapped(SkipNonfinite(max_consecutive))
