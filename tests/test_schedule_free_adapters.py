"""Schedule-Free through the adapters (issue 19): the torch ``train()``/``eval()`` views against
``schedulefree.AdamWScheduleFree`` 1.4.1, checkpoints in either view, GradScaler-skipped and
non-finite steps, and ``to_optax`` against the functional step."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import adaptlr

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree", reason="schedulefree==1.4.1 is the reference")
from adaptlr.backends.torch import Optimizer  # noqa: E402

X = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
SETTINGS = {"lr": 0.01, "weight_decay": 0.1, "warmup_steps": 5, "r": 0.5}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _adaptlr(model, fast="auto", wrap=lambda o: o):
    kw = dict(SETTINGS)
    opt = adaptlr.schedule_free_adamw(kw.pop("lr"), **kw)
    return Optimizer(model.parameters(), wrap(opt), fast=fast)


def _train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()


def _max_diff(a, b):
    return max(float(((p - q).abs().max() / q.abs().max()).detach()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fast", ["auto", None])
@pytest.mark.parametrize("wrapped", [False, True])
def test_train_eval_views_match_schedulefree(fast, wrapped):
    ref_model, model = _model(), _model()
    ref = schedulefree.AdamWScheduleFree(ref_model.parameters(), **SETTINGS)
    opt = _adaptlr(model, fast, adaptlr.skip_nonfinite if wrapped else (lambda o: o))
    ref.train()
    opt.train()
    for _ in range(3):
        _train(ref_model, ref, 15)
        _train(model, opt, 15)
        assert _max_diff(model, ref_model) <= 1e-12
        ref.eval()
        opt.eval()
        assert _max_diff(model, ref_model) <= 1e-12  # x, through skip_nonfinite too
        with pytest.raises(RuntimeError, match="eval mode"):
            opt.step()
        ref.train()
        opt.train()
    # the views differ (the test sees the switch)
    before = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert max(float((p - q).abs().max()) for p, q in zip((p.detach() for p in model.parameters()), before)) > 1e-4
    opt.eval()  # twice: no second switch
    opt.train()
    assert max(float((p - q).abs().max()) for p, q in zip((p.detach() for p in model.parameters()), before)) <= 1e-15


def test_train_eval_do_nothing_without_schedule_free():
    model = _model()
    opt = Optimizer(model.parameters(), adaptlr.adamw(0.01))
    _train(model, opt, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    _train(model, opt, 1)  # no eval mode to refuse
    opt.train()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("save_in_eval", [False, True])
def test_checkpoint_resume_is_bit_identical_in_either_view(save_in_eval):
    model, opt = _model(), None
    opt = _adaptlr(model)
    _train(model, opt, 10)
    if save_in_eval:
        opt.eval()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.train()
    _train(model, opt, 10)
    expected_y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    expected_x = [p.detach().clone() for p in model.parameters()]

    resumed = _model()
    resumed.load_state_dict(saved_model)
    ropt = _adaptlr(resumed)
    ropt.load_state_dict(saved_opt)
    ropt.train()
    _train(resumed, ropt, 10)
    for p, q in zip(resumed.parameters(), expected_y):
        assert torch.equal(p, q)
    ropt.eval()
    for p, q in zip(resumed.parameters(), expected_x):
        assert torch.equal(p, q)


def test_gradscaler_and_nonfinite_skips_leave_both_views_untouched():
    model = _model()
    opt = _adaptlr(model, wrap=adaptlr.skip_nonfinite)
    _train(model, opt, 5)
    y = [p.detach().clone() for p in model.parameters()]
    z = [t.clone() for t in opt.functional_state.adaptations[0].z]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(X), Y) * float("inf")).backward()
    scaler.step(opt)  # an inf gradient: GradScaler skips the step
    scaler.update()
    for p in model.parameters():  # and skip_nonfinite skips a NaN step it is given
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), y))
    assert all(torch.equal(a, b) for a, b in zip(opt.functional_state.adaptations[0].z, z))
    opt.eval()
    x = [p.detach().clone() for p in model.parameters()]
    expected_x = adaptlr.schedule_free_eval_params(opt.functional_state, y)
    for a, b in zip(x, expected_x):  # eval() is y.lerp(z, 1 - 1/β1): the same to rounding
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


def test_to_optax_matches_the_functional_step():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    from adaptlr.backends.jax import to_optax

    opt = adaptlr.schedule_free_adamw(0.02, warmup_steps=3, weight_decay=0.1)
    params = {"w": jax.numpy.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jax.numpy.asarray(0.3)}
    transform = to_optax(opt)
    state, f_state = transform.init(params), opt.init(params)
    o_params, f_params = params, params
    step = jax.jit(transform.update)
    for t in range(8):
        o_updates, state = step(jax.tree.map(lambda p, s=1.0 + 0.1 * t: p * s, o_params), state, o_params)
        o_params = optax.apply_updates(o_params, o_updates)
        f_updates, f_state = opt.update(jax.tree.map(lambda p, s=1.0 + 0.1 * t: p * s, f_params), f_state, f_params)
        f_params = adaptlr.apply_updates(f_params, f_updates)
    for k in params:
        np.testing.assert_allclose(np.asarray(o_params[k]), np.asarray(f_params[k]), rtol=1e-6, atol=1e-7)
    x_optax = adaptlr.schedule_free_eval_params(state, o_params)  # to_optax's state is a leaf list: matched by order
    x_func = adaptlr.schedule_free_eval_params(f_state, f_params)
    for k in params:
        np.testing.assert_allclose(np.asarray(x_optax[k]), np.asarray(x_func[k]), rtol=1e-6, atol=1e-7)
        assert not np.allclose(np.asarray(x_func[k]), np.asarray(f_params[k]))
