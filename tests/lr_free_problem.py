"""The problem of the learning-rate-free tests (test_prodigy, test_dog, test_dadapt) and their docs table.

``Σ a/2·(θ-c)² + 0.1·cos θ`` over parameters of shapes (3, 4), (5,), (2, 3, 2), () and (7,), with a
fixed pseudo-random noise on the gradient (a function of the step ``t``, so every run sees the same
gradients). Without the noise the learning-rate-free methods overestimate the step on this small
problem (D-Adapt Adam: ``d ≈ 3`` for a distance ≈ 1) and oscillate around the minimum chaotically,
which amplifies rounding differences between two correct implementations (to 1e-10 .. 1e-6 after
200 steps); with it the run contracts, as a stochastic training run does.
"""

from __future__ import annotations

import numpy as np

SHAPES = [(3, 4), (5,), (2, 3, 2), (), (7,)]
STEPS = 200


def problem(seed: int = 20261202, noise: float = 0.3):
    """``(init, grad)``: the initial parameters and ``grad(params, t)``, the gradient of step ``t``."""
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in SHAPES]
    centres = [rng.normal(size=s) for s in SHAPES]
    coeffs = [rng.uniform(0.5, 2.0, size=s) for s in SHAPES]

    def grad(params, t):
        step_rng = np.random.default_rng([seed, t])
        return [a * (p - c) - 0.1 * np.sin(p) + noise * step_rng.normal(size=np.shape(p))
                for p, a, c in zip(params, coeffs, centres)]

    return init, grad
