"""The dtype in which adaptations accumulate global sums (dot products, norms, scalars)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["accumulation_dtype"]


def accumulation_dtype(xp: Any, dtypes: Sequence[Any], device: Any) -> Any:
    """float64 where ``xp`` makes float64 arrays on ``device``, else the widest of ``dtypes``.

    JAX without ``jax_enable_x64`` silently gives float32 (and warns); PyTorch on MPS has no float64
    and raises. Both fall back to the widest parameter dtype.
    """
    float64 = getattr(xp, "float64", None)
    if float64 is not None:
        try:
            if "jax" in getattr(xp, "__name__", ""):  # the warning to silence; torch.compile cannot trace this
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    probe = xp.asarray(0.0, dtype=float64, device=device)
            else:
                probe = xp.asarray(0.0, dtype=float64, device=device)
            if probe.dtype == float64:
                return float64
        except (TypeError, RuntimeError, ValueError):
            pass
    return xp.result_type(*dtypes)
