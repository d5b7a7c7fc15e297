"""AutoDrop: drop the learning rate when the angular velocity of the parameters saturates (spec §3).

"AutoDrop: Training Deep Learning Models with Automatic Learning Rate Drop", Teng, Wang,
Choromanska (2021); reference code ``yunfei-teng/AutoDrop``. A scalar multiplier κ on the learning
rate is multiplied by ``ρ`` once the epoch-to-epoch angle ω between successive displacements of the
whole parameter vector has stopped changing. With ``S`` = steps per epoch, at the first step of epoch
``e`` (``t = (e-1)·S + 1``, before that step's update, ``x_e`` = all params passed to that step)::

    s_e = x_e - x_{e-1}                                                      (e ≥ 2)
    ω_e = degrees(arccos(clip(⟨s_e, s_{e-1}⟩ / (‖s_e‖·‖s_{e-1}‖), -1, 1)))  (e ≥ 3; global over all
                                                                             tensors; undefined if
                                                                             a norm is 0)
    Δ_e = ω_e - ω_{e-1}                                                      (both defined)
    detector (:func:`autodrop_detector`):
        if not latched and |Δ_e| < θ:  latch, n ← 0
        if latched:
            n ← n + 1;  A ← A + n·x_e                                          (average=True)
            if n = E:                                                          (a drop)
                κ ← max(ρ·κ, min_lr/α)                                         (min_lr given; else ρ·κ)
                θ ← min(θ_max, θ/ρ)                                            (grow_theta=True)
                shift = A / (E(E+1)/2) - x_e,  A ← 0                           (average=True)
                unlatch, n ← 0
    u_t = shift - (α·κ) ⊙ d_t - α·λ·θ_{t-1}      (κ after the detector; the decay term ·κ only if
                                                  scale_weight_decay; shift only at a drop)

On the other steps of an epoch nothing changes and ``u_t = -(α·κ) ⊙ d_t - α·λ·θ_{t-1}``. Every
decision is a 0-D mask fed to ``where``, so one compiled step serves every ``t`` (the displacement
and its dot products are computed at every step and used only at epoch starts). The state holds
``x_{e-1}``, ``s_{e-1}`` and the running weighted sum ``A``, never E snapshots. The dot products and
norms are accumulated in float64 where the backend has float64 (not JAX without
``jax_enable_x64``, not PyTorch on MPS), else in the widest parameter dtype.

The floor is spec §3's ``κ ← max(ρ·κ, min_lr/α)``, as in the authors' code: a floor on the rate after
a drop. If ``α·κ`` was already below ``min_lr`` (a learning rate smaller than ``min_lr`` from the
start), a drop *raises* it to ``min_lr``; choose ``min_lr`` below your learning rate.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._boundary import at_boundary, carry_after, is_carrying
from adaptlr._inplace import add_, copy_untracked
from adaptlr._precision import widest_float
from adaptlr._tree import Layout
from adaptlr.core import Adaptation, Optimizer, StepContext, StepSize, scalar_device

__all__ = [
    "AutoDrop",
    "AutoDropState",
    "DetectorOptions",
    "DetectorState",
    "autodrop",
    "autodrop_detector",
    "displacement_angle",
]

_INT32_MAX = 2**31 - 1
_DEGREES_PER_RADIAN = 180.0 / math.pi


class DetectorState(NamedTuple):
    """What the drop detector remembers between epochs (0-D arrays).

    Attributes:
        omega: ``ω`` of the last epoch start, in degrees (NaN while undefined).
        omega_defined: whether ``omega`` is defined (epoch ≥ 3 and both displacements non-zero).
        theta: the current threshold ``θ`` on ``|Δ|``, in degrees.
        latched: whether ``|Δ| < θ`` has been seen and the patience count is running.
        latched_epochs: ``n``, the epochs counted since the latch (0 when not latched).
        kappa: the multiplier ``κ`` on the learning rate (1 before the first drop).
        drop_count: how many drops have happened.
    """

    omega: Any
    omega_defined: Any
    theta: Any
    latched: Any
    latched_epochs: Any
    kappa: Any
    drop_count: Any


class DetectorOptions(NamedTuple):
    """The detector's fixed options: ``ρ``, ``E``, ``θ_max`` and whether θ grows at a drop."""

    drop_factor: float
    patience_epochs: int
    theta_max: float
    grow_theta: bool


