"""The problems the conformance suite runs every algorithm on.

A :class:`Problem` is a gradient oracle written once against the array API, so the same problem
runs on every backend: initial parameters and constant data are made in NumPy float64 and moved to
the backend (in the row's dtype) once; ``grad(xp, params, data, i)`` gives the gradient tree at
``params`` for step index ``i`` (0 on the first step). Pseudo-random parts (noise, a moving target)
are precomputed per step into ``data``, so every backend sees the same numbers.

Each problem is designed so that the discrete decisions of the adaptations have margins far from
zero (``sign_pattern`` for ActiveLR and HD; ``rotating_target`` makes the AutoDrop angle settle
geometrically, so |Δ| passes θ quickly); the runner measures the margins anyway and reports
"ill-conditioned" where one is below the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PROBLEMS", "Problem", "register_problem"]

Tree = Any


@dataclass(frozen=True)
class Problem:
    """A deterministic gradient oracle.

    Attributes:
        name: registry name.
        description: one line for the report.
        params: ``() -> tree of float64 NumPy arrays``, the initial parameters.
        data: ``(steps) -> dict of float64 NumPy arrays``, constants moved to the backend once.
        grad: ``(xp, params, data, i) -> gradient tree`` at ``params`` for step index ``i``.
        condition: a factor (≥ 1) by which the problem amplifies rounding errors; it multiplies the
            tolerance (1 for contracting problems, larger for curved valleys such as Rosenbrock).
    """

    name: str
    description: str
    params: Callable[[], Tree]
    grad: Callable[[Any, Tree, dict, int], Tree]
    data: Callable[[int], dict] = field(default=lambda steps: {})
    condition: float = 1.0


PROBLEMS: dict[str, Problem] = {}


def register_problem(problem: Problem) -> Problem:
    """Add ``problem`` to the registry (replacing one of the same name) and return it.

    Args:
        problem: a :class:`Problem` (its ``grad`` written against the array API, ``xp``).

    Returns:
        ``problem``, so that ``register_problem(Problem(...))`` can be assigned.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a conformance Problem, got {type(problem).__name__}")
    PROBLEMS[problem.name] = problem
    return problem


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(20261122 + seed)


# -- a separable quadratic on a matrix and a vector (two leaves, so per-tensor rules are tested) -----

def _quadratic_constants() -> dict:
    rng = _rng(1)
    return {
        "hw": rng.uniform(0.5, 2.0, (3, 4)), "hb": rng.uniform(0.5, 2.0, (4,)),
        "w_star": rng.uniform(-1.0, 1.0, (3, 4)), "b_star": rng.uniform(-1.0, 1.0, (4,)),
    }


def _quadratic_params() -> Tree:
    rng = _rng(2)
    return {"w": rng.uniform(-2.0, 2.0, (3, 4)), "b": rng.uniform(-2.0, 2.0, (4,))}


def _quadratic_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    return {"w": d["hw"] * (p["w"] - d["w_star"]), "b": d["hb"] * (p["b"] - d["b_star"])}


def _noisy_quadratic_data(steps: int) -> dict:
    """Fixed noise for the noisy quadratic: epoch-summed gradients are a decaying pull towards the
    minimiser plus noise, so their signs flip now and then with margins spread over (0, 1]."""
    rng = _rng(3)
    data = _quadratic_constants()
    data["noise_w"] = 0.2 * rng.standard_normal((steps, 3, 4))
    data["noise_b"] = 0.2 * rng.standard_normal((steps, 4))
    return data


def _noisy_quadratic_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    return {"w": d["hw"] * (p["w"] - d["w_star"]) + d["noise_w"][i, ...],
            "b": d["hb"] * (p["b"] - d["b_star"]) + d["noise_b"][i, ...]}


# -- linear least squares -----------------------------------------------------------------------

