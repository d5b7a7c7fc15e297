"""The torch adapter's list step over blocks of a tensor's rows (adaptlr.backends.torch_rows).

Algorithms whose sums stay within tensors (DSA, HD and EG per tensor, LDoG) run a large tensor in
blocks of its rows, two passes: the same step as the whole tensor's (float64, 1e-12), with the
temporaries of a block (issue 20, target 5).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import adaptlr  # noqa: E402
from adaptlr.backends import fast, part_sums, torch_rows  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402

SHAPES = [(24, 16), (40,), (3, 2, 5), (7, 9), (1, 30)]

ROW_REPLAYABLE = {
    "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-2, weight_decay=1e-2)),
    "dsa-element-bounded": lambda: adaptlr.dsa(adaptlr.adam(1e-2), structure=("tensor", "row", "col", "element"),
                                               min_lr=1e-4, max_lr=5e-2),
    "dsa(active)": lambda: adaptlr.dsa(adaptlr.active(adaptlr.sgd(1e-2, momentum=0.9), steps_per_epoch=4)),
    "eg-tensor": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), 1e-2, 1e-2, scale="tensor"),
    "hd-tensor": lambda: adaptlr.hypergradient(adaptlr.sgd(1e-2, momentum=0.9), 1e-3, granularity="tensor"),
    "ldog": lambda: adaptlr.dog(layerwise=True),
}


def _run(make, part_elements, steps: int = 13, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]
    opt = Optimizer(params, make(), fast=False)
    opt.list_part_elements = part_elements
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    return params, opt


def test_row_blocks_cover_the_rows_within_the_budget():
    assert torch_rows.row_blocks((24, 16), 100) == [slice(0, 6), slice(6, 12), slice(12, 18), slice(18, 24)]
    assert torch_rows.row_blocks((7, 9), 20) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    assert torch_rows.row_blocks((3, 2, 5), 9) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # a row above the budget
    assert torch_rows.row_blocks((24, 16), 384) is None  # fits
    assert torch_rows.row_blocks((1, 30), 10) is None  # one row
    assert torch_rows.row_blocks((), 1) is None
    assert torch_rows.row_blocks((40,), 15) == [slice(0, 15), slice(15, 30), slice(30, 40)]
    with pytest.raises(ValueError, match="at least 1"):
        torch_rows.row_blocks((4, 4), 0)
    assert torch_rows.per_row(torch.zeros(24, 1), (24, 16)) and torch_rows.per_row(torch.zeros(24, 16), (24, 16))
    assert not torch_rows.per_row(torch.zeros(1, 16), (24, 16)) and not torch_rows.per_row(torch.zeros(()), (24, 16))


def test_which_algorithms_replay_their_sums_over_rows():
    for make in ROW_REPLAYABLE.values():
        assert fast.sums_replayable_by_rows(make())
    assert not fast.sums_replayable_by_rows(adaptlr.adamw())  # no sums: whole tensors or blocks elsewhere
    assert not fast.sums_replayable_by_rows(adaptlr.hypergradient(adaptlr.sgd(0.1), 1e-3))  # global sums
    assert not fast.sums_replayable_by_rows(adaptlr.prodigy())


@pytest.mark.parametrize("name", list(ROW_REPLAYABLE))
def test_row_blocks_make_the_step_of_whole_tensors(name):
    make = ROW_REPLAYABLE[name]
    calls = []
    original = part_sums.run_parts

    def spy(xp, parts, run_part, sums, rows=False, **options):
        calls.append((len(parts), sums, rows))
        return original(xp, parts, run_part, sums, rows, **options)

    whole, _ = _run(make, None)
    part_sums.run_parts = spy
    try:
        blocked, opt = _run(make, 50)
    finally:
        part_sums.run_parts = original
    # (24, 16) in 8 blocks of 3 rows and (7, 9) in 2 blocks; (40,), (3, 2, 5), (1, 30) whole
    assert set(calls) == {(8, "replay", True), (2, "replay", True)}, set(calls)
    assert len(calls) == 2 * 13
    for a, b in zip(whole, blocked):
        assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max()), name
    # the state too (row factors written block by block, column and tensor factors after the last)
    whole_state, blocked_state = _run(make, None)[1].state_dict(), opt.state_dict()
    for key, entry in whole_state["state"].items():
        for field, value in entry.items():
            other = blocked_state["state"][key][field]
            for x, y in zip(_tensors(value), _tensors(other)):
                assert torch.allclose(x, y, rtol=1e-12, atol=1e-300), (name, field)


def _tensors(value):
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    return [value] if isinstance(value, torch.Tensor) else []


def test_blocks_that_used_their_own_sums_would_not_be_the_same_step(monkeypatch):
    """The check above can fail: answering each block's sums with its own partials differs."""
    whole, _ = _run(ROW_REPLAYABLE["dsa"], None)

    def own_partials(xp, parts, run_part, sums, rows=False, **options):
        for part in parts:  # one pass, each block's sums its own (a Recorder returns the partials)
            run_part(part, part_sums.Recorder(xp, None, rows=True), True, False)

    monkeypatch.setattr(part_sums, "run_parts", own_partials)
    wrong, _ = _run(ROW_REPLAYABLE["dsa"], 50)
    assert max(float((a - b).abs().max()) for a, b in zip(whole, wrong)) > 1e-6


