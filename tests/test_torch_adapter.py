"""adaptlr.backends.torch.Optimizer: same trajectory as the functional API, schedulers, groups,
skipped parameters, state_dict round-trips, mixed precision."""

from __future__ import annotations

import io

import numpy as np
import pytest

import adaptlr

torch = pytest.importorskip("torch")
from adaptlr.backends.torch import Optimizer  # noqa: E402

S = 2  # steps per epoch for the wrappers: epoch boundaries fall inside short runs


def _wrapped(name: str, base: adaptlr.Optimizer) -> adaptlr.Optimizer:
    """A wrapper around ``base`` if that adaptation exists in this checkout (else skip)."""
    makers = {
        "active": lambda: adaptlr.active(base, steps_per_epoch=S, increase=0.5),
        "autodrop": lambda: __import__("adaptlr.autodrop", fromlist=["autodrop"]).autodrop(
            base, steps_per_epoch=S, theta=30.0, theta_max=90.0, patience_epochs=1),
        "hypergradient": lambda: adaptlr.hypergradient(base, hyper_lr=1e-3),
        "eg": lambda: adaptlr.eg_step_size(base, scale_lr=0.1, gain_lr=0.1),
        "dsa": lambda: adaptlr.dsa(base, hyper_lr=0.01),
    }
    try:
        return makers[name]()
    except (AttributeError, ImportError, TypeError) as error:
        pytest.skip(f"{name} is not available here: {error}")


def _optimizers() -> list:
    return [
        ("sgd", lambda: adaptlr.sgd(0.05)),
        ("sgdm", lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
        ("adam", lambda: adaptlr.adam(1e-2, weight_decay=1e-3)),
        ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1)),
        ("radam", lambda: adaptlr.radam(1e-2)),
        ("adabelief", lambda: adaptlr.adabelief(1e-2)),
        ("active(adamw)", lambda: _wrapped("active", adaptlr.adamw(1e-2))),
        ("autodrop(sgdm)", lambda: _wrapped("autodrop", adaptlr.sgd(0.05, momentum=0.9))),
        ("hypergradient(sgd)", lambda: _wrapped("hypergradient", adaptlr.sgd(0.05))),
        ("eg(sgd)", lambda: _wrapped("eg", adaptlr.sgd(0.05))),
        ("dsa(adam)", lambda: _wrapped("dsa", adaptlr.adam(1e-2))),
    ]


