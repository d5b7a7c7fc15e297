"""``FlatOptimizer``'s blocks for algorithms with sums over elements (``adaptlr.backends.part_sums``).

A step with no sum runs the blocks in one pass (AutoDrop between epoch boundaries); a step that sums
takes two: each block's partial sums, then every block with the whole sums. Both give the step of
the whole model: float64 to 1e-12 of the functional API (sums reassociated), over runs that cross
epoch boundaries, on NumPy and torch, through the torch adapter's default path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytest

import adaptlr
from adaptlr.backends import part_sums
from adaptlr.backends.bench import _tracemalloc_peak
from adaptlr.backends.fast import (
    FIRST_PASS_BLOCKS_PER_CALL,
    FlatOptimizer,
    recommended_options,
    sums_before_direction,
    sums_cheaply,
    sums_rarely,
    sums_replayable,
)
from adaptlr.core import Adaptation
from tests.conftest import aten_ops_by_name, max_rel_err, random_problem

SHAPES = [(6, 5), (11,), (3, 4, 2), ()]  # 65 elements: blocks of 7 straddle every tensor boundary
BLOCK = 7
STEPS = 13
EPOCH = 4  # AutoDrop: boundaries at t = 1, 5, 9, 13


@pytest.fixture(autouse=True)
def _every_block_runs_its_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests count a blocked step's calls and passes: torch's replays of a block's operations
    (``adaptlr.backends.block_tape``, bit for bit the same steps: tests/test_block_tape.py) make none."""
    from adaptlr.backends import fast

    monkeypatch.setattr(fast, "REPLAY_BLOCKS", False)


def _algorithms() -> dict:
    return {
        "autodrop(adamw)": lambda: adaptlr.autodrop(adaptlr.adamw(1e-2), steps_per_epoch=EPOCH, theta=30.0,
                                                    theta_max=90.0, patience_epochs=1),
        "autodrop(sgdm, average)": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=EPOCH,
                                                            theta=30.0, theta_max=90.0, patience_epochs=1,
                                                            average=True),
        "hd_global(adamw)": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3),
        "eg_global(sgd)": lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05), scale_lr=0.1, gain_lr=0.1),
        "prodigy": lambda: adaptlr.prodigy(d0=1e-3, weight_decay=0.01, use_bias_correction=True),
        "dadapt_adam": lambda: adaptlr.dadapt_adam(d0=1e-3),
        "dadapt_sgd(momentum, coupled decay)": lambda: adaptlr.dadapt_sgd(d0=1e-3, momentum=0.5, weight_decay=0.01),
        "dog": lambda: adaptlr.dog(),
        "dowg": lambda: adaptlr.dowg(),
        "mechanic(adamw)": lambda: adaptlr.mechanic(adaptlr.adamw(1e-2), s_decay=0.1),
        # no sums, 0-D state from α and t only (fast.partitionable): one pass, as before on chunks
        "schedule_free_adamw": lambda: adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=0.1),
    }


def _problem(library: str = "numpy"):
    return random_problem(library, SHAPES, STEPS, seed=3)


def _grad(p, n):
    return 0.5 * p + n  # the trajectory feeds back into the gradients (AutoDrop's angle, HD's products)


def _functional(opt, library: str):
    params, noise = _problem(library)
    state = opt.init(params)
    for t in range(STEPS):
        updates, state = opt.update([_grad(p, n) for p, n in zip(params, noise[t])], state, params)
        params = adaptlr.apply_updates(params, updates)
    return params


def _blocked(opt, library: str, block: int = BLOCK) -> FlatOptimizer:
    params, noise = _problem(library)
    fo = FlatOptimizer(opt, params, block_size=block)
    for t in range(STEPS):
        fo.step([_grad(p, n) for p, n in zip(fo.params, noise[t])])
    return fo


def _np(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(_algorithms()))
def test_blocks_with_sums_equal_the_functional_api(name: str, library: str) -> None:
    opt = _algorithms()[name]()
    assert sums_replayable(opt)
    fo = _blocked(opt, library)
    assert fo.mode == "blocked"
    expected = _functional(opt, library)
    assert max_rel_err([_np(p) for p in fo.params], [_np(p) for p in expected]) <= 1e-12
    if name.startswith("autodrop"):  # the angle's sums decided a drop within the run
        assert int(fo.state[0].adaptations[0].drop_count) == 1