_MEMORY_CASES = {
    "dsa(adamw)": lambda: adaptlr.dsa(adaptlr.adamw(1e-3)),
    "dsa(adam, coupled decay)": lambda: adaptlr.dsa(adaptlr.adam(1e-3, weight_decay=0.01)),
    "dsa(radam)": lambda: adaptlr.dsa(adaptlr.radam(1e-3)),
    "dsa(adamw), element factors": lambda: adaptlr.dsa(adaptlr.adamw(1e-3),
                                                       structure=("tensor", "row", "col", "element")),
    "dsa(active(adam), coupled decay)": lambda: adaptlr.dsa(adaptlr.active(adaptlr.adam(1e-3, weight_decay=0.01),
                                                                           steps_per_epoch=2)),
    "eg per tensor (adam, coupled decay)": lambda: adaptlr.eg_step_size(
        adaptlr.adam(1e-3, weight_decay=0.01), 1e-3, 1e-3, scale="tensor"),
    "hd per tensor": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), 1e-8, granularity="tensor"),
    "hd per tensor (active(adamw))": lambda: adaptlr.hypergradient(
        adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=2), 1e-8, granularity="tensor"),
    "ldog, weight decay": lambda: adaptlr.dog(layerwise=True, weight_decay=0.01),
}


@pytest.mark.parametrize("largest_shape", [(1024, 288), (294912,)], ids=["2-D", "1-D"])
@pytest.mark.parametrize("name", list(_MEMORY_CASES))
def test_large_cpu_models_take_row_blocks_by_default_and_keep_temporaries_within_the_largest_tensor(
        name, largest_shape, monkeypatch):
    """``fast="auto"`` on a CPU model above 16 MiB (here: the limit lowered) runs the large tensors of
    an algorithm whose sums stay within tensors in row blocks of ``row_block_size`` elements, from
    the block temporaries its parts declare; the peak extra memory of a step (epoch boundaries
    included: ActiveLR's every 2 steps) stays within the largest tensor, where the whole-tensor
    list step (``fast=False``) holds several times it. Under coupled weight decay a first pass over
    a group of blocks holds each block's objective gradient (``g + λθ``) too; on a 1-D tensor DSA's
    row factor is an element factor."""
    from adaptlr.backends.bench import _torch_peak_mode

    monkeypatch.setattr(fast, "_CPU_FLAT_BYTES_LIMIT", 1 << 10)
    shapes = [largest_shape, (256, 144), (300,)]
    largest = 1024 * 288 * 4
    peaks = {}
    for setting in ("auto", False):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = Optimizer(params, _MEMORY_CASES[name](), fast=setting)
        peaks[setting] = 0.0
        for step in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            counter = _torch_peak_mode(torch)
            with counter:
                opt.step()
            if step:
                peaks[setting] = max(peaks[setting], counter.peak / largest)
        assert opt.fast_path == "list"
        if setting == "auto":
            coupled = "coupled" in name or "weight decay" in name
            budgets = opt._row_block_budgets(params)
            assert budgets == [fast.row_block_size(largest // 4, fast.row_block_live_temporaries(
                opt.opt, p.ndim, coupled)) for p in params]
            assert budgets[0] < largest // 4  # the largest tensor runs in row blocks
    assert peaks["auto"] <= 1.0, peaks
    assert peaks[False] >= 2.0, peaks


