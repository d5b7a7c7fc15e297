"""The torch adapter's CPU steps of the learning-rate-free bases written for torch (``fast="fused"``,
the CPU default above 16 MiB; :mod:`adaptlr.backends.torch_lr_free`, issue 18 item 6).

Float64: against the upstream PyTorch optimizers (``prodigyopt``, ``dadaptation``, ``dog_optimizer``)
and ``optax.contrib.dowg`` on the upstream problem (200 steps, ≤ 1e-12, as ``test_prodigy.py``,
``test_dadapt.py`` and ``test_dog.py``) and against the adapter's list path. Float32: against the
list path within the suite's rule (:func:`adaptlr.conformance.tolerances.tolerance`). Blocks and
partial sums are made small here so that every tensor of the problem is cut into several blocks
with a remainder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import max_rel_err
from lr_free_problem import STEPS, max_err_over_steps, problem
from test_dadapt import ADAM_CASES, SGD_CASES, _dadapt_reference
from test_dog import DOG_CASES, OPTAX_DOWG_CASES, _dog_reference
from test_dog import _optax_reference as _optax_dowg_reference
from test_prodigy import CASES, TOL, _reference, _upstream_kwargs

import adaptlr
from adaptlr.conformance.tolerances import tolerance

torch = pytest.importorskip("torch", reason="the fused steps are the torch adapter's")
prodigyopt = pytest.importorskip("prodigyopt", reason="prodigyopt==1.1.2 is the reference (pip install prodigyopt)")

from adaptlr.backends import torch_block_sums  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402

FUSED = [c for c in CASES if CASES[c].get("slice_p", 1) == 1 and CASES[c].get("b1", 0.9) > 0]
NOT_FUSED = [c for c in CASES if c not in FUSED]
MAKERS = {"prodigy": adaptlr.prodigy, "dadapt_adam": adaptlr.dadapt_adam, "dadapt_sgd": adaptlr.dadapt_sgd,
          "dog": adaptlr.dog, "dowg": adaptlr.dowg}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 5 elements and partial sums of 2: the problem's tensors (up to 12 elements) in
    several blocks, the last one shorter, and partial sums with a remainder."""
    monkeypatch.setattr(torch_block_sums, "BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(torch_block_sums, "ROW", 2)


def _adapter_run(kwargs: dict, fast, dtype=torch.float64, steps: int = STEPS, groups=None, grads_of=None,
                 make=adaptlr.prodigy, grad=None):
    """``(trajectory, the estimate after each step, the paths taken, optimizer)`` of the torch
    adapter: the estimate is ``d`` (Prodigy, D-Adaptation) or the rate ``α·η`` (DoG, DoWG)."""
    init, problem_grad = problem()
    grad = grad or problem_grad
    params = [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in init]
    opt = Optimizer(groups(params) if groups else params, make(**kwargs), fast=fast)
    trajectory, estimates, paths = [], [], set()
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, grad([p.detach().double().numpy() for p in params], t))):
            p.grad = None if grads_of is not None and not grads_of(i, t) else torch.tensor(g, dtype=dtype)
        opt.step()
        paths.add(opt.fast_path)
        trajectory.append([p.detach().double().numpy().copy() for p in params])
        estimates.append(float(opt._global["base.d"]) if "base.d" in opt._global
                         else float(adaptlr.learning_rates(opt.functional_state)[0]))
    return trajectory, estimates, paths, opt


def _check(name: str, trajectory, estimates, expected, expected_estimates, tol: float = TOL) -> None:
    worst, worst_estimate = max_err_over_steps(trajectory, expected), max_rel_err(estimates, expected_estimates)
    assert worst <= tol, f"{name}: params max relative error {worst:.3e} > {tol:.2e}"
    assert worst_estimate <= tol, f"{name}: estimate max relative error {worst_estimate:.3e} > {tol:.2e}"


@pytest.mark.parametrize("case", FUSED)
def test_prodigy_matches_prodigyopt(case):
    init, grad = problem()
    expected, expected_d = _reference(CASES[case], init, grad)
    trajectory, ds, paths, _ = _adapter_run(CASES[case], "fused")
    assert paths == {"fused"}
    _check(case, trajectory, ds, expected, expected_d)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_dadapt_matches_dadaptation(name):
    for case, kwargs in (ADAM_CASES if name == "adam" else SGD_CASES).items():
        init, grad = problem()
        expected, expected_d = _dadapt_reference(name, kwargs, init, grad)
        make = adaptlr.dadapt_adam if name == "adam" else adaptlr.dadapt_sgd
        trajectory, ds, paths, _ = _adapter_run(kwargs, "fused", make=make)
        assert paths == {"fused"}
        _check(f"{name} {case}", trajectory, ds, expected, expected_d)


