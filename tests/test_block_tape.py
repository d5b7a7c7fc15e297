"""The blocked torch step's replays (``adaptlr.backends.block_tape``): the first writing block of a
buffer and pass records its aten operations, the next blocks replay them.

The replayed blocks must compute bit for bit what running the step on them computes, for every
algorithm that takes blocks on a large CPU model (ordinary steps, epoch boundaries, two-pass steps);
the replays must actually happen; and a step whose operations cannot be replayed (a host read of
the block's values, an array made with the block's length, a write into an array the blocks share)
must be refused or kept to its blocks' length, not replayed wrongly.
"""

from __future__ import annotations

from typing import Any

import optree
import pytest

import adaptlr

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adaptlr.backends import block_tape, fast  # noqa: E402
from adaptlr.backends.fast import FlatOptimizer, base_sums_replayable  # noqa: E402
from tests.conftest import blocks_on_a_large_cpu_model  # noqa: E402

# Parameters that make blocks of several lengths: a parameter of its own blocks (5,000 elements in
# 5 blocks of 1,000), one staged in the flat buffers (300), one in 7 blocks of 1,000.
SHAPES = ((5000,), (300,), (2, 3500))
BLOCK = 1024


def _registry() -> dict:
    from adaptlr.conformance.algorithms import ALGORITHMS

    return {name: entry for name, entry in ALGORITHMS.items()
            if not entry.missing() and blocks_on_a_large_cpu_model(entry.build())}


def _counting_replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    replays = [0]
    replay = block_tape.Tape.replay

    def counted(self: block_tape.Tape, inputs: list) -> list:
        replays[0] += 1
        return replay(self, inputs)

    monkeypatch.setattr(block_tape.Tape, "replay", counted)
    return replays


def _run(make: Any, replay: bool, monkeypatch: pytest.MonkeyPatch, steps: int) -> list:
    monkeypatch.setattr(fast, "REPLAY_BLOCKS", replay)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    fo = FlatOptimizer(make(), params, block_size=BLOCK)
    assert fo.mode == "blocked"
    for _ in range(steps):
        fo.step_on(params, [torch.randn(s, generator=gen) * 0.1 for s in SHAPES])
    return [p.clone() for p in params] + [x.clone() for x in optree.tree_leaves(fo.state)]


def test_every_blocked_algorithm_replays_its_blocks_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptlr.conformance.algorithms import S

    replays = _counting_replays(monkeypatch)
    registry = _registry()
    assert len(registry) >= 20, sorted(registry)
    steps = 2 * S + 2  # epoch boundaries included
    for name, entry in registry.items():
        replays[0] = 0
        expected = _run(entry.build, False, monkeypatch, steps)
        assert replays[0] == 0, name
        got = _run(entry.build, True, monkeypatch, steps)
        # 12 writing blocks a step after the first part; the first writing block of each buffer
        # records: at least 10 replays a step, on every step; as many again in the first pass of the
        # bases whose every step sums (the learning-rate-free ones: their partial sums replayed)
        passes = 2 if base_sums_replayable(entry.build()) else 1
        assert replays[0] >= 10 * passes * steps, (name, replays[0])
        for k, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert torch.equal(a, b), f"{name}: leaf {k} differs by {float((a - b).abs().max())}"


def test_the_adapter_replays_bit_for_bit_and_the_wrappers_two_passes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptlr.backends.torch import Optimizer as TorchOptimizer

    replays = _counting_replays(monkeypatch)
    makers = {
        "adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
        "hd(adamw)": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3),
        "eg(adamw)": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), scale_lr=0.1, gain_lr=0.1),
        "autodrop(adamw)": lambda: adaptlr.autodrop(adaptlr.adamw(1e-2), steps_per_epoch=3),
        "prodigy": lambda: adaptlr.prodigy(weight_decay=0.1),
    }
    for name, make in makers.items():
        results = []
        for replay in (False, True):
            monkeypatch.setattr(fast, "REPLAY_BLOCKS", replay)
            replays[0] = 0
            gen = torch.Generator().manual_seed(1)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
            opt = TorchOptimizer(params, make(), fast={"block_size": BLOCK})
            for _ in range(7):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            assert opt.fast_path == "blocked", name
            assert (replays[0] > 0) == replay, (name, replays[0])
            results.append([p.detach().clone() for p in params])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b), name


