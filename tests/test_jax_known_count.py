"""Jitted steps that know their count on the host (adaptlr.backends.jax_known_count, round 27).

``jit_step`` and ``jit_update`` follow the step count on the host and leave epoch-boundary work that
is not due out of the step (ActiveLR's γ and G_prev, AutoDrop's snapshot and displacement): the
same numbers as the step that decides on the device (bit for bit: test_epoch_boundary's
``test_jitted_steps_run_state_only_boundary_work_after_their_outputs`` runs these steps over epoch
boundaries against ``jax.jit`` of the plain update), the fields the work did not touch forwarded
as the input's own arrays where the state is not donated (a loop's carry would be a copy of them),
a state made elsewhere read once, a count that cannot be read decided on the device.
"""

from __future__ import annotations

import re

import numpy as np
import optree
import pytest

import adaptlr

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from adaptlr.backends import jax_known_count  # noqa: E402
from adaptlr.backends.fast import jit_step, jit_update  # noqa: E402
from adaptlr.backends.jax_known_count import KnownCount  # noqa: E402

S = 3
STEPS = 4 * S + 1


def _optimizers() -> dict:
    return {
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=S, increase=0.5, max_gamma=3.0),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=S, theta=30.0,
                                             theta_max=90.0, patience_epochs=1),
    }


# the fields of each adaptation that only its epoch-boundary work writes
BOUNDARY_FIELDS = {"active": ("gamma", "prev_epoch_grad_sum"), "autodrop": ("previous_params", "previous_displacement")}


def _problem(seed: int = 5) -> tuple[list, list]:
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(s)) for s in [(4, 3, 3), (5,)]]
    targets = [jnp.asarray(rng.standard_normal(p.shape)) for p in params]
    return params, targets


def _grads(params: list, targets: list, t: int) -> list:
    return [p - c * (1 + 0.3 * np.sin(t)) for p, c in zip(params, targets)]


def _leaves_equal(a, b) -> None:
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", list(_optimizers()))
def test_ordinary_steps_forward_the_boundary_fields_without_donation(name):
    """On a step that is not at a boundary the fields only the boundary writes are the input's own
    arrays (before round 27: new arrays every step, copies made by the loop's carry or by ``where``);
    at a boundary they are new."""
    params, targets = _problem()
    opt = _optimizers()[name]()
    step = jit_step(opt, donate=False)
    state = opt.init(params)
    forwarded = []
    for t in range(1, STEPS + 1):
        new_params, new_state = step(_grads(params, targets, t), state, params)
        old, new = state.adaptations[0], new_state.adaptations[0]
        same = [all(a is b for a, b in zip(getattr(old, f), getattr(new, f))) for f in BOUNDARY_FIELDS[name]]
        forwarded.append(all(same))
        params, state = new_params, new_state
    due = [t % S == 0 for t in range(1, STEPS + 1)] if name == "active" else [(t - 1) % S == 0
                                                                               for t in range(1, STEPS + 1)]
    # (the first step traces the boundary work, deciding on the device: its fields are new)
    assert forwarded[1:] == [not d for d in due[1:]]


