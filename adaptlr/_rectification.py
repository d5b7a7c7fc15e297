"""The variance rectification term of RAdam (Liu et al., 2020), shared by RAdam and AdaBelief.

    ρ∞  = 2/(1-β2) - 1
    ρ_t = ρ∞ - 2t·β2^t / (1-β2^t)
    r_t = sqrt((ρ_t-4)(ρ_t-2)ρ∞ / ((ρ∞-4)(ρ∞-2)ρ_t))        (defined where ρ_t > 4)
"""

from __future__ import annotations

from typing import Any

__all__ = ["rectification"]


def rectification(xp: Any, t: Any, b2: float) -> tuple[Any, Any]:
    """``(ρ_t, r_t)`` as 0-D arrays of ``t``'s dtype; ``r_t`` is 1 where it is undefined."""
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    b2_t = b2**t
    rho_t = rho_inf - 2.0 * t * b2_t / (1.0 - b2_t)
    defined = rho_t > 4.0
    safe_rho = xp.where(defined, rho_t, xp.asarray(5.0, dtype=t.dtype, device=_device(xp, t)))
    r_t = xp.sqrt((safe_rho - 4.0) * (safe_rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe_rho))
    return rho_t, r_t


def _device(xp: Any, x: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(x)
