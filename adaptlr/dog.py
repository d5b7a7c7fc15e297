"""DoG, LDoG and DoWG: SGD whose step size is the distance travelled over the gradients (issue 18).

**DoG** — Ivgi, Hinder, Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
Schedule", ICML 2023 (arXiv:2302.12022); oracle ``dog_optimizer.DoG``/``LDoG`` 1.0.3
(``formll/dog``). With ``x_0`` the initial parameters::

    g ← g_t + λ·θ_{t-1}                                       (coupled weight decay)
    r̄_t = r_ε = reps_rel·(1 + ‖x_0‖)  (t = 1);   r̄_t = max(r̄_{t-1}, ‖θ_{t-1} - x_0‖)  (t > 1)
    G_t = ε + Σ_{k≤t} ‖g_k‖²
    η_t = r̄_t / sqrt(G_t)               (t = 1 with init_eta: η_1 = init_eta / α, and r_ε = 0)
    u_t = -α·η_t·g

Norms and sums are over every tensor (one ``η``), or per tensor with ``layerwise=True`` (LDoG).

**DoWG** — Khaled, Mishchenko, Jin, "DoWG Unleashed: An Efficient Universal Parameter-Free
Gradient Descent Method", NeurIPS 2023 (arXiv:2305.16284); oracle ``optax.contrib.dowg``
(``dog-optimizer`` has no DoWG)::

    g ← g_t + λ·θ_{t-1}
    r̄²_t = max(r̄²_{t-1}, ‖θ_{t-1} - x_0‖²)            (r̄²_0 = init_estim_sq_dist, default ε)
    v_t = v_{t-1} + r̄²_t·‖g‖²
    η_t = r̄²_t / (sqrt(v_t) + ε)
    u_t = -α·η_t·g

In adaptlr's decomposition the direction is ``g`` and ``η_t`` is the base's own multiplier of ``α``
(:meth:`adaptlr.core.BaseDirection.step`); :func:`adaptlr.learning_rates` gives ``α·η_t`` of the
last step. No ``.item()`` and no host-side branching: the first-step rule is a ``where``; the sums
go through the step's reducer (complete under ``shard_map``).

Differences from the upstreams: ``dog_optimizer`` keeps ``r̄`` and ``G`` per param group, adaptlr
per model (DoG) or per tensor (LDoG), which is the same in the functional API (one group);
``optax.contrib.dog`` multiplies ``init_step=("learning_rate", η)`` by the learning rate (adaptlr
follows ``dog_optimizer``: the first step is ``init_eta`` whatever ``α``; equal for ``α = 1``).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import mul_, mul_for_sum
from adaptlr._precision import cast_like, widest_float
from adaptlr._reduce import Term
from adaptlr._tree import Layout
from adaptlr.core import BaseDirection, Optimizer, Schedule, StepContext, StepSize, scalar_device

__all__ = ["DoGDirection", "DoGState", "DoWGDirection", "DoWGState", "dog", "dowg"]


def _squared(x: Any) -> Any:
    """``x ⊙ x``, written into ``x`` (a temporary of the calling step)."""
    return mul_(x, x)


class DoGState(NamedTuple):
    """State of DoG / LDoG.

    Attributes:
        init_params: ``x_0`` (tree like the params).
        rbar: ``r̄``, the largest distance from ``x_0`` so far (``r_ε`` before the first step).
        grad_sq_sum: ``G``, ``ε`` plus the sum of the squared gradient norms so far.
        eta: ``η`` of the last step (0 before the first step).

    ``rbar``, ``grad_sq_sum`` and ``eta`` are 0-D arrays in the widest float: one (DoG) or a tree
    of one per tensor (LDoG).
    """

    init_params: Any
    rbar: Any
    grad_sq_sum: Any
    eta: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size.scaled(_per_leaf(self.eta, layout, size.alpha))

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"eta": self.eta, "rbar": self.rbar}


class DoWGState(NamedTuple):
    """State of DoWG: ``init_params`` (``x_0``), ``estim_sq_dist`` (``r̄²``), ``weighted_sq_norm_grads``
    (``v``) and ``eta`` (``η`` of the last step, 0 before the first), 0-D in the widest float."""

    init_params: Any
    estim_sq_dist: Any
    weighted_sq_norm_grads: Any
    eta: Any

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return size.scaled(_per_leaf(self.eta, layout, size.alpha))

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"eta": self.eta, "estim_sq_dist": self.estim_sq_dist}


def _per_leaf(value: Any, layout: Layout, like: tuple) -> list:
    """``value`` (one 0-D array, or a tree of one per leaf) as one array per leaf in ``like``'s dtypes."""
    if v.is_array(value):
        values = [value] * len(like)
    else:
        values = layout.leaves(value, "state.base")
    return [v.namespace_of(x).astype(x, a.dtype) for x, a in zip(values, like)]


