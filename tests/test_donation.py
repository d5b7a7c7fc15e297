"""State donated to a step (``adaptlr._inplace.donating``): written in place, never a number changed.

The executors that own the state they copy the new state into (the blocks of ``FlatOptimizer``,
the torch adapter's foreach chunks) let the step write the decay of a state field (``β1·m``,
``C + g``) into the field itself, from the second part of a writing pass on. These tests check
that the trajectories are bitwise those with nothing donated, that the copies back are gone, and
that nothing is donated where the old state is read afterwards (``skip_nonfinite``) or where a part
may be run again.
"""

from __future__ import annotations

import numpy as np
import optree
import pytest

import adaptlr
from adaptlr._inplace import add_donated, donating, mul_donated, mul_into_donated
from adaptlr.backends.fast import FlatOptimizer
from adaptlr.core import Scalars

MUTABLE = ("numpy", "torch", "cupy", "array_api_strict")

# Every algorithm whose code writes into a donated field, with the path it takes on blocks.
DONATING = {
    "adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
    "adam": lambda: adaptlr.adam(1e-2, weight_decay=0.1),
    "radam": lambda: adaptlr.radam(1e-2),
    "adabelief": lambda: adaptlr.adabelief(1e-2),
    "sgd momentum": lambda: adaptlr.sgd(1e-2, momentum=0.9, dampening=0.1),
    "sgd nesterov": lambda: adaptlr.sgd(1e-2, momentum=0.9, nesterov=True),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2),
    "autodrop(adamw), try": lambda: adaptlr.autodrop(adaptlr.adamw(1e-2), steps_per_epoch=3),
    "eg(adamw), two passes": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), scale_lr=0.1, gain_lr=0.1),
    "hd(adamw), two passes": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2, weight_decay=0.1), hyper_lr=1e-3),
    "hd(active(adam)), multiplicative": lambda: adaptlr.hypergradient(
        adaptlr.active(adaptlr.adam(1e-2), steps_per_epoch=2), hyper_lr=1e-2, mode="multiplicative"),
    "prodigy, two passes": lambda: adaptlr.prodigy(weight_decay=0.1),
    "dadapt_adam, two passes": lambda: adaptlr.dadapt_adam(),
    "dadapt_sgd, two passes": lambda: adaptlr.dadapt_sgd(momentum=0.5, weight_decay=0.1),
}
SHAPES = [(40, 30), (7,), (20, 5, 3), (260,)]  # 1,767 elements: 14 blocks of 128
STEPS = 7  # ActiveLR adjusts γ at steps 4 and 6; AutoDrop's boundaries are steps 3 and 6


def _refuse_donation(monkeypatch) -> None:
    monkeypatch.setattr(adaptlr.Optimizer, "donation_safe", property(lambda self: False))


def test_a_donated_field_is_written_in_place_and_an_other_is_not(backend):
    rng = np.random.default_rng(3)
    x_host, b_host = rng.standard_normal(6), rng.standard_normal(6)

    def x():
        return backend.asarray(x_host, "float32")

    b = backend.asarray(b_host, "float32")
    xp = backend.xp
    scalars = Scalars(xp, xp.asarray(1, device=backend.device), backend.device)
    expected = {"mul": x_host.astype(np.float32) * 0.9, "add": x_host.astype(np.float32) + b_host.astype(np.float32)}
    for donate in (False, True):
        for op, run in (("mul", lambda s, a: mul_donated(s, a, 0.9)), ("add", lambda s, a: add_donated(s, a, b))):
            a = x()
            with donating(scalars, [a] if donate else []):
                result = run(scalars, a)
            np.testing.assert_array_equal(backend.to_numpy(result), expected[op], err_msg=f"{op} {donate}")
            if backend.library in MUTABLE:
                assert (result is a) == donate, (op, donate)
    assert not scalars.donated  # the set is the step's only within the block


def test_a_product_is_written_into_a_donated_field_where_the_backend_has_an_output_form(backend):
    """``mul_into_donated``: ``x·y`` into the donated field on torch (``torch.mul(out=)``), a new
    array elsewhere and where nothing is donated; the same number either way."""
    xp = backend.xp
    scalars = Scalars(xp, xp.asarray(1, device=backend.device), backend.device)
    rng = np.random.default_rng(5)
    y_host = rng.standard_normal(6).astype(np.float32)
    a, y = backend.asarray(np.asarray(0.3), "float32"), backend.asarray(y_host, "float32")
    for donate in (False, True):
        dest = backend.asarray(np.zeros(6), "float32")
        with donating(scalars, [dest] if donate else []):
            result = mul_into_donated(scalars, dest, a, y)
        np.testing.assert_array_equal(backend.to_numpy(result), np.float32(0.3) * y_host, err_msg=str(donate))
        assert (result is dest) == (donate and backend.library == "torch"), donate
        if result is not dest:
            np.testing.assert_array_equal(backend.to_numpy(dest), np.zeros(6, np.float32))