def test_dadapt_sgd_after_all_zero_gradients_matches_dadaptation_from_the_first_nonzero():
    """Nothing moves while the raw gradients are zero (the step where nothing moved), then upstream's
    run started there (as test_dadapt.py's test of the array-API step)."""
    kwargs, zeros = SGD_CASES["momentum-wd"], 2
    init, grad = problem()
    expected, expected_d = _dadapt_reference("sgd", kwargs, init, grad)

    def late_grad(params, t):
        return [np.zeros_like(p) for p in params] if t < zeros else grad(params, t - zeros)

    trajectory, ds, paths, _ = _adapter_run(kwargs, "fused", make=adaptlr.dadapt_sgd, grad=late_grad)
    assert paths == {"fused"}
    for t in range(zeros):
        assert max_rel_err(trajectory[t], init) == 0.0 and ds[t] == kwargs["d0"]
    _check("sgd after zeros", trajectory[zeros:], ds[zeros:], expected[:-zeros], expected_d[:-zeros])


@pytest.mark.parametrize("case", [c for c in DOG_CASES if not DOG_CASES[c].get("layerwise")])
def test_dog_matches_dog_optimizer(case):
    init, grad = problem()
    expected, expected_eta = _dog_reference(DOG_CASES[case], init, grad)
    trajectory, etas, paths, _ = _adapter_run(DOG_CASES[case], "fused", make=adaptlr.dog)
    assert paths == {"fused"}
    _check(case, trajectory, etas, expected, [e[0] for e in expected_eta])


@pytest.mark.parametrize("case", list(OPTAX_DOWG_CASES))
def test_dowg_matches_optax(case):
    optax = pytest.importorskip("optax")
    ours, theirs = OPTAX_DOWG_CASES[case]
    init, grad = problem()
    expected = _optax_dowg_reference(optax.contrib.dowg(**theirs), init, grad)
    trajectory, _, paths, _ = _adapter_run(ours, "fused", make=adaptlr.dowg)
    assert paths == {"fused"}
    worst = max_err_over_steps(trajectory, expected)
    assert worst <= TOL, f"{case}: params max relative error {worst:.3e}"


@pytest.mark.parametrize("case", NOT_FUSED)
def test_other_prodigy_settings_take_the_list_path(case):
    """``slice_p > 1`` and ``β1 = 0`` are not the kernel's: the list path, the same numbers."""
    init, grad = problem()
    expected, _ = _reference(CASES[case], init, grad)
    trajectory, _, paths, _ = _adapter_run(CASES[case], "fused", steps=20)
    assert paths == {"list"}
    assert max_err_over_steps(trajectory, expected[:20]) <= TOL


FLOAT32_CASES = [
    *((adaptlr.prodigy, CASES[c]) for c in ("default", "decoupled-wd", "coupled-wd", "bias-correction",
                                            "safeguard-warmup")),
    *((adaptlr.dadapt_adam, ADAM_CASES[c]) for c in ("default", "coupled-wd", "all")),
    *((adaptlr.dadapt_sgd, SGD_CASES[c]) for c in ("default", "momentum-wd")),
    *((adaptlr.dog, DOG_CASES[c]) for c in ("dog-default", "dog-reps-1e-4-wd", "dog-init-eta-lr")),
    *((adaptlr.dowg, ours) for ours, _ in OPTAX_DOWG_CASES.values()),
]


@pytest.mark.parametrize(("make", "kwargs"), FLOAT32_CASES)
def test_float32_steps_follow_the_list_path(make, kwargs):
    expected, expected_estimates, _, _ = _adapter_run(kwargs, False, torch.float32, make=make)
    trajectory, estimates, paths, _ = _adapter_run(kwargs, "fused", torch.float32, make=make)
    assert paths == {"fused"}
    _check(f"{make.__name__} {kwargs}", trajectory, estimates, expected, expected_estimates,
           tolerance("float32", STEPS))


