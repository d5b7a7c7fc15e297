"""The torch adapter as a drop-in for ``torch.optim``: storage, safetensors, param-group hyper-parameters
under torch's names (OneCycleLR / CyclicLR with ``cycle_momentum``), validation, sparse gradients,
``torch.distributed.checkpoint``'s state dicts."""

from __future__ import annotations

import copy

import pytest

import adaptlr

torch = pytest.importorskip("torch")
from adaptlr.backends.torch import Optimizer  # noqa: E402

FAST = ["auto", "flat", False]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def _train(model, opt, steps: int, start: int = 0, scheduler=None) -> None:
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + t)
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 2, generator=g, dtype=torch.float64)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# -- storage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", FAST)
def test_parameters_keep_their_storage_and_safetensors_round_trips(fast, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _model()
    before = {n: (p.untyped_storage().data_ptr(), p) for n, p in model.named_parameters()}
    opt = Optimizer(model.parameters(), adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2), fast=fast)
    _train(model, opt, 5)
    tensors = [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    for name, p in model.named_parameters():
        assert p.untyped_storage().data_ptr() == before[name][0]  # never re-pointed
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    loaded = _model(seed=1)
    missing, unexpected = safetensors_torch.load_model(loaded, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


# -- param groups under torch's names --------------------------------------------------------------


def test_groups_carry_the_base_hyper_parameters_under_torch_names():
    p = torch.nn.Parameter(torch.ones(2))
    adam = Optimizer([p], adaptlr.adamw(1e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1))
    group = adam.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.8, 0.99), 1e-6, 0.1)
    sgd = Optimizer([torch.nn.Parameter(torch.ones(2))], adaptlr.sgd(0.1, momentum=0.9, nesterov=True))
    group = sgd.param_groups[0]
    assert (group["momentum"], group["dampening"], group["nesterov"]) == (0.9, 0.0, True)


def _side_by_side(torch_opt, ours, params_a, params_b, steps, schedulers):
    for t in range(steps):
        g = torch.Generator().manual_seed(t)
        for a, b in zip(params_a, params_b):
            grad = torch.randn(a.shape, generator=g, dtype=torch.float64) + 0.3 * a.detach()
            a.grad, b.grad = grad.clone(), grad.clone()
        torch_opt.step()
        ours.step()
        for s in schedulers:
            s.step()
    return max(_rel(b.detach(), a.detach()) for a, b in zip(params_a, params_b))


def _params(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]


def test_one_cycle_lr_with_cycle_momentum_matches_torch_adamw():
    start = _params()
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    mine = [torch.nn.Parameter(p.clone()) for p in start]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05)
    ours = Optimizer(mine, adaptlr.adamw(1e-2, weight_decay=0.05))
    kwargs = {"max_lr": 0.05, "total_steps": 12, "cycle_momentum": True, "base_momentum": 0.8, "max_momentum": 0.95}
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, **kwargs) for o in (torch_opt, ours)]
    worst = _side_by_side(torch_opt, ours, ref, mine, 12, schedulers)
    assert ours.param_groups[0]["betas"][0] != 0.9  # the scheduler wrote β1 ...
    assert worst <= 1e-12, worst  # ... and the steps used it


def test_cyclic_lr_with_cycle_momentum_matches_torch_sgd():
    start = _params(1)
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    mine = [torch.nn.Parameter(p.clone()) for p in start]
    torch_opt = torch.optim.SGD(ref, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours = Optimizer(mine, adaptlr.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=1e-3))
    kwargs = {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3, "cycle_momentum": True, "base_momentum": 0.7,
              "max_momentum": 0.9}
    schedulers = [torch.optim.lr_scheduler.CyclicLR(o, **kwargs) for o in (torch_opt, ours)]
    assert _side_by_side(torch_opt, ours, ref, mine, 10, schedulers) <= 1e-12