def _problem(seed: int = 0, dtype=torch.float64) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype),
              torch.randn((), generator=g, dtype=dtype)]
    grads = [[torch.randn(p.shape, generator=g, dtype=dtype) for p in params] for _ in range(9)]
    return params, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def _step_both(torch_opt, torch_params, opt, params, grads, coupling=0.0, after_step=None):
    """Step the adapter and the functional API side by side; the functional params and state.

    ``coupling`` adds ``coupling·params`` to each gradient (AutoDrop and HD need gradients that
    depend on the trajectory); ``after_step()`` runs after each adapter step."""
    functional = [p.clone() for p in params]
    state = opt.init(functional)
    for step_grads in grads:
        step_grads = [g + coupling * p for g, p in zip(step_grads, functional)]
        updates, state = opt.update(step_grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        torch_opt.step()
        if after_step is not None:
            after_step()
    return functional, state


# The adapter's trajectory against the functional API, for every registered algorithm on the list
# and the default fast path: tests/test_properties.py::test_torch_adapter_matches_functional.


def test_param_groups_override_lr_and_weight_decay():
    params, grads = _problem(1)
    first = [torch.nn.Parameter(p.clone()) for p in params[:2]]
    second = [torch.nn.Parameter(params[2].clone())]
    torch_opt = Optimizer([{"params": first}, {"params": second, "lr": 0.003, "weight_decay": 0.5}],
                          adaptlr.adamw(1e-2, weight_decay=0.1))
    assert torch_opt.param_groups[0]["lr"] == 1e-2 and torch_opt.param_groups[0]["weight_decay"] == 0.1
    ref_a, ref_b = adaptlr.adamw(1e-2, weight_decay=0.1), adaptlr.adamw(0.003, weight_decay=0.5)
    fa, fb = [p.clone() for p in params[:2]], [params[2].clone()]
    sa, sb = ref_a.init(fa), ref_b.init(fb)
    for step_grads in grads:
        ua, sa = ref_a.update(step_grads[:2], sa, fa)
        ub, sb = ref_b.update(step_grads[2:], sb, fb)
        fa, fb = adaptlr.apply_updates(fa, ua), adaptlr.apply_updates(fb, ub)
        for p, g in zip(first + second, step_grads):
            p.grad = g.clone()
        torch_opt.step()
    for p, f in zip(first + second, fa + fb):
        assert torch.equal(p.detach(), f)


def _scheduled_run(make_scheduler, schedule, wrap=lambda o: o):
    """The torch adapter under a torch scheduler vs the functional API with the same α_t."""
    params, grads = _problem(2)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, wrap(adaptlr.adamw(0.1)))
    scheduler = make_scheduler(torch_opt)
    opt = wrap(adaptlr.adamw(schedule))
    functional = [p.clone() for p in params]
    state = opt.init(functional)
    lrs = []
    for step_grads in grads:
        updates, state = opt.update(step_grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        torch_opt.step()
        lrs.append(torch_opt.param_groups[0]["lr"])
        scheduler.step()
    worst = max(_rel(p.detach(), f) for p, f in zip(torch_params, functional))
    return worst, lrs, torch_opt, state


def test_step_lr_scheduler_drives_alpha():
    worst, lrs, _, _ = _scheduled_run(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda t: 0.1 * 0.5 ** ((t - 1) // 2),
    )
    assert lrs[:5] == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert worst <= 1e-12, worst


def test_lambda_lr_scheduler_with_active_keeps_multiplier_out_of_group_lr():
    def wrap(o):
        return _wrapped("active", o)

    worst, lrs, torch_opt, state = _scheduled_run(
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1.0 + epoch)),
        lambda t: 0.1 / t,
        wrap,
    )
    assert worst <= 1e-12, worst
    assert lrs == pytest.approx([0.1 / t for t in range(1, 10)], rel=1e-15)  # only the scheduler's α
    gamma = torch_opt.functional_state.adaptations[0].gamma
    assert any(bool((g != 1).any()) for g in gamma)  # γ moved, yet group["lr"] is the scheduler's
    for a, b in zip(adaptlr.learning_rates(torch_opt.functional_state), adaptlr.learning_rates(state)):
        assert _rel(torch.as_tensor(a), torch.as_tensor(b)) <= 1e-12


def test_schedule_as_base_learning_rate_is_multiplied_by_group_lr():
    params, grads = _problem(3)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, adaptlr.sgd(lambda t: 0.1 / t))
    assert torch_opt.param_groups[0]["lr"] == 1.0
    opt = adaptlr.sgd(lambda t: 0.1 / t)
    functional, _ = _step_both(torch_opt, torch_params, opt, params, grads[:3])
    for p, f in zip(torch_params, functional):
        assert torch.equal(p.detach(), f)


def test_parameters_without_grad_are_skipped():
    params, grads = _problem(4)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, adaptlr.adam(1e-2))
    alone = adaptlr.adam(1e-2)
    first = [params[0].clone()]
    state = alone.init(first)
    for t, step_grads in enumerate(grads[:4]):
        updates, state = alone.update(step_grads[:1], state, first)
        first = adaptlr.apply_updates(first, updates)
        torch_opt.zero_grad()
        for i, (p, g) in enumerate(zip(torch_params, step_grads)):
            if i == 0 or t != 2:
                p.grad = g.clone()
        if t == 2:
            before = torch_params[1].detach().clone()
            mu_before = torch_opt.state[torch_params[1]]["base.mu"].clone()
        torch_opt.step()
        if t == 2:
            assert torch.equal(torch_params[1].detach(), before)
            assert torch.equal(torch_opt.state[torch_params[1]]["base.mu"], mu_before)
    assert torch.equal(torch_params[0].detach(), first[0])  # Adam is per tensor; t is the global count
    assert int(torch_opt.functional_state.count) == 4