def test_row_blocks_are_as_large_as_the_declared_temporaries_allow():
    """The row-block size of ResNet-18's largest tensor (2,359,296 elements) from the declared
    counts: DSA(AdamW) 4 blocks alive, 576K-element blocks (256K before round 25, for every
    algorithm); under coupled decay 4 more; an element factor 13; a part that has not measured its
    count (``skip_nonfinite``), or another ``state_dtype``: the most, 9."""
    live = fast.row_block_live_temporaries
    largest = 512 * 512 * 3 * 3
    dsa = adaptlr.dsa(adaptlr.adamw())
    assert [live(dsa, 4, False), live(dsa, 4, True), live(dsa, 1, False)] == [4, 8, 13]
    assert fast.row_block_size(largest, live(dsa, 4, False)) == 589824
    assert fast.row_block_size(largest, live(dsa, 4, True)) == 294912
    assert live(adaptlr.hypergradient(adaptlr.active(adaptlr.radam(), 5), 1e-8, granularity="tensor"), 2, False) == 7
    assert live(adaptlr.skip_nonfinite(dsa), 4, False) == fast.CPU_BLOCK_LIVE_TEMPORARIES
    assert live(adaptlr.dsa(adaptlr.adamw(state_dtype="float64")), 4, False) == fast.CPU_BLOCK_LIVE_TEMPORARIES
    assert fast.row_block_size(1 << 30, 4) == fast.ROW_BLOCK_LARGE
    assert fast.row_block_size(1000, 4) == 1 << 14  # at least 16K


def test_list_part_elements_takes_none_or_a_positive_int():
    opt = Optimizer([torch.nn.Parameter(torch.zeros(4, 4))], adaptlr.dsa(adaptlr.adamw()))
    assert opt.list_part_elements is None
    opt.list_part_elements = 16
    assert opt.list_part_elements == 16
    for bad in (0, -3, 2.5, True, "16"):
        with pytest.raises(ValueError, match="list_part_elements must be None or an int >= 1"):
            opt.list_part_elements = bad


def test_a_row_block_step_makes_no_reference_cycle():
    from tests.conftest import cycles_made_by

    _, opt = _run(ROW_REPLAYABLE["dsa"], 50, steps=2)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    assert cycles_made_by(opt.step) == 0


def test_row_reducers_complete_sums_over_the_first_dimension_only():
    import numpy as np

    x = np.arange(12.0).reshape(3, 4)
    recorder = part_sums.Recorder(np, None, rows=True)
    assert recorder.leaf_sum(0, x, axis=1).tolist() == [6.0, 22.0, 38.0]  # within rows: the block's own
    assert recorder.leaf_sum(0, x, axis=0, keepdims=True).tolist() == [[12.0, 15.0, 18.0, 21.0]]
    assert recorder.leaf_sum(0, x) == 66.0 and recorder.total([x, x]) == 132.0
    assert len(recorder.partials) == 3  # the column sums, the total, the total of the list

    class NoSum:  # a replayed sum is not computed again
        def sum(self, *args, **kwargs):
            raise AssertionError("summed")

    replayer = part_sums.Replayer(NoSum(), ["columns", "tensor"], rows=True)
    assert replayer.leaf_sum(0, x, axis=(0,)) == "columns" and replayer.leaf_sum(0, x, axis=-2) == "tensor"
    replayer.check_all_used()
    with pytest.raises(AssertionError, match="summed"):
        replayer.leaf_sum(0, x, axis=1)
    with pytest.raises(RuntimeError, match="cannot run in parts"):
        part_sums.Recorder(np).leaf_sum(0, x, axis=1)  # parts of a flat buffer: no per-leaf sums