def _wide_scalar(xp: Any, params: list, value: Any) -> Any:
    device = scalar_device(params[0])
    return xp.asarray(value, dtype=widest_float(xp, device), device=device)


class DoGDirection(BaseDirection):
    """DoG's base (build it with :func:`dog`)."""

    state_class = DoGState
    decoupled = False
    # sums through ctx.reduce.total, none depending on another: replayable over chunks
    # (adaptlr.backends.fast.sums_replayable); made first, so a part's first pass stops early
    replayable_sums = True

    def __init__(self, learning_rate: float | Schedule, reps_rel: float, eps: float, weight_decay: float,
                 init_eta: float | None, layerwise: bool) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        if not callable(self.learning_rate) and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0 (the paper's c; 1 is recommended), got {learning_rate}")
        if init_eta is not None:
            self.init_eta = v.check_positive("init_eta", init_eta)
            self.reps_rel = 0.0  # as dog_optimizer: init_eta replaces r_ε
        else:
            self.init_eta = None
            self.reps_rel = v.check_positive("reps_rel", reps_rel)
        self.eps = v.check_nonnegative("eps", eps)
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)
        self.layerwise = bool(layerwise)
        self.name = "ldog" if self.layerwise else "dog"
        self.flat_safe, self.blockwise = not self.layerwise, False  # global sums: one flat buffer, not blocks
        self.sums_within_tensors = self.layerwise  # LDoG: every sum within a tensor (fast.tensorwise)

    def row_block_temporaries(self, ndim: int) -> int:
        # LDoG keeps 1.02 blocks alive: one and its row-sized sums
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 2

    def init(self, params: list, layout: Layout, xp: Any) -> DoGState:
        x0 = layout.tree([xp.asarray(p, copy=True) for p in params])
        wide = widest_float(xp, scalar_device(params[0]))
        sq_norms = [xp.sum(p * p, dtype=wide) for p in params]  # init sees whole (unsharded) params

        def scalars(values: list) -> Any:
            return layout.tree(values) if self.layerwise else values[0]

        if self.layerwise:
            rbar = [self.reps_rel * (1.0 + xp.sqrt(s)) for s in sq_norms]
        else:
            total = sq_norms[0]
            for s in sq_norms[1:]:
                total = total + s
            rbar = [self.reps_rel * (1.0 + xp.sqrt(total))]
        return DoGState(x0, scalars([xp.asarray(r) for r in rbar]),
                        scalars([_wide_scalar(xp, params, self.eps) for _ in rbar]),
                        scalars([_wide_scalar(xp, params, 0.0) for _ in rbar]))

    def estimate(self, xp: Any, sq_dist: Any, grad_sq: Any, rbar_old: Any, g_old: Any, alpha: Any,
                 first: Any) -> tuple:
        """One estimate's ``(r̄, G, η)`` from the step's ``‖θ - x_0‖²`` and ``‖g‖²`` (0-D, wide), the old
        ``r̄`` and ``G``, ``α`` and whether this is step 1."""
        rbar = xp.maximum(rbar_old, xp.sqrt(sq_dist))  # at t = 1 the distance is 0: r̄ = r_ε
        grad_sq_sum = g_old + grad_sq
        eta = rbar / xp.sqrt(grad_sq_sum)
        if self.init_eta is not None:  # the first step is init_eta, whatever α (dog_optimizer)
            eta = xp.where(first, self.init_eta / xp.astype(alpha, rbar.dtype), eta)
        return rbar, grad_sq_sum, eta

    def step(self, ctx: StepContext, size: StepSize, state: DoGState) -> tuple[list, StepSize, DoGState]:
        xp, layout, scalars, reduce = ctx.xp, ctx.layout, ctx.scalars, ctx.reduce
        wide = scalars.wide
        grads, params = ctx.objective_grads, ctx.params
        x0 = layout.leaves(state.init_params, "state.init_params")
        first = scalars.per_step("t = 1", lambda: scalars.count == 1)  # one array per step (Scalars.once's inputs)
        # Terms as generators, or Terms: a part's second pass, given the whole sums, does not make them.
        if self.layerwise:
            sq_dist = [reduce.leaf_sum(i, Term(lambda p, p0: _squared(p - p0), (p, p0), p.ndim), dtype=wide)
                       for i, (p, p0) in enumerate(zip(params, x0))]
            grad_sq = [reduce.leaf_sum(i, Term(operator.mul, (g, g), g.ndim), dtype=wide) for i, g in enumerate(grads)]
            rbar_old = layout.leaves(state.rbar, "state.rbar")
            g_old = layout.leaves(state.grad_sq_sum, "state.grad_sq_sum")
        else:
            diffs = (p - p0 for p, p0 in zip(params, x0))
            sq_dist = [reduce.total((mul_for_sum(d, d, wide, x_temporary=True) for d in diffs), wide)]
            grad_sq = [reduce.total((mul_for_sum(g, g, wide) for g in grads), wide)]
            rbar_old, g_old = [state.rbar], [state.grad_sq_sum]

        def estimate(*inputs: Any) -> tuple:
            return self.estimate(xp, *inputs)

        inputs = [(*values, first) for values in zip(sq_dist, grad_sq, rbar_old, g_old, ctx.alpha)]
        if self.layerwise:  # per-tensor sums: nothing another part could reuse
            rbar, grad_sq_sum, eta = (list(x) for x in zip(*(estimate(*values) for values in inputs)))
        else:  # (0-D work once per step, not once per block: Scalars.once)
            rbar, grad_sq_sum, eta = ([x] for x in scalars.once("dog", inputs[0], estimate))

        def tree(values: list) -> Any:
            return layout.tree(values) if self.layerwise else values[0]

        if self.layerwise:
            size = size.scaled([xp.astype(k, g.dtype) for k, g in zip(eta, grads)])
        else:
            size = size.scaled(cast_like(xp, eta[0], grads, scalars, "dog eta"))
        return list(grads), size, DoGState(state.init_params, tree(rbar), tree(grad_sq_sum), tree(eta))


