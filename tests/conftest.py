"""Shared fixtures: one ``backend`` fixture parametrised over every array backend.

``ADAPTLR_BACKENDS=numpy,torch pytest`` narrows the set; a backend that is not installed (or has no
device here, such as CuPy without a GPU) is skipped with the reason.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from adaptlr.conformance.backends import BACKENDS, Backend

if BACKENDS["jax"].available:  # float64 tests need JAX's 64-bit mode, set before any JAX array exists
    from adaptlr.conformance.backends import enable_jax_x64

    enable_jax_x64()


def _selected() -> list[str]:
    chosen = os.environ.get("ADAPTLR_BACKENDS")
    if not chosen:
        return list(BACKENDS)
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(f"ADAPTLR_BACKENDS names unknown backends {unknown}; valid: {list(BACKENDS)}")
    return names


@pytest.fixture(params=_selected())
def backend(request: pytest.FixtureRequest) -> Backend:
    """An available array backend (skipped, with the reason, where it is not)."""
    b = BACKENDS[request.param]
    reason = b.unavailable_reason()
    if reason:
        pytest.skip(f"backend {b.name}: {reason}")
    return b


@pytest.fixture
def xp(backend: Backend):
    """The array namespace of ``backend``."""
    return backend.xp


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


def random_problem(library: str, shapes: list, steps: int, seed: int) -> tuple[list, list]:
    """Float64 parameters of ``shapes`` and ``steps`` lists of gradient noise (NumPy or torch arrays)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in shapes]
    noise = [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]
    if library == "torch":
        torch = pytest.importorskip("torch")
        params = [torch.asarray(p) for p in params]
        noise = [[torch.asarray(n) for n in ns] for ns in noise]
    return params, noise


def max_rel_err(actual, expected, floor: float = 1e-300) -> float:
    """Normwise relative error ``max|a - e| / max|e|`` per tensor, maximised over a list of tensors.

    Normwise (not elementwise) so that an element passing close to zero does not turn rounding
    noise of the size ``eps·max|e|`` into a large relative error.
    """
    if isinstance(actual, (list, tuple)):
        return max((max_rel_err(a, e, floor) for a, e in zip(actual, expected)), default=0.0)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {a.shape} != {e.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), floor))


def aten_ops_by_name(step, numel: int | None = None) -> dict:
    """``{aten op name: count}`` of the torch ops ``step()`` dispatches (that read or write a tensor
    of ``numel`` elements: a broadcast product of two smaller factors writes one; None: all of them)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            touched = (*args, *(out if isinstance(out, (tuple, list)) else (out,)))
            if numel is None or any(isinstance(a, torch.Tensor) and a.numel() == numel for a in touched):
                name = func.overloadpacket.__name__
                counts[name] = counts.get(name, 0) + 1
            return out

    with Counter():
        step()
    return counts


def cycles_made_by(fn) -> int:
    """The objects ``fn()`` left in reference cycles (the collector disabled while it runs). Whatever
    ``fn`` creates is in the youngest generation, so collecting that one finds its cycles (and costs
    far less than a full collection of a process that imported torch)."""
    gc.collect(0)
    gc.disable()
    try:
        fn()
        return gc.collect(0)
    finally:
        gc.enable()


def blocks_on_a_large_cpu_model(opt) -> bool:
    """Whether ``opt`` runs on blocks on a large CPU model by default (flat-safe, and blockwise or with
    sums that two passes over blocks can make: ``adaptlr.backends.fast.recommended_options``)."""
    from adaptlr.backends.fast import base_sums_replayable, flat_safety, sums_cheaply

    flat, blockwise, _ = flat_safety(opt)
    return flat and (blockwise or sums_cheaply(opt) or base_sums_replayable(opt))
