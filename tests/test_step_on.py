"""``FlatOptimizer.step_on``: the blocked step on the caller's own parameter and gradient storage.

The torch adapter's default CPU path on a large model used to copy every parameter and gradient into
the flat buffers before each blocked step and the parameters out after it (6 words per parameter on
top of AdamW's 7). ``step_on`` gives each parameter of at least half a block blocks of its own, views
of its storage, and copies only the small parameters and those with another memory layout. These
tests check that it is the same step (float64, 1e-12 of the functional API, through epoch boundaries
and two-pass sums), that it really reads and writes the large parameters where they live, and the
plan of its blocks.
"""

from __future__ import annotations

import numpy as np
import pytest

import adaptlr
from adaptlr.backends.fast import FlatOptimizer
from tests.conftest import max_rel_err, random_problem

# Block 8: (6, 5) and (3, 4, 2) have blocks of their own (30 -> 4 pieces of 8, 8, 8, 6; 24 -> 3 of 8),
# (11,) too (2 pieces of 6 and 5); (3,), (2,) and () are below half a block and share the flat buffers.
SHAPES = [(3,), (6, 5), (2,), (11,), (3, 4, 2), ()]
BLOCK = 8
STEPS = 9
EPOCH = 3


def _algorithms() -> dict:
    return {
        "adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),  # blockwise: one pass
        "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=EPOCH, increase=0.5),
        # sums at epoch boundaries: two passes there, one between
        "autodrop(sgdm)": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=EPOCH,
                                                   theta=30.0, theta_max=90.0, patience_epochs=1),
        "hd_global(adamw)": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3),
        "prodigy": lambda: adaptlr.prodigy(d0=1e-3, weight_decay=0.01),
    }


def _problem(library: str):
    return random_problem(library, SHAPES, STEPS, seed=5)


