"""The execution fast paths (adaptlr.backends.fast) agree with the pure per-tensor update.

Each fast path runs the same algorithm code on a different layout (flat buffers, blocks of them, a
compiled or jitted graph), so float64 results agree to rounding (≤ 1e-12 relative); float32 within
``F32_TOL`` of each leaf's largest magnitude (reassociated sums, fused kernels).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import warnings

import numpy as np
import pytest

import adaptlr
from adaptlr.backends.fast import (
    FlatOptimizer,
    flat_safety,
    jit_step,
    jit_update,
)
from adaptlr.core import Adaptation
from tests.conftest import blocks_on_a_large_cpu_model, max_rel_err

F64_TOL = 1e-12
F32_TOL = 1e-5  # relative to the largest |value| of each leaf
SHAPES = [(4, 3, 2, 2), (5,), (7, 6), (), (3, 1, 5)]
STEPS = 6

has_torch = importlib.util.find_spec("torch") is not None
has_jax = importlib.util.find_spec("jax") is not None


def _wrapper(name: str):
    factory = getattr(adaptlr, name, None)
    if factory is None:
        pytest.skip(f"adaptlr.{name} does not exist yet")
    return factory


def make(name: str) -> adaptlr.Optimizer:
    """Optimizers by name; wrappers missing from adaptlr are skipped with the reason."""
    bases = {
        "sgd": lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        "adam": lambda: adaptlr.adam(0.01, weight_decay=0.01),
        "adamw": lambda: adaptlr.adamw(0.01, weight_decay=0.05),
        "radam": lambda: adaptlr.radam(0.01),
        "adabelief": lambda: adaptlr.adabelief(0.01),
        "dadapt_adam": lambda: adaptlr.dadapt_adam(weight_decay=0.01),
        "dadapt_sgd": lambda: adaptlr.dadapt_sgd(momentum=0.9),
        "prodigy": lambda: adaptlr.prodigy(),
        "dog": lambda: adaptlr.dog(),
    }
    if name in bases:
        return bases[name]()
    wrappers = {
        "active": lambda: _wrapper("active")(adaptlr.adamw(0.01), steps_per_epoch=2, increase=0.5),
        "autodrop": lambda: _wrapper("autodrop")(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=1,
                                                 patience_epochs=1, theta=0.5),
        "hd_global": lambda: _wrapper("hypergradient")(adaptlr.adamw(0.01), hyper_lr=1e-3),
        "hd_element": lambda: _wrapper("hypergradient")(adaptlr.adamw(0.01), hyper_lr=1e-3, granularity="element"),
        "hd_tensor": lambda: _wrapper("hypergradient")(adaptlr.adamw(0.01), hyper_lr=1e-3, granularity="tensor"),
        "dsa_element": lambda: _wrapper("dsa")(adaptlr.adamw(0.01), hyper_lr=0.05, structure=("element",)),
        "dsa": lambda: _wrapper("dsa")(adaptlr.adamw(0.01), hyper_lr=0.05),
        "eg_global": lambda: _wrapper("eg_step_size")(adaptlr.sgd(0.05), scale_lr=0.1, gain_lr=0.1),
        "eg_tensor": lambda: _wrapper("eg_step_size")(adaptlr.sgd(0.05), scale_lr=0.1, gain_lr=0.1, scale="tensor"),
    }
    return wrappers[name]()


ALL = ["sgd", "adam", "adamw", "radam", "adabelief", "active", "autodrop", "hd_global", "hd_element",
       "hd_tensor", "dsa_element", "dsa", "eg_global", "eg_tensor"]
NOT_FLAT = {"hd_tensor", "dsa", "eg_tensor"}
NOT_BLOCKWISE = {"autodrop", "hd_global", "eg_global"}


def _problem(dtype: str):
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    noise = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, noise


def _grad(p, n):
    return 0.5 * p + n  # a quadratic plus noise: the trajectory feeds back into the gradients


def pure_run(opt, dtype: str):
    """The reference: the public per-tensor update on NumPy."""
    params, noise = _problem(dtype)
    state = opt.init(params)
    for t in range(STEPS):
        grads = [_grad(p, n) for p, n in zip(params, noise[t])]
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


def flat_run(opt, dtype: str, library: str = "numpy", **kwargs):
    params, noise = _problem(dtype)
    if library == "torch":
        import torch

        params = [torch.asarray(p) for p in params]
        noise = [[torch.asarray(n) for n in ns] for ns in noise]
    fo = FlatOptimizer(opt, params, **kwargs)
    for t in range(STEPS):
        grads = [_grad(p, n) for p, n in zip(fo.params, noise[t])]
        fo.step(grads)
    return fo


def _np(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def err(actual: list, expected: list, dtype: str) -> float:
    a = [_np(x) for x in actual]
    e = [_np(x) for x in expected]
    if dtype == "float64":
        return max_rel_err(a, e)
    return max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)) if y.size else 0.0
               for x, y in zip(a, e))


def check(fo: FlatOptimizer, opt, dtype: str) -> None:
    params, state = pure_run(opt, dtype)
    tol = F64_TOL if dtype == "float64" else F32_TOL
    assert err(fo.params, params, dtype) <= tol
    import optree

    got = optree.tree_leaves(fo.per_tensor_state())
    want = optree.tree_leaves(state)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = _np(g), _np(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        if np.issubdtype(w.dtype, np.floating):
            assert err([g], [w], dtype) <= tol
        else:
            np.testing.assert_array_equal(g, w)


# -- flat safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_flat_safety_classification(name: str) -> None:
    flat, blockwise, reason = flat_safety(make(name))
    assert flat == (name not in NOT_FLAT), reason
    assert blockwise == (name not in NOT_FLAT | NOT_BLOCKWISE), reason


def test_declared_attributes_win_and_unknown_adaptations_are_not_flat() -> None:
    class Unknown(Adaptation):
        name = "unknown"
        state_class = tuple

        def init(self, params, alpha, layout, xp):
            return ()

        def step(self, ctx, size, state):
            return size, state

    opt = adaptlr.adamw().wrapped(Unknown())
    assert flat_safety(opt)[:2] == (False, False)
    declared = Unknown()
    declared.flat_safe, declared.blockwise = True, True
    assert flat_safety(adaptlr.adamw().wrapped(declared))[:2] == (True, True)
    with pytest.raises(TypeError, match="opt"):
        flat_safety("adamw")
    with pytest.raises(TypeError, match="opt"):
        FlatOptimizer("adamw", [np.zeros(3)])
    with pytest.raises(ValueError, match="block_size"):
        FlatOptimizer(adaptlr.adamw(), [np.zeros(3)], block_size=0)


# -- NumPy and torch flat / blocked paths agree with the pure path -------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ALL)
def test_numpy_flat_and_blocked_agree(name: str, dtype: str) -> None:
    opt = make(name)
    flat = flat_run(opt, dtype)
    assert flat.mode == ("per-tensor" if name in NOT_FLAT else "flat")
    check(flat, opt, dtype)
    blocked = flat_run(opt, dtype, block_size=7)  # blocks straddle tensor boundaries
    # NOT_BLOCKWISE's sums are replayable: blocks in two passes on the steps that sum
    expected = "per-tensor" if name in NOT_FLAT else "blocked"
    assert blocked.mode == expected
    check(blocked, opt, dtype)


@pytest.mark.skipif(not has_torch, reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ALL)
def test_torch_flat_and_blocked_agree(name: str, dtype: str) -> None:
    opt = make(name)
    check(flat_run(opt, dtype, "torch"), opt, dtype)
    check(flat_run(opt, dtype, "torch", block_size=11), opt, dtype)


def test_params_are_views_and_grads_views_are_not_copied() -> None:
    opt = adaptlr.adamw(0.01)
    params, noise = _problem("float64")
    fo = FlatOptimizer(opt, params)
    for view, p in zip(fo.params, params):
        np.testing.assert_array_equal(view, p)
    for t in range(STEPS):
        for g, p, n in zip(fo.grads, fo.params, noise[t]):
            g[...] = _grad(p, n)
        fo.step(fo.grads if t % 2 else None)
    assert err(fo.params, pure_run(opt, "float64")[0], "float64") <= F64_TOL
    fo.params[0][...] = 0.0  # a view: writing it writes the flat buffer
    assert not np.any(fo._buckets[0].params[: fo.params[0].size])
    with pytest.raises(ValueError, match="grads"):
        fo.step([np.zeros(3)])


def test_groups_and_overrides_match_update_leaves() -> None:
    """Param groups: per-group α and λ overrides, as the torch adapter passes them."""
    opt = adaptlr.adamw(0.01)
    params, noise = _problem("float64")
    groups = [0, 1, 0, 1, 1]
    alpha = [0.01, 0.003, 0.01, 0.003, 0.003]
    decay = [0.1, 0.0, 0.1, 0.0, 0.0]
    for block in (None, 4):
        fo = FlatOptimizer(opt, params, groups=groups, block_size=block)
        assert len(fo._buckets) == 2
        ref_params = [p.copy() for p in params]
        state = opt.init(ref_params)
        xp = fo.xp
        layout = adaptlr.core.Layout.of(ref_params)[0]
        for t in range(STEPS):
            grads = [_grad(p, n) for p, n in zip(ref_params, noise[t])]
            a = [xp.asarray(x, dtype=xp.float64) for x in alpha]
            updates, state = opt.update_leaves(xp, layout, grads, state, ref_params, alpha=a, weight_decay=decay)
            ref_params = [p + u for p, u in zip(ref_params, updates)]
            fo.step([_grad(p, n) for p, n in zip(fo.params, noise[t])], alpha=alpha, weight_decay=decay)
        assert err(fo.params, ref_params, "float64") <= F64_TOL


@pytest.mark.skipif(not has_torch, reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_torch_compiled_flat_step_agrees(dtype: str) -> None:
    opt = make("adamw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fo = flat_run(opt, dtype, "torch", compile=True)
    assert fo.mode == "compiled"
    check(fo, opt, dtype)


@pytest.mark.slow
@pytest.mark.skipif(not has_torch, reason="torch is not installed")
@pytest.mark.parametrize("name", ["sgd", "radam", "adabelief", "active", "autodrop", "hd_global", "eg_global"])
def test_torch_compiled_wrappers_agree(name: str) -> None:
    opt = make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(flat_run(opt, "float64", "torch", compile=True), opt, "float64")


@pytest.mark.slow
@pytest.mark.skipif(not has_torch, reason="torch is not installed")
@pytest.mark.parametrize("where", ["FlatOptimizer", "adapter"])
def test_each_optimizer_compiles_its_own_step(where: str) -> None:
    """torch.compile's recompilation limit is per code object: with a limit of 1, a second optimizer
    (another algorithm) sharing the first one's code object would run eagerly, without an error."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from adaptlr.backends.torch import Optimizer

    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("ignore")
        for opt in (adaptlr.sgd(0.1, momentum=0.9), adaptlr.adam(0.1)):
            if where == "FlatOptimizer":
                FlatOptimizer(opt, [torch.ones(3, dtype=torch.float64)], compile=True).step(
                    [torch.ones(3, dtype=torch.float64)])
            else:
                p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
                p.grad = torch.ones(3, dtype=torch.float64)
                Optimizer([p], opt, fast="compile").step()
    assert counters["stats"]["unique_graphs"] - graphs >= 2


