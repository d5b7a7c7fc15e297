"""Non-finite gradients: ``skip_nonfinite`` leaves params and the whole state bit-identical on every
backend (eagerly, under ``jax.jit``, in the torch adapter), counts the skips, honours
``max_consecutive``; ActiveLR never grows γ from a non-finite epoch sum; the default propagates."""

from __future__ import annotations

import warnings

import numpy as np
import optree
import pytest

import adaptlr
from adaptlr._state_tree import to_numpy
from adaptlr.conformance.backends import BACKENDS
from adaptlr.nonfinite import SkipState, step_was_skipped

S = 2


def _optimizers() -> list:
    return [
        ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1)),
        ("active(adamw)", lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=S, increase=0.5)),
        ("autodrop(sgdm)", lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=S,
                                                    theta=30.0, theta_max=90.0, patience_epochs=1)),
        ("hypergradient(sgd)", lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3)),
        ("eg(sgd)", lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05), scale_lr=0.1, gain_lr=0.1)),
        ("dsa(adam)", lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01)),
    ]


NAMES = [n for n, _ in _optimizers()]
MAKERS = dict(_optimizers())


def _problem(seed: int = 0, steps: int = 7) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal((4, 3)), rng.standard_normal(3), np.asarray(rng.standard_normal())]
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]
    return params, grads


def _host(tree) -> list[np.ndarray]:
    return [to_numpy(x) for x in optree.tree_leaves(tree)]


def _assert_identical(a, b) -> None:
    """Same leaves, dtypes and values, bit for bit (NaN where NaN)."""
    ha, hb = _host(a), _host(b)
    assert len(ha) == len(hb)
    for x, y in zip(ha, hb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=True), (x, y)


def _poison(grads: list, value: float) -> list:
    bad = [g.copy() for g in grads]
    bad[0][1, 2] = value
    return bad


def _without_skip_state(state):
    return state._replace(adaptations=tuple(a for a in state.adaptations if not isinstance(a, SkipState)))


