"""The functional optimizer: a base direction times a learning rate (spec §0.1).

Every optimizer in adaptlr computes

    u_t = shift_t - (α_t · κ_t) ⊙ d_t - α_t · λ · κ^decay_t ⊙ θ_{t-1}

where ``d_t`` is the base optimizer's learning-rate-free direction (:class:`BaseDirection`), ``α_t``
the user's learning rate (a float or a schedule of t), ``κ_t`` the product of the multipliers of the
adaptations wrapped around the base (:class:`Adaptation`) and, for a learning-rate-free base
(Prodigy, D-Adaptation, DoG), of the base's own estimate (:meth:`BaseDirection.step`), ``λ`` the
decoupled weight decay (scaled by ``κ`` only where an adaptation or the base's estimate says so), and
``shift_t`` an additive parameter shift that only AutoDrop's averaging uses. Coupled (L2) decay is
part of ``d_t`` (``g ← g + λθ``).

One step runs in this order: each adaptation's :meth:`Adaptation.before_direction` (work that needs
only the step's inputs: HD's rate, EG's scale), the base's direction and step size, each
adaptation's :meth:`Adaptation.step` (innermost first), the update ``u_t``, then the wrappers below.

An :class:`UpdateWrapper` (Schedule-Free, Mechanic) wraps a whole optimizer: it sees the update
``u_t`` above (and the step size that made it) and returns the update actually applied,
``u'_t = W(u_t, θ_{t-1}, state)``; wrappers apply innermost first, after every adaptation.

The public surface is optax-like::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = adaptlr.apply_updates(params, updates)

Params are pytrees of arrays of one array library on one device; everything below is written
against the Python array API and runs on NumPy, array-api-strict, PyTorch, JAX and CuPy arrays.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import optree

from adaptlr import _validation as v
from adaptlr._inplace import add_, add_scaled_, mul_, sub_
from adaptlr._ordering import ordered_after
from adaptlr._precision import cast_like, computed_once, counter_dtype, next_count, widest_float
from adaptlr._reduce import Reducer, leaf_split_axes
from adaptlr._tree import Layout

__all__ = [
    "Adaptation",
    "BaseDirection",
    "Optimizer",
    "OptimizerState",
    "Scalars",
    "StepContext",
    "StepSize",
    "UpdateWrapper",
    "apply_updates",
    "learning_rates",
    "scalar_device",
]

Array = Any
PyTree = Any
Schedule = Callable[[Array], Any]


class OptimizerState(NamedTuple):
    """State of any adaptlr optimizer.

    Attributes:
        count: the step counter ``t`` of the last update (0 after ``init``), a 0-D int64 array
            (int32 for JAX without ``jax_enable_x64``, saturating at 2**31 - 1, see
            :func:`adaptlr._precision.next_count`).
        learning_rate: ``α`` per parameter (a tree shaped like the params of 0-D arrays in each
            parameter's state dtype, one buffer per leaf): the user's learning rate of the last
            step, or of the first step after ``init`` (a schedule's ``α_t``).
        base: the base optimizer's state (for example :class:`adaptlr.adam.AdamState`).
        adaptations: one state per wrapped adaptation, innermost first.
    """

    count: Array
    learning_rate: PyTree
    base: NamedTuple
    adaptations: tuple


class StepSize(NamedTuple):
    """The learning rate of one step, per parameter leaf, as the adaptations shape it.

    For leaf ``i`` the step is ``-(alpha[i] · scale[i] · kappa[i]) ⊙ d`` (``None`` stands for 1;
    ``scale[i]`` holds the 0-D factors and those given with ``first=True``, ``kappa[i]`` the
    others, so that the small ones are multiplied together with ``α`` before they meet a full-size
    factor: one pass over it, not one per small factor), the decoupled weight decay is
    ``-α_user · λ · decay_kappa[i] ⊙ θ``, and ``shift[i]`` (``None``: no shift) is added to the
    update. Adaptations return a new ``StepSize`` from the one they are given: multiplicative ones
    call :meth:`scaled`, hypergradient descent replaces ``alpha``; :meth:`factors` gives
    ``scale·kappa``. An adaptation that computes the step ``-(α·scale·κ) ⊙ d`` for its own use
    hands it over with :meth:`with_step`, and the update takes
    it instead of computing it again (:meth:`known_step`).
    """

    alpha: tuple
    kappa: tuple
    decay_kappa: tuple
    shift: tuple
    scale: tuple
    step_memo: tuple | None = None

    @classmethod
    def of(cls, alpha: Sequence[Array]) -> StepSize:
        none = (None,) * len(alpha)
        return cls(tuple(alpha), none, none, none, none)

    def scaled(self, factors: Sequence[Array | None], *, weight_decay_too: bool = False,
               first: bool = False) -> StepSize:
        """Multiply ``kappa`` (and ``decay_kappa`` if ``weight_decay_too``) by ``factors`` per leaf
        (a 0-D factor multiplies ``scale`` instead: the same step, computed with fewer passes).

        ``first=True``: every factor multiplies ``scale``, so it meets ``α`` before the factors in
        ``kappa`` (the same step up to rounding): for factors smaller than their leaf that a larger
        factor of the same adaptation multiplies next (DSA's tensor·row factor, then its column
        factor: ``α·κ`` in one full-size pass, not two)."""
        scale, kappa = list(self.scale), list(self.kappa)
        for i, f in enumerate(factors):
            if f is not None and (first or getattr(f, "ndim", 0) == 0):  # 0-D, or a Python number
                scale[i] = _times(scale[i], f)
            else:
                kappa[i] = _times(kappa[i], f)
        decay = self.decay_kappa
        if weight_decay_too:
            decay = tuple(_times(k, f) for k, f in zip(decay, factors))
        return self._replace(kappa=tuple(kappa), decay_kappa=decay, scale=tuple(scale))

    def factors(self) -> list[Array | None]:
        """``scale·kappa`` per leaf: everything the adaptations multiplied ``alpha`` by (None: 1)."""
        return [_times(s, k) for s, k in zip(self.scale, self.kappa)]

    def scaled_by(self, factor: Array, *, weight_decay_too: bool = False) -> StepSize:
        """:meth:`scaled` by one 0-D ``factor`` for every leaf, cast to each leaf's ``α`` dtype."""
        xp = v.namespace_of(factor)
        return self.scaled(cast_like(xp, factor, self.alpha), weight_decay_too=weight_decay_too)

    def effective(self) -> list[Array]:
        """``α·scale·κ`` per leaf (0-D where κ is 1), the 0-D factors multiplied first."""
        return [_times(_times(a, s), k) for a, s, k in zip(self.alpha, self.scale, self.kappa)]

    def with_step(self, steps: Sequence[Array]) -> StepSize:
        """This size with ``steps[i] = -(α·scale·κ)[i] ⊙ d_i`` (the step before decay and shift),
        which the caller computed anyway: the update uses it instead of multiplying again. It holds
        while ``alpha``, ``scale`` and ``kappa`` stay these tuples (:meth:`scaled` or a new ``alpha``
        makes new ones, and the update computes the step itself again)."""
        return self._replace(step_memo=(self.alpha, self.scale, self.kappa, tuple(steps)))

    def known_step(self) -> tuple | None:
        """The steps given to :meth:`with_step` if ``alpha``, ``scale`` and ``kappa`` are still the
        tuples they were computed from, else None."""
        memo = self.step_memo
        if memo is None or memo[0] is not self.alpha or memo[1] is not self.scale or memo[2] is not self.kappa:
            return None
        return memo[3]


def _times(a: Array | None, b: Array | None) -> Array | None:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


def _negative_rate(scalars: Scalars, alpha: Array, scale: Array | None, kappa: Array | None) -> Array:
    """``(-α·scale)·κ``: computed once per step where all three are 0-D (the parts of a blocked step
    share them), else per leaf. ``-(α·κ)`` as ``(-α)·κ`` is the same number (rounding is symmetric in
    the sign), without a pass to negate a full-size κ (ActiveLR, DSA, element-wise HD)."""
    def make(a: Array, s: Array | None, k: Array | None) -> Array:
        return _times(_times(-a, s), k)  # type: ignore[return-value]  # α is never None

    if all(x is None or x.ndim == 0 for x in (scale, kappa)):
        return scalars.once("negative_rate", (alpha, scale, kappa), make)
    return make(alpha, scale, kappa)


def _subtract_decay(scalars: Scalars, u: Array, alpha: Array, decay_kappa: Array | None, lam: float, p: Array) -> Array:
    """``u - α·κ^decay·λ ⊙ θ``, the decoupled weight decay, written into ``u`` (the step's own update).

    A 0-D factor is computed once per step (as in :func:`_negative_rate`) and negated there:
    ``u + (-(αλ))·θ`` is the same number as ``u - (αλ)·θ``, and one fused pass on torch
    (:func:`adaptlr._inplace.add_scaled_`); a full-size one (κ^decay per element) is written into
    by the product."""
    def make(a: Array, k: Array | None) -> Array:
        return _times(a, k) * lam  # type: ignore[operator]

    if decay_kappa is None or decay_kappa.ndim == 0:
        negative = scalars.once(("negative decay", lam), (alpha, decay_kappa), lambda a, k: -make(a, k))
        return add_scaled_(u, p, negative)
    return sub_(u, mul_(make(alpha, decay_kappa), p))


class StepContext(NamedTuple):
    """What every adaptation sees during a step (leaf lists in params order).

    Attributes:
        xp: the array namespace of the params.
        layout: the tree structure of the params.
        count: ``t`` of this step (1 on the first update), a 0-D integer array.
        grads: the raw gradients ``g_t`` (in the state dtype).
        objective_grads: the gradient of what the base minimises (``g_t + λθ`` under coupled decay).
        directions: the base directions ``d_t``.
        params: the parameters ``θ_{t-1}`` the gradients were computed at (in the state dtype).
        alpha: the user's learning rate ``α_t`` per leaf (0-D arrays in the leaf's state dtype).
        scalars: 0-D helper arrays on the params' device.
        reduce: every sum over parameter elements goes through it (:class:`adaptlr._reduce.Reducer`:
            ``xp.sum``, completed across the shards of a parameter inside ``shard_map``).
    """

    xp: Any
    layout: Layout
    count: Array
    grads: list
    objective_grads: list
    directions: list
    params: list
    alpha: list
    scalars: Scalars
    reduce: Reducer


class Scalars:
    """0-D arrays on the params' device, made once per dtype and step (no host syncs).

    Step scalars (bias corrections, rectification, schedules) are computed from :attr:`t`, the step
    in :attr:`wide` (the widest float on the device, see :mod:`adaptlr._precision`), and cast once
    to the dtype of the tensors they meet (:meth:`step_scalars`).
    """

    __slots__ = ("_cache", "count", "device", "directions_into", "donated", "t", "wide", "xp")

    def __init__(self, xp: Any, count: Array, device: Any) -> None:
        self.xp = xp
        self.count = count
        self.device = device
        self.wide = widest_float(xp, device)
        self.t = xp.astype(count, self.wide)
        self._cache: dict = {}
        # ids of the state arrays the executor lets this step write into (adaptlr._inplace.donating;
        # one set, changed in place, shared with the scalars of with_count)
        self.donated: set[int] = set()
        # id(objective gradient of a leaf) -> an array its base direction may be written into (a
        # donated state field that keeps the direction, HD's d_{t-1}: adaptlr._inplace.div_into_donated);
        # set by an adaptation in before_direction, cleared by each update_leaves call, shared as donated
        self.directions_into: dict[int, Any] = {}

    @classmethod
    def of_step(cls, xp: Any, state: OptimizerState, params: Sequence[Array]) -> Scalars:
        """The scalars of the step that ``update_leaves(..., state, params)`` takes (count ``t + 1``).

        An execution path that runs one step over parts of the params (blocks of a flat buffer)
        makes them once and passes them to every part's ``update_leaves``, so the step scalars are
        computed once per step, not once per part. Only within one pass over the parts: a value
        cached from a sum (AutoDrop's κ) is the whole model's only where the sums are.
        """
        return cls(xp, next_count(xp, state.count), scalar_device(params[0]))

    def with_count(self, count: Array) -> Scalars:
        """The scalars of the same step for another count (the torch adapter's per-parameter step
        counts), made once per count array and kept with these: the parts of one step that share
        these scalars share those too."""
        made = self._cache.setdefault("with_count", [])  # by identity, not id(): torch.compile guards on ids
        for scalars in made:
            if scalars.count is count:
                return scalars
        made.append(Scalars(self.xp, count, self.device))
        made[-1].donated = self.donated  # the same set: what is donated to the step, is to its parts
        made[-1].directions_into = self.directions_into
        return made[-1]

    def constant(self, value: float, dtype: Any) -> Array:
        key = (value, dtype)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self.xp.asarray(value, dtype=dtype, device=self.device)
        return found

    def per_step(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, a 0-D function of the step count and hyper-parameters only (an epoch-boundary
        test), computed once per step under ``key`` (hashable; it names the hyper-parameters)."""
        key = ("per_step", key)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def once(self, key: Any, inputs: Sequence[Any], make: Callable[..., Any]) -> Any:
        """``make(*inputs)``: 0-D results of 0-D ``inputs`` (state fields every leaf shares, the step's
        sums over the whole model, step scalars), computed once for the same input arrays.

        An execution path that runs one step over parts of the model (blocks of a flat buffer,
        chunks of the lists) gives every part these scalars (:meth:`of_step`), the same 0-D state
        fields and, in its second pass, the same whole-model sums: the first part computes, the
        others reuse, instead of repeating the step's 0-D work (a learning-rate-free base's ``d``)
        once per part. The inputs are compared by identity, so a part whose sums are its own (a
        first pass's partial sums, the per-tensor sums of a row block) computes its own. ``key``
        (hashable) names the computation; the last inputs seen under it are kept.
        """
        inputs = tuple(inputs)
        found = self._cache.get(("once", key))
        if found is not None and len(found[0]) == len(inputs) and all(a is b for a, b in zip(found[0], inputs)):
            return found[1]
        made = make(*inputs)
        self._cache[("once", key)] = (inputs, made)
        return made

    def per_dtype(self, name: str, dtype: Any, make: Callable[[Any], Any]) -> Any:
        """``make(dtype)``, computed once per step and dtype under ``name``."""
        key = (name, dtype)
        if key not in self._cache:
            made = make(dtype)
            self._cache[key] = (tuple(computed_once(x) for x in made) if isinstance(made, tuple)
                                else computed_once(made))
        return self._cache[key]

    def step_scalars(self, name: str, dtype: Any, make: Callable[[Array], Any]) -> Any:
        """``make(t)`` with ``t`` the step in the widest float, its float results cast to ``dtype``.

        ``make`` returns one 0-D array or a tuple of them; it runs once per step (not per dtype),
        and boolean results (``ρ_t > 5``) are returned as they are.
        """
        wide = self._cache.get((name, None))
        if wide is None:
            wide = self._cache[(name, None)] = make(self.t)
        return self.per_dtype(name, dtype, lambda dt: _cast_floats(self.xp, wide, dt))


def _cast_floats(xp: Any, values: Any, dtype: Any) -> Any:
    if isinstance(values, tuple):
        return tuple(_cast_floats(xp, x, dtype) for x in values)
    if values.dtype == dtype or not xp.isdtype(values.dtype, "real floating"):
        return values
    return xp.astype(values, dtype)


class BaseDirection(abc.ABC):
    """A base optimizer: the learning-rate-free direction ``d_t`` of spec §1.

    Subclasses set ``name``, ``state_class``, the hyper-parameters, ``learning_rate``,
    ``weight_decay`` and ``decoupled`` (True: the ``-αλθ`` term of spec §0.1; False: coupled L2 decay,
    ``g ← g + λθ`` before :meth:`direction`), and implement :meth:`init` and :meth:`direction` on
    leaf lists.
    """

    name: str
    state_class: type
    learning_rate: float | Schedule
    weight_decay: float = 0.0
    decoupled: bool = False

    @abc.abstractmethod
    def init(self, params: list, layout: Layout, xp: Any) -> NamedTuple:
        """The state before the first step."""

    def scalar_condition(self) -> float:
        """How much the step scalars amplify a relative rounding error of ``β^t``: ``max |∂ log s / ∂ log β^t|``.

        1 for bases without step scalars; used by the tolerance rule of
        :mod:`adaptlr.conformance.tolerances` (an ulp of a backend's ``pow`` times this is the
        relative error of the step size it causes).
        """
        return 1.0

    def direction(
        self, grads: list, state: NamedTuple, scalars: Scalars, layout: Layout
    ) -> tuple[list, NamedTuple]:
        """``(d_t per leaf, new state)`` from the objective gradients ``g_t (+ λθ)``.

        Every base implements this or :meth:`step`.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither direction nor step")

    def step(self, ctx: StepContext, size: StepSize, state: NamedTuple) -> tuple[list, StepSize, NamedTuple]:
        """``(d_t per leaf, step size, new state)``: the base's part of the step.

        The default is :meth:`direction` on ``ctx.objective_grads`` with ``size`` unchanged. A
        learning-rate-free base (Prodigy, D-Adaptation, DoG) overrides it: it reads the parameters
        and makes global sums (``ctx.reduce``; ``ctx.directions`` is empty here, the base makes them),
        and multiplies ``size`` by its own estimate (``size.scaled(...)``: the base's κ). Its state
        then has ``scale_learning_rate`` and ``signals`` methods as an adaptation's state has, so
        that :func:`learning_rates` and ``lr_summary`` include the estimate.
        """
        directions, state = self.direction(ctx.objective_grads, state, ctx.scalars, ctx.layout)
        return directions, size, state

    def row_block_temporaries(self, ndim: int) -> int | None:
        """How many arrays of a row block's size this base adds to those alive at once when the torch
        adapter runs a tensor of ``ndim`` dimensions in blocks of its rows (measured:
        :func:`adaptlr.backends.fast.row_block_live_temporaries`); None: not measured."""
        return None


class Adaptation(abc.ABC):
    """A learning-rate adaptation wrapped around an optimizer (ActiveLR, AutoDrop, HD, DSA, EG).

    ``step`` receives the :class:`StepContext` (raw gradient, base direction, parameters) and the
    :class:`StepSize` of the optimizer it wraps, and returns the step size to use plus its new
    state. Its state is a NamedTuple of arrays that also has a method
    ``scale_learning_rate(size: StepSize, layout: Layout) -> StepSize`` giving the learning rate as
    the state holds it after the last update, so that :func:`learning_rates` needs only the state,
    and a method ``signals(layout: Layout) -> dict[str, Any]`` naming the algorithm's own quantities
    for logging (``{"gamma": tree}`` for ActiveLR, ``{"omega": ..., "theta": ...}`` for AutoDrop):
    each value is a tree shaped like the params or a single array.
    """

    name: str
    state_class: type

    def check_base(self, base: BaseDirection) -> None:  # noqa: B027 - optional hook
        """Raise if this adaptation cannot wrap ``base`` (for example a schedule it replaces)."""

    @abc.abstractmethod
    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> NamedTuple:
        """The state before the first step (``alpha``: the learning rate of the first step)."""

    def before_direction(self, ctx: StepContext, state: NamedTuple) -> NamedTuple:
        """The work of this step that needs only its inputs, done before the base direction.

        ``ctx`` has the gradients, parameters and learning rates (``ctx.directions`` is still
        empty); the state returned here is the one :meth:`step` gets. An adaptation whose sums
        over elements need nothing else (HD's ``⟨g_t, d_{t-1}⟩``, EG's ``⟨v_{t-1}, g_t⟩``) makes
        them here, so that a path that runs one step over parts in two passes
        (:mod:`adaptlr.backends.part_sums`), which ends a part's first pass at its last sum, reads
        only what the sums read in that pass. Default: ``state`` unchanged.
        """
        return state

    @abc.abstractmethod
    def step(self, ctx: StepContext, size: StepSize, state: NamedTuple) -> tuple[StepSize, NamedTuple]:
        """The step size of this step and the new state (from the state :meth:`before_direction` gave)."""

    def row_block_temporaries(self, ndim: int) -> int | None:
        """As :meth:`BaseDirection.row_block_temporaries`, for this adaptation's part of the step."""
        return None

    # An adaptation may also define ``guard(ctx, state, new_state, updates, index)`` returning
    # ``(updates, new_state)``: called once the whole step is computed, with the old and new
    # :class:`OptimizerState` and its own position in ``adaptations`` (adaptlr.nonfinite uses it).

    #: False for an adaptation that never changes the step size (a guard such as skip_nonfinite):
    #: only such adaptations and other :class:`UpdateWrapper` s may wrap an :class:`UpdateWrapper`.
    shapes_step_size: bool = True


class UpdateWrapper(Adaptation):
    """An optimizer-level wrapper: turns the optimizer it wraps into another (Optimizer → Optimizer).

    Schedule-Free (:mod:`adaptlr.schedule_free`) and Mechanic (:mod:`adaptlr.mechanic`) do not change
    the inner optimizer's step size; they change what is done with its update. The contract:

    1. :meth:`step` (as an :class:`Adaptation`'s) may scale the step size of the optimizer it wraps
       (Schedule-Free's warm-up multiplies ``α``); the default leaves it unchanged.
    2. Once every adaptation has decided the step size, the core computes the inner optimizer's
       update ``u_t = shift - (α·κ) ⊙ d_t - α·λ·κ^decay ⊙ θ_{t-1}`` (spec §0.1, in the state dtype).
    3. :meth:`wrap` gets that update, the :class:`StepSize` that made it and the
       :class:`StepContext` (``ctx.params`` is ``θ_{t-1}``, ``ctx.reduce`` makes global sums that
       stay correct under ``shard_map``), and returns the update to apply and its new state.
       Wrappers apply innermost first; guards (:func:`adaptlr.skip_nonfinite`) run after all of them.

    The user's learning rate stays the user's (``state.learning_rate``); the wrapper's own scale is
    reported through its state's ``scale_learning_rate`` (:func:`learning_rates`: Mechanic multiplies
    by its ``s``) and ``signals`` (:func:`adaptlr.lr_summary`: Schedule-Free's averaging weight
    ``c_t``). A step-size adaptation (ActiveLR, AutoDrop, ...) cannot wrap an ``UpdateWrapper`` (it
    would scale the innermost update, not the wrapped one): wrap the inner optimizer instead,
    ``schedule_free(active(adamw(...)))``.
    """

    def step(self, ctx: StepContext, size: StepSize, state: NamedTuple) -> tuple[StepSize, NamedTuple]:
        return size, state

    @abc.abstractmethod
    def wrap(self, ctx: StepContext, size: StepSize, updates: list,
             state: NamedTuple) -> tuple[list, NamedTuple]:
        """``(updates to apply, new state)`` from the inner optimizer's ``updates`` (leaf list)."""


class Optimizer:
    """An adaptlr optimizer: a base direction and the adaptations wrapped around it.

    Build one with the factories (``adaptlr.adamw(...)``, ``adaptlr.active(opt, ...)``); use
    ``init`` / ``update`` as in optax. The object is immutable and holds no arrays.

    ``state_dtype`` (``None``, a dtype name such as ``"float32"``, or a dtype of the params'
    library) is the dtype of the optimizer state and of the step's arithmetic; ``None`` keeps each
    parameter's dtype, as ``torch.optim`` does. With bfloat16/float16 params and
    ``state_dtype="float32"`` the gradients and params are upcast for the step and the update is
    ``round(θ + u) - θ`` in the parameter dtype, so that :func:`apply_updates` rounds ``θ + u`` once.

    Every step computes (spec §0.1)::

        u_t = -(α_t·κ_t) ⊙ d_t - α_t·λ·κ^decay_t ⊙ θ_{t-1}

    with ``d_t`` the base's direction, ``α_t`` the user's learning rate and ``κ_t`` the product of
    the adaptations' multipliers.

    Args:
        base: the base direction (``SGDDirection``, ``AdamDirection``, ...; what a base factory
            such as :func:`adaptlr.sgd` builds).
        adaptations: the adaptations wrapped around the base, innermost first.
        state_dtype: the dtype of the state and of the step's arithmetic (see above).

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=10)
        >>> opt.name
        'active(adamw)'
        >>> state = opt.init({"w": np.zeros(3)})
        >>> updates, state = opt.update({"w": np.ones(3)}, state, {"w": np.zeros(3)})
        >>> int(state.count)
        1
    """

    def __init__(self, base: BaseDirection, adaptations: Sequence[Adaptation] = (), *,
                 state_dtype: Any = None) -> None:
        self.base = base
        self.adaptations = tuple(adaptations)
        self.state_dtype = v.check_state_dtype(state_dtype)
        for adaptation in self.adaptations:
            adaptation.check_base(base)
        wrapper = None
        for adaptation in self.adaptations:
            if isinstance(adaptation, UpdateWrapper):
                wrapper = wrapper or adaptation
            elif wrapper is not None and adaptation.shapes_step_size:
                raise ValueError(
                    f"{adaptation.name} cannot wrap {wrapper.name}, which transforms the whole update of the "
                    f"optimizer inside it: wrap the inner optimizer instead ({wrapper.name}({adaptation.name}(...)))"
                )

    @property
    def name(self) -> str:
        name = self.base.name
        for adaptation in self.adaptations:
            name = f"{adaptation.name}({name})"
        return name

    def __repr__(self) -> str:
        return f"<adaptlr.Optimizer {self.name}>"

    @property
    def donation_safe(self) -> bool:
        """Whether an executor may donate the state it owns to a step (:func:`adaptlr._inplace.donating`):
        no adaptation reads the input state after the new one is made (the guard of
        :func:`adaptlr.skip_nonfinite` returns the old state where a step is not finite)."""
        return all(getattr(adaptation, "guard", None) is None for adaptation in self.adaptations)

    @property
    def counts_every_step(self) -> bool:
        """Whether every step's new count is its input count + 1 (the guard of
        :func:`adaptlr.skip_nonfinite` returns the old count where a step is not finite), so that an
        executor may follow the count on the host (:mod:`adaptlr.backends.jax_known_count`)."""
        return self.donation_safe

    @property
    def scalar_condition(self) -> float:
        """The condition of the base's step scalars (:meth:`BaseDirection.scalar_condition`)."""
        return self.base.scalar_condition()

    def wrapped(self, adaptation: Adaptation) -> Optimizer:
        """This optimizer with ``adaptation`` wrapped around it (outermost)."""
        return Optimizer(self.base, (*self.adaptations, adaptation), state_dtype=self.state_dtype)

    # -- public functional API -------------------------------------------------------------------

    def init(self, params: PyTree) -> OptimizerState:
        """The optimizer state for ``params`` (arrays of params' shape, dtype and device).

        The state holds values, never autograd history: torch tensors that require grad (a model's
        parameters) are read detached, as ``torch.optim`` makes its state.
        """
        layout, leaves = Layout.of(params)
        xp = v.namespace_of_leaves(leaves, "params", layout.paths)
        v.check_floating_params(xp, leaves, layout.paths)
        # (torch parameters that require grad: the state is made from their values, outside autograd)
        leaves = self._in_state_dtype(xp, [v.untracked(x) for x in leaves])
        device = scalar_device(leaves[0])
        count = xp.asarray(0, dtype=counter_dtype(xp, device), device=device)
        alpha = self._alpha(xp, Scalars(xp, xp.asarray(1, dtype=count.dtype, device=device), device), leaves)
        base_state = self.base.init(leaves, layout, xp)
        adaptation_states = tuple(a.init(leaves, alpha, layout, xp) for a in self.adaptations)
        return OptimizerState(count, layout.tree(alpha), base_state, adaptation_states)

    def update(self, grads: PyTree, state: OptimizerState, params: PyTree, *, axis_name: Any = None,
               partition_specs: PyTree = None) -> tuple[PyTree, OptimizerState]:
        """``(updates, new_state)`` for gradients ``grads`` computed at ``params``.

        Inside ``jax.shard_map`` with parameters split across devices, ``axis_name`` (a mesh axis
        name or a tuple of names: every parameter split along its leading dimension) or
        ``partition_specs`` (a tree like the params of partition specs, as ``shard_map``'s
        ``in_specs``) completes every sum an algorithm makes over parameters across the shards
        (``psum``), so that the sharded run computes what the unsharded one does
        (:mod:`adaptlr._reduce`).
        """
        layout, param_leaves = Layout.of(params)
        grad_leaves = layout.leaves(grads, "grads")
        xp = v.namespace_of_leaves(param_leaves + grad_leaves, "params and grads", lambda: layout.paths() * 2)
        v.check_like_params(xp, grad_leaves, param_leaves, "grads", layout.paths)
        self._check_state(state, layout, xp, param_leaves)
        reducer = None
        if axis_name is not None or partition_specs is not None:
            specs = None if partition_specs is None else layout.treespec.flatten_up_to(partition_specs)
            split = leaf_split_axes(axis_name, [p.ndim for p in param_leaves], specs)
            reducer = Reducer(xp, _collective_sum(param_leaves[0]), split)
        updates, new_state = self.update_leaves(xp, layout, grad_leaves, state, param_leaves, reducer=reducer)
        return layout.tree(updates), new_state

    # -- the step, on leaf lists (the entry point of the framework adapters) --------------------

    def update_leaves(
        self,
        xp: Any,
        layout: Layout,
        grads: list,
        state: OptimizerState,
        params: list,
        *,
        alpha: list | None = None,
        weight_decay: Sequence[float] | None = None,
        reducer: Reducer | None = None,
        scalars: Scalars | None = None,
    ) -> tuple[list, OptimizerState]:
        """One step on leaf lists, without argument checks.

        ``alpha`` (0-D arrays per leaf) and ``weight_decay`` (floats per leaf) override the base's
        learning rate and weight decay: the torch adapter passes its param groups' values here.
        ``reducer`` completes sums over sharded parameters (default: plain ``xp.sum``).
        ``scalars``: this step's :meth:`Scalars.of_step`, shared by the parts of one step (default:
        made here).
        """
        base = self.base
        caller_params = params
        params = self._in_state_dtype(xp, params)
        grads = self._in_state_dtype(xp, grads)
        if scalars is None:
            scalars = Scalars.of_step(xp, state, params)
        if scalars.directions_into:  # this call's adaptations say where its directions may go
            scalars.directions_into.clear()
        count = scalars.count
        if alpha is None:
            # A schedule, or a 0-D array that may change between steps (optax.inject_hyperparams).
            if not isinstance(base.learning_rate, float):
                alpha = self._alpha(xp, scalars, params)
            else:
                alpha = layout.leaves(state.learning_rate, "state.learning_rate")
        if weight_decay is None:
            weight_decay = [base.weight_decay] * len(params)
        coupled = [0.0] * len(params) if base.decoupled else weight_decay
        decoupled = weight_decay if base.decoupled else [0.0] * len(params)

        objective_grads = [g + lam * p if lam else g for g, p, lam in zip(grads, params, coupled)]
        ctx = StepContext(xp, layout, count, grads, objective_grads, [], params, alpha, scalars,
                          reducer or Reducer(xp))
        prepared = [a.before_direction(ctx, s) for a, s in zip(self.adaptations, state.adaptations)]
        # the base reads the gradients only after the sums over the old state (adaptlr._ordering)
        read = [*grads, *objective_grads]
        ordered = ordered_after(xp, read, state.adaptations, prepared,
                                first_elements=ctx.reduce.complete is None)
        if ordered is not read:
            grads, objective_grads = ordered[: len(grads)], ordered[len(grads) :]
            ctx = ctx._replace(grads=grads, objective_grads=objective_grads)
        directions, size, base_state = base.step(ctx, StepSize.of(alpha), state.base)
        ctx = ctx._replace(directions=directions)
        adaptation_states = []
        for adaptation, adaptation_state in zip(self.adaptations, prepared):
            size, adaptation_state = adaptation.step(ctx, size, adaptation_state)
            adaptation_states.append(adaptation_state)

        updates = []
        known = size.known_step()  # -(α·κ) ⊙ d where an adaptation computed it (EG, DSA)
        for i, (d, p) in enumerate(zip(directions, params)):
            if known is not None:
                u = known[i]
            else:
                # -(α·κ) as (-α)·κ: the same numbers (rounding is symmetric in the sign), and no pass
                # to negate a full-size κ (ActiveLR, DSA, element-wise HD).
                neg_lr = _negative_rate(scalars, size.alpha[i], size.scale[i], size.kappa[i])
                # neg_lr is made here (-α is new): a full-size one takes the product
                u = mul_(neg_lr, d) if neg_lr.ndim else d * neg_lr
            # u is now this step's own array (a known step too: made for this update), and so is a
            # full-size decay factor: the rest is written into them (adaptlr._inplace)
            if decoupled[i]:
                u = _subtract_decay(scalars, u, alpha[i], size.decay_kappa[i], decoupled[i], p)
            if size.shift[i] is not None:
                u = add_(u, size.shift[i])
            updates.append(u)
        for i, adaptation in enumerate(self.adaptations):
            if isinstance(adaptation, UpdateWrapper):
                updates, adaptation_states[i] = adaptation.wrap(ctx, size, updates, adaptation_states[i])
        for i, (p, caller_p) in enumerate(zip(params, caller_params)):
            u = updates[i]
            if p.dtype != caller_p.dtype:  # so that apply_updates rounds θ + u once
                u = xp.astype(p + u, caller_p.dtype) - caller_p
            updates[i] = u if u.ndim else xp.asarray(u)  # NumPy turns 0-D results into scalars
        new_state = OptimizerState(count, layout.tree(alpha), base_state, tuple(adaptation_states))
        if v.is_numpy_namespace(xp):
            new_state = _arrays_not_scalars(new_state)
        for i, adaptation in enumerate(self.adaptations):
            guard = getattr(adaptation, "guard", None)
            if guard is not None:
                updates, new_state = guard(ctx, state, new_state, updates, i)
        return updates, new_state

    # -- helpers ---------------------------------------------------------------------------------

    def state_dtype_of(self, xp: Any, dtype: Any) -> Any:
        """The dtype of the state (and the step's arithmetic) for a parameter of ``dtype``."""
        if self.state_dtype is None:
            return dtype
        found = getattr(xp, self.state_dtype, None)
        if found is None or not xp.isdtype(found, "real floating"):
            raise TypeError(f"state_dtype={self.state_dtype!r} is not a floating dtype of {xp.__name__}")
        return found

    def _in_state_dtype(self, xp: Any, leaves: list) -> list:
        if self.state_dtype is None:
            return leaves
        dtypes = [self.state_dtype_of(xp, x.dtype) for x in leaves]
        return [x if x.dtype == dt else xp.astype(x, dt) for x, dt in zip(leaves, dtypes)]

    def _alpha(self, xp: Any, scalars: Scalars, leaves: list) -> list:
        """``α_t`` per leaf: one 0-D array per leaf (its own buffer), in the leaf's dtype.

        A schedule is called once per step with ``t`` in the widest float (:attr:`Scalars.t`), and
        its value is cast to each leaf's dtype.
        """
        learning_rate = self.base.learning_rate
        if callable(learning_rate):
            value = learning_rate(scalars.t)
            v.check_scheduled_learning_rate(value, scalars.count)
            value = xp.asarray(value, dtype=scalars.wide, device=scalars.device)
            return [xp.astype(value, leaf.dtype, copy=True) for leaf in leaves]  # a buffer per leaf: donatable
        return [xp.asarray(learning_rate, dtype=leaf.dtype, device=scalars.device) for leaf in leaves]

    def _check_state(self, state: Any, layout: Layout, xp: Any, params: list) -> None:
        if not isinstance(state, OptimizerState):
            raise TypeError(f"state must be the OptimizerState made by {self.name}.init, got {type(state).__name__}")
        made_by = [type(state.base)] + [type(a) for a in state.adaptations]
        expected = [self.base.state_class] + [a.state_class for a in self.adaptations]
        if made_by != expected:
            raise ValueError(
                f"state does not belong to {self.name}: it holds "
                f"{', '.join(t.__name__ for t in made_by)} but {self.name} needs "
                f"{', '.join(t.__name__ for t in expected)}"
            )
        try:
            alpha = layout.leaves(state.learning_rate, "state")
        except ValueError as error:
            raise ValueError(f"state does not belong to these params: {error}") from None
        if v.library_of(state.count) != v.library_of(params[0]):
            raise TypeError(
                f"state holds {v.library_of(state.count)} arrays but params are "
                f"{v.library_of(params[0])} arrays; init the optimizer with these params"
            )
        for i, (a, p) in enumerate(zip(alpha, params)):
            expected_dtype = self.state_dtype_of(xp, p.dtype)
            if a.dtype != expected_dtype:
                raise ValueError(
                    f"state does not belong to these params: parameter {layout.paths()[i]} has dtype "
                    f"{p.dtype} (state dtype {expected_dtype}) but the state was made for dtype {a.dtype}"
                )


def _arrays_not_scalars(tree: PyTree) -> PyTree:
    """NumPy turns 0-D results into scalars (``np.float64``); the state documents 0-D arrays."""
    if not any(isinstance(x, np.generic) for x in optree.tree_leaves(tree)):
        return tree
    return optree.tree_map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, tree)


def _collective_sum(x: Array) -> Callable[[Array, tuple], Array]:
    """The backend's collective sum over named mesh axes, for params like ``x``."""
    if v.library_of(x) == "jax":
        # a backend import, only where collectives are asked for
        from adaptlr.backends.jax import complete_sum  # pyright: ignore[reportMissingImports]

        return complete_sum
    raise NotImplementedError(
        f"axis_name/partition_specs need collectives over named mesh axes, which adaptlr has for JAX "
        f"(jax.shard_map); params here are {v.library_of(x)} arrays"
    )


def scalar_device(x: Array) -> Any:
    """The device for 0-D state values (counters, global scalars) of params like ``x``.

    Usually ``x``'s device. JAX gets ``None`` (its default placement, which ``jax.jit`` places as
    needed) where ``x`` has no single committed device: an array sharded over several devices (JAX
    cannot shard a 0-D array), an uncommitted array (committing the state to a device would make
    a jitted step compile a second time), and a traced value under a JAX transformation (which has
    no device to ask for).
    """
    if v.library_of(x) == "jax":
        try:
            sharding = x.sharding
        except AttributeError:  # a tracer
            return None
        if len(sharding.device_set) > 1 or not getattr(x, "committed", True):
            return None
    return v.device_of(x)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf, keeping each parameter's dtype.

    Args:
        params: a tree of arrays of one array library.
        updates: a tree of the same structure, as ``opt.update`` returns it.

    Returns:
        The new parameters: a tree like ``params`` whose leaves are ``θ + u`` in each parameter's
        dtype, in its library and on its device.

    Example:
        >>> import numpy as np, adaptlr
        >>> adaptlr.apply_updates({"w": np.ones(2), "b": np.zeros(())}, {"w": np.full(2, 0.5), "b": np.ones(())})
        {'w': array([1.5, 1.5]), 'b': array(1.)}
    """
    layout, param_leaves = Layout.of(params)
    update_leaves = layout.leaves(updates, "updates")
    xp = v.namespace_of_leaves(param_leaves + update_leaves, "params and updates", lambda: layout.paths() * 2)
    v.check_like_params(xp, update_leaves, param_leaves, "updates", layout.paths)
    new = [p + u for p, u in zip(param_leaves, update_leaves)]
    return layout.tree([x if x.ndim else xp.asarray(x) for x in new])  # NumPy turns 0-D results into scalars


def learning_rates(state: OptimizerState) -> PyTree:
    """The effective learning rate ``α·κ`` of every parameter element, shaped like the params.

    Leaves are arrays broadcastable to each parameter's shape (0-D where the rate is one number per
    tensor). This is the most recently decided rate (spec §0.1): for ActiveLR the γ after the last
    epoch-boundary adjustment, for the other adaptations the rate the last step used.

    Args:
        state: an :class:`adaptlr.OptimizerState` (for the torch adapter, ``optimizer.functional_state``).

    Returns:
        A tree shaped like the params, of arrays in the state's library and on its device.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.01)
        >>> params = {"w": np.array([1.0, -1.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update(params, state, params)   # f = ‖w‖²/2, gradient w
        ...     params = adaptlr.apply_updates(params, updates)
        >>> float(adaptlr.learning_rates(state)["w"])   # α rose: successive gradients agreed
        0.11...
    """
    if not isinstance(state, OptimizerState):
        raise TypeError(f"learning_rates needs an adaptlr OptimizerState, got {type(state).__name__}")
    alpha, treespec = optree.tree_flatten(state.learning_rate)
    layout = Layout(treespec, state.learning_rate)
    size = StepSize.of(alpha)
    scale_base = getattr(state.base, "scale_learning_rate", None)  # a learning-rate-free base's own estimate
    if scale_base is not None:
        size = scale_base(size, layout)
    for adaptation_state in state.adaptations:
        size = adaptation_state.scale_learning_rate(size, layout)
    return _arrays_not_scalars(layout.tree(size.effective()))