# -- the tape itself -------------------------------------------------------------------------------


def _record(step: Any, inputs: list) -> block_tape.Tape:
    recording = block_tape.recording(block_tape.Tape(len(inputs), inputs[0].numel()), inputs)
    with torch.no_grad(), recording:
        results = step(*inputs)
    tape = recording.finish(results or [])
    return tape if tape is not None else recording.tape


def test_a_tape_replays_the_operations_on_other_arrays_and_reads_the_steps_scalars_once() -> None:
    scale = torch.tensor(0.5)
    made_from_scalars = []

    def step(p: Any, g: Any, m: Any) -> None:
        c = scale * 3.0  # the step's scalar: computed once, read by the replays
        made_from_scalars.append(c)
        m.lerp_(g, 0.1)
        u = torch.exp(torch.clamp(m * c, -10.0, 10.0))
        p.sub_(u * g)

    gen = torch.Generator().manual_seed(0)
    first = [torch.randn(64, generator=gen) for _ in range(3)]
    tape = _record(step, first)
    assert tape.replayable and not tape.sized
    for length in (64, 50):  # any length: no operation named it
        inputs = [torch.randn(length, generator=gen) for _ in range(3)]
        expected = [x.clone() for x in inputs]
        step(*expected)
        assert tape.fits(inputs)
        tape.replay(inputs)
        for a, b in zip(expected, inputs, strict=True):
            assert torch.equal(a, b)
    # the scalar's operation ran in the recorded step and in the two direct ones, not in the replays
    assert len(made_from_scalars) == 3
    scale.fill_(2.0)  # a replay reads the recorded c = 1.5 (a tape is its step's)
    inputs = [torch.ones(64), torch.ones(64), torch.ones(64)]
    tape.replay(inputs)
    assert torch.equal(inputs[0], torch.ones(64) - torch.exp(torch.ones(64) * torch.tensor(1.5)))


def test_a_tape_returns_the_results_the_step_handed_over_a_first_pass_s_partial_sums() -> None:
    def first_pass(p: Any, g: Any) -> list:
        return [torch.sum(p * g, dtype=torch.float64), torch.sum(g * g, dtype=torch.float64)]

    gen = torch.Generator().manual_seed(3)
    tape = _record(first_pass, [torch.randn(32, generator=gen), torch.randn(32, generator=gen)])
    inputs = [torch.randn(40, generator=gen), torch.randn(40, generator=gen)]
    got = tape.replay(inputs)
    expected = first_pass(*inputs)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # a result not made from the block's arrays cannot be replayed
    recording = block_tape.recording(block_tape.Tape(1, 8), [torch.ones(8)])
    with recording:
        constant = torch.zeros((), dtype=torch.float64) + 1.0
    assert recording.finish([constant]) is None


def test_a_host_read_of_the_blocks_values_refuses_the_tape() -> None:
    def step(p: Any, g: Any) -> None:
        if float(g.abs().max()) > 1.0:  # a Python branch on the block's values
            p.sub_(g)

    tape = _record(step, [torch.zeros(8), torch.ones(8)])
    assert not tape.replayable
    assert not tape.fits([torch.zeros(8), torch.ones(8)])


def test_an_array_made_with_the_blocks_length_keeps_the_tape_to_that_length() -> None:
    def step(p: Any, g: Any) -> None:
        p.add_(g * torch.arange(p.shape[0], dtype=p.dtype))

    tape = _record(step, [torch.zeros(8), torch.ones(8)])
    assert tape.replayable and tape.sized
    assert tape.fits([torch.zeros(8), torch.ones(8)])
    assert not tape.fits([torch.zeros(9), torch.ones(9)])
    p = torch.zeros(8)
    tape.replay([p, torch.full((8,), 2.0)])
    assert torch.equal(p, 2.0 * torch.arange(8, dtype=torch.float32))


