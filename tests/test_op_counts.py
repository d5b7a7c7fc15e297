"""Dispatched aten operations per step (deterministic; on a GPU, the kernel launches of a step).

The torch adapter's GPU default (``fast="auto"`` on a GPU takes ``"foreach"``: one
``torch._foreach_*`` op per operation of the algorithm over the lists of a param group) must
dispatch no more operations than ``torch.optim.AdamW(foreach=True)``, and the learning-rate-free
optimizers no more than their upstream PyTorch packages (which run a Python loop per parameter),
on ResNet-18 shapes and on 500 small tensors. Counted with ``adaptlr bench``'s counter on CPU
tensors: the count is that of the dispatched operations, not of the device. Speed is not asserted
here (docs/performance.md has the timings).
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

import adaptlr  # noqa: E402
from adaptlr.backends.bench import RESNET18_SHAPES, count_aten_ops  # noqa: E402
from adaptlr.backends.torch import Optimizer  # noqa: E402
from tests.conftest import aten_ops_by_name  # noqa: E402

# ResNet-18's 62 tensors with every dimension above 8 divided by 8 (the counts of the foreach paths
# depend on the number of tensors, not their sizes; the test checks that too) and 500 small tensors.
SETS = {"resnet18": [tuple(d // 8 if d > 8 else d for d in s) for s in RESNET18_SHAPES], "small500": [(32, 64)] * 500}


def _params(shapes: list, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.01
    return params


def _ops_after_first_step(optimizer) -> int:
    optimizer.step()  # state built; later steps are what a training loop repeats
    return count_aten_ops(optimizer.step)


@pytest.fixture(scope="module")
def foreach_adamw_ops() -> dict:
    return {name: _ops_after_first_step(torch.optim.AdamW(_params(shapes), lr=1e-3, weight_decay=1e-2,
                                                          foreach=True))
            for name, shapes in SETS.items()}


def test_counter_counts_each_dispatched_operation():
    x = torch.ones(3)
    assert count_aten_ops(lambda: (x * 2 + 1).sqrt()) == 3
    assert count_aten_ops(lambda: torch._foreach_add_([x, x, x], 1.0)) == 1
    fused = torch.optim.AdamW(_params([(4,), (5,)]), fused=True)
    assert _ops_after_first_step(fused) <= 5  # the fused kernel plus its step-count update


ALGORITHMS = {
    "adamw": lambda: adaptlr.adamw(1e-3, weight_decay=1e-2),
    # between epoch boundaries (adaptlr._boundary): a few ops more than AdamW
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-3, weight_decay=1e-2), steps_per_epoch=100),
    "autodrop(adamw)": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3, weight_decay=1e-2), steps_per_epoch=100),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("set_name", list(SETS))
def test_gpu_default_path_dispatches_no_more_ops_than_torch_foreach(set_name, name, foreach_adamw_ops):
    opt = ALGORITHMS[name]()
    adapter = Optimizer(_params(SETS[set_name]), opt, fast="foreach")
    ops = _ops_after_first_step(adapter)
    assert adapter.fast_path == "foreach"
    assert ops <= foreach_adamw_ops[set_name], (ops, foreach_adamw_ops[set_name])
    # independent of the number of tensors: the same count for 62 and for 500 tensors
    assert ops == _ops_after_first_step(Optimizer(_params([(3, 2)] * 7), opt, fast="foreach"))


def test_auto_takes_the_foreach_path_off_the_cpu():
    # The meta device stands in for a GPU: shapes and dtypes only, no data.
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(4, 3), (3,)]]
    for p in params:
        p.grad = torch.empty(p.shape, device="meta")
    adapter = Optimizer(params, adaptlr.adamw(1e-3))
    adapter.step()
    assert adapter.fast_path == "foreach"


def test_cpu_default_on_small_tensors_dispatches_no_more_ops_than_torch_foreach(foreach_adamw_ops):
    adapter = Optimizer(_params(SETS["small500"]), adaptlr.adamw(1e-3, weight_decay=1e-2))
    ops = _ops_after_first_step(adapter)
    assert adapter.fast_path == "blocked"
    assert ops <= foreach_adamw_ops["small500"], ops


def _upstream(name: str):
    if name == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy
    if name in ("dadapt_adam", "dadapt_sgd"):
        import dadaptation

        return dadaptation.DAdaptAdam if name == "dadapt_adam" else dadaptation.DAdaptSGD
    import dog

    return dog.DoG


_PACKAGES = {"prodigy": "prodigyopt", "dadapt_adam": "dadaptation", "dadapt_sgd": "dadaptation", "dog": "dog"}


@pytest.mark.parametrize("name", list(_PACKAGES))
def test_learning_rate_free_default_path_dispatches_no_more_ops_than_upstream(name):
    if importlib.util.find_spec(_PACKAGES[name]) is None:
        pytest.skip(f"{_PACKAGES[name]} is not installed")
    import warnings

    shapes = SETS["resnet18"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dog-optimizer warns about its lr argument
        upstream = _ops_after_first_step(_upstream(name)(_params(shapes)))
    adapter = Optimizer(_params(shapes), getattr(adaptlr, name)(), fast="foreach")
    ops = _ops_after_first_step(adapter)
    assert adapter.fast_path == "foreach"
    assert ops <= upstream, (ops, upstream)


# -- host syncs and bytes (adaptlr.backends.bench.step_costs: the GPU estimates' counts) --------------


def test_step_costs_count_launches_syncs_and_bytes():
    from adaptlr.backends.bench import step_costs

    x = torch.ones(1000)  # 4000 bytes
    # read, write (in place: nothing fresh)
    assert vars(step_costs(lambda: x.mul_(2))) == {"launches": 1, "syncs": 0, "bytes": 8000, "fresh": 0}
    # 2 reads, 1 result in a new tensor
    assert vars(step_costs(lambda: x * x)) == {"launches": 1, "syncs": 0, "bytes": 12000, "fresh": 4000}
    assert vars(step_costs(lambda: torch._foreach_add_([x, x], 1.0))) == {
        "launches": 1, "syncs": 0, "bytes": 16000, "fresh": 0}
    assert step_costs(lambda: torch._foreach_add([x, x], 1.0)).fresh == 8000
    costs = step_costs(lambda: float(x.sum()))  # the sum reads x; its 0-D result is not counted; one sync
    assert (costs.launches, costs.syncs, costs.bytes) == (2, 1, 4000)
    assert step_costs(lambda: x.view(10, 100)).bytes == 0  # a view moves nothing


@pytest.mark.parametrize("name", ["active(adamw)", "autodrop(adamw)"])
def test_cpu_blocks_read_the_epoch_boundary_on_the_host_once_per_step(name):
    """On the CPU the boundary is a host read of the step count (adaptlr._boundary): one per step, not
    one per block of the torch adapter's blocked default (and the 0-D work around it once too)."""
    from adaptlr.backends.bench import step_costs

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(300, 200), (500,), (100, 100)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    adapter = Optimizer(params, ALGORITHMS[name](), fast={"block_size": 4096})  # 21 blocks
    adapter.step()
    assert adapter.fast_path == "blocked"
    before = aten_ops_by_name(adapter.step)
    assert step_costs(adapter.step).syncs == 1
    assert before.get("ne", 0) <= 1  # AutoDrop's "dropped" once per step


