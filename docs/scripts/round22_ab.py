"""Interleaved A/B of round 22's change, in one process.

    python docs/scripts/round22_ab.py jax-arguments ROUNDS  # JAX AdamW, 500 tensors of 32×64 and
                                                            # ResNet-18 shapes: jitted steps given every
                                                            # learning-rate leaf and checked for shared
                                                            # buffers every call (before), or the rates
                                                            # once per value and the check skipped on the
                                                            # step's own outputs (after); with and without
                                                            # donation; optax.adamw as adaptlr bench runs it
    python docs/scripts/round22_ab.py jax-parts ROUNDS      # the same 500-tensor step, after, against its
                                                            # own executable called directly (no Python
                                                            # around it) and optax's
    python docs/scripts/round22_ab.py jax-boundary ROUNDS   # ActiveLR(AdamW) and AutoDrop(AdamW), ResNet-18
                                                            # shapes, jit and jit-donate: the epoch-boundary
                                                            # work under lax.cond (before) or in a loop run
                                                            # at most once (after; ActiveLR's after the new
                                                            # params), or not deferred (518f79e), or at every
                                                            # step selected with where (no hook); AdamW,
                                                            # optax.adamw; median ms, × AdamW, XLA temp MiB
    python docs/scripts/round22_ab.py lr-free-ops STEPS     # Prodigy, D-Adapt SGD and DoG through the torch
                                                            # adapter's default path and their upstream
                                                            # PyTorch optimizers on the same ResNet-18 tensors:
                                                            # time inside aten operations, calls, and
                                                            # elements the operations read (issue 18 item 6)
    python docs/scripts/round22_ab.py order-token           # why ActiveLR's donated loop still copies γ: the
                                                            # copies XLA adds to a toy step (a state field
                                                            # read by the update and written by a loop run at
                                                            # most once) with the loop ordered after nothing,
                                                            # after the update, or after the new parameters

For ``jax-arguments``, "before" runs round 21's arguments
(``adaptlr.backends.jax_arguments.StepArguments`` patched: every rate leaf its own argument,
``donatable`` on every call); the same computation either way
(``tests/test_jax_arguments.py``). For ``jax-boundary``, "before" compiles the steps with round 21's
hook (``adaptlr.backends.jax_boundary.only_when`` patched to ``lax.cond``); the same numbers
(``tests/test_epoch_boundary.py``). Every step is compiled ahead of time, as ``adaptlr bench``
compiles it; each round runs every variant once, one step each, in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 22
from round20_ab import _patched


def _round21(arguments: Any) -> list:
    """``StepArguments`` as round 21 made the arguments: every rate leaf, the check every call."""
    from adaptlr.backends import jax_arguments

    def rates(self: Any, learning_rate: Any) -> tuple[list, Any]:
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(learning_rate)
        return leaves, jax_arguments.RateLayout(treedef, tuple(range(len(leaves))))

    def call(self: Any, function: Callable, args: tuple, state: Any, params: Any) -> Any:
        return function(*jax_arguments.donatable(args, self.donated))

    return [(arguments, "rates", rates), (arguments, "call", call)]


def _runners(set_name: str, before: bool) -> list:
    from adaptlr.backends import bench, jax_arguments

    changes = _round21(jax_arguments.StepArguments) if before else []
    saved = [(m, n, getattr(m, n)) for m, n, _ in changes]
    for m, n, value in changes:
        setattr(m, n, value)
    try:  # compiled as that round compiled it
        runners = [r for r in bench.jax_runners(set_name, bench.SETS[set_name], ["adamw"])
                   if (r.kind == "adaptlr" if before else r.kind != "bound")]
    finally:
        for m, n, value in saved:
            setattr(m, n, value)
    for runner in runners if before else []:
        runner.step = _patched(runner.step, changes)
        runner.path += ", before"
    return runners


def _report(set_name: str, runners: list) -> dict:
    medians = {}
    for runner in sorted(runners, key=lambda r: (r.algorithm, r.path)):
        q = statistics.quantiles(runner.times, n=4)
        medians[(runner.algorithm, runner.path)] = statistics.median(runner.times)
        print(f"{set_name:9s} {runner.algorithm:22s} {runner.path:18s} "
              f"{statistics.median(runner.times) * 1e3:7.2f} ms ({q[0] * 1e3:.2f}-{q[2] * 1e3:.2f})")
    return medians


def jax_arguments(rounds: int) -> None:
    import jax

    from adaptlr.backends import bench

    for set_name in ("small500", "resnet18"):
        runners = _runners(set_name, False) + _runners(set_name, True)
        bench.time_runners(runners, rounds, warmup=2)
        medians = _report(set_name, runners)
        for path in ("jit", "jit-donate"):
            optax = medians[("optax.adamw", path)]
            print(f"{set_name:9s} × optax, {path}: before {medians[('adamw', path + ', before')] / optax:.3f}, "
                  f"after {medians[('adamw', path)] / optax:.3f}")
        jax.clear_caches()


def jax_parts(rounds: int) -> None:
    import jax

    import adaptlr
    from adaptlr.backends import bench, fast

    shapes = bench.SETS["small500"]
    runners = [r for r in bench.jax_runners("small500", shapes, ["adamw"]) if r.path == "jit-donate"]
    host_params, host_grads = bench._host_data(shapes)
    grads = [jax.numpy.asarray(g) for g in host_grads]
    opt = bench.ALGORITHMS["adamw"]()
    params = [jax.numpy.asarray(p) for p in host_params]
    state = opt.init(params)
    forwarded = [False]

    def inner(grads: Any, count: Any, rates: list, base: Any, adaptations: Any, params: Any) -> Any:
        lr = treedef.unflatten([rates[0]] * len(shapes))
        updates, new = opt.update(grads, fast.OptimizerState(count, lr, base, adaptations), params)
        return fast._in_donated_order(adaptlr.apply_updates(params, updates), new, lr, None, forwarded)

    leaves, treedef = jax.tree_util.tree_flatten(state.learning_rate)
    args = fast._donatable((grads, state.count, leaves[:1], state.base, state.adaptations, params), (3, 4, 5))
    executable = jax.jit(inner, donate_argnums=(3, 4, 5)).lower(*args).compile()
    box = {"out": executable(*args)}

    def direct() -> None:
        base, adaptations, new_params, count, _ = box["out"]
        box["out"] = executable(grads, count, leaves[:1], base, adaptations, new_params)
        jax.block_until_ready(box["out"][2])

    runners.append(bench.Runner("small500", "jax", "adamw executable, direct", "jit-donate", "adaptlr", direct))
    bench.time_runners(runners, rounds, warmup=2)
    medians = _report("small500", runners)
    optax = medians[("optax.adamw", "jit-donate")]
    for (name, path), t in medians.items():
        print(f"small500  {name} {path}: {t / optax:.3f} × optax")


def _cond_hook(pred: Any, work: Callable, operands: tuple) -> tuple:
    """Round 21's epoch-boundary hook: ``lax.cond`` with the identity as the other branch."""
    import jax

    return jax.lax.cond(pred, lambda *ops: tuple(work(*ops)), lambda *ops: tuple(ops), *operands)


