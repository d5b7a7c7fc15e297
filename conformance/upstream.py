"""adaptlr's learning-rate-free optimizers against their upstream packages: the "upstream" rows.

Each :class:`UpstreamCase` runs one adaptlr configuration and the upstream optimizer it reproduces
(``prodigyopt.Prodigy`` 1.1.2, ``dadaptation.DAdaptAdam``/``DAdaptSGD`` 3.2,
``dog_optimizer.DoG``/``LDoG`` 1.0.3, ``optax.contrib.prodigy``/``dadapt_adamw``/``dog``/``dowg``,
``schedulefree.SGDScheduleFree``/``AdamWScheduleFree`` (and ``*Reference``) 1.4.1,
``optax.contrib.schedule_free_sgd``/``schedule_free_adamw``, ``mechanic_pytorch.mechanize`` 0.0.1)
on :func:`problem` for at least :data:`STEPS` steps in float64, and reports the maximum normwise
relative error of the parameters (over steps and tensors) on each backend, and that of the
estimate (``d`` or ``η``, where the upstream exposes it; Schedule-Free: the evaluation parameters
``x`` after the last step). A row passes at ≤ :data:`TOLERANCE` (Mechanic's at the documented rule's
tolerance with its condition: :attr:`UpstreamCase.tolerance`); an
upstream package that is not installed makes its rows "skipped". ``adaptlr conformance --checks
upstream`` prints them; docs/algorithms/lr_free.md publishes them (docs/scripts/lr_free_table.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptlr.conformance.backends import Backend
from adaptlr.conformance.runner import Row, max_rel_err

__all__ = ["CASES", "MECHANIC_CONDITION", "SHAPES", "STEPS", "TABLE_COLUMNS", "TOLERANCE", "UpstreamCase",
           "agreement_table", "column_errors",
           "optax_run", "problem", "reference", "run", "upstream_rows"]

SHAPES = [(3, 4), (5,), (2, 3, 2), (), (7,)]
TABLE_COLUMNS = ("numpy", "array_api_strict", "torch", "jax", "jax (jit)")  # the docs tables' backend columns
STEPS = 200
TOLERANCE = 1e-12
# c_algorithm of adaptlr.conformance.tolerances for Mechanic: its scale grows from the inner products
# ⟨Δ, g⟩, and a 1-ulp relative change of every gradient at every step moves its runs on the noise-3
# problem up to 13 times as far as it moves its inner optimizer's (at least sqrt(K)·eps):
# tests/test_mechanic.py::test_mechanic_condition_covers_its_measured_sensitivity measures it
MECHANIC_CONDITION = 16.0


def problem(seed: int = 20261202, noise: float = 0.3) -> tuple[list[np.ndarray], Callable[[list, int], list]]:
    """``(init, grad)``: ``Σ a/2·(θ-c)² + 0.1·cos θ`` over parameters of :data:`SHAPES`, and
    ``grad(params, t)``, its gradient plus a fixed pseudo-random noise of step ``t``.

    Without the noise the learning-rate-free methods overestimate the step on this small problem
    (D-Adapt Adam: ``d ≈ 3`` for a distance ≈ 1) and oscillate around the minimum chaotically, which
    amplifies rounding differences between two correct implementations (to 1e-10 .. 1e-6 after 200
    steps); with it the run contracts, as a stochastic training run does.
    """
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in SHAPES]
    centres = [rng.normal(size=s) for s in SHAPES]
    coeffs = [rng.uniform(0.5, 2.0, size=s) for s in SHAPES]

    def grad(params: list, t: int) -> list:
        step_rng = np.random.default_rng([seed, t])
        return [a * (p - c) - 0.1 * np.sin(p) + noise * step_rng.normal(size=np.shape(p))
                for p, a, c in zip(params, coeffs, centres)]

    return init, grad


@dataclass(frozen=True)
class UpstreamCase:
    """One adaptlr configuration and the upstream optimizer it reproduces.

    Attributes:
        algorithm: the adaptlr factory (``"prodigy"``, ``"dadapt_adam"``, ...).
        upstream: the upstream optimizer (a key of :data:`_REFERENCES`).
        settings: a short name of the configuration.
        kwargs: the adaptlr factory's arguments (the upstream gets the same values under its names).
        noise: the gradient noise of :func:`problem`.
        condition: ``c_algorithm`` of :func:`adaptlr.conformance.tolerances.tolerance` (1: the rule's
            random walk of rounding; Mechanic: :data:`MECHANIC_CONDITION`).
    """

    algorithm: str
    upstream: str
    settings: str
    kwargs: dict = field(default_factory=dict)
    noise: float = 0.3
    condition: float = 1.0

    @property
    def tolerance(self) -> float:
        """The row's bound on the normwise relative error: :data:`TOLERANCE`, or the documented rule's
        float64 tolerance for :data:`STEPS` steps with this case's condition and its optimizer's
        step-scalar condition where that is larger (Mechanic: its scale amplifies rounding, and the
        upstream's own torch reductions round differently with AVX-512 than with AVX2)."""
        from adaptlr.conformance.tolerances import tolerance

        rule = tolerance("float64", STEPS, self.condition, self.build().scalar_condition)
        return max(TOLERANCE, rule)

    def build(self) -> Any:
        import adaptlr

        if self.algorithm == "mechanic":  # mechanic(inner optimizer, ...): kwargs["inner"] = (factory, kwargs)
            kwargs = dict(self.kwargs)
            name, inner = kwargs.pop("inner")
            return adaptlr.mechanic(getattr(adaptlr, name)(**inner), **kwargs)
        return getattr(adaptlr, self.algorithm)(**self.kwargs)


def _cases() -> list[UpstreamCase]:
    out = []
    for settings, kw in {
        "default": {}, "d0-1e-3": {"d0": 1e-3}, "decoupled-wd": {"weight_decay": 0.1, "d0": 1e-3},
        "coupled-wd": {"weight_decay": 0.1, "decouple": False, "d0": 1e-3},
        "bias-correction": {"use_bias_correction": True, "d0": 1e-3},
        "safeguard-warmup": {"safeguard_warmup": True, "d0": 1e-4},
        "growth-rate": {"growth_rate": 1.02, "d0": 1e-3}, "slice-p-3": {"slice_p": 3, "d0": 1e-3},
        "b1-0-beta3-dcoef": {"b1": 0.0, "beta3": 0.9, "d_coef": 0.5, "d0": 1e-3},
        "lr-0.5-eps-wd-all": {"learning_rate": 0.5, "eps": 1e-6, "weight_decay": 0.05, "use_bias_correction": True,
                              "safeguard_warmup": True, "growth_rate": 1.05, "slice_p": 2, "d0": 1e-3},
    }.items():
        out.append(UpstreamCase("prodigy", "prodigyopt.Prodigy", settings, kw))
    for settings, kw in {"wd-dcoef-eps": {"weight_decay": 0.05, "d0": 1e-3, "d_coef": 0.8, "eps": 1e-7},
                         "wd-safeguard": {"weight_decay": 0.05, "d0": 1e-3, "safeguard_warmup": True}}.items():
        out.append(UpstreamCase("prodigy", "optax.contrib.prodigy", settings, {"use_bias_correction": True, **kw}))
    for settings, kw in {"dog-default": {}, "dog-reps-1e-4-wd": {"reps_rel": 1e-4, "weight_decay": 0.05},
                         "dog-init-eta-lr": {"init_eta": 1e-3, "learning_rate": 0.8, "eps": 1e-6},
                         "ldog-default": {"layerwise": True},
                         "ldog-init-eta-wd": {"layerwise": True, "init_eta": 1e-3, "weight_decay": 0.05}}.items():
        out.append(UpstreamCase("dog", "dog_optimizer.DoG", settings, kw))
    for settings, kw in {"heuristic": {"reps_rel": 1e-5},
                         "learning-rate-wd": {"init_eta": 1e-3, "weight_decay": 0.05, "eps": 1e-6}}.items():
        out.append(UpstreamCase("dog", "optax.contrib.dog", settings, kw))
    for settings, kw in {"default": {}, "sq-dist-wd-lr-eps": {"learning_rate": 0.7, "init_estim_sq_dist": 1e-6,
                                                              "weight_decay": 0.05, "eps": 1e-6}}.items():
        out.append(UpstreamCase("dowg", "optax.contrib.dowg", settings, kw))
    for settings, kw in {
        "default": {}, "d0-1e-3": {"d0": 1e-3}, "coupled-wd": {"weight_decay": 0.05, "d0": 1e-3},
        "decoupled-wd": {"weight_decay": 0.05, "decouple": True, "d0": 1e-3},
        "bias-correction": {"use_bias_correction": True, "d0": 1e-3},
        "growth-rate": {"growth_rate": 1.05, "d0": 1e-3},
        "all": {"learning_rate": 0.5, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.05, "decouple": True,
                "use_bias_correction": True, "growth_rate": 1.1, "d0": 1e-3},
    }.items():
        out.append(UpstreamCase("dadapt_adam", "dadaptation.DAdaptAdam", settings, kw))
    for settings, kw in {
        "wd": {"weight_decay": 0.05, "d0": 1e-3},
        "betas-eps-lr": {"learning_rate": 0.5, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "d0": 1e-3},
    }.items():
        out.append(UpstreamCase("dadapt_adam", "optax.contrib.dadapt_adamw", settings,
                                {"decouple": True, "use_bias_correction": True, **kw}))
    for settings, kw in {"default": {}, "d0-1e-3": {"d0": 1e-3},
                         "momentum-wd": {"momentum": 0.9, "weight_decay": 0.05, "d0": 1e-3},
                         "growth-lr": {"learning_rate": 0.5, "growth_rate": 1.05, "momentum": 0.5, "d0": 1e-3}}.items():
        out.append(UpstreamCase("dadapt_sgd", "dadaptation.DAdaptSGD", settings, kw))
    adamw_settings = {
        "default": {},
        "lr-wd-warmup": {"learning_rate": 0.01, "weight_decay": 0.1, "warmup_steps": 20},
        "r-betas-eps-power": {"learning_rate": 0.02, "b1": 0.95, "b2": 0.99, "eps": 1e-6, "r": 1.0,
                              "weight_lr_power": 1.0, "warmup_steps": 5},
    }
    sgd_settings = {
        "lr-0.1": {"learning_rate": 0.1},
        "wd-warmup-r": {"learning_rate": 0.1, "momentum": 0.8, "weight_decay": 0.05, "warmup_steps": 10, "r": 0.5},
    }
    for upstream in ("schedulefree.AdamWScheduleFree", "schedulefree.AdamWScheduleFreeReference"):
        for settings, kw in adamw_settings.items():
            out.append(UpstreamCase("schedule_free_adamw", upstream, settings, kw))
    for upstream in ("schedulefree.SGDScheduleFree", "schedulefree.SGDScheduleFreeReference"):
        for settings, kw in sgd_settings.items():
            out.append(UpstreamCase("schedule_free_sgd", upstream, settings, kw))
    # optax has no r (it is r = 0), and its warm-up is not schedulefree's: the inner optimizer's schedule
    # counts from 0, the averaging weight's from 1 (docs/algorithms/lr_free.md measures the difference)
    out.append(UpstreamCase("schedule_free_adamw", "optax.contrib.schedule_free_adamw", "lr-wd",
                            {"learning_rate": 0.01, "weight_decay": 0.1}))
    out.append(UpstreamCase("schedule_free_adamw", "optax.contrib.schedule_free_adamw", "betas-eps-power",
                            {"learning_rate": 0.02, "b1": 0.95, "b2": 0.99, "eps": 1e-6, "weight_lr_power": 1.0}))
    out.append(UpstreamCase("schedule_free_sgd", "optax.contrib.schedule_free_sgd", "momentum-wd",
                            {"learning_rate": 0.1, "momentum": 0.8, "weight_decay": 0.05}))
    # Mechanic's scale amplifies rounding on the noise-0.3 problem (a 1-ulp change of x_0 moves the run by
    # 1e-10..1e-9 after 200 steps): its rows use noise 3, where the run contracts (docs/algorithms/lr_free.md)
    for settings, kw in {
        "sgd": {"inner": ("sgd", {"learning_rate": 0.1})},
        "sgd-momentum-wd-store-delta": {"inner": ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
                                        "store_delta": True},
        "adamw": {"inner": ("adamw", {"learning_rate": 0.01})},
        "adamw-wd-s_decay-betas": {"inner": ("adamw", {"learning_rate": 0.001, "weight_decay": 0.1}),
                                   "s_decay": 0.1, "s_init": 1e-6, "betas": (0.9, 0.999), "eps": 1e-7},
        "adamw-store-delta": {"inner": ("adamw", {"learning_rate": 0.01, "b1": 0.8}), "store_delta": True},
    }.items():
        out.append(UpstreamCase("mechanic", "mechanic_pytorch.mechanize", settings, kw, noise=3.0,
                                condition=MECHANIC_CONDITION))
    return out


CASES: list[UpstreamCase] = _cases()


# -- the upstream runs ----------------------------------------------------------------------------

def _torch_run(make: Callable[[list], Any], estimate: Callable[[Any], Any], init: list, grad: Callable,
               steps: int) -> tuple[list, list]:
    import torch

    params = [torch.tensor(p, dtype=torch.float64) for p in init]
    logging.disable(logging.WARNING)  # dog-optimizer logs a warning for any lr != 1
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "Using decoupled weight decay"
            opt = make(params)
    finally:
        logging.disable(logging.NOTSET)
    trajectory, estimates = [], []
    for t in range(steps):
        for p, g in zip(params, grad([p.numpy() for p in params], t)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        trajectory.append([p.numpy().copy() for p in params])
        estimates.append(estimate(opt))
    return trajectory, estimates


def optax_run(transform: Any, estimate: Callable[..., Any], init: list, grad: Callable,
              steps: int, *, with_params: bool = False) -> tuple[list, list]:
    """``(trajectory, estimates)`` of the optax ``transform`` under ``jax.jit`` in float64 (host NumPy
    copies of the params after each step, and ``estimate(state)``, or ``estimate(state, params)``
    with ``with_params``)."""
    import jax
    import optax

    from adaptlr.conformance.backends import enable_jax_x64

    enable_jax_x64()  # the reference runs in float64 whichever backends the report covers
    params = [jax.numpy.asarray(p, dtype=jax.numpy.float64) for p in init]
    if params[0].dtype != jax.numpy.float64:
        raise RuntimeError("JAX made float32 arrays: enable jax_enable_x64 before JAX computes anything")
    state = transform.init(params)
    step = jax.jit(transform.update)
    trajectory, estimates = [], []
    for t in range(steps):
        grads = [jax.numpy.asarray(g) for g in grad([np.asarray(p) for p in params], t)]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append([np.asarray(p) for p in params])
        estimates.append(estimate(state, params) if with_params else estimate(state))
    return trajectory, estimates


def _betas(kw: dict) -> tuple[float, float]:
    return kw.get("b1", 0.9), kw.get("b2", 0.999)


def _prodigyopt(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    import prodigyopt

    names = {k: v for k, v in kw.items() if k not in ("learning_rate", "b1", "b2")}
    return _torch_run(lambda p: prodigyopt.Prodigy(p, lr=kw.get("learning_rate", 1.0), betas=_betas(kw), **names),
                      lambda opt: opt.param_groups[0]["d"], init, grad, steps)


def _optax_prodigy(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    import optax

    transform = optax.contrib.prodigy(kw.get("learning_rate", 1.0), betas=_betas(kw), beta3=kw.get("beta3"),
                                      eps=kw.get("eps", 1e-8), estim_lr0=kw.get("d0", 1e-6),
                                      estim_lr_coef=kw.get("d_coef", 1.0), weight_decay=kw.get("weight_decay", 0.0),
                                      safeguard_warmup=kw.get("safeguard_warmup", False))
    return optax_run(transform, lambda s: float(s.estim_lr), init, grad, steps)


def _dog_optimizer(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    import dog

    names = {k: v for k, v in kw.items() if k not in ("learning_rate", "layerwise")}
    cls = dog.LDoG if kw.get("layerwise") else dog.DoG
    return _torch_run(lambda p: cls(p, lr=kw.get("learning_rate", 1.0), **names),
                      lambda opt: [float(e) for e in opt.param_groups[0]["eta"]], init, grad, steps)


def _optax_dog(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    import optax

    init_step = (("learning_rate", kw["init_eta"]) if kw.get("init_eta") is not None
                 else ("heuristic", kw.get("reps_rel", 1e-6)))
    transform = optax.contrib.dog(kw.get("learning_rate", 1.0), init_step=init_step, eps=kw.get("eps", 1e-8),
                                  weight_decay=kw.get("weight_decay"))
    return optax_run(transform, lambda s: None, init, grad, steps)


def _optax_dowg(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    import optax

    transform = optax.contrib.dowg(kw.get("learning_rate", 1.0), init_estim_sq_dist=kw.get("init_estim_sq_dist"),
                                   eps=kw.get("eps", 1e-4), weight_decay=kw.get("weight_decay"))
    return optax_run(transform, lambda s: None, init, grad, steps)


def _dadaptation(cls_name: str) -> Callable:
    def run_it(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
        import dadaptation

        names = {k: v for k, v in kw.items() if k not in ("learning_rate", "b1", "b2")}
        if cls_name == "DAdaptAdam":
            names["betas"] = _betas(kw)
        cls = getattr(dadaptation, cls_name)
        return _torch_run(lambda p: cls(p, lr=kw.get("learning_rate", 1.0), **names),
                          lambda opt: opt.param_groups[0]["d"], init, grad, steps)

    return run_it


def _optax_dadapt_adamw(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    import optax

    transform = optax.contrib.dadapt_adamw(kw.get("learning_rate", 1.0), betas=_betas(kw), eps=kw.get("eps", 1e-8),
                                           estim_lr0=kw.get("d0", 1e-6), weight_decay=kw.get("weight_decay", 0.0))
    return optax_run(transform, lambda s: float(s.estim_lr), init, grad, steps)


def _flat(arrays: Sequence[Any]) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a)) for a in arrays])


def _schedulefree(cls_name: str) -> Callable:
    """``schedulefree``'s optimizer ``cls_name`` (train mode); the estimate is ``x`` after each step:
    the reference versions' ``state["x"]``, else what ``eval()`` computes, ``y.lerp(z, 1 - 1/β1)``,
    without touching the parameters."""

    def run_it(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
        import schedulefree

        names = {k: v for k, v in kw.items() if k not in ("learning_rate", "b1", "b2")}
        if "AdamW" in cls_name:
            names["betas"] = _betas(kw)

        def make(params: list) -> Any:
            opt = getattr(schedulefree, cls_name)(params, lr=kw.get("learning_rate", 0.0025 if "AdamW" in cls_name
                                                                     else 1.0), **names)
            opt.train()
            return opt

        def estimate(opt: Any) -> np.ndarray:
            group = opt.param_groups[0]
            b1 = group["betas"][0] if "betas" in group else group["momentum"]
            params = group["params"]
            if "x" in opt.state[params[0]]:
                return _flat([opt.state[p]["x"].numpy() for p in params])
            return _flat([p.lerp(opt.state[p]["z"], 1 - 1 / b1).numpy() for p in params])

        return _torch_run(make, estimate, init, grad, steps)

    return run_it


def _optax_schedule_free(name: str) -> Callable:
    def run_it(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
        import optax

        warmup = kw.get("warmup_steps") or None
        common = {"warmup_steps": warmup, "weight_lr_power": kw.get("weight_lr_power", 2.0)}
        if name == "schedule_free_adamw":
            transform = optax.contrib.schedule_free_adamw(
                kw.get("learning_rate", 0.0025), b1=kw.get("b1", 0.9), b2=kw.get("b2", 0.999),
                eps=kw.get("eps", 1e-8), weight_decay=kw.get("weight_decay", 0.0), **common)
        else:
            transform = optax.contrib.schedule_free_sgd(
                kw.get("learning_rate", 1.0), b1=kw.get("momentum", 0.9), weight_decay=kw.get("weight_decay"),
                **common)
        return optax_run(transform, lambda s, p: _flat(optax.contrib.schedule_free_eval_params(s, p)),
                         init, grad, steps, with_params=True)

    return run_it


def _mechanize(kw: dict, init: list, grad: Callable, steps: int) -> tuple[list, list]:
    """``mechanic_pytorch.mechanize(torch.optim.SGD / AdamW)``; the estimate is the scale ``Σ s``.

    Its scalar state is made with torch's default dtype: float64 for this run."""
    import mechanic_pytorch
    import torch

    kwargs = dict(kw)
    name, inner = kwargs.pop("inner")
    inner = dict(inner)
    lr = inner.pop("learning_rate")
    if name == "adamw":
        cls, inner = torch.optim.AdamW, {"betas": (inner.pop("b1", 0.9), inner.pop("b2", 0.999)), **inner}
        inner.setdefault("weight_decay", 1e-2)
    else:
        cls = torch.optim.SGD
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _torch_run(lambda p: mechanic_pytorch.mechanize(cls, **kwargs)(p, lr=lr, **inner),
                          lambda opt: float(opt.state["_mechanic"]["s"].sum()), init, grad, steps)
    finally:
        torch.set_default_dtype(default)


# upstream -> (the modules it needs, its run: (adaptlr kwargs, init, grad, steps) -> (trajectory, estimates))
_REFERENCES: dict[str, tuple[tuple[str, ...], Callable]] = {
    "prodigyopt.Prodigy": (("torch", "prodigyopt"), _prodigyopt),
    "optax.contrib.prodigy": (("jax", "optax"), _optax_prodigy),
    "dog_optimizer.DoG": (("torch", "dog"), _dog_optimizer),
    "optax.contrib.dog": (("jax", "optax"), _optax_dog),
    "optax.contrib.dowg": (("jax", "optax"), _optax_dowg),
    "dadaptation.DAdaptAdam": (("torch", "dadaptation"), _dadaptation("DAdaptAdam")),
    "dadaptation.DAdaptSGD": (("torch", "dadaptation"), _dadaptation("DAdaptSGD")),
    "optax.contrib.dadapt_adamw": (("jax", "optax"), _optax_dadapt_adamw),
    "schedulefree.AdamWScheduleFree": (("torch", "schedulefree"), _schedulefree("AdamWScheduleFree")),
    "schedulefree.AdamWScheduleFreeReference": (("torch", "schedulefree"),
                                                _schedulefree("AdamWScheduleFreeReference")),
    "schedulefree.SGDScheduleFree": (("torch", "schedulefree"), _schedulefree("SGDScheduleFree")),
    "schedulefree.SGDScheduleFreeReference": (("torch", "schedulefree"), _schedulefree("SGDScheduleFreeReference")),
    "optax.contrib.schedule_free_adamw": (("jax", "optax"), _optax_schedule_free("schedule_free_adamw")),
    "optax.contrib.schedule_free_sgd": (("jax", "optax"), _optax_schedule_free("schedule_free_sgd")),
    "mechanic_pytorch.mechanize": (("torch", "mechanic_pytorch"), _mechanize),
}


def missing_modules(case: UpstreamCase) -> list[str]:
    """The modules ``case``'s upstream needs that cannot be imported."""
    import importlib.util

    return [m for m in _REFERENCES[case.upstream][0] if importlib.util.find_spec(m) is None]


def reference(case: UpstreamCase, init: list, grad: Callable, steps: int = STEPS) -> tuple[list, list]:
    """The upstream run of ``case``: parameters after each step, and the estimate after each step
    (``d``; DoG: ``η`` per group or tensor; None where the upstream state does not keep it)."""
    return _REFERENCES[case.upstream][1](case.kwargs, init, grad, steps)


def run(opt: Any, backend: Backend, init: list, grad: Callable, steps: int = STEPS,
        step: Callable | None = None, on_step: Callable[[Any], None] | None = None) -> tuple[list, Any]:
    """adaptlr's run of ``opt`` on ``backend``: parameters after each step (NumPy), and the final state.

    ``step`` replaces ``opt.update`` (e.g. ``jax.jit(opt.update)``); ``on_step(state)`` runs after each
    step (the tests record the estimates with it)."""
    import adaptlr

    params = [backend.asarray(p) for p in init]
    state = opt.init(params)
    step = step or opt.update
    trajectory = []
    for t in range(steps):
        grads = [backend.asarray(g) for g in grad([backend.to_numpy(p) for p in params], t)]
        updates, state = step(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        trajectory.append([backend.to_numpy(p) for p in params])
        if on_step is not None:
            on_step(state)
    return trajectory, state


def column_errors(case: UpstreamCase, init: list, grad: Callable, expected: list,
                  columns: Sequence[str] = TABLE_COLUMNS) -> list[float]:
    """``max_rel_err`` of adaptlr's run of ``case`` against ``expected``, per column: a backend name
    of :data:`adaptlr.conformance.backends.BACKENDS`, or ``"jax (jit)"`` (JAX with ``jax.jit(opt.update)``)."""
    from adaptlr.conformance.backends import BACKENDS

    errors = []
    for name in columns:
        opt = case.build()
        step = None
        if name == "jax (jit)":
            import jax

            step = jax.jit(opt.update)
        backend = BACKENDS["jax" if name == "jax (jit)" else name]
        errors.append(max_rel_err(run(opt, backend, init, grad, step=step)[0], expected))
    return errors


def agreement_table(cases: Sequence[UpstreamCase], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The Markdown table of the docs: one row per case (its own problem, ``problem(noise=case.noise)``),
    :func:`column_errors` per column."""
    lines = ["| algorithm | upstream | settings | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for case in cases:
        init, grad = problem(noise=case.noise)
        errors = column_errors(case, init, grad, reference(case, init, grad)[0], columns)
        lines.append(f"| {case.algorithm} | {case.upstream} | {case.settings} | "
                     + " | ".join(f"{e:.1e}" for e in errors) + " |")
    return "\n".join(lines)


def _final_estimate(state: Any, backend: Backend, params: list) -> np.ndarray:
    """The estimate after the last step as the upstream reports it: DoG's step size ``α·η`` per
    tensor (:func:`adaptlr.learning_rates`), else ``d`` (copied to the host by ``backend``)."""
    import adaptlr
    from adaptlr.mechanic import MechanicState
    from adaptlr.schedule_free import ScheduleFreeState

    mechanic = [s for s in state.adaptations if isinstance(s, MechanicState)]
    if mechanic:  # the scale Σ s
        return np.array([float(backend.to_numpy(mechanic[0].total()))])
    schedule_free = [s for s in state.adaptations if isinstance(s, ScheduleFreeState)]
    if schedule_free:  # the evaluation parameters x = (y - (1-β1)·z)/β1, from the last step's y
        own = schedule_free[0]
        b1 = float(backend.to_numpy(own.b1))
        y = _flat(params)  # host copies already
        z = _flat([backend.to_numpy(p) for p in own.z])
        return (y - (1.0 - b1) * z) / b1
    if hasattr(state.base, "eta"):
        return np.array([float(backend.to_numpy(x)) for x in adaptlr.learning_rates(state)])
    return np.array([float(backend.to_numpy(state.base.d))])


def _estimate_error(final: np.ndarray, upstream: Any) -> float:
    expected = np.atleast_1d(np.asarray(upstream, dtype=np.float64))
    return float(np.max(np.abs(final - expected)) / np.max(np.abs(expected)))


def upstream_rows(backends: Sequence[Backend], steps: int, cases: Sequence[UpstreamCase] | None = None) -> list[Row]:
    """One row per case and backend (float64, ``max(steps, STEPS)`` steps): the parameters' error
    against the upstream run (``max_rel_err_params``) and that of the final estimate
    (``max_rel_err_lr``, where the upstream exposes it)."""
    steps = max(steps, STEPS)
    rows = []
    for case in cases or CASES:
        init, grad = problem(noise=case.noise)
        name = f"{case.algorithm} vs {case.upstream}"
        missing = missing_modules(case)
        if missing:
            rows.append(Row("upstream", name, case.settings, "*", "*", "float64", steps, status="skipped",
                            reason=f"not installed: {', '.join(missing)}"))
            continue
        expected, estimates = reference(case, init, grad, steps)
        for backend in backends:
            start = time.perf_counter()
            row = Row("upstream", name, case.settings, backend.name, backend.device_name, "float64", steps,
                      tolerance=case.tolerance)
            if not backend.supports("float64"):
                row.status, row.reason = "skipped", "no float64"
                rows.append(row)
                continue
            trajectory, state = run(case.build(), backend, init, grad, steps)
            row.max_rel_err_params = max_rel_err(trajectory, expected)
            if estimates[-1] is not None:
                row.max_rel_err_lr = _estimate_error(_final_estimate(state, backend, trajectory[-1]), estimates[-1])
            worst = max(row.max_rel_err_params, row.max_rel_err_lr or 0.0)
            row.status = "pass" if math.isfinite(worst) and worst <= row.tolerance else "fail"
            row.seconds = time.perf_counter() - start
            rows.append(row)
    return rows
