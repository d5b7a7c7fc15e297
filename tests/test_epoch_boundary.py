"""Epoch-boundary work only at the boundary (adaptlr._boundary.at_boundary).

ActiveLR and AutoDrop compute their epoch-boundary updates through ``at_boundary`` (a Python branch
on the host-side step count; a loop run at most once under JAX tracing, ``only_when``; ActiveLR's
after the new parameters in ``jit_step``). Their results must
equal the formulation that selects with ``where`` at every step (``select_both``, what the
algorithms did before the hook), on every backend, under ``jax.jit``, in their derivatives, and
through the torch adapter's paths; and a step that is not at a boundary must not touch the boundary
fields (counted: no operation reads them).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import adaptlr
from adaptlr import _boundary

active = importlib.import_module("adaptlr.active")
autodrop = importlib.import_module("adaptlr.autodrop")

S = 3
STEPS = 4 * S + 1  # past the third epoch: ActiveLR adjusts γ, AutoDrop has an angle


def _optimizers() -> dict:
    return {
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=S, increase=0.5, max_gamma=3.0),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=S, theta=30.0,
                                             theta_max=90.0, patience_epochs=1),
        "autodrop-average": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=S,
                                                     theta=30.0, theta_max=90.0, patience_epochs=1,
                                                     average=True, min_lr=1e-3),
    }


def _force_where(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(active, "at_boundary", _boundary.select_both)
    monkeypatch.setattr(autodrop, "at_boundary", _boundary.select_both)


def _run(backend, make, jit: bool = False) -> tuple[list, list]:
    """Params and every state leaf after each step, as NumPy arrays (a quadratic with a moving target)."""
    import optree

    rng = np.random.default_rng(3)
    params = [backend.asarray(rng.standard_normal(s)) for s in [(4, 3), (5,)]]
    targets = [rng.standard_normal(p.shape) for p in params]
    opt = make()
    state = opt.init(params)
    update = opt.update
    if jit:
        import jax

        update = jax.jit(opt.update)
    trace = []
    for t in range(STEPS):
        grads = [p - backend.asarray(c * (1 + 0.3 * np.sin(t))) for p, c in zip(params, targets)]
        updates, state = update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        trace.append([backend.to_numpy(x) for x in params + optree.tree_leaves(state)])
    return trace


@pytest.mark.parametrize("name", list(_optimizers()))
def test_boundary_hook_equals_where_at_every_step(backend, name, monkeypatch):
    make = _optimizers()[name]
    hooked = _run(backend, make)
    with monkeypatch.context() as m:
        _force_where(m)
        selected = _run(backend, make)
    for a_step, b_step in zip(hooked, selected):
        for a, b in zip(a_step, b_step):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(_optimizers()))
def test_boundary_hook_under_jit_equals_where(name, monkeypatch):
    from adaptlr.conformance.backends import BACKENDS

    jax_backend = BACKENDS["jax"]
    if not jax_backend.available:
        pytest.skip("JAX is not installed")
    import jax

    make = _optimizers()[name]
    params = [jax_backend.asarray(np.ones(s)) for s in [(4, 3), (5,)]]
    opt = make()
    assert " while[" in str(jax.make_jaxpr(opt.update)(params, opt.init(params), params))  # runs at most once
    hooked = _run(jax_backend, make, jit=True)
    eager = _run(jax_backend, make)
    with monkeypatch.context() as m:
        _force_where(m)
        selected = _run(jax_backend, make, jit=True)
    for h, e, s in zip(hooked, eager, selected):
        for a, b, c in zip(h, e, s):
            np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-300)  # XLA may fuse the two graphs differently
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["active", "autodrop"])
@pytest.mark.parametrize("fast", [False, "foreach", "auto"])
def test_torch_adapter_paths_equal_where(name, fast, monkeypatch):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    def run() -> list:
        g = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in [(4, 3), (5,)]]
        opt = Optimizer(params, _optimizers()[name](), fast=fast)
        for _ in range(STEPS):
            for p in params:
                p.grad = p.detach() - torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        return [p.detach().clone() for p in params]

    hooked = run()
    with monkeypatch.context() as m:
        _force_where(m)
        selected = run()
    for a, b in zip(hooked, selected):
        assert torch.equal(a, b)


def test_ordinary_step_does_not_touch_boundary_fields():
    """Between boundaries ActiveLR's step reads γ and C and writes C only: the torch foreach path
    dispatches a fixed small number of ops, and none of them at all on ``G_prev``."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.bench import count_aten_ops
    from adaptlr.backends.torch import Optimizer

    def ops(opt_factory) -> int:
        params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(20)]
        for p in params:
            p.grad = torch.randn(3, 2)
        opt = Optimizer(params, opt_factory(), fast="foreach")
        opt.step()  # t = 1: not a boundary of S = 100
        return count_aten_ops(opt.step)

    base = ops(lambda: adaptlr.adamw(1e-3))
    wrapped = ops(lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100))
    # C + g (one op), γ times the step size (the core's κ), the copy of C, the epoch test (a few 0-D ops)
    assert wrapped - base <= 12, (base, wrapped)


