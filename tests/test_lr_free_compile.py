"""``torch.compile(fullgraph=True)`` of the functional step of the learning-rate-free bases (issue 18).

``fullgraph=True`` fails on any graph break, so this checks that the step has no ``.item()`` and no
Python branch on a tensor (the upstream PyTorch packages have one per parameter); the compiled
steps equal the eager ones (float64, ≤ 1e-12 relative: Inductor may fuse and reorder).
"""

from __future__ import annotations

import pytest

import adaptlr

torch = pytest.importorskip("torch")
pytest.importorskip("torch._inductor")

STEPS = 5
MAKERS = {
    "prodigy": lambda: adaptlr.prodigy(d0=1e-2, weight_decay=0.01, use_bias_correction=True),
    "dog": lambda: adaptlr.dog(reps_rel=1e-2, init_eta=1e-3),
    "ldog": lambda: adaptlr.dog(reps_rel=1e-2, layerwise=True),
    "dowg": lambda: adaptlr.dowg(),
    "dadapt_adam": lambda: adaptlr.dadapt_adam(d0=1e-2, weight_decay=0.01, decouple=True),
    "dadapt_sgd": lambda: adaptlr.dadapt_sgd(d0=1e-2, momentum=0.5),
    "schedule_free_adamw": lambda: adaptlr.schedule_free_adamw(0.01, warmup_steps=3, weight_decay=0.01),
    "mechanic(sgdm)": lambda: adaptlr.mechanic(adaptlr.sgd(0.05, momentum=0.5), s_init=1e-2),
}


def _run(opt, step):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn((), generator=g, dtype=torch.float64)]
    state = opt.init(params)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.5 * p for p in params]
        updates, state = step(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", list(MAKERS))
def test_compiled_functional_step_equals_eager(name):
    torch._dynamo.reset()
    opt = MAKERS[name]()
    eager, eager_state = _run(opt, opt.update)
    compiled, compiled_state = _run(opt, torch.compile(opt.update, fullgraph=True))
    for a, b in zip(compiled, eager):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-12
    for a, b in zip(adaptlr.learning_rates(compiled_state), adaptlr.learning_rates(eager_state)):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-12