class DoWGDirection(BaseDirection):
    """DoWG's base (build it with :func:`dowg`)."""

    name = "dowg"
    state_class = DoWGState
    decoupled = False
    flat_safe, blockwise = True, False  # global sums: the same on one flat buffer, not on blocks
    # sums through ctx.reduce.total, none depending on another: replayable over chunks
    # (adaptlr.backends.fast.sums_replayable); made first, so a part's first pass stops early
    replayable_sums = True

    def __init__(self, learning_rate: float | Schedule, init_estim_sq_dist: float | None, eps: float,
                 weight_decay: float) -> None:
        self.learning_rate = v.check_learning_rate(learning_rate)
        self.eps = v.check_positive("eps", eps)
        self.init_estim_sq_dist = (self.eps if init_estim_sq_dist is None
                                   else v.check_positive("init_estim_sq_dist", init_estim_sq_dist))
        self.weight_decay = v.check_nonnegative("weight_decay", weight_decay)

    def init(self, params: list, layout: Layout, xp: Any) -> DoWGState:
        x0 = layout.tree([xp.asarray(p, copy=True) for p in params])
        return DoWGState(x0, _wide_scalar(xp, params, self.init_estim_sq_dist), _wide_scalar(xp, params, 0.0),
                         _wide_scalar(xp, params, 0.0))

    def estimate(self, xp: Any, sq_dist: Any, grad_sq: Any, estim_sq_dist: Any, weighted: Any) -> tuple:
        """``(r̄², v, η)`` from the step's ``‖θ - x_0‖²`` and ``‖g‖²`` and the old ``r̄²`` and ``v`` (0-D, wide)."""
        estim_sq_dist = xp.maximum(estim_sq_dist, sq_dist)
        weighted = estim_sq_dist * grad_sq + weighted
        return estim_sq_dist, weighted, estim_sq_dist / (xp.sqrt(weighted) + self.eps)

    def step(self, ctx: StepContext, size: StepSize, state: DoWGState) -> tuple[list, StepSize, DoWGState]:
        xp, layout, wide = ctx.xp, ctx.layout, ctx.scalars.wide
        grads, params = ctx.objective_grads, ctx.params
        x0 = layout.leaves(state.init_params, "state.init_params")
        # Terms as generators: a part's second pass, given the whole sums, does not evaluate them.
        diffs = (p - p0 for p, p0 in zip(params, x0))
        sq_dist = ctx.reduce.total((mul_for_sum(d, d, wide, x_temporary=True) for d in diffs), wide)
        grad_sq = ctx.reduce.total((mul_for_sum(g, g, wide) for g in grads), wide)

        def estimate(*inputs: Any) -> tuple:
            return self.estimate(xp, *inputs)

        # (0-D work once per step, not once per block: Scalars.once)
        estim_sq_dist, weighted, eta = ctx.scalars.once(
            "dowg", (sq_dist, grad_sq, state.estim_sq_dist, state.weighted_sq_norm_grads), estimate)
        size = size.scaled(cast_like(xp, eta, grads, ctx.scalars, "dowg eta"))
        return list(grads), size, DoWGState(state.init_params, estim_sq_dist, weighted, eta)