# -- JAX: jitted, buffer-donating update ------------------------------------------------------------


_SLOW = pytest.mark.slow
JAX_CASES = [("adamw", "float64"), ("adamw", "float32"), ("hd_global", "float64"), ("active", "float64")] + [
    pytest.param(name, dtype, marks=_SLOW)
    for name, dtype in [("sgd", "float64"), ("radam", "float64"), ("active", "float32"), ("hd_global", "float32"),
                        ("dsa", "float64"), ("dsa", "float32"), ("eg_global", "float64"), ("eg_global", "float32")]
]


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize(("name", "dtype"), JAX_CASES)
def test_jax_jit_update_and_step_agree(name: str, dtype: str) -> None:
    import jax.numpy as jnp

    opt = make(name)
    want_params, want_state = pure_run(opt, dtype)
    params0, noise = _problem(dtype)
    update, step = jit_update(opt), jit_step(opt)

    params = [jnp.asarray(p) for p in params0]
    state = opt.init(params)
    for t in range(STEPS):
        updates, state = update([_grad(p, jnp.asarray(n)) for p, n in zip(params, noise[t])], state, params)
        params = adaptlr.apply_updates(params, updates)
    tol = F64_TOL if dtype == "float64" else F32_TOL
    assert err(params, want_params, dtype) <= tol

    params = [jnp.asarray(p) for p in params0]
    state = opt.init(params)
    for t in range(STEPS):
        params, state = step([_grad(p, jnp.asarray(n)) for p, n in zip(params, noise[t])], state, params)
    assert err(params, want_params, dtype) <= tol
    import optree

    for g, w in zip(optree.tree_leaves(state), optree.tree_leaves(want_state)):
        if np.issubdtype(np.asarray(w).dtype, np.floating):
            assert err([g], [w], dtype) <= tol


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize("helper", ["jit_step", "jit_update"])
def test_jitted_steps_return_the_learning_rates(helper: str) -> None:
    """A float rate's leaves are left out of the jitted outputs and the input ones put back; a
    schedule's new rates come out of the step (the state's ``learning_rate`` is ``α_t`` either way)."""
    import jax
    import jax.numpy as jnp

    for learning_rate, want in ((0.05, 0.05), (lambda t: 0.1 / t, 0.1 / 3)):
        opt = adaptlr.adam(learning_rate)
        params = [jnp.ones((3,), dtype=jnp.float32), jnp.ones((2, 2), dtype=jnp.float32)]
        state = opt.init(params)
        run = (jit_step if helper == "jit_step" else jit_update)(opt)
        for _ in range(3):
            before = state.learning_rate
            first, state = run([jnp.full_like(p, 0.5) for p in params], state, params)
            params = first if helper == "jit_step" else adaptlr.apply_updates(params, first)
        assert isinstance(state.learning_rate, list) and len(state.learning_rate) == 2
        assert all(float(a) == pytest.approx(want, rel=1e-6) for a in state.learning_rate)
        unchanged = all(a is b for a, b in zip(state.learning_rate, before))
        assert unchanged == (not callable(learning_rate))  # the float's leaves are the input's
        assert all(not leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state))


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize("name", ["adamw", "sgd", "dsa"])
@pytest.mark.parametrize("helper", ["jit_step", "jit_update"])
def test_donated_jitted_steps_write_each_buffer_in_place(name: str, helper: str) -> None:
    """With donation, each new state field (and new params) is written into its own input buffer:
    no ``copy`` in XLA's optimized HLO. Tensors of one shape repeat here, as in real models; with
    the outputs in another order than the donated inputs, JAX gave the first moments' buffers to
    the new params and XLA copied every donated buffer (AdamW: 4 elements per parameter for the
    step, 2 for the update; DSA 6 and 4)."""
    from adaptlr.backends.xla_copies import copies_per_computation

    hlo, _ = _donated_hlo(name, helper)
    assert "input_output_alias" in hlo  # the buffers are donated
    assert copies_per_computation(hlo, "f32") == {}


