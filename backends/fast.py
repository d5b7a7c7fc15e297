"""Execution fast paths: the same pure update, run with less overhead and memory traffic.

Every algorithm stays written once against the array API (``adaptlr/``). The fast paths here are
execution strategies around :meth:`adaptlr.core.Optimizer.update_leaves`, never re-implementations:

- JAX: :func:`jit_update` / :func:`jit_step` compile ``opt.update`` with ``jax.jit`` and donate the
  state (and params) buffers, so XLA fuses the whole step into a few loops updating in place.
- NumPy / PyTorch / CuPy: :class:`FlatOptimizer` keeps every parameter (and its gradient and state)
  as a view into one contiguous buffer per dtype and device (and parameter group). An elementwise
  algorithm, or one whose reductions are global, gives the same result on the flat buffers, so the
  pure update runs once per buffer instead of once per tensor (the 500-small-tensor case), and its
  results are written back in place. With ``block_size`` the update runs over cache-sized blocks of
  the flat buffers, which bounds the extra memory of a step to a few blocks and keeps the many
  passes of an unfused elementwise update in cache (NumPy, and torch eager on CPU). With
  ``compile=True`` (torch) the flat step goes through ``torch.compile``, which fuses it into one
  kernel.

Which algorithms may run flat (:func:`flat_safety`): base optimizers (elementwise, or with global
sums only: the learning-rate-free bases declare ``flat_safe`` and ``blockwise=False``) and
adaptations that are elementwise or use global sums. Per-tensor reductions (HD
``granularity="tensor"``, DSA tensor/row/col factors, EG ``scale="tensor"``) change meaning on flat
buffers, so those optimizers fall back to the per-tensor path (``FlatOptimizer`` still works, with
one call per tensor, and says so in ``mode``). An adaptation can declare itself with class or
instance attributes ``flat_safe`` and ``blockwise`` (bool); otherwise a conservative allow-list
decides, and anything unknown is not flat-safe.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import optree

from adaptlr._inplace import donating
from adaptlr._state_tree import rebuild_state, split_state
from adaptlr._tree import Layout
from adaptlr.backends.jax_arguments import donatable as _donatable  # noqa: F401 (round 16's scripts)
from adaptlr.core import Optimizer, OptimizerState, Scalars, apply_updates

__all__ = [
    "CPU_BLOCK_LIVE_TEMPORARIES", "FIRST_PASS_BLOCKS_PER_CALL", "NUMPY_BLOCK_LIVE_TEMPORARIES", "REPLAY_BLOCKS",
    "ROW_BLOCK_LARGE",
    "FlatOptimizer", "ListLayout",
    "base_sums_replayable", "cpu_block_size", "flat_safety", "jit_step", "jit_update", "large_cpu_model",
    "partitionable", "recommended_options", "row_block_live_temporaries", "row_block_size", "row_sums_before_direction",
    "sums_before_direction", "sums_cheaply",
    "sums_rarely",
    "sums_replayable", "sums_replayable_by_rows", "tensorwise",
]

# Every base direction of adaptlr is elementwise (spec §1); allow-listed by module.
# Bytes of params up to which whole flat buffers pay off on CPU (temporaries below glibc's mmap threshold).
_CPU_FLAT_BYTES_LIMIT = 16 << 20
# The most block-sized temporaries alive at once in a blocked torch step, over every registered algorithm
# that takes blocks on the CPU by default, ordinary and epoch-boundary steps, and DSA's row blocks
# (adaptlr.backends.bench's peak counter, round 13, with the arithmetic written into temporaries and the
# state donated: AdamW 3.8, ActiveLR(AdamW) 7.5 at a boundary, DSA per element 7.5, DSA's row blocks 8.0,
# AutoDrop(ActiveLR) 8.3; 16 before round 12; tests/test_fast_paths.py and test_row_blocks.py check it).
CPU_BLOCK_LIVE_TEMPORARIES = 9
# The same for NumPy's blocked step (tracemalloc, round 21, blocks of 64K: AdamW 5.0, HD per element 8.1,
# EG global 8.1, ActiveLR(AdamW) 10.1 at a boundary, DSA per element 10.1, AutoDrop(ActiveLR) 10.1; the
# step returns new state arrays that the executor copies back, so more are alive than on torch, whose
# blocks write into their donated state; tests/test_fast_paths.py checks it).
NUMPY_BLOCK_LIVE_TEMPORARIES = 11
_CPU_BLOCK_LARGE = 1 << 18  # elements: the fastest block size measured on large models (torch, ResNet-18)
_CPU_BLOCK_QUANTUM = 1 << 14
# The largest row block of the torch adapter's list step (:func:`row_block_size`): DSA(AdamW) on
# ResNet-18 shapes, 256K-element blocks 100.9 ms, 576K 73.8, 768K 73.3, 1152K 69.5 (round 25): each
# block pays the update's Python and dispatch work twice, so larger blocks are faster while they fit.
ROW_BLOCK_LARGE = 1 << 20
# Blocks per call in the first pass of a step whose sums all come before its base direction
# (:func:`sums_before_direction`): the pass only sums, so one call over several blocks holds the
# sums' temporaries (a product and its float64 copy: 3 blocks) plus, under coupled weight decay,
# one objective gradient per block: 4 + 3 <= CPU_BLOCK_LIVE_TEMPORARIES. Each call costs the
# update's Python and dispatch work (~70 µs on the 2-core VM, docs/performance.md round 19).
FIRST_PASS_BLOCKS_PER_CALL = 4
# torch's blocked step runs the first writing block of each buffer and pass and replays its aten
# operations on the next blocks (adaptlr.backends.block_tape): the same operations, without the ~130 µs
# of Python per block that chose them. False: every block runs the step (A/B runs, tests).
REPLAY_BLOCKS = True
_BASE_MODULES = {"adaptlr.sgd", "adaptlr.adam", "adaptlr.radam", "adaptlr.adabelief"}


# -- which optimizers may run on flat buffers ------------------------------------------------------


def _adaptation_safety(adaptation: Any) -> tuple[bool, bool, str]:
    """``(flat_safe, blockwise, reason)`` for one adaptation."""
    declared_flat = getattr(adaptation, "flat_safe", None)
    if declared_flat is not None:
        blockwise = bool(getattr(adaptation, "blockwise", False)) and bool(declared_flat)
        return bool(declared_flat), blockwise, f"{adaptation.name} declares flat_safe={declared_flat}"
    name = getattr(adaptation, "name", type(adaptation).__name__)
    if name in ("active", "activelr"):
        return True, True, "ActiveLR is elementwise"
    if name == "autodrop":
        return True, False, "AutoDrop uses global sums (flat-safe, not blockwise)"
    if name in ("hypergradient", "hd"):
        granularity = getattr(adaptation, "granularity", None)
        if granularity == "element":
            return True, True, "HD granularity='element' is elementwise"
        if granularity == "global":
            return True, False, "HD granularity='global' uses global sums"
        return False, False, f"HD granularity={granularity!r} reduces per tensor"
    if name == "dsa":
        structure = tuple(getattr(adaptation, "structure", None) or ())
        if structure == ("element",):
            return True, True, "DSA structure=('element',) is elementwise"
        return False, False, "DSA tensor/row/col factors reduce per tensor"
    if name in ("eg", "eg_step_size"):
        scale = getattr(adaptation, "scale", None)
        if scale == "global":
            return True, False, "EG scale='global' uses global sums"
        return False, False, f"EG scale={scale!r} reduces per tensor"
    return False, False, f"unknown adaptation {name!r} (not on the flat allow-list)"


def flat_safety(opt: Optimizer) -> tuple[bool, bool, str]:
    """Whether ``opt`` gives the same result on flat buffers, and block by block.

    Args:
        opt: an adaptlr optimizer.

    Returns:
        ``(flat_safe, blockwise, reason)``: ``flat_safe`` when the update only has elementwise
        operations and global sums; ``blockwise`` when it has no sums at all and every state field
        other than the step counter and learning rate is per element, so it may run on blocks of
        the flat buffers one at a time.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr.Optimizer, got {type(opt).__name__}")
    declared = getattr(opt.base, "flat_safe", None)
    if not (declared if declared is not None else type(opt.base).__module__ in _BASE_MODULES):
        return False, False, f"base optimizer {opt.base.name!r} is not known to be elementwise"
    if getattr(opt.base, "blockwise", True):
        flat, blockwise, reasons = True, True, [f"{opt.base.name} is elementwise"]
    else:  # a learning-rate-free base: its sums are over the whole model, as on one flat buffer
        flat, blockwise, reasons = True, False, [f"{opt.base.name} uses global sums (flat-safe, not blockwise)"]
    for adaptation in opt.adaptations:
        a_flat, a_block, reason = _adaptation_safety(adaptation)
        flat, blockwise = flat and a_flat, blockwise and a_block
        reasons.append(reason)
    return flat, flat and blockwise, "; ".join(reasons)