def dog(
    learning_rate: float | Schedule = 1.0,
    reps_rel: float = 1e-6,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    init_eta: float | None = None,
    layerwise: bool = False,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """DoG (Ivgi et al., ICML 2023), or LDoG with ``layerwise=True``, as ``dog_optimizer`` 1.0.3.

    Args:
        learning_rate: ``α`` > 0 (the paper's ``c``; 1 is recommended), or a schedule ``t ↦ α_t``.
        reps_rel: ``r_ε = reps_rel·(1 + ‖x_0‖)`` > 0, the initial distance (1e-4 with batch norm).
        eps: ``ε`` >= 0, added to the sum of squared gradient norms.
        weight_decay: ``λ`` >= 0, coupled L2 (``g ← g + λθ``).
        init_eta: the first step size (> 0), replacing ``reps_rel`` (None: from ``r_ε``).
        layerwise: one ``η`` per tensor (LDoG) instead of one for the model.
        state_dtype: the dtype of ``x_0`` and of the step's arithmetic (None: each parameter's).

    The authors recommend iterate averaging (polynomial decay) on top; it is not part of the step.

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(DoGDirection(learning_rate, reps_rel, eps, weight_decay, init_eta, layerwise),
                     state_dtype=state_dtype)


def dowg(
    learning_rate: float | Schedule = 1.0,
    init_estim_sq_dist: float | None = None,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    *,
    state_dtype: Any = None,
) -> Optimizer:
    """DoWG (Khaled et al., NeurIPS 2023), as ``optax.contrib.dowg`` with the same defaults.

    Args:
        learning_rate: ``α`` >= 0, or a schedule ``t ↦ α_t``.
        init_estim_sq_dist: ``r̄²_0`` > 0, the initial guess of the squared distance to the solution
            (None: ``eps``).
        eps: ``ε`` > 0 in the denominator of ``η``.
        weight_decay: ``λ`` >= 0, coupled L2 (``g ← g + λθ``, as optax's ``add_decayed_weights`` first).
        state_dtype: the dtype of ``x_0`` and of the step's arithmetic (None: each parameter's).

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.
    """
    return Optimizer(DoWGDirection(learning_rate, init_estim_sq_dist, eps, weight_decay), state_dtype=state_dtype)