@pytest.mark.parametrize("name", list(_optimizers()))
def test_derivatives_through_the_jitted_step_equal_where(name, monkeypatch):
    """``jax.grad`` of a jitted step through the hook (``lax.cond``) equals the ``where``
    formulation's, at boundary and ordinary steps, in the grads and the params (which AutoDrop's
    boundary work reads from its closure)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optree

    jax.config.update("jax_enable_x64", True)
    opt = _optimizers()[name]()

    def loss(grads: list, params: list, state) -> object:
        updates, new_state = opt.update(grads, state, params)
        leaves = [x for x in optree.tree_leaves((updates, new_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
        return sum(jnp.sum(jnp.sin(x)) for x in leaves)

    hooked_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    selected_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    update = jax.jit(opt.update)
    rng = np.random.default_rng(4)
    params = [jnp.asarray(rng.standard_normal(s)) for s in [(4, 3), (5,)]]
    state = opt.init(params)
    for _ in range(STEPS):
        grads = [p - jnp.asarray(rng.standard_normal(p.shape)) for p in params]
        hooked = hooked_grad(grads, params, state)
        with monkeypatch.context() as m:
            _force_where(m)
            selected = selected_grad(grads, params, state)
        for a, b in zip(optree.tree_leaves(hooked), optree.tree_leaves(selected)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-300)
        updates, state = update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    assert " while[" in str(jax.make_jaxpr(loss)(grads, params, state))  # the hook, not where, was traced


def test_xla_copies_counts_the_copies_a_conditional_adds():
    """``adaptlr.backends.xla_copies`` on steps whose copies are known: the identity branch of a
    ``lax.cond`` copies its operand, an input of the jitted function (every output of a
    conditional is a fresh buffer); the same arithmetic without the conditional copies nothing."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from adaptlr.backends.xla_copies import ENTRY, copies_per_computation

    x = jnp.ones((64, 32), jnp.float32)

    def branch(pred, x):
        return jax.lax.cond(pred, lambda x: x * 2.0, lambda x: x, x)

    hlo = jax.jit(branch).lower(jnp.asarray(False), x).compile().as_text()
    copies = copies_per_computation(hlo)
    assert sum(e for _, e in copies.values()) == x.size  # XLA places it in a branch or before the conditional
    assert all(name == ENTRY or f"%{name} (" in hlo for name in copies)
    assert copies_per_computation(hlo, "f64") == {}
    straight = jax.jit(lambda x: x * 2.0).lower(x).compile().as_text()
    assert copies_per_computation(straight) == {}