@pytest.mark.parametrize("name, make, first_block", [
    # m, v, p, m_t, v_t of the first block; v_t of each later block without the output form
    ("eg", lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), 1e-2, 1e-2), 5),
    # m, v, d_prev of the first block; d_prev (the base direction, Scalars.directions_into) of the later ones
    ("hd", lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3, weight_decay=0.01), 1e-8), 3),
])
def test_a_state_field_made_by_a_product_is_written_in_place_and_not_copied_back(name, make, first_block,
                                                                                  monkeypatch):
    """EG's ``v_t`` and HD's ``d_t`` (the base direction's last pass) go into their state arrays on
    the donated blocks of the torch adapter: a blocked step copies only the first (undonated)
    block's per-element fields back; without the output form each later block copies one more."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends import torch_fused
    from adaptlr.backends.torch import Optimizer
    from tests.conftest import aten_ops_by_name

    n = 4096
    copies = []
    for output_form in (True, False):
        if not output_form:
            monkeypatch.setattr(torch_fused, "mul_into", lambda *args: False)
            monkeypatch.setattr(torch_fused, "div_into", lambda *args: False)  # (Adam's direction, round 23)
        p = torch.nn.Parameter(torch.randn(3 * n, generator=torch.Generator().manual_seed(0)))
        p.grad = torch.randn(3 * n, generator=torch.Generator().manual_seed(1))
        opt = Optimizer([p], make(), fast={"block_size": n})
        opt.step()
        assert opt.fast_path == "blocked"
        copies.append(aten_ops_by_name(opt.step, n).get("copy_", 0))
    assert copies == [first_block, first_block + 2], (name, copies)


def test_a_temporary_factor_is_written_into_where_the_field_is_not_donated(backend):
    xp = backend.xp
    scalars = Scalars(xp, xp.asarray(1, device=backend.device), backend.device)
    x, b = backend.asarray(np.full(4, 2.0), "float32"), backend.asarray(np.full(4, 3.0), "float32")
    result = mul_donated(scalars, x, b, b_temporary=True)
    np.testing.assert_array_equal(backend.to_numpy(result), np.full(4, 6.0, np.float32))
    if backend.library in MUTABLE:
        assert result is b
    np.testing.assert_array_equal(backend.to_numpy(x), np.full(4, 2.0, np.float32))  # the field untouched


def _blocked_run(library: str, make, steps: int = STEPS) -> tuple[list, list]:
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    if library == "torch":
        torch = pytest.importorskip("torch")
        host = [torch.from_numpy(p) for p in host]
        grads = [[torch.from_numpy(g) for g in gs] for gs in grads]
    fo = FlatOptimizer(make(), host, block_size=128)
    assert fo.mode == "blocked"
    for gs in grads:
        fo.step(gs)
    return [np.asarray(p).copy() for p in fo.params], _leaves(fo.per_tensor_state())


def _leaves(tree) -> list:
    import optree

    return [np.asarray(x).copy() for x in optree.tree_leaves(tree)]


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("name", DONATING)
def test_blocks_with_the_state_donated_take_bitwise_the_same_steps(name, library, monkeypatch):
    donated = _blocked_run(library, DONATING[name])
    _refuse_donation(monkeypatch)
    copied = _blocked_run(library, DONATING[name])
    for kind, a, b in (("params", donated[0], copied[0]), ("state", donated[1], copied[1])):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=f"{name}: {kind}")


def test_the_blocks_copy_back_no_state_they_were_given():
    """AdamW on blocks: the first block's m and v are copied back (it is not donated), no other's."""
    torch = pytest.importorskip("torch")
    from tests.conftest import aten_ops_by_name

    params = [torch.randn(4096) for _ in range(2)]
    fo = FlatOptimizer(adaptlr.adamw(1e-3), params, block_size=1024)  # 8 blocks
    grads = [torch.randn(4096) for _ in range(2)]
    fo.step(grads)
    copies = aten_ops_by_name(lambda: fo.step(grads), numel=1024).get("copy_", 0)
    assert copies == 2, copies
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:
        _refuse_donation(m)
        assert aten_ops_by_name(lambda: fo.step(grads), numel=1024).get("copy_", 0) == 16


@pytest.mark.parametrize("name", ["adamw", "active(adamw)", "prodigy, two passes", "eg(adamw), two passes"])
def test_foreach_chunks_with_the_state_donated_take_bitwise_the_same_steps(name, monkeypatch):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    def run() -> tuple[list, list]:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
        opt = Optimizer(params, DONATING[name](), fast="foreach")
        opt.foreach_chunk_elements = 300  # 7 chunks
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        assert opt.fast_path == "foreach"
        state = [t.clone() for entry in opt.state.values() for t in entry.values() if isinstance(t, torch.Tensor)]
        return [p.detach().clone() for p in params], state

    donated = run()
    _refuse_donation(monkeypatch)
    copied = run()
    for a, b in zip(donated[0] + donated[1], copied[0] + copied[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_guard_that_restores_the_old_state_is_given_nothing_to_write_into():
    """``skip_nonfinite`` reads the old state after the step: it is not donation-safe (the executors
    ask :attr:`~adaptlr.Optimizer.donation_safe` before donating), and a foreach step with an
    infinite gradient in its last parameter leaves every parameter's state as it was."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    assert adaptlr.adamw(1e-2).donation_safe
    assert not adaptlr.skip_nonfinite(adaptlr.adamw(1e-2)).donation_safe
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    opt = Optimizer(params, adaptlr.skip_nonfinite(adaptlr.adamw(1e-2)), fast="foreach")
    opt.foreach_chunk_elements = 300  # 7 chunks
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    before = {(i, k): t.clone() for i, p in enumerate(params) for k, t in opt.state[p].items() if t.ndim}
    params[3].grad[200] = float("inf")
    opt.step()
    assert opt.fast_path == "foreach"
    assert before
    for (i, k), t in before.items():
        torch.testing.assert_close(opt.state[params[i]][k], t, rtol=0, atol=0, msg=f"param {i}: {k}")


