"""The torch adapter's fused Prodigy step (``fast="fused"``, the CPU default above 16 MiB;
:mod:`adaptlr.backends.torch_fused_prodigy`, issue 18 item 6).

Float64: against ``prodigyopt.Prodigy`` 1.1.2 on the upstream problem (200 steps, ≤ 1e-12, as
``test_prodigy.py``) and against the adapter's list path. Float32: against the list path within
the suite's rule (:func:`adaptlr.conformance.tolerances.tolerance`). Blocks and partial sums are made
small here so that every tensor of the problem is cut into several blocks with a remainder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import max_rel_err
from lr_free_problem import STEPS, max_err_over_steps, problem
from test_prodigy import CASES, TOL, _reference, _upstream_kwargs

import adaptlr
from adaptlr.conformance.tolerances import tolerance

torch = pytest.importorskip("torch", reason="the fused step is the torch adapter's")
prodigyopt = pytest.importorskip("prodigyopt", reason="prodigyopt==1.1.2 is the reference (pip install prodigyopt)")

from adaptlr.backends import torch_fused_prodigy  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402

FUSED = [c for c in CASES if CASES[c].get("slice_p", 1) == 1 and CASES[c].get("b1", 0.9) > 0]
NOT_FUSED = [c for c in CASES if c not in FUSED]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 5 elements and partial sums of 2: the problem's tensors (up to 12 elements) in
    several blocks, the last one shorter, and partial sums with a remainder."""
    monkeypatch.setattr(torch_fused_prodigy, "BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(torch_fused_prodigy, "ROW", 2)


def _adapter_run(kwargs: dict, fast, dtype=torch.float64, steps: int = STEPS, groups=None, grads_of=None):
    """``(trajectory, d after each step, the paths taken, optimizer)`` of the torch adapter."""
    init, grad = problem()
    params = [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in init]
    opt = Optimizer(groups(params) if groups else params, adaptlr.prodigy(**kwargs), fast=fast)
    trajectory, ds, paths = [], [], set()
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, grad([p.detach().double().numpy() for p in params], t))):
            p.grad = None if grads_of is not None and not grads_of(i, t) else torch.tensor(g, dtype=dtype)
        opt.step()
        paths.add(opt.fast_path)
        trajectory.append([p.detach().double().numpy().copy() for p in params])
        ds.append(float(opt._global["base.d"]))
    return trajectory, ds, paths, opt


@pytest.mark.parametrize("case", FUSED)
def test_fused_step_matches_prodigyopt(case):
    init, grad = problem()
    expected, expected_d = _reference(CASES[case], init, grad)
    trajectory, ds, paths, _ = _adapter_run(CASES[case], "fused")
    assert paths == {"fused"}
    worst, worst_d = max_err_over_steps(trajectory, expected), max_rel_err(ds, expected_d)
    assert worst <= TOL, f"{case}: params max relative error {worst:.3e}"
    assert worst_d <= TOL, f"{case}: d max relative error {worst_d:.3e}"


@pytest.mark.parametrize("case", NOT_FUSED)
def test_other_settings_take_the_list_path(case):
    """``slice_p > 1`` and ``β1 = 0`` are not the kernel's: the list path, the same numbers."""
    init, grad = problem()
    expected, _ = _reference(CASES[case], init, grad)
    trajectory, _, paths, _ = _adapter_run(CASES[case], "fused", steps=20)
    assert paths == {"list"}
    assert max_err_over_steps(trajectory, expected[:20]) <= TOL


@pytest.mark.parametrize("case", ["default", "decoupled-wd", "coupled-wd", "bias-correction", "safeguard-warmup"])
def test_float32_fused_step_follows_the_list_path(case):
    expected, expected_d, _, _ = _adapter_run(CASES[case], False, torch.float32)
    trajectory, ds, paths, _ = _adapter_run(CASES[case], "fused", torch.float32)
    assert paths == {"fused"}
    tol = tolerance("float32", STEPS)
    worst, worst_d = max_err_over_steps(trajectory, expected), max_rel_err(ds, expected_d)
    assert worst <= tol, f"{case}: params max relative error {worst:.3e} > {tol:.2e}"
    assert worst_d <= tol, f"{case}: d max relative error {worst_d:.3e} > {tol:.2e}"