def _lstsq_data(steps: int = 0) -> dict:
    rng = _rng(4)
    x = rng.standard_normal((32, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.7 + 0.3 * rng.standard_normal(32)
    return {"x": x, "y": y}


def _lstsq_params() -> Tree:
    return {"w": np.zeros(4), "b": np.zeros(1)}


def _lstsq_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    """Gradient of ``1/(2n)·‖X w + b - y‖²``."""
    n = d["y"].shape[0]
    r = d["x"] @ p["w"] + p["b"] - d["y"]
    return {"w": (xp.matrix_transpose(d["x"]) @ r) / n, "b": xp.reshape(xp.sum(r), (1,)) / n}


def lstsq_minimiser() -> np.ndarray:
    """The least-squares minimiser ``(w, b)`` from ``np.linalg.lstsq``."""
    d = _lstsq_data()
    design = np.concatenate([d["x"], np.ones((d["x"].shape[0], 1))], axis=1)
    return np.linalg.lstsq(design, d["y"], rcond=None)[0]


# -- ridge-regularised logistic regression ------------------------------------------------------

LOGISTIC_RIDGE = 0.01


def _logistic_data(steps: int = 0) -> dict:
    rng = _rng(5)
    x = rng.standard_normal((40, 3))
    logits = x @ np.array([1.5, -1.0, 0.5]) + 0.3
    y = (rng.uniform(size=40) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    return {"x": x, "y": y}


def _logistic_params() -> Tree:
    return {"w": np.zeros(3), "b": np.zeros(1)}


def _logistic_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    """Gradient of ``mean(log(1 + exp(z)) - y·z) + (ridge/2)·‖w‖²`` with ``z = X w + b``."""
    n = d["y"].shape[0]
    z = d["x"] @ p["w"] + p["b"]
    r = 1.0 / (1.0 + xp.exp(-z)) - d["y"]
    return {"w": (xp.matrix_transpose(d["x"]) @ r) / n + LOGISTIC_RIDGE * p["w"],
            "b": xp.reshape(xp.sum(r), (1,)) / n}


def logistic_minimiser(iterations: int = 50) -> np.ndarray:
    """The optimum ``(w, b)`` of the logistic problem by Newton's method (float64)."""
    d = _logistic_data()
    x, y = d["x"], d["y"]
    n = y.shape[0]
    design = np.concatenate([x, np.ones((n, 1))], axis=1)
    ridge = np.diag([LOGISTIC_RIDGE] * x.shape[1] + [0.0])
    theta = np.zeros(design.shape[1])
    for _ in range(iterations):
        prob = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (prob - y) / n + ridge @ theta
        hess = design.T @ (design * (prob * (1 - prob))[:, None]) / n + ridge
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-15:
            break
    return theta


# -- Rosenbrock --------------------------------------------------------------------------------

def _rosenbrock_params() -> Tree:
    return {"xy": np.array([-1.2, 1.0])}


def _rosenbrock_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    """Gradient of ``(1 - x)² + 100·(y - x²)²``."""
    x, y = p["xy"][0], p["xy"][1]
    gx = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x)
    gy = 200.0 * (y - x * x)
    return {"xy": xp.stack([gx, gy])}


# -- a target rotating in a plane (AutoDrop's angle settles at a known value) --------------------

ROTATION_PER_STEP_DEG = 18.0


def _rotating_data(steps: int) -> dict:
    angles = np.radians(ROTATION_PER_STEP_DEG) * np.arange(1, steps + 1)
    return {"target_x": np.stack([np.cos(angles), np.sin(angles)], axis=1),
            "target_z": 0.5 * np.stack([np.cos(angles + 1.0), np.sin(angles + 1.0)], axis=1)}


def _rotating_params() -> Tree:
    return {"x": np.array([0.5, -0.5]), "z": np.zeros(2)}


def _rotating_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    """Gradient of ``½‖x - c_i‖² + ½‖z - c'_i‖²``: two targets circling the origin, 18° further each
    step, so the displacement over an epoch of 5 steps turns by 90° once the tracking settles."""
    return {"x": p["x"] - d["target_x"][i, ...], "z": p["z"] - d["target_z"][i, ...]}


# -- a linear, parameter-independent gradient with a designed sign pattern ----------------------

SIGN_PATTERN_EPOCH = 5


def _sign_pattern_data(steps: int) -> dict:
    """``g_i = sign · m_i`` with magnitudes in [0.2, 1] and signs constant within each block of
    ``SIGN_PATTERN_EPOCH`` steps. At a block boundary all signs flip together with probability 0.4
    and each sign flips on its own with probability 0.1, so every epoch sum, every product of
    successive gradients and every cosine between successive gradients is far from zero."""
    rng = _rng(7)
    blocks = steps // SIGN_PATTERN_EPOCH + 1
    together = np.where(rng.uniform(size=(blocks, 1)) < 0.4, -1.0, 1.0)
    alone = np.where(rng.uniform(size=(blocks, 16)) < 0.1, -1.0, 1.0)
    signs = np.cumprod(together * alone, axis=0) * np.where(rng.uniform(size=16) < 0.5, -1.0, 1.0)
    signs = np.repeat(signs, SIGN_PATTERN_EPOCH, axis=0)[:steps]
    g = signs * rng.uniform(0.2, 1.0, (steps, 16))
    return {"gw": g[:, :12].reshape(steps, 3, 4), "gb": g[:, 12:]}


def _sign_pattern_grad(xp: Any, p: Tree, d: dict, i: int) -> Tree:
    return {"w": d["gw"][i, ...], "b": d["gb"][i, ...]}


for _problem in [
    Problem("quadratic", "separable quadratic, a 3x4 matrix and a 4-vector, curvatures in [0.5, 2]",
            _quadratic_params, _quadratic_grad, lambda steps: _quadratic_constants()),
    Problem("noisy_quadratic", "the quadratic plus fixed per-step Gaussian noise (sigma 0.2)",
            _quadratic_params, _noisy_quadratic_grad, _noisy_quadratic_data),
    Problem("least_squares", "linear least squares, 32 samples, 4 features and a bias",
            _lstsq_params, _lstsq_grad, _lstsq_data),
    Problem("logistic", "ridge logistic regression, 40 samples, 3 features and a bias",
            _logistic_params, _logistic_grad, _logistic_data),
    Problem("rosenbrock", "Rosenbrock from (-1.2, 1)", _rosenbrock_params, _rosenbrock_grad, condition=100.0),
    Problem("sign_pattern", "linear loss whose gradient (independent of the params) has block-constant signs",
            _quadratic_params, _sign_pattern_grad, _sign_pattern_data),
    Problem("rotating_target", "two targets circling the origin, 18 degrees a step (90 per epoch)",
            _rotating_params, _rotating_grad, _rotating_data),
]:
    register_problem(_problem)