def displacement_angle(dot: Any, sq_norm: Any, prev_sq_norm: Any, xp: Any = None) -> tuple[Any, Any]:
    """``(ω in degrees, defined)`` from ``⟨s_e, s_{e-1}⟩``, ``‖s_e‖²`` and ``‖s_{e-1}‖²`` (0-D arrays).

    ω is ``degrees(arccos(clip(dot / (‖s_e‖·‖s_{e-1}‖), -1, 1)))``; where a norm is zero it is
    undefined: ``defined`` is False and ω is NaN (no division by zero is evaluated).

    Args:
        dot: the global dot product of the two displacements.
        sq_norm, prev_sq_norm: their global squared norms.
        xp: the array namespace (default: that of ``dot``).
    """
    xp = xp or v.namespace_of(dot)
    defined = xp.logical_and(sq_norm > 0, prev_sq_norm > 0)
    one = xp.ones_like(dot)
    denominator = xp.where(defined, xp.sqrt(sq_norm) * xp.sqrt(prev_sq_norm), one)
    cosine = xp.clip(dot / denominator, -1.0, 1.0)
    omega = xp.acos(cosine) * _DEGREES_PER_RADIAN
    return xp.where(defined, omega, xp.full_like(omega, math.nan)), defined


def autodrop_detector(
    omega: Any,
    omega_defined: Any,
    state: DetectorState,
    options: DetectorOptions,
    min_kappa: Any | None = None,
    xp: Any = None,
) -> DetectorState:
    """One epoch of the AutoDrop detector (spec §3, steps 1 and 2): the state after seeing ``ω_e``.

    A pure function of 0-D arrays with no Python branching on their values, used by
    :class:`AutoDrop` at every epoch start and callable directly with a sequence of angles. A drop
    happened in this epoch exactly when the returned ``drop_count`` is larger than ``state``'s.

    Args:
        omega: ``ω_e`` in degrees (any value where undefined).
        omega_defined: whether ``ω_e`` is defined (a 0-D bool array); with ``state.omega_defined``
            it decides whether ``Δ_e = ω_e - ω_{e-1}`` exists. An undefined Δ never latches.
        state: the detector state after epoch ``e-1``.
        options: ``ρ``, ``E``, ``θ_max``, ``grow_theta``.
        min_kappa: ``min_lr/α`` (0-D array), or None for no floor. A drop sets
            ``κ ← max(ρ·κ, min_kappa)`` (spec §3).
        xp: the array namespace (default: that of ``state.theta``).
    """
    xp = xp or v.namespace_of(state.theta)
    # 1. Latch on a small change of ω (strict <; an undefined Δ compares as False).
    delta_defined = xp.logical_and(omega_defined, state.omega_defined)
    delta = xp.where(delta_defined, omega - state.omega, xp.zeros_like(state.theta))
    small = xp.logical_and(delta_defined, xp.abs(delta) < state.theta)
    latched = xp.logical_or(state.latched, small)
    # 2. Count the latched epochs; drop after E of them.
    latched_epochs = state.latched_epochs + xp.astype(latched, state.latched_epochs.dtype)
    drop = xp.logical_and(latched, latched_epochs == options.patience_epochs)
    dropped_kappa = options.drop_factor * state.kappa
    if min_kappa is not None:
        dropped_kappa = xp.maximum(dropped_kappa, min_kappa)
    theta = state.theta
    if options.grow_theta:
        grown = xp.minimum(theta / options.drop_factor, xp.full_like(theta, options.theta_max))
        theta = xp.where(drop, grown, theta)
    return DetectorState(
        omega=xp.where(omega_defined, omega, xp.full_like(state.omega, math.nan)),
        omega_defined=omega_defined,
        theta=theta,
        latched=xp.logical_and(latched, xp.logical_not(drop)),
        latched_epochs=xp.where(drop, xp.zeros_like(latched_epochs), latched_epochs),
        kappa=xp.where(drop, dropped_kappa, state.kappa),
        drop_count=state.drop_count + xp.astype(drop, state.drop_count.dtype),
    )


