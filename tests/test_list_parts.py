"""The torch adapter's list path, a few tensors at a time, for algorithms with no sum across tensors.

``adaptlr.backends.fast.tensorwise`` algorithms (the elementwise ones, DSA, HD ``"tensor"``, EG
``"tensor"``, LDoG) run the list step over parts of at most the largest tensor's elements, each
written before the next: the result must be the functional API's (one update over every tensor),
and the step's temporaries a part's. Algorithms that sum across tensors keep one update.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import adaptlr  # noqa: E402
from adaptlr.backends import torch as torch_adapter  # noqa: E402
from adaptlr.backends.bench import _torch_memory  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402
from tests.test_torch_adapter import _step_both  # noqa: E402

# (name, factory, updated in parts)
ALGORITHMS = [
    ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), True),
    ("active(adamw)", lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5), True),
    ("dsa(adam)", lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01), True),
    ("hd-tensor(sgd)", lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3, granularity="tensor"), True),
    ("eg-tensor(sgdm)", lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05, momentum=0.9), scale_lr=0.1, gain_lr=0.1,
                                                     scale="tensor"), True),
    ("ldog", lambda: adaptlr.dog(layerwise=True), True),
    ("hd-global(sgd)", lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3), False),
    ("eg-global(sgdm)", lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05, momentum=0.9), scale_lr=0.1, gain_lr=0.1),
     False),
    ("dog", lambda: adaptlr.dog(), False),
    ("prodigy", lambda: adaptlr.prodigy(), False),
    ("skip_nonfinite(dsa(adam))", lambda: adaptlr.skip_nonfinite(adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01)),
     False),
]
SHAPES = [(7, 5), (13,), (), (4, 3, 2, 2), (6, 4), (2, 3)]


@pytest.mark.parametrize("name,make,in_parts", ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
def test_list_step_in_parts_equals_the_functional_api(name, make, in_parts, monkeypatch):
    monkeypatch.setattr(torch_adapter, "LIST_PART_MIN_ELEMENTS", 1)  # parts of these small tensors
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    adapter = Optimizer(torch_params, make(), fast=False)
    parts_seen = []
    tensor_parts = adapter._tensor_parts
    monkeypatch.setattr(adapter, "_tensor_parts", lambda active: parts_seen.append(tensor_parts(active))
                        or parts_seen[-1])
    grads = [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(7)]
    functional, _ = _step_both(adapter, torch_params, make(), params, grads, coupling=0.5)
    assert adapter.fast_path == "list"
    worst = max(float(((p.detach() - q).abs() / q.abs().clamp_min(1e-300)).max()) for p, q in zip(torch_params,
                                                                                                  functional))
    assert worst <= 1e-12, worst
    if in_parts:
        assert parts_seen and all(parts is not None and len(parts) > 1 for parts in parts_seen)
    else:
        assert all(parts is None for parts in parts_seen)


# temporaries per part, in tensors (the state donated since round 24: 3.0 and 4.2 measured; 5.0 and
# 6.1 with every new state field made apart and copied back)
@pytest.mark.parametrize("name,live", [("adamw", 4), ("dsa(adam)", 5)])
def test_a_list_step_in_parts_holds_temporaries_of_a_part_not_of_the_model(name, live, monkeypatch):
    monkeypatch.setattr(torch_adapter, "LIST_PART_MIN_ELEMENTS", 1)
    make = next(m for n, m, _ in ALGORITHMS if n == name)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=g)) for _ in range(12)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    tensor_bytes = 64 * 64 * 4
    adapter = Optimizer(params, make(), fast=False)
    adapter.step()
    in_parts = _torch_memory(torch, adapter.step, "cpu")
    adapter._tensor_parts = lambda active: None  # one update over every tensor, as before
    whole = _torch_memory(torch, adapter.step, "cpu")
    assert in_parts <= live * tensor_bytes + 4096, in_parts / tensor_bytes  # (+ 0-D values)
    assert whole >= 1.5 * 12 * tensor_bytes, whole / tensor_bytes  # (24 tensors measured: 2 a parameter)


def test_small_tensors_share_a_part_of_at_least_the_minimum(monkeypatch):
    """Parts hold at least ``LIST_PART_MIN_ELEMENTS`` (each part is one ``update_leaves`` call with
    its fixed cost): 40 tensors of 2K elements are one update, 80 of 4K parts of the minimum; the
    same result as one part per tensor (float64, 3 steps)."""
    from adaptlr.backends.bench import count_aten_ops

    minimum = torch_adapter.LIST_PART_MIN_ELEMENTS
    assert minimum >= 1 << 16

    def adapter(shapes: list, part_minimum: int) -> tuple:
        monkeypatch.setattr(torch_adapter, "LIST_PART_MIN_ELEMENTS", part_minimum)
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt = Optimizer(params, adaptlr.dsa(adaptlr.adam(1e-2)), fast=False)
        parts = opt._tensor_parts(params)
        for _ in range(2):
            opt.step()
        return parts, count_aten_ops(opt.step), params

    parts, ops, params = adapter([(32, 64)] * 40, minimum)
    per_tensor_parts, per_tensor_ops, per_tensor_params = adapter([(32, 64)] * 40, 1)
    assert parts is None and len(per_tensor_parts) == 40
    assert ops < per_tensor_ops
    for p, q in zip(params, per_tensor_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    parts, _, _ = adapter([(64, 64)] * 80, minimum)  # 327,680 elements: parts of `per` tensors
    per = minimum // 4096
    assert [len(part) for part in parts] == [per] * (80 // per) + ([80 % per] if 80 % per else [])