def _donated_hlo(name: str, helper: str) -> tuple[str, int]:
    """The optimized HLO of ``make(name)``'s donated jitted step (``helper``: ``jit_step`` or
    ``jit_update``) on 6 tensors of one shape and two others, and the number of parameters."""
    import jax.numpy as jnp

    opt = make(name)
    shapes = [(8, 16)] * 6 + [(16,), (4, 8, 16)]
    params = [jnp.full(s, 0.5 + k / 10, dtype=jnp.float32) for k, s in enumerate(shapes)]
    grads = [jnp.full(s, 0.1 - k / 100, dtype=jnp.float32) for k, s in enumerate(shapes)]
    run = jit_step(opt, donate=True) if helper == "jit_step" else jit_update(opt, donate_state=True)
    return run.compile(grads, opt.init(params), params).as_text(), sum(math.prod(s) for s in shapes)


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize(("name", "most"), [("hd_global", 0.0), ("hd_tensor", 0.0), ("hd_element", 0.0),
                                            ("eg_global", 0.0), ("eg_tensor", 0.0), ("dadapt_adam", 0.0),
                                            ("dadapt_sgd", 0.0)])
@pytest.mark.parametrize("helper", ["jit_step", "jit_update"])
def test_donated_steps_read_the_old_state_before_writing_it(name: str, most: float, helper: str) -> None:
    """HD's ``Σ g ⊙ d_{t-1}``, EG's ``⟨v_{t-1}, g⟩`` and D-Adaptation's ``⟨g, s_{t-1}⟩`` read old state
    that the step overwrites; the new state did not depend on those sums, so XLA copied each such
    buffer (f32 elements copied per parameter: HD 2, EG 3, D-Adapt Adam 2, D-Adapt SGD 1).
    ``adaptlr._ordering`` makes the new state wait for the sums (HD's rate per element: through its
    first element, 2 copies before round 23); and EG's new gradient average wait for its gains,
    which read the old average in another loop (one copy left before round 23)."""
    from adaptlr.backends.xla_copies import copies_per_computation

    hlo, n = _donated_hlo(name, helper)
    assert "input_output_alias" in hlo  # the buffers are donated
    assert sum(elements for _, elements in copies_per_computation(hlo, "f32").values()) / n <= most


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize("name", ["adamw", "hd_global", "hd_element", "eg_global"])
def test_donated_steps_keep_no_tensor_sized_temporaries(name: str) -> None:
    """XLA's temporaries of a donated step, below 5 % of the largest tensor: HD keeps the base
    direction in its state and its update reads it too, and Adam's direction divided last is
    written once (multiplied last, XLA repeated the product in both loops and kept the quotient,
    1.98 × the largest tensor on ResNet-18 shapes; per element 3.62 ×); EG's average read by its
    gains (4.95 ×) (round 23)."""
    import jax.numpy as jnp

    opt = make(name)
    shapes = [(256, 256), (256, 256), (128, 64), (64,)]
    params = [jnp.full(s, 0.5 + k / 10, dtype=jnp.float32) for k, s in enumerate(shapes)]
    grads = [jnp.full(s, 0.1 - k / 100, dtype=jnp.float32) for k, s in enumerate(shapes)]
    compiled = jit_step(opt, donate=True).compile(grads, opt.init(params), params)
    assert compiled.memory_analysis().temp_size_in_bytes <= 0.05 * 4 * 256 * 256


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize("name", ["dadapt_sgd", "prodigy", "dog", "hd_global"])
@pytest.mark.parametrize("helper", ["jit_step", "jit_update"])
def test_undonated_jitted_steps_return_unchanged_state_without_copying(name: str, helper: str) -> None:
    """Without donation, a state leaf the step returns unchanged (D-Adapt SGD's, Prodigy's and
    DoG's initial parameters) was an XLA copy of its input every step (2 words per parameter; JAX
    does not forward it). The jitted steps leave such leaves out and return the input's array; the
    steps agree with the pure update (float64)."""
    import jax.numpy as jnp
    import optree

    from adaptlr.backends.xla_copies import copies_per_computation

    opt = make(name)
    want_params, want_state = pure_run(opt, "float64")
    params0, noise = _problem("float64")
    run = jit_step(opt, donate=False) if helper == "jit_step" else jit_update(opt, donate_state=False)
    params = [jnp.asarray(p) for p in params0]
    state = opt.init(params)
    hlo = run.compile(params, state, params).as_text()
    assert copies_per_computation(hlo, "f64") == {}
    for t in range(STEPS):
        grads = [_grad(p, jnp.asarray(n)) for p, n in zip(params, noise[t])]
        before = state
        if helper == "jit_step":
            params, state = run(grads, state, params)
        else:
            updates, state = run(grads, state, params)
            params = adaptlr.apply_updates(params, updates)
        parts = (before.base, before.adaptations), (state.base, state.adaptations)  # (rates: not here)
        kept = {id(x) for x in optree.tree_leaves(parts[0])} & {id(x) for x in optree.tree_leaves(parts[1])}
        assert bool(kept) == (name != "hd_global")  # the unchanged leaves are the input's own arrays
    assert err(params, want_params, "float64") <= F64_TOL
    assert optree.tree_structure(state) == optree.tree_structure(want_state)
    for g, w in zip(optree.tree_leaves(state), optree.tree_leaves(want_state)):
        if np.issubdtype(np.asarray(w).dtype, np.floating):
            assert err([g], [w], "float64") <= F64_TOL


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
def test_jit_helpers_reject_non_optimizers() -> None:
    with pytest.raises(TypeError, match="opt"):
        jit_update(lambda g: g)
    with pytest.raises(TypeError, match="opt"):
        jit_step(None)


