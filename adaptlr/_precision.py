"""The dtypes of step scalars, global sums and the step counter.

One rule for every algorithm: whatever depends on the step or on the hyper-parameters (bias
corrections, RAdam's ``ρ_t`` and ``r_t``, schedule values, AutoDrop/HD/EG/DSA scalar arithmetic) and
every global sum over parameters is computed in the *widest* float the backend offers on the params'
device (:func:`widest_float`: float64 where it exists; float32 for JAX without ``jax_enable_x64`` and
PyTorch on MPS), never in bfloat16/float16, and is cast once where it meets a tensor. In bfloat16,
``1 - 0.999**t`` is 0 and Adam would never move; in float32 it has a relative error of 1e-5.

The step counter is int64 where float64 exists (:func:`counter_dtype`), else int32 (JAX without
x64, where :func:`next_count` saturates at 2**31 - 1 instead of wrapping to a negative step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from adaptlr import _validation as v

__all__ = ["INT32_MAX", "cast_like", "computed_once", "counter_dtype", "is_half_precision", "largest",
           "next_count", "scalar_caster", "widest_float"]

INT32_MAX = 2**31 - 1


def widest_float(xp: Any, device: Any) -> Any:
    """float64 where ``xp`` makes float64 arrays on ``device``, else float32.

    JAX without ``jax_enable_x64`` silently gives float32 (and warns); PyTorch on MPS has no float64
    and raises. Both fall back to float32, the widest float every array-API library has.
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
    return xp.float32


def is_half_precision(xp: Any, dtype: Any) -> bool:
    """bfloat16 and float16 (any real float narrower than float32): values that underflow easily."""
    return dtype not in (xp.float32, getattr(xp, "float64", None))


def counter_dtype(xp: Any, device: Any) -> Any:
    """int64 where the backend has 64-bit numbers on ``device``, else int32 (JAX without x64)."""
    return xp.int64 if widest_float(xp, device) == xp.float64 else xp.int32


def next_count(xp: Any, count: Any) -> Any:
    """``count + 1`` that never wraps around.

    An int64 counter cannot reach its limit. An int32 counter (JAX without x64) raises a clear
    error at 2**31 - 1 in eager mode; under ``jax.jit`` the value is not known, and the counter
    saturates there (every later step is step 2**31 - 1, whose bias corrections are 1).
    """
    if count.dtype == xp.int64:
        return count + 1
    at_limit = count >= INT32_MAX
    try:
        reached = bool(at_limit)
    except TypeError:  # traced under jit: no value to check
        reached = False
    if reached:
        raise OverflowError(
            "the int32 step counter is at its limit 2**31 - 1; enable 64-bit numbers "
            "(jax.config.update('jax_enable_x64', True)) for longer runs"
        )
    return xp.where(at_limit, count, count + 1)


def computed_once(x: Any) -> Any:
    """The 0-D step scalar ``x``, marked to be computed once per step where a compiler would
    recompute it for every element that reads it; ``x`` itself everywhere else.

    ``torch.compile`` (Inductor) inlines a 0-D computation into each elementwise loop that uses it:
    a bias correction's float64 ``pow`` then ran once per vector of every tensor, and a compiled
    AdamW step took 3× the fused one (:func:`adaptlr.backends.torch_scalars.computed_once`, which
    makes it a buffer of its own). Every step scalar passes through here where it is cast to the
    dtype of the tensors it meets (:class:`adaptlr.core.Scalars`, :func:`scalar_caster`,
    :meth:`adaptlr.core.StepSize.scaled_by`).
    """
    if v.library_of(x) == "torch":
        from adaptlr.backends.torch_scalars import computed_once as torch_computed_once  # pyright: ignore[reportMissingImports]

        return torch_computed_once(x)
    return x


def cast_like(xp: Any, x: Any, like: Sequence[Any], scalars: Any = None, name: str = "") -> list:
    """The 0-D scalar ``x`` in the dtype of each array of ``like``, cast once per distinct dtype.

    With the step's :class:`adaptlr.core.Scalars` (and a ``name`` for ``x``), each cast is also kept
    for the other parts of the step while ``x`` is the same array (``Scalars.once``)."""
    by_dtype: dict = {}
    for a in like:
        if a.dtype not in by_dtype:
            if scalars is None:
                by_dtype[a.dtype] = computed_once(xp.astype(x, a.dtype))
            else:
                by_dtype[a.dtype] = scalars.once(("cast", name, a.dtype), (x,),
                                                 lambda x, dtype=a.dtype: computed_once(xp.astype(x, dtype)))
    return [by_dtype[a.dtype] for a in like]


def scalar_caster(xp: Any, scalars: Any = None) -> Callable[[str, Any, Any], Any]:
    """A ``cast(name, x, like)``: the 0-D wide scalar ``x`` (named ``name``) in ``like``'s dtype, cast
    once per name and dtype for the lifetime of the caster (one step's loop over the leaves).

    With the step's :class:`adaptlr.core.Scalars`, a cast is also kept for the other parts of the
    step (blocks, chunks) while ``x`` is the same array (``Scalars.once``)."""
    casts: dict = {}

    def cast(name: str, x: Any, like: Any) -> Any:
        key = (name, like.dtype)
        if key not in casts:
            if scalars is None:
                casts[key] = computed_once(xp.astype(x, like.dtype))
            else:
                casts[key] = scalars.once(("cast", key), (x,), lambda x: computed_once(xp.astype(x, like.dtype)))
        return casts[key]

    return cast


def largest(xp: Any, values: Sequence[Any], dtype: Any) -> Any:
    """The largest of the 0-D arrays ``values`` (for example α per leaf), as a 0-D array of ``dtype``."""
    if len(values) == 1:
        return xp.astype(values[0], dtype)
    if len({v.dtype for v in values}) > 1:
        values = [xp.astype(v, dtype) for v in values]
    # the last of the sorted values, not xp.max: XLA rewrites a max over stacked 0-D arrays into a
    # chain of n - 1 maxima and fuses that chain into every loop that reads the result (n² work
    # to compile, see adaptlr._reduce.add_all); it does not fuse a sort
    return xp.astype(xp.sort(xp.stack(list(values)))[-1], dtype)