@pytest.mark.parametrize("fast", ["foreach", False])
@pytest.mark.parametrize("name", list(_PACKAGES))
def test_learning_rate_free_steps_make_no_host_sync_where_the_upstream_makes_one_per_parameter(name, fast):
    from adaptlr.backends.bench import step_costs

    shapes = SETS["resnet18"]
    adapter = Optimizer(_params(shapes), getattr(adaptlr, name)(), fast=fast)
    adapter.step()
    assert step_costs(adapter.step).syncs == 0
    if importlib.util.find_spec(_PACKAGES[name]) is None:
        return  # the upstream's count is the estimate's premise, checked where it is installed
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        upstream = _upstream(name)(_params(shapes))
        upstream.step()
        assert step_costs(upstream.step).syncs >= len(shapes)


@pytest.mark.parametrize("fast", ["foreach", "foreach-chunks", False])
def test_no_registered_algorithm_reads_a_device_value_on_the_host_in_a_step(fast):
    """Every algorithm of the conformance registry steps through the torch adapter's foreach path
    (the GPU default; whole lists, and chunks of 100 elements: two passes where it sums) and its
    list path on the meta device, a stand-in for a GPU on which any host
    read of a value (``.item()``, ``bool(t)``) raises, over an epoch boundary: no step waits for the
    device. (A 0-D tensor met by ``torch._foreach_add`` without ``alpha`` resolves to its ``.Scalar``
    overload, a host read: :mod:`adaptlr.backends.foreach` names the ``.Tensor`` overloads.)"""
    from adaptlr.conformance.algorithms import ALGORITHMS as REGISTRY
    from adaptlr.conformance.algorithms import S

    stepped, failed = [], {}
    for name, entry in REGISTRY.items():
        if entry.missing():
            continue
        params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(24, 16), (40,), (3, 2, 5)]]
        adapter = Optimizer(params, entry.build(), fast="foreach" if fast == "foreach-chunks" else fast)
        if fast == "foreach-chunks":
            adapter.foreach_chunk_elements = 100
        try:
            for _ in range(S + 1):  # an epoch boundary (the registry's steps per epoch) within the run
                for p in params:
                    p.grad = torch.empty(p.shape, device="meta")
                adapter.step()
        except RuntimeError as error:
            failed[name] = f"{type(error).__name__}: {error}"
            continue
        stepped.append((name, adapter.fast_path))
    assert not failed, f"steps that read a device value on the host: {failed}"
    assert len(stepped) >= 25
    if fast in ("foreach", "foreach-chunks"):  # the foreach path is the one that names the overloads
        assert sum(path == "foreach" for _, path in stepped) >= 20, stepped