def partitionable(opt: Optimizer) -> bool:
    """Whether ``opt``'s step on a list of tensors is the same on any partition of their elements,
    run one part after the other with the old 0-D state values (the torch adapter's foreach chunks).

    True for blockwise algorithms (:func:`flat_safety`) and for flat-safe ones whose only
    non-blockwise parts declare ``sums = False``: elementwise, with 0-D state (one value per
    parameter or per model) that depends on α and t only, never on a sum over elements
    (Schedule-Free's averaging weights). False where anything sums over elements (AutoDrop, HD/EG
    global, Mechanic, the learning-rate-free bases).
    """
    flat, blockwise, _ = flat_safety(opt)
    if blockwise:
        return True
    if not flat or not getattr(opt.base, "blockwise", True):
        return False
    return all(_sums_nothing(a) for a in opt.adaptations)


def sums_replayable(opt: Optimizer) -> bool:
    """Whether ``opt``'s sums over elements may be made in a first pass over parts of the elements and
    replayed, completed, in a second (the torch adapter's two-pass foreach chunks, the blocks of
    :class:`FlatOptimizer`; :mod:`adaptlr.backends.part_sums`).

    True for flat-safe algorithms whose every part is partitionable (:func:`partitionable`) or
    declares ``replayable_sums = True``: each of its sums over elements goes through
    ``ctx.reduce.total`` and no sum's terms depend on another sum of the same step (Prodigy,
    D-Adapt Adam and SGD, DoG, DoWG, AutoDrop, HD and EG global, Mechanic). Not ``skip_nonfinite``
    (per-leaf sums).
    """
    flat, _, _ = flat_safety(opt)
    if not flat:
        return False
    if not (getattr(opt.base, "blockwise", True) or getattr(opt.base, "replayable_sums", False)):
        return False
    return all(_sums_nothing(a) or getattr(a, "replayable_sums", False) for a in opt.adaptations)


def sums_replayable_by_rows(opt: Optimizer) -> bool:
    """Whether ``opt``'s step on one tensor may run over blocks of its rows in two passes (the torch
    adapter's list path, :mod:`adaptlr.backends.torch_rows`): its sums stay within tensors
    (:func:`tensorwise`, not :func:`partitionable`) and every part that sums declares
    ``replayable_sums = True`` (no sum's terms depend on another sum of the same step): DSA, HD and
    EG per tensor, LDoG."""
    if partitionable(opt) or not tensorwise(opt):
        return False
    if not (getattr(opt.base, "blockwise", True) or getattr(opt.base, "replayable_sums", False)):
        return False
    return all(_sums_nothing(a) or getattr(a, "replayable_sums", False) for a in opt.adaptations)


def sums_rarely(opt: Optimizer) -> bool:
    """Whether ``opt``'s sums are replayable (:func:`sums_replayable`) and made only on some steps:
    every part that sums declares ``sums_every_step = False`` (AutoDrop: at epoch boundaries only,
    where the boundary is a host value). Its other steps run over blocks in one pass, like a
    blockwise algorithm's (:class:`FlatOptimizer`'s blocks; the boundary steps take two)."""
    return _every_summing_adaptation(opt, _sums_rarely)


def sums_cheaply(opt: Optimizer) -> bool:
    """Whether a step of ``opt`` over blocks in two passes costs about one: its sums are replayable,
    none is the base's, and each adaptation that sums does so only on some steps
    (:func:`sums_rarely`) or before the base direction, from the step's inputs (it declares
    ``sums_before_direction = True``: HD and EG global,
    :meth:`adaptlr.core.Adaptation.before_direction`). The first pass over a block then stops after
    reading what its sums read (:mod:`adaptlr.backends.part_sums`). Not the learning-rate-free
    bases, whose first pass computes most of their step (:func:`base_sums_replayable`)."""
    return _every_summing_adaptation(
        opt, lambda a: _sums_rarely(a) or getattr(a, "sums_before_direction", False) is True)


def sums_before_direction(opt: Optimizer) -> bool:
    """Whether every sum of ``opt``'s step is made before its base direction, from the step's
    inputs: its sums are replayable, none is the base's, and each adaptation that sums declares
    ``sums_before_direction = True`` (HD and EG global). The first pass of a step over blocks then
    computes only the sums' terms (one temporary at a time: ``ctx.reduce.total`` takes them from a
    generator) and may run over several blocks in one call (:data:`FIRST_PASS_BLOCKS_PER_CALL`)."""
    return _every_summing_adaptation(opt, lambda a: getattr(a, "sums_before_direction", False) is True)


def base_sums_replayable(opt: Optimizer) -> bool:
    """Whether ``opt``'s sums are replayable (:func:`sums_replayable`) and all made by its base (a
    learning-rate-free base: Prodigy, D-Adapt Adam, DoG, DoWG), its adaptations summing nothing.
    On a large CPU model the torch adapter runs these over blocks in two passes by default
    (:func:`recommended_options`): each pass's 0-D work on ``d`` is done once
    (:meth:`adaptlr.core.Scalars.once`), and the temporaries are a few blocks instead of several
    model-sized lists whose pages come fresh from the OS."""
    return (sums_replayable(opt) and not getattr(opt.base, "blockwise", True)
            and all(_sums_nothing(a) for a in opt.adaptations))


def _sums_rarely(adaptation: Any) -> bool:
    return getattr(adaptation, "sums_every_step", True) is False


def row_sums_before_direction(opt: Optimizer) -> bool:
    """:func:`sums_before_direction` for the row blocks of one tensor: the sums replayable over rows
    (:func:`sums_replayable_by_rows`), none the base's, each adaptation's made before the base
    direction (DSA, HD and EG per tensor; not LDoG). The torch adapter's first pass over a tensor's
    row blocks then runs several blocks in one call (:data:`FIRST_PASS_BLOCKS_PER_CALL`)."""
    return _every_summing_adaptation(opt, lambda a: getattr(a, "sums_before_direction", False) is True,
                                     sums_replayable_by_rows)


def _every_summing_adaptation(opt: Optimizer, declares: Callable[[Any], bool],
                              replayable: Callable[[Optimizer], bool] | None = None) -> bool:
    """Replayable sums (``replayable``, :func:`sums_replayable` by default), none in the base, and at
    least one adaptation that sums, each ``declares``."""
    if not (replayable or sums_replayable)(opt) or not getattr(opt.base, "blockwise", True):
        return False
    summing = [a for a in opt.adaptations if not _sums_nothing(a)]
    return bool(summing) and all(declares(a) for a in summing)


def tensorwise(opt: Optimizer) -> bool:
    """Whether ``opt``'s step on a list of tensors is the same run on sublists of whole tensors, one
    after the other with the old 0-D global values: nothing sums across tensors (the torch adapter's
    list path then updates a few tensors at a time).

    True for :func:`partitionable` algorithms and for those whose sums stay within a tensor: DSA,
    HD ``granularity="tensor"``, EG ``scale="tensor"``, LDoG (``sums_within_tensors = True``).
    """
    if partitionable(opt):
        return True
    return _within_tensors(opt.base) and all(_sums_nothing(a) or _within_tensors(a) for a in opt.adaptations)


def _sums_nothing(adaptation: Any) -> bool:
    """Blockwise, or declares ``sums = False`` (no sum over elements, 0-D state from α and t only)."""
    return _adaptation_safety(adaptation)[1] or getattr(adaptation, "sums", True) is False


def _within_tensors(component: Any) -> bool:
    declared = getattr(component, "sums_within_tensors", None)
    if declared is not None:
        return bool(declared)
    if type(component).__module__ in _BASE_MODULES:  # the elementwise bases
        return getattr(component, "blockwise", True)
    name = getattr(component, "name", "")
    if name == "dsa":
        return True
    if name in ("hypergradient", "hd"):
        return getattr(component, "granularity", None) in ("tensor", "element")
    if name in ("eg", "eg_step_size"):
        return getattr(component, "scale", None) == "tensor"
    return False