def _run(backend, opt, params, grads, update=None):
    update = update or opt.update
    params = [backend.asarray(p) for p in params]
    state = opt.init(params)
    for g in grads:
        updates, state = update([backend.asarray(x) for x in g], state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", NAMES)
def test_skipped_step_changes_nothing_and_the_run_continues_as_without_it(backend, name, bad):
    make = MAKERS[name]
    params, grads = _problem()
    # Reference: the plain optimizer on the finite gradients only.
    ref_params, ref_state = _run(backend, make(), params, grads)
    # Guarded: a non-finite gradient inserted after step 3 (an epoch boundary for S = 2 is step 4).
    opt = adaptlr.skip_nonfinite(make())
    xp_params = [backend.asarray(p) for p in params]
    state = opt.init(xp_params)
    for i, g in enumerate(grads):
        if i == 3:
            before = state
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # NumPy warns about the NaN arithmetic
                updates, state = opt.update([backend.asarray(x) for x in _poison(g, bad)], state, xp_params)
            assert all(np.array_equal(u, np.zeros_like(u)) for u in _host(updates))
            _assert_identical(_without_skip_state(state), _without_skip_state(before))
            assert int(to_numpy(state.adaptations[-1].skipped)) == 1
            assert int(to_numpy(state.adaptations[-1].consecutive)) == 1
        updates, state = opt.update([backend.asarray(x) for x in g], state, xp_params)
        xp_params = adaptlr.apply_updates(xp_params, updates)
    _assert_identical(xp_params, ref_params)
    _assert_identical(_without_skip_state(state), ref_state)
    assert int(to_numpy(state.adaptations[-1].skipped)) == 1
    assert int(to_numpy(state.adaptations[-1].consecutive)) == 0
    summary = adaptlr.lr_summary(state)
    assert summary["skipped_steps"] == 1.0 and summary["consecutive_skips"] == 0.0


def test_non_finite_update_from_finite_gradients_is_skipped(backend):
    opt = adaptlr.skip_nonfinite(adaptlr.sgd(1e300))
    params = [backend.asarray(np.ones(3))]
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        updates, new_state = opt.update([backend.asarray(np.array([1e300, 1.0, 1.0]))], state, params)
    assert np.array_equal(to_numpy(updates[0]), np.zeros(3))
    assert int(to_numpy(new_state.count)) == 0
    assert int(to_numpy(new_state.adaptations[-1].skipped)) == 1


def test_default_propagates_like_torch_optim():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    ref = torch.optim.AdamW([w], lr=1e-2)
    opt = adaptlr.adamw(1e-2)
    params = [np.ones(3)]
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for g in ([1.0, np.nan, 2.0], [1.0, 1.0, 1.0]):
            w.grad = torch.tensor(g, dtype=torch.float64)
            ref.step()
            updates, state = opt.update([np.array(g)], state, params)
            params = adaptlr.apply_updates(params, updates)
    np.testing.assert_allclose(params[0], w.detach().numpy(), rtol=1e-14)  # NaN in the same place
    assert np.isnan(params[0][1]) and np.isfinite(params[0][[0, 2]]).all()


@pytest.mark.parametrize("name", ["hypergradient(sgd)", "eg(sgd)"])
def test_default_global_rates_spread_one_nan_to_every_parameter(name):
    opt = MAKERS[name]()
    params, grads = _problem(5, steps=3)
    grads[1] = _poison(grads[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        params, _ = _run(BACKENDS["numpy"], opt, params, grads)
    assert all(np.isnan(p).all() for p in params)


def test_max_consecutive_raises_on_the_next_skip_in_eager_mode(backend):
    opt = adaptlr.skip_nonfinite(adaptlr.adamw(1e-2), max_consecutive=2)
    params = [backend.asarray(np.ones(3))]
    nan = [backend.asarray(np.array([1.0, np.nan, 1.0]))]
    good = [backend.asarray(np.ones(3))]
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, state = opt.update(nan, state, params)
        _, state = opt.update(nan, state, params)
        with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*\(max_consecutive=2\)"):
            opt.update(nan, state, params)
        assert int(to_numpy(state.adaptations[-1].consecutive)) == 2
        _, state = opt.update(good, state, params)  # a finite step resets the run
        assert int(to_numpy(state.adaptations[-1].consecutive)) == 0
        _, state = opt.update(nan, state, params)
    assert int(to_numpy(state.adaptations[-1].skipped)) == 3
    assert int(to_numpy(state.count)) == 1


def test_max_consecutive_zero_raises_on_the_first_non_finite_step():
    opt = adaptlr.skip_nonfinite(adaptlr.sgd(0.1), max_consecutive=0)
    params = [np.ones(2)]
    state = opt.init(params)
    with pytest.raises(FloatingPointError, match="1 consecutive steps"):
        opt.update([np.array([np.inf, 0.0])], state, params)


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager_including_the_skip(name):
    jax = pytest.importorskip("jax")
    make = MAKERS[name]
    params, grads = _problem(1)
    grads[2] = _poison(grads[2], np.nan)
    opt = adaptlr.skip_nonfinite(make())
    backend = BACKENDS["jax"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eager_params, eager_state = _run(backend, opt, params, grads)
    jit_params, jit_state = _run(backend, opt, params, grads, update=jax.jit(opt.update))
    for a, b in zip(_host(jit_params) + _host(jit_state), _host(eager_params) + _host(eager_state)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    assert int(jit_state.adaptations[-1].skipped) == 1
    assert int(jit_state.count) == len(grads) - 1


def test_jit_lets_the_step_through_past_max_consecutive():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    opt = adaptlr.skip_nonfinite(adaptlr.sgd(0.1), max_consecutive=1)
    update = jax.jit(opt.update)
    params = [jnp.ones(2)]
    state = opt.init(params)
    nan = [jnp.asarray([1.0, jnp.nan])]
    updates, state = update(nan, state, params)
    assert np.array_equal(np.asarray(updates[0]), [0.0, 0.0]) and int(state.count) == 0
    updates, state = update(nan, state, params)  # the 2nd consecutive: let through under jit
    assert np.isnan(np.asarray(updates[0])[1]) and int(state.count) == 1
    assert int(state.adaptations[-1].skipped) == 1 and int(state.adaptations[-1].consecutive) == 0
    assert update._cache_size() == 1  # one compiled step for skipped and applied steps


def test_jax_jit_step_with_donated_state():
    pytest.importorskip("jax")
    from adaptlr.backends.fast import jit_step

    backend = BACKENDS["jax"]
    params, grads = _problem(2)
    grads[1] = _poison(grads[1], np.inf)
    opt = adaptlr.skip_nonfinite(MAKERS["active(adamw)"]())
    eager_params, eager_state = _run(backend, opt, params, grads)
    step = jit_step(opt)
    xp_params = [backend.asarray(p) for p in params]
    state = opt.init(xp_params)
    for g in grads:
        xp_params, state = step([backend.asarray(x) for x in g], state, xp_params)
    for a, b in zip(_host(xp_params) + _host(state), _host(eager_params) + _host(eager_state)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


# The torch adapter keeps per-parameter step counts state[p]["step"] outside the functional state,
# as torch.optim does; a step that skip_nonfinite skips does not advance them either.


@pytest.mark.parametrize("fast", [False, "flat", "auto"])
@pytest.mark.parametrize("name", ["adamw", "active(adamw)", "autodrop(sgdm)", "hypergradient(sgd)"])
def test_torch_adapter_skips_like_the_functional_api(name, fast):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    params, grads = _problem(3)
    grads[4] = _poison(grads[4], np.nan)
    opt = adaptlr.skip_nonfinite(MAKERS[name]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_params, ref_state = _run(BACKENDS["numpy"], opt, params, grads)
    torch_params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    torch_opt = Optimizer(torch_params, opt, fast=fast)
    for i, g in enumerate(grads):
        before = [p.detach().clone() for p in torch_params]
        for p, x in zip(torch_params, g):
            p.grad = torch.from_numpy(x.copy())
        torch_opt.step()
        if i == 4:
            assert all(torch.equal(p.detach(), b) for p, b in zip(torch_params, before))
    # One global finite-check: whole flat buffers where the adapter goes fast, never blocks.
    assert torch_opt.fast_path == ("list" if fast is False else "flat")
    for p, r in zip(torch_params, ref_params):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12, atol=0)
    state = torch_opt.functional_state
    assert int(state.adaptations[-1].skipped) == 1 and int(state.count) == len(grads) - 1
    for a, b in zip(_host(state), _host(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["adapter-compiled", "functional"])
def test_torch_compile_skips_like_eager(where):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch._inductor")
    from adaptlr.backends.torch import Optimizer

    torch._dynamo.reset()
    params, grads = _problem(4, steps=5)
    grads[2] = _poison(grads[2], np.nan)
    opt = adaptlr.skip_nonfinite(MAKERS["active(adamw)"](), max_consecutive=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_params, ref_state = _run(BACKENDS["torch"], opt, params, grads)
        if where == "functional":
            got_params, got_state = _run(BACKENDS["torch"], opt, params, grads, update=torch.compile(opt.update))
        else:
            got_params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
            torch_opt = Optimizer(got_params, opt, fast="compile")
            for g in grads:
                for p, x in zip(got_params, g):
                    p.grad = torch.from_numpy(x.copy())
                torch_opt.step()
            assert torch_opt.fast_path == "compiled"
            got_state = torch_opt.functional_state
    for a, b in zip(_host(got_params) + _host(got_state), _host(ref_params) + _host(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    assert int(got_state.adaptations[-1].skipped) == 1 and int(got_state.count) == len(grads) - 1


def test_skip_state_survives_checkpoints_and_torch_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    params, grads = _problem(6)
    grads[1] = _poison(grads[1], np.inf)
    opt = adaptlr.skip_nonfinite(MAKERS["active(adamw)"](), max_consecutive=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        half_params, half_state = _run(BACKENDS["numpy"], opt, params, grads[:3])
    adaptlr.save_state(tmp_path / "s.npz", half_state, optimizer=opt)
    loaded = adaptlr.load_state(tmp_path / "s.npz", like=half_params, optimizer=opt)
    _assert_identical(loaded, half_state)
    # The torch adapter: state_dict round trip after the skip, then both continue identically.
    torch_params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    first = Optimizer(torch_params, opt, fast=False)
    for g in grads[:3]:
        for p, x in zip(torch_params, g):
            p.grad = torch.from_numpy(x.copy())
        first.step()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in torch_params]
    second = Optimizer(copies, opt, fast=False)
    second.load_state_dict(first.state_dict())
    assert int(second.functional_state.adaptations[-1].skipped) == 1
    for g in grads[3:]:
        for ps in (torch_params, copies):
            for p, x in zip(ps, g):
                p.grad = torch.from_numpy(x.copy())
        first.step()
        second.step()
    assert all(torch.equal(a, b) for a, b in zip(torch_params, copies))


def test_step_was_skipped_tells_adapters_without_a_sync():
    opt = adaptlr.skip_nonfinite(adaptlr.adamw(1e-2))
    params = [np.ones(2)]
    state = opt.init(params)
    _, applied = opt.update([np.ones(2)], state, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, skipped = opt.update([np.array([np.nan, 1.0])], applied, params)
    assert not bool(step_was_skipped(opt, state, applied)) and bool(step_was_skipped(opt, applied, skipped))
    assert step_was_skipped(adaptlr.adamw(1e-2), state, applied) is None


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="adaptlr Optimizer"):
        adaptlr.skip_nonfinite("adamw")
    with pytest.raises(ValueError, match="max_consecutive must be an integer >= 0"):
        adaptlr.skip_nonfinite(adaptlr.sgd(0.1), max_consecutive=-1)
    with pytest.raises(ValueError, match="already wrapped"):
        adaptlr.skip_nonfinite(adaptlr.skip_nonfinite(adaptlr.sgd(0.1)))
    assert adaptlr.skip_nonfinite(adaptlr.sgd(0.1), max_consecutive=np.int64(3)).adaptations[-1].max_consecutive == 3


# -- ActiveLR: a non-finite epoch sum never increases γ ------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_active_gamma_never_grows_from_a_non_finite_epoch_sum(backend, bad):
    # S = 1, h = 2, ℓ = 0.5, constant gradient 1: γ = 1, 3 after steps 1, 2; step 3's sum is `bad`.
    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0, decrease=0.5)
    params = [backend.asarray(np.ones(2))]
    state = opt.init(params)
    gammas = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for g in ([1.0, 1.0], [1.0, 1.0], [bad, 1.0], [1.0, 1.0]):
            _, state = opt.update([backend.asarray(np.array(g))], state, params)
            gammas.append(to_numpy(state.adaptations[0].gamma[0]))
    assert np.array_equal(gammas[1], [3.0, 3.0])
    assert np.array_equal(gammas[2], [1.5, 5.0])  # the non-finite element counts as a flip
    assert gammas[3][0] == 0.75  # G_prev is non-finite now: a flip again, never growth


def test_active_gamma_never_grows_from_a_non_finite_epoch_sum_under_jit():
    jax = pytest.importorskip("jax")
    backend = BACKENDS["jax"]
    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0, decrease=0.5)
    update = jax.jit(opt.update)
    params = [backend.asarray(np.ones(2))]
    state = opt.init(params)
    for g in ([1.0, 1.0], [1.0, 1.0], [np.nan, np.inf]):
        _, state = update([backend.asarray(np.array(g))], state, params)
    assert np.array_equal(to_numpy(state.adaptations[0].gamma[0]), [1.5, 1.5])


@pytest.mark.slow
def test_torch_compile_lets_the_step_through_past_max_consecutive():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()  # a fresh compile cache: earlier compiled tests would make shapes dynamic
    opt = adaptlr.skip_nonfinite(adaptlr.sgd(0.1), max_consecutive=1)
    params = [torch.ones(2, dtype=torch.float64)]
    nan = [torch.tensor([1.0, float("nan")], dtype=torch.float64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        update = torch.compile(opt.update)
        state = opt.init(params)
        updates, state = update(nan, state, params)
        assert torch.equal(updates[0], torch.zeros(2, dtype=torch.float64)) and int(state.count) == 0
        updates, state = update(nan, state, params)  # the 2nd consecutive: no raise, let through
    assert torch.isnan(updates[0][1]) and int(state.count) == 1
    assert int(state.adaptations[-1].skipped) == 1 and int(state.adaptations[-1].consecutive) == 0


_SHARD_MAP_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np, optax, adaptlr
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, PartitionSpec as P
from adaptlr.backends.jax import state_partition_specs, to_optax
mesh = Mesh(np.array(jax.devices()), ("d",))
rng = np.random.default_rng(0)
params0 = {"w": jnp.asarray(rng.normal(size=(16, 6))), "b": jnp.asarray(rng.normal(size=8))}
pspecs = {"w": P("d"), "b": P("d")}
opt = adaptlr.skip_nonfinite(adaptlr.active(adaptlr.adamw(0.05), steps_per_epoch=2))
plain, sharded = to_optax(opt), to_optax(opt, axis_name="d")

def grads_of(params, t):
    g = jax.tree_util.tree_map(lambda p: jnp.sin(3 * p + 0.1 * t), params)
    # step 3: one NaN, in the rows of w that the last device holds
    return {"w": g["w"].at[15, 0].set(jnp.where(t == 3, jnp.nan, g["w"][15, 0])), "b": g["b"]}

def plain_step(params, state, t):
    updates, state = plain.update(grads_of(params, t), state, params)
    return optax.apply_updates(params, updates), state

def local_step(params, state, t):
    row0 = jax.lax.axis_index("d") * 2  # this device's block of w: rows 2d, 2d + 1
    g = jax.tree_util.tree_map(lambda p: jnp.sin(3 * p + 0.1 * t), params)
    bad = jnp.logical_and(t == 3, row0 + 1 == 15)
    g["w"] = g["w"].at[1, 0].set(jnp.where(bad, jnp.nan, g["w"][1, 0]))
    updates, state = sharded.update(g, state, params)
    return optax.apply_updates(params, updates), state

state0 = plain.init(params0)
sspecs = state_partition_specs(state0, params0, pspecs)
sm = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(pspecs, sspecs, P()), out_specs=(pspecs, sspecs)))
jp = jax.jit(plain_step)
pa, sa, pb, sb = params0, state0, params0, state0
for t in range(6):
    pa, sa = jp(pa, sa, jnp.asarray(float(t)))
    pb, sb = sm(pb, sb, jnp.asarray(float(t)))
for x, y in zip(jax.tree_util.tree_leaves((pa, sa)), jax.tree_util.tree_leaves((pb, sb))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=0)
assert int(sb.adaptations[-1].skipped) == 1 and int(sb.count) == 5, (sb.adaptations[-1], sb.count)
assert np.isfinite(np.asarray(pb["w"])).all()
print("SKIP-SHARD-MAP-OK")
'''


def test_shard_map_every_device_skips_when_one_shard_is_non_finite():
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert "SKIP-SHARD-MAP-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