def test_a_write_from_the_block_into_a_shared_array_refuses_the_tape() -> None:
    shared = torch.zeros(())

    def step(p: Any, g: Any) -> None:
        shared.add_(g.sum())  # what the recorded block left there would be a replay's start
        p.sub_(g)

    tape = _record(step, [torch.zeros(8), torch.ones(8)])
    assert not tape.replayable


def test_a_replay_frees_each_result_after_its_last_read() -> None:
    import weakref

    def step(p: Any, g: Any) -> None:
        a = g * 2.0  # alive until the step returns
        b = torch.exp(a)
        p.add_(b)

    tape = _record(step, [torch.zeros(8), torch.ones(8)])
    product: list = []
    alive_at_add: list = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if func is torch.ops.aten.add_.Tensor:
                alive_at_add.append(product[0]() is not None)
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mul.Tensor:
                product.append(weakref.ref(out))
            return out

    p = torch.zeros(8)
    with Watch():
        tape.replay([p, torch.ones(8)])
    assert alive_at_add == [False]  # g·2 was freed once exp had read it
    assert torch.equal(p, torch.exp(torch.full((8,), 2.0)))


def test_a_write_into_what_the_recorded_step_made_from_its_scalars_refuses_the_tape() -> None:
    scale = torch.tensor(0.5)

    def step(p: Any, g: Any) -> None:
        c = scale * 3.0  # made by this block's step from the step's scalars: not replayed
        c.mul_(scale)  # each block's step scales its own c; a replay would scale the recorded one again
        p.sub_(g * c)

    tape = _record(step, [torch.zeros(8), torch.ones(8)])
    assert not tape.replayable


def test_a_write_into_an_array_the_step_was_given_is_replayed_as_each_block_would_make_it() -> None:
    calls = torch.zeros((), dtype=torch.int64)

    def step(p: Any, g: Any) -> None:
        calls.add_(1)  # the step's own counter, given to it: every block's step adds one
        p.add_(g)

    tape = _record(step, [torch.zeros(8), torch.ones(8)])
    assert tape.replayable
    for _ in range(3):
        tape.replay([torch.zeros(8), torch.ones(8)])
    assert int(calls) == 4


def test_the_first_pass_groups_of_hd_and_eg_replay_the_first_groups_tape(monkeypatch: pytest.MonkeyPatch) -> None:
    """HD and EG global run their first pass over groups of ``FIRST_PASS_BLOCKS_PER_CALL`` blocks per
    call: the groups after the first replay its tape, except a shorter last group; the writing pass
    replays every block after its first two. 20 blocks: 18 + (5 groups - the recorded one - the
    short last one) = 21 replays a step, and the steps of running every group."""
    from adaptlr.backends.fast import FIRST_PASS_BLOCKS_PER_CALL

    assert FIRST_PASS_BLOCKS_PER_CALL == 4
    replays = _counting_replays(monkeypatch)
    makers = {"hd": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3),
              "eg": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), scale_lr=0.1, gain_lr=0.1)}
    for name, make in makers.items():
        runs = []
        for replay in (False, True):
            monkeypatch.setattr(fast, "REPLAY_BLOCKS", replay)
            gen = torch.Generator().manual_seed(2)
            params = [torch.randn(20 * BLOCK, generator=gen)]
            fo = FlatOptimizer(make(), params, block_size=BLOCK)
            for _ in range(4):
                replays[0] = 0
                fo.step_on(params, [torch.randn(20 * BLOCK, generator=gen)])
                assert replays[0] == (21 if replay else 0), (name, replays[0])
            runs.append(params[0].clone())
        assert torch.equal(*runs), name