class AutoDropState(NamedTuple):
    """State of AutoDrop.

    Attributes:
        previous_params: ``x_{e-1}``, the params at the start of the last epoch (a tree like params).
        previous_displacement: ``s_{e-1}`` (a tree like params).
        previous_sq_norm: ``‖s_{e-1}‖²`` (0-D, accumulation dtype).
        weighted_param_sum: ``A``, the running weighted sum ``Σ n·x`` of the latched epochs (a tree
            like params), or None without averaging.
        omega, omega_defined, theta, latched, latched_epochs, kappa, drop_count: the
            :class:`DetectorState` fields (0-D; ``theta``, ``omega`` and ``kappa`` in the
            accumulation dtype: float64 where the backend has it).
    """

    previous_params: Any
    previous_displacement: Any
    previous_sq_norm: Any
    weighted_param_sum: Any
    omega: Any
    omega_defined: Any
    theta: Any
    latched: Any
    latched_epochs: Any
    kappa: Any
    drop_count: Any

    @property
    def detector(self) -> DetectorState:
        """The detector's part of the state."""
        return DetectorState(*(getattr(self, name) for name in DetectorState._fields))

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        """``α·κ`` with the κ the last step used (spec §0.1)."""
        return size.scaled_by(self.kappa)

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {
            "omega": self.omega,
            "theta": self.theta,
            "latched": self.latched,
            "drop_count": self.drop_count,
            "kappa": self.kappa,
        }