@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("name", list(_optimizers()))
def test_a_state_made_elsewhere_is_read_once_and_stepped_like_the_plain_step(name, donate, monkeypatch):
    """A state the step did not return (a copy, as a restored checkpoint gives) is read on the host
    once, then followed: the steps equal ``jax.jit`` of the plain update over epoch boundaries."""
    params, targets = _problem(7)
    opt = _optimizers()[name]()

    @jax.jit
    def plain(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return adaptlr.apply_updates(params, updates), state

    reads = []
    original = KnownCount._step

    def counted(self, count):
        if count is not self._returned:
            reads.append(int(count))
        return original(self, count)

    monkeypatch.setattr(KnownCount, "_step", counted)
    step = jit_step(opt, donate=donate)
    want_params, state = [jnp.array(p) for p in params], opt.init(params)
    want_state = opt.init(want_params)
    for t in range(1, STEPS + 1):
        grads = _grads(want_params, targets, t)
        if t == 5:  # a copy of every array: not the state the step returned
            state = jax.tree_util.tree_map(jnp.array, state)
            params = [jnp.array(p) for p in params]
        params, state = step([jnp.array(g) for g in grads], state, params)
        want_params, want_state = plain(grads, want_state, want_params)
        _leaves_equal((params, state), (want_params, want_state))
    assert reads == [0, 4]  # init's count, then the copy's


def test_a_traced_count_is_decided_on_the_device():
    """Called inside another function that JAX traces, the step cannot read its count: it runs the
    step that decides on the device (the same numbers)."""
    params, targets = _problem(9)
    opt = _optimizers()["autodrop"]()
    step = jit_update(opt, donate_state=False)

    @jax.jit
    def outer(grads, state, params):
        return step(grads, state, params)

    @jax.jit
    def plain(grads, state, params):
        return opt.update(grads, state, params)

    state = want_state = opt.init(params)
    for t in range(1, 2 * S + 2):
        grads = _grads(params, targets, t)
        updates, state = outer(grads, state, params)
        want_updates, want_state = plain(grads, want_state, params)
        _leaves_equal((updates, state), (want_updates, want_state))
        params = adaptlr.apply_updates(params, updates)


def test_known_count_answers_each_rule_for_the_next_step():
    """Unit: no rule, never a read; the first call traces every boundary; later calls answer each
    rule for ``count + 1`` (all True: the step that traces every boundary); an int32 count
    saturates as ``next_count``; a trace asking about other boundaries than answered is an error."""
    class Unreadable:  # a count that must not be read
        def __int__(self):
            raise AssertionError("read")

    known = KnownCount()
    known.traced([], None)
    assert known.answers(Unreadable()) == (None, None)

    known = KnownCount()
    count = jnp.asarray(5, dtype=jnp.int64)
    assert known.answers(count) == (None, 6)  # not traced yet
    known.traced([lambda t: t % 3 == 0, lambda t: (t - 1) % 2 == 0], None)
    assert known.answers(count) == ((True, False), 6)
    known.returning(count, 7)  # (a stand-in: the step returned this array with value 7)
    assert known.answers(count) == ((False, False), 8)
    assert known.answers(jnp.asarray(5, dtype=jnp.int64)) == ((True, False), 6)  # another array: read
    assert known.answers(jnp.asarray(8, dtype=jnp.int64)) == (None, 9)  # both due
    assert known.answers(jnp.asarray(jax_known_count.INT32_MAX, dtype=jnp.int32))[1] == jax_known_count.INT32_MAX
    with pytest.raises(RuntimeError, match="asked about 1 boundaries, answered for 2"):
        known.traced([lambda t: True], (True, False))


def test_activelr_gradient_sum_is_not_a_lone_addition_under_jit():
    """ActiveLR's ``C + g`` under ``jax.jit``: XLA:CPU emits a lone elementwise addition on a tensor
    whose last dimension is small (a 3×3 convolution's) tile by tile along it, 4× slower than a
    loop fusion (jax 0.10.2, round 27); the sum is made a select on a 0-D value XLA cannot fold.
    The ordinary step's optimized HLO has no lone addition."""
    params, _ = _problem()
    opt = _optimizers()["active"]()
    step = jit_step(opt, donate=False)
    state = opt.init(params)
    grads = [jnp.ones_like(p) for p in params]
    run = step.compile(grads, state, params)
    for _ in range(2):  # step 2 is an ordinary one
        params, state = run(grads, state, params)
    executables = run.executables
    assert set(executables) == {None, (False,)}
    hlo = executables[(False,)].as_text()
    assert not re.search(r"%wrapped_add\S* = f64\[4,3,3\]", hlo)  # (a 1-D one is fine)


@pytest.mark.parametrize("donate", [True, False])
def test_a_guarded_step_that_leaves_its_count_is_decided_on_the_device(donate):
    """``skip_nonfinite`` returns the old count where a step is not finite, so the host cannot follow
    the count (``Optimizer.counts_every_step`` is False): every step is the one that decides on the
    device, equal to ``jax.jit`` of the plain update over skipped steps and epoch boundaries."""
    params, targets = _problem(11)
    opt = adaptlr.skip_nonfinite(_optimizers()["active"]())
    assert not opt.counts_every_step and _optimizers()["active"]().counts_every_step

    @jax.jit
    def plain(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return adaptlr.apply_updates(params, updates), state

    step = jit_step(opt, donate=donate)
    want_params = [jnp.array(p) for p in params]
    state, want_state = opt.init(params), opt.init(want_params)
    for t in range(1, STEPS + 1):
        grads = _grads(want_params, targets, t)
        if t in (2, 3):  # skipped: the count stays, and step 3 would otherwise end an epoch
            grads[0] = grads[0].at[0, 0, 0].set(jnp.nan)
        params, state = step([jnp.array(g) for g in grads], state, params)
        want_params, want_state = plain(grads, want_state, want_params)
        _leaves_equal((params, state), (want_params, want_state))
    assert int(state.count) == STEPS - 2
