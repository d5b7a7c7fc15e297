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


@pytest.mark.parametrize("name,make", _optimizers(), ids=[n for n, _ in _optimizers()])
def test_trajectory_equals_functional_api(name, make):
    opt = make()
    params, grads = _problem()
    functional = [p.clone() for p in params]
    state = opt.init(functional)
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch_opt = Optimizer(torch_params, opt)
    for step_grads in grads:
        # The gradient must depend on the parameters for AutoDrop/HD to see a trajectory.
        step_grads = [g + 0.5 * p for g, p in zip(step_grads, functional)]
        updates, state = opt.update(step_grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        torch_opt.step()
    worst = max(_rel(p.detach(), f) for p, f in zip(torch_params, functional))
    assert worst <= 1e-12, worst
    for a, b in zip(adaptlr.learning_rates(torch_opt.functional_state), adaptlr.learning_rates(state)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


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
    functional = [p.clone() for p in params]
    state = opt.init(functional)
    for step_grads in grads[:3]:
        updates, state = opt.update(step_grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        torch_opt.step()
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


def _model_and_optimizer(seed: int, opt: adaptlr.Optimizer) -> tuple:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    torch_opt = Optimizer([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}], opt)
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


def test_hypergradient_state_never_aliases_the_gradient():
    opt = _wrapped("hypergradient", adaptlr.sgd(0.1))
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch_opt = Optimizer([p], opt)
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
