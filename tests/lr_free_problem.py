"""The problem of the learning-rate-free tests (test_prodigy, test_dog, test_dadapt): the one of the
conformance suite's "upstream" rows (:func:`adaptlr.conformance.upstream.problem`, which says why
its gradients are noisy), and the run that records the estimate after each step."""

from collections.abc import Callable
from typing import Any

from conftest import max_rel_err

from adaptlr.conformance import upstream
from adaptlr.conformance.upstream import SHAPES, STEPS, problem

__all__ = ["SHAPES", "STEPS", "max_err_over_steps", "problem", "run"]


def run(opt: Any, backend: Any, init: list, grad: Callable, estimate: Callable[[Any], Any],
        step: Callable | None = None) -> tuple[list, list, Any]:
    """``(trajectory, estimate(state) after each step, final state)`` of ``opt`` on ``backend``."""
    estimates: list = []
    trajectory, state = upstream.run(opt, backend, init, grad, STEPS, step,
                                     on_step=lambda state: estimates.append(estimate(state)))
    return trajectory, estimates, state


def max_err_over_steps(trajectory: list, expected: list) -> float:
    """The largest normwise relative error over the steps of a trajectory."""
    return max(max_rel_err(a, e) for a, e in zip(trajectory, expected))
