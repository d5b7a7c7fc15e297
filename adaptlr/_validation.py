"""Checks of hyper-parameters and of the arrays passed to ``init`` / ``update``.

Every check raises an error that names the offending argument or leaf path. Array checks look only
at metadata (library, shape, dtype, device), so they never force a host sync.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "check_beta",
    "check_choice",
    "check_finite",
    "check_learning_rate",
    "check_like_params",
    "check_nonnegative",
    "check_nonnegative_int",
    "check_positive",
    "check_positive_int",
    "check_range",
    "check_scheduled_learning_rate",
    "is_traced",
    "library_of",
    "namespace_of_leaves",
]


def check_finite(name: str, value: Any) -> float:
    """A finite real number (Python or NumPy scalar, not a bool), as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    value = check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive(name: str, value: Any) -> float:
    value = check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_range(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    """``value`` in the interval from ``low`` to ``high`` (each end open or closed as given)."""
    value = check_finite(name, value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_beta(name: str, value: Any) -> float:
    return check_range(name, value, 0.0, 1.0, low_open=False, high_open=True)


def check_positive_int(name: str, value: Any) -> int:
    """A positive integer (Python or NumPy, not a bool), as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """An integer >= 0 (Python or NumPy, not a bool), as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, choices))}")
    return value


def check_learning_rate(value: Any) -> Any:
    """A learning rate: a finite number >= 0 (returned as a float), a 0-D array (returned as is) or
    a schedule (a callable of the step count).

    A 0-D array of any library is what ``optax.inject_hyperparams`` passes and what differentiating
    with respect to the learning rate needs; its value is checked unless it is traced (``jax.jit``,
    ``jax.grad``, ``torch.compile``), where it cannot be read.
    """
    if isinstance(value, (numbers.Number, np.generic)):  # NumPy scalars pass as arrays too
        return check_nonnegative("learning_rate", value)
    if library_of(value) is not None:
        if value.ndim != 0:
            raise ValueError(f"learning_rate must be a number, a 0-D array or a schedule; got an array of shape "
                             f"{tuple(value.shape)}")
        if not is_traced(value):
            host = _host_float(value)
            if not (math.isfinite(host) and host >= 0):
                raise ValueError(f"learning_rate must be finite and >= 0, got {host}")
        return value
    if callable(value):
        return value
    return check_nonnegative("learning_rate", value)


def check_scheduled_learning_rate(value: Any, count: Any) -> None:
    """Check what a learning-rate schedule returned for step ``count`` (eager mode only).

    ``None`` raises ``TypeError``; a NaN, infinite or negative value ``ValueError``, naming the step.
    The value is read only where that is free (a Python or NumPy number, a CPU array that is not
    traced): under ``jax.jit`` / ``torch.compile`` and for arrays on an accelerator it is not
    checked, and a NaN or negative learning rate gives NaN updates or moves the parameters uphill.
    """
    if value is None:
        raise TypeError(f"the learning-rate schedule returned None at step {_step(count)}; it must return a "
                        "number >= 0 (or a 0-D array)")
    if isinstance(value, np.generic) or library_of(value) is None:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"the learning-rate schedule returned a {type(value).__name__} at step {_step(count)}; "
                            "it must return a number >= 0 (or a 0-D array)")
        host = float(value)
    elif is_traced(value) or not _on_host(value):
        return
    else:
        if value.ndim != 0:
            raise ValueError(f"the learning-rate schedule returned an array of shape {tuple(value.shape)} at step "
                             f"{_step(count)}; it must return a number or a 0-D array")
        host = _host_float(value)
    if not (math.isfinite(host) and host >= 0):
        raise ValueError(f"the learning-rate schedule returned {host} at step {_step(count)}; a learning rate "
                         "must be finite and >= 0")


def is_traced(x: Any) -> bool:
    """Whether ``x`` is abstract (inside ``jax.jit`` / ``jax.grad`` or ``torch.compile``): its value
    cannot be read."""
    library = library_of(x)
    if library == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]
    if library == "torch":
        import torch

        return torch.compiler.is_compiling()
    return False


def _on_host(x: Any) -> bool:
    """Whether reading ``x`` costs no device sync (NumPy, array-api-strict, CPU torch / JAX arrays)."""
    library = library_of(x)
    if library in ("numpy", "array_api_strict"):
        return True
    if library == "torch":
        return x.device.type == "cpu"
    if library == "jax":
        return all(d.platform == "cpu" for d in x.sharding.device_set)
    return False


def untracked(x: Any) -> Any:
    """``x`` outside torch's autograd: ``x.detach()`` where autograd records it (``requires_grad``),
    any other array as it is. Optimizer state starts outside autograd, as ``torch.optim``'s does
    (:meth:`adaptlr.Optimizer.init`)."""
    return x.detach() if getattr(x, "requires_grad", False) else x


def _host_float(x: Any) -> float:
    if library_of(x) == "array_api_strict":
        import array_api_strict

        x = array_api_strict.asarray(x, device=array_api_strict.Device("CPU_DEVICE"))
    return float(untracked(x))


def _step(count: Any) -> Any:
    return count if isinstance(count, int) or is_traced(count) else int(_host_float(count))


