"""Chunks of the torch adapter's ``"foreach"`` step: temporaries bounded by a chunk, not the model.

Each operation of the foreach path (:mod:`adaptlr.backends.foreach`) makes a temporary list as large
as its inputs, and the functional update keeps several of them alive at once (the new state fields,
the direction, the update): over the whole model in one list, a step held about six model-sized
temporaries (29.7× the largest tensor on ResNet-18 shapes; docs/performance.md), enough to run a
large model out of GPU memory where ``torch.optim.AdamW(foreach=True)`` fits.

For algorithms with no sum over elements (:func:`~adaptlr.backends.fast.partitionable`: the
blockwise ones, elementwise with per-element state, and Schedule-Free, whose 0-D state depends on
α and t only) the step is the same on any partition of the elements, so the adapter runs it over
chunks of at most ``budget`` elements, one after the other, each reading the old 0-D values, and
writes each chunk's results before the next: the temporaries are one chunk's. A parameter larger
than the budget is cut into pieces, views of its own storage (``t.view(-1)[a:b]``, contiguous
tensors only), so nothing is copied. Algorithms with sums over elements (AutoDrop, HD/EG global,
Mechanic, the learning-rate-free bases) cannot run a chunk on its own.

Algorithms whose sums are *replayable* (:func:`~adaptlr.backends.fast.sums_replayable`: every sum
over elements goes through ``ctx.reduce.total``, and no sum's terms depend on another sum of the
same step: Prodigy, D-Adapt Adam, DoG, DoWG, AutoDrop, HD and EG global, Mechanic) run in two
passes over the chunks (:mod:`adaptlr.backends.part_sums`): the first runs each chunk's step with
a ``Recorder`` that keeps its partial sums and writes nothing; the second runs each chunk again
with a ``Replayer`` that answers every sum with the whole model's (the partials added up), and
writes. That doubles the step's arithmetic, so by default it is used only on models above
:data:`TWO_PASS_MIN` elements, where the temporaries of one update over the whole lists (about six
model-sized lists) are what a GPU lacks.
"""

from __future__ import annotations

__all__ = ["LIVE_CHUNKS", "MAX_CHUNKS", "MIN_CHUNK", "TWO_PASS_MIN", "Piece", "default_budget", "plan"]

Piece = tuple[int, slice | None]  # a parameter's index and its elements (None: the whole tensor)

# A chunk's temporaries are about six (AdamW) to eight (ActiveLR) chunk-sized lists, measured with
# the bench's peak counter (docs/performance.md), so a budget of the largest tensor's eighth keeps a
# step's temporaries within the largest tensor. Two floors keep a GPU step from being made of
# launches: a chunk of MIN_CHUNK float32 elements moves ≥ 64 MB per operation (≈ 13 µs at
# 4.8 TB/s against ≈ 5 µs per launch), and a step has at most MAX_CHUNKS chunks.
MIN_CHUNK = 1 << 24
MAX_CHUNKS = 64
LIVE_CHUNKS = 8
# Models above this many elements (1 GiB of float32) run algorithms with replayable sums in chunks
# by default (two passes: twice the arithmetic, a chunk's temporaries instead of the model's).
TWO_PASS_MIN = 1 << 28


def default_budget(numels: list[int]) -> int:
    """Elements per chunk: the largest of ``numel(largest) / 8`` (temporaries within the largest
    tensor), :data:`MIN_CHUNK` and ``numel(model) / 64`` (launches amortised).

    For a model of 6.7B parameters whose largest tensor has 131M elements: 105M elements per chunk,
    64 chunks, temporaries ≈ 6 × 420 MB (float32) instead of ≈ 6 × 27 GB without chunks.
    """
    largest, total = max(numels, default=1), sum(numels)
    return max(MIN_CHUNK, -(-largest // LIVE_CHUNKS), -(-total // MAX_CHUNKS))


def plan(kinds: list[list[int]], numels: list[int], splittable: list[bool],
         budget: int) -> list[list[tuple[int, list[Piece]]]]:
    """Cut the parameters into chunks of at most ``budget`` elements.

    Args:
        kinds: the parameter indices of each list of the step (one per param group, dtype, device).
        numels: elements per parameter.
        splittable: whether parameter ``i`` may be cut into pieces (its tensors are contiguous).
        budget: the most elements per chunk (> 0); a parameter that cannot be cut is a chunk alone
            when it is larger.

    Returns:
        the chunks in order; each a list of ``(kind, pieces)`` segments, ``pieces`` in parameter order.
    """
    if budget < 1:
        raise ValueError(f"the chunk budget must be at least 1 element, got {budget}")
    chunks: list[list[tuple[int, list[Piece]]]] = []
    current: list[tuple[int, list[Piece]]] = []
    size = 0
    for k, rows in enumerate(kinds):
        for i in rows:
            n = numels[i]
            cut = splittable[i] and n > budget
            for start in range(0, n, budget) if cut else [0]:
                count = min(budget, n - start) if cut else n
                if current and size + count > budget:
                    chunks.append(current)
                    current, size = [], 0
                piece: Piece = (i, slice(start, start + count) if cut else None)
                if current and current[-1][0] == k:
                    current[-1][1].append(piece)
                else:
                    current.append((k, [piece]))
                size += count
    if current:
        chunks.append(current)
    return chunks
