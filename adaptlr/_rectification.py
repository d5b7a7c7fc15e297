"""The variance rectification term of RAdam (Liu et al., 2020), shared by RAdam and AdaBelief.

    ρ∞  = 2/(1-β2) - 1
    ρ_t = ρ∞ - 2t·β2^t / (1-β2^t)
    r_t = sqrt((ρ_t-4)(ρ_t-2)ρ∞ / ((ρ∞-4)(ρ∞-2)ρ_t))        (defined where ρ_t > 4)

At the first rectified steps ``ρ_t - 4`` is the difference of two nearly equal numbers (for
β2 = 0.999, ``2t·β2^t/(1-β2^t) ≈ 1993`` against ``ρ∞ = 1999``), so a relative change δ of ``β2^t``
(one ulp of a backend's ``pow``) changes ``r_t`` by ``κ·δ`` with ``κ`` up to ~1e5:
:func:`rectification_condition` gives that ``κ``, which the tolerance rule of
:mod:`adaptlr.conformance.tolerances` uses.
"""

from __future__ import annotations

from typing import Any

from adaptlr import _validation as v

__all__ = ["rectification", "rectification_condition"]


def rectification(xp: Any, t: Any, b2: float) -> tuple[Any, Any]:
    """``(ρ_t, r_t)`` as 0-D arrays of ``t``'s dtype; ``r_t`` is 1 where it is undefined."""
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    b2_t = b2**t
    rho_t = rho_inf - 2.0 * t * b2_t / (1.0 - b2_t)
    defined = rho_t > 4.0
    safe_rho = xp.where(defined, rho_t, xp.asarray(5.0, dtype=t.dtype, device=v.device_of(t)))
    r_t = xp.sqrt((safe_rho - 4.0) * (safe_rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe_rho))
    return rho_t, r_t


def rectification_condition(b2: float, threshold: float = 5.0) -> float:
    """``max_t |∂ log r_t / ∂ log β2^t|`` over the rectified steps (``ρ_t > threshold``).

    ``log r_t = ½[log(ρ_t-4) + log(ρ_t-2) - log ρ_t] + const`` and ``∂ρ_t/∂b = -2t/(1-b)²`` with
    ``b = β2^t``, so ``κ_t = b·2t/(1-b)² · ½|1/(ρ_t-4) + 1/(ρ_t-2) - 1/ρ_t|``. It falls from the
    first rectified step on (κ ≈ 9.7e4 for β2 = 0.999, 9.9e2 for β2 = 0.99).
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    worst, t = 1.0, 0
    if rho_inf <= threshold:  # ρ_t < ρ∞: never rectified
        return worst
    while True:
        t += 1
        b = b2**t
        rho = rho_inf - 2.0 * t * b / (1.0 - b)
        if rho <= threshold:
            continue
        kappa = b * 2.0 * t / (1.0 - b) ** 2 * 0.5 * abs(1.0 / (rho - 4.0) + 1.0 / (rho - 2.0) - 1.0 / rho)
        if kappa < worst:
            return worst
        worst = kappa