@pytest.mark.parametrize("fast", FAST)
def test_groups_with_their_own_betas_match_torch_adamw(fast):
    start = _params(2)
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    mine = [torch.nn.Parameter(p.clone()) for p in start]
    torch_opt = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:], "betas": (0.5, 0.9), "eps": 1e-4}],
                                  lr=1e-2)
    ours = Optimizer([{"params": mine[:1]}, {"params": mine[1:], "betas": (0.5, 0.9), "eps": 1e-4}],
                     adaptlr.adamw(1e-2), fast=fast)
    assert _side_by_side(torch_opt, ours, ref, mine, 6, []) <= 1e-12
    # Changed between steps: the next step uses the new values.
    for o in (torch_opt, ours):
        o.param_groups[0]["betas"] = (0.7, 0.95)
    assert _side_by_side(torch_opt, ours, ref, mine, 4, []) <= 1e-12


def test_groups_with_different_betas_under_a_global_sum_are_an_error():
    a, b = (torch.nn.Parameter(p.clone()) for p in _params(3))
    opt = Optimizer([{"params": [a]}, {"params": [b], "betas": (0.5, 0.9)}],
                    adaptlr.autodrop(adaptlr.adamw(1e-2), steps_per_epoch=2))
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    with pytest.raises(ValueError, match="same values"):
        opt.step()


# -- validation as torch.optim does it -------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"lr": -0.1}, {"lr": float("nan")}, {"weight_decay": -1.0},
                                 {"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)}, {"eps": -1e-8}])
def test_invalid_group_values_raise_value_error(bad):
    # torch.optim.AdamW raises these for its constructor arguments (adaptlr's factories do too) but lets
    # a param group through unchecked; the adapter checks every group with torch's messages.
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="Invalid"):
        torch.optim.AdamW([p], **{"lr": 1e-3, **bad})
    with pytest.raises(ValueError, match="Invalid"):
        Optimizer([{"params": [p], **bad}], adaptlr.adamw(1e-2))
    opt = Optimizer([p], adaptlr.adamw(1e-2))
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], **bad})
    assert len(opt.param_groups) == 1


def test_sgd_momentum_checks():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="Invalid momentum"):
        Optimizer([{"params": [p], "momentum": 1.5}], adaptlr.sgd(0.1, momentum=0.9))
    with pytest.raises(ValueError, match="momentum buffer"):
        Optimizer([{"params": [p], "momentum": 0.9}], adaptlr.sgd(0.1))


@pytest.mark.parametrize("named", [False, True])
def test_sparse_gradient_is_a_clear_error_naming_the_parameter(named):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1))
    params = model.named_parameters() if named else model.parameters()
    opt = Optimizer(params, adaptlr.adamw(1e-2))
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse") as info:
        opt.step()
    if named:
        assert "'0.weight'" in str(info.value)


@pytest.mark.parametrize("fast", FAST)
def test_parameters_without_grad_and_their_state_are_untouched(fast):
    model = _model()
    opt = Optimizer(model.parameters(), adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2), fast=fast)
    _train(model, opt, 3)
    frozen = model[2].weight
    value = frozen.detach().clone()
    entry = {k: v.clone() for k, v in opt.state[frozen].items()}
    frozen.requires_grad_(False)
    _train(model, opt, 4, start=3)
    assert torch.equal(frozen.detach(), value)
    assert all(torch.equal(opt.state[frozen][k], v) for k, v in entry.items())


# -- torch.distributed.checkpoint's state dicts (one process) ----------------------------------------