@pytest.mark.parametrize("helper", ["jit_step", "jit_update"])
@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("name", list(_optimizers()))
def test_jitted_steps_run_state_only_boundary_work_after_their_outputs(name, donate, helper):
    """``jit_step`` and ``jit_update`` run ActiveLR's boundary work (``state_only``) after their
    outputs (new parameters, updates), and leave out the boundary work that is not due where they
    know the count on the host: bit for bit ``jax.jit`` of the plain update and
    ``apply_updates`` over boundaries (but one case, below), and XLA copies nothing in the step's entry computation (2
    elements per parameter with the work traced where ActiveLR calls it, the update reading the γ
    that the loop may write), nor anywhere without donation (the work selected with ``where``)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optree

    from adaptlr.backends.fast import jit_step, jit_update
    from adaptlr.backends.xla_copies import ENTRY, copies_per_computation
    from adaptlr.conformance.tolerances import tolerance

    jax.config.update("jax_enable_x64", True)
    opt = _optimizers()[name]()
    rng = np.random.default_rng(5)
    params = [jnp.asarray(rng.standard_normal(s)) for s in [(4, 3), (5,)]]
    targets = [jnp.asarray(rng.standard_normal(p.shape)) for p in params]

    @jax.jit
    def plain_step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return adaptlr.apply_updates(params, updates), state

    def plain(grads, state, params):
        if helper == "jit_step":
            return plain_step(grads, state, params)
        updates, state = jax.jit(opt.update)(grads, state, params)  # applied outside, as jit_update's
        return adaptlr.apply_updates(params, updates), state

    step = jit_step(opt, donate=donate) if helper == "jit_step" else jit_update(opt, donate_state=donate)
    # Bit for bit, but AutoDrop's average: on an ordinary step its shift is zero, known to the step
    # that knows its count on the host (adaptlr.backends.jax_known_count), and XLA:CPU contracts
    # θ + α·d into one fused multiply-add (1 ulp from the plain step's, which adds a zero between)
    exact = name != "autodrop-average" or helper == "jit_update"
    want_params = [jnp.array(p) for p in params]  # the step donates its params
    state, want_state = opt.init(params), opt.init(want_params)
    for t in range(STEPS):
        grads = [p - c * (1 + 0.3 * np.sin(t)) for p, c in zip(params, targets)]
        first, state = step(grads, state, params)
        params = first if helper == "jit_step" else adaptlr.apply_updates(params, first)
        want_params, want_state = plain([jnp.array(g) for g in grads], want_state, want_params)
        for a, b in zip(optree.tree_leaves((params, state)), optree.tree_leaves((want_params, want_state))):
            a, b = np.asarray(a), np.asarray(b)
            if exact or b.dtype.kind != "f":
                np.testing.assert_array_equal(a, b)
            else:  # (the documented rule: normwise, NaN where the plain step has NaN)
                assert np.array_equal(np.isnan(a), np.isnan(b))
                a, b = np.nan_to_num(a), np.nan_to_num(b)
                assert np.linalg.norm(a - b) <= tolerance("float64", STEPS) * np.linalg.norm(b)
    if name == "active":  # (AutoDrop's work is read by its step: not deferred)
        hlo = step.compile(grads, state, params).as_text()
        copies = copies_per_computation(hlo, "f64")
        assert ENTRY not in copies and (donate or not copies)  # not donated: selected with where


@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("name", list(_optimizers()))
def test_jitted_steps_keep_the_boundary_work_within_the_largest_tensor(name, donate):
    """Issue 20 target 5 on JAX: XLA's temporaries of a jitted step (float32 params, float64 sums)
    at most the largest parameter tensor. The loop's body writes each field in place once what reads
    its old value is made (``_boundary.carry_in_place_of``, ``carry_after``), and AutoDrop's sums
    share no displacement: before round 26 XLA copied ActiveLR's C and G_prev (4.5 × the largest
    tensor donated) and kept AutoDrop's displacements and their float64 conversions (5.3×, 6.3×).
    Not met: AutoDrop's weighted average with the state donated, whose step copies the average and
    the parameters before the loop (3.5×; 7.1× before)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from adaptlr.backends.fast import jit_step

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    shapes = [(64, 48, 3), (48, 48, 3), (32,), (16, 8)]
    params = [jnp.asarray(rng.standard_normal(s), dtype=jnp.float32) for s in shapes]
    grads = [jnp.asarray(rng.standard_normal(s), dtype=jnp.float32) for s in shapes]
    opt = _optimizers()[name]()
    compiled = jit_step(opt, donate=donate).compile(grads, opt.init(params), params)
    largest = max(int(np.prod(s)) for s in shapes) * 4
    bound = 4 if name == "autodrop-average" and donate else 1
    assert compiled.memory_analysis().temp_size_in_bytes <= bound * largest