def _model_and_optimizer(seed: int, opt: adaptlr.Optimizer, fast="auto") -> tuple:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    torch_opt = Optimizer([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}], opt,
                          fast=fast)
    scheduler = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=3, gamma=0.5)
    return model, torch_opt, scheduler


def _train(model, torch_opt, scheduler, steps: int, start: int) -> None:
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 1, generator=g, dtype=torch.float64)

        def closure(x=x, y=y):
            torch_opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        loss = torch_opt.step(closure)
        assert loss is not None
        scheduler.step()


@pytest.mark.parametrize("which", ["adamw", "active(adamw)", "autodrop(sgdm)"])
def test_state_dict_mid_training_continues_bit_identically(which):
    make = dict(_optimizers())[which]
    model, torch_opt, scheduler = _model_and_optimizer(0, make())
    _train(model, torch_opt, scheduler, 5, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": torch_opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    _train(model, torch_opt, scheduler, 6, 5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, torch_opt2, scheduler2 = _model_and_optimizer(1, make())
    model2.load_state_dict(saved["model"])
    torch_opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    _train(model2, torch_opt2, scheduler2, 6, 5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_mismatch_is_an_error():
    model, torch_opt, scheduler = _model_and_optimizer(0, adaptlr.adamw(1e-2))
    _train(model, torch_opt, scheduler, 2, 0)
    saved = torch_opt.state_dict()
    _, other, _ = _model_and_optimizer(0, adaptlr.adam(1e-2))
    with pytest.raises(ValueError, match="adamw"):
        other.load_state_dict(saved)
    wider = torch.nn.Linear(3, 5).double()
    bad = Optimizer([{"params": wider.parameters()}, {"params": model[2].parameters()}], adaptlr.adamw(1e-2))
    with pytest.raises(ValueError, match="shape"):
        bad.load_state_dict(saved)
    with pytest.raises(ValueError, match="adaptlr"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_add_param_group_after_steps():
    params, grads = _problem(5)
    a, b = torch.nn.Parameter(params[0].clone()), torch.nn.Parameter(params[1].clone())
    torch_opt = Optimizer([a], adaptlr.adam(1e-2))
    a.grad = grads[0][0].clone()
    torch_opt.step()
    torch_opt.add_param_group({"params": [b], "lr": 0.5})
    a.grad, b.grad = grads[1][0].clone(), grads[1][1].clone()
    torch_opt.step()
    assert torch_opt.state[b]["learning_rate"].item() == 0.5
    assert int(torch_opt.functional_state.count) == 2


def test_bfloat16_params_with_float32_state():
    params, grads = _problem(6, torch.float32)
    torch_params = [torch.nn.Parameter(p.to(torch.bfloat16)) for p in params]
    torch_opt = Optimizer(torch_params, adaptlr.adamw(1e-2), state_dtype=torch.float32)
    opt = adaptlr.adamw(1e-2)
    reference = [p.detach().float() for p in torch_params]
    state = opt.init(reference)
    for step_grads in grads[:3]:
        bf16_grads = [g.to(torch.bfloat16) for g in step_grads]
        updates, state = opt.update([g.float() for g in bf16_grads], state, reference)
        expected = [(r + u).to(torch.bfloat16) for r, u in zip(reference, updates)]
        for p, g in zip(torch_params, bf16_grads):
            p.grad = g
        torch_opt.step()
        for p, e in zip(torch_params, expected):
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.detach(), e)
        reference = [p.detach().float() for p in torch_params]
    for p in torch_params:
        assert torch_opt.state[p]["base.mu"].dtype == torch.float32
    summary = adaptlr.lr_summary(torch_opt.functional_state)
    assert summary["learning_rate"]["[0]"]["max"] == pytest.approx(1e-2)


def test_bfloat16_state_by_default():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    torch_opt = Optimizer([p], adaptlr.adam(1e-2))
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    torch_opt.step()
    assert torch_opt.state[p]["base.nu"].dtype == torch.bfloat16
    assert p.dtype == torch.bfloat16


@pytest.mark.parametrize("fast", ["auto", "flat", False])
def test_hypergradient_state_never_aliases_the_gradient(fast):
    opt = _wrapped("hypergradient", adaptlr.sgd(0.1))
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch_opt = Optimizer([p], opt, fast=fast)
    p.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    torch_opt.step()
    snapshot = [t.clone() for t in torch_opt.state[p].values() if isinstance(t, torch.Tensor)]
    torch_opt.zero_grad(set_to_none=False)  # zeroes the grad in place
    p.data.add_(1.0)
    after = [t for t in torch_opt.state[p].values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_rejects_non_adaptlr_optimizer():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="opt must be an adaptlr Optimizer"):
        Optimizer([p], torch.optim.SGD([p], lr=0.1))
    with pytest.raises(TypeError, match="state_dtype"):
        Optimizer([p], adaptlr.sgd(0.1), state_dtype=torch.int32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device here")
def test_cuda_matches_cpu():
    params, grads = _problem(7)
    results = []
    for device in ("cpu", "cuda"):
        torch_params = [torch.nn.Parameter(p.clone().to(device)) for p in params]
        torch_opt = Optimizer(torch_params, _wrapped("active", adaptlr.adamw(1e-2)))
        for step_grads in grads:
            for p, g in zip(torch_params, step_grads):
                p.grad = g.to(device)
            torch_opt.step()
        assert all(t.device.type == device for s in torch_opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))
        results.append([p.detach().cpu().numpy() for p in torch_params])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12)


# -- the fast path (FlatOptimizer inside the adapter) ------------------------------------------------


def _fast_cases() -> list:
    """(name, optimizer, fast, the path a CPU step takes)."""
    return [
        ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), "auto", "blocked"),
        ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), "flat", "flat"),
        ("sgdm", lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), "auto", "blocked"),
        ("active(adamw)", lambda: _wrapped("active", adaptlr.adamw(1e-2)), "auto", "blocked"),
        ("active(adamw)", lambda: _wrapped("active", adaptlr.adamw(1e-2)), {"block_size": 5}, "blocked"),
        ("autodrop(sgdm)", lambda: _wrapped("autodrop", adaptlr.sgd(0.05, momentum=0.9)), "auto", "flat"),
        # sums at epoch boundaries only: blocks, two passes at a boundary (fast.sums_rarely)
        ("autodrop(sgdm)", lambda: _wrapped("autodrop", adaptlr.sgd(0.05, momentum=0.9)), {"block_size": 5},
         "blocked"),
        ("hypergradient(sgd)", lambda: _wrapped("hypergradient", adaptlr.sgd(0.05)), {"block_size": 5}, "blocked"),
        ("prodigy", lambda: adaptlr.prodigy(d0=1e-3, weight_decay=0.01), {"block_size": 5}, "blocked"),
        ("autodrop(sgdm)", lambda: _wrapped("autodrop", adaptlr.sgd(0.05, momentum=0.9)), "flat", "flat"),
        ("hypergradient(sgd)", lambda: _wrapped("hypergradient", adaptlr.sgd(0.05)), "flat", "flat"),
        ("dsa(adam)", lambda: _wrapped("dsa", adaptlr.adam(1e-2)), "flat", "list"),  # per-tensor factors
        ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), False, "list"),
        ("adamw", lambda: adaptlr.adamw(1e-2, weight_decay=0.1), "foreach", "foreach"),
        ("sgdm", lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), "foreach", "foreach"),
        ("active(adamw)", lambda: _wrapped("active", adaptlr.adamw(1e-2)), "foreach", "foreach"),
        ("autodrop(sgdm)", lambda: _wrapped("autodrop", adaptlr.sgd(0.05, momentum=0.9)), "foreach", "foreach"),
        ("hypergradient(sgd)", lambda: _wrapped("hypergradient", adaptlr.sgd(0.05)), "foreach", "foreach"),
        ("dsa(adam)", lambda: _wrapped("dsa", adaptlr.adam(1e-2)), "foreach", "list"),  # per-tensor factors
        # the update wrappers (issue 19) on the paths of issue 20
        ("schedule_free_adamw", lambda: adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=0.1), "flat",
         "flat"),
        ("schedule_free_adamw", lambda: adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=0.1),
         "foreach", "foreach"),
        ("schedule_free(active(adamw))", lambda: adaptlr.schedule_free(_wrapped("active", adaptlr.adamw(1e-2))),
         "foreach", "foreach"),
        ("mechanic(adamw)", lambda: adaptlr.mechanic(adaptlr.adamw(1e-2)), "flat", "flat"),
        ("mechanic(adamw)", lambda: adaptlr.mechanic(adaptlr.adamw(1e-2)), "foreach", "foreach"),
    ]