class AutoDrop(Adaptation):
    """The AutoDrop adaptation; build it with :func:`autodrop`."""

    name = "autodrop"
    state_class = AutoDropState
    # sums through ctx.reduce.total, none depending on another: replayable over chunks
    # (adaptlr.backends.fast.sums_replayable); and only at epoch boundaries (adaptlr.backends.fast.sums_rarely)
    replayable_sums = True
    sums_every_step = False

    def __init__(self, steps_per_epoch: int, options: DetectorOptions, theta: float, min_lr: float | None,
                 average: bool, scale_weight_decay: bool) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.options = options
        self.theta = theta
        self.min_lr = min_lr
        self.average = average
        self.scale_weight_decay = scale_weight_decay

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> AutoDropState:
        device = scalar_device(params[0])
        acc = widest_float(xp, device)

        def scalar(value: Any, dtype: Any) -> Any:
            return xp.asarray(value, dtype=dtype, device=device)

        return AutoDropState(
            previous_params=layout.tree([xp.zeros_like(p) for p in params]),
            previous_displacement=layout.tree([xp.zeros_like(p) for p in params]),
            previous_sq_norm=scalar(0.0, acc),
            weighted_param_sum=layout.tree([xp.zeros_like(p) for p in params]) if self.average else None,
            omega=scalar(math.nan, acc),
            omega_defined=scalar(False, xp.bool),
            theta=scalar(self.theta, acc),
            latched=scalar(False, xp.bool),
            latched_epochs=scalar(0, xp.int32),
            kappa=scalar(1.0, acc),
            drop_count=scalar(0, xp.int32),
        )

    def _epoch_start(self, t: int) -> bool:
        """Whether step ``t`` starts an epoch (``epoch_start`` of :meth:`step`, on the host)."""
        return (t - 1) % self.steps_per_epoch == 0

    def step(self, ctx: StepContext, size: StepSize, state: AutoDropState) -> tuple[StepSize, AutoDropState]:
        xp, layout, scalars, S = ctx.xp, ctx.layout, ctx.scalars, self.steps_per_epoch
        acc = state.kappa.dtype
        t = ctx.count
        epoch_start = scalars.per_step(("epoch_start", S), lambda: (t - 1) % S == 0)

        xs = ctx.params
        old = state.detector

        def wide(x: Any) -> Any:
            return xp.astype(x, acc, copy=False)

        def boundary(prev_xs: list, prev_ss: list, prev_sq_norm: Any, old: DetectorState) -> tuple:
            """An epoch start: s_e = x_e - x_{e-1}, the angle ω from the global sums ⟨s_e, s_{e-1}⟩ and
            ‖s_e‖², the detector's new state; x_e and s_e kept for the next epoch start."""
            displacements = [x - x_prev for x, x_prev in zip(xs, prev_xs)]
            dot_terms, sq_terms = displacements, displacements
            carried = is_carrying(xs)
            if carried:
                # In the body of the loop under jax.jit: s_e made by each reader, ‖s_e‖² from
                # x_{e-1} - x_e = -s_e (the same squares), so that no two readers share one s_e or its
                # float64 conversion, which XLA would keep for every tensor at once (104 MiB of
                # temporaries on ResNet-18 shapes, round 26); the s_e kept is made after the sums.
                dot_terms = (x - x_prev for x, x_prev in zip(xs, prev_xs))
                sq_terms = (x_prev - x for x, x_prev in zip(xs, prev_xs))
            dot = ctx.reduce.total(wide(s) * wide(s_prev) for s, s_prev in zip(dot_terms, prev_ss))
            sq_norm = ctx.reduce.total(wide(s) * wide(s) for s in sq_terms)
            omega, defined = displacement_angle(dot, sq_norm, prev_sq_norm, xp)
            has_omega = (t - 1) // S >= 2  # epoch e ≥ 3, without forming (e-1)·S in int32
            defined = xp.logical_and(defined, has_omega)
            min_kappa = None
            if self.min_lr is not None:
                alpha = xp.astype(ctx.alpha[0], acc)
                positive = alpha > 0
                min_kappa = xp.where(positive, self.min_lr / xp.where(positive, alpha, xp.ones_like(alpha)),
                                     xp.zeros_like(alpha))
            new = autodrop_detector(omega, defined, old, self.options, min_kappa, xp)
            detector = DetectorState(*(xp.where(epoch_start, n, o) for n, o in zip(new, old)))
            # Under jax.jit the fields are the carry of a loop, each written in place (where the state
            # is donated) once what reads its old value is made: s_e after the sums read s_{e-1}, x_e
            # after s_e read x_{e-1} (adaptlr._boundary.carrying; nothing is done elsewhere)
            if carried:
                displacements = [x - x_prev for x, x_prev in zip(xs, carry_after(xp, prev_xs, [dot, sq_norm]))]
            # (the snapshot: not the caller's array, which may change in place, nor autograd's record of
            # it, as torch.optim's state; not through first elements inside shard_map: each device's own)
            snapshot = carry_after(xp, [copy_untracked(xp, x) for x in xs], displacements,
                                   first_elements=ctx.reduce.complete is None)
            return snapshot, displacements, xp.where(epoch_start, sq_norm, prev_sq_norm), detector

        # Only at an epoch start (a Python branch on the host-side count, a loop run at most once under JAX; _boundary).
        # Otherwise the snapshot, displacement, norm and detector come back unchanged.
        previous_params, previous_displacement, previous_sq_norm, detector = at_boundary(
            xp, epoch_start, boundary,
            (layout.leaves(state.previous_params, "state.previous_params"),
             layout.leaves(state.previous_displacement, "state.previous_displacement"), state.previous_sq_norm, old),
            scalars, due=self._epoch_start)
        # (once per step where the detector came back unchanged: Scalars.once)
        dropped = scalars.once(("autodrop dropped", id(self)), (detector.drop_count, old.drop_count),
                               lambda after, before: after != before)

        shift = size.shift
        weighted_sum = None
        if self.average:
            # The weight of x_e: n after this epoch's increment (E at a drop, 0 when not latched), and
            # only at an epoch start: the other steps of a latched epoch add nothing to A.
            patience = self.options.patience_epochs
            no_weight = xp.zeros_like(detector.latched_epochs)
            weight = xp.where(dropped, xp.full_like(detector.latched_epochs, patience),
                              xp.where(detector.latched, detector.latched_epochs, no_weight))
            weight = xp.where(epoch_start, weight, no_weight)
            total = patience * (patience + 1) / 2
            sums, shifts = [], []
            for x, a, old_shift in zip(xs, layout.leaves(state.weighted_param_sum, "state.weighted_param_sum"),
                                       size.shift):
                zero = scalars.constant(0.0, x.dtype)
                a = add_(xp.astype(weight, x.dtype) * x, a)
                jump = xp.where(dropped, a / scalars.constant(total, x.dtype) - x, zero)
                shifts.append(jump if old_shift is None else old_shift + jump)
                sums.append(xp.where(dropped, zero, a))
            shift = tuple(shifts)
            weighted_sum = layout.tree(sums)

        new_state = AutoDropState(
            previous_params=layout.tree(previous_params),
            previous_displacement=layout.tree(previous_displacement),
            previous_sq_norm=previous_sq_norm,
            weighted_param_sum=weighted_sum,
            **detector._asdict(),
        )
        # This step uses the κ after the detector.
        kappas = [scalars.per_dtype("autodrop_kappa", x.dtype, lambda dt: xp.astype(detector.kappa, dt)) for x in xs]
        size = size.scaled(kappas, weight_decay_too=self.scale_weight_decay)._replace(shift=shift)
        return size, new_state