def _where_hook(pred: Any, work: Callable, operands: tuple) -> tuple:
    """No hook: the boundary work at every step, selected with ``where`` (measured, not kept)."""
    import jax.numpy as jnp

    from adaptlr._boundary import select_both

    return select_both(jnp, pred, work, operands)


@contextlib.contextmanager
def _nothing_deferred() -> Iterator[list]:
    """518f79e's ``jit_step``: ActiveLR's boundary work traced where ActiveLR calls it."""
    yield []


def jax_boundary(rounds: int) -> None:
    from adaptlr import _boundary
    from adaptlr.backends import bench, jax_boundary

    shapes = bench.SETS["resnet18"]
    runners = [r for r in bench.jax_runners("resnet18", shapes, ["adamw", "active", "autodrop"]) if r.kind != "bound"]
    not_deferred = (_boundary, "deferring", _nothing_deferred)
    for label, changes in ((", before", [(jax_boundary, "only_when", _cond_hook), not_deferred]),
                           (", where", [(jax_boundary, "only_when", _where_hook), not_deferred]),
                           (", not deferred", [not_deferred])):
        saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
        for module, name, value in changes:
            setattr(module, name, value)
        try:
            names = ["active"] if label == ", not deferred" else ["active", "autodrop"]
            variant = [r for r in bench.jax_runners("resnet18", shapes, names) if r.kind == "adaptlr"]
        finally:
            for module, name, value in saved:
                setattr(module, name, value)
        for runner in variant:
            runner.path += label
        runners += variant
    bench.time_runners(runners, rounds, warmup=2)
    medians = _report("resnet18", runners)
    for name in ("active", "autodrop"):
        for path in ("jit", "jit-donate"):
            base = medians[("adamw", path)]
            deferred = medians.get((name, path + ", not deferred"))
            print(f"resnet18  {name} {path} × AdamW: before {medians[(name, path + ', before')] / base:.2f}, "
                  f"after {medians[(name, path)] / base:.2f}, where {medians[(name, path + ', where')] / base:.2f}"
                  + ("" if deferred is None else f", loop not deferred {deferred / base:.2f}"))
    for runner in runners:
        if runner.kind == "adaptlr":
            print(f"resnet18  {runner.algorithm} {runner.path}: XLA temp {runner.memory() / 2**20:.1f} MiB")