def test_recommended_options() -> None:
    from adaptlr.backends.fast import recommended_options

    assert recommended_options(adaptlr.adamw(), [np.zeros(3)]) == {"block_size": 1 << 15}
    if getattr(adaptlr, "eg_step_size", None) is not None:
        tensor_scale = adaptlr.eg_step_size(adaptlr.sgd(0.1), scale_lr=0.1, gain_lr=0.1, scale="tensor")
        assert recommended_options(tensor_scale, [np.zeros(3)]) is None


def test_recommended_options_cpu_by_model_size() -> None:
    torch = pytest.importorskip("torch")
    from adaptlr.backends.fast import _CPU_FLAT_BYTES_LIMIT, recommended_options

    global_sums = adaptlr.mechanic(adaptlr.adamw())  # flat-safe, sums every step after the inner update
    early_sums = adaptlr.hypergradient(adaptlr.adamw(), hyper_lr=1e-3)  # sums before the base direction
    rare_sums = adaptlr.autodrop(adaptlr.adamw(), steps_per_epoch=10)  # sums at epoch boundaries only
    small = [torch.zeros(2048) for _ in range(4)]
    assert recommended_options(adaptlr.adamw(), small) == {"block_size": 1 << 17}
    assert recommended_options(rare_sums, small) == {}  # whole buffers beat blocks with sums (small500)
    assert recommended_options(global_sums, small) == {}
    assert recommended_options(global_sums, [np.zeros(2048)] * 4) == {}
    assert recommended_options(rare_sums, [np.zeros(2048)] * 4) == {}
    # A model above the flat limit: larger blocks, and the per-tensor path for sums on every step.
    # Blocks of at most 1/9 of the largest tensor: 2M elements -> 224K (a multiple of 16K).
    large = [torch.empty(_CPU_FLAT_BYTES_LIMIT // 8) for _ in range(3)]  # 1.5x the limit in float32
    ninth = 14 << 14
    assert recommended_options(adaptlr.adamw(), large) == {"block_size": ninth}
    assert recommended_options(rare_sums, large) == {"block_size": ninth}
    assert recommended_options(early_sums, large) == {"block_size": ninth}
    assert recommended_options(early_sums, small) == {}
    # learning-rate-free bases (sums in the base only): blocks in two passes on torch
    for lr_free in (adaptlr.prodigy(), adaptlr.dadapt_adam(), adaptlr.dadapt_sgd(), adaptlr.dog(), adaptlr.dowg()):
        assert recommended_options(lr_free, large) == {"block_size": ninth}, lr_free.name
        assert recommended_options(lr_free, [t.numpy() for t in large]) is None, lr_free.name  # not measured
    assert recommended_options(adaptlr.dog(layerwise=True), large) is None  # per-tensor sums: not flat
    assert recommended_options(adaptlr.active(adaptlr.prodigy(), steps_per_epoch=10), large) == {"block_size": ninth}
    assert recommended_options(adaptlr.autodrop(adaptlr.prodigy(), steps_per_epoch=10), large) is None  # two summers
    assert recommended_options(global_sums, large) is None
    # NumPy: blocks of at most 1/11 of the largest tensor (NUMPY_BLOCK_LIVE_TEMPORARIES): 176K.
    assert recommended_options(adaptlr.adamw(), [t.numpy() for t in large]) == {"block_size": 11 << 14}
    assert recommended_options(global_sums, [t.numpy() for t in large]) is None
    # The limit counts bytes: the same element count in float64 crosses it sooner.
    assert recommended_options(adaptlr.adamw(), [torch.empty(_CPU_FLAT_BYTES_LIMIT // 6, dtype=torch.float64)]) \
        == {"block_size": 1 << 18}  # 2.8M elements / 9 = 311K -> 256K, the cap


def test_cpu_block_size_keeps_the_temporaries_within_the_largest_tensor() -> None:
    from adaptlr.backends.bench import RESNET18_SHAPES
    from adaptlr.backends.fast import CPU_BLOCK_LIVE_TEMPORARIES, cpu_block_size

    largest = max(math.prod(s) for s in RESNET18_SHAPES)
    assert cpu_block_size(largest) == 1 << 18  # 256K: 9 of them fit in the largest tensor (2,359,296)
    assert cpu_block_size(1024 * 288) == 1 << 15  # 32K: 9 of them fit, 64K would not
    assert cpu_block_size(1 << 30) == 1 << 18  # capped at the fastest measured size
    assert cpu_block_size(1000) == 1 << 14  # at least 16K: below that the per-operation cost dominates
    for n in (1 << 20, 3_000_000, 5_000_001):
        block = cpu_block_size(n)
        assert block % (1 << 14) == 0 and block * CPU_BLOCK_LIVE_TEMPORARIES <= n


def test_blocked_torch_steps_keep_at_most_the_bounded_number_of_block_temporaries() -> None:
    """The bound behind :func:`cpu_block_size`: every registered algorithm that takes blocks on a
    large CPU model keeps at most ``CPU_BLOCK_LIVE_TEMPORARIES`` block-sized temporaries alive in a
    step, ordinary or at an epoch boundary (the bench's peak counter, float32)."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.bench import _torch_peak_mode
    from adaptlr.backends.fast import CPU_BLOCK_LIVE_TEMPORARIES
    from adaptlr.backends.torch import Optimizer as TorchOptimizer
    from adaptlr.conformance.algorithms import ALGORITHMS as REGISTRY
    from adaptlr.conformance.algorithms import S

    block = 1 << 12
    ordinary, worst = {}, {}
    for name, entry in REGISTRY.items():
        if entry.missing() or not blocks_on_a_large_cpu_model(entry.build()):
            continue
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((96, 64), (5000,), (2, 3000))]
        opt = TorchOptimizer(params, entry.build(), fast={"block_size": block})
        peaks = []
        for k in range(S + 2):  # steps 2..S+2: one epoch boundary; the first step allocates the state
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            counter = _torch_peak_mode(torch)
            with counter if k else contextlib.nullcontext():
                opt.step()
            if k:
                peaks.append(counter.peak / (block * 4))
        assert opt.fast_path == "blocked", name
        ordinary[name], worst[name] = float(np.median(peaks)), max(peaks)
    assert len(ordinary) >= 20, ordinary
    assert ordinary["adamw"] >= 3 and worst["active(adamw)"] > ordinary["active(adamw)"]  # the counter counts
    over = {n: b for n, b in worst.items() if b > CPU_BLOCK_LIVE_TEMPORARIES + 0.1}  # 0.1: the 0-D scalars
    assert not over, f"steps with more block temporaries alive than CPU_BLOCK_LIVE_TEMPORARIES: {over}"


def test_blocked_numpy_steps_keep_at_most_the_bounded_number_of_block_temporaries() -> None:
    """The bound behind NumPy's :func:`cpu_block_size`: every registered algorithm that NumPy's
    :class:`FlatOptimizer` steps in blocks keeps at most ``NUMPY_BLOCK_LIVE_TEMPORARIES`` block-sized
    temporaries alive in a step, ordinary or at an epoch boundary (tracemalloc, the bench's counter)."""
    from adaptlr.backends.bench import _tracemalloc_peak
    from adaptlr.backends.fast import NUMPY_BLOCK_LIVE_TEMPORARIES, FlatOptimizer, flat_safety, sums_replayable
    from adaptlr.conformance.algorithms import ALGORITHMS as REGISTRY
    from adaptlr.conformance.algorithms import S

    block = 1 << 15
    shapes = ((96, 320), (25_000,), (2, 15_000))
    ordinary, worst = {}, {}
    for name, entry in REGISTRY.items():
        opt = None if entry.missing() else entry.build()
        if opt is None or not (flat_safety(opt)[1] or sums_replayable(opt)):
            continue
        rng = np.random.default_rng(0)
        flat = FlatOptimizer(opt, [rng.standard_normal(s).astype(np.float32) for s in shapes], block_size=block)
        assert flat.mode == "blocked", name
        peaks = []
        for k in range(S + 2):  # steps 2..S+2: one epoch boundary; the first step allocates the state
            grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            if k:
                peaks.append(_tracemalloc_peak(lambda f=flat, g=grads: f.step(g)) / (block * 4))
            else:
                flat.step(grads)
        ordinary[name], worst[name] = float(np.median(peaks)), max(peaks)
    assert len(ordinary) >= 20, ordinary
    assert ordinary["adamw"] >= 3 and worst["active(adamw)"] > ordinary["active(adamw)"]  # the counter counts
    over = {n: b for n, b in worst.items() if b > NUMPY_BLOCK_LIVE_TEMPORARIES}
    assert not over, f"steps with more block temporaries alive than NUMPY_BLOCK_LIVE_TEMPORARIES: {over}"


# -- the benchmark command (a tiny run: it reports, it asserts nothing about speed) ------------------


def test_bench_shapes_and_tiny_run(tmp_path, monkeypatch) -> None:
    import json

    from adaptlr.backends import bench

    assert len(bench.RESNET18_SHAPES) == 62
    assert sum(int(np.prod(s)) for s in bench.RESNET18_SHAPES) == 11_689_512
    monkeypatch.setitem(bench.SETS, "tiny", [(8, 4), (16,), (3, 3, 2, 2)])
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    code = bench.main(["--backends", "numpy", "--algorithms", "adamw,active", "--sets", "tiny", "--repeats", "2",
                       "--json", str(out), "--markdown", str(md)])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    paths = {(r["algorithm"], r["path"]) for r in rows}
    assert {("adamw", "pure"), ("adamw", "flat"), ("adamw", "blocked"), ("copy", "bound")} <= paths
    assert all(r["median_ms"] > 0 for r in rows)
    assert "| set |" in md.read_text()
    with pytest.raises(SystemExit):
        bench.main(["--backends", "fortran"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc/self/statm")
def test_bench_hands_the_freed_heap_back_to_the_os_between_groups() -> None:
    import os

    from adaptlr.backends.bench import release_freed_memory

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    pieces = [bytearray(60_000) for _ in range(5000)]  # 300 MB in pieces glibc serves from its heap
    last = pieces[-1]  # kept: the heap's top stays in use, so free() alone returns nothing
    del pieces
    before = resident_mb()
    release_freed_memory()
    assert resident_mb() < before - 200, (before, resident_mb())
    assert len(last) == 60_000


@pytest.mark.parametrize("name", ["adamw", "autodrop"])
def test_bucket_bytes_splits_buffers_and_agrees(name: str) -> None:
    opt = make(name)
    whole = flat_run(opt, "float64")
    split = flat_run(opt, "float64", bucket_bytes=8 * 10)  # at most 10 float64 per buffer (unless one is larger)
    assert len(split._buckets) > len(whole._buckets) == 1
    assert all(b.size * 8 <= 80 or len(b.members) == 1 for b in split._buckets)
    check(split, opt, "float64")
    with pytest.raises(ValueError, match="bucket_bytes"):
        FlatOptimizer(opt, [np.zeros(3)], bucket_bytes=0)