STATE_CASES = {"prodigy": {"weight_decay": 0.05, "use_bias_correction": True, "d0": 1e-3, "growth_rate": 1.05},
               "dadapt_adam": {"weight_decay": 0.05, "use_bias_correction": True, "d0": 1e-3},
               "dadapt_sgd": {"weight_decay": 0.05, "momentum": 0.9, "d0": 1e-3},
               "dog": {"weight_decay": 0.05}, "dowg": {"weight_decay": 0.05}}


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_the_state_equals_the_list_paths(name):
    """Every state field (the moments, s, x_0, d and the other estimates, r, ‖g_1‖, the reported
    rate, the counts), so the two paths can take turns (fast may change between steps)."""
    kwargs, make = STATE_CASES[name], MAKERS[name]
    *_, fused = _adapter_run(kwargs, "fused", steps=40, make=make)
    *_, listed = _adapter_run(kwargs, False, steps=40, make=make)
    a, b = fused.functional_state, listed.functional_state
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert max_rel_err(x, y) <= TOL
    assert adaptlr.learning_rates(a)[0] == pytest.approx(float(adaptlr.learning_rates(b)[0]), rel=TOL)


def _leaves(state) -> list:
    import optree

    return [np.asarray(t.detach()) for t in optree.tree_leaves(state)]


