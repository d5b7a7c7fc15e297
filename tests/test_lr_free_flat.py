"""The learning-rate-free bases on flat buffers (issue 18): every sum is over the whole model, so the
step on one flat buffer is the step on the tensors (flat-safe) but not on blocks (not blockwise);
Prodigy with ``slice_p > 1`` (strided slices per tensor) and LDoG (per-tensor sums) are neither.
The torch adapter's default path (flat buffers on a small CPU model) equals the per-tensor path.
"""

from __future__ import annotations

import pytest

import adaptlr

torch = pytest.importorskip("torch")

from adaptlr.backends.fast import flat_safety  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402

FLAT = {
    "prodigy": lambda: adaptlr.prodigy(d0=1e-3, weight_decay=0.1, use_bias_correction=True),
    "dog": lambda: adaptlr.dog(init_eta=1e-3),
    "dowg": lambda: adaptlr.dowg(weight_decay=0.01),
    "dadapt_adam": lambda: adaptlr.dadapt_adam(d0=1e-3, weight_decay=0.1, decouple=True),
    "dadapt_sgd": lambda: adaptlr.dadapt_sgd(d0=1e-3, momentum=0.5, weight_decay=0.01),
}
NOT_FLAT = {"prodigy-slice-p-2": lambda: adaptlr.prodigy(slice_p=2), "ldog": lambda: adaptlr.dog(layerwise=True)}


@pytest.mark.parametrize("name", list(FLAT))
def test_flat_safe_not_blockwise(name):
    assert flat_safety(FLAT[name]())[:2] == (True, False)


@pytest.mark.parametrize("name", list(NOT_FLAT))
def test_per_tensor_variants_are_not_flat_safe(name):
    assert flat_safety(NOT_FLAT[name]())[:2] == (False, False)


def _run(make, fast):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in [(4, 3), (5,), ()]]
    opt = Optimizer(params, make(), fast=fast)
    for t in range(50):
        for p in params:
            p.grad = 0.5 * p.detach() + 0.1 * torch.sin(p.detach() + t)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params]), opt


@pytest.mark.parametrize("name", list(FLAT) + list(NOT_FLAT))
def test_default_adapter_path_equals_per_tensor_path(name):
    make = {**FLAT, **NOT_FLAT}[name]
    expected, _ = _run(make, False)
    got, opt = _run(make, "auto")
    assert opt.fast_path == ("flat" if name in FLAT else "list")
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-12
