"""Low-precision runs against a float64 run of the same problem, next to torch.optim's.

For a parameter dtype (float32, bfloat16, float16) the *distance* of a run is the normwise relative
error of its final parameters to a float64 run of the same optimizer on the same problem
(``‖θ_T - θ*_T‖∞ / ‖θ*_T‖∞``, with ``θ*`` the float64 trajectory). The yardstick is the distance of
the reference library's optimizer (torch.optim, adabelief-pytorch) run in that dtype on the same
problem: a correct low-precision implementation is no further than a small factor of it.

The problem: ``f(θ) = ½ Σ_i h_i (θ_i - c_i)²`` plus a deterministic per-step perturbation of the
gradient (a fixed sequence of noise), with curvatures ``h`` spread over two decades, 64 parameters
in two tensors; gradients are computed in float64 from the low-precision parameters and rounded to
the parameter dtype, as autograd would give them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["BASES", "distance", "reference_distance", "run_adaptlr", "run_reference"]

SHAPES = ((8, 6), (16,))


def _problem(steps: int, seed: int = 0) -> tuple[list, list, list, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in SHAPES]
    centre = [rng.normal(size=s) for s in SHAPES]
    curvature = [np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=s)) for s in SHAPES]
    noise = [rng.normal(scale=0.3, size=(steps, *s)) for s in SHAPES]
    return init, centre, curvature, noise


def _grads(params64: list, step: int, centre: list, curvature: list, noise: list) -> list:
    return [h * (p - c) + n[step] for p, c, h, n in zip(params64, centre, curvature, noise)]


# name -> (adaptlr factory taking state_dtype, torch reference factory or None)
def _adabelief_reference(params: list, **kwargs: Any) -> Any:
    import contextlib
    import io

    import adabelief_pytorch

    with contextlib.redirect_stdout(io.StringIO()):
        return adabelief_pytorch.AdaBelief(params, print_change_log=False, **kwargs)


def _torch_reference(name: str) -> Callable[[list], Any]:
    import torch

    return {
        "sgdm": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
        "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
        "adabelief": lambda p: _adabelief_reference(p, lr=1e-2),
    }[name]


BASES: dict[str, Callable[..., Any]] = {
    "sgdm": lambda a, **kw: a.sgd(1e-2, momentum=0.9, **kw),
    "adam": lambda a, **kw: a.adam(1e-2, **kw),
    "adamw": lambda a, **kw: a.adamw(1e-2, weight_decay=1e-2, **kw),
    "radam": lambda a, **kw: a.radam(1e-2, **kw),
    "adabelief": lambda a, **kw: a.adabelief(1e-2, **kw),
}


def run_adaptlr(opt: Any, backend: Any, dtype: str, steps: int) -> list[np.ndarray]:
    """Final parameters (float64 NumPy) of ``opt`` run in ``dtype`` on ``backend``."""
    import adaptlr

    xp = backend.xp
    wide = "float64" if dtype == "float64" else "float32"  # NumPy hosts have no bfloat16: round on the backend

    def to_backend(x: np.ndarray) -> Any:
        return xp.astype(backend.asarray(x, wide), getattr(xp, dtype))

    def to_host(x: Any) -> np.ndarray:
        return backend.to_numpy(xp.astype(x, getattr(xp, wide))).astype(np.float64)

    init, centre, curvature, noise = _problem(steps)
    params = [to_backend(p) for p in init]
    state = opt.init(params)
    for step in range(steps):
        grads = [to_backend(g) for g in _grads([to_host(p) for p in params], step, centre, curvature, noise)]
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    return [to_host(p) for p in params]


def run_reference(name: str, dtype: str, steps: int) -> list[np.ndarray]:
    """Final parameters of the reference library's optimizer ``name`` run in ``dtype`` (torch, CPU)."""
    import torch

    init, centre, curvature, noise = _problem(steps)
    torch_dtype = getattr(torch, dtype)
    params = [torch.tensor(p, dtype=torch_dtype) for p in init]
    opt = _torch_reference(name)(params)
    for step in range(steps):
        params64 = [p.detach().to(torch.float64).numpy() for p in params]
        for p, g in zip(params, _grads(params64, step, centre, curvature, noise)):
            p.grad = torch.tensor(g, dtype=torch.float64).to(torch_dtype)
        opt.step()
    return [p.detach().to(torch.float64).numpy() for p in params]


def distance(final: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """``max over tensors of ‖a - e‖∞ / ‖e‖∞`` (inf where ``final`` is not finite)."""
    if not all(np.all(np.isfinite(a)) for a in final):
        return float("inf")
    return max(float(np.max(np.abs(a - e)) / np.max(np.abs(e))) for a, e in zip(final, exact))


def reference_distance(name: str, dtype: str, steps: int) -> float:
    """The reference library's distance in ``dtype`` from its own float64 run."""
    return distance(run_reference(name, dtype, steps), run_reference(name, "float64", steps))
