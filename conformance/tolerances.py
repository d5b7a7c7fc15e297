"""The one rule that derives every tolerance of the tests and of ``adaptlr conformance``.

Two implementations of the same optimizer differ by rounding. The rule bounds the normwise relative
error (``‖x - x_ref‖∞ / ‖x_ref‖∞``, per step and tensor) of a K-step trajectory by two terms::

    tol = 100 · sqrt(K) · eps(dtype) · c_problem · c_algorithm          (arithmetic in dtype)
        +   4 · eps(scalar dtype) · κ_scalars · c_problem                (step scalars)

1. Rounding in the parameter dtype. A contracting iteration does not amplify old rounding errors;
   over K steps they accumulate like a random walk (``sqrt(K)``); each step adds a few dozen
   roundings and float32 runs start from inputs rounded to float32 (the factor 100). ``c_problem``
   is > 1 where the problem amplifies a perturbation (Rosenbrock's curved valley: 100) and
   ``c_algorithm`` where the optimizer's dynamics do (1 for every built-in entry).
2. Step scalars. Bias corrections and RAdam's rectification are computed in the widest float of
   the device (float64; see :mod:`adaptlr._precision`) from ``β^t``, and two correct
   implementations of ``pow``/``exp`` may differ by an ulp or two (NumPy's AVX-512 ``pow`` differs
   from libm's, which torch.optim's Python floats use). ``κ_scalars`` (the optimizer's
   ``scalar_condition``: ``|∂ log(scalar) / ∂ log β^t|``, about 1e5 for RAdam's ``r_t`` at its
   first rectified step with β2 = 0.999, ``β/(1-β)`` for a bias correction) turns those 4 ulps into
   the relative error of the step size, which bounds the relative error it causes in the
   parameters. This term does not depend on the parameter dtype, since the scalars are not
   computed in it.

For K = 150: 2.7e-13 in float64, 1.46e-4 in float32, plus 8.7e-11 for RAdam/AdaBelief (β2 = 0.999).
No number here was tuned on one machine.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ROUNDING_FACTOR", "SCALAR_ULPS", "eps", "tolerance"]

ROUNDING_FACTOR = 100.0
SCALAR_ULPS = 4.0


def eps(dtype: str) -> float:
    """Machine epsilon of a float dtype named like ``"float32"`` (``"bfloat16"``: 2**-7)."""
    if dtype == "bfloat16":
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def tolerance(dtype: str, steps: int, condition: float = 1.0, scalar_condition: float = 1.0,
              scalar_dtype: str = "float64") -> float:
    """The allowed normwise relative error of a ``steps``-step trajectory (see the module docstring).

    Args:
        dtype: the parameter dtype's name.
        steps: K, the number of steps.
        condition: ``c_problem · c_algorithm`` (≥ 1).
        scalar_condition: ``κ_scalars`` of the optimizer (its ``scalar_condition``; ≥ 1).
        scalar_dtype: the dtype the step scalars are computed in (float32 for JAX without x64).
    """
    rounding = ROUNDING_FACTOR * math.sqrt(max(steps, 1)) * eps(dtype) * condition
    return rounding + SCALAR_ULPS * eps(scalar_dtype) * scalar_condition * condition
