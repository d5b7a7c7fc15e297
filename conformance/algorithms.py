"""The algorithms the conformance suite checks, and how to register your own.

An :class:`Algorithm` names a factory (called with the ``adaptlr`` module, so entries whose
functions do not exist yet are reported as skipped rather than crashing the import), the problems
it runs on, and optionally the discrete decisions to compare exactly:

- :class:`EpochSignFlips` (ActiveLR): at every epoch end ``t ≥ 2S``, whether γ grew or shrank per
  element; margin ``min(|C|/Σ|g|, |G_prev|/Σ|g_prev|)`` (how far each epoch sum is from 0 relative
  to the gradients that formed it).
- :class:`HypergradientSigns` (HD, DSA with a one-factor structure): every step ``t ≥ 2``, whether
  the learning rate rose or fell; margin ``|cos(g_t, u_{t-1})|`` over the granularity's groups
  (for "element": ``min(|g_e|/‖g‖∞, |u_e|/‖u‖∞)``).
- :class:`AngleDrops` (AutoDrop): the steps where the learning rate drops; margin ``||Δ_e| - θ_e|``
  in degrees over the epochs of the run, from the angles of the reference trajectory.

A user's optimizer (any object with ``init(params)`` and ``update(grads, state, params)``) is added
with :func:`register_algorithm`; when its state is not an adaptlr ``OptimizerState`` the learning
rates are reported as unavailable and only the parameter trajectory is compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AngleDrops",
    "EpochSignFlips",
    "HypergradientSigns",
    "register_algorithm",
]

S = 5  # steps per epoch of every epoch-based entry (30 epochs in the default 150 steps)


@dataclass(frozen=True)
class EpochSignFlips:
    """ActiveLR's decision: γ grows (+1) or shrinks (-1) per element at each epoch end t ≥ 2S."""

    steps_per_epoch: int


@dataclass(frozen=True)
class HypergradientSigns:
    """HD's decision: the sign of the hypergradient, seen as the sign of the learning-rate change."""

    granularity: str  # "global", "tensor" or "element"


@dataclass(frozen=True)
class AngleDrops:
    """AutoDrop's decision: the learning rate drops (-1) at the first step of an epoch, or not (0)."""

    steps_per_epoch: int
    theta: float
    patience_epochs: int
    drop_factor: float
    theta_max: float
    grow_theta: bool = True


Decisions = EpochSignFlips | HypergradientSigns | AngleDrops