def test_carry_helpers_give_their_values_back_outside_the_loops_body():
    """Eager, and traced outside :func:`adaptlr._boundary.carrying` (the ``where`` formulation, a
    user's ``jax.jit`` of a step with no loop): nothing is added to the work."""
    values = [np.array([1.0, -0.0]), np.array(2.0)]
    assert _boundary.carry_after(np, values, [np.array(1.0)]) is values
    assert _boundary.carry_in_place_of(np, [np.zeros(2), np.zeros(())], values, [np.array(1.0)]) is values
    with _boundary.carrying():  # eager arrays: not a loop's body (only JAX tracers are)
        assert not _boundary.is_carrying(values)
        assert _boundary.carry_after(np, values, [np.array(1.0)]) is values
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    def step(x):
        ys = [x * 2.0]
        assert not _boundary.is_carrying(ys)
        assert _boundary.carry_after(jnp, ys, [x]) is ys
        assert _boundary.carry_in_place_of(jnp, [x], ys, [x]) is ys
        with _boundary.carrying():
            assert _boundary.is_carrying(ys)
        return ys[0]

    jax.jit(step)(jnp.ones(3))


@pytest.mark.parametrize("after_value", [0.0, -1.5, np.inf, -np.inf, np.nan])
def test_carry_helpers_in_the_loops_body_give_the_same_numbers(after_value):
    """Within :func:`adaptlr._boundary.carrying` (the body of the loop, traced), ``carry_in_place_of``
    (``where(never, old, new)``) and ``carry_after`` (``where(never, NaN, new)``) give ``new`` bit for
    bit, whatever the arrays they wait for and ``old`` hold; with ``first_elements=False`` (inside
    ``shard_map``) they wait for the 0-D arrays only, and for none if there are none."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    new = jnp.asarray([1.0, -0.0, 0.0, np.nan, np.inf, -np.inf, 3e-45], dtype=jnp.float32)
    old = jnp.full(new.shape, np.nan, dtype=jnp.float32)

    def step(new, old, s):
        after = [s * 2.0, jnp.full((2, 3), s)]
        with _boundary.carrying():
            replaced = _boundary.carry_in_place_of(jnp, [old, old], [new, new * 1.0], after)
            waiting = _boundary.carry_after(jnp, [new], after)
            only_arrays = [new]
            assert _boundary.carry_after(jnp, only_arrays, after[1:], first_elements=False) is only_arrays
            scalars_only = _boundary.carry_after(jnp, [new], after, first_elements=False)
        assert replaced[0] is not new and waiting[0] is not new and scalars_only[0] is not new
        return [*replaced, *waiting, *scalars_only]

    for got in jax.jit(step)(new, old, jnp.asarray(after_value)):
        assert got.dtype == new.dtype
        np.testing.assert_array_equal(np.signbit(np.asarray(got)), np.signbit(np.asarray(new)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(new))


def test_state_only_work_outside_a_deferring_step_runs_where_it_is_called():
    """``state_only`` changes nothing outside :func:`adaptlr._boundary.deferring` (JAX traced or not),
    and within it only JAX-traced work is recorded."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x = jnp.arange(3.0)

    def double(x):
        return (x * 2,)

    assert _boundary.at_boundary(np, True, double, (np.arange(3.0),), state_only=True)[0].tolist() == [0, 2, 4]
    traced = jax.jit(lambda p, x: _boundary.at_boundary(jnp, p, double, (x,), state_only=True))
    assert traced(jnp.asarray(True), x)[0].tolist() == [0, 2, 4]
    with _boundary.deferring() as recorded:
        eager = _boundary.at_boundary(jnp, jnp.asarray(True), double, (x,), state_only=True)
        assert eager[0].tolist() == [0, 2, 4] and recorded == []
        out = jax.jit(lambda p, x: _boundary.at_boundary(jnp, p, double, (x,), state_only=True)[0] + 0)(
            jnp.asarray(True), x)
        assert out.tolist() == [0, 1, 2] and len(recorded) == 1  # recorded, the operands returned


def test_deferred_work_whose_arrays_left_the_new_state_is_an_error():
    """``run_deferred`` replaces the work's operands in the new state by its results; a new state
    that no longer holds them (made anew, as skip_nonfinite's guard does: jit_step does not defer
    past a guard) would silently lose the boundary work, so it is an error."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from adaptlr.backends.jax_boundary import run_deferred

    x = jnp.arange(3.0)
    recorded = [(jnp.asarray(True), lambda x: (x * 2,), (x,))]
    assert run_deferred(recorded, {"a": x}, [x])["a"].tolist() == [0, 2, 4]
    assert run_deferred(recorded, {"a": x}, [x], in_place=False)["a"].tolist() == [0, 2, 4]
    with pytest.raises(RuntimeError, match="not in the step's new state"):
        run_deferred(recorded, {"a": x + 0}, [x])