def recommended_options(opt: Optimizer, params: Sequence[Any]) -> dict | None:
    """The :class:`FlatOptimizer` options measured fastest for ``opt`` on these params, or None.

    ``None`` means: keep the per-tensor pure path (``opt.update`` / ``update_leaves``). The rule
    (from ``adaptlr bench``, docs/performance.md):

    - GPU (caching allocator): whole flat buffers (``{}``) for every flat-safe algorithm.
    - CPU, small model (all params ≤ 16 MiB): one call per step beats one per tensor, and the
      temporaries of the unfused update still come from the heap: blocks for blockwise algorithms,
      whole flat buffers for the flat-safe ones with global sums (AutoDrop, HD global, EG global;
      500 tensors of 2K, torch: AutoDrop 10 ms flat vs 61 ms per tensor).
    - CPU, larger model: whole flat temporaries are as large as the model and get fresh pages from
      the OS every step (ResNet-18 shapes, torch: AutoDrop 581 ms flat vs 156 ms per tensor), so
      only blocks help (blockwise algorithms; larger blocks than for a small model); the others
      keep the per-tensor path.
    - CPU, larger model, algorithms whose two passes cost about one (:func:`sums_cheaply`: AutoDrop
      sums only at epoch boundaries, HD and EG global only before the base direction): blocks too
      (ResNet-18 shapes, torch: AutoDrop 1.05–1.1× blocked AdamW, HD 1.03× and EG 0.97× their
      per-tensor path's time, peak temporaries 0.5–1.0× the largest tensor instead of 21.6–42×).
      Blocks with sums need one buffer (one param group, dtype and device); :class:`FlatOptimizer`
      takes whole buffers otherwise.
    - CPU, larger model, torch, the learning-rate-free bases (:func:`base_sums_replayable`): blocks
      in two passes, stepped on the parameters' own storage (:meth:`FlatOptimizer.step_on`), the
      0-D work on ``d`` once per pass. ResNet-18 shapes, interleaved runs: Prodigy 97 ms against the
      list path's 110 (152–215 ms in a fresh process, whose model-sized temporaries take fresh
      pages from the OS: 65K page faults per step), D-Adapt Adam 105 against 128; peak temporaries
      0.5× the largest tensor instead of 24.8×. DoG, whose step is cheap per element, about even
      (42 ms against 30 in one process, 38 against 76 in another). Not NumPy (not measured).
    - CPU, larger model, torch: 256K-element blocks, smaller where the model's largest tensor is
      below :data:`CPU_BLOCK_LIVE_TEMPORARIES` such blocks, so that the step's temporaries stay
      within the largest tensor (:func:`cpu_block_size`; ResNet-18 shapes: 256K, 144K before round 13).
      NumPy likewise with :data:`NUMPY_BLOCK_LIVE_TEMPORARIES` (ResNet-18 shapes: 208K; 128K before
      round 21, 9–16 % slower: docs/performance.md, round 21).
    - JAX params: None (use :func:`jit_step`).

    Args:
        opt: an adaptlr optimizer.
        params: the parameter leaves.
    """
    flat, blockwise, _ = flat_safety(opt)
    params = list(params)
    if not flat or not params or array_api_compat.is_jax_array(params[0]):
        return None
    device = str(array_api_compat.device(params[0]))
    on_cpu = device == "cpu" or device.startswith("cpu")
    if not on_cpu:
        return {}
    sizes = [math.prod(p.shape) for p in params]
    small_model = not large_cpu_model(params)
    if not blockwise and small_model:
        return {}
    if not blockwise and not sums_cheaply(opt) and not (_is_torch(params[0]) and base_sums_replayable(opt)):
        return None
    # Block sizes measured on the 2-core VM (docs/performance.md): larger blocks amortise the
    # per-operation cost of eager evaluation on large models; small models prefer smaller ones.
    if _is_torch(params[0]):
        return {"block_size": (1 << 17) if small_model else cpu_block_size(max(sizes))}
    return {"block_size": (1 << 15) if small_model else cpu_block_size(max(sizes), NUMPY_BLOCK_LIVE_TEMPORARIES)}


def large_cpu_model(params: Sequence[Any]) -> bool:
    """Whether ``params`` take more than 16 MiB: a model whose whole-size temporaries get fresh pages
    from the OS every step on the CPU (:func:`recommended_options`)."""
    return sum(math.prod(p.shape) * getattr(p.dtype, "itemsize", 8) for p in params) > _CPU_FLAT_BYTES_LIMIT


def cpu_block_size(largest: int, live: int = CPU_BLOCK_LIVE_TEMPORARIES, most: int = _CPU_BLOCK_LARGE) -> int:
    """Elements per block of the blocked CPU path on a large model whose largest tensor has
    ``largest`` elements: at most ``most`` (256K), and at most ``largest / live`` (a multiple of 16K, at least
    16K), so the ``live`` block-sized temporaries alive at once take no more memory than the largest
    tensor (issue 20's target 5; torch :data:`CPU_BLOCK_LIVE_TEMPORARIES`, the default, NumPy
    :data:`NUMPY_BLOCK_LIVE_TEMPORARIES`). Smaller blocks cost per-operation overhead (each block
    pays the update's Python and dispatch work; the step scalars are computed once per step,
    :meth:`adaptlr.core.Scalars.of_step`)."""
    fitting = largest // live // _CPU_BLOCK_QUANTUM * _CPU_BLOCK_QUANTUM
    return max(_CPU_BLOCK_QUANTUM, min(most, fitting))


def row_block_live_temporaries(opt: Optimizer, ndim: int, coupled_decay: bool) -> int:
    """How many arrays of a row block's size are alive at once in the torch adapter's step of ``opt``
    over blocks of a tensor of ``ndim`` dimensions (:mod:`adaptlr.backends.torch_rows`): the sum of
    what its base and adaptations declare (``row_block_temporaries``, measured with
    :mod:`adaptlr.backends.bench`'s peak counter, epoch boundaries included), plus
    :data:`FIRST_PASS_BLOCKS_PER_CALL` under coupled weight decay (the first pass over a group of
    blocks keeps each block's objective gradient ``g + λθ``). Where a part has not measured its
    count, or the step runs in another ``state_dtype`` (its copies of the gradients and
    parameters), :data:`CPU_BLOCK_LIVE_TEMPORARIES`. The peaks of the parts come at different
    moments of the step, so the sum bounds it from above (DSA(ActiveLR(Adam), λ): 11 declared, 7.5
    measured); tests/test_row_blocks.py checks that a step stays within the largest tensor."""
    if opt.state_dtype is not None:
        return CPU_BLOCK_LIVE_TEMPORARIES
    counts = [opt.base.row_block_temporaries(ndim), *(a.row_block_temporaries(ndim) for a in opt.adaptations)]
    if any(c is None for c in counts):
        return CPU_BLOCK_LIVE_TEMPORARIES
    return max(1, sum(counts) + (FIRST_PASS_BLOCKS_PER_CALL if coupled_decay else 0))


def row_block_size(largest: int, live: int) -> int:
    """Elements per row block of a tensor whose step keeps ``live`` block-sized arrays alive
    (:func:`row_block_live_temporaries`) on a model whose largest tensor has ``largest`` elements:
    at most ``largest / live`` (a multiple of 16K, at least 16K), so that they take no more memory
    than the largest tensor (issue 20's target 5), and at most :data:`ROW_BLOCK_LARGE`
    (:func:`cpu_block_size` with that bound)."""
    return cpu_block_size(largest, live, ROW_BLOCK_LARGE)


# -- JAX ---------------------------------------------------------------------------------------


def _check_opt(opt: Any) -> None:
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be an adaptlr.Optimizer, got {type(opt).__name__}")


def _without_unchanged_rates(state: OptimizerState, lr: Any) -> OptimizerState:
    """``state`` without its learning rates where they are the step's input rates themselves (a
    float learning rate: ``update`` reads α from the state and returns it as it is).

    Returned from a jitted step, each of those 0-D leaves would be an output buffer of its own (500
    for 500 tensors: the measured cost is in docs/performance.md, round 3). :func:`_with_rates` puts
    the input rates back.
    """
    new, old = optree.tree_leaves(state.learning_rate), optree.tree_leaves(lr)
    if len(new) == len(old) and all(a is b for a, b in zip(new, old)):
        return state._replace(learning_rate=None)
    return state


def _with_rates(new_state: OptimizerState, state: OptimizerState) -> OptimizerState:
    """``new_state`` with ``state``'s learning rates where the jitted step left them out."""
    if new_state.learning_rate is None:
        return new_state._replace(learning_rate=state.learning_rate)
    return new_state


def _left_out_unchanged(new: tuple, old: tuple, forwarded: list) -> tuple:
    """``new`` (the step's new base and adaptation states) with ``None`` where a leaf is the input's
    own leaf (``old``, not donated), and ``forwarded[0] = True`` if there is one.

    Without donation, each such output is a copy of its input in XLA (JAX does not forward it):
    D-Adapt SGD's, Prodigy's and DoG's initial parameters, 2 words per parameter and step (round
    17). :func:`_with_unchanged` puts the input's arrays back, as the step would have returned them.
    """
    new_leaves, spec = optree.tree_flatten(new, none_is_leaf=True)
    old_leaves, old_spec = optree.tree_flatten(old, none_is_leaf=True)
    if spec != old_spec:
        return new
    same = [a is b and a is not None for a, b in zip(new_leaves, old_leaves)]
    if not any(same):
        return new
    forwarded[0] = True
    return optree.tree_unflatten(spec, [None if s else a for s, a in zip(same, new_leaves)])