@dataclass(frozen=True)
class Algorithm:
    """One optimizer configuration to check.

    Attributes:
        name: registry name (shown in the report).
        factory: ``(adaptlr module) -> optimizer``; an optimizer is anything with ``init(params)``
            and ``update(grads, state, params) -> (updates, state)``.
        problems: the problems (names in :data:`PROBLEMS`) it runs on across backends.
        requires: names that must exist in ``adaptlr`` (else the rows are "skipped: not available").
        decisions: the discrete decisions to compare exactly, or None.
        condition: a factor (≥ 1) by which the algorithm's dynamics amplify rounding errors; it
            multiplies the tolerance (see :mod:`adaptlr.conformance.tolerances`). The condition of
            its step scalars comes from the optimizer itself (:meth:`scalar_condition`).
        still_at_zero_lr: whether the parameters stay put when the base's learning rate is 0 (False
            where the algorithm adapts the rate away from 0, as additive HD does); checked by the
            property harness, ``tests/test_properties.py``.
    """

    name: str
    factory: Callable[[Any], Any]
    problems: tuple[str, ...]
    requires: tuple[str, ...] = ()
    decisions: Decisions | None = None
    condition: float = 1.0
    still_at_zero_lr: bool = True

    def missing(self) -> list[str]:
        """The required ``adaptlr`` names that do not exist (yet)."""
        import adaptlr

        return [n for n in self.requires if getattr(adaptlr, n, None) is None]

    def scalar_condition(self) -> float:
        """The optimizer's ``scalar_condition`` (1 for optimizers that do not define one)."""
        return float(getattr(self.build(), "scalar_condition", 1.0))

    def build(self) -> Any:
        import adaptlr

        return self.factory(adaptlr)


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(
    name: str,
    factory: Callable[[], Any] | Callable[[Any], Any],
    problems: Sequence[str] = ("noisy_quadratic",),
    *,
    requires: Sequence[str] = (),
    decisions: Decisions | None = None,
    takes_module: bool = False,
    condition: float = 1.0,
    still_at_zero_lr: bool = True,
) -> Algorithm:
    """Add an optimizer to the registry (replacing an entry of the same name).

    Args:
        name: the name shown in the report and accepted by ``--algorithms``.
        factory: a zero-argument callable returning a fresh optimizer (an object with ``init`` and
            ``update`` as in optax), or, with ``takes_module=True``, a callable taking the ``adaptlr``
            module.
        problems: names of registered problems to run it on (the first one in a default run, all of
            them with ``--all-problems``).
        requires: ``adaptlr`` attribute names it needs (missing ones make its rows "skipped").
        decisions: an :class:`EpochSignFlips`, :class:`HypergradientSigns` or :class:`AngleDrops`
            describing discrete decisions to compare exactly, or None.
        takes_module: see ``factory``.
        condition: a factor (≥ 1) multiplying the tolerance where the rule amplifies rounding errors.
        still_at_zero_lr: False where the parameters move even with a base learning rate of 0.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    from adaptlr.conformance.problems import PROBLEMS

    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown or not problems:
        raise ValueError(f"problems {list(unknown) or '[]'} not registered; valid: {', '.join(PROBLEMS)}")
    call = factory if takes_module else (lambda _module: factory())
    algorithm = Algorithm(name, call, tuple(problems), tuple(requires), decisions, float(condition),
                          bool(still_at_zero_lr))
    ALGORITHMS[name] = algorithm
    return algorithm


# -- the built-in entries -----------------------------------------------------------------------

_BASES: dict[str, Callable[[Any], Any]] = {
    "sgd": lambda a: a.sgd(0.1),
    "sgdm": lambda a: a.sgd(0.05, momentum=0.9),
    "sgdn": lambda a: a.sgd(0.05, momentum=0.9, nesterov=True),
    "sgdm-damp-l2": lambda a: a.sgd(0.05, momentum=0.5, dampening=0.3, weight_decay=0.01),
    "adam": lambda a: a.adam(0.05),
    "adam-l2": lambda a: a.adam(0.05, weight_decay=0.01),
    "adamw": lambda a: a.adamw(0.05, weight_decay=0.01),
    "radam": lambda a: a.radam(0.05),
    "radam-decoupled": lambda a: a.radam(0.05, weight_decay=0.01, decoupled_weight_decay=True),
    "adabelief": lambda a: a.adabelief(0.05),
}
_BASE_NAMES = {"sgd": "sgd", "sgdm": "sgd", "sgdn": "sgd", "sgdm-damp-l2": "sgd", "adam": "adam", "adam-l2": "adam",
               "adamw": "adamw", "radam": "radam", "radam-decoupled": "radam", "adabelief": "adabelief"}


def _register_defaults() -> None:
    for name, make in _BASES.items():
        problems = ("noisy_quadratic", "logistic") + (("rosenbrock",) if name.startswith("adam") else ())
        register_algorithm(name, make, problems, requires=(_BASE_NAMES[name],), takes_module=True)

    # ActiveLR on four bases (a smaller base learning rate: γ grows to several times α).
    for base in ("sgd", "adamw", "radam", "adabelief"):
        def make(a: Any, base: str = base) -> Any:
            opt = _BASES[base](a) if base != "sgd" else a.sgd(0.02)
            return a.active(opt, steps_per_epoch=S, increase=0.2, decrease=0.5)

        register_algorithm(f"active({base})", make, ("sign_pattern", "noisy_quadratic"),
                           requires=("active", _BASE_NAMES[base]), decisions=EpochSignFlips(S), takes_module=True)

    # AutoDrop on a rotating target: the angle between epoch displacements settles at 90 degrees, and
    # after each drop |Δ| decays geometrically through θ (margins measured: ≥ 2.7e-4, see the docs).
    drops = {"theta": 2.0, "patience_epochs": 3, "drop_factor": 0.5, "theta_max": 4.0}
    for base, make_base in (("sgd", lambda a: a.sgd(0.3)), ("sgdn", lambda a: a.sgd(0.1, momentum=0.5, nesterov=True)),
                            ("adam", lambda a: a.adam(0.1))):
        def make(a: Any, make_base: Callable = make_base) -> Any:
            return a.autodrop(make_base(a), steps_per_epoch=S, **drops)

        register_algorithm(f"autodrop({base})", make, ("rotating_target",), requires=("autodrop", _BASE_NAMES[base]),
                           decisions=AngleDrops(S, **drops), takes_module=True)

    # Hypergradient descent: both modes, all granularities, on SGD and Adam.
    hyper_lr = {("additive", "sgd"): 2e-3, ("multiplicative", "sgd"): 0.02,
                ("additive", "adam"): 1e-3, ("multiplicative", "adam"): 0.02}
    for base, make_base in (("sgd", lambda a: a.sgd(0.05)), ("adam", lambda a: a.adam(0.02))):
        for mode in ("additive", "multiplicative"):
            for granularity in ("global", "tensor", "element"):
                def make(a: Any, make_base: Callable = make_base, mode: str = mode, granularity: str = granularity,
                         beta: float = hyper_lr[mode, base]) -> Any:
                    return a.hypergradient(make_base(a), hyper_lr=beta, mode=mode, granularity=granularity)

                register_algorithm(f"hd-{mode[:4]}-{granularity}({base})", make, ("sign_pattern", "noisy_quadratic"),
                                   requires=("hypergradient", base), decisions=HypergradientSigns(granularity),
                                   takes_module=True, still_at_zero_lr=mode == "multiplicative")
    # (additive HD: a ← a + β·H moves the rate away from 0; a multiplicative one stays at 0)
    register_algorithm("sgd_hd", lambda a: a.sgd_hd(0.05, hyper_lr=2e-3), ("sign_pattern", "noisy_quadratic"),
                       requires=("sgd_hd",), decisions=HypergradientSigns("global"), takes_module=True,
                       still_at_zero_lr=False)
    register_algorithm("adam_hd", lambda a: a.adam_hd(0.02, hyper_lr=1e-3), ("sign_pattern", "noisy_quadratic"),
                       requires=("adam_hd",), decisions=HypergradientSigns("global"), takes_module=True,
                       still_at_zero_lr=False)

    # DSA: the default structure (tensor, row, col / tensor, element), and one factor per element.
    for base, make_base in (("sgd", lambda a: a.sgd(0.05)), ("adam", lambda a: a.adam(0.02))):
        register_algorithm(f"dsa({base})", lambda a, mb=make_base: a.dsa(mb(a), hyper_lr=0.02),
                           ("sign_pattern", "noisy_quadratic"), requires=("dsa", base), takes_module=True)
        register_algorithm(f"dsa-element({base})",
                           lambda a, mb=make_base: a.dsa(mb(a), hyper_lr=0.02, structure=("element",)),
                           ("sign_pattern",), requires=("dsa", base), decisions=HypergradientSigns("element"),
                           takes_module=True)

    # EG step-size adaptation: a global scale and per-tensor scales, on SGD with momentum and Adam.
    for base, make_base in (("sgdm", lambda a: a.sgd(0.05, momentum=0.9)), ("adam", lambda a: a.adam(0.02))):
        for scale in ("global", "tensor"):
            def make(a: Any, make_base: Callable = make_base, scale: str = scale) -> Any:
                return a.eg_step_size(make_base(a), scale_lr=0.05, gain_lr=0.05, scale=scale)

            register_algorithm(f"eg-{scale}({base})", make, ("noisy_quadratic", "sign_pattern"),
                               requires=("eg_step_size", _BASE_NAMES[base]), takes_module=True)

    # Learning-rate-free bases (issue 18); against their upstream packages: the "upstream" check.
    lr_free = {
        "prodigy": lambda a: a.prodigy(d0=1e-3, weight_decay=0.01, use_bias_correction=True),
        "dadapt_adam": lambda a: a.dadapt_adam(d0=1e-3, weight_decay=0.01, decouple=True),
        "dadapt_sgd": lambda a: a.dadapt_sgd(d0=1e-3, momentum=0.5),
        "dog": lambda a: a.dog(reps_rel=1e-4),
        "ldog": lambda a: a.dog(reps_rel=1e-4, layerwise=True),
        "dowg": lambda a: a.dowg(),
    }
    for name, make in lr_free.items():
        register_algorithm(name, make, ("noisy_quadratic", "logistic"), requires=("dog" if name == "ldog" else name,),
                           takes_module=True)

    # Wrappers of a whole optimizer (issue 19); against their upstream packages: the "upstream" check.
    register_algorithm("schedule_free_adamw",
                       lambda a: a.schedule_free_adamw(0.05, warmup_steps=3, weight_decay=0.01, r=0.5),
                       ("noisy_quadratic", "logistic"), requires=("schedule_free_adamw",), takes_module=True)
    register_algorithm("mechanic(sgdm)", lambda a: a.mechanic(a.sgd(0.05, momentum=0.5), s_init=1e-2),
                       ("noisy_quadratic", "logistic"), requires=("mechanic", "sgd"), takes_module=True)

    # A composition: AutoDrop around ActiveLR around AdamW.
    register_algorithm(
        "autodrop(active(adamw))",
        lambda a: a.autodrop(a.active(a.adamw(0.05, weight_decay=0.01), steps_per_epoch=S), steps_per_epoch=S,
                             **drops),
        ("rotating_target",), requires=("autodrop", "active", "adamw"), decisions=AngleDrops(S, **drops),
        takes_module=True)


_register_defaults()
