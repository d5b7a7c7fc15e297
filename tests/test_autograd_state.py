"""The state of the functional API holds values, never torch autograd history.

A custom training loop hands ``opt.init`` the model's parameters, which require grad. torch 2.13's
``torch.asarray(x, copy=True)`` of such a tensor makes a copy that autograd records (earlier
versions made a detached one) and warns; a state built that way (Prodigy's ``x_0``, DoG's ``r̄``,
AutoDrop's snapshot) carries graphs from step to step, and ``copy.deepcopy`` refuses it. The state
is made from the parameters' values instead, as ``torch.optim`` makes its own, on every torch
version; a step differentiated with ``torch.autograd`` still is (``tests/test_inplace.py``).
"""

from __future__ import annotations

import copy
import warnings

import optree
import pytest

import adaptlr

torch = pytest.importorskip("torch")

FACTORIES = {
    "adamw": lambda: adaptlr.adamw(1e-2),
    "prodigy": lambda: adaptlr.prodigy(),
    "prodigy slice_p=2": lambda: adaptlr.prodigy(slice_p=2),
    "dadapt_adam": lambda: adaptlr.dadapt_adam(),
    "dadapt_sgd": lambda: adaptlr.dadapt_sgd(momentum=0.9),
    "dog": lambda: adaptlr.dog(),
    "dog layerwise": lambda: adaptlr.dog(layerwise=True),
    "dowg": lambda: adaptlr.dowg(),
    "mechanic(adamw)": lambda: adaptlr.mechanic(adaptlr.adamw(1e-2)),
    "schedule_free_adamw": lambda: adaptlr.schedule_free_adamw(1e-2),
    "autodrop(sgdm)": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2),
    "eg(adamw)": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), scale_lr=1e-2, gain_lr=1e-2),
}


def _params(requires_grad: bool) -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
            for s in [(6, 4), (4,)]]


def _tracked(state) -> list[str]:
    return [f"leaf {k}" for k, x in enumerate(optree.tree_leaves(state))
            if x.requires_grad or x.grad_fn is not None]


@pytest.mark.parametrize("name", FACTORIES)
def test_init_of_parameters_that_require_grad_makes_the_state_of_their_values(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch 2.13: "torch.asarray: unspecified requires_grad ..."
        state = FACTORIES[name]().init(_params(True))
    assert _tracked(state) == []
    expected = FACTORIES[name]().init(_params(False))
    for got, want in zip(optree.tree_leaves(state), optree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    copy.deepcopy(state)  # refused for tensors that autograd records


def _four_steps(name: str, requires_grad: bool) -> tuple[list, object]:
    opt, params = FACTORIES[name](), _params(requires_grad)
    state = opt.init(params)
    for _ in range(4):
        grads = [2.0 * p.detach() + 0.5 for p in params]
        with torch.no_grad():
            updates, state = opt.update(grads, state, params)
            for p, u in zip(params, updates, strict=True):
                p.add_(u)
    return params, state


@pytest.mark.parametrize("name", FACTORIES)
def test_steps_under_no_grad_keep_the_state_untracked(name):
    """A loop that steps under ``torch.no_grad()``, as ``torch.optim`` does, with the model's own
    parameters: four steps (AutoDrop's and ActiveLR's epoch boundaries included), no warning, and
    the parameters and state of the same loop on tensors that do not require grad, bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = _four_steps(name, True)
    assert _tracked(state) == []
    expected_params, expected_state = _four_steps(name, False)
    for got, want in zip([*params, *optree.tree_leaves(state)], [*expected_params, *optree.tree_leaves(expected_state)],
                         strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0, equal_nan=True)


def test_autodrop_snapshot_is_untracked_in_a_step_that_autograd_records():
    """Under autograd (no ``no_grad``), AutoDrop's epoch-start snapshot of the parameters is their
    value (its drop decisions have no derivative), without torch 2.13's warning."""
    opt = adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2)
    params = _params(True)
    state = opt.init([p.detach() for p in params])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # steps 1-3: epoch starts at 1 and 3
            grads = [2.0 * p + 0.5 for p in params]
            updates, state = opt.update(grads, state, params)
            params = adaptlr.apply_updates(params, updates)
    snapshot = state.adaptations[-1].previous_params
    assert _tracked(snapshot) == []
    assert params[0].grad_fn is not None  # the parameters themselves stay differentiable