def _with_unchanged(out: tuple, old: tuple) -> tuple:
    """``out`` with ``old``'s arrays where :func:`_left_out_unchanged` left them out."""
    out_leaves, spec = optree.tree_flatten(out, none_is_leaf=True)
    old_leaves = optree.tree_leaves(old, none_is_leaf=True)
    return optree.tree_unflatten(spec, [b if a is None else a for a, b in zip(out_leaves, old_leaves)])


def _in_donated_order(first: Any, state: OptimizerState, lr: Any, inputs: tuple | None = None,
                      forwarded: list | None = None) -> tuple:
    """A jitted step's outputs, the new state's donatable parts first, in the order of the donated
    inputs: ``(base, adaptations, first, count, learning_rate)`` (``first``: the new params or the
    updates, which follow ``base`` and ``adaptations`` in the inputs too).

    JAX pairs each output with the first donated input of its shape and dtype not yet taken, in
    output order. Returned as ``(first, state)``, the new params took the buffers of the first
    moments wherever the shapes repeat (every tensor of the same shape: all of them on 500 tensors
    of 32×64), and XLA copied each donated buffer to keep the values it still had to read:
    measured, 2,000 copies of 4.1M elements per step on 500 tensors, more time with donation than
    without (docs/performance.md, round 16). In this order each output takes its own input's buffer.

    With ``inputs`` (the step's ``(base, adaptations)``, when they are not donated) the leaves the
    step returns unchanged are left out (:func:`_left_out_unchanged`, recorded in ``forwarded``).
    """
    state = _without_unchanged_rates(state, lr)
    base, adaptations = state.base, state.adaptations
    if inputs is not None and forwarded is not None:
        base, adaptations = _left_out_unchanged((base, adaptations), inputs, forwarded)
    return base, adaptations, first, state.count, state.learning_rate


def _from_donated_order(outputs: tuple, state: OptimizerState, forwarded: list | None = None
                        ) -> tuple[Any, OptimizerState]:
    """``(first, new_state)`` from :func:`_in_donated_order`'s outputs (``state``: the step's input
    state, whose learning rates, and unchanged leaves where ``forwarded[0]``, come back where the
    step left them out)."""
    base, adaptations, first, count, learning_rate = outputs
    if forwarded is not None and forwarded[0]:
        base, adaptations = _with_unchanged((base, adaptations), (state.base, state.adaptations))
    return first, _with_rates(OptimizerState(count, learning_rate, base, adaptations), state)


def jit_update(opt: Optimizer, *, donate_state: bool = True) -> Callable:
    """``jax.jit(opt.update)``, donating the state buffers so XLA updates them in place.

    Args:
        opt: an adaptlr optimizer.
        donate_state: donate the state's per-parameter buffers; do not reuse a state after passing it.

    Returns:
        ``update(grads, state, params) -> (updates, new_state)``; ``update.compile(grads, state,
        params)`` gives the same function compiled ahead of time, with ``memory_analysis()``.
    """
    _check_opt(opt)
    return _jitted_on_state(opt, donated=(3, 4) if donate_state else (), with_params=False)


def jit_step(opt: Optimizer, *, donate: bool = True) -> Callable:
    """A jitted whole step ``(grads, state, params) -> (new_params, new_state)``.

    The update and ``apply_updates`` are one XLA computation; with ``donate`` the state and params
    buffers are donated, so the step reads grads, params and state once and writes params and state
    in place, like a fused optimizer kernel.

    Args:
        opt: an adaptlr optimizer.
        donate: donate the state and params; do not reuse them afterwards.

    Returns:
        ``step(grads, state, params) -> (new_params, new_state)``; ``step.compile(grads, state,
        params)`` gives the same function compiled ahead of time, with ``memory_analysis()``.
    """
    _check_opt(opt)
    return _jitted_on_state(opt, donated=(3, 4, 5) if donate else (), with_params=True)


def _jitted_on_state(opt: Optimizer, donated: tuple[int, ...], with_params: bool) -> Callable:
    """``opt.update`` jitted, then ``apply_updates`` where ``with_params``, on the state's fields as
    separate arguments ``(grads, count, rates, base, adaptations, params)`` (``donated`` by
    position; the learning rates once per value: :mod:`adaptlr.backends.jax_arguments`).

    Returns ``call(grads, state, params)`` with ``call.compile(grads, state, params)``: the same,
    compiled ahead of time for these shapes and this rate layout, with ``memory_analysis()`` and
    ``as_text()`` (its optimized HLO, which ``adaptlr.backends.xla_copies`` reads). A compiled call
    whose rates are laid out otherwise (set per leaf since) runs the jitted function.

    Epoch-boundary work (ActiveLR, AutoDrop) that the count, followed on the host, says is not due is
    left out of the step (:mod:`adaptlr.backends.jax_known_count`): one executable per pattern of
    answers, each compiled ahead of its first call where ``compile`` was used (``memory_analysis``
    and ``as_text`` are those of the step that traces every boundary, as an epoch boundary runs;
    ``executables`` maps each pattern compiled so far to its compiled step, ``None`` to that one).
    """
    import jax

    from adaptlr._boundary import deferring, known_due
    from adaptlr.backends.jax_arguments import RateLayout, StepArguments
    from adaptlr.backends.jax_boundary import run_deferred
    from adaptlr.backends.jax_known_count import KnownCount

    forwarded = [False]  # whether a trace left unchanged state out (not donated: _left_out_unchanged)
    keeps_inputs = 3 not in donated  # base and adaptations not donated: unchanged leaves left out
    arguments = StepArguments(donated, rates_by_value=not callable(opt.base.learning_rate))
    counted = KnownCount(opt.counts_every_step)  # the count on the host: boundary work left out where not due

    def inner(grads: Any, count: Any, rates: list, base: Any, adaptations: Any, params: Any,
              layout: RateLayout, answers: tuple[bool, ...] | None) -> Any:
        lr = layout.rebuild(rates)
        # Boundary work that only writes state runs after the step's outputs are made (ordered after
        # them, so that XLA writes the donated state in place; adaptlr._boundary.deferring). Not past
        # a guard (skip_nonfinite), which makes the whole new state anew from the old and the new.
        # Work the host knows is not due at this step is left out (jax_known_count).
        with (known_due(answers) as known,
              deferring() if opt.donation_safe else contextlib.nullcontext([]) as recorded):
            updates, state = opt.update(grads, OptimizerState(count, lr, base, adaptations), params)
        counted.traced(known.rules, answers)
        first = apply_updates(params, updates) if with_params else updates
        state = run_deferred(recorded, state, first, in_place=bool(donated))
        return _in_donated_order(first, state, lr, (base, adaptations) if keeps_inputs else None, forwarded)

    # the rates (position 2) are not donated: they may come back unchanged
    jitted = jax.jit(inner, donate_argnums=donated, static_argnums=(6, 7))

    def finish(outputs: tuple, state: OptimizerState, t: int | None) -> tuple[Any, OptimizerState]:
        first, new_state = _from_donated_order(outputs, state, forwarded)
        arguments.returning(new_state, first)
        counted.returning(new_state.count, t)
        return first, new_state

    def call(grads: Any, state: OptimizerState, params: Any) -> tuple[Any, OptimizerState]:
        args, layout = arguments(grads, state, params)
        answers, t = counted.answers(state.count)
        return finish(arguments.call(lambda *a: jitted(*a, layout, answers), args, state, params), state, t)

    def compile(grads: Any, state: OptimizerState, params: Any) -> Callable:
        args, layout = arguments(grads, state, params)
        compiled = jitted.lower(*args, layout, None).compile()
        executables = {None: compiled}  # per pattern of answers, compiled ahead of its first call

        def run(grads: Any, state: OptimizerState, params: Any) -> tuple[Any, OptimizerState]:
            args, given = arguments(grads, state, params)
            answers, t = counted.answers(state.count)
            if given != layout:
                function = lambda *a: jitted(*a, given, answers)  # noqa: E731
            else:
                function = executables.get(answers)
                if function is None:
                    function = executables[answers] = jitted.lower(*args, layout, answers).compile()
            return finish(arguments.call(function, args, state, params), state, t)

        run.memory_analysis = compiled.memory_analysis
        run.as_text = compiled.as_text
        run.executables = executables  # per pattern of boundary answers (None: the step that decides on the device)
        return run

    call.compile = compile
    return call


def private_code(method: Callable) -> Callable:
    """``method`` bound to a copy of its function with a code object of its own.

    ``torch.compile`` keeps its compiled graphs, and its recompilation limit
    (``torch._dynamo.config.recompile_limit``, 8), per code object. A method compiled for each
    optimizer shares one code object between every instance: the ninth optimizer compiled in a
    process (another algorithm or configuration) would hit the limit and run eagerly without an
    error. With its own code object each instance has its own graphs, freed with it.
    """
    func = method.__func__
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                             func.__closure__)
    own.__kwdefaults__ = func.__kwdefaults__
    return types.MethodType(own, method.__self__)