def _copy(x):
    return x.clone() if hasattr(x, "clone") else x.copy()


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(_algorithms()))
def test_step_on_is_the_functional_step(name, library):
    """``step_on`` on the caller's arrays: the functional API's parameters and state to 1e-12."""
    opt = _algorithms()[name]()
    params, noise = _problem(library)
    functional = [_copy(p) for p in params]
    state = opt.init(functional)
    own = [_copy(p) for p in params]
    fo = FlatOptimizer(opt, own, block_size=BLOCK)
    assert fo.mode == "blocked"
    for ns in noise:
        grads = [0.5 * p + n for p, n in zip(functional, ns)]
        updates, state = opt.update(grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        fo.step_on(own, [0.5 * p + n for p, n in zip(own, ns)])
    assert max_rel_err(own, functional) <= 1e-12
    assert max_rel_err(fo.per_tensor_state(), state) <= 1e-12


def test_step_on_writes_large_parameters_in_their_own_storage_and_copies_only_the_small_ones():
    """A parameter with blocks of its own is never copied into the flat buffers (their view of it
    keeps the value it had when the optimizer was made); a small one is staged there."""
    opt = adaptlr.adamw(1e-2)
    params, noise = _problem("numpy")
    fo = FlatOptimizer(opt, params, block_size=BLOCK)
    before = [np.array(v) for v in fo.params]
    buffers = [p.__array_interface__["data"][0] for p in params]
    fo.step_on(params, noise[0])
    _, direct = fo._member_blocks()
    assert direct == [False, True, False, True, True, False]
    for i, (p, scratch) in enumerate(zip(params, fo.params)):
        assert p.__array_interface__["data"][0] == buffers[i]
        if p.size:
            assert not np.array_equal(p, before[i])  # every parameter moved
        if direct[i]:
            np.testing.assert_array_equal(scratch, before[i])  # the flat buffers never saw it
        else:
            np.testing.assert_array_equal(scratch, p)  # staged: copied in, stepped, copied out


def test_step_on_copies_parameters_and_gradients_of_another_layout():
    """Non-contiguous parameters and gradients (column-major storage) are staged: the
    same step as on contiguous ones, and written back into the caller's strided storage."""
    torch = pytest.importorskip("torch")
    opt = adaptlr.adamw(1e-2, weight_decay=0.1)
    params, noise = _problem("torch")
    contiguous = [p.clone() for p in params]
    strided = [p.clone() for p in params]
    strided[1] = params[1].t().contiguous().t()  # (6, 5) in column-major storage
    strided[4] = torch.empty_strided((3, 4, 2), (1, 3, 12), dtype=torch.float64).copy_(params[4])
    assert not strided[1].is_contiguous() and not strided[4].is_contiguous()
    a = FlatOptimizer(opt, contiguous, block_size=BLOCK)
    b = FlatOptimizer(opt, strided, block_size=BLOCK)
    for ns in noise:
        a.step_on(contiguous, ns)
        b.step_on(strided, [ns[0], ns[1].t().contiguous().t(), *ns[2:]])  # a non-contiguous gradient too
    assert strided[1].stride() == (1, 6) and strided[4].stride() == (1, 3, 12)  # written where they live
    assert max_rel_err(strided, contiguous) <= 1e-15


def test_member_blocks_lay_out_small_parameters_first_and_cut_large_ones_into_equal_pieces():
    fo = FlatOptimizer(adaptlr.adamw(), [np.zeros(s) for s in SHAPES], block_size=BLOCK)
    (bucket,) = fo._buckets
    assert [i for i, *_ in bucket.members] == [0, 2, 5, 1, 3, 4]  # small ones first, order kept
    blocks, _ = fo._member_blocks()
    sizes = [(stop - start, member is not None and member[0]) for _, start, stop, member in blocks]
    assert sizes == [(6, False), (8, 1), (8, 1), (8, 1), (6, 1), (6, 3), (5, 3), (8, 4), (8, 4), (8, 4)]
    covered = [k for _, start, stop, _ in blocks for k in range(start, stop)]
    assert covered == list(range(bucket.size))  # every element in exactly one block, in order
    for _, start, stop, member in blocks:
        if member is not None:
            i, offset = member
            n = next(n for j, _, n, _ in bucket.members if j == i)
            assert offset <= start < stop <= offset + n


def test_step_on_needs_the_blocked_mode_and_every_leaf():
    params = [np.zeros(s) for s in SHAPES]
    with pytest.raises(ValueError, match="blocked mode"):
        FlatOptimizer(adaptlr.adamw(), params).step_on(params, params)
    fo = FlatOptimizer(adaptlr.adamw(), params, block_size=BLOCK)
    with pytest.raises(ValueError, match="6 leaves"):
        fo.step_on(params[:-1], params)


def test_torch_adapter_blocked_path_steps_parameters_where_they_live():
    """The adapter's blocked path (``step_on``): a channels-last weight and a contiguous one keep
    their storage and strides, and follow the functional API to 1e-12."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    opt = adaptlr.active(adaptlr.adamw(1e-2, weight_decay=0.1), steps_per_epoch=EPOCH, increase=0.5)
    g = torch.Generator().manual_seed(2)
    start = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 3, 2, 2), (20,), (3,))]
    params = [torch.nn.Parameter(start[0].clone(memory_format=torch.channels_last)),
              *(torch.nn.Parameter(p.clone()) for p in start[1:])]
    pointers = [p.data_ptr() for p in params]
    adapter = Optimizer(params, opt, fast={"block_size": BLOCK})
    functional = [p.clone() for p in start]
    state = opt.init(functional)
    for _ in range(STEPS):
        grads = [0.5 * p + torch.randn(p.shape, generator=g, dtype=torch.float64) for p in functional]
        updates, state = opt.update(grads, state, functional)
        functional = adaptlr.apply_updates(functional, updates)
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        adapter.step()
        assert adapter.fast_path == "blocked"
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert [p.data_ptr() for p in params] == pointers
    assert max_rel_err([p.detach() for p in params], functional) <= 1e-12