def test_dsa_reads_a_matrix_in_two_slice_reductions_per_sum_and_scaled_rates_are_not_negated():
    """DSA's tensor sums come from its row sums (6 full-size reductions for ⟨G,P⟩, ‖G‖², ‖P‖² over
    rows and columns, not 9); the update's rate ``-(α·κ)`` is ``(-α)·κ``, so a full-size κ
    (ActiveLR) is never negated; DSA's step is ``-P`` (its one full-size negation: ``P = A ⊙ d`` is
    its state, :meth:`adaptlr.core.StepSize.with_step`). The list path, one 2-D parameter."""
    for make, sums, negations in ((lambda: adaptlr.dsa(adaptlr.adamw(1e-3)), 6, 1),
                                  (lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100), 0, 0)):
        params = _params([(40, 30)])
        adapter = Optimizer(params, make(), fast=False)
        adapter.step()
        ops = aten_ops_by_name(adapter.step, 40 * 30)
        assert ops.get("sum", 0) == sums, ops
        assert ops.get("neg", 0) == negations, ops


def _elementwise_passes(ops: dict) -> int:
    """Full-size elementwise operations, in place or not, less the one ``θ.add_(u)`` that applies the step
    (``empty_like`` allocates a product's float64 array, ``adaptlr._inplace.mul_for_sum``: no pass)."""
    return sum(n for name, n in ops.items() if name not in ("detach", "sum", "copy_", "empty_like")) - 1