# -- flat buffers (NumPy, PyTorch, CuPy) -----------------------------------------------------------


def _is_torch(x: Any) -> bool:
    return array_api_compat.is_torch_array(x)


def _copy_into(dst: Any, src: Any) -> None:
    """``dst[...] = src`` in place (dst is a buffer or a view into one)."""
    if dst is src:
        return
    if _is_torch(dst):
        dst.copy_(src)
    else:
        dst[...] = src


def _flat_view(x: Any, like: Any) -> Any:
    """``x`` as a 1-D view of its own storage, where it is C-contiguous and has ``like``'s shape and
    dtype; else None (the caller copies it)."""
    if tuple(x.shape) != tuple(like.shape) or x.dtype != like.dtype:
        return None
    if _is_torch(x):
        return x.view(-1) if x.is_contiguous() else None
    flags = getattr(x, "flags", None)  # NumPy and CuPy
    return x.reshape(-1) if flags is not None and flags.c_contiguous else None


def _torch_compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _snapshot(x: Any) -> Any:
    return x.clone() if _is_torch(x) else x.copy()


def _add_into(dst: Any, src: Any) -> None:
    if _is_torch(dst):
        dst.add_(src)
    else:
        dst += src


class ListLayout(Layout):
    """The layout of a plain list of ``num_leaves`` leaves, flattened in Python (no optree call per step).

    Cheaper per call than optree for the blocked loop, and traceable by ``torch.compile`` (whose
    optree emulation makes tree specs that do not compare equal to real ones); the optree tree
    spec is made only when an algorithm asks for it (DSA's per-parameter factor dicts).
    """

    __slots__ = ("_spec",)

    def __init__(self, num_leaves: int) -> None:
        self.num_leaves = num_leaves
        self._reference = None
        self._spec = None

    @property
    def treespec(self) -> Any:
        if self._spec is None:
            self._spec = optree.tree_structure([0] * self.num_leaves)
        return self._spec

    def paths(self) -> list[str]:
        return [f"[{i}]" for i in range(self.num_leaves)]

    def leaves(self, tree: Any, what: str) -> list[Any]:
        if type(tree) is list and len(tree) == self.num_leaves:
            return tree
        leaves, treespec = optree.tree_flatten(tree)
        if treespec != self.treespec:
            raise ValueError(f"{what} and params have different tree structure: params are a list of "
                             f"{self.num_leaves} arrays, {what} is {treespec}")
        return leaves

    def tree(self, leaves: Sequence[Any]) -> Any:
        return list(leaves)


def _itemsize(dtype: Any) -> int:
    size = getattr(dtype, "itemsize", None)
    return int(size) if size is not None else 8


class _Bucket:
    __slots__ = ("device", "dtype", "grads", "group", "members", "params", "size")

    def __init__(self, dtype: Any, device: Any, group: Any) -> None:
        self.dtype, self.device, self.group = dtype, device, group
        self.members: list[tuple[int, int, int, tuple]] = []  # (leaf index, offset, size, shape)
        self.size = 0


