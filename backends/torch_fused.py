"""torch's fused forms of the step's ``a + c·y``, ``a + (x·y)·c`` and moving averages (:mod:`adaptlr._inplace`).

The array API standard has no fused multiply-add, so the step written against it makes three
passes over memory for ``m ← β1·m + (1-β1)·g`` (``β1·m``, ``(1-β1)·g`` into a fresh array, the
sum) and four for ``v ← β2·v + (1-β2)·g²``. torch has the operations ``torch.optim``'s foreach
steps use: ``lerp`` (the moving average in one pass), ``add_(y, alpha=c)`` and
``addcmul_(x, y, value=c)`` for a Python float ``c``, and ``addcmul_(y, c)`` for a 0-D tensor ``c``
(a scalar that stays on the device: Prodigy's and D-Adaptation's ``d·(1-β1)``, AdamW's ``-α·λ``),
broadcast without a copy.

Plain tensors (and ``nn.Parameter``) on one device take them, where no autograd tape records the
operands (a differentiated step keeps the standard operations); a tensor subclass such as DTensor
keeps the standard operations, whose sharding rules it implements. The caller
(:mod:`adaptlr._inplace`) has checked that ``a`` is the step's own array and that dtypes and shapes
keep the result in ``a``.

A :class:`~adaptlr.backends.foreach.ForeachArray` (the torch adapter's foreach path) takes the
``torch._foreach_*`` forms, which make each tensor's numbers those of the per-tensor operation, so
the foreach path and the list path stay the same numbers: ``_foreach_add_(alpha=)``,
``_foreach_addcmul_(value=)``, ``_foreach_lerp_``; ``a + c·y`` with a 0-D tensor ``c`` on the CPU
as ``_foreach_addcmul_`` with ``c`` for each tensor (the CPU runs foreach operations per tensor),
and on a GPU, where that form is not one multi-tensor kernel, the standard two (``c·y``, the sum),
which keep the launches at two. ``lerp`` takes only a Python float weight, on every path (a 0-D
weight has no one-kernel foreach form).

``mul_into`` and ``div_into`` write a product or a quotient into a given tensor (a state field the
step no longer reads, donated by the executor: :func:`adaptlr._inplace.mul_into_donated`,
``div_into_donated``), so the executor has nothing to copy.

``clamp_`` and ``exp_`` clip and exponentiate a temporary of the step in place (EG's gains), where
the standard's ``clip`` and ``exp`` each write a new tensor.

``mul_widened`` writes a product into a new tensor of a wider float (a term of a float64 sum, on
the CPU, where ``torch.sum(dtype=torch.float64)`` of a float32 tensor converts a copy of it first).

``add_scaled_``, ``add_product_``, ``mul_into`` and ``div_into`` return whether they wrote the result; ``lerp``
and ``mul_widened`` return the result, or None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adaptlr.backends.foreach import _MUL_TENSOR, ForeachArray

__all__ = ["add_product_", "add_scaled_", "clamp_", "div_into", "exp_", "lerp", "mul_into", "mul_widened"]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(*tensors: Any) -> bool:
    """Plain tensors (or parameters) that no autograd tape records here (``no_grad`` records nothing)."""
    if not all(type(t) in _PLAIN for t in tensors):
        return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _scalar_tensor(c: Any, like: Any) -> bool:
    """Whether ``c`` is a plain 0-D tensor on ``like``'s device."""
    return type(c) is torch.Tensor and c.ndim == 0 and c.device == like.device and _plain(c)


def _lists(a: Any, *others: Any) -> bool:
    """Whether ``a`` and ``others`` are ForeachArrays of one dtype and device, tensor by tensor alike."""
    return all(isinstance(o, ForeachArray) and o.dtype == a.dtype and o.device == a.device
               and len(o.tensors) == len(a.tensors) for o in others)


def add_scaled_(a: Any, y: Any, c: Any) -> bool:
    """``a += c·y`` (``c`` a float or a 0-D tensor on ``a``'s device); False: not done."""
    number = isinstance(c, float | int)
    if not number and not _scalar_tensor(c, a):
        return False
    if isinstance(a, ForeachArray):
        if not _lists(a, y):
            return False
        if number:
            torch._foreach_add_(a.tensors, y.tensors, alpha=c)
        elif a.device.type == "cpu":
            torch._foreach_addcmul_(a.tensors, y.tensors, [c] * len(a.tensors))
        else:
            return False
        return True
    if not _plain(a, y) or y.device != a.device:
        return False
    if number:
        a.add_(y, alpha=c)
    else:
        a.addcmul_(y, c)
    return True


