"""Run an elementwise (or global-sum) algorithm over lists of tensors with ``torch._foreach_*`` ops.

:class:`ForeachArray` is a list of tensors that behaves, under the operations the algorithms in
``adaptlr/`` use, as one array: the concatenation of its tensors. Arithmetic between two of them,
or with a Python float or a 0-D tensor of the same dtype, is **one** ``torch._foreach_*`` call
(one multi-tensor kernel on a GPU) instead of one call per tensor; the tensors keep their own
storage (nothing is concatenated or copied). :data:`namespace` is the array namespace that goes
with it (``array_api_compat.torch`` for everything else).

This is an execution strategy, not a re-implementation: the torch adapter passes one
``ForeachArray`` per (param group, dtype, device) to :meth:`adaptlr.core.Optimizer.update_leaves`
as if it were one flat leaf, so the same code runs. It has the semantics of the flat buffers of
:class:`~adaptlr.backends.fast.FlatOptimizer` (elementwise operations; ``sum`` / ``max`` / ``all``
over every element of every tensor), and is valid exactly for the algorithms
:func:`~adaptlr.backends.fast.flat_safety` calls flat-safe. An operation it does not know on a
``ForeachArray`` (a reduction over an axis, a reshape) raises :class:`NotImplementedError`; the
adapter then takes its per-tensor list path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as _xt
import torch

__all__ = ["ForeachArray", "namespace"]


class ForeachArray:
    """A list of tensors of one dtype and device, used as one 1-D array (their concatenation).

    Args:
        tensors: the tensors (any shapes; never copied).
    """

    __slots__ = ("tensors",)
    fused_operations = "torch"  # adaptlr._inplace's fused forms: adaptlr.backends.torch_fused
    __array_priority__ = 1000  # Python floats and 0-D tensors defer to our reflected operators
    ndim = 1

    def __init__(self, tensors: list) -> None:
        self.tensors = tensors

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def shape(self) -> tuple[int]:
        return (sum(t.numel() for t in self.tensors),)

    def __repr__(self) -> str:
        return f"ForeachArray({len(self.tensors)} tensors, {self.dtype})"

    def __bool__(self) -> bool:
        raise TypeError("a ForeachArray has no truth value (adaptlr never branches on array values)")

    # -- arithmetic: one _foreach op where torch has one, else one op per tensor ----------------
    # With a 0-D tensor, the ``.Tensor`` overloads are named: ``torch._foreach_add(tensors, t)``
    # resolves to the ``.Scalar`` overload and reads ``t`` on the host (``.item()``: a device sync).

    def _binary(self, other: Any, foreach: Callable | None, op: Callable,
                with_tensor: Callable | None = None) -> ForeachArray:
        if isinstance(other, ForeachArray):
            if foreach is not None and other.dtype == self.dtype:
                return ForeachArray(foreach(self.tensors, other.tensors))
            return ForeachArray([op(a, b) for a, b in zip(self.tensors, other.tensors)])
        if foreach is not None and _is_number(other):
            return ForeachArray(foreach(self.tensors, other))
        if with_tensor is not None and _same_scalar(other, self):
            return ForeachArray(with_tensor(self.tensors, other))
        if isinstance(other, torch.Tensor) and other.ndim > 0:
            raise NotImplementedError("a ForeachArray meets a tensor with dimensions")
        return ForeachArray([op(a, other) for a in self.tensors])

    def _inplace(self, other: Any, foreach_: Callable, with_tensor_: Callable | None) -> Any:
        """``self ∘= other`` with one in-place ``_foreach`` op where it keeps ``self``'s dtype (a list of
        the same dtype, a Python number, a 0-D tensor of ``self``'s dtype and device); otherwise
        NotImplemented, and Python computes ``self ∘ other`` out of place (adaptlr._inplace)."""
        if isinstance(other, ForeachArray):
            if other.dtype != self.dtype:
                return NotImplemented
            foreach_(self.tensors, other.tensors)
        elif _is_number(other):
            foreach_(self.tensors, other)
        elif with_tensor_ is not None and _same_scalar(other, self):
            with_tensor_(self.tensors, other)
        else:
            return NotImplemented
        return self

    def __add__(self, other: Any) -> ForeachArray:
        return self._binary(other, torch._foreach_add, torch.add, _ADD_TENSOR)

    def __iadd__(self, other: Any) -> ForeachArray:
        return self._inplace(other, torch._foreach_add_, _ADD_TENSOR_)

    def __isub__(self, other: Any) -> ForeachArray:
        return self._inplace(other, torch._foreach_sub_, _foreach_sub_tensor_)

    def __imul__(self, other: Any) -> ForeachArray:
        return self._inplace(other, torch._foreach_mul_, _MUL_TENSOR_)

    def __itruediv__(self, other: Any) -> ForeachArray:
        return self._inplace(other, torch._foreach_div_, _DIV_TENSOR_)

    __radd__ = __add__

    def __mul__(self, other: Any) -> ForeachArray:
        return self._binary(other, torch._foreach_mul, torch.mul, _MUL_TENSOR)

    __rmul__ = __mul__

    def __sub__(self, other: Any) -> ForeachArray:
        return self._binary(other, torch._foreach_sub, torch.sub, _foreach_sub_tensor)

    def __rsub__(self, other: Any) -> ForeachArray:
        return (-self)._binary(other, torch._foreach_add, torch.add, _ADD_TENSOR)

    def __truediv__(self, other: Any) -> ForeachArray:
        return self._binary(other, torch._foreach_div, torch.div, _DIV_TENSOR)

    def __rtruediv__(self, other: Any) -> ForeachArray:
        # per tensor: c · (1/x) would round differently from c / x
        return ForeachArray([torch.div(other, t) for t in self.tensors])

    def __pow__(self, other: Any) -> ForeachArray:
        return self._binary(other, torch._foreach_pow, torch.pow)  # no .Tensor overload: per tensor

    def __neg__(self) -> ForeachArray:
        return ForeachArray(torch._foreach_neg(self.tensors))

    def __abs__(self) -> ForeachArray:
        return ForeachArray(torch._foreach_abs(self.tensors))

    def _compare(self, other: Any, op: Callable) -> ForeachArray:
        return self._binary(other, None, op)

    def __gt__(self, other: Any) -> ForeachArray:
        return self._compare(other, torch.gt)

    def __ge__(self, other: Any) -> ForeachArray:
        return self._compare(other, torch.ge)

    def __lt__(self, other: Any) -> ForeachArray:
        return self._compare(other, torch.lt)

    def __le__(self, other: Any) -> ForeachArray:
        return self._compare(other, torch.le)

    def __eq__(self, other: Any) -> ForeachArray:  # type: ignore[override]
        return self._compare(other, torch.eq)

    def __ne__(self, other: Any) -> ForeachArray:  # type: ignore[override]
        return self._compare(other, torch.ne)

    def __and__(self, other: Any) -> ForeachArray:
        return self._compare(other, torch.logical_and)

    def __or__(self, other: Any) -> ForeachArray:
        return self._compare(other, torch.logical_or)

    def __invert__(self) -> ForeachArray:
        return ForeachArray([torch.logical_not(t) for t in self.tensors])

    __hash__ = None  # type: ignore[assignment]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _tensor_overload(name: str) -> Callable | None:
    """``aten.<name>.Tensor`` (a list and a 0-D tensor), None where this torch lacks it (one op per tensor)."""
    return getattr(getattr(torch.ops.aten, name), "Tensor", None)


_ADD_TENSOR = _tensor_overload("_foreach_add")
_MUL_TENSOR = _tensor_overload("_foreach_mul")
_DIV_TENSOR = _tensor_overload("_foreach_div")
_ADD_TENSOR_ = _tensor_overload("_foreach_add_")
_MUL_TENSOR_ = _tensor_overload("_foreach_mul_")
_DIV_TENSOR_ = _tensor_overload("_foreach_div_")


def _foreach_sub_tensor(tensors: list, other: torch.Tensor) -> list:
    """``tensors - other`` for a 0-D tensor ``other`` (``_foreach_sub`` has no ``.Tensor`` overload)."""
    if _ADD_TENSOR is None:
        return [torch.sub(t, other) for t in tensors]
    return _ADD_TENSOR(tensors, other, alpha=-1)


def _foreach_sub_tensor_(tensors: list, other: torch.Tensor) -> None:
    """``tensors -= other`` for a 0-D tensor ``other``, in place."""
    if _ADD_TENSOR_ is None:
        for t in tensors:
            t.sub_(other)
    else:
        _ADD_TENSOR_(tensors, other, alpha=-1)


def _same_scalar(x: Any, like: ForeachArray) -> bool:
    """A 0-D tensor of ``like``'s dtype and device (``torch._foreach_*``'s Tensor overloads take it)."""
    return (type(x) is torch.Tensor and x.ndim == 0 and x.dtype == like.dtype and x.device == like.device)


def _lists(args: tuple) -> int | None:
    """The length of the ForeachArrays among ``args`` (None if there is none)."""
    for a in args:
        if isinstance(a, ForeachArray):
            return len(a.tensors)
    return None


def _elementwise(name: str, foreach: Callable | None = None) -> Callable:
    """``xp.<name>`` applied per tensor to ForeachArray arguments (one foreach call where given)."""
    plain = getattr(_xt, name)

    def fn(*args: Any, **kwargs: Any) -> Any:
        n = _lists(args)
        if n is None:
            return plain(*args, **kwargs)
        if foreach is not None and len(args) == 1 and not kwargs:
            return ForeachArray(foreach(args[0].tensors))
        columns = [a.tensors if isinstance(a, ForeachArray) else [a] * n for a in args]
        return ForeachArray([plain(*row, **kwargs) for row in zip(*columns)])

    fn.__name__ = name
    return fn


def _maximum_or_minimum(name: str, foreach: Callable) -> Callable:
    plain = getattr(_xt, name)
    per_tensor = _elementwise(name)

    def fn(x: Any, y: Any) -> Any:
        if isinstance(x, ForeachArray) and isinstance(y, ForeachArray) and x.dtype == y.dtype:
            return ForeachArray(foreach(x.tensors, y.tensors))
        if isinstance(x, ForeachArray) or isinstance(y, ForeachArray):
            return per_tensor(x, y)
        return plain(x, y)

    return fn


def _clip(x: Any, /, min: Any = None, max: Any = None) -> Any:
    """``xp.clip``: Python-number bounds on a ForeachArray as ``_foreach_clamp_min``/``_max`` (two
    calls for the list), other bounds per tensor."""
    if not isinstance(x, ForeachArray):
        return _xt.clip(x, min, max)
    if not all(b is None or (_is_number(b) and not math.isnan(b)) for b in (min, max)):
        return ForeachArray([_xt.clip(t, min, max) for t in x.tensors])
    tensors = x.tensors
    if min is None and max is None:
        return ForeachArray([t.clone() for t in tensors])
    if min is not None:
        tensors = torch._foreach_clamp_min(tensors, min)
    if max is not None:
        tensors = torch._foreach_clamp_max(tensors, max)
    return ForeachArray(tensors)


def _reduction(name: str, combine: Callable) -> Callable:
    """``xp.<name>`` over every element of every tensor (``axis=None`` only), as on a flat buffer."""
    plain = getattr(_xt, name)

    def fn(x: Any, /, *, axis: Any = None, keepdims: bool = False, **kwargs: Any) -> Any:
        if not isinstance(x, ForeachArray):
            return plain(x, axis=axis, keepdims=keepdims, **kwargs)
        if axis is not None or keepdims:
            raise NotImplementedError(f"{name} over an axis of a ForeachArray (a per-tensor reduction)")
        parts = [plain(t, **kwargs) for t in x.tensors]
        return combine(torch.stack(parts)) if len(parts) > 1 else parts[0]

    return fn


def _like(name: str) -> Callable:
    plain = getattr(_xt, name)

    def fn(x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, ForeachArray):
            return ForeachArray([plain(t, *args, **kwargs) for t in x.tensors])
        return plain(x, *args, **kwargs)

    return fn


def _astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    if isinstance(x, ForeachArray):
        if x.dtype == dtype and not copy:
            return x
        return ForeachArray([_xt.astype(t, dtype, copy=copy) for t in x.tensors])
    return _xt.astype(x, dtype, copy=copy, device=device)


def _asarray(x: Any, /, **kwargs: Any) -> Any:
    if isinstance(x, ForeachArray):
        if kwargs.get("copy"):
            return ForeachArray([t.clone() for t in x.tensors])
        if kwargs.get("dtype") not in (None, x.dtype):
            return _astype(x, kwargs["dtype"])
        return x
    return _xt.asarray(x, **kwargs)


class _Namespace:
    """``array_api_compat.torch`` with the functions that the algorithms call on arrays extended to
    :class:`ForeachArray` (elementwise: per tensor or one ``_foreach`` call; reductions: global)."""

    __name__ = "adaptlr.backends.foreach"

    def __init__(self) -> None:
        table: dict[str, Callable] = {
            "sqrt": _elementwise("sqrt", torch._foreach_sqrt),
            "abs": _elementwise("abs", torch._foreach_abs),
            "sign": _elementwise("sign", torch._foreach_sign),
            "exp": _elementwise("exp", torch._foreach_exp),
            "where": _elementwise("where"),
            "logical_and": _elementwise("logical_and"),
            "logical_or": _elementwise("logical_or"),
            "logical_not": _elementwise("logical_not"),
            "isfinite": _elementwise("isfinite"),
            "acos": _elementwise("acos"),
            "maximum": _maximum_or_minimum("maximum", torch._foreach_maximum),
            "minimum": _maximum_or_minimum("minimum", torch._foreach_minimum),
            "clip": _clip,
            "sum": _reduction("sum", torch.sum),
            "max": _reduction("max", torch.amax),
            "all": _reduction("all", torch.all),
            "zeros_like": _like("zeros_like"),
            "ones_like": _like("ones_like"),
            "full_like": _like("full_like"),
            "astype": _astype,
            "asarray": _asarray,
        }
        self.__dict__.update(table)

    def __getattr__(self, name: str) -> Any:
        value = getattr(_xt, name)
        if not callable(value) or isinstance(value, type) or name in ("isdtype", "result_type", "finfo", "iinfo"):
            return value

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if _lists(args) is not None or any(isinstance(v, ForeachArray) for v in kwargs.values()):
                raise NotImplementedError(f"xp.{name} is not defined for a ForeachArray")
            return value(*args, **kwargs)

        return guarded


namespace = _Namespace()
