"""The arguments of the jitted steps (``adaptlr.backends.jax_arguments``): the learning rates passed
once per value, the donation check skipped on the step's own outputs, and the steps unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import adaptlr

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from adaptlr.backends import jax_arguments  # noqa: E402
from adaptlr.backends.fast import jit_step, jit_update  # noqa: E402

SHAPES = [(3,), (2, 4), (5,), (2, 4), (1,)]


def _problem(dtypes: list | None = None) -> tuple[list, list]:
    dtypes = dtypes or [jnp.float32] * len(SHAPES)
    params = [jnp.full(s, 0.5 + k / 10, dtype=d) for k, (s, d) in enumerate(zip(SHAPES, dtypes))]
    grads = [jnp.full(s, 0.2 - k / 50, dtype=d) for k, (s, d) in enumerate(zip(SHAPES, dtypes))]
    return params, grads


def _reference(opt: adaptlr.Optimizer, params: list, grads: list, state: object, steps: int) -> tuple:
    """The same steps through ``jax.jit`` of the plain update, every argument as given."""

    @jax.jit
    def step(grads: list, state: object, params: list) -> tuple:
        updates, state = opt.update(grads, state, params)
        return adaptlr.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(grads, state, params)
    return params, state


def _assert_same(got: object, want: object) -> None:
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for a, b in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _DeviceReads:
    """Counts ``jax.device_get`` calls made by ``jax_arguments``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jax.device_get

        def counted(x: object) -> object:
            self.calls += 1
            return real(x)

        monkeypatch.setattr(jax, "device_get", counted)


def test_equal_rates_are_passed_once_per_value_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _DeviceReads(monkeypatch)
    opt = adaptlr.adamw(1e-3)
    params, _ = _problem([jnp.float32, jnp.float32, jnp.float16, jnp.float32, jnp.float16])
    state = opt.init(params)
    assert len({id(a) for a in state.learning_rate}) == len(SHAPES)  # init: a buffer per leaf
    arguments = jax_arguments.StepArguments((3, 4, 5), rates_by_value=True)
    rates, layout = arguments.rates(state.learning_rate)
    assert [r.dtype for r in rates] == [jnp.float32, jnp.float16]
    assert layout.pattern == (0, 0, 1, 0, 1)
    rebuilt = layout.rebuild(rates)
    assert [a.dtype for a in rebuilt] == [a.dtype for a in state.learning_rate]
    assert reads.calls == 1
    again, same = arguments.rates(state.learning_rate)  # the same arrays: grouped as before, no read
    assert same == layout and all(a is b for a, b in zip(again, rates)) and reads.calls == 1


def test_rates_set_since_are_grouped_by_identity_without_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _DeviceReads(monkeypatch)
    arguments = jax_arguments.StepArguments((3, 4, 5), rates_by_value=True)
    first = [jnp.asarray(0.1, dtype=jnp.float32) for _ in range(4)]
    assert arguments.rates(first)[1].pattern == (0, 0, 0, 0) and reads.calls == 1
    shared = jnp.asarray(0.1, dtype=jnp.float32)
    changed = [shared, jnp.asarray(0.1, dtype=jnp.float32), shared, first[3]]
    rates, layout = arguments.rates(changed)
    assert layout.pattern == (0, 1, 0, 2) and len(rates) == 3
    assert reads.calls == 1  # never read again: no host sync on a step


def test_a_schedules_rates_are_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _DeviceReads(monkeypatch)
    opt = adaptlr.adam(lambda t: 0.1 / t)
    params, grads = _problem()
    state = opt.init(params)
    run = jit_step(opt)
    for _ in range(3):
        params, state = run(grads, state, params)
    assert reads.calls == 0
    assert float(state.learning_rate[0]) == pytest.approx(0.1 / 3, rel=1e-6)