# The torch adapter's eager list path (fast=False; the CPU default for algorithms whose sums stay
# within tensors): whole lists, parts of a few tensors, and row blocks of large tensors.
LIST_PATH = {
    "adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2),
    "dsa(adamw)": lambda: adaptlr.dsa(adaptlr.adamw(1e-2, weight_decay=0.1), hyper_lr=0.1),
    "hd(adamw) per tensor": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3, granularity="tensor"),
    "eg(adamw) per tensor": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), 0.1, 0.1, scale="tensor"),
    "ldog": lambda: adaptlr.dog(layerwise=True),
}


@pytest.mark.parametrize("parts", [None, 300])
@pytest.mark.parametrize("name", LIST_PATH)
def test_the_list_path_with_the_state_donated_takes_bitwise_the_same_steps(name, parts, monkeypatch):
    """The eager list path gives the step its state to write into, whole (``parts=None``) and in
    parts and row blocks (``list_part_elements=300``: the (40, 30) parameter in blocks of 10 rows,
    each block donated, the first too): bitwise the trajectory with nothing donated."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    def run() -> list:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
        opt = Optimizer(params, LIST_PATH[name](), fast=False)
        opt.list_part_elements = parts
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        state = [t.clone() for entry in opt.state.values() for t in optree.tree_leaves(dict(entry))
                 if isinstance(t, torch.Tensor)]
        return [p.detach().clone() for p in params] + state

    donated = run()
    _refuse_donation(monkeypatch)
    copied = run()
    for a, b in zip(donated, copied, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("parts", [None, 600])
def test_the_list_path_copies_back_no_state_it_was_given(parts):
    """AdamW (whole) and DSA (whole, and in two row blocks) on the eager list path, one (40, 30)
    parameter: no state field the size of the parameter or block is copied back (m, v; DSA's P
    too); with donation refused, each is, in every block (the first block was not donated before)."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer
    from tests.conftest import aten_ops_by_name

    for make, fields, numel in ((LIST_PATH["adamw"], 2, 1200), (LIST_PATH["dsa(adamw)"], 3, parts or 1200)):
        param = torch.nn.Parameter(torch.randn(40, 30))
        opt = Optimizer([param], make(), fast=False)
        opt.list_part_elements = parts  # (AdamW: no sums, no row blocks)
        param.grad = torch.randn(40, 30)
        opt.step()
        assert aten_ops_by_name(opt.step, numel).get("copy_", 0) == 0
        with pytest.MonkeyPatch().context() as m:
            _refuse_donation(m)
            assert aten_ops_by_name(opt.step, numel).get("copy_", 0) == fields * (1200 // numel)