def test_the_state_equals_the_list_paths():
    """Every state field (the moments, s, x_0, d, d_max, d̂, r, the reported rate, the counts), so the
    two paths can take turns (fast may change between steps)."""
    kwargs = {"weight_decay": 0.05, "use_bias_correction": True, "d0": 1e-3, "growth_rate": 1.05}
    *_, fused = _adapter_run(kwargs, "fused", steps=40)
    *_, listed = _adapter_run(kwargs, False, steps=40)
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


def test_gradients_storage_and_state_tensors_are_kept():
    """The caller's gradients are read, not written (the kernel's gradient is a block buffer); the
    parameters and the state tensors keep their storage."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 7), (3,), ()]]
    opt = Optimizer(params, adaptlr.prodigy(weight_decay=0.1, decouple=False), fast="fused")
    pointers = [p.data_ptr() for p in params]
    state_pointers = [opt.state[p][k].data_ptr() for p in params for k in ("base.mu", "base.nu", "base.s", "base.p0")]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        assert opt.fast_path == "fused"
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
        assert all(not torch.equal(p.detach(), b) for p, b in zip(params[:2], before))
    assert [p.data_ptr() for p in params] == pointers
    assert [opt.state[p][k].data_ptr() for p in params
            for k in ("base.mu", "base.nu", "base.s", "base.p0")] == state_pointers


def test_zero_gradients_move_nothing():
    params = [torch.nn.Parameter(torch.ones(4, 3))]
    opt = Optimizer(params, adaptlr.prodigy(weight_decay=0.1), fast="fused")
    params[0].grad = torch.zeros(4, 3)
    opt.step()
    assert opt.fast_path == "fused"
    assert torch.equal(params[0].detach(), torch.ones(4, 3))
    assert float(opt._global["base.d"]) == 1e-6 and float(opt._global["base.numerator"]) == 0.0
    assert torch.isfinite(opt.state[params[0]]["base.mu"]).all()


def test_tensors_the_kernel_cannot_take_take_another_path():
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
    # a wrapper around Prodigy, or a state dtype of its own: not the kernel's either
    params = [torch.nn.Parameter(torch.randn(3))]
    for opt in (Optimizer(params, adaptlr.skip_nonfinite(adaptlr.prodigy()), fast="fused"),
                Optimizer(params, adaptlr.prodigy(), fast="fused", state_dtype=torch.float64)):
        params[0].grad = torch.randn(3)
        opt.step()
        assert opt.fast_path == "list"


def test_auto_takes_the_fused_step_above_16_mib_only(monkeypatch):
    monkeypatch.setattr(torch_fused_prodigy, "BLOCK_ELEMENTS", 1 << 18)
    monkeypatch.setattr(torch_fused_prodigy, "ROW", 256)
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


def test_wide_sum_adds_partial_sums_in_float64(monkeypatch):
    """Partial sums of ROW elements in float32, added in float64: within log2(ROW)·ε32·Σ|x| of the
    exact sum, whatever the length."""
    monkeypatch.setattr(torch_fused_prodigy, "ROW", 256)
    generator = torch.Generator().manual_seed(0)
    for n in (1, 255, 256, 1000, 262_144 + 17):
        x = torch.randn(n, generator=generator) + 0.25
        exact = math.fsum(x.double().tolist())
        got = torch_fused_prodigy.wide_sum(x, torch.float64)
        assert got.dtype == torch.float64
        bound = math.log2(256) * float(torch.finfo(torch.float32).eps) * float(x.abs().double().sum())
        assert abs(float(got) - exact) <= bound
    x64 = torch.randn(1000, dtype=torch.float64, generator=generator)
    assert float(torch_fused_prodigy.wide_sum(x64, torch.float64)) == pytest.approx(math.fsum(x64.tolist()), abs=1e-12)
