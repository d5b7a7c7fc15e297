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

An executor that owns the state it passes to a step and copies the new state into it afterwards
(the torch adapter's blocks and foreach chunks) may *donate* those arrays for the step
(:func:`donating`); :func:`mul_donated` then writes the decay of a state field (``β1·m`` on its way
to ``m_t``) into the field itself, and the copy back has nothing left to do. A step given
arrays it does not own computes out of place, as before.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from adaptlr._validation import library_of, untracked

__all__ = ["add_", "add_donated", "add_product_", "add_scaled_", "clip_", "copy_untracked", "div_", "div_into_donated",
           "donating", "ema_donated", "exp_", "is_donated", "mul_", "mul_donated", "mul_for_sum", "mul_into_donated",
           "sub_"]


def copy_untracked(xp: Any, x: Any) -> Any:
    """A copy of ``x`` outside torch's autograd (a snapshot kept in the state): ``xp.asarray`` with
    ``copy=True`` of :func:`adaptlr._validation.untracked` ``x``. (torch 2.13's ``torch.asarray`` of a
    tensor that requires grad makes a copy that autograd records, and warns; earlier versions made a
    detached one.)"""
    return xp.asarray(untracked(x), copy=True)


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


def div_(a: Any, b: Any) -> Any:
    """``a / b``, written into ``a`` (a temporary of the calling step) where the standard allows it."""
    if _fits(a, b):
        a /= b
        return a
    return a / b


def clip_(xp: Any, a: Any, low: float, high: float) -> Any:
    """``clip(a, low, high)`` for Python-float bounds, written into ``a`` (a temporary of the calling
    step, as :func:`add_`) where the backend clips in place (torch: ``clamp_``,
    :mod:`adaptlr.backends.torch_fused`), else ``xp.clip`` (a new array). The same numbers."""
    if _has_fused(a) and not getattr(a, "requires_grad", False):
        from adaptlr.backends.torch_fused import clamp_  # pyright: ignore[reportMissingImports]

        if clamp_(a, low, high):
            return a
    return xp.clip(a, low, high)


def exp_(xp: Any, a: Any) -> Any:
    """``exp(a)``, written into ``a`` (a temporary of the calling step) where the backend has the
    in-place form (torch: ``exp_``), else ``xp.exp`` (a new array). The same numbers."""
    if _has_fused(a) and not getattr(a, "requires_grad", False):
        from adaptlr.backends.torch_fused import exp_ as fused  # pyright: ignore[reportMissingImports]

        if fused(a):
            return a
    return xp.exp(a)


def is_donated(scalars: Any, x: Any) -> bool:
    """Whether the executor donated the state array ``x`` to the step that ``scalars`` (its
    :class:`adaptlr.core.Scalars`) belong to (:func:`donating`): the step may write into it."""
    return bool(scalars.donated) and id(x) in scalars.donated


def _has_fused(a: Any) -> bool:
    """Whether ``a`` is a torch tensor, or an array type that declares torch's fused operations
    (``fused_operations = "torch"``: the adapter's ForeachArray), :mod:`adaptlr.backends.torch_fused`."""
    return getattr(type(a), "fused_operations", None) == "torch" or library_of(a) == "torch"


def add_scaled_(a: Any, y: Any, c: Any) -> Any:
    """``a + c·y`` (``c`` a Python float or a 0-D array), written into ``a`` (a temporary of the
    calling step, as :func:`add_`) where the standard allows it.

    One pass where the backend has the fused operation (torch: ``a.add_(y, alpha=c)``,
    ``a.addcmul_(y, c)``: :mod:`adaptlr.backends.torch_fused`), else two: ``c·y``, then the sum. The
    fused operation may round ``c·y`` and the sum once (a fused multiply-add) where the two
    operations round twice: at most an ulp of ``a + c·y`` apart."""
    if not (_fits(a, y) and _fits(a, c)):
        return a + c * y
    if _has_fused(a):
        from adaptlr.backends.torch_fused import add_scaled_ as fused  # pyright: ignore[reportMissingImports]

        if fused(a, y, c):
            return a
    a += c * y
    return a


def add_product_(a: Any, x: Any, y: Any, c: Any, *, x_temporary: bool = False) -> Any:
    """``a + (x·y)·c`` (``c`` a Python float or a 0-D array), written into ``a`` (a temporary of the
    calling step, as :func:`add_`) where the standard allows it: one pass on torch for a float
    ``c`` (``a.addcmul_(x, y, value=c)``), two for a 0-D array (``x·c``, then ``addcmul_``), three
    elsewhere (``x·y``, times ``c``, the sum); the fused forms may round once where these round
    twice or three times (:func:`add_scaled_`). ``x_temporary``: ``x`` is the step's own array too,
    and the unfused form may write ``x·y`` into it."""
    product = mul_ if x_temporary else operator.mul
    if not (_fits(a, x) and _fits(a, y) and _fits(a, c)):
        return a + mul_(product(x, y), c)
    if _has_fused(a):
        from adaptlr.backends.torch_fused import add_product_ as fused  # pyright: ignore[reportMissingImports]

        if fused(a, x, y, c):
            return a
    a += mul_(product(x, y), c)
    return a


def mul_donated(scalars: Any, x: Any, b: Any, *, b_temporary: bool = False) -> Any:
    """``x · b`` for an input state array ``x`` that the step reads once, to make its new value:
    written into ``x`` where the executor donated it for this step (``scalars``, the step's
    :class:`adaptlr.core.Scalars`: :func:`donating`), else into ``b`` where it is a temporary of
    the calling step (``b_temporary``, as :func:`mul_`), else a new array.

    The caller must not read ``x``'s old value after this call. ``x · b`` and ``b · x`` are the
    same number (IEEE multiplication commutes)."""
    if is_donated(scalars, x) and _fits(x, b):
        x *= b
        return x
    return mul_(b, x) if b_temporary else x * b


def ema_donated(scalars: Any, x: Any, y: Any, beta: Any, one_minus_beta: Any = None) -> Any:
    """``β·x + (1-β)·y``, the moving average of an input state array ``x`` (read once, as in
    :func:`mul_donated`) with ``y`` (``β`` a Python float or a 0-D array of ``x``'s dtype, and
    ``one_minus_beta`` its ``1-β`` in the same form; None: ``1.0 - β``).

    On torch, for a Python float ``β``: one pass, ``torch.optim``'s own ``x + (1-β)·(y - x)``
    (``lerp``; into ``x`` where it is donated, :mod:`adaptlr.backends.torch_fused`), within a few
    roundings of the two-pass form. Elsewhere, and on torch for a 0-D ``β``: the two-pass form,
    ``β·x`` (:func:`mul_donated`) then ``+ (1-β)·y`` (:func:`add_scaled_`)."""
    weight = 1.0 - beta if one_minus_beta is None else one_minus_beta
    if _has_fused(x) and _fits(x, y) and _fits(x, weight):
        from adaptlr.backends.torch_fused import lerp  # pyright: ignore[reportMissingImports]

        done = lerp(x, y, weight, into=is_donated(scalars, x))
        if done is not None:
            return done
    return add_scaled_(mul_donated(scalars, x, beta), y, weight)


def mul_into_donated(scalars: Any, dest: Any, x: Any, y: Any, *, x_temporary: bool = False) -> Any:
    """``x · y``, the new value of an input state array ``dest`` that the step no longer reads (EG's
    ``v_t``, made from other arrays; DSA's ``P``): written into ``dest`` where the executor donated
    it (:func:`donating`) and the backend writes a product into a given array (torch:
    ``torch.mul(x, y, out=dest)``, :mod:`adaptlr.backends.torch_fused`), so the executor's copy of
    the new state into ``dest`` has nothing left to do; else into ``x`` where it is a temporary of
    the calling step (``x_temporary``, as :func:`mul_`), else a new array. The same number every
    way. ``x`` or ``y`` must have ``dest``'s shape (the other may be 0-D); ``dest`` may be None."""
    return _into_donated(scalars, dest, x, y, "mul_into", mul_ if x_temporary else operator.mul)


def div_into_donated(scalars: Any, dest: Any, x: Any, y: Any, *, x_temporary: bool = False) -> Any:
    """``x / y`` as :func:`mul_into_donated` makes ``x · y`` (Adam's direction, into HD's
    ``d_{t-1}``: :attr:`adaptlr.core.Scalars.directions_into`)."""
    return _into_donated(scalars, dest, x, y, "div_into", div_ if x_temporary else operator.truediv)


def _into_donated(scalars: Any, dest: Any, x: Any, y: Any, fused: str, compute: Any) -> Any:
    shapes = (getattr(x, "shape", None), getattr(y, "shape", None))
    if (dest is not None and is_donated(scalars, dest) and _has_fused(dest)
            and _fits(dest, x) and _fits(dest, y) and dest.shape in shapes):
        from adaptlr.backends import torch_fused  # pyright: ignore[reportMissingImports]

        if getattr(torch_fused, fused)(dest, x, y):
            return dest
    return compute(x, y)


def mul_for_sum(x: Any, y: Any, dtype: Any, *, x_temporary: bool = False) -> Any:
    """``x · y`` (rounded in the arrays' dtype), a term of a sum the caller takes in ``dtype`` (a
    wider float: spec §0.2's float64 accumulation): on torch's CPU, stored in a new array of
    ``dtype`` as it is made (``torch.mul(x, y, out=...)``, :mod:`adaptlr.backends.torch_fused`), so
    the sum reads it as it is; ``torch.sum(dtype=float64)`` of a float32 array first converts a
    copy of it (three words per element more: round 20). Elsewhere ``x · y``, into ``x`` where it is
    a temporary of the calling step (``x_temporary``, as :func:`mul_`): a GPU's reduction converts
    as it reads. The same numbers every way (a float32 product is exact in float64)."""
    if dtype is not None and dtype != x.dtype and _has_fused(x):
        from adaptlr.backends.torch_fused import mul_widened  # pyright: ignore[reportMissingImports]

        product = mul_widened(x, y, dtype)
        if product is not None:
            return product
    return mul_(x, y) if x_temporary else x * y


def add_donated(scalars: Any, x: Any, b: Any) -> Any:
    """``x + b`` for an input state array ``x`` that the step reads once (ActiveLR's gradient sum
    ``C + g``): written into ``x`` where the executor donated it (:func:`donating`), else a new
    array. Addition commutes too."""
    if is_donated(scalars, x) and _fits(x, b):
        x += b
        return x
    return x + b


@contextmanager
def donating(scalars: Any, arrays: Iterable[Any]) -> Iterator[None]:
    """Within the block, the step that ``scalars`` (its :class:`adaptlr.core.Scalars`) are given to
    may write into ``arrays`` (:func:`mul_donated`, :func:`add_donated`).

    For executors that own these arrays (state they copy the step's new state into afterwards),
    and only where nothing reads their old values after the step: not under a guard that restores
    the old state (:attr:`adaptlr.Optimizer.donation_safe`), and not in a pass that may be abandoned
    and run again (the first part of a pass of :func:`adaptlr.backends.part_sums.run_parts`). The
    set travels with the step's scalars, not in a global, so it is per step and per thread and
    ``torch.compile`` traces through it (a compiled step is given none)."""
    donated = scalars.donated  # changed in place: the scalars of with_count share it
    before = set(donated)
    donated.clear()
    donated.update(id(a) for a in arrays)
    try:
        yield
    finally:
        donated.clear()
        donated.update(before)