class FlatOptimizer:
    """Run an adaptlr optimizer on one contiguous buffer per dtype, device and group, in place.

    ``FlatOptimizer(opt, params)`` copies the parameters into flat buffers; :attr:`params` are views
    into them (in the order of ``params``): either the model uses them from then on, or, as the torch
    adapter does (parameters keep their own storage), the caller copies its parameters in before
    and the views back out after each step (``torch._foreach_copy_``); in the blocked mode,
    :meth:`step_on` steps the caller's parameters where they live instead, copying only the small
    ones (the adapter's default on a large CPU model). :attr:`grads` are views into
    flat gradient buffers: gradients written there (or passed to :meth:`step` as those very views)
    need no copy. :meth:`step` runs the pure update on the flat buffers and writes params and state
    in place, like ``torch.optim``.

    Args:
        opt: an adaptlr optimizer.
        params: the parameter leaves (NumPy, torch or CuPy arrays; one library).
        groups: an optional hashable group id per leaf (torch param groups): leaves of different
            groups never share a buffer, so per-group ``alpha`` / ``weight_decay`` apply.
        block_size: run the update over blocks of this many elements, each written before the
            next: blockwise algorithms (:func:`flat_safety`) in one pass; with one buffer, those
            with replayable sums (:func:`sums_replayable`) in one pass on steps that make no sum
            and in two on those that do (:mod:`adaptlr.backends.part_sums`); ignored otherwise
            (whole buffers). ``None``: whole buffers.
        compile: compile the flat step with ``torch.compile`` (torch only; the first step compiles).
        bucket_bytes: start a new buffer when the next parameter would take the current one past
            this many bytes (a parameter is never split; ``None``: one buffer per dtype, device and
            group). On CPU, buffers below glibc's largest mmap threshold (32 MiB) let the
            temporaries of a whole-buffer update come from the heap instead of fresh pages.
        force_per_tensor: use the per-tensor path even where the flat one is safe (for comparison).

    Attributes:
        mode: ``"flat"``, ``"blocked"``, ``"compiled"`` or ``"per-tensor"`` (not flat-safe).
        reason: why (from :func:`flat_safety`).
        state: the :class:`~adaptlr.core.OptimizerState` over the flat buffers (``"flat"`` and
            ``"compiled"``), or a list of one state per buffer (``"blocked"``), or the per-tensor state.
    """

    def __init__(
        self,
        opt: Optimizer,
        params: Sequence[Any],
        *,
        groups: Sequence[Any] | None = None,
        block_size: int | None = None,
        compile: bool = False,
        bucket_bytes: int | None = None,
        force_per_tensor: bool = False,
    ) -> None:
        if not isinstance(opt, Optimizer):
            raise TypeError(f"opt must be an adaptlr.Optimizer, got {type(opt).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params is empty: nothing to optimize")
        if groups is not None and len(groups) != len(params):
            raise ValueError(f"groups has {len(groups)} entries but params has {len(params)}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if bucket_bytes is not None and (not isinstance(bucket_bytes, int) or bucket_bytes < 1):
            raise ValueError(f"bucket_bytes must be a positive int or None, got {bucket_bytes!r}")
        self.bucket_bytes = bucket_bytes
        self.opt = opt
        self.xp = array_api_compat.array_namespace(*params)
        self._torch = _is_torch(params[0])
        if compile and not self._torch:
            raise ValueError("compile=True needs torch tensors")
        flat, blockwise, self.reason = flat_safety(opt)
        self._blockwise = blockwise
        self._buckets = [] if force_per_tensor or not flat else self._plan_buckets(params, groups)
        if force_per_tensor or not flat:
            self.mode = "per-tensor"
        elif compile:
            self.mode = "compiled"
        elif block_size is not None and (blockwise or (len(self._buckets) == 1 and sums_replayable(opt))):
            # Sums over elements in blocks: two passes (adaptlr.backends.part_sums), over one buffer
            # only (one α and one copy of the 0-D state for every block).
            self.mode = "blocked"
        else:
            self.mode = "flat"
        self.block_size = block_size
        self._member_plan: tuple[list[tuple], list[bool]] | None = None
        self._num = len(params)
        self._scalar_cache: dict = {}
        self._sums_made: int | None = None  # the blocked step's number of sums (run_parts), once counted
        if self.mode == "per-tensor":
            self._setup_per_tensor(params, groups)
        else:
            self._setup_flat(params)
        self._compiled = None

    # -- setup --------------------------------------------------------------------------------

    def _setup_per_tensor(self, params: list, groups: Sequence[Any] | None) -> None:
        xp = self.xp
        self.params = params
        self.grads = [xp.zeros_like(p) for p in params]
        self._layout, _ = Layout.of(params)
        self.state = self._own(self.opt.init(params))

    def _plan_buckets(self, params: list, groups: Sequence[Any] | None) -> list[_Bucket]:
        """The buffers (one per dtype, device and group, cut by ``bucket_bytes``) and their members."""
        buckets: dict = {}
        full: list = []  # buckets closed by bucket_bytes, before the open ones
        cap = self.bucket_bytes
        for i, p in enumerate(params):
            device = array_api_compat.device(p)
            group = groups[i] if groups is not None else None
            key = (str(p.dtype), str(device), group)
            n = 1
            for s in p.shape:
                n *= int(s)
            bucket = buckets.get(key)
            if bucket is not None and cap is not None and bucket.size and \
                    (bucket.size + n) * _itemsize(p.dtype) > cap:
                full.append(buckets.pop(key))
                bucket = None
            if bucket is None:
                bucket = buckets[key] = _Bucket(p.dtype, device, group)
            bucket.members.append((i, bucket.size, n, tuple(p.shape)))
            bucket.size += n
        return full + list(buckets.values())

    def _setup_flat(self, params: list) -> None:
        xp = self.xp
        if self.mode == "blocked":
            self._small_members_first()
        views: list = [None] * len(params)
        grad_views: list = [None] * len(params)
        for bucket in self._buckets:
            bucket.params = xp.empty((bucket.size,), dtype=bucket.dtype, device=bucket.device)
            bucket.grads = xp.zeros((bucket.size,), dtype=bucket.dtype, device=bucket.device)
            for i, offset, n, shape in bucket.members:
                view = xp.reshape(bucket.params[offset:offset + n], shape)
                _copy_into(view, params[i].detach() if self._torch else params[i])
                views[i] = view
                grad_views[i] = xp.reshape(bucket.grads[offset:offset + n], shape)
        self.params = views
        self.grads = grad_views
        flat_params = [b.params for b in self._buckets]
        if self.mode == "blocked":
            self._layout = ListLayout(1)
            self.state = [self._own(self.opt.init([p])) for p in flat_params]
        else:
            self._layout = ListLayout(len(flat_params))
            self.state = self._own(self.opt.init(flat_params))

    def _small_members_first(self) -> None:
        """Lay out each buffer with its parameters below half a block first (in their order), then the
        others: :meth:`step_on` copies the small ones and cuts them into blocks together, and gives
        the others blocks of their own (:meth:`_member_blocks`), so a small parameter between two
        large ones does not make a block of its own."""
        block = self.block_size
        assert block is not None
        for bucket in self._buckets:
            members = sorted(bucket.members, key=lambda m: 2 * m[2] >= block)  # stable: order kept within each
            offset, bucket.members = 0, []
            for i, _, n, shape in members:
                bucket.members.append((i, offset, n, shape))
                offset += n

    def _own(self, state: Any) -> Any:
        """A copy of ``state`` in which every array is its own buffer.

        ``init`` may share one array between fields (the learning rate and an adaptation's initial
        rate) or with the params; in-place writes need every field to be a separate buffer.
        """
        xp = self.xp
        return optree.tree_map(lambda x: xp.asarray(x, copy=True), state)

    # -- the step -----------------------------------------------------------------------------

    def step(
        self,
        grads: Sequence[Any] | None = None,
        *,
        alpha: Sequence[Any] | None = None,
        weight_decay: Sequence[float] | None = None,
    ) -> None:
        """One optimizer step, in place on :attr:`params` and :attr:`state`.

        Args:
            grads: gradients per leaf (in the order of ``params``); ``None``: the gradients are
                already in :attr:`grads`. Leaves that are the :attr:`grads` views are not copied.
            alpha: a learning-rate override per leaf (floats or 0-D arrays; leaves of one group must
                agree), as :meth:`~adaptlr.core.Optimizer.update_leaves` takes it.
            weight_decay: a weight-decay override per leaf (floats; one value per group).
        """
        if self._torch:
            import torch

            with torch.no_grad():
                self._step(grads, alpha, weight_decay)
        else:
            self._step(grads, alpha, weight_decay)

    def step_on(
        self,
        params: Sequence[Any],
        grads: Sequence[Any],
        *,
        alpha: Sequence[Any] | None = None,
        weight_decay: Sequence[float] | None = None,
    ) -> None:
        """One blocked step that reads ``params`` and ``grads`` where they are and writes the new
        parameters into ``params`` (mode ``"blocked"`` only), in place of copying them into the flat
        buffers before :meth:`step` and out after it.

        The blocks follow the parameters (:meth:`_member_blocks`): a parameter of at least half a
        block has blocks of its own, which are views of its storage and of its gradient's
        (``p.reshape(-1)[a:b]`` of a C-contiguous tensor), so the step moves no copy of it; the
        smaller parameters, and those whose storage has another layout, are copied into the flat
        buffers before the step (and their parameters out after it), as :meth:`step` does with all of
        them. The state stays in the flat buffers. The same update as :meth:`step` on every element;
        the sums of a step in two passes are added up over other blocks (equal to rounding).

        Args:
            params: the parameter leaves the flat buffers were made for (same order, shapes and
                dtypes), written in place.
            grads: their gradients.
            alpha: as for :meth:`step`.
            weight_decay: as for :meth:`step`.
        """
        if self.mode != "blocked":
            raise ValueError(f"step_on needs the blocked mode (block_size), this optimizer runs {self.mode!r}")
        if len(params) != self._num or len(grads) != self._num:
            raise ValueError(f"params and grads need {self._num} leaves each, got {len(params)} and {len(grads)}")
        if self._torch:
            import torch

            with torch.no_grad():
                self._step_on(list(params), list(grads), alpha, weight_decay)
        else:
            self._step_on(list(params), list(grads), alpha, weight_decay)

    def _step_on(self, params: list, grads: list, alpha: Sequence[Any] | None,
                 weight_decay: Sequence[float] | None) -> None:
        blocks, direct = self._member_blocks()
        p_flat = [_flat_view(p, self.params[i]) if direct[i] else None for i, p in enumerate(params)]
        g_flat = [_flat_view(g, self.grads[i]) if direct[i] else None for i, g in enumerate(grads)]
        staged_p = [i for i, v in enumerate(p_flat) if v is None]
        staged_g = [i for i, v in enumerate(g_flat) if v is None]
        self._copy_all([self.params[i] for i in staged_p], [params[i] for i in staged_p])
        self._copy_all([self.grads[i] for i in staged_g], [grads[i] for i in staged_g])
        self._step_blocked(*self._bucket_overrides(alpha, weight_decay), blocks, (p_flat, g_flat))
        self._copy_all([params[i] for i in staged_p], [self.params[i] for i in staged_p])

    def _copy_all(self, dst: list, src: list) -> None:
        if not dst:
            return
        if self._torch:
            import torch

            torch._foreach_copy_(dst, src)
        else:
            for d, s in zip(dst, src):
                _copy_into(d, s)

    def _member_blocks(self) -> tuple[list[tuple], list[bool]]:
        """The blocks of :meth:`step_on` and, per leaf, whether it has blocks of its own.

        A parameter of at least half a block (``block_size``) is cut into the fewest equal pieces of
        at most a block, ``(bucket, start, stop, (leaf, offset))``; each run of smaller parameters
        between them is cut into blocks of ``block_size``, ``(bucket, start, stop, None)``, which may
        straddle parameters (these are staged in the flat buffers).
        """
        if self._member_plan is not None:
            return self._member_plan
        block = self.block_size
        assert block is not None
        blocks: list[tuple] = []
        direct = [False] * self._num
        for b, bucket in enumerate(self._buckets):
            run = None  # where the current run of small parameters starts
            for i, offset, n, _ in bucket.members:
                if 2 * n < block:
                    run = offset if run is None else run
                    continue
                if run is not None:
                    blocks.extend((b, s, min(s + block, offset), None) for s in range(run, offset, block))
                    run = None
                size = -(-n // -(-n // block))  # the fewest pieces of at most a block, equal
                blocks.extend((b, offset + s, offset + min(s + size, n), (i, offset)) for s in range(0, n, size))
                direct[i] = True
            if run is not None:
                blocks.extend((b, s, min(s + block, bucket.size), None) for s in range(run, bucket.size, block))
        self._member_plan = (blocks, direct)
        return self._member_plan

    def _step(self, grads: Sequence[Any] | None, alpha: Sequence[Any] | None,
              weight_decay: Sequence[float] | None) -> None:
        if grads is not None:
            if len(grads) != self._num:
                raise ValueError(f"grads has {len(grads)} leaves but params has {self._num}")
            for view, g in zip(self.grads, grads):
                if g is not view:
                    _copy_into(view, g)
        if self.mode == "per-tensor":
            self._step_per_tensor(alpha, weight_decay)
            return
        bucket_alpha, bucket_decay = self._bucket_overrides(alpha, weight_decay)
        if self.mode == "blocked":
            self._step_blocked(bucket_alpha, bucket_decay)
        elif self.mode == "compiled":
            if self._compiled is None:
                import torch

                self._compiled = torch.compile(private_code(self._flat_step_scalars_out), dynamic=False)
            scalars = self._compiled(self.state, bucket_alpha, bucket_decay)
            # torch 2.13's compiled graphs drop in-place writes into 0-D float inputs, so the 0-D
            # fields come back as outputs and are written here (a handful of scalars).
            for dst, src in zip([x for x in optree.tree_leaves(self.state) if x.ndim == 0], scalars):
                _copy_into(dst, src)
        else:
            self._flat_step(self.state, bucket_alpha, bucket_decay)

    def _bucket_overrides(self, alpha: Sequence[Any] | None,
                          weight_decay: Sequence[float] | None) -> tuple[list | None, list | None]:
        """The per-leaf ``alpha`` and ``weight_decay`` overrides as one value per buffer (its first
        member's: leaves of one group agree)."""
        bucket_alpha = None if alpha is None else [self._scalar(alpha[b.members[0][0]], b) for b in self._buckets]
        bucket_decay = None if weight_decay is None else [float(weight_decay[b.members[0][0]]) for b in self._buckets]
        return bucket_alpha, bucket_decay

    def _scalar(self, value: Any, bucket: _Bucket) -> Any:
        if not isinstance(value, (int, float)):
            return value
        key = (float(value), str(bucket.dtype), str(bucket.device))
        found = self._scalar_cache.get(key)
        if found is None:
            found = self._scalar_cache[key] = self.xp.asarray(float(value), dtype=bucket.dtype, device=bucket.device)
        return found

    def _flat_step(self, state: OptimizerState, alpha: list | None, weight_decay: list | None) -> None:
        params = [b.params for b in self._buckets]
        grads = [b.grads for b in self._buckets]
        if self._torch and self._written_step(state, params, grads, alpha, weight_decay):
            return
        updates, new_state = self.opt.update_leaves(
            self.xp, self._layout, grads, state, params, alpha=alpha, weight_decay=weight_decay
        )
        _write_state(state, new_state)
        for p, u in zip(params, updates):
            _add_into(p, u)

    def _written_step(self, state: OptimizerState, params: list, grads: list, alpha: list | None,
                      weight_decay: list | None) -> bool:
        """A learning-rate-free base's step written for torch (:mod:`adaptlr.backends.torch_lr_free`)
        on the buffers, its state written in place; False where there is none (or the base's
        learning rate is a schedule that no ``alpha`` gives)."""
        from adaptlr.backends import torch_lr_free
        from adaptlr.backends.torch_block_sums import plain_tensors

        found = torch_lr_free.step_module(self.opt)
        if found is None or not plain_tensors(params, grads, None):
            return False
        module, base = found
        if alpha is None and callable(base.learning_rate):
            return False
        fields = {f"base.{name}": value for name, value in zip(state.base._fields, state.base)}
        per_element = {name: value for name, value in fields.items() if isinstance(value, list)}
        entries = [{name: value[k] for name, value in per_element.items()} for k in range(len(params))]
        shared = {name: value for name, value in fields.items() if name not in per_element and value is not None}
        alphas = list(alpha) if alpha is not None else list(state.learning_rate)
        decays = list(weight_decay) if weight_decay is not None else [base.weight_decay] * len(params)
        count = state.count + 1
        new = module.step(base, params, grads, entries, shared, alphas, decays, count)
        for name, value in new.items():
            _copy_into(fields[name], value)
        _copy_into(state.count, count)
        for rate, a in zip(state.learning_rate, alphas):
            _copy_into(rate, a)
        return True

    def _flat_step_scalars_out(self, state: OptimizerState, alpha: list | None, weight_decay: list | None) -> list:
        """:meth:`_flat_step` for ``torch.compile``: per-element fields in place, 0-D fields returned."""
        params = [b.params for b in self._buckets]
        grads = [b.grads for b in self._buckets]
        updates, new_state = self.opt.update_leaves(
            self.xp, self._layout, grads, state, params, alpha=alpha, weight_decay=weight_decay
        )
        _write_state(state, new_state, skip_scalars=True)
        for p, u in zip(params, updates):
            _add_into(p, u)
        return [x for x in optree.tree_leaves(new_state) if x.ndim == 0]

    def _step_blocked(self, alpha: list | None, weight_decay: list | None, blocks: list[tuple] | None = None,
                      sources: tuple[list, list] | None = None) -> None:
        """The update over blocks of each buffer, each block written before the next is computed
        (:func:`adaptlr.backends.part_sums.run_parts`): blockwise algorithms in one pass; the others
        (one buffer, replayable sums) in one pass that refuses sums (AutoDrop between epoch
        boundaries), or, where the step sums, in two (each block's partial sums, then every block
        with the whole sums). Where every sum comes before the base direction
        (:func:`sums_before_direction`: HD, EG global), the first pass after its first block takes
        :data:`FIRST_PASS_BLOCKS_PER_CALL` blocks per call, each a leaf of one update: it only
        sums, and each call costs the update's Python and dispatch work. On torch the blocks of a
        buffer after the first of a writing pass (and of a first pass that stops at its last sum,
        and the groups after the first of a grouped first pass) replay the aten operations of the
        first such block or group (:data:`REPLAY_BLOCKS`, :mod:`adaptlr.backends.block_tape`): the
        same operations, without the update's Python.

        ``blocks``: ``(bucket, start, stop, member)`` (default: ``block_size`` strides of each buffer,
        member None); a block whose member is ``(leaf, offset)`` reads and writes ``sources`` (the
        flat views of :meth:`step_on`, per leaf: parameters, gradients; None: the flat buffers')."""
        from adaptlr.backends import part_sums

        xp, layout, block = self.xp, self._layout, self.block_size
        assert block is not None
        last: dict[int, Any] = {}  # per buffer: the new state of its last block written
        # Per pass (the reducer's kind) and buffer: the step's scalars, computed for its first block
        # and reused by the others (not across passes: the first pass's sums are partial).
        step_scalars: dict[tuple, Scalars] = {}

        donation_safe = self.opt.donation_safe
        # (not while torch.compile traces the step: a dispatch mode would break its graph)
        replaying = REPLAY_BLOCKS and self._torch and not _torch_compiling()

        def block_inputs(part: tuple) -> tuple[Any, Any]:
            """The block's parameters and gradients: views of the flat buffers or of ``sources``."""
            b, start, stop, member = part
            bucket = self._buckets[b]
            p_flat = g_flat = None  # a leaf's own flat storage, None where it is staged in the buffers
            offset = 0
            if member is not None and sources is not None:
                i, offset = member
                p_flat, g_flat = sources[0][i], sources[1][i]
            params = bucket.params[start:stop] if p_flat is None else p_flat[start - offset:stop - offset]
            grads = bucket.grads[start:stop] if g_flat is None else g_flat[start - offset:stop - offset]
            return params, grads

        # Per buffer and kind of pass: this step's tape of a writing block, replayed on the next ones
        # (adaptlr.backends.block_tape; None: its operations refused a replay).
        tapes: dict[tuple, Any] = {}
        per_element: dict[int, list] = {}  # per buffer: its per-element state fields, in the state's order

        def replayed(key: tuple, arrays: Callable[[], list], reducer: Any) -> bool:
            """Whether a part's step ran as a replay of this step's tape ``key`` on ``arrays()`` (its
            parameters, gradients and per-element state views), its results handed to ``reducer``."""
            tape = tapes.get(key)
            if tape is None:
                return False
            inputs = arrays()
            if not tape.fits(inputs):
                return False
            results = tape.replay(inputs)
            if reducer is not None:
                reducer.replayed(results)
            return True

        @contextlib.contextmanager
        def taped(key: tuple, arrays: list, length: int, reducer: Any) -> Any:
            """Records the part's step as this step's tape ``key`` (once per step and key)."""
            if key in tapes:
                yield
                return
            from adaptlr.backends import block_tape  # pyright: ignore[reportMissingImports]

            recording = block_tape.recording(block_tape.Tape(len(arrays), length), arrays)
            try:
                with recording:
                    yield
            finally:  # also where a first pass's part stops at its last sum (part_sums.PartSummed)
                tapes[key] = recording.finish(reducer.partials if isinstance(reducer, part_sums.Recorder) else [])

        def block_arrays(part: tuple, params: Any, grads: Any) -> list:
            b, start, stop, _ = part
            if b not in per_element:
                per_element[b] = [x for x in optree.tree_leaves(self.state[b]) if x.ndim == 1]
            return [params, grads, *[x[start:stop] for x in per_element[b]]]

        def run_block(part: tuple, reducer: Any, write: bool, donate: bool) -> None:
            b, start, stop, _ = part
            bucket, state = self._buckets[b], self.state[b]
            params, grads = block_inputs(part)
            key = (type(reducer), b)
            # Replays (adaptlr.backends.block_tape): a writing block after the first (the parts that
            # may be abandoned and run again do not donate), and a first-pass block that stops at its
            # last sum (its partial sums are the tape's results), replay the tape of the first such
            # block of its buffer and pass.
            replays = replaying and (
                (write and donate) or (isinstance(reducer, part_sums.Recorder) and reducer.sums is not None))
            if replays and replayed(key, lambda: block_arrays(part, params, grads), reducer):
                return
            if key not in step_scalars:
                step_scalars[key] = Scalars.of_step(xp, state, [bucket.params])
            chunk = optree.tree_map(lambda x: x[start:stop] if x.ndim == 1 else x, state)
            # The block's per-element state (views of the buffers, written back below) may be written
            # into by the step itself; the 0-D fields are every block's.
            fields = [x for x in optree.tree_leaves(chunk) if x.ndim == 1]
            donated = fields if donate and donation_safe else []
            recorder = (taped(key, [params, grads, *fields], stop - start, reducer) if replays
                        else contextlib.nullcontext())
            with recorder, donating(step_scalars[key], donated):
                updates, new_chunk = self.opt.update_leaves(
                    xp, layout, [grads], chunk, [params],
                    alpha=None if alpha is None else [alpha[b]],
                    weight_decay=None if weight_decay is None else [weight_decay[b]], reducer=reducer,
                    scalars=step_scalars[key],
                )
                if write:
                    # Per-element fields: write the block now; 0-D fields (count, learning rate, the
                    # global scalars of the whole sums) are the same for every block and are written
                    # once, after the last.
                    _write_state(chunk, new_chunk, skip_scalars=True)
                    _add_into(params, updates[0])
                    last[b] = new_chunk

        fields_of: dict[int, tuple] = {}

        def run_group(group: list[tuple], reducer: Any) -> None:
            """The first pass over consecutive blocks of one buffer in one call, each block a leaf
            (:func:`sums_before_direction`: the pass stops at its last sum, writing nothing)."""
            b = group[0][0]
            if any(part[0] != b for part in group):  # one buffer per call: its state and α
                for part in group:
                    run_block(part, reducer, False, False)
                return
            bucket, state = self._buckets[b], self.state[b]
            inputs = [block_inputs(part) for part in group]
            key = (type(reducer), b)
            if key not in step_scalars:
                step_scalars[key] = Scalars.of_step(xp, state, [bucket.params])
            if b not in fields_of:  # once per step and buffer: (skeleton, [(per_param, value)])
                skeleton, fields = split_state(state, layout.treespec)
                fields_of[b] = skeleton, [(f.per_param, f.value[0] if f.per_param else f.value) for f in fields]
            skeleton, fields = fields_of[b]
            values = [[_block_of(slot, start, stop) for _, start, stop, _ in group] if per_param else slot
                      for per_param, slot in fields]
            # A group after the first replays the first one's tape where it has as many arrays
            # (adaptlr.backends.block_tape; the pass's last group may be shorter: it runs its step).
            arrays = [*(p for p, _ in inputs), *(g for _, g in inputs),
                      *(x for x in optree.tree_leaves(values) if x.ndim == 1)] if replaying else []
            if replaying and replayed(("group", b), lambda: arrays, reducer):
                return
            recorder = (taped(("group", b), arrays, group[0][2] - group[0][1], reducer) if replaying
                        else contextlib.nullcontext())
            with recorder:
                self.opt.update_leaves(
                    xp, ListLayout(len(group)), [g for _, g in inputs], rebuild_state(skeleton, values),
                    [p for p, _ in inputs],
                    alpha=None if alpha is None else [alpha[b]] * len(group),
                    weight_decay=None if weight_decay is None else [weight_decay[b]] * len(group),
                    reducer=reducer, scalars=step_scalars[key],
                )

        if blocks is None:
            blocks = [(b, start, min(start + block, bucket.size), None)
                      for b, bucket in enumerate(self._buckets) for start in range(0, bucket.size, block)]
        groups = None if self._blockwise or not sums_before_direction(self.opt) else (FIRST_PASS_BLOCKS_PER_CALL,
                                                                                     run_group)
        # An algorithm that sums on every step (not only at epoch boundaries: sums_rarely) takes the
        # two passes at once from its second step, its first block's first pass stopping at the last
        # of the sums counted in its first step (the count is fixed by the step's code), instead of
        # trying one pass and then running the first block's whole step (part_sums.run_parts).
        # (A step's count must not depend on its weight decay, nor on which leaves a part has: the
        # parts of one step add up their k-th sums.)
        made = None if self._blockwise or sums_rarely(self.opt) else self._sums_made
        mode = "none" if self._blockwise else "replay" if made else "try"
        counted = part_sums.run_parts(xp, blocks, run_block, mode, first_pass_groups=groups, sums_made=made)
        if counted:
            self._sums_made = counted
        for b, new_state in last.items():
            _write_state(self.state[b], new_state, only_scalars=True)

    def _step_per_tensor(self, alpha: Sequence[Any] | None, weight_decay: Sequence[float] | None) -> None:
        if alpha is not None:
            alpha = [self._scalar_leaf(a, p) for a, p in zip(alpha, self.params)]
        updates, new_state = self.opt.update_leaves(
            self.xp, self._layout, self.grads, self.state, self.params, alpha=alpha,
            weight_decay=None if weight_decay is None else [float(w) for w in weight_decay],
        )
        _write_state(self.state, new_state)
        for p, u in zip(self.params, updates):
            _add_into(p, u)

    def _scalar_leaf(self, value: Any, p: Any) -> Any:
        if not isinstance(value, (int, float)):
            return value
        key = (float(value), str(p.dtype), str(array_api_compat.device(p)))
        found = self._scalar_cache.get(key)
        if found is None:
            found = self._scalar_cache[key] = self.xp.asarray(float(value), dtype=p.dtype,
                                                              device=array_api_compat.device(p))
        return found

    # -- state in the params' layout ----------------------------------------------------------

    def per_tensor_state(self) -> OptimizerState:
        """The state in the layout of the original params (per-parameter fields as views).

        Valid for flat-safe algorithms: a per-parameter state field of a flat buffer splits into
        the views of its members; 0-D fields (one per buffer) are repeated for each member.
        """
        if self.mode == "per-tensor":
            return self.state
        if self.mode == "blocked":
            # One state per buffer: split each into its members, then merge leaf lists in order.
            per_bucket = [self._split(s, [b]) for s, b in zip(self.state, self._buckets)]
            return _merge(per_bucket, self._buckets, self._num)
        return self._split(self.state, self._buckets)

    def _split(self, state: Any, buckets: list) -> Any:
        return _split_node(state, self.xp, buckets, len(self._buckets), self._num)


# Module-level recursive functions, not recursive closures: a closure that calls itself is a reference
# cycle that keeps what it captured alive until Python's cyclic collector runs (adaptlr._state_tree).


def _split_node(node: Any, xp: Any, buckets: list, num_buckets: int, num: int) -> Any:
    if isinstance(node, list) and len(node) == len(buckets):
        # A per-parameter field: one subtree per buffer, split into one per member.
        out: list = [None] * num
        for sub, bucket in zip(node, buckets):
            for i, offset, n, shape in bucket.members:
                out[i] = optree.tree_map(
                    lambda arr, offset=offset, n=n, shape=shape, size=bucket.size: (
                        xp.reshape(arr[offset:offset + n], shape)
                        if arr.ndim == 1 and arr.shape[0] == size else arr
                    ),
                    sub,
                )
        return out if len(buckets) == num_buckets else [x for x in out if x is not None]
    if isinstance(node, tuple):
        items = [_split_node(x, xp, buckets, num_buckets, num) for x in node]
        return type(node)(*items) if hasattr(node, "_fields") else tuple(items)
    return node


def _merge(per_bucket: list, buckets: list, num: int) -> Any:
    """Merge per-buffer states (each split into its members) into one state in the params' order."""
    # (each bucket's leaves come from _split_node in the order of their index)
    return _merge_nodes(per_bucket, [i for b in buckets for i in sorted(m[0] for m in b.members)], num)


def _merge_nodes(nodes: list, order: list[int], num: int) -> Any:
    first = nodes[0]
    if isinstance(first, list):
        flat = [x for node in nodes for x in node]
        out: list = [None] * num
        for i, x in zip(order, flat):
            out[i] = x
        return out
    if isinstance(first, tuple):
        items = [_merge_nodes([n[k] for n in nodes], order, num) for k in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    return first


def _block_of(slot: Any, start: int, stop: int) -> Any:
    """A block of a flat buffer's per-parameter slot: its 1-D arrays cut to ``[start:stop]``, its 0-D
    ones (a per-leaf learning rate) as they are."""
    if hasattr(slot, "ndim"):
        return slot[start:stop] if slot.ndim == 1 else slot
    return optree.tree_map(lambda x: x[start:stop] if x.ndim == 1 else x, slot)


def _write_state(dst: Any, src: Any, *, skip_scalars: bool = False, only_scalars: bool = False) -> None:
    """Copy the arrays of state ``src`` into the buffers of state ``dst`` (same structure), in place."""
    dst_leaves = optree.tree_leaves(dst)
    src_leaves = optree.tree_leaves(src)
    if len(dst_leaves) != len(src_leaves):
        raise RuntimeError("the optimizer returned a state of a different structure; cannot update in place")
    # A new field that is an old buffer of another field must be read before that buffer is written.
    position = {id(d): k for k, d in enumerate(dst_leaves)}
    src_leaves = [_snapshot(s) if position.get(id(s), k) != k else s for k, s in enumerate(src_leaves)]
    for d, s in zip(dst_leaves, src_leaves):
        scalar = d.ndim == 0
        if (scalar and skip_scalars) or (not scalar and only_scalars) or d is s:  # d is s: written in place
            continue
        _copy_into(d, s)
