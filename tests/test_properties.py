"""The property harness: the generic checks every registered algorithm gets, on every backend.

The registry is the conformance suite's (:data:`adaptlr.conformance.algorithms.ALGORITHMS`): adding
an algorithm is one ``register_algorithm`` entry there plus its own exactness tests (its spec's test
vectors, hand-computed steps); everything below then runs for it. Modelled on optax's
``contrib/_common_test.py`` and torch's ``OptimizerInfo`` harness (``test/test_optim.py``).

Per algorithm × installed backend (the ``backend`` fixture of ``conftest.py``):

- ``init``/``update`` keep the params' tree structure, library, device, dtype (float32 and float64)
  and shapes in the updates, the new params and ``learning_rates``, and every state array is on the
  params' device; the state's tree structure, shapes and dtypes stay those of ``init`` over two
  epochs (three steps where the algorithm has no epochs);
- the update is pure: it writes into none of params, grads, state (read-only NumPy arrays on
  NumPy, a before/after comparison elsewhere), and its arithmetic written into its own temporaries
  (``adaptlr._inplace``) gives bitwise the numbers computed out of place;
- zero gradients leave the params unchanged (where the base has no weight decay), and so does
  ``learning_rate=0`` (where the registry entry says so: additive HD's rate grows from 0);
- a ``save_state``/``load_state`` round trip mid-epoch continues bit-identically;
- ``learning_rates`` is finite, structured like the params and broadcastable to each parameter,
  and ``lr_summary``'s learning rates are finite;
- a tree mixing float32 and float64 leaves, one of them empty, keeps each leaf's dtype;
- ``skip_nonfinite`` around it leaves params and state untouched on a NaN step.

Per algorithm: ``jax.jit`` of the step compiles once over two epochs and matches eager; the torch
adapter (list path and default fast path) and ``to_optax`` give the functional API's trajectory in
float64; ``repr`` and the errors of a wrong state name the algorithm.
"""

from __future__ import annotations

import copy
import re
from typing import Any, NamedTuple

import array_api_compat
import numpy as np
import optree
import pytest
from conftest import max_rel_err

import adaptlr
from adaptlr._tree import leaf_path_names
from adaptlr._validation import library_of
from adaptlr.conformance.algorithms import ALGORITHMS, Algorithm
from adaptlr.conformance.backends import BACKENDS, Backend

NAMES = list(ALGORITHMS)


class Pair(NamedTuple):
    weight: Any
    bias: Any


SHAPES = [(3, 4), (4,), (2,), ()]  # the leaves of _tree, in optree's order (a matrix, vectors, a 0-D)


def _tree(leaves: list) -> Any:
    """Params-like tree of dict, NamedTuple and list nodes with ``leaves`` (in the order of SHAPES)."""
    weight, bias, scale, offset = leaves
    return {"layer": Pair(weight, bias), "scales": [scale, offset]}


def _algorithm(name: str) -> Algorithm:
    algorithm = ALGORITHMS[name]
    missing = algorithm.missing()
    if missing:
        pytest.skip(f"{name}: adaptlr has no {', '.join(missing)}")
    return algorithm


def _epoch(opt: Any) -> int:
    """The longest epoch (steps) of the optimizer's adaptations; 1 where none counts epochs."""
    return max([getattr(a, "steps_per_epoch", 1) for a in opt.adaptations] + [1])


def _two_epochs(opt: Any) -> int:
    """Enough steps to cross two epoch boundaries (ActiveLR first changes γ at step 2S)."""
    return 2 * _epoch(opt) + 1


def _host_params(dtype: str = "float64") -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(size=s).astype(dtype) for s in SHAPES]


def _host_grads(params: list[np.ndarray], t: int) -> list[np.ndarray]:
    """Gradient of a noisy quadratic at ``params`` for step ``t``: deterministic, depends on the params."""
    out = []
    for i, p in enumerate(params):
        noise = np.random.default_rng(1000 * t + i).normal(size=p.shape)
        out.append(np.asarray(0.5 * p.astype(np.float64) + noise, dtype=p.dtype))
    return out