def add_product_(a: Any, x: Any, y: Any, c: Any) -> bool:
    """``a += (x·y)·c``: one pass for a float ``c``, two for a 0-D tensor; False: not done."""
    number = isinstance(c, float | int)
    if not number and not _scalar_tensor(c, a):
        return False
    if isinstance(a, ForeachArray):
        if not _lists(a, x, y) or (not number and _MUL_TENSOR is None):
            return False
        if number:
            torch._foreach_addcmul_(a.tensors, x.tensors, y.tensors, value=c)
        else:
            torch._foreach_addcmul_(a.tensors, _MUL_TENSOR(x.tensors, c), y.tensors)
        return True
    if not _plain(a, x, y) or x.device != a.device or y.device != a.device:
        return False
    if number:
        a.addcmul_(x, y, value=c)
    else:
        a.addcmul_(x * c, y)
    return True


def lerp(x: Any, y: Any, weight: Any, *, into: bool) -> Any:
    """``x + w·(y - x)`` in one pass (into ``x`` where ``into``) for a Python float ``w``; None: not done."""
    if not isinstance(weight, float | int):
        return None
    if isinstance(x, ForeachArray):
        if not _lists(x, y):
            return None
        if into:
            torch._foreach_lerp_(x.tensors, y.tensors, weight)
            return x
        return ForeachArray(torch._foreach_lerp(x.tensors, y.tensors, weight))
    if not _plain(x, y) or y.device != x.device:
        return None
    return x.lerp_(y, weight) if into else torch.lerp(x, y, weight)


def mul_into(dest: Any, x: Any, y: Any) -> bool:
    """``dest ← x·y`` (``torch.mul(x, y, out=dest)``: the product written into an existing tensor);
    False: not done (a ForeachArray: torch has no foreach form with an output list)."""
    return _into(torch.mul, dest, x, y)


def div_into(dest: Any, x: Any, y: Any) -> bool:
    """``dest ← x/y`` (``torch.div(x, y, out=dest)``), as :func:`mul_into`."""
    return _into(torch.div, dest, x, y)


def _into(op: Callable, dest: Any, x: Any, y: Any) -> bool:
    if isinstance(dest, ForeachArray):
        return False
    tensors = [t for t in (x, y) if isinstance(t, torch.Tensor)]
    if not _plain(dest, *tensors) or any(t.ndim and t.device != dest.device for t in tensors):
        return False
    op(x, y, out=dest)
    return True


def mul_widened(x: Any, y: Any, dtype: Any) -> Any:
    """``x·y`` rounded in their dtype, stored in a new CPU tensor of the wider float ``dtype``
    (``torch.mul(x, y, out=torch.empty_like(x, dtype=dtype))``: torch computes in the inputs'
    dtype and converts on store); None: not done (not plain CPU tensors of one dtype and shape, or
    ``dtype`` not wider). A GPU's reduction converts as it reads, so it keeps the product narrow."""
    if isinstance(x, ForeachArray) or not isinstance(y, torch.Tensor) or not _plain(x, y):
        return None
    if (x.device.type != "cpu" or y.device != x.device or y.dtype != x.dtype or y.shape != x.shape
            or not x.dtype.is_floating_point or torch.finfo(dtype).bits <= torch.finfo(x.dtype).bits):
        return None
    return torch.mul(x, y, out=torch.empty_like(x, dtype=dtype))


def clamp_(a: Any, low: float, high: float) -> bool:
    """``a ← clip(a, low, high)`` in place (a plain tensor: ``clamp_``); False: not done (a
    ForeachArray keeps its two-op foreach form, a subclass or an autograd-recorded tensor the
    standard one)."""
    if isinstance(a, ForeachArray) or not _plain(a):
        return False
    a.clamp_(low, high)
    return True


def exp_(a: Any) -> bool:
    """``a ← exp(a)`` in place (``exp_``, or ``_foreach_exp_`` on a ForeachArray); False: not done."""
    if isinstance(a, ForeachArray):
        torch._foreach_exp_(a.tensors)
        return True
    if not _plain(a):
        return False
    a.exp_()
    return True