def order_token() -> None:
    """A toy donated step: ``m`` an Adam-like moment, ``u = -(α·γ)·m/(sqrt|m|+ε)``, ``θ + u``, and a
    loop that may double ``γ`` (ActiveLR's shape of dependencies). The loop's predicate is made to
    depend on a 0-D value (``x > inf``: false, NaN included) from the first element of each tensor's
    update, or of each new parameter, or on nothing; XLA's f32 copies in each case."""
    import jax
    import jax.numpy as jnp

    from adaptlr.backends.xla_copies import copies_per_computation

    def at_most_once(pred: Any, gammas: tuple) -> tuple:
        def body(carry: tuple) -> tuple:
            return jnp.zeros_like(carry[0]), tuple(g * 2.0 for g in carry[1])

        return jax.lax.while_loop(lambda carry: carry[0], body, (pred, gammas))[1]

    def after(pred: Any, arrays: list) -> Any:
        first = sum(jnp.reshape(x, (-1,))[0] for x in arrays)
        return jnp.logical_and(pred, jnp.logical_not(first > jnp.inf))

    def step(order: str, gammas: list, moments: list, params: list, grads: list, pred: Any) -> tuple:
        moments = [0.9 * m + 0.1 * g for m, g in zip(moments, grads)]
        updates = [-(0.01 * c) * (m / (jnp.sqrt(jnp.abs(m)) + 1e-8)) for c, m in zip(gammas, moments)]
        params = [p + u for p, u in zip(params, updates)]
        pred = {"nothing": pred, "the updates": after(pred, updates), "the new params": after(pred, params)}[order]
        return list(at_most_once(pred, tuple(gammas))), moments, params

    shapes = [(256, 128), (64,)]

    def arrays() -> list:
        return [jnp.ones(s, dtype=jnp.float32) for s in shapes]

    n = sum(math.prod(s) for s in shapes)
    for order in ("nothing", "the updates", "the new params"):
        jitted = jax.jit(lambda g, m, p, d, pred, order=order: step(order, g, m, p, d, pred), donate_argnums=(0, 1, 2))
        hlo = jitted.lower(arrays(), arrays(), arrays(), arrays(), jnp.asarray(False)).compile().as_text()
        copied = sum(elements for _, elements in copies_per_computation(hlo, "f32").values())
        print(f"loop ordered after {order:15s}: {copied / n:.2f} f32 elements copied per parameter")


def lr_free_ops(steps: int) -> None:
    """Where the torch default path's learning-rate-free steps spend their time, against upstream's
    (``round20_ab.timed_ops``: time inside each aten operation, calls, elements read)."""
    import torch
    from round12_ab import _adapter, _params
    from round20_ab import time_ops

    import adaptlr
    from adaptlr.backends.bench import _upstream_torch

    def upstream(name: str) -> Callable[[], None]:
        params = _params()
        found = _upstream_torch(name)
        assert found is not None
        native = found[1](params)
        generator = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 0.01
        native.step()
        return native.step

    for name in ("prodigy", "dadapt_sgd", "dog"):
        for label, step in ((f"{name}, adaptlr default", _adapter(getattr(adaptlr, name)())),
                            (f"{name}, upstream", upstream(name))):
            timed = time_ops(step, steps)
            total = sum(timed.spent.values()) / steps * 1e3
            elements = sum(timed.elements.values()) / steps / 1e6
            print(f"{label:26s} {total:6.1f} ms in aten operations, {sum(timed.calls.values()) // steps:5d} calls, "
                  f"{elements:6.1f}M elements read by the full-size ones")
            for key, seconds in timed.spent.most_common(6):
                print(f"    {key:22s} {seconds / steps * 1e3:6.2f} ms {timed.calls[key] // steps:5d} calls "
                      f"{timed.elements[key] / steps / 1e6:6.1f}M elements")


MODES: dict[str, Callable[..., None]] = {"jax-arguments": jax_arguments, "jax-parts": jax_parts,
                                         "jax-boundary": jax_boundary, "order-token": order_token,
                                         "lr-free-ops": lr_free_ops}

if __name__ == "__main__":
    run_mode(MODES, sys.argv[1:], __doc__)
