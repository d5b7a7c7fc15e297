"""The torch adapter's ``"foreach"`` step over chunks (``adaptlr.backends.foreach_chunks``).

Algorithms without sums over elements run over chunks of at most ``foreach_chunk_elements`` elements, parameters cut
into views of their own storage: the result must be the list path's, bit for bit (the same
elementwise operations on the same elements), and a step's temporaries must be bounded by the chunk
(six to eight chunk-sized lists), not by the model. Algorithms with sums over elements keep one chunk.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import adaptlr  # noqa: E402
from adaptlr.backends import foreach_chunks, part_sums  # noqa: E402
from adaptlr.backends.bench import _torch_memory  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402

# (name, factory, how the chunks run: "one pass" (no sum over elements), "two passes" (replayable
# sums), "whole lists")
ALGORITHMS = [
    ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), "one pass"),
    ("sgd-nesterov", lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), "one pass"),
    ("active(adamw)", lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5), "one pass"),
    ("hd-element(sgd)", lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3, granularity="element"),
     "one pass"),
    ("schedule_free_adamw", lambda: adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=0.1), "one pass"),
    ("schedule_free(active(adamw))",
     lambda: adaptlr.schedule_free(adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2)), "one pass"),
    ("autodrop(sgdm)", lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2, theta=30.0,
                                                theta_max=90.0, patience_epochs=1), "two passes"),
    ("hd-global(adam)", lambda: adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-3), "two passes"),
    ("hd-global-multiplicative(sgd)",
     lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-2, mode="multiplicative"), "two passes"),
    ("eg-global(sgdm)", lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05, momentum=0.9), scale_lr=0.1, gain_lr=0.1),
     "two passes"),
    ("prodigy", lambda: adaptlr.prodigy(weight_decay=0.1, use_bias_correction=True), "two passes"),
    ("dadapt_adam", lambda: adaptlr.dadapt_adam(weight_decay=0.1), "two passes"),
    ("dog", lambda: adaptlr.dog(weight_decay=0.1), "two passes"),
    ("dowg", lambda: adaptlr.dowg(), "two passes"),
    ("dadapt_sgd", lambda: adaptlr.dadapt_sgd(), "two passes"),
    ("dadapt_sgd(momentum, coupled decay)", lambda: adaptlr.dadapt_sgd(momentum=0.5, weight_decay=0.1), "two passes"),
    ("mechanic(adamw)", lambda: adaptlr.mechanic(adaptlr.adamw(1e-2)), "two passes"),
    ("mechanic(sgd, store_delta)", lambda: adaptlr.mechanic(adaptlr.sgd(0.05), s_decay=0.1, store_delta=True),
     "two passes"),
    ("skip_nonfinite(adamw)", lambda: adaptlr.skip_nonfinite(adaptlr.adamw(1e-2)), "whole lists"),
]


def _params() -> list:
    """Two groups; a matrix, a vector, a 0-D parameter, a channels_last conv weight (not contiguous:
    never cut) and a parameter whose gradient is a transposed view (not contiguous: never cut)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (13,), (), (4, 3, 2, 2), (6, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    params[3] = torch.nn.Parameter(params[3].detach().contiguous(memory_format=torch.channels_last))
    assert not params[3].is_contiguous()
    return params


def _run(make, fast, chunk, steps=7, second_lr=0.02):
    params = _params()
    second = {"params": params[2:], "weight_decay": 0.3} | ({"lr": second_lr} if second_lr is not None else {})
    opt = Optimizer([{"params": params[:2]}, second], make(), fast=fast)
    opt.foreach_chunk_elements = chunk
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()
            p.grad = grad.T.contiguous().T if i == 4 else grad  # a transposed, non-contiguous gradient
        assert not (i == 4 and params[4].grad.is_contiguous())
        opt.step()
    return params, opt


@pytest.mark.parametrize("name,make,mode", ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
@pytest.mark.parametrize("chunk", [1, 4, 9, 40])
def test_chunked_foreach_step_equals_the_list_path(name, make, mode, chunk, monkeypatch):
    plans = []
    plan = foreach_chunks.plan
    monkeypatch.setattr(foreach_chunks, "plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    replayed = []
    replayer = part_sums.Replayer
    monkeypatch.setattr(part_sums, "Replayer", lambda *a: replayed.append(1) or replayer(*a))
    # two passes need one lr in every group (the learning-rate-free bases weight their sums by the
    # largest α of the leaves): the second group keeps the default lr there
    second_lr = None if mode == "two passes" else 0.02
    expected, _ = _run(make, False, None, second_lr=second_lr)
    got, opt = _run(make, "foreach", chunk, second_lr=second_lr)
    assert opt.fast_path == "foreach"
    if mode == "one pass":  # the same operations on the same elements: bit for bit
        for p, q in zip(got, expected):
            assert torch.equal(p.detach(), q.detach())
    else:  # two passes add the sums chunk by chunk: the rounding of a float64 sum's association
        pairs = [(p.detach(), q.detach()) for p, q in zip(got, expected)]
        assert max(float(((p - q).abs() / q.abs().clamp_min(1e-300)).max()) for p, q in pairs) <= 1e-12
    if mode == "whole lists":
        assert not plans
    else:
        assert plans and all(len(c) > 1 for c in plans)  # it ran in chunks
        assert bool(replayed) == (mode == "two passes")
    for p in got:
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # each keeps its own storage


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam", "hd-global(adam)"])
def test_replayable_sums_take_the_whole_lists_when_groups_have_different_learning_rates(name, monkeypatch):
    make = next(m for n, m, _ in ALGORITHMS if n == name)
    plans = []
    plan = foreach_chunks.plan
    monkeypatch.setattr(foreach_chunks, "plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    expected, _ = _run(make, False, None)
    got, opt = _run(make, "foreach", 9)
    assert opt.fast_path == "foreach" and not plans
    assert max(float(((p - q).abs() / q.abs().clamp_min(1e-300)).max()) for p, q in zip(got, expected)) <= 1e-12


def test_plan_covers_every_element_once_in_chunks_of_the_budget():
    numels = [10, 3, 1, 25, 7, 40]
    kinds = [[0, 1, 2], [3, 4, 5]]
    splittable = [True, True, True, True, True, False]
    chunks = foreach_chunks.plan(kinds, numels, splittable, budget=8)
    covered = {i: [] for i in range(len(numels))}
    for chunk in chunks:
        size = 0
        for k, pieces in chunk:
            for i, where in pieces:
                assert i in kinds[k]
                elements = range(numels[i]) if where is None else range(numels[i])[where]
                covered[i].extend(elements)
                size += len(elements)
        assert size <= 8 or (len(chunk) == 1 and chunk[0][1] == [(5, None)])  # 40 elements, not splittable
        assert [k for k, _ in chunk] == sorted({k for k, _ in chunk})  # one segment per list, in order
    assert all(covered[i] == list(range(numels[i])) for i in covered)
    assert foreach_chunks.plan(kinds, numels, splittable, budget=1000) == [
        [(0, [(0, None), (1, None), (2, None)]), (1, [(3, None), (4, None), (5, None)])]]
    with pytest.raises(ValueError, match="at least 1 element"):
        foreach_chunks.plan(kinds, numels, splittable, budget=0)


def test_default_budget_bounds_temporaries_by_the_largest_tensor_and_the_chunks_by_64():
    mib = 1 << 20
    assert foreach_chunks.default_budget([100, 200]) == foreach_chunks.MIN_CHUNK  # small model: one chunk
    llama7b = [131 * mib] * 2 + [16 * mib] * 400  # embeddings and 400 matrices
    budget = foreach_chunks.default_budget(llama7b)
    assert budget == -(-sum(llama7b) // 64)
    huge = [1024 * mib] + [64 * mib] * 10
    assert foreach_chunks.default_budget(huge) == 128 * mib  # the largest tensor's eighth


@pytest.mark.parametrize("name,make,live", [
    ("adamw", lambda: adaptlr.adamw(1e-3, weight_decay=0.01), 6),
    ("active(adamw)", lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=50), 8),
    ("prodigy (two passes)", lambda: adaptlr.prodigy(), 7),
    ("eg(adamw) (two passes)", lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), scale_lr=0.1, gain_lr=0.1), 12),
])
def test_a_chunked_step_holds_temporaries_of_a_chunk_not_of_the_model(name, make, live):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(256, 128), (300,), (64, 64, 3), (500,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    model_bytes = sum(p.numel() for p in params) * 4
    opt = Optimizer(params, make(), fast="foreach")
    opt.foreach_chunk_elements = 2000
    opt.step()
    opt.step()
    chunked = _torch_memory(torch, opt.step, "cpu")
    assert chunked <= live * 2000 * 4 + 4096, chunked  # `live` chunk-sized lists (+ 0-D values)
    opt.foreach_chunk_elements = 10**9
    whole = _torch_memory(torch, opt.step, "cpu")
    assert whole >= 3 * model_bytes, whole  # the same step over the whole lists: several model-sized lists
    assert opt.fast_path == "foreach"


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "1000"])
def test_a_chunk_size_that_is_not_a_positive_int_is_refused(bad):
    opt = Optimizer([torch.nn.Parameter(torch.zeros(3))], adaptlr.adamw(1e-3), fast="foreach")
    with pytest.raises(ValueError, match="foreach_chunk_elements must be None or an int >= 1"):
        opt.foreach_chunk_elements = bad
    opt.foreach_chunk_elements = 7
    assert opt.foreach_chunk_elements == 7


class _Reshapes(adaptlr.core.Adaptation):
    """Declares itself blockwise, then reshapes a gradient: an operation a ForeachArray does not have."""

    name = "reshapes"
    state_class = tuple
    flat_safe = blockwise = True

    def init(self, params, alpha, layout, xp):
        return ()

    def step(self, ctx, size, state):
        for g in ctx.grads:
            ctx.xp.reshape(g, (-1,))
        return size, state


@pytest.mark.parametrize("chunk", [None, 4])
def test_an_operation_with_no_list_form_sends_the_step_to_the_list_path_before_anything_is_written(chunk):
    def make():
        return adaptlr.adamw(1e-2, weight_decay=0.1).wrapped(_Reshapes())

    expected, _ = _run(make, False, None)
    got, opt = _run(make, "foreach", chunk)
    assert opt.fast_path == "list"
    for p, q in zip(got, expected):
        assert torch.equal(p.detach(), q.detach())