def test_a_row_blocks_second_pass_reads_its_first_pass_row_sums_and_makes_no_term():
    """Round 21: a sum within rows is the block's own and the same in both passes (the same
    operations on the same rows), so the second pass reads the first pass's; with every sum
    answered, it never makes the sums' terms (:class:`adaptlr._reduce.Term`)."""
    import numpy as np

    from adaptlr._reduce import Term

    x = np.arange(12.0).reshape(3, 4)
    made = []
    term = Term(lambda a: made.append(1) or a, (x,), 2)
    recorder = part_sums.Recorder(np, None, rows=True)
    rows = recorder.leaf_sum(0, term, axis=1)
    assert rows.tolist() == [6.0, 22.0, 38.0] and recorder.own == [rows]
    assert recorder.leaf_sum(0, term, axis=0).tolist() == [12.0, 15.0, 18.0, 21.0]
    assert made == [1] and len(recorder.partials) == 1  # one term for both sums; the column sums are partial

    def never(*inputs: object) -> None:
        raise AssertionError("the second pass made a term")

    replayer = part_sums.Replayer(np, ["columns"], rows=True, own=recorder.own)
    assert replayer.leaf_sum(0, Term(never, (), 2), axis=1) is rows
    assert replayer.leaf_sum(0, Term(never, (), 2), axis=0) == "columns"
    replayer.check_all_used()
    # a second pass that asks for fewer of its own sums than the first made is not the same step
    short = part_sums.Replayer(np, ["columns"], rows=True, own=recorder.own)
    short.leaf_sum(0, Term(never, (), 2), axis=0)
    with pytest.raises(RuntimeError, match="cannot run in parts"):
        short.check_all_used()
    # the reducer of an unsplit step makes the term
    from adaptlr._reduce import Reducer

    assert Reducer(np).leaf_sum(0, Term(lambda a: a, (x,), 2), axis=1).tolist() == [6.0, 22.0, 38.0]


@pytest.mark.parametrize("name", ["dsa", "ldog", "hd-tensor", "eg-tensor"])
def test_row_blocks_make_their_sums_terms_in_the_first_pass_only(name, monkeypatch):
    """Each row block makes its sums' terms once, in the first pass (counted), and the steps are bit
    for bit those of making every term in both passes and every row sum again (round 20's step)."""
    from adaptlr._reduce import Term

    made = []
    value = Term.value

    def counted(self):
        if self._make is not None:
            made.append(self.ndim)
        return value(self)

    monkeypatch.setattr(Term, "value", counted)
    blocked, _ = _run(ROW_REPLAYABLE[name], 50, steps=3)
    once = len(made)
    terms = {"dsa": 3, "ldog": 2, "hd-tensor": 1, "eg-tensor": 1}[name]
    # per step: each of the 10 row blocks in its first pass, each of the 3 whole tensors in its one pass
    assert once == 3 * terms * (10 + 3), once

    def eager(self, make, inputs, ndim, reads=1):  # round 20: every term made where the step names it ...
        self._make, self._inputs, self._value, self.ndim, self.reads = None, None, make(*inputs), ndim, reads
        self._reads_made = 0

    monkeypatch.setattr(Term, "__init__", eager)
    monkeypatch.setattr(part_sums.Recorder, "_own", lambda self, part: part())  # ... every row sum made again
    before, _ = _run(ROW_REPLAYABLE[name], 50, steps=3)
    for a, b in zip(blocked, before, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["dsa", "dsa(active)", "hd-tensor", "eg-tensor"])  # (LDoG: no per-row state)