def check_state_dtype(value: Any) -> str | None:
    """``None`` or the name of a floating dtype (``"float32"``; also ``torch.float32``, ``np.float32``...)."""
    if value is None:
        return None
    name = value if isinstance(value, str) else getattr(value, "name", None) or getattr(value, "__name__", None)
    if name is None:  # torch.float32 has neither: str() is "torch.float32"
        name = str(value)
    name = name.removeprefix("torch.")
    if name not in ("float64", "float32", "bfloat16", "float16"):
        raise ValueError(f"state_dtype must be None or a floating dtype (float64, float32, bfloat16, float16), "
                         f"got {value!r}")
    return name


_LIBRARY_PREDICATES = (
    ("numpy", array_api_compat.is_numpy_array),
    ("torch", array_api_compat.is_torch_array),
    ("jax", array_api_compat.is_jax_array),
    ("cupy", array_api_compat.is_cupy_array),
)
_library_by_type: dict[type, str] = {}


def library_of(x: Any) -> str | None:
    """The array library of ``x`` ("numpy", "torch", "jax", "cupy", ...), or None if not an array."""
    kind = type(x)
    found = _library_by_type.get(kind)
    if found is None:
        for name, predicate in _LIBRARY_PREDICATES:
            if predicate(x):
                found = name
                break
        else:
            if hasattr(x, "__array_namespace__"):
                found = x.__array_namespace__().__name__.split(".")[0]
            else:
                return None
        _library_by_type[kind] = found
    return found


_namespace_by_type: dict[type, Any] = {}
_REMEMBERED = frozenset({"torch", "cupy", "jax"})  # libraries whose namespace is their array type's


def namespace_of(x: Any) -> Any:
    """``array_api_compat.array_namespace(x)``, remembered per array type for torch, CuPy and JAX.

    array-api-compat remembers it in ``functools.lru_cache`` functions, and ``torch.compile`` warns
    at each such function it traces through (nine warnings as AdamW's step compiled); a dict lookup
    it traces silently. (NumPy's namespace may depend on the array: JAX's float0 arrays.)
    """
    kind = type(x)
    xp = _namespace_by_type.get(kind)
    if xp is None:
        xp = array_api_compat.array_namespace(x)
        if library_of(x) in _REMEMBERED:
            _namespace_by_type[kind] = xp
    return xp


def device_of(x: Any) -> Any:
    """``array_api_compat.device(x)``: a torch tensor's ``device`` read directly (see :func:`namespace_of`)."""
    return x.device if library_of(x) == "torch" else array_api_compat.device(x)


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of an array-API library (``array_api_compat.is_array_api_obj``)."""
    return library_of(x) is not None


def is_numpy_namespace(xp: Any) -> bool:
    """Whether ``xp`` is NumPy or array-api-compat's NumPy (``array_api_compat.is_numpy_namespace``)."""
    return getattr(xp, "__name__", None) in {"numpy", "array_api_compat.numpy"}


def _device_key(x: Any, library: str) -> Any:
    """A comparable description of where ``x`` lives, or None where it cannot be known (tracers)."""
    if library == "jax":
        sharding = getattr(x, "sharding", None)
        return None if sharding is None else frozenset(sharding.device_set)
    if library == "numpy":
        return "cpu"
    if library in ("torch", "cupy", "array_api_strict"):
        return x.device
    try:
        return array_api_compat.device(x)
    except Exception:  # an abstract array (a tracer) has no device
        return None


def namespace_of_leaves(leaves: Sequence[Any], what: str, paths: Callable[[], list[str]]) -> Any:
    """The array namespace of ``leaves``: one library, one device, real floating dtypes."""
    first = leaves[0]
    library = library_of(first)
    if library is None:
        raise TypeError(f"{what} leaf {paths()[0]} is a {type(first).__name__}, not an array")
    device = _device_key(first, library)
    for i, leaf in enumerate(leaves):
        other = library_of(leaf)
        if other != library:
            names = paths()
            raise TypeError(
                f"{what} mix array libraries: {names[0]} is a {library} array but {names[i]} is "
                f"{'a ' + other + ' array' if other else 'a ' + type(leaf).__name__}; "
                "use one array library for a whole tree"
            )
        if i and device is not None:
            leaf_device = _device_key(leaf, library)
            if leaf_device is not None and leaf_device != device:
                names = paths()
                raise ValueError(
                    f"{what} live on different devices: {names[0]} on {device}, {names[i]} on "
                    f"{leaf_device}; move them to one device"
                )
    return namespace_of(first)


def check_like_params(
    xp: Any, leaves: Sequence[Any], params: Sequence[Any], what: str, paths: Callable[[], list[str]]
) -> None:
    """Every leaf has the shape and dtype of its parameter, and the parameters are real floats."""
    for i, (leaf, param) in enumerate(zip(leaves, params)):
        if leaf.shape != param.shape:
            raise ValueError(
                f"{what} leaf {paths()[i]} has shape {tuple(leaf.shape)} but the parameter has "
                f"shape {tuple(param.shape)}"
            )
        if leaf.dtype != param.dtype:
            raise TypeError(
                f"{what} leaf {paths()[i]} has dtype {leaf.dtype} but the parameter has dtype "
                f"{param.dtype}"
            )


def check_floating_params(xp: Any, params: Sequence[Any], paths: Callable[[], list[str]]) -> None:
    for i, param in enumerate(params):
        if not xp.isdtype(param.dtype, "real floating"):
            raise TypeError(
                f"parameter {paths()[i]} has dtype {param.dtype}; adaptlr optimizes real "
                "floating-point parameters only (cast integer parameters to a float dtype)"
            )