def test_switching_paths_between_steps_gives_the_same_run():
    kwargs = {"weight_decay": 0.1, "d0": 1e-3}
    init, grad = problem()
    expected, expected_d = _reference(kwargs, init, grad)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in init]
    opt = Optimizer(params, adaptlr.prodigy(**kwargs), fast="fused")
    for t in range(60):
        opt.fast = ("fused", False, "flat")[t // 20]
        for p, g in zip(params, grad([p.detach().numpy() for p in params], t)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        assert max_rel_err([p.detach().numpy() for p in params], expected[t]) <= TOL
    assert float(opt.functional_state.base.d) == pytest.approx(expected_d[59], rel=TOL)


def test_groups_with_their_own_lr_and_weight_decay_follow_the_list_path():
    """α per group (the sums' weight takes the largest, the update each group's), λ per group, both
    decay modes."""
    for decouple in (True, False):
        kwargs = {"d0": 1e-3, "decouple": decouple}

        def groups(params):
            return [{"params": params[:2], "lr": 0.5, "weight_decay": 0.1},
                    {"params": params[2:], "weight_decay": 0.02}]

        expected, expected_d, _, _ = _adapter_run(kwargs, False, steps=60, groups=groups)
        trajectory, ds, paths, _ = _adapter_run(kwargs, "fused", steps=60, groups=groups)
        assert paths == {"fused"}
        assert max_err_over_steps(trajectory, expected) <= TOL
        assert max_rel_err(ds, expected_d) <= TOL


def test_a_parameter_without_a_gradient_is_skipped_as_prodigyopt_skips_it():
    kwargs = {"d0": 1e-3, "use_bias_correction": True, "weight_decay": 0.01}
    init, grad = problem()
    theirs = [torch.tensor(p, dtype=torch.float64) for p in init]
    reference = prodigyopt.Prodigy(theirs, **_upstream_kwargs(kwargs))
    trajectory, ds, paths, _ = _adapter_run(kwargs, "fused", steps=40, grads_of=lambda i, t: not (i == 1 and t < 5))
    for t in range(40):
        for i, (p, g) in enumerate(zip(theirs, grad([p.numpy() for p in theirs], t))):
            p.grad = None if (i == 1 and t < 5) else torch.tensor(g, dtype=torch.float64)
        reference.step()
        assert max_rel_err(trajectory[t], [p.numpy() for p in theirs]) <= TOL
    assert paths == {"fused"}
    assert ds[-1] == pytest.approx(reference.param_groups[0]["d"], rel=TOL)


def test_a_scheduler_sets_the_rate_of_the_fused_step():
    init, grad = problem()

    def run(fast):
        params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in init]
        opt = Optimizer(params, adaptlr.prodigy(d0=1e-3), fast=fast)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        for t in range(40):
            for p, g in zip(params, grad([p.detach().numpy() for p in params], t)):
                p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
            scheduler.step()
        return [p.detach().numpy() for p in params], opt

    (got, fused), (expected, _) = run("fused"), run(False)
    assert fused.fast_path == "fused"
    assert max_rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", list(MAKERS))
def test_gradients_storage_and_state_tensors_are_kept(name):
    """The caller's gradients are read, not written (the kernel's gradient is a block buffer); the
    parameters and the state tensors keep their storage."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 7), (3,), ()]]
    opt = Optimizer(params, MAKERS[name](weight_decay=0.1), fast="fused")
    pointers = [p.data_ptr() for p in params]
    state_pointers = [t.data_ptr() for p in params for t in opt.state[p].values() if t.ndim]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        assert opt.fast_path == "fused"
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
        assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert [p.data_ptr() for p in params] == pointers
    assert [t.data_ptr() for p in params for t in opt.state[p].values() if t.ndim] == state_pointers


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam", "dadapt_sgd"])
def test_zero_gradients_move_nothing(name):
    params = [torch.nn.Parameter(torch.ones(4, 3))]
    opt = Optimizer(params, MAKERS[name](), fast="fused")
    params[0].grad = torch.zeros(4, 3)
    opt.step()
    assert opt.fast_path == "fused"
    assert torch.equal(params[0].detach(), torch.ones(4, 3))
    assert float(opt._global["base.d"]) == 1e-6 and float(opt._global["base.numerator"]) == 0.0
    assert all(torch.isfinite(t).all() for t in opt.state[params[0]].values())


def test_tensors_and_optimizers_the_steps_cannot_take_take_another_path():
    torch.manual_seed(0)
    cases = {
        "channels_last": [torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))],
        "mixed dtypes": [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))],
        "bfloat16": [torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))],
    }
    for name, params in cases.items():
        opt = Optimizer(params, adaptlr.prodigy(), fast="fused")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert opt.fast_path == "list", name
    # a wrapper around Prodigy, a state dtype of its own, LDoG: not these steps'
    params = [torch.nn.Parameter(torch.randn(3))]
    for opt in (Optimizer(params, adaptlr.skip_nonfinite(adaptlr.prodigy()), fast="fused"),
                Optimizer(params, adaptlr.prodigy(), fast="fused", state_dtype=torch.float64),
                Optimizer(params, adaptlr.dog(layerwise=True), fast="fused")):
        params[0].grad = torch.randn(3)
        opt.step()
        assert opt.fast_path == "list"


def test_auto_takes_the_fused_step_above_16_mib_only(monkeypatch):
    monkeypatch.setattr(torch_block_sums, "BLOCK_ELEMENTS", 1 << 18)
    monkeypatch.setattr(torch_block_sums, "ROW", 256)
    torch.manual_seed(0)
    for numel, path in ((1000, "flat"), (4_300_000, "fused")):  # 4 KB; 17.2 MB of float32
        params = [torch.nn.Parameter(torch.randn(numel)), torch.nn.Parameter(torch.randn(7))]
        listed = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt, reference = Optimizer(params, adaptlr.prodigy()), Optimizer(listed, adaptlr.prodigy(), fast=False)
        for _ in range(3):
            grads = [torch.randn_like(p) for p in params]
            for p, q, g in zip(params, listed, grads):
                p.grad, q.grad = g, g.clone()
            opt.step()
            reference.step()
        assert opt.fast_path == path
        assert max_rel_err([p.detach().numpy() for p in params], [p.detach().numpy() for p in listed]) <= \
            tolerance("float32", 3)


def test_row_sums_add_partial_sums_in_float64(monkeypatch):
    """Partial sums of ROW elements in float32, added in float64: within log2(ROW)·ε32·Σ|x| of the
    exact sum (and of the exact sum of squares), whatever the length and the blocks."""
    monkeypatch.setattr(torch_block_sums, "ROW", 256)
    generator = torch.Generator().manual_seed(0)
    eps32 = float(torch.finfo(torch.float32).eps)
    for sizes in ((1,), (255,), (256, 1000), (262_144 + 17, 3, 40_000)):
        xs = [torch.randn(n, generator=generator) + 0.25 for n in sizes]
        for squares in (False, True):
            sums = torch_block_sums.RowSums(xs, 100_000, torch.float64, squares=squares)
            for x in xs:
                for block in x.split(100_000):
                    sums.add(block)
            got = sums.total()
            terms = [float(v) for x in xs for v in (x.double() ** 2 if squares else x.double())]
            exact = math.fsum(terms)
            assert got.dtype == torch.float64
            assert abs(float(got) - exact) <= 2 * math.log2(256) * eps32 * math.fsum(abs(v) for v in terms)
    x64 = [torch.randn(1000, dtype=torch.float64, generator=generator)]
    sums = torch_block_sums.RowSums(x64, 1000, torch.float64)
    sums.add(x64[0])
    assert float(sums.total()) == pytest.approx(math.fsum(x64[0].tolist()), abs=1e-12)


FLAT_CASES = [(adaptlr.prodigy, CASES["decoupled-wd"]), (adaptlr.prodigy, CASES["bias-correction"]),
              (adaptlr.dadapt_adam, ADAM_CASES["all"]), (adaptlr.dadapt_sgd, SGD_CASES["momentum-wd"]),
              (adaptlr.dog, DOG_CASES["dog-init-eta-lr"]), (adaptlr.dowg, OPTAX_DOWG_CASES["default"][0])]


@pytest.mark.parametrize(("make", "kwargs"), FLAT_CASES)
def test_the_flat_buffers_take_the_same_step(make, kwargs, monkeypatch):
    """A small model's default (``"flat"``): the step written for torch on the flat buffers of
    :class:`~adaptlr.backends.fast.FlatOptimizer`, the state written in place; float64 against the
    list path (1e-12) over 200 steps, and every step took it."""
    from adaptlr.backends import torch_blocked_dadapt, torch_blocked_dog, torch_fused_prodigy

    calls = []
    for module in (torch_fused_prodigy, torch_blocked_dadapt, torch_blocked_dog):
        def counted(*args, original=module.step, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "step", counted)
    expected, expected_estimates, _, _ = _adapter_run(kwargs, False, make=make)
    calls.clear()
    trajectory, estimates, paths, _ = _adapter_run(kwargs, "auto", make=make)
    assert paths == {"flat"} and len(calls) == STEPS
    _check(f"{make.__name__} {kwargs}", trajectory, estimates, expected, expected_estimates)


def test_flat_optimizer_alone_takes_the_step_with_the_optimizers_own_rate():
    """:class:`~adaptlr.backends.fast.FlatOptimizer` without the adapter's overrides: α and λ from the
    optimizer, the same run as the functional API (float64)."""
    from adaptlr.backends.fast import FlatOptimizer
    from adaptlr.conformance.backends import BACKENDS

    kwargs = {"learning_rate": 0.5, "weight_decay": 0.05, "d0": 1e-3}
    init, grad = problem()
    trajectory_functional = _functional(adaptlr.prodigy(**kwargs), BACKENDS["torch"], init, grad)
    params = [torch.tensor(p, dtype=torch.float64) for p in init]
    flat = FlatOptimizer(adaptlr.prodigy(**kwargs), params)
    assert flat.mode == "flat"
    worst = 0.0
    for t in range(50):
        flat.step([torch.tensor(g) for g in grad([p.numpy() for p in flat.params], t)])
        worst = max(worst, max_rel_err([p.numpy() for p in flat.params], trajectory_functional[t]))
    assert worst <= TOL


def _functional(opt, backend, init, grad) -> list:
    from lr_free_problem import run

    trajectory, _, _ = run(opt, backend, init, grad, lambda state: None)
    return trajectory


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_on_torchs_fused_kernels_when_asked(name):
    """``fast="fused"`` runs Adam and AdamW on ``torch._fused_adam(w)_``: float64 against
    ``torch.optim`` (1e-12) with groups of their own ``lr`` and weight decay, a parameter that starts
    late (its own step count: its own bias correction) and a scheduler; float32 against
    ``torch.optim``'s ``fused=True`` within the tolerance rule (adaptlr's α is in the parameter
    dtype, torch's a Python float). ``"auto"`` keeps the array-API step."""
    make = {"adam": adaptlr.adam, "adamw": adaptlr.adamw}[name]
    reference = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    for dtype, fused_reference in ((torch.float64, False), (torch.float32, True)):
        generator = torch.Generator().manual_seed(0)
        ours = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for s in [(30, 20), (7,), ()]]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

        def groups(params):
            return [{"params": params[:1], "lr": 0.02, "weight_decay": 0.1}, {"params": params[1:]}]

        opt = Optimizer(groups(ours), make(1e-2, weight_decay=0.05), fast="fused")
        ref = reference(groups(theirs), lr=1e-2, weight_decay=0.05, fused=fused_reference)
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in (opt, ref)]
        for t in range(40):
            for i, (p, q) in enumerate(zip(ours, theirs)):
                g = None if (i == 1 and t < 5) else torch.randn(p.shape, generator=generator, dtype=dtype)
                p.grad, q.grad = g, None if g is None else g.clone()
            opt.step()
            ref.step()
            for scheduler in schedulers:
                scheduler.step()
            assert opt.fast_path == "fused"
            tol = TOL if dtype == torch.float64 else tolerance("float32", t + 1)
            assert max_rel_err([p.detach().numpy() for p in ours], [q.detach().numpy() for q in theirs]) <= tol, t
    auto = Optimizer([torch.nn.Parameter(torch.randn(5))], make())
    auto.param_groups[0]["params"][0].grad = torch.randn(5)
    auto.step()
    assert auto.fast_path != "fused"