def test_row_blocks_write_their_rows_of_the_state_in_place_bit_for_bit(name, monkeypatch):
    """A writing row block after the first donates its own rows of the state to its step
    (:func:`adaptlr._inplace.donating`; DSA's ``P_t`` goes into ``P_{t-1}``'s rows): the same
    numbers as copying the new state in, with fewer copies (counted)."""
    import contextlib
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    adapter = importlib.import_module("adaptlr.backends.torch")

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "copy_":
                Copies.count += 1
            return func(*args, **(kwargs or {}))

    def run():
        Copies.count = 0
        params, opt = _run(ROW_REPLAYABLE[name], 50, steps=4)
        with Copies():
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        return params, opt.state_dict(), Copies.count

    donated, donated_state, fewer = run()
    monkeypatch.setattr(adapter, "donating", lambda scalars, arrays: contextlib.nullcontext())
    copied, copied_state, more = run()
    for a, b in zip(donated, copied, strict=True):
        assert torch.equal(a, b), name
    for key, entry in copied_state["state"].items():
        for field, value in entry.items():
            for x, y in zip(_tensors(value), _tensors(donated_state["state"][key][field]), strict=True):
                assert torch.equal(x, y), (name, field)
    assert fewer < more, (name, fewer, more)


def test_row_blocks_update_the_tensor_and_column_factors_once_a_step():
    """DSA on one (20, 4, 3, 3) parameter in 10 row blocks: its tensor and column factors come from
    the whole tensor's sums, the same in every block, and are updated once in the second pass (one
    ``exp`` each); the row factor once per block (its rows' own sums): 12 ``exp`` (30 when every
    block updated every factor). In the first step the first block's first pass also runs to the
    step's end, to count the sums (3 more); from the second on it stops at its last sum, as the
    other blocks do (``part_sums.run_parts(sums_made=...)``), and the steps are those of whole
    tensors (:func:`test_row_blocks_make_the_step_of_whole_tensors`)."""
    from tests.conftest import aten_ops_by_name

    param = torch.nn.Parameter(torch.randn(20, 4, 3, 3))
    param.grad = torch.randn_like(param)
    opt = Optimizer([param], adaptlr.dsa(adaptlr.adamw(1e-3)), fast=False)
    opt.list_part_elements = 72
    assert aten_ops_by_name(opt.step).get("exp") == 3 + 2 + 10
    assert aten_ops_by_name(opt.step).get("exp") == 2 + 10
    assert aten_ops_by_name(opt.step).get("exp") == 2 + 10


def test_a_row_blocked_first_pass_runs_in_groups_of_blocks(monkeypatch):
    """The first pass over a tensor's row blocks (the sums, all before the direction: DSA) runs its
    first block alone, then the others :data:`adaptlr.backends.fast.FIRST_PASS_BLOCKS_PER_CALL` to a
    step, each block a leaf (``part_sums.RowGroupRecorder`` gives each its own sums): 10 blocks make
    1 + 3 first-pass steps and 10 second-pass steps (20 before), and the same step as whole tensors
    (:func:`test_row_blocks_make_the_step_of_whole_tensors`)."""
    calls = []
    original = adaptlr.Optimizer.update_leaves

    def counted(self, *args, **kwargs):
        calls.append(len(args[2]))  # the leaves of this call (its grads)
        return original(self, *args, **kwargs)

    param = torch.nn.Parameter(torch.randn(20, 4, 3, 3))
    param.grad = torch.randn_like(param)
    opt = Optimizer([param], adaptlr.dsa(adaptlr.adamw(1e-3)), fast=False)
    opt.list_part_elements = 72
    opt.step()
    monkeypatch.setattr(adaptlr.Optimizer, "update_leaves", counted)
    opt.step()
    assert fast.FIRST_PASS_BLOCKS_PER_CALL == 4
    assert sorted(calls) == sorted([1] + [4, 4, 1] + [1] * 10), (len(calls), calls)