@pytest.mark.parametrize("which", ["adamw", "active", "autodrop", "hypergradient", "dsa"])
def test_dcp_state_dict_round_trip_continues_bit_identically(which):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    makers = {
        "adamw": lambda: adaptlr.adamw(1e-2),
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2, theta=30.0,
                                             theta_max=90.0, patience_epochs=1),
        "hypergradient": lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3),
        "dsa": lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01),
    }
    model = _model()
    opt = Optimizer(model.parameters(), makers[which]())
    _train(model, opt, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert set(saved) == {"state", "param_groups"}  # DCP keeps only these
    _train(model, opt, 6, start=5)

    model2 = _model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = Optimizer(model2.parameters(), makers[which]())
    set_optimizer_state_dict(model2, opt2, saved)
    _train(model2, opt2, 6, start=5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_dcp_initialisation_step_changes_nothing():
    """DCP steps a fresh optimizer with lr = 0 to create its state; ours exists from the start."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    runs = []
    for call_dcp in (False, True):
        model = _model()
        opt = Optimizer(model.parameters(), adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3))
        if call_dcp:
            get_optimizer_state_dict(model, opt)
        _train(model, opt, 20)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert torch.equal(o1.functional_state.adaptations[0].lr, o2.functional_state.adaptations[0].lr)
    assert float(o2.functional_state.adaptations[0].lr) != 0.0
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_dcp_save_and_load_to_disk(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    make = lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5)  # noqa: E731
    model = _model()
    opt = Optimizer(model.parameters(), make())
    _train(model, opt, 5)
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp_path))
    _train(model, opt, 4, start=5)

    model2 = _model(seed=1)
    opt2 = Optimizer(model2.parameters(), make())
    model_sd2, opt_sd2 = get_state_dict(model2, opt2)
    state = {"model": model_sd2, "optim": opt_sd2}
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _train(model2, opt2, 4, start=5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# -- schedulers and hypergradient descent ---------------------------------------------------------------


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
def test_scheduler_scales_the_hypergradient_rate(granularity, fast):
    """HD's adapted rate follows the scheduler: a ← a·(α_t/α_{t-1}) before the step; spec §4 otherwise."""
    def make():
        return adaptlr.hypergradient(adaptlr.sgd(0.05, momentum=0.9), hyper_lr=1e-3, granularity=granularity)

    start = _params(4)
    mine = [torch.nn.Parameter(p.clone()) for p in start]
    opt = Optimizer(mine, make(), fast=fast)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    reference = make()
    functional = [p.clone() for p in start]
    state = reference.init(functional)
    lrs = []
    for t in range(9):
        lr = opt.param_groups[0]["lr"]
        if lrs and lr != lrs[-1]:
            hd, ratio = state.adaptations[0], lr / lrs[-1]
            rates = [r * ratio for r in hd.lr] if isinstance(hd.lr, list) else hd.lr * ratio  # per tensor / global
            state = state._replace(adaptations=(hd._replace(lr=rates),))
        lrs.append(lr)
        g = torch.Generator().manual_seed(t)
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.3 * p for p in functional]
        updates, state = reference.update(grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, grad in zip(mine, grads):
            p.grad = grad.clone()
        opt.step()
        scheduler.step()
    assert lrs[-1] == 0.05 * 0.25
    assert max(_rel(p.detach(), f) for p, f in zip(mine, functional)) <= 1e-12
    got = adaptlr.learning_rates(opt.functional_state)
    want = adaptlr.learning_rates(state)
    assert max(_rel(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(got, want)) <= 1e-12


def test_constant_lr_leaves_hypergradient_exact():
    start = _params(5)
    mine = [torch.nn.Parameter(p.clone()) for p in start]
    opt = Optimizer(mine, adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3))
    reference = adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3)
    functional = [p.clone() for p in start]
    state = reference.init(functional)
    for t in range(6):
        g = torch.Generator().manual_seed(t)
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.3 * p for p in functional]
        updates, state = reference.update(grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, grad in zip(mine, grads):
            p.grad = grad.clone()
        opt.step()
    assert torch.equal(opt.functional_state.adaptations[0].lr, state.adaptations[0].lr)
    assert all(torch.equal(p.detach(), f) for p, f in zip(mine, functional))


# -- per-parameter step counts (torch_steps) ----------------------------------------------------------


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("case", ["unfreeze", "add_param_group"])
def test_late_parameters_take_their_own_first_step_like_torch_adamw(case, fast):
    """A parameter that first gets a gradient at step 5 starts with Adam's first step, as in torch.optim."""
    model, reference = _model(), _model()
    late = [model[2].weight, model[2].bias]
    late_ref = [reference[2].weight, reference[2].bias]
    first = [p for p in model.parameters() if all(p is not q for q in late)]
    first_ref = [p for p in reference.parameters() if all(p is not q for q in late_ref)]
    if case == "unfreeze":
        ours = Optimizer(model.parameters(), adaptlr.adamw(1e-2, weight_decay=0.05), fast=fast)
        theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        ours = Optimizer(first, adaptlr.adamw(1e-2, weight_decay=0.05), fast=fast)
        theirs = torch.optim.AdamW(first_ref, lr=1e-2, weight_decay=0.05)
    for p in late + late_ref:
        p.requires_grad_(False)
    _train(model, ours, 5)
    _train(reference, theirs, 5)
    for p in late + late_ref:
        p.requires_grad_(True)
    if case == "add_param_group":
        ours.add_param_group({"params": late, "lr": 3e-3})
        theirs.add_param_group({"params": late_ref, "lr": 3e-3})
    _train(model, ours, 5, start=5)
    _train(reference, theirs, 5, start=5)
    assert max(_rel(a.detach(), b.detach()) for a, b in zip(model.parameters(), reference.parameters())) <= 1e-12
    assert [int(ours.state[p]["step"]) for p in model.parameters()] == [
        int(theirs.state[p]["step"]) for p in reference.parameters()]
    assert int(ours.functional_state.count) == 10  # the optimizer's own count (epoch boundaries)


def test_per_parameter_steps_survive_a_state_dict_round_trip():
    model = _model()
    opt = Optimizer(model.parameters(), adaptlr.adamw(1e-2))
    model[2].weight.requires_grad_(False)
    _train(model, opt, 3)
    model[2].weight.requires_grad_(True)
    _train(model, opt, 2, start=3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, start=5)
    model2 = _model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = Optimizer(model2.parameters(), adaptlr.adamw(1e-2))
    opt2.load_state_dict(saved)
    assert [int(opt2.state[p]["step"]) for p in model2.parameters()] == [5, 5, 2, 5]
    _train(model2, opt2, 3, start=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("fast", FAST)
def test_deepcopy_of_model_and_optimizer_continues_bit_identically(fast):
    model = _model()
    opt = Optimizer(model.parameters(), adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2), fast=fast)
    _train(model, opt, 3)
    model2, opt2 = copy.deepcopy((model, opt))
    assert all(p is q for p, q in zip(opt2.param_groups[0]["params"], model2.parameters()))
    _train(model, opt, 4, start=3)
    _train(model2, opt2, 4, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("fast", FAST)
def test_grad_scaler_skips_inf_steps_and_leaves_the_state(fast):
    model = _model()
    opt = Optimizer(model.parameters(), adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2), fast=fast)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    for poison in (False, False, True, False):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
            values = [p.detach().clone() for p in model.parameters()]
            entries = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if poison:
            assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
            for p, entry in zip(model.parameters(), entries):
                assert all(torch.equal(opt.state[p][k], v) for k, v in entry.items())
    assert int(opt.functional_state.count) == 3


@pytest.mark.parametrize("fast", FAST)
def test_frozen_parameters_have_no_state_and_a_state_dict_round_trip_keeps_it_so(fast):
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = Optimizer(model.parameters(), adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2), fast=fast)
    assert model[0].weight not in opt.state and len(opt.state) == 3  # as torch.optim: no memory for it
    _train(model, opt, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved["state"]) == 3
    _train(model, opt, 3, start=3)
    model2 = _model(seed=1)
    model2.load_state_dict(saved_model)
    model2[0].weight.requires_grad_(False)
    opt2 = Optimizer(model2.parameters(), adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2), fast=fast)
    opt2.load_state_dict(saved)
    assert model2[0].weight not in opt2.state
    _train(model2, opt2, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert len(opt.functional_state.base.mu) == 4  # the functional view covers every parameter