def test_blocks_without_the_second_pass_would_be_wrong() -> None:
    """The test above can fail: blocks that use their own partial sums drift from the whole step."""
    opt = _algorithms()["prodigy"]()
    expected = _functional(opt, "numpy")
    params, noise = _problem()
    fo = FlatOptimizer(opt, params, block_size=BLOCK)
    fo._blockwise = True  # one pass with plain sums: each block sums over itself only
    for t in range(STEPS):
        fo.step([_grad(p, n) for p, n in zip(fo.params, noise[t])])
    assert max_rel_err([np.asarray(p) for p in fo.params], expected) > 1e-6


def _passes(opt, steps: int = STEPS, owner: str = "opt", method: str = "update_leaves") -> list[int]:
    """Calls per step of a blocked run's ``fo.opt.update_leaves`` (block updates), or of another
    method (``owner="base", method="direction"``: base directions), step by step."""
    params, noise = _problem()
    fo = FlatOptimizer(opt, params, block_size=BLOCK)
    calls = []
    target = fo.opt if owner == "opt" else fo.opt.base
    original = getattr(target, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(target, method, counted)
    per_step = []
    for t in range(steps):
        calls.clear()
        fo.step([_grad(p, n) for p, n in zip(fo.params, noise[t])])
        per_step.append(len(calls))
    return per_step


def test_autodrop_sums_only_at_boundaries_and_takes_two_passes_only_there() -> None:
    blocks = -(-sum(int(np.prod(s)) for s in SHAPES) // BLOCK)  # 10
    opt = _algorithms()["autodrop(adamw)"]()
    assert sums_rarely(opt)
    # A boundary step: the first block refuses its sum (nothing written), then two full passes.
    boundary, ordinary = 1 + 2 * blocks, blocks
    assert _passes(opt) == [boundary if t % EPOCH == 0 else ordinary for t in range(STEPS)]
    # Sums on every step: on the first, one refused block and two passes; from the second on, the two
    # passes at once (round 25). HD sums before its direction, so its first pass runs the first block
    # alone, then groups of FIRST_PASS_BLOCKS_PER_CALL blocks in one call each.
    hd = _algorithms()["hd_global(adamw)"]()
    assert not sums_rarely(hd) and sums_before_direction(hd)
    grouped = 1 + -(-(blocks - 1) // FIRST_PASS_BLOCKS_PER_CALL)
    assert FIRST_PASS_BLOCKS_PER_CALL > 1 and grouped < blocks
    assert _passes(hd, 3) == [1 + grouped + blocks, grouped + blocks, grouped + blocks]
    # No sums at all: one pass every step.
    assert _passes(_algorithms()["schedule_free_adamw"](), 3) == [blocks] * 3


@pytest.mark.parametrize("name, sums", [("prodigy", 2), ("dadapt_sgd(momentum, coupled decay)", 3),
                                        ("hd_global(adamw)", 1)])
def test_blocked_steps_after_the_first_stop_the_first_blocks_first_pass_at_its_last_sum(name, sums,
                                                                                       monkeypatch) -> None:
    """From its second step, a blocked step that sums on every step counts on its first step's number
    of sums: its first block's first pass stops at the last of them, as the other blocks' do (it ran
    the block's whole step, writing nothing, on every step before round 25), and no block is tried in
    one pass first. The steps stay those of the functional API
    (:func:`test_blocks_with_sums_equal_the_functional_api`)."""
    firsts: list = []
    original = part_sums.Recorder.__init__

    def init(self, xp, sums=None, rows=False):
        firsts.append(sums)
        original(self, xp, sums, rows)

    monkeypatch.setattr(part_sums.Recorder, "__init__", init)
    params, noise = _problem()
    fo = FlatOptimizer(_algorithms()[name](), params, block_size=BLOCK)
    assert fo.mode == "blocked"
    counts = []
    for t in range(3):
        firsts.clear()
        fo.step([_grad(p, n) for p, n in zip(fo.params, noise[t])])
        counts.append(firsts[0])  # the first block's recorder: None runs it to its end
    assert counts == [None, sums, sums]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", ["hd_global(adamw)", "eg_global(sgd)"])
def test_a_first_pass_over_several_blocks_per_call_gives_the_steps_of_one_block_per_call(name, backend,
                                                                                        monkeypatch) -> None:
    """The first pass of HD and EG global (sums before the direction) runs groups of blocks in one
    call, each block a leaf: the sums are the same partial sums added in another order (float64),
    so the steps agree with one block per call to float64 rounding; only these two group."""
    pytest.importorskip(backend)
    from adaptlr.backends import fast

    assert sums_before_direction(_algorithms()[name]())
    assert not any(sums_before_direction(_algorithms()[n]()) for n in ("autodrop(adamw)", "prodigy", "dadapt_adam"))
    runs = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(fast, "sums_before_direction", lambda opt: False)
        params, noise = _problem(backend)
        fo = FlatOptimizer(_algorithms()[name](), params, block_size=BLOCK)
        calls: list[int] = []

        def counted(*args, calls=calls, original=fo.opt.update_leaves, **kwargs):
            calls.append(len(args[2]))  # the leaves of this call: blocks
            return original(*args, **kwargs)

        monkeypatch.setattr(fo.opt, "update_leaves", counted)
        for t in range(STEPS):
            fo.step([_grad(p, n) for p, n in zip(fo.params, noise[t])])
        runs.append(([np.asarray(p).copy() for p in fo.params], calls))
    (grouped_params, grouped_calls), (single_params, single_calls) = runs
    assert max(grouped_calls) == FIRST_PASS_BLOCKS_PER_CALL and max(single_calls) == 1
    assert len(grouped_calls) < len(single_calls)
    assert max(max_rel_err(a, b) for a, b in zip(grouped_params, single_params)) <= 1e-13


def test_sums_before_the_direction_end_the_first_pass_before_it() -> None:
    """HD and EG global sum in ``before_direction``: from the second block on, the first pass stops
    there, so a step computes the base direction once per block plus once on the first step (the
    first block's first pass, which runs to its end to count the sums; from the second step on it
    stops at the counted last sum too); AutoDrop's boundary sums come after it."""
    blocks = -(-sum(int(np.prod(s)) for s in SHAPES) // BLOCK)  # 10
    for name in ("hd_global(adamw)", "eg_global(sgd)"):
        opt = _algorithms()[name]()
        assert sums_cheaply(opt) and not sums_rarely(opt), name
        assert _passes(opt, 3, "base", "direction") == [blocks + 1, blocks, blocks], name
    autodrop = _algorithms()["autodrop(adamw)"]()
    assert sums_cheaply(autodrop)
    # a boundary: the first block's refused pass, a first pass that reaches the sums, the second
    assert _passes(autodrop, EPOCH + 1, "base", "direction") == [2 * blocks + 1 if t % EPOCH == 0 else blocks
                                                                   for t in range(EPOCH + 1)]



def test_bases_that_sum_first_read_only_the_sums_terms_in_the_first_pass_and_skip_them_in_the_second() -> None:
    """Prodigy, D-Adapt Adam, DoG and DoWG make their sums before the rest of their step, with the
    terms as generators: in a two-pass blocked step (opt-in for them; torch, counted ops on every block) the first
    pass computes a block's terms and stops (from the second block on), the second does not
    evaluate them. Prodigy: ``abs`` (its ``Σ|s|``) and ``sqrt`` (its direction) once per block (a
    second step: the first block's first pass stops at the sums its first step counted; the first
    step's ran to its end); DoG: ``sub`` (``x - x_0``) once per block; D-Adapt Adam's terms
    ``g·s/(√v + ε)`` use a ``sqrt`` of their own."""
    pytest.importorskip("torch")
    blocks = -(-sum(int(np.prod(s)) for s in SHAPES) // BLOCK)  # 10
    cases = {"prodigy": {"abs": blocks, "sqrt": blocks}, "dog": {"sub": blocks},
             "dowg": {"sub": blocks}, "dadapt_adam": {"abs": blocks, "sqrt": 2 * blocks}}
    for name, expected in cases.items():
        opt = _algorithms()[name]()
        assert sums_replayable(opt) and not sums_cheaply(opt), name
        params, noise = _problem("torch")
        fo = FlatOptimizer(opt, params, block_size=BLOCK)
        fo.step([_grad(p, n) for p, n in zip(fo.params, noise[0])])
        grads = [_grad(p, n) for p, n in zip(fo.params, noise[1])]
        ops = aten_ops_by_name(lambda fo=fo, grads=grads: fo.step(grads))
        assert {op: ops.get(op, 0) for op in expected} == expected, (name, ops)
    assert not sums_cheaply(adaptlr.mechanic(adaptlr.adamw(1e-2)))  # sums after the inner update


def test_blocks_with_sums_need_one_buffer_and_replayable_sums() -> None:
    params = [np.ones(5), np.ones(4, dtype=np.float32)]  # two dtypes: two buffers
    assert FlatOptimizer(_algorithms()["autodrop(adamw)"](), params, block_size=3).mode == "flat"
    assert FlatOptimizer(adaptlr.adamw(), params, block_size=3).mode == "blocked"  # blockwise: any buffers
    assert FlatOptimizer(_algorithms()["autodrop(adamw)"](), [np.ones(5)], groups=["a"], block_size=3).mode \
        == "blocked"
    assert FlatOptimizer(_algorithms()["autodrop(adamw)"](), [np.ones(5), np.ones(3)], groups=["a", "b"],
                         block_size=3).mode == "flat"
    # Per-leaf sums (skip_nonfinite's counts) cannot be replayed: whole buffers. D-Adapt SGD's Σ s²
    # is summed from terms no other sum scales (its ‖g_1‖ enters where it is first known): blocks.
    assert not sums_replayable(adaptlr.skip_nonfinite(adaptlr.adamw()))
    assert FlatOptimizer(adaptlr.skip_nonfinite(adaptlr.adamw()), [np.ones(5)], block_size=3).mode == "flat"
    assert sums_replayable(adaptlr.dadapt_sgd())
    assert FlatOptimizer(adaptlr.dadapt_sgd(), [np.ones(5)], block_size=3).mode == "blocked"


class _SumsInShortBlocks(Adaptation):
    """A (wrong) declaration: replayable, but only blocks shorter than 7 elements ask for a sum."""

    name = "short_block_sums"
    state_class = tuple
    flat_safe = True
    replayable_sums = True

    def init(self, params, alpha, layout, xp):
        return ()

    def step(self, ctx, size, state):
        if ctx.params[0].shape[0] < BLOCK:
            ctx.reduce.total(ctx.xp.sum(p) for p in ctx.params)
        return size, state


class _GradNormScaled(NamedTuple):
    scale: Any


class _InverseGradNorm(Adaptation):
    """A new rule as a researcher would prototype it: κ = 1/(1 + ‖g_t‖), the norm summed over the
    whole model in ``before_direction`` (the step's inputs only), declared replayable and early."""

    name = "inverse_grad_norm"
    state_class = _GradNormScaled
    flat_safe = True
    replayable_sums = True
    sums_before_direction = True

    def init(self, params, alpha, layout, xp):
        return _GradNormScaled(xp.asarray(1.0, dtype=xp.float64))

    def before_direction(self, ctx, state):
        xp = ctx.xp
        norm = xp.sqrt(ctx.reduce.total((g * g for g in ctx.objective_grads), xp.float64))
        return _GradNormScaled(1.0 / (1.0 + norm))

    def step(self, ctx, size, state):
        return size.scaled([ctx.xp.astype(state.scale, g.dtype) for g in ctx.grads]), state


def test_a_new_rule_with_sums_before_the_direction_runs_over_blocks_as_one_step() -> None:
    """The hook is part of the contract, not HD's and EG's alone: a prototype adaptation summing in
    ``before_direction`` takes the cheap blocks (``sums_cheaply``), equals the functional API to
    1e-12 with blocks straddling every tensor, and its first pass stops before the direction."""
    opt = adaptlr.adamw(1e-2).wrapped(_InverseGradNorm())
    assert sums_cheaply(opt)
    # The first step in closed form: Adam's d_1 = g/(|g| + ε), κ_1 = 1/(1 + ‖g_1‖) from this step.
    params, noise = _problem()
    grads = [_grad(p, n) for p, n in zip(params, noise[0])]
    updates, _ = opt.update(grads, opt.init(params), params)
    kappa = 1.0 / (1.0 + np.sqrt(sum(float(np.sum(g * g)) for g in grads)))
    closed = [-1e-2 * kappa * g / (np.abs(g) + 1e-8) - 1e-2 * 1e-2 * p for g, p in zip(grads, params)]
    assert max_rel_err(updates, closed) <= 1e-12
    expected = _functional(opt, "numpy")
    fo = _blocked(opt, "numpy")
    assert fo.mode == "blocked"
    assert max_rel_err([np.asarray(p) for p in fo.params], expected) <= 1e-12
    blocks = -(-sum(int(np.prod(s)) for s in SHAPES) // BLOCK)
    assert _passes(opt, 2, "base", "direction") == [blocks + 1, blocks]


def test_a_sum_asked_for_after_blocks_were_written_is_an_error() -> None:
    opt = adaptlr.adamw().wrapped(_SumsInShortBlocks())
    fo = FlatOptimizer(opt, [np.ones(2 * BLOCK + 3)], block_size=BLOCK)
    assert fo.mode == "blocked"
    with pytest.raises(RuntimeError, match="after earlier parts were written"):
        fo.step([np.ones(2 * BLOCK + 3)])


def test_replayer_and_recorder_check_the_calls() -> None:
    xp = np
    with pytest.raises(part_sums.SumsRequested):
        part_sums.NoSums(xp).total([np.ones(3)])
    recorder = part_sums.Recorder(xp)
    assert recorder.total([np.ones(3), np.ones(2)]) == 5.0 and recorder.partials == [5.0]
    replayer = part_sums.Replayer(xp, [7.0])
    assert replayer.total([np.ones(3)]) == 7.0
    replayer.check_all_used()
    with pytest.raises(RuntimeError, match="more sums"):
        replayer.total([np.ones(3)])
    with pytest.raises(RuntimeError, match="fewer sums"):
        part_sums.Replayer(xp, [1.0, 2.0]).check_all_used()
    with pytest.raises(RuntimeError, match="per-leaf sum"):
        part_sums.Recorder(xp).leaf_sum(0, np.ones(3))
    assert part_sums.whole_sums([[1.0, 2.0], [3.0, 4.0]]) == [4.0, 6.0]
    with pytest.raises(RuntimeError, match="different numbers"):
        part_sums.whole_sums([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="sums must be"):
        part_sums.run_parts(xp, [], lambda part, reducer, write, donate: None, "twice")


def test_the_first_pass_stops_each_later_part_at_its_last_sum() -> None:
    """The first part's first pass runs to its end (it tells how many sums a part makes); the later
    parts' first passes stop at their last sum; every part's second pass runs whole, with the whole sums."""
    xp = np
    ran: list = []

    donated: list = []

    def run_part(part: int, reducer: Any, write: bool, donate: bool) -> None:
        donated.append((part, write, donate))
        first = reducer.total([np.full(2, float(part))])
        ran.append(("between", part, write))
        second = reducer.total([np.ones(part)])
        ran.append(("after", part, write, float(first), float(second)))

    part_sums.run_parts(xp, [1, 2, 3], run_part, "replay")
    assert ran == [("between", 1, False), ("after", 1, False, 2.0, 1.0),  # the first part: to its end
                   ("between", 2, False), ("between", 3, False),  # the others: up to their 2nd sum
                   *[x for p in (1, 2, 3) for x in (("between", p, True), ("after", p, True, 12.0, 6.0))]]
    # the state is donated only in the writing pass, from its second part on
    assert donated == [(1, False, False), (2, False, False), (3, False, False),
                       (1, True, False), (2, True, True), (3, True, True)]


@pytest.mark.parametrize("sums", ["none", "try"])
def test_one_pass_donates_from_the_second_part(sums: str) -> None:
    """A part that may be abandoned and run again (the first of ``"try"``, or of a path that falls
    back when the first part meets an operation it lacks) is never given its state to write into."""
    calls: list = []
    part_sums.run_parts(np, [1, 2, 3], lambda part, reducer, write, donate: calls.append((part, write, donate)),
                        sums)
    assert calls == [(1, True, False), (2, True, True), (3, True, True)]


def test_try_takes_two_passes_with_nothing_donated_to_the_abandoned_part() -> None:
    calls: list = []

    def run_part(part: int, reducer: Any, write: bool, donate: bool) -> None:
        calls.append((part, write, donate))
        reducer.total([np.ones(2)])

    part_sums.run_parts(np, [1, 2], run_part, "try")
    assert calls == [(1, True, False),  # asked for a sum: abandoned, then two passes
                     (1, False, False), (2, False, False), (1, True, False), (2, True, True)]


def test_blocked_autodrop_peak_is_blocks_not_the_model() -> None:
    """NumPy (tracemalloc): a blocked AutoDrop step, ordinary or at a boundary, holds a few blocks;
    the functional step holds several model-sized arrays."""
    rng = np.random.default_rng(0)
    shapes = [(512, 768), (1024,), (64, 64, 32)]  # 2^19 + 1024 elements, 2 MiB
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    model_bytes = sum(p.nbytes for p in params)
    block = 1 << 13  # 65 blocks
    opt = adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=3)
    fo = FlatOptimizer(opt, params, block_size=block)
    peaks = [_tracemalloc_peak(lambda: fo.step(grads)) for _ in range(6)]  # boundaries at steps 1 and 4
    # measured: ordinary steps 9.2 blocks (blocked AdamW's 9.1), boundary steps 13.7 (blocks of 2^15)
    # and 16.5 (2^13: Python's own objects count too)
    assert max(peaks) <= 20 * block * 4 <= model_bytes / 3
    state = {"p": [p.copy() for p in params], "s": opt.init(params)}

    def functional() -> None:
        updates, state["s"] = opt.update(grads, state["s"], state["p"])
        state["p"] = adaptlr.apply_updates(state["p"], updates)

    assert _tracemalloc_peak(functional) >= 2 * model_bytes


def test_recommended_blocks_for_rare_sums_on_large_models() -> None:
    rare = _algorithms()["autodrop(adamw)"]()
    assert recommended_options(rare, [np.zeros(10)]) == {}
    assert recommended_options(rare, [np.zeros(1 << 23, dtype=np.float32)] * 2) == {"block_size": 1 << 18}
    assert recommended_options(_algorithms()["prodigy"](), [np.zeros(1 << 23, dtype=np.float32)] * 2) is None


def test_torch_adapter_default_takes_blocks_for_autodrop_on_a_large_model(monkeypatch) -> None:
    """A model above the CPU flat limit (the limit set to 0 here): blocks with one param group, the list
    path with two (blocks with sums need one buffer); whole buffers on a small model."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends import fast
    from adaptlr.backends.torch import Optimizer

    params, noise = _problem("torch")
    opt = _algorithms()["autodrop(adamw)"]()
    expected = _functional(opt, "torch")
    for layout, path, limit in (("one group", "blocked", 0), ("two groups", "list", 0),
                                ("one group", "flat", fast._CPU_FLAT_BYTES_LIMIT)):
        monkeypatch.setattr(fast, "_CPU_FLAT_BYTES_LIMIT", limit)
        tensors = [torch.nn.Parameter(p.clone()) for p in params]
        groups = [{"params": tensors}] if layout == "one group" else [{"params": tensors[:2]},
                                                                       {"params": tensors[2:]}]
        torch_opt = Optimizer(groups, opt)
        for t in range(STEPS):
            for p, n in zip(tensors, noise[t]):
                p.grad = _grad(p.detach(), n)
            torch_opt.step()
            assert torch_opt.fast_path == path
        assert max_rel_err([p.detach().numpy() for p in tensors], [p.numpy() for p in expected]) <= 1e-12


@pytest.mark.parametrize("name", ["autodrop(adamw)", "hd_global(adamw)", "mechanic(adamw)"])
def test_torch_adapter_blocks_with_sums_missing_grads_and_a_state_dict_round_trip(name: str) -> None:
    """The adapter on blocks with sums (one group) against its list path: parameters without a
    gradient at some steps (the flat buffers are rebuilt for the parameters that step, and the
    list path takes over once their step counts differ), and a ``state_dict`` saved mid-run and
    loaded into a new optimizer that continues."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    params, noise = _problem("torch")
    masks = [(1, 1, 1, 1)] * 5 + [(1, 0, 1, 1)] * 2 + [(1, 1, 1, 1)] * 6
    assert len(masks) == STEPS

    def run(fast, reload_at: int | None = None):
        tensors = [torch.nn.Parameter(p.clone()) for p in params]
        torch_opt = Optimizer(tensors, _algorithms()[name](), fast=fast)
        paths = []
        for t in range(STEPS):
            if t == reload_at:
                saved = torch_opt.state_dict()
                torch_opt = Optimizer(tensors, _algorithms()[name](), fast=fast)
                torch_opt.load_state_dict(saved)
            torch_opt.zero_grad()
            for p, n, keep in zip(tensors, noise[t], masks[t]):
                if keep:
                    p.grad = _grad(p.detach(), n)
            torch_opt.step()
            paths.append(torch_opt.fast_path)
        return [p.detach().numpy() for p in tensors], paths

    expected, _ = run(False)
    for reload_at in (None, 3):
        got, paths = run({"block_size": 5}, reload_at)
        assert paths[:5] == ["blocked"] * 5
        assert max_rel_err(got, expected) <= 1e-12