def _on(backend: Backend, host: list[np.ndarray]) -> Any:
    return _tree([backend.asarray(x, str(x.dtype)) for x in host])


def _to_host(backend: Backend, tree: Any) -> list[np.ndarray]:
    return [backend.to_numpy(x) for x in optree.tree_leaves(tree)]


def _grads(backend: Backend, params: Any, t: int) -> Any:
    return _on(backend, _host_grads(_to_host(backend, params), t))


def _run(opt: Any, backend: Backend, params: Any, state: Any, steps: range) -> tuple[Any, Any]:
    for t in steps:
        updates, state = opt.update(_grads(backend, params, t), state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


def _state_arrays(state: Any) -> list:
    return [x for x in optree.tree_leaves(state) if array_api_compat.is_array_api_obj(x)]


def _signature(state: Any) -> tuple:
    """The state's tree structure and each array's shape and dtype."""
    return optree.tree_structure(state), [(tuple(x.shape), str(x.dtype)) for x in _state_arrays(state)]


def _host_state(backend: Backend, state: Any) -> list[np.ndarray]:
    return [backend.to_numpy(x) for x in _state_arrays(state)]


def _assert_bitwise(actual: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: {a.dtype}{a.shape} != {e.dtype}{e.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(e).tobytes(), f"{what}[{i}] differs"


def _rates(backend: Backend, state: Any, params: Any) -> list[np.ndarray]:
    """``learning_rates(state)`` on the host, broadcast to each parameter's shape."""
    return [np.broadcast_to(backend.to_numpy(r), tuple(p.shape))
            for r, p in zip(optree.tree_leaves(adaptlr.learning_rates(state)), optree.tree_leaves(params))]


def _with_learning_rate(opt: adaptlr.Optimizer, learning_rate: float) -> adaptlr.Optimizer:
    """``opt`` with its base's learning rate replaced (the registry's factories fix theirs)."""
    base = copy.copy(opt.base)
    base.learning_rate = learning_rate
    return adaptlr.Optimizer(base, opt.adaptations, state_dtype=opt.state_dtype)


# -- per algorithm × backend -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_keeps_library_device_dtype_and_shape(name, backend, dtype):
    opt = _algorithm(name).build()
    params = _on(backend, _host_params(dtype))
    leaves = optree.tree_leaves(params)
    state = opt.init(params)
    for _ in range(2):
        for x in _state_arrays(state):  # (NumPy's 0-D results are scalars: see test_numpy_state_holds_arrays)
            assert library_of(x) == library_of(leaves[0])
            assert array_api_compat.device(x) == array_api_compat.device(leaves[0])
        updates, state = opt.update(_grads(backend, params, 1), state, params)
        new_params = adaptlr.apply_updates(params, updates)
        for tree in (updates, new_params):
            assert optree.tree_structure(tree) == optree.tree_structure(params)
            for x, p in zip(optree.tree_leaves(tree), leaves):
                assert type(x) is type(p) and x.dtype == p.dtype and x.shape == p.shape
                assert array_api_compat.device(x) == array_api_compat.device(p)
        for rate, p in zip(optree.tree_leaves(adaptlr.learning_rates(state)), leaves):
            assert rate.dtype == p.dtype  # the state dtype, which is the params' here
        params = new_params
        leaves = optree.tree_leaves(params)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_and_an_empty_parameter(name, backend):
    """float32 and float64 leaves in one tree, one of them with no elements (torch's harness has
    size-0 params too): each keeps its dtype; params and learning rates stay finite over two epochs."""
    opt = _algorithm(name).build()
    host = [np.ones((2, 3), np.float32), np.zeros((0, 3)), np.linspace(-1, 1, 4), np.asarray(0.5, np.float32)]
    params = _on(backend, host)
    state = opt.init(params)
    for t in range(1, _two_epochs(opt) + 1):
        updates, state = opt.update(_grads(backend, params, t), state, params)
        params = adaptlr.apply_updates(params, updates)
    dtypes = [x.dtype for x in host]
    assert [x.dtype for x in _to_host(backend, params)] == dtypes
    assert [x.dtype for x in _to_host(backend, adaptlr.learning_rates(state))] == dtypes
    assert all(np.all(np.isfinite(x)) for x in _to_host(backend, params) + _rates(backend, state, params))


def test_numpy_state_holds_arrays():
    """The state documents 0-D arrays: NumPy scalars (np.float64) are not ndarrays (no in-place
    writes, no ``setflags``). One case for the whole registry: this is a property of core."""
    backend = BACKENDS["numpy"]
    scalars = {}
    for name, algorithm in ALGORITHMS.items():
        if algorithm.missing():
            continue
        opt = algorithm.build()
        params = _on(backend, _host_params())
        params, state = _run(opt, backend, params, opt.init(params), range(1, 3))
        found = {type(x).__name__ for x in _state_arrays((state, adaptlr.learning_rates(state)))
                 if not isinstance(x, np.ndarray)}
        if found:
            scalars[name] = sorted(found)
    assert not scalars


@pytest.mark.parametrize("name", NAMES)
def test_state_structure_is_stable(name, backend):
    opt = _algorithm(name).build()
    params = _on(backend, _host_params())
    state = opt.init(params)
    expected = _signature(state)
    for t in range(1, _two_epochs(opt) + 1):
        params, state = _run(opt, backend, params, state, range(t, t + 1))
        assert _signature(state) == expected, f"step {t}"


@pytest.mark.parametrize("name", NAMES)
def test_update_is_pure(name, backend):
    """Nothing is written into params, grads or state: read-only arrays on NumPy, a comparison elsewhere."""
    opt = _algorithm(name).build()
    params = _on(backend, _host_params())
    state = opt.init(params)
    for t in range(1, _two_epochs(opt) + 1):
        grads = _grads(backend, params, t)
        inputs = (params, grads, state)
        if backend.library == "numpy":
            for x in optree.tree_leaves(inputs):
                if isinstance(x, np.ndarray):
                    x.setflags(write=False)
        before = [backend.to_numpy(x).copy() for x in _state_arrays(inputs)]
        updates, state = opt.update(grads, state, params)
        _assert_bitwise([backend.to_numpy(x) for x in _state_arrays(inputs)], before, f"inputs of step {t}")
        params = adaptlr.apply_updates(params, updates)


@pytest.mark.parametrize("name", NAMES)
def test_arithmetic_written_into_temporaries_changes_no_number(name, backend, monkeypatch):
    """``adaptlr._inplace`` writes into the step's own temporaries: two epochs in float32 give
    bitwise the params and state of the same steps computed out of place (every helper refused).
    torch's fused forms (``adaptlr.backends.torch_fused``), which round differently on purpose, are
    off in both runs: what is compared is the writing alone."""
    import adaptlr._inplace

    if backend.library == "torch":
        from adaptlr.backends import torch_fused

        monkeypatch.setattr(torch_fused, "add_scaled_", lambda *args: False)
        monkeypatch.setattr(torch_fused, "add_product_", lambda *args: False)
        monkeypatch.setattr(torch_fused, "lerp", lambda *args, **kwargs: None)
    opt = _algorithm(name).build()

    def trajectory() -> tuple[list, list]:
        params = _on(backend, _host_params("float32"))
        params, state = _run(opt, backend, params, opt.init(params), range(1, _two_epochs(opt) + 1))
        return _to_host(backend, params), _host_state(backend, state)

    in_place = trajectory()
    monkeypatch.setattr(adaptlr._inplace, "_fits", lambda a, b: False)
    out_of_place = trajectory()
    _assert_bitwise(in_place[0], out_of_place[0], "params")
    _assert_bitwise(in_place[1], out_of_place[1], "state")


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_leave_params_unchanged(name, backend):
    opt = _algorithm(name).build()
    if opt.base.weight_decay:
        pytest.skip(f"{name}: weight decay moves the params at a zero gradient")
    params = _on(backend, _host_params())
    zeros = _on(backend, [np.zeros(s) for s in SHAPES])
    state = opt.init(params)
    for t in range(1, _two_epochs(opt) + 1):
        updates, state = opt.update(zeros, state, params)
        assert all(np.all(u == 0) for u in _to_host(backend, updates)), f"step {t}"
    assert all(np.all(np.isfinite(x)) for x in _to_host(backend, adaptlr.learning_rates(state)))


@pytest.mark.parametrize("name", NAMES)
def test_zero_learning_rate(name, backend):
    """With α = 0 the params stay where they are, unless the registry says the algorithm moves them."""
    algorithm = _algorithm(name)
    opt = _with_learning_rate(algorithm.build(), 0.0)
    params = _on(backend, _host_params())
    start = _to_host(backend, params)
    params, _ = _run(opt, backend, params, opt.init(params), range(1, _two_epochs(opt) + 1))
    unchanged = all(np.array_equal(a, b) for a, b in zip(_to_host(backend, params), start))
    assert unchanged == algorithm.still_at_zero_lr


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_bit_identically(name, backend, tmp_path):
    opt = _algorithm(name).build()
    S = _epoch(opt)
    params = _on(backend, _host_params())
    params, state = _run(opt, backend, params, opt.init(params), range(1, S + 2))  # mid-epoch where S > 1
    adaptlr.save_state(tmp_path / "state.npz", state, optimizer=opt)
    loaded = adaptlr.load_state(tmp_path / "state.npz", like=params, optimizer=opt)
    _assert_bitwise(_host_state(backend, loaded), _host_state(backend, state), "loaded state")
    later = range(S + 2, 2 * S + 3)
    params_a, state_a = _run(opt, backend, params, state, later)
    params_b, state_b = _run(opt, backend, params, loaded, later)
    _assert_bitwise(_to_host(backend, params_b), _to_host(backend, params_a), "params")
    _assert_bitwise(_host_state(backend, state_b), _host_state(backend, state_a), "state")


@pytest.mark.parametrize("name", NAMES)
def test_learning_rates_and_summary(name, backend):
    opt = _algorithm(name).build()
    params = _on(backend, _host_params())
    state = opt.init(params)
    for steps in (range(0), range(1, _two_epochs(opt) + 1)):
        params, state = _run(opt, backend, params, state, steps)
        rates = adaptlr.learning_rates(state)
        assert optree.tree_structure(rates) == optree.tree_structure(params)
        for rate, p in zip(optree.tree_leaves(rates), optree.tree_leaves(params)):
            assert library_of(rate) == library_of(p) and array_api_compat.device(rate) == array_api_compat.device(p)
            assert np.broadcast_shapes(tuple(rate.shape), tuple(p.shape)) == tuple(p.shape)
            assert np.all(np.isfinite(backend.to_numpy(rate)))
        summary = adaptlr.lr_summary(state)
        assert set(summary["learning_rate"]) == set(leaf_path_names(params))
        for key, value in adaptlr.lr_summary(state, flat=True).items():
            assert isinstance(value, float), key
            # a signal may be undefined (AutoDrop's ω before its third epoch): NaN, never infinite
            assert np.isfinite(value) if key.startswith("learning_rate/") else not np.isinf(value), (key, value)


@pytest.mark.parametrize("name", NAMES)
def test_skip_nonfinite_leaves_everything_untouched(name, backend):
    opt = adaptlr.skip_nonfinite(_algorithm(name).build())
    params = _on(backend, _host_params())
    params, state = _run(opt, backend, params, opt.init(params), range(1, _epoch(opt) + 2))
    host = _host_grads(_to_host(backend, params), 99)
    host[0][1, 2] = np.nan
    updates, new_state = opt.update(_on(backend, host), state, params)
    assert all(np.all(u == 0) for u in _to_host(backend, updates))
    guard = [i for i, a in enumerate(opt.adaptations) if a.name == "skip_nonfinite"]
    keep = [a for i, a in enumerate(state.adaptations) if i not in guard]
    kept = [a for i, a in enumerate(new_state.adaptations) if i not in guard]
    _assert_bitwise(_host_state(backend, new_state._replace(adaptations=tuple(kept))),
                    _host_state(backend, state._replace(adaptations=tuple(keep))), "state")


# -- per algorithm -----------------------------------------------------------------------------


def _backend(name: str) -> Backend:
    backend = BACKENDS[name]
    reason = backend.unavailable_reason()
    if reason:
        pytest.skip(f"backend {name}: {reason}")
    return backend


@pytest.mark.parametrize("name", NAMES)
def test_jax_jit_compiles_once_and_matches_eager(name):
    backend = _backend("jax")
    import jax

    opt = _algorithm(name).build()
    step = jax.jit(opt.update)
    params = eager = _on(backend, _host_params())
    state = eager_state = opt.init(params)
    for t in range(1, _two_epochs(opt) + 1):
        updates, state = step(_grads(backend, params, t), state, params)
        params = adaptlr.apply_updates(params, updates)
    eager, eager_state = _run(opt, backend, eager, eager_state, range(1, _two_epochs(opt) + 1))
    assert step._cache_size() == 1
    assert max_rel_err(_to_host(backend, params), _to_host(backend, eager)) <= 1e-12
    assert _signature(state) == _signature(eager_state)


@pytest.mark.parametrize("fast", [False, "auto"], ids=["list", "default"])
@pytest.mark.parametrize("name", NAMES)
def test_torch_adapter_matches_functional(name, fast):
    backend = _backend("torch")
    import torch

    from adaptlr.backends.torch import Optimizer

    opt = _algorithm(name).build()
    host = _host_params()
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in host]
    adapter = Optimizer(params, opt, fast=fast)
    assert opt.name in repr(adapter)
    reference = [torch.from_numpy(x.copy()) for x in host]
    state = opt.init(reference)
    for t in range(1, _two_epochs(opt) + 1):
        for p, g in zip(params, _host_grads([p.detach().numpy() for p in params], t)):
            p.grad = torch.from_numpy(g)
        adapter.step()
        grads = [torch.from_numpy(g) for g in _host_grads([p.numpy() for p in reference], t)]
        updates, state = opt.update(grads, state, reference)
        reference = adaptlr.apply_updates(reference, updates)
    assert max_rel_err(_to_host(backend, params), _to_host(backend, reference)) <= 1e-12
    assert max_rel_err(_rates(backend, adapter.functional_state, params),
                       _rates(backend, state, reference)) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_to_optax_matches_functional(name):
    backend = _backend("jax")
    from adaptlr.backends.jax import to_optax

    opt = _algorithm(name).build()
    tx = to_optax(opt)
    params = reference = _on(backend, _host_params())
    state, reference_state = tx.init(params), opt.init(reference)
    with pytest.raises(ValueError, match=re.escape(opt.name)):
        tx.update(params, state)
    for t in range(1, _two_epochs(opt) + 1):
        updates, state = tx.update(_grads(backend, params, t), state, params)
        params = adaptlr.apply_updates(params, updates)
    reference, reference_state = _run(opt, backend, reference, reference_state, range(1, _two_epochs(opt) + 1))
    assert max_rel_err(_to_host(backend, params), _to_host(backend, reference)) <= 1e-12
    assert max_rel_err(_rates(backend, state, params), _rates(backend, reference_state, reference)) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_repr_and_errors_name_the_algorithm(name):
    opt = _algorithm(name).build()
    assert opt.name in repr(opt)
    assert all(a.name in opt.name for a in opt.adaptations)
    params = _tree(_host_params())
    classes = [type(x) for x in (opt.init(params).base, *opt.init(params).adaptations)]
    other = next(o for o in (adaptlr.sgd(0.1), adaptlr.adam(0.1)) if [type(o.init(params).base)] != classes)
    with pytest.raises(ValueError, match=re.escape(f"does not belong to {opt.name}")):
        opt.update(params, other.init(params), params)
    with pytest.raises(TypeError, match=re.escape(f"made by {opt.name}.init")):
        opt.update(params, {"not": "a state"}, params)
