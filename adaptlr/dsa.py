"""DSA, a differentiable self-adaptive learning rate (spec §5) — a **reconstruction**.

Chen, Wang, Ba, "Differentiable Self-Adaptive Learning Rate" (2022). The abstract says that
hypergradient descent's single learning rate often fails to lower the training loss, suits minibatch
training badly and generalises poorly, and that DSA makes the learning rate parameter specific and
internally structured. The paper's exact rule is not public: this module implements adaptlr's own,
precisely defined reconstruction (spec §5), an exponentiated, cosine-normalised hypergradient
descent on a product of positive factors.

For each parameter tensor W (direction d, objective gradient g) the learning rate is
``A = α·κ_in·Π_φ φ``, one factor φ per entry of ``structure``: ``"tensor"`` (one value),
``"row"`` (one per index of axis 0, shape (rows, 1, ..., 1)), ``"col"`` (one per index of the other
axes flattened, shape (1, *rest)), ``"element"`` (one per element). All factors start at 1. Each step,
before the base step::

    G = g_t (+ λ·θ_{t-1} under coupled L2 decay)
    P = A_{t-1} ⊙ d_{t-1}                               the previous step (0 at t = 1)
    for every factor φ and each slice E_k it covers (from the same G and P):
        cos_k = ⟨G, P⟩_{E_k} / (‖G‖_{E_k}·‖P‖_{E_k} + ε)     ε = 1e-12, clamped to [-1, 1]
        φ_k ← φ_k · exp(β·cos_k)                        so 0 < φ and each step changes φ by ≤ e^β
    κ = Π_φ φ;  A_t = α·κ_in·κ  (clipped to [min_lr, max_lr] where given)
    u_t = -A_t ⊙ d_t;  P ← A_t ⊙ d_t

``κ_in`` is the multiplier of adaptations wrapped inside DSA (1 alone).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

from adaptlr import _validation as v
from adaptlr._inplace import add_, mul_, mul_into_donated
from adaptlr._precision import is_half_precision
from adaptlr._reduce import Reducer, Term
from adaptlr._tree import Layout
from adaptlr.core import Adaptation, Optimizer, StepContext, StepSize, _times, scalar_device
from adaptlr.hypergradient import _check_bounds, _check_optimizer

__all__ = ["DSA", "DSAState", "dsa"]

KINDS = ("tensor", "row", "col", "element")
EPS = 1e-12


class DSAState(NamedTuple):
    """State of DSA.

    Attributes:
        factors: a tree shaped like the params whose leaf for each parameter is a dict
            ``{kind: factor}`` (``kind`` in the parameter's structure; each factor positive and
            broadcastable to the parameter).
        prev_step: ``P = A_{t-1} ⊙ d_{t-1}``, the previous step's learning rate times direction.
        min_lr, max_lr: the bounds on ``A`` as 0-D arrays, or None.
    """

    factors: Any
    prev_step: Any
    min_lr: Any
    max_lr: Any

    def kappa(self, layout: Layout) -> list:
        """``Π_φ φ`` per parameter (broadcastable to it)."""
        return [_times(small, largest) for small, largest in zip(*self.kappa_parts(layout), strict=True)]

    def kappa_parts(self, layout: Layout) -> tuple[list, list]:
        """``Π_φ φ`` per parameter in two parts: the product of every factor but the largest (None
        where there is one factor), and the largest (the first of the largest)."""
        smalls, largests = [], []
        for factors in layout.treespec.flatten_up_to(self.factors):
            values: list[Any] = list(factors.values())
            sizes = [math.prod(factor.shape) for factor in values]
            largest = sizes.index(max(sizes))  # (not max(key=...): torch.compile does not trace it)
            small: Any = None
            for k, factor in enumerate(values):
                if k != largest:
                    small = _times(small, factor)
            smalls.append(small)
            largests.append(values[largest])
        return smalls, largests

    def scale_learning_rate(self, size: StepSize, layout: Layout) -> StepSize:
        return _apply(size, self.kappa_parts(layout), self.min_lr, self.max_lr, False)

    def signals(self, layout: Layout) -> dict[str, Any]:
        return {"kappa": layout.tree(self.kappa(layout))}


def _apply(size: StepSize, kappa_parts: tuple[list, list], min_lr: Any, max_lr: Any,
           weight_decay_too: bool) -> StepSize:
    """``size`` scaled by ``κ`` (:meth:`DSAState.kappa_parts`: its smaller factors meet ``α``
    first, so ``α·κ`` is one pass over the parameter's size); with bounds, ``α·κ_in·κ`` clipped
    becomes the new ``alpha``."""
    small, largest = kappa_parts
    scaled = size.scaled(small, weight_decay_too=weight_decay_too, first=True)
    scaled = scaled.scaled(largest, weight_decay_too=weight_decay_too)
    if min_lr is None and max_lr is None:
        return scaled
    rates = []
    for rate in scaled.effective():
        xp = v.namespace_of(rate)
        if min_lr is not None:
            rate = xp.maximum(rate, xp.astype(min_lr, rate.dtype))
        if max_lr is not None:
            rate = xp.minimum(rate, xp.astype(max_lr, rate.dtype))
        rates.append(rate)
    return scaled._replace(alpha=tuple(rates), kappa=(None,) * len(rates), scale=(None,) * len(rates))


def leaf_structure(structure: tuple[str, ...] | None, ndim: int) -> tuple[str, ...]:
    """The factor kinds of a parameter with ``ndim`` axes.

    ``None`` gives the defaults of spec §5. On a 1-D parameter "row" (one per index of axis 0) is
    "element" and "col" (no remaining axes) is "tensor"; on a 0-D parameter every kind is "tensor".
    Repeats are merged, so ``("tensor", "row", "col")`` on a bias gives ``("tensor", "element")``.
    """
    if structure is None:
        structure = ("tensor", "row", "col") if ndim >= 2 else ("tensor", "element")
    same: dict[str, str]
    if ndim == 0:
        same = dict.fromkeys(KINDS, "tensor")
    elif ndim == 1:
        same = {"tensor": "tensor", "row": "element", "col": "tensor", "element": "element"}
    else:
        same = {k: k for k in KINDS}
    return tuple(dict.fromkeys(same[k] for k in structure))


def _slice_sum(reduce: Reducer, i: int, x: Term, kind: str) -> Any:
    """Leaf ``i``'s ``x`` summed over the elements each factor value of ``kind`` covers (keeping its shape)."""
    if kind == "element":
        return x.value()
    if kind == "tensor":
        return reduce.leaf_sum(i, x)
    if kind == "row":
        return reduce.leaf_sum(i, x, axis=tuple(range(1, x.ndim)), keepdims=True)
    return reduce.leaf_sum(i, x, axis=0, keepdims=True)  # col


def _slice_sums(reduce: Reducer, i: int, x: Term, kinds: tuple[str, ...]) -> dict[str, Any]:
    """:func:`_slice_sum` for each of ``kinds``; the tensor's sum from its row (or column) sums where
    those are computed, so a tensor with row factors is read by two reductions, not three."""
    sums = {kind: _slice_sum(reduce, i, x, kind) for kind in kinds if kind != "tensor"}
    if "tensor" in kinds:
        if "row" in sums:  # (rows, 1, ..., 1), complete over axes 1..: sum over axis 0 (completed there)
            total = reduce.leaf_sum(i, sums["row"], axis=0)
        elif "col" in sums:  # (1, *rest), complete over axis 0
            total = reduce.leaf_sum(i, sums["col"], axis=tuple(range(1, x.ndim)))
        else:
            total = reduce.leaf_sum(i, x)
        sums["tensor"] = total  # (1, ..., 1) from row or column sums: 0-D where the factor is updated
    return sums


def _factor_shape(shape: tuple, kind: str) -> tuple:
    if kind == "tensor":
        return ()
    if kind == "element":
        return tuple(shape)
    if kind == "row":
        return (shape[0],) + (1,) * (len(shape) - 1)
    return (1, *shape[1:])  # col


class DSA(Adaptation):
    """The DSA adaptation (build it with :func:`dsa`)."""

    name = "dsa"
    # every sum (over a tensor, its rows or columns) from G and P only, none depending on another:
    # replayable over blocks of a tensor's rows (adaptlr.backends.fast.sums_replayable_by_rows) ...
    replayable_sums = True
    # ... and all in before_direction, from the step's inputs (a first pass over rows stops there)
    sums_before_direction = True
    state_class = DSAState

    def __init__(
        self,
        hyper_lr: float,
        structure: tuple[str, ...] | None,
        min_lr: float | None,
        max_lr: float | None,
        scale_weight_decay: bool,
    ) -> None:
        self.hyper_lr = hyper_lr
        self.structure = structure
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.scale_weight_decay = scale_weight_decay

    def row_block_temporaries(self, ndim: int) -> int:
        # DSA(AdamW) 3.49 blocks; with an element factor (a 1-D tensor's by default) 12.0-12.5: the first
        # pass over a group of blocks keeps each block's element-sized sums
        # (measured in the torch adapter's row blocks: docs/performance.md, round 25)
        return 13 if "element" in leaf_structure(self.structure, ndim) else 4

    def init(self, params: list, alpha: list, layout: Layout, xp: Any) -> DSAState:
        device = scalar_device(params[0])
        factors = []
        for p in params:
            kinds = leaf_structure(self.structure, p.ndim)
            factors.append({k: xp.ones(_factor_shape(p.shape, k), dtype=p.dtype, device=device) for k in kinds})
        dtype = xp.result_type(*[p.dtype for p in params])
        bounds = [None if b is None else xp.asarray(b, dtype=dtype, device=device) for b in (self.min_lr, self.max_lr)]
        return DSAState(layout.tree(factors), layout.tree([xp.zeros_like(p) for p in params]), *bounds)

    def before_direction(self, ctx: StepContext, state: DSAState) -> DSAState:
        """The factors ``φ`` from ``G`` and ``P``: the sums read nothing else. Every leaf's sums
        first, then the factors: a first pass over several row blocks in one step (the torch
        adapter's, each block a leaf) stops at the last block's last sum, before any factor."""
        xp, layout, scalars = ctx.xp, ctx.layout, ctx.scalars
        prev_steps = layout.leaves(state.prev_step, "state.prev_step")
        all_factors = layout.treespec.flatten_up_to(state.factors)
        sums = []
        for i, (g, p, factors) in enumerate(zip(ctx.objective_grads, prev_steps, all_factors, strict=True)):
            # In bfloat16/float16, p·p underflows and EPS is 0: the cosines 0/0. Compute them wider.
            work = scalars.wide if is_half_precision(xp, g.dtype) else g.dtype
            g, p = xp.astype(g, work, copy=False), xp.astype(p, work, copy=False)
            # (made where a sum reads them: a row block's second pass, given every sum, does not)
            kinds: tuple[str, ...] = tuple(str(kind) for kind in factors)
            reads = sum(kind in ("row", "col") for kind in kinds) or 1  # (the tensor's from those)
            gp, gg, pp = (Term(operator.mul, (a, b), g.ndim, reads) for a, b in ((g, p), (g, g), (p, p)))
            sums.append((work, *(_slice_sums(ctx.reduce, i, x, kinds) for x in (gp, gg, pp))))

        def updated(dot: Any, g2: Any, p2: Any, factor: Any, beta: Any, eps: Any) -> Any:
            # (the tensor's sums keep the dimensions of the sums they came from: 0-D here)
            dot, g2, p2 = (xp.reshape(x, factor.shape) if factor.ndim == 0 else x for x in (dot, g2, p2))
            cos = xp.clip(dot / add_(mul_(xp.sqrt(g2), xp.sqrt(p2)), eps), -1.0, 1.0)
            return mul_(xp.astype(xp.exp(mul_(cos, beta)), factor.dtype, copy=False), factor)

        new_factors = []
        for i, (factors, (work, dots, g_sq, p_sq)) in enumerate(zip(all_factors, sums, strict=True)):
            beta, eps = scalars.constant(self.hyper_lr, work), scalars.constant(EPS, work)
            new = {}
            for kind, factor in factors.items():
                inputs = (dots[kind], g_sq[kind], p_sq[kind], factor, beta, eps)
                # The tensor and column factors once per step for the same sums and factor: the row
                # blocks of a tensor (their second pass) share its tensor and column sums and
                # factors, so every block after the first takes their new values instead of computing
                # them again (Scalars.once: by identity). Not the row and element factors: a block's
                # are its own (and the cache would keep an element factor's block-sized sums alive).
                new[kind] = (scalars.once(("dsa factor", id(self), i, kind), inputs, updated)
                             if kind in ("tensor", "col") else updated(*inputs))
            new_factors.append(new)
        return state._replace(factors=layout.tree(new_factors))

    def step(self, ctx: StepContext, size: StepSize, state: DSAState) -> tuple[StepSize, DSAState]:
        """``A_t = α·κ_in·Π φ`` (the factors of :meth:`before_direction`), ``P ← A_t ⊙ d_t``."""
        size = _apply(size, state.kappa_parts(ctx.layout), state.min_lr, state.max_lr, self.scale_weight_decay)
        # P_t into P_{t-1}'s array where the executor donated it (before_direction read P_{t-1})
        old = ctx.layout.leaves(state.prev_step, "state.prev_step")
        steps = [mul_into_donated(ctx.scalars, p, rate, d)
                 for p, rate, d in zip(old, size.effective(), ctx.directions, strict=True)]
        # the update's step is -P: one pass here instead of (-α·κ) and ⊙ d there (StepSize.with_step)
        return size.with_step([-x for x in steps]), state._replace(prev_step=ctx.layout.tree(steps))


def dsa(
    opt: Optimizer,
    hyper_lr: float = 0.01,
    structure: tuple[str, ...] | None = None,
    min_lr: float | None = None,
    max_lr: float | None = None,
    scale_weight_decay: bool = False,
) -> Optimizer:
    """DSA around ``opt``: structured, positive, self-adapting learning rates (spec §5, reconstruction).

    Args:
        opt: the optimizer to wrap, an :class:`adaptlr.core.Optimizer` (a schedule is fine: DSA
            multiplies ``α_t``).
        hyper_lr: ``β`` >= 0; each factor changes by at most a factor ``e^β`` per step.
        structure: a tuple of factor kinds from ``"tensor"``, ``"row"``, ``"col"``, ``"element"``
            used for every parameter; None: ``("tensor", "row", "col")`` for ndim >= 2 and
            ``("tensor", "element")`` for ndim <= 1. On parameters with ndim <= 1 "row" acts as
            "element" and "col" as "tensor" (see :func:`leaf_structure`).
        min_lr: an optional lower bound on the effective rate ``A = α·κ`` of every element (the
            factors themselves are not clipped).
        max_lr: an optional upper bound on ``A = α·κ`` of every element.
        scale_weight_decay: also multiply decoupled weight decay by ``κ``.

    Returns:
        An :class:`adaptlr.Optimizer`: ``state = opt.init(params)``, then
        ``updates, state = opt.update(grads, state, params)`` every step.

    Example:
        >>> import numpy as np, adaptlr
        >>> opt = adaptlr.dsa(adaptlr.sgd(0.1), hyper_lr=0.1, structure=("element",))
        >>> params = {"w": np.array([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     updates, state = opt.update(params, state, params)   # f = ‖w‖²/2
        ...     params = adaptlr.apply_updates(params, updates)
        >>> np.round(adaptlr.learning_rates(state)["w"] / 0.1, 6)   # e^0.1: the sign held
        array([1.105171, 1.105171])
    """
    _check_optimizer(opt, "dsa")
    hyper_lr = v.check_nonnegative("hyper_lr", hyper_lr)
    if structure is not None:
        if isinstance(structure, str) or not isinstance(structure, (tuple, list)) or not structure:
            raise ValueError(f"structure must be a non-empty tuple of {', '.join(map(repr, KINDS))}, got {structure!r}")
        for kind in structure:
            v.check_choice("structure entry", kind, KINDS)
        structure = tuple(dict.fromkeys(structure))
    min_lr, max_lr = _check_bounds(min_lr, max_lr)
    return opt.wrapped(DSA(hyper_lr, structure, min_lr, max_lr, bool(scale_weight_decay)))