@pytest.mark.parametrize("name", ["eg", "dsa", "dsa bounded"])
def test_a_step_an_adaptation_computed_is_not_computed_again(name, monkeypatch):
    """EG (``v_t·(-s)``, one pass) and DSA (``-P``, one pass) hand the step to the update
    (``StepSize.with_step``), which takes it: where it is ignored, the update makes its own two
    passes (``(-α·s)·κ``, ``⊙ d``) on top, and the parameters are the same (float64, 5 steps)."""
    make = {"eg": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), 1e-2, 1e-2),
            "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3)),
            "dsa bounded": lambda: adaptlr.dsa(adaptlr.sgd(1e-2, momentum=0.9), min_lr=1e-4, max_lr=2e-2)}[name]

    def run() -> tuple[int, list]:
        params = [torch.nn.Parameter(p.detach().double()) for p in _params([(40, 30), (7,)])]
        for p, q in zip(params, _params([(40, 30), (7,)], seed=1)):
            p.grad = q.detach().double()
        adapter = Optimizer(params, make(), fast=False)
        for _ in range(4):
            adapter.step()
        ops = aten_ops_by_name(adapter.step, 40 * 30)
        return _elementwise_passes(ops), [p.detach().clone() for p in params]

    passes, params = run()
    monkeypatch.setattr(adaptlr.core.StepSize, "known_step", lambda self: None)
    passes_recomputed, params_recomputed = run()
    assert passes_recomputed == passes + 2
    for a, b in zip(params, params_recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)  # rounding order only (as the fast paths)


def test_dsa_step_makes_one_pass_per_operation_of_its_update_rule():
    """DSA(AdamW) on one 2-D parameter, the list path: the full-size elementwise passes are those of
    the equations. Adam: m (1), v (2), the direction (4). DSA: G⊙P, G⊙G, P⊙P (3; their row and column
    sums are not elementwise passes), A = α·κ (1: the tensor and column factors meet α first, then
    the row factor: ``StepSize.scaled(first=True)``; 2 when κ was made whole before α met it), P = A⊙d
    (1), u = -P (1), decay (1). 14 in all (the counter counts the broadcast product that writes A)."""
    params = _params([(40, 30)])
    adapter = Optimizer(params, adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01)), fast=False)
    adapter.step()
    ops = aten_ops_by_name(adapter.step, 40 * 30)
    assert _elementwise_passes(ops) == 1 + 2 + 4 + 3 + 1 + 1 + 1 + 1, ops


def test_eg_step_makes_one_pass_per_operation_of_its_update_rule():
    """EG(AdamW) on one 2-D parameter, the list path: the full-size elementwise passes are those of
    the equations, no more. Adam: m (1: ``lerp``, torch.optim's moving average), v (2: β2·v, then
    ``+ (1-β2)·g²`` fused: ``addcmul_``), the direction (4: sqrt, +, ÷, ·c_t). EG: ⟨v_{t-1}, g⟩ (1:
    ·), p (5: γ·m, ·g, clip, exp (both in place), p·), v_t (2: α·p, ·d), m_t (1: ``lerp``: EG's Python-float β, as
    Adam's). The step: v_t·(-s) (1: s is 0-D; StepSize.with_step), decay (1: ``+ (-λα)·θ`` fused).
    18 in all (19 in round 18, 25 before): a clip as maximum-then-minimum, the step formed from α,
    s, p and d, or any of the four unfused (``adaptlr._inplace``), adds at least one."""
    params = _params([(40, 30)])
    adapter = Optimizer(params, adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), 1e-2, 1e-2),
                        fast=False)
    adapter.step()
    ops = aten_ops_by_name(adapter.step, 40 * 30)
    assert _elementwise_passes(ops) == 1 + 2 + 4 + 1 + 5 + 2 + 1 + 1 + 1, ops
    # m, EG's m_t (into their own arrays: the list path donates the state); v, the decay
    assert ops.get("lerp", 0) + ops.get("lerp_", 0) == 2 and ops.get("addcmul_") == 2, ops
    assert ops.get("clamp_") == 1 and "maximum" not in ops, ops  # clip and exp in the gain's temporary
    assert ops.get("exp_") == 1 and "clamp" not in ops and "exp" not in ops, ops


