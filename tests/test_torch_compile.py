"""``torch.compile`` of a function that calls ``opt.step()`` (PyTorch's pattern for compiled optimizers)
and ``fast="compile"``: the same values as the eager step, one graph, no recompilation after warm-up.

Float64, so "the same" is checked to 1e-12 relative (Inductor may fuse and reorder); the counts are
torch._dynamo's own counters.
"""

from __future__ import annotations

import warnings

import pytest

import adaptlr

torch = pytest.importorskip("torch")
pytest.importorskip("torch._inductor")
from torch._dynamo.utils import counters  # noqa: E402

from adaptlr.backends.torch import Optimizer  # noqa: E402

S = 3  # steps per epoch: 4 epochs and a step in 13 steps
STEPS = 4 * S + 1


def _make(name: str) -> adaptlr.Optimizer:
    if name == "active":
        return adaptlr.active(adaptlr.adamw(0.01, weight_decay=0.1), steps_per_epoch=S, increase=0.5)
    return adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=S, theta=30.0, theta_max=90.0,
                            patience_epochs=1)


def _run(name: str, tensor_lr: bool, compile_kwargs: dict | None, fast="auto", scheduled: bool = False):
    """Steps with gradients that depend on the parameters; returns params, optimizer, graphs per step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    lr = torch.tensor(0.02, dtype=torch.float64) if tensor_lr else 0.02
    opt = Optimizer([{"params": params, "lr": lr}], _make(name), fast=fast)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5) if scheduled else None
    step = opt.step if compile_kwargs is None else torch.compile(lambda: opt.step(), **compile_kwargs)
    g = torch.Generator().manual_seed(1)
    graphs = []
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.5 * p.detach()
        step()
        if scheduler is not None:
            scheduler.step()
        graphs.append(counters["stats"]["unique_graphs"])
    return params, opt, graphs


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _state_rel(a: adaptlr.OptimizerState, b: adaptlr.OptimizerState) -> float:
    import optree

    worst = 0.0
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        if x.is_floating_point():
            worst = max(worst, _rel(x, y)) if not bool(y.isnan().any()) else worst
        else:
            assert torch.equal(x, y)
    return worst


CASES = [  # (algorithm, tensor lr, a StepLR scheduler, fullgraph)
    ("active", False, False, True),
    # torch schedulers wrap opt.step in a function Dynamo skips, so with one (as for torch.optim) the
    # wrapper breaks the graph; the step itself is still one graph, never recompiled.
    ("active", True, True, False),
    ("autodrop", False, False, True),
    ("autodrop", True, True, False),
]
# (A float lr that a scheduler changes recompiles, as for torch.optim: use a tensor lr.)
IDS = [f"{n}-{'tensor' if t else 'float'}_lr-{'steplr' if s else 'const'}" for n, t, s, _ in CASES]


@pytest.mark.parametrize("name,tensor_lr,scheduled,fullgraph", CASES, ids=IDS)
def test_compiled_function_calling_step_equals_eager(name, tensor_lr, scheduled, fullgraph):
    torch._dynamo.reset()
    counters.clear()
    eager_params, eager_opt, _ = _run(name, tensor_lr, None, scheduled=scheduled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, opt, graphs = _run(name, tensor_lr, {"fullgraph": fullgraph}, scheduled=scheduled)
    assert max(_rel(p.detach(), q.detach()) for p, q in zip(params, eager_params)) <= 1e-12
    assert _state_rel(opt.functional_state, eager_opt.functional_state) <= 1e-12
    assert int(opt.functional_state.count) == STEPS
    assert graphs[1] >= 1 and graphs[-1] == graphs[1], graphs  # no recompilation after the warm-up step
    if fullgraph:
        assert graphs[0] == graphs[-1] == 1 and not counters["graph_break"]
    if name == "autodrop":
        drops = opt.functional_state.adaptations[0].drop_count
        assert torch.equal(drops, eager_opt.functional_state.adaptations[0].drop_count)


def test_fast_compile_option_equals_eager():
    torch._dynamo.reset()
    counters.clear()
    eager_params, eager_opt, _ = _run("active", True, None, fast=False, scheduled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, opt, graphs = _run("active", True, None, fast="compile", scheduled=True)
    assert opt.fast_path == "compiled"
    assert max(_rel(p.detach(), q.detach()) for p, q in zip(params, eager_params)) <= 1e-12
    assert _state_rel(opt.functional_state, eager_opt.functional_state) <= 1e-12
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs


OTHERS = {
    "hd_global": lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3),
    "hd_element": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3, granularity="element"),
    "eg": lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05), scale_lr=0.1, gain_lr=0.1),
    "dsa": lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_algorithms_trace_into_one_graph(name):
    """HD, EG and DSA under ``fullgraph=True`` (``aot_eager``: the trace, without Inductor's compile time)."""
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
        opt = Optimizer(params, OTHERS[name]())
        step = torch.compile(lambda opt=opt: opt.step(), backend="aot_eager", fullgraph=True) if compiled else opt.step
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(6):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.5 * p.detach()
                step()
        runs.append((params, opt))
    (eager, eager_opt), (traced, traced_opt) = runs
    assert max(_rel(p.detach(), q.detach()) for p, q in zip(traced, eager)) <= 1e-12
    assert _state_rel(traced_opt.functional_state, eager_opt.functional_state) <= 1e-12
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", ["adamw", "prodigy"])
def test_step_scalars_are_computed_once_per_step_not_in_each_tensor_loop(name):
    # Inductor inlines a 0-D computation into every elementwise loop that reads it; a bias
    # correction's float64 pow then ran once per vector of every tensor (3x the fused step's time).
    # adaptlr._precision.computed_once makes each step scalar a buffer: the generated code has as
    # many pow calls for 5 tensors as for 2.
    from torch._inductor.utils import run_and_get_code

    make = {"adamw": lambda: adaptlr.adamw(1e-3, weight_decay=1e-2),
            "prodigy": lambda: adaptlr.prodigy(use_bias_correction=True)}[name]

    def pow_calls(num_tensors: int) -> int:
        g = torch.Generator().manual_seed(num_tensors)
        params = [torch.nn.Parameter(torch.randn(64, 8, generator=g)) for _ in range(num_tensors)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt = Optimizer(params, make(), fast="compile")
        _, code = run_and_get_code(lambda: [opt.step() for _ in range(3)])
        assert opt.fast_path == "compiled"
        return sum(c.count("pow(") for c in code)

    few = pow_calls(2)
    assert few > 0
    assert pow_calls(5) == few


@pytest.mark.parametrize("make", [lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
                                  lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2),
                                  lambda: adaptlr.dsa(adaptlr.adam(1e-2))],
                         ids=["adamw", "active(adamw)", "dsa(adam)"])
def test_a_compiled_step_traces_no_cached_helper(make, monkeypatch):
    """``fast="compile"`` prints no Dynamo warning about a ``functools.lru_cache`` function: adaptlr
    looks namespaces and devices up itself (``adaptlr._validation.namespace_of``), not through
    array-api-compat's cached helpers (nine such warnings for AdamW before). Dynamo warns once per
    process and message, so its record of warnings given is emptied first. (The sums' scan,
    ``xp.cumulative_sum``, still asks array-api-compat inside its torch wrapper.)"""
    import torch._dynamo.utils

    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = Optimizer(params, make(), fast="compile")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    assert opt.fast_path == "compiled"
    assert [str(w.message)[:120] for w in caught if "lru_cache" in str(w.message)] == []
