"""What the torch adapter's CPU steps of the learning-rate-free bases share: blocks, buffers, float64 sums.

Those steps (:mod:`adaptlr.backends.torch_lr_free`) run over blocks of at most
:data:`BLOCK_ELEMENTS` elements of each parameter's own storage (views: ``split`` of the flattened
tensor), with their temporaries in a few block-sized buffers that stay in the cache, and sum over
the whole model with :class:`RowSums`: partial sums of :data:`ROW` elements in the parameter dtype,
added in float64 (spec §0.2's float64 accumulation over the model's many tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import array_api_compat.torch as xp_torch
import torch

from adaptlr._precision import largest

__all__ = ["BLOCK_ELEMENTS", "ROW", "Buffers", "RowSums", "blocks", "coupled", "largest_rate", "plain_tensors",
           "weighted_sum_pass"]

# Elements per block: ResNet-18 shapes, torch CPU, × the upstream optimizer at 64K/128K/256K/512K
# elements: Prodigy 0.93/0.79/0.77/0.78, D-Adapt Adam 1.10/0.95/0.91/0.96, D-Adapt SGD 0.84/0.73/0.73/0.77,
# DoG 1.01/0.86/0.84/0.86 (docs/performance.md, round 31): two float32 buffers of 1 MiB.
BLOCK_ELEMENTS = 1 << 18
ROW = 256  # elements per partial sum in the parameter dtype (RowSums)


class RowSums:
    """One whole-model sum of a step, from blocks: ``Σ x_i`` (or ``Σ x_i²``, ``squares=True``) of each
    block added by :meth:`add`, in partial sums of :data:`ROW` consecutive elements in the
    parameters' dtype (torch's vectorized cascade sum: each within about ``log2(ROW)·ε·Σ|x_i|``;
    for squares each row's 2-norm, which reads the block once and writes no ``x²``), written into
    one buffer of the step; :meth:`total` adds them in ``wide`` (squaring the norms there).

    A float64 sum of a whole float32 block would make a float64 copy of the block first (8 ms of a
    30 ms ResNet-18 Prodigy step), and a partial sum per block is three small operations per block
    (docs/performance.md, round 31)."""

    def __init__(self, params: Sequence[torch.Tensor], block: int, wide: torch.dtype, squares: bool = False) -> None:
        rows = 0
        for p in params:  # the blocks of each parameter: full ones, then the rest
            full, rest = divmod(p.numel(), block)
            rows += full * -(-block // ROW) + -(-rest // ROW)
        self.parts = torch.empty(rows, dtype=params[0].dtype)
        self.wide, self.squares, self.used = wide, squares, 0

    def add(self, x: torch.Tensor) -> None:
        """Add the terms of the 1-D block ``x``."""
        n, k = x.numel(), self.used
        whole = n - n % ROW
        if whole:
            rows, out = x[:whole].view(-1, ROW), self.parts[k : k + whole // ROW]
            if self.squares:
                torch.linalg.vector_norm(rows, dim=1, out=out)
            else:
                torch.sum(rows, dim=1, out=out)
            k += whole // ROW
        if whole < n:
            tail, out = x[whole:], self.parts[k]
            if self.squares:
                torch.linalg.vector_norm(tail, out=out)
            else:
                torch.sum(tail, dim=0, out=out)
            k += 1
        self.used = k

    def total(self) -> torch.Tensor:
        """The sum (0-D, ``wide``)."""
        parts = self.parts[: self.used].to(self.wide)
        return (parts.square_() if self.squares else parts).sum()


def largest_rate(alphas: Sequence[torch.Tensor], wide: torch.dtype) -> torch.Tensor:
    """``a = max α`` over the parameters' rates (0-D, ``wide``), each distinct tensor once: the rate
    whose estimate the learning-rate-free bases make (:func:`adaptlr._precision.largest`)."""
    return largest(xp_torch, list({id(a): a for a in alphas}.values()), wide)


def coupled(g: torch.Tensor, p: torch.Tensor, weight_decay: float, buffer: torch.Tensor) -> torch.Tensor:
    """The objective's gradient ``g + λθ`` of a block (into ``buffer``), or ``g`` for ``λ = 0``."""
    return torch.add(g, p, alpha=weight_decay, out=buffer) if weight_decay else g


def weighted_sum_pass(buffers: Buffers, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      entries: Sequence[dict], coupled_decays: Sequence[float], other: str,
                      term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                     torch.Tensor],
                      beta: float, weight: torch.Tensor, wide: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of Prodigy and D-Adapt Adam: per block, ``Σ term(θ, g, s, x, buffer)`` (with
    the old ``s`` and the state field ``other`` as ``x``), then ``s ← β·s + w·g`` in place (``w``
    0-D; ``"base.s"``) and ``Σ|s|``; ``g`` is ``g + λθ`` under coupled decay. Returns the two sums
    (0-D, ``wide``)."""
    dots, magnitudes = buffers.sums(wide), buffers.sums(wide)
    for p, g, entry, lam in zip(params, grads, entries, coupled_decays):
        for pb, gb, sb, xb in blocks(buffers.block, p, g, entry["base.s"], entry[other]):
            gb = coupled(gb, pb, lam, buffers(1, pb))
            dots.add(term(pb, gb, sb, xb, buffers(0, pb)))
            sb.mul_(beta).addcmul_(gb, weight)
            magnitudes.add(torch.abs(sb, out=buffers(0, pb)))
    return dots.total(), magnitudes.total()


def plain_tensors(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                  state_dtype: torch.dtype | None) -> bool:
    """Plain contiguous float32 or float64 CPU tensors of one dtype, their gradients alike, the state in
    that dtype: what the blocked steps take (``view(-1)`` of each is its own storage)."""
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64) or state_dtype not in (None, dtype):
        return False
    for p, g in zip(params, grads, strict=True):
        if (type(p.detach()) is not torch.Tensor or p.device.type != "cpu" or p.dtype != dtype
                or not p.is_contiguous() or g is None or type(g) is not torch.Tensor or g.layout != torch.strided
                or g.dtype != dtype or not g.is_contiguous()):
            return False
    return True


def blocks(block: int, *tensors: torch.Tensor) -> Iterable[tuple[torch.Tensor, ...]]:
    """The blocks of ``tensors`` (same numel) at the same places: views of their flattened storage
    (a tensor of at most ``block`` elements is one block, without ``split``'s Python)."""
    flat = [t.view(-1) for t in tensors]
    if flat[0].numel() <= block:
        return (tuple(flat),)
    return zip(*(f.split(block) for f in flat))


class Buffers:
    """Block-sized buffers of one dtype for a step's temporaries (``buffers(k, like)``), and the
    block size of the step."""

    def __init__(self, params: Sequence[torch.Tensor], block: int | None, count: int) -> None:
        self.params = params
        self.block = min(block or BLOCK_ELEMENTS, max(p.numel() for p in params))
        self._buffers = [torch.empty(self.block, dtype=params[0].dtype) for _ in range(count)]

    def sums(self, wide: torch.dtype, squares: bool = False) -> RowSums:
        """A :class:`RowSums` for these parameters' blocks."""
        return RowSums(self.params, self.block, wide, squares)

    def __call__(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``k`` cut to ``like``'s number of elements."""
        buffer, n = self._buffers[k], like.numel()
        return buffer if n == self.block else buffer[:n]