def test_a_blocked_step_computes_its_step_scalars_once_not_per_block():
    """The blocks of one step share its scalars (``Scalars.of_step``): Adam's two bias corrections
    (``β1^t``, ``β2^t``) are one ``pow`` each per step, and the epoch-boundary tests of ActiveLR and
    AutoDrop (``t mod S``) one ``remainder``, whatever the number of blocks."""
    cases = [(lambda: adaptlr.adamw(1e-3), "pow", 2),
             (lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100), "remainder", 1),
             (lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100), "remainder", 1)]
    for make, op, per_step in cases:
        for block in (1 << 12, 1 << 10):  # 5 and 17 blocks
            adapter = Optimizer(_params([(96, 64), (5000,), (2, 3000)]), make(), fast={"block_size": block})
            adapter.step()
            assert adapter.fast_path == "blocked"
            assert aten_ops_by_name(adapter.step, None).get(op, 0) == per_step, (op, block)


def _zero_d_ops(step) -> int:
    """How many operations ``step()`` dispatches on 0-D (one-element) tensors only."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if tensors and all(t.numel() <= 1 for t in tensors):
                count[0] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return count[0]


@pytest.mark.parametrize("name,make,per_block", [
    ("prodigy", lambda: adaptlr.prodigy(), 6),  # 54 per block before Scalars.once
    ("dadapt_adam", lambda: adaptlr.dadapt_adam(), 3),  # 42
    ("dog", lambda: adaptlr.dog(), 4),  # 11.9
    ("dowg", lambda: adaptlr.dowg(), 4),  # 11.0
    ("eg(adamw)", lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), scale_lr=1e-3, gain_lr=1e-3), 2),  # 7.3
    ("hd(adamw)", lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-3), 3),  # 6.4
    ("hd(adamw), multiplicative",
     lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-3, mode="multiplicative"), 5),  # 17.4
])
def test_a_blocked_step_with_sums_does_its_0d_work_once_per_pass_not_per_block(name, make, per_block):
    """The 0-D work on the whole sums (``d``, η, EG's ``s``, HD's rate) is the same in every block
    of a pass (``Scalars.once``): 12 more blocks add only the per-block remainder (the update's
    ``-α·κ``, adding up the partial sums: AdamW alone adds 1.8 per block), not the whole 0-D
    work again (the numbers before are in the comments)."""
    counts = []
    for block in (1 << 12, 1 << 10):  # 5 and 17 blocks, two passes each
        adapter = Optimizer(_params([(96, 64), (5000,), (2, 3000)]), make(), fast={"block_size": block})
        adapter.step()
        assert adapter.fast_path == "blocked"
        counts.append(_zero_d_ops(adapter.step))
    assert counts[1] - counts[0] <= 12 * per_block, counts


def test_scalars_once_reuses_a_result_only_for_the_same_input_arrays():
    """``Scalars.once`` compares its inputs by identity: the same arrays (a second block's 0-D state
    and whole sums) reuse the result; equal values in other arrays (a first pass's partial sums)
    compute again."""
    import numpy as np

    from adaptlr.core import Scalars

    scalars = Scalars(np, np.asarray(3), None)
    calls = []

    def make(a, b):
        calls.append((a, b))
        return a + b

    a, b = np.asarray(1.0), np.asarray(2.0)
    first = scalars.once("k", (a, b), make)
    assert scalars.once("k", (a, b), make) is first and len(calls) == 1
    again = scalars.once("k", (a, np.asarray(2.0)), make)  # equal, not the same array
    assert len(calls) == 2 and again == first and again is not first
    scalars.once("other", (a, b), make)  # another key
    assert len(calls) == 3