def autodrop(
    opt: Optimizer,
    steps_per_epoch: int,
    drop_factor: float = 0.2,
    theta: float = 0.01,
    theta_max: float = 1.0,
    grow_theta: bool = True,
    patience_epochs: int = 20,
    min_lr: float | None = None,
    average: bool = False,
    scale_weight_decay: bool = False,
) -> Optimizer:
    """Wrap ``opt`` in AutoDrop (spec §3): drop its learning rate when the parameters' angular velocity saturates.

    Args:
        opt: any adaptlr optimizer (the paper used SGD with Nesterov momentum; Adam-type bases work too).
        steps_per_epoch: ``S``, the number of ``update`` calls per epoch (usually ``len(train_loader)``),
            a positive integer. The detector runs at the first step of every epoch.
        drop_factor: ``ρ`` in (0, 1): the factor on κ at a drop (the paper: 0.2 on CIFAR, 0.1 on ImageNet).
        theta: ``θ_0`` > 0, in degrees: the detector latches when ``|ω_e - ω_{e-1}| < θ``. The
            paper's 0.01 suits models with millions of parameters; the epoch-to-epoch noise of ω
            scales like ``1/sqrt(#params)``, so small models need a larger θ (see the docs).
        theta_max: ``θ_max`` >= ``theta``, in degrees: the cap on θ when it grows.
        grow_theta: at each drop, ``θ ← min(θ_max, θ/ρ)``.
        patience_epochs: ``E``, a positive integer: the drop comes ``E`` epochs after the latch
            (the latch epoch counts as the first).
        min_lr: if given (>= 0), a drop does not take ``α·κ`` below ``min_lr`` (α: the user's
            learning rate of the first parameter at that step). The paper used 1e-4.
        average: at a drop, replace the params by the weighted average ``Σ n·x_n / (E(E+1)/2)`` of
            the ``E`` epoch-start params since the latch (the paper's runs did).
        scale_weight_decay: multiply the base's decoupled weight decay ``-α·λ·θ`` by κ too (default:
            decoupled decay keeps the user's α). Coupled (L2) decay is inside the direction.

    Returns:
        the wrapped optimizer; ``adaptlr.learning_rates(state)`` gives ``α·κ``; the AutoDrop state
        (``state.adaptations[i]``) holds ``omega``, ``theta``, ``latched``, ``drop_count``, ``kappa``.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.autodrop(adaptlr.sgd(0.1, momentum=0.9, nesterov=True), steps_per_epoch=100,
        ...                        min_lr=1e-4, average=True)
        >>> state = opt.init({"w": np.ones(3)})
        >>> float(state.adaptations[0].kappa)
        1.0
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (for example adaptlr.sgd(...)), got {type(opt).__name__}")
    steps_per_epoch = v.check_positive_int("steps_per_epoch", steps_per_epoch)
    if steps_per_epoch > _INT32_MAX:
        raise ValueError(f"steps_per_epoch must be < 2**31 (the step counter is int32), got {steps_per_epoch}")
    drop_factor = v.check_range("drop_factor", drop_factor, 0.0, 1.0, low_open=True, high_open=True)
    theta = v.check_positive("theta", theta)
    theta_max = v.check_positive("theta_max", theta_max)
    if theta_max < theta:
        raise ValueError(f"theta_max ({theta_max}) must be >= theta ({theta})")
    patience_epochs = v.check_positive_int("patience_epochs", patience_epochs)
    if patience_epochs > _INT32_MAX:
        raise ValueError(f"patience_epochs must be < 2**31 (the latch count is int32), got {patience_epochs}")
    if min_lr is not None:
        min_lr = v.check_nonnegative("min_lr", min_lr)
    for name, flag in (("grow_theta", grow_theta), ("average", average), ("scale_weight_decay", scale_weight_decay)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    options = DetectorOptions(drop_factor, patience_epochs, theta_max, grow_theta)
    return opt.wrapped(AutoDrop(steps_per_epoch, options, theta, min_lr, average, scale_weight_decay))