def _fast_ids() -> list:
    return [f"{name}-{fast}" for name, _, fast, _ in _fast_cases()]


def _state_err(a: adaptlr.OptimizerState, b: adaptlr.OptimizerState) -> float:
    """The largest relative difference between two states of the same structure (0 if equal)."""
    import optree

    leaves_a, leaves_b = optree.tree_leaves(a), optree.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    worst = 0.0
    for x, y in zip(leaves_a, leaves_b):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.is_floating_point():
            scale = y.abs().max().clamp_min(1e-300)
            worst = max(worst, float((x - y).abs().max() / scale))
        else:
            assert torch.equal(x, y)
    return worst


@pytest.mark.parametrize("name,make,fast,path", _fast_cases(), ids=_fast_ids())
def test_fast_path_trajectory_and_state_equal_functional_api(name, make, fast, path):
    opt = make()
    params, grads = _problem()
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, opt, fast=fast)

    def check_path():
        assert torch_opt.fast_path == path

    functional, state = _step_both(torch_opt, torch_params, opt, params, grads, coupling=0.5, after_step=check_path)
    assert max(_rel(p.detach(), f) for p, f in zip(torch_params, functional)) <= 1e-12
    assert _state_err(torch_opt.functional_state, state) <= 1e-12
    _assert_own_storage(torch_params)