@pytest.mark.parametrize("helper", ["jit_step", "jit_update"])
@pytest.mark.parametrize("compiled", [False, True])
def test_steps_with_grouped_rates_are_the_plain_jitted_steps(helper: str, compiled: bool) -> None:
    """Bit for bit the steps of ``jax.jit`` on the plain update, with rates grouped by value, and
    after the user sets one leaf's rate (grouped by identity: a compiled step runs the jitted
    function for the new layout)."""
    opt = adaptlr.adamw(1e-2, weight_decay=0.1)
    params, grads = _problem()
    state = opt.init(params)
    want_params, want_state = _reference(opt, params, grads, opt.init(params), 3)
    run = (jit_step if helper == "jit_step" else jit_update)(opt)
    if compiled:
        run = run.compile(grads, state, params)

    def step(params: list, state: object) -> tuple:
        first, state = run(grads, state, params)
        return (first if helper == "jit_step" else adaptlr.apply_updates(params, first)), state

    for _ in range(3):
        params, state = step(params, state)
    _assert_same((params, state), (want_params, want_state))

    rates = list(state.learning_rate)
    rates[1] = jnp.asarray(5e-2, dtype=jnp.float32)  # one parameter's rate set by the user
    state = state._replace(learning_rate=rates)
    want_params, want_state = _reference(opt, want_params, grads, want_state._replace(learning_rate=rates), 2)
    for _ in range(2):
        params, state = step(params, state)
    _assert_same((params, state), (want_params, want_state))
    assert float(state.learning_rate[1]) == pytest.approx(5e-2)


def _counted_checks(monkeypatch: pytest.MonkeyPatch) -> list:
    """A list that grows by one at each donation check (``jax_arguments.donatable``)."""
    checks: list = []
    real = jax_arguments.donatable

    def counted(args: tuple, donated: tuple) -> tuple:
        checks.append(donated)
        return real(args, donated)

    monkeypatch.setattr(jax_arguments, "donatable", counted)
    return checks


def _step(opt: adaptlr.Optimizer, grads: list, params: list, compiled: bool, checks: list) -> tuple:
    """``jit_step(opt)`` (compiled ahead of time where ``compiled``: its check not counted) and
    ``opt.init(params)``."""
    state = opt.init(params)
    run = jit_step(opt)
    if compiled:
        run = run.compile(grads, state, params)
        checks.clear()
    return run, state


@pytest.mark.parametrize("compiled", [False, True])
def test_the_donation_check_runs_only_on_arrays_the_step_did_not_return(monkeypatch: pytest.MonkeyPatch,
                                                                        compiled: bool) -> None:
    checks = _counted_checks(monkeypatch)
    opt = adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-4)
    params, grads = _problem()
    run, state = _step(opt, grads, params, compiled, checks)
    params, state = run(grads, state, params)  # init's state: checked (it may share arrays)
    assert len(checks) == 1
    for _ in range(3):
        params, state = run(grads, state, params)  # the step's own outputs: not checked
    assert len(checks) == 1
    params = [p + 0 for p in params]  # new params: checked
    params, state = run(grads, state, params)
    assert len(checks) == 2
    assert all(not leaf.is_deleted() for leaf in jax.tree_util.tree_leaves((params, state)))


@pytest.mark.parametrize("compiled", [False, True])
def test_a_call_refused_for_a_shared_buffer_is_made_again_with_the_check(monkeypatch: pytest.MonkeyPatch,
                                                                         compiled: bool) -> None:
    """Gradients that are the parameters the step returned (f = ‖θ‖²/2): JAX refuses to donate a
    buffer that is also a plain input, before it runs; the call is made again with the check (the
    donated copies), and every later call checks. The result is the plain jitted step's."""
    checks = _counted_checks(monkeypatch)
    opt = adaptlr.adamw(1e-2)
    params, _ = _problem()
    run, state = _step(opt, params, params, compiled, checks)
    want_params, want_state = params, opt.init(params)

    @jax.jit
    def plain(state: object, params: list) -> tuple:
        updates, state = opt.update(params, state, params)
        return adaptlr.apply_updates(params, updates), state

    for _ in range(3):
        params, state = run(params, state, params)
        want_params, want_state = plain(want_state, want_params)
    assert len(checks) == 3  # the first call, the second call made again, the third
    _assert_same((params, state), (want_params, want_state))


@pytest.mark.parametrize("error", [RuntimeError("RESOURCE_EXHAUSTED: out of memory"), ValueError("bad shape")])
def test_other_errors_are_raised(error: Exception) -> None:
    arguments = jax_arguments.StepArguments((3, 4, 5), rates_by_value=True)
    arguments.returned = (id(None), id(None))

    def failing(*args: object) -> None:
        raise error

    with pytest.raises(type(error), match=str(error)):
        arguments.call(failing, (), None, None)
    assert not arguments.always_check
