"""Arithmetic written into the step's own temporaries: fewer fresh arrays per step.

An optimizer step is memory-bound, and each out-of-place operation writes its result into a fresh
array: memory the allocator hands out (on the CPU often fresh pages) and that the processor must
read into its cache before writing it. Where the left operand is an array that the step itself has
just created and that nothing else holds (a temporary such as ``b1·m`` on its way to ``m_t``),
the next operation can write into it instead. The array API standard has the operation for that,
the in-place operators (``x += y``); on an immutable array (JAX) Python turns them into ``x = x + y``,
so the same code is correct everywhere.

The standard allows an in-place operation only where the result has the left operand's dtype and
shape; these helpers check that and otherwise compute out of place, so they never change a number.
They also compute out of place where torch's autograd records the operand (``requires_grad``: a
step differentiated with ``torch.autograd`` may need the value, as ``sqrt`` and ``exp`` keep their
results for the backward pass); the adapters step under ``torch.no_grad()``.
A Python ``float`` is a weak scalar and always fits. They must be given, as ``a``, only an array
the calling step created and has not handed to anyone (not an input, not a state field, not a
direction that an adaptation reads).
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_", "mul_", "sub_"]


def _fits(a: Any, b: Any) -> bool:
    """Whether ``a ∘= b`` keeps ``a``'s dtype and shape (so it is ``a ∘ b``, written into ``a``), and
    no autograd tape records ``a`` (a derivative through the step may need its value)."""
    if getattr(a, "requires_grad", False):
        return False
    if isinstance(b, float | int) and not isinstance(b, bool):
        return True
    dtype = getattr(b, "dtype", None)
    return dtype is not None and dtype == a.dtype and (b.ndim == 0 or b.shape == a.shape)


def add_(a: Any, b: Any) -> Any:
    """``a + b``, written into ``a`` (a temporary of the calling step) where the standard allows it."""
    if _fits(a, b):
        a += b
        return a
    return a + b


def sub_(a: Any, b: Any) -> Any:
    """``a - b``, written into ``a`` (a temporary of the calling step) where the standard allows it."""
    if _fits(a, b):
        a -= b
        return a
    return a - b


def mul_(a: Any, b: Any) -> Any:
    """``a · b``, written into ``a`` (a temporary of the calling step) where the standard allows it."""
    if _fits(a, b):
        a *= b
        return a
    return a * b