def _assert_own_storage(params: list) -> None:
    """Each parameter and gradient has a storage of its own, of its own size (no shared buffer)."""
    tensors = [p.detach() for p in params] + [p.grad for p in params if p.grad is not None]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _masked_run(make, fast, masks, seed=8):
    """Adapter steps where parameter i has no gradient at step t unless masks[t][i]."""
    params, grads = _problem(seed)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer([{"params": torch_params[:2]}, {"params": torch_params[2:], "lr": 0.02}], make(), fast=fast)
    paths = []
    for t, mask in enumerate(masks):
        torch_opt.zero_grad()
        for p, g, keep in zip(torch_params, grads[t], mask):
            if keep:
                p.grad = g + 0.5 * p.detach()
        torch_opt.step()
        paths.append(torch_opt.fast_path)
    return torch_params, torch_opt, paths


MASKS = [(1, 1, 1), (1, 1, 1), (1, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1), (1, 1, 0), (1, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("name,fast", [("adamw", "auto"), ("active(adamw)", "auto"), ("active(adamw)", "flat"),
                                       ("autodrop(sgdm)", "flat"), ("hypergradient(sgd)", "flat"),
                                       ("active(adamw)", "foreach"), ("autodrop(sgdm)", "foreach")])
def test_fast_path_with_parameters_without_grad_matches_list_path(name, fast):
    make = dict(_optimizers())[name]
    list_params, list_opt, _ = _masked_run(make, False, MASKS)
    fast_params, fast_opt, paths = _masked_run(make, fast, MASKS)
    # Flat while every parameter has stepped equally often; a skip splits the per-parameter step counts
    # (torch_steps), and a flat update needs one count: the list path from there on.
    assert paths[:2] == [paths[0]] * 2 and paths[0] != "list" and paths[-1] == "list"
    assert max(_rel(a.detach(), b.detach()) for a, b in zip(fast_params, list_params)) <= 1e-12
    assert _state_err(fast_opt.functional_state, list_opt.functional_state) <= 1e-12
    assert int(fast_opt.functional_state.count) == len(MASKS)


def test_fast_path_skipped_parameter_keeps_its_values_and_own_storage():
    params, grads = _problem(4)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, adaptlr.adam(1e-2))
    for p, g in zip(torch_params, grads[0]):
        p.grad = g.clone()
    torch_opt.step()
    assert torch_opt.fast_path == "blocked"
    skipped = torch_params[1]
    before, mu_before = skipped.detach().clone(), torch_opt.state[skipped]["base.mu"].clone()
    skipped.grad = None
    torch_opt.step()
    assert torch.equal(skipped.detach(), before) and torch.equal(torch_opt.state[skipped]["base.mu"], mu_before)
    # The skipped parameter and its state no longer point into the (rebuilt) flat buffers.
    assert skipped.untyped_storage().nbytes() == skipped.numel() * skipped.element_size()
    assert torch_opt.state[skipped]["base.mu"].untyped_storage().nbytes() == skipped.numel() * skipped.element_size()


def test_fast_path_follows_scheduler_and_schedule():
    worst, _, torch_opt, _ = _scheduled_run(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda t: 0.1 * 0.5 ** ((t - 1) // 2),
        lambda o: _wrapped("active", o),
    )
    assert torch_opt.fast_path == "blocked"
    assert worst <= 1e-12, worst
    # A schedule as the base learning rate (α_t from the step counter), times a group lr.
    params, grads = _problem(3)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer([{"params": torch_params, "lr": 0.5}], adaptlr.adamw(lambda t: 0.1 / t), fast="flat")
    opt = adaptlr.adamw(lambda t: 0.05 / t)
    functional, _ = _step_both(torch_opt, torch_params, opt, params, grads[:4])
    assert torch_opt.fast_path == "flat"
    assert max(_rel(p.detach(), f) for p, f in zip(torch_params, functional)) <= 1e-12


def _model_run(fast, seed=0, steps=6, set_to_none=True):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    torch_opt = Optimizer(model.parameters(), _wrapped("active", adaptlr.adamw(1e-2)), fast=fast)
    for t in range(steps):
        g = torch.Generator().manual_seed(200 + t)
        x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
        torch_opt.zero_grad(set_to_none=set_to_none)
        ((model(x) - y) ** 2).mean().backward()
        grads = [p.grad for p in model.parameters()]
        torch_opt.step()
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # .grad is never replaced
        _assert_own_storage(list(model.parameters()))
    return model, torch_opt


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("fast,path", [("auto", "blocked"), ("foreach", "foreach")])
def test_fast_path_with_a_model_and_backward_matches_list_path(set_to_none, fast, path):
    fast_model, fast_opt = _model_run(fast, set_to_none=set_to_none)
    list_model, list_opt = _model_run(False, set_to_none=set_to_none)
    assert fast_opt.fast_path == path and list_opt.fast_path == "list"
    for a, b in zip(fast_model.parameters(), list_model.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-12
    assert _state_err(fast_opt.functional_state, list_opt.functional_state) <= 1e-12


def test_fast_path_rebuilds_when_parameter_data_is_replaced():
    params, grads = _problem(9)
    results = []
    for fast in ("auto", False):
        torch_params = [torch.nn.Parameter(p.clone()) for p in params]
        torch_opt = Optimizer(torch_params, adaptlr.adamw(1e-2), fast=fast)
        for t, step_grads in enumerate(grads[:5]):
            if t == 2:
                torch_params[0].data = torch_params[0].data.clone() * 0.5  # as module.to() / user code does
            for p, g in zip(torch_params, step_grads):
                p.grad = g.clone()
            torch_opt.step()
        results.append(torch_params)
    assert max(_rel(a.detach(), b.detach()) for a, b in zip(*results)) <= 1e-12


@pytest.mark.parametrize("save_fast,load_fast", [("auto", "auto"), ("flat", "flat"), ("auto", False), (False, "auto"),
                                                 ("foreach", "foreach"), ("foreach", "auto")])
@pytest.mark.parametrize("which", ["adamw", "active(adamw)", "autodrop(sgdm)"])
def test_state_dict_round_trip_across_fast_paths(which, save_fast, load_fast):
    make = dict(_optimizers())[which]

    model, torch_opt, scheduler = _model_and_optimizer(0, make(), save_fast)
    _train(model, torch_opt, scheduler, 5, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": torch_opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    saved_keys = {i: sorted(s) for i, s in torch_opt.state_dict()["state"].items()}
    _train(model, torch_opt, scheduler, 6, 5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert {i: sorted(s) for i, s in saved["opt"]["state"].items()} == saved_keys
    model2, torch_opt2, scheduler2 = _model_and_optimizer(1, make(), load_fast)
    model2.load_state_dict(saved["model"])
    torch_opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    _train(model2, torch_opt2, scheduler2, 6, 5)
    for a, b in zip(model.parameters(), model2.parameters()):
        if save_fast == load_fast:
            assert torch.equal(a, b)  # same path: bit for bit
        else:
            assert _rel(a.detach(), b.detach()) <= 1e-12


def test_fast_path_add_param_group_after_steps():
    params, grads = _problem(5)
    a, b = torch.nn.Parameter(params[0].clone()), torch.nn.Parameter(params[1].clone())
    torch_opt = Optimizer([a], adaptlr.adam(1e-2), fast="flat")
    ref_a, ref_b = adaptlr.adam(1e-2), adaptlr.adam(0.5)
    fa, fb = [params[0].clone()], [params[1].clone()]
    sa = ref_a.init(fa)
    updates, sa = ref_a.update([grads[0][0]], sa, fa)
    fa = adaptlr.apply_updates(fa, updates)
    a.grad = grads[0][0].clone()
    torch_opt.step()
    torch_opt.add_param_group({"params": [b], "lr": 0.5})
    # b joins at t = 2 with a step count of its own (as torch.optim counts): its first step is Adam's first.
    sb = ref_b.init(fb)
    for step_grads in grads[1:4]:
        updates, sa = ref_a.update([step_grads[0]], sa, fa)
        fa = adaptlr.apply_updates(fa, updates)
        updates, sb = ref_b.update([step_grads[1]], sb, fb)
        fb = adaptlr.apply_updates(fb, updates)
        a.grad, b.grad = step_grads[0].clone(), step_grads[1].clone()
        torch_opt.step()
        assert torch_opt.fast_path == "list"  # two step counts: a flat update needs one
    assert _rel(a.detach(), fa[0]) <= 1e-12 and _rel(b.detach(), fb[0]) <= 1e-12
    assert torch_opt.state[b]["learning_rate"].item() == 0.5
    assert int(torch_opt.functional_state.count) == 4  # the optimizer's count (epochs) is global
    assert (int(torch_opt.state[a]["step"]), int(torch_opt.state[b]["step"])) == (4, 3)


def test_set_functional_state_reaches_the_fast_path():
    opt = _wrapped("active", adaptlr.adamw(1e-2))
    params, grads = _problem(10)
    first = [torch.nn.Parameter(p.clone()) for p in params]
    first_opt = Optimizer(first, opt, fast=False)
    second = [torch.nn.Parameter(p.clone()) for p in params]
    second_opt = Optimizer(second, opt)
    for t, step_grads in enumerate(grads):
        if t == 4:  # move the generic optimizer's state into the fast one, mid-training
            for p, q in zip(second, first):
                p.data.copy_(q.detach())
            second_opt.set_functional_state(first_opt.functional_state)
        for p, q, g in zip(first, second, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        first_opt.step()
        second_opt.step()
    assert second_opt.fast_path == "blocked"
    assert max(_rel(a.detach(), b.detach()) for a, b in zip(second, first)) <= 1e-12


def test_mixed_precision_state_takes_the_generic_path():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    torch_opt = Optimizer([p], adaptlr.adamw(1e-2), state_dtype=torch.float32)
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    torch_opt.step()
    assert torch_opt.fast_path == "list"
    q = torch.nn.Parameter(torch.ones(3))  # float32 parameters with float32 state may run flat
    torch_opt = Optimizer([q], adaptlr.adamw(1e-2), state_dtype=torch.float32)
    q.grad = torch.ones(3)
    torch_opt.step()
    assert torch_opt.fast_path == "blocked"


def test_generic_step_does_not_format_tensors(monkeypatch):
    # The per-step state split used to probe every subtree with optree, whose error messages
    # formatted the whole state (most of ActiveLR's step time through the adapter).
    params, grads = _problem(11)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, _wrapped("active", adaptlr.adamw(1e-2)), fast=False)
    for p, g in zip(torch_params, grads[0]):
        p.grad = g.clone()
    torch_opt.step()

    def no_repr(self, *args, **kwargs):
        raise AssertionError("a tensor was formatted during a step")

    monkeypatch.setattr(torch.Tensor, "__repr__", no_repr)
    monkeypatch.setattr(torch.Tensor, "__format__", no_repr)
    torch_opt.step()
    torch_opt.step()


def test_fast_option_is_checked():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="fast"):
        Optimizer([p], adaptlr.sgd(0.1), fast="fusion")
    assert Optimizer([p], adaptlr.sgd(0.1), fast=True).fast == "auto"
    assert Optimizer([p], adaptlr.sgd(0.1), fast=False).fast is None


@pytest.mark.slow
def test_compiled_fast_path_matches_functional_api():
    pytest.importorskip("torch._inductor")
    import warnings

    opt = _wrapped("active", adaptlr.adamw(1e-2))
    params, grads = _problem(12)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, opt, fast="compile")
    scheduler = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=2, gamma=0.5)
    reference = _wrapped("active", adaptlr.adamw(lambda t: 1e-2 * 0.5 ** ((t - 1) // 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        functional, state = _step_both(torch_opt, torch_params, reference, params, grads, after_step=scheduler.step)
    assert torch_opt.fast_path == "compiled"
    assert max(_rel(p.detach(), f) for p, f in zip(torch_params, functional)) <= 1e-12
    assert _state_err(torch_opt.functional_state, state) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("name, path", [("prodigy", "compiled-flat"), ("active", "compiled-flat"),
                                        ("dsa", "compiled")])
def test_compiled_flat_path_matches_functional_api(name, path):
    """``fast="compile-flat"``: the flat-buffer update compiled once (a learning-rate-free optimizer's
    global sums, an elementwise wrapper); an algorithm that is not flat-safe takes the compiled list path."""
    pytest.importorskip("torch._inductor")
    import warnings

    opt = adaptlr.prodigy(d0=1e-3) if name == "prodigy" else _wrapped(name, adaptlr.adamw(1e-2))
    params, grads = _problem(14)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, opt, fast="compile-flat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        functional, state = _step_both(torch_opt, torch_params, opt, params, grads)
    assert torch_opt.fast_path == path
    assert max(_rel(p.detach(), f) for p, f in zip(torch_params, functional)) <= 1e-12
    assert _state_err(torch_opt.functional_state, state) <= 1e-12


def test_fast_setting_can_change_between_steps():
    params, grads = _problem(13)
    opt = _wrapped("active", adaptlr.adamw(1e-2))
    functional = [p.clone() for p in params]
    state = opt.init(functional)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, opt)
    for t, step_grads in enumerate(grads):
        torch_opt.fast = ["auto", False, "flat", {"block_size": 4}, "auto", None, False, "flat", True][t]
        updates, state = opt.update(step_grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        torch_opt.step()
        assert torch_opt.fast_path == ["blocked", "list", "flat", "blocked", "blocked", "list", "list",
                                       "flat", "blocked"][t]
    assert max(_rel(p.detach(), f) for p, f in zip(torch_params, functional)) <= 1e-12
    assert _state_err(torch_opt.functional_state, state) <= 1e-12


@pytest.mark.parametrize("fast", ["auto", False])
def test_step_marks_parameters_modified_for_autograd(fast):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    torch_opt = Optimizer(model.parameters(), adaptlr.adamw(1e-2), fast=fast)
    model(torch.randn(2, 3)).sum().backward()
    torch_opt.step()
    loss = model(torch.randn(2, 3)).sum()  # the graph saves the weights...
    torch_opt.step()  # ...which this step changes in place
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
