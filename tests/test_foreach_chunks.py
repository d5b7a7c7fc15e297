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
from adaptlr.backends import foreach_chunks  # noqa: E402
from adaptlr.backends.bench import _torch_memory  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402

# (name, factory, runs in chunks: no sum over elements)
ALGORITHMS = [
    ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), True),
    ("sgd-nesterov", lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), True),
    ("active(adamw)", lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5), True),
    ("hd-element(sgd)", lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3, granularity="element"),
     True),
    ("schedule_free_adamw", lambda: adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=0.1), True),
    ("schedule_free(active(adamw))",
     lambda: adaptlr.schedule_free(adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2)), True),
    ("autodrop(sgdm)", lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2), False),
    ("mechanic(adamw)", lambda: adaptlr.mechanic(adaptlr.adamw(1e-2)), False),
    ("prodigy", lambda: adaptlr.prodigy(), False),
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


def _run(make, fast, chunk, steps=7):
    params = _params()
    opt = Optimizer([{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "weight_decay": 0.3}], make(),
                    fast=fast)
    opt.foreach_chunk_elements = chunk
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.5 * p.detach()
            p.grad = grad.T.contiguous().T if i == 4 else grad  # a transposed, non-contiguous gradient
        assert not (i == 4 and params[4].grad.is_contiguous())
        opt.step()
    return params, opt


@pytest.mark.parametrize("name,make,chunked", ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
@pytest.mark.parametrize("chunk", [1, 4, 9, 40])
def test_chunked_foreach_step_equals_the_list_path(name, make, chunked, chunk, monkeypatch):
    chunks_seen = []
    plan = foreach_chunks.plan
    monkeypatch.setattr(foreach_chunks, "plan", lambda *a: chunks_seen.append(plan(*a)) or chunks_seen[-1])
    expected, _ = _run(make, False, None)
    got, opt = _run(make, "foreach", chunk)
    assert opt.fast_path == "foreach"
    for p, q in zip(got, expected):
        assert torch.equal(p.detach(), q.detach())
    if chunked:
        assert chunks_seen and all(len(c) > 1 for c in chunks_seen)  # it ran in chunks
    else:
        assert not chunks_seen  # global sums: the whole lists in one update
    for p in got:
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # each keeps its own storage


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


@pytest.mark.parametrize("name,make,live", [("adamw", lambda: adaptlr.adamw(1e-3, weight_decay=0.01), 6),
                                            ("active(adamw)", lambda: adaptlr.active(adaptlr.adamw(1e-3),
                                                                                     steps_per_epoch=50), 8)])
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
