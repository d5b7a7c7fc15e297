"""``adaptlr bench``: optimizer step time against the native optimizers and the bandwidth bound.

In one process, for each parameter set and backend, every runner (an adaptlr algorithm on one
execution path, a native optimizer, a memory copy) is built, warmed up, and then timed in
interleaved rounds (one step of each runner per round, in a shuffled order), so that load changes
on a shared machine hit all runners alike; the median step time is reported.

Paths: ``pure`` (``opt.update`` per tensor plus ``apply_updates``); ``adapter``,
``adapter-foreach``, ``adapter-foreach-chunks``, ``adapter-list``, ``adapter-compiled`` and
``adapter-compiled-flat`` (torch: ``adaptlr.backends.torch.Optimizer`` with its default
``fast="auto"``, with ``fast="foreach"`` (what ``"auto"`` takes on a GPU), the same over chunks of
the largest tensor's eighth (``foreach_chunk_elements``; two passes for algorithms with sums),
``fast=False``, ``fast="compile"`` and ``fast="compile-flat"``;
the compiled ones for the algorithms named by ``--compile``); ``flat`` / ``blocked`` / ``compiled``
(:class:`adaptlr.backends.fast.FlatOptimizer`); ``jit`` / ``jit-donate`` (JAX,
:func:`adaptlr.backends.fast.jit_step`). Native: ``torch.optim.AdamW`` (``foreach=True``,
``fused=True``), ``optax.adamw`` under ``jax.jit`` (params and state donated); for the learning-rate-free
algorithms, their upstream PyTorch optimizer (``prodigyopt.Prodigy``, ``dadaptation.DAdaptAdam`` /
``DAdaptSGD``, ``dog_optimizer.DoG``, default settings; column "× upstream"). Bound: a copy of
``3.5·P`` words (7 words per parameter are what an AdamW step must move: read params, grads, m, v;
write params, m, v), timed like a step.

Aten ops (torch): the operations one step dispatches (:func:`count_aten_ops`, a
``TorchDispatchMode`` counter): deterministic, and on a GPU the kernel launches of the step. Not
counted for compiled steps (a dispatch mode would run the graph eagerly).

Peak extra memory of one step (beyond params, grads and state): NumPy via ``tracemalloc`` (NumPy
reports its buffers to it); torch on CPU via the profiler's allocation events (``profile_memory``),
torch on CUDA via ``torch.cuda.max_memory_allocated``; JAX via XLA's ``memory_analysis()`` of the
compiled step (temporary buffers); CuPy via a ``cupy.cuda.MemoryHook`` on its memory pool.

CuPy (``--backends cupy``): ``pure`` and ``flat`` paths and the copy bound, synchronised. With
``--device cuda``, torch runs on CUDA and JAX on ``jax.devices("gpu")[0]``.

Usage: ``adaptlr bench [--backends numpy,torch,jax,cupy] [--algorithms adamw,active,...]
[--sets resnet18,small500] [--repeats N] [--quick] [--device cpu|cuda] [--json PATH] [--markdown PATH]``;
``adaptlr bench --gpu-suite [--json PATH] [--markdown PATH]``: the GPU suite
(:mod:`adaptlr.backends.gpu_suite`).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import adaptlr

__all__ = ["RESNET18_SHAPES", "SMALL_SHAPES", "StepCosts", "count_aten_ops", "cupy_runners", "jax_runners", "main",
           "resnet18_shapes", "step_costs", "torch_runners"]


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-18 (1000 classes), in ``named_parameters`` order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = in_ch if block == 0 else out_ch
            shapes += [(out_ch, c_in, 3, 3), (out_ch,), (out_ch,), (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if block == 0 and (stride != 1 or c_in != out_ch):
                shapes += [(out_ch, c_in, 1, 1), (out_ch,), (out_ch,)]  # downsample conv + bn
        in_ch = out_ch
    shapes += [(1000, 512), (1000,)]  # fc
    return shapes


RESNET18_SHAPES = resnet18_shapes()
assert sum(int(np.prod(s)) for s in RESNET18_SHAPES) == 11_689_512 and len(RESNET18_SHAPES) == 62
SMALL_SHAPES = [(32, 64)] * 500  # 500 tensors of 2048 parameters: per-call overhead dominates
SETS = {"resnet18": RESNET18_SHAPES, "small500": SMALL_SHAPES}



def block_size(params: Sequence[Any]) -> int:
    """Elements per block of the ``blocked`` path: the one ``recommended_options`` picks for these
    params (it depends on the library and the model's size)."""
    from adaptlr.backends.fast import recommended_options

    return recommended_options(adaptlr.adamw(), params)["block_size"]

ALGORITHMS: dict[str, Callable[[], Any]] = {
    "adamw": lambda: adaptlr.adamw(1e-3),
    "adam": lambda: adaptlr.adam(1e-3),
    "sgd": lambda: adaptlr.sgd(1e-2, momentum=0.9),
    "radam": lambda: adaptlr.radam(1e-3),
    "adabelief": lambda: adaptlr.adabelief(1e-3),
    "active": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100),
    "autodrop": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100),
    "hypergradient": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-8),
    "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3)),
    "eg_step_size": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), scale_lr=1e-3, gain_lr=1e-3),
    "prodigy": lambda: adaptlr.prodigy(),
    "dadapt_adam": lambda: adaptlr.dadapt_adam(),
    "dadapt_sgd": lambda: adaptlr.dadapt_sgd(),
    "dog": lambda: adaptlr.dog(),
}


def _upstream_torch(name: str) -> tuple[str, Callable[[list], Any]] | None:
    """The upstream PyTorch optimizer an algorithm reproduces, with the same (default) settings."""
    if name == "prodigy":
        import prodigyopt

        return "prodigyopt.Prodigy", lambda p: prodigyopt.Prodigy(p)
    if name in ("dadapt_adam", "dadapt_sgd"):
        import dadaptation

        cls = dadaptation.DAdaptAdam if name == "dadapt_adam" else dadaptation.DAdaptSGD
        return f"dadaptation.{cls.__name__}", lambda p: cls(p)
    if name == "dog":
        import dog

        return "dog_optimizer.DoG", lambda p: dog.DoG(p)
    return None


UPSTREAM = {"prodigy": "prodigyopt.Prodigy", "dadapt_adam": "dadaptation.DAdaptAdam",
            "dadapt_sgd": "dadaptation.DAdaptSGD", "dog": "dog_optimizer.DoG"}
WRAPPERS = ("active", "autodrop", "hypergradient", "dsa", "eg_step_size")
DEFAULT_ALGORITHMS = ("adamw", *WRAPPERS)


@dataclass
class Runner:
    """One thing to time: ``step()`` does one optimizer step (synchronised)."""

    set: str
    backend: str
    algorithm: str
    path: str
    kind: str  # "adaptlr", "native" or "bound"
    step: Callable[[], None]
    memory: Callable[[], int | None] = field(default=lambda: None)
    note: str = ""
    ops: Callable[[], int | None] = field(default=lambda: None)
    times: list = field(default_factory=list)


# -- problem data -----------------------------------------------------------------------------------


def _host_data(shapes: Sequence[tuple], seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, dtype=np.float32) * 0.1 for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in shapes]
    return params, grads


def _tracemalloc_peak(step: Callable[[], None]) -> int:
    """Peak bytes the step allocates and holds at once (tracemalloc traces only what is allocated
    while it runs). The cyclic collector is paused for the step, so that no collection frees the
    step's own garbage at a moment that depends on the rest of the heap: the peak is the same
    whatever ran before. No full collection first: memory allocated before tracing starts is not
    counted whether it is freed or not, and a full collection before each step scales with the
    whole heap (in the test suite's process it made one test of 150 steps take 125 s; 10 s alone)."""
    enabled = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        step()
        return max(0, tracemalloc.get_traced_memory()[1] - start)
    finally:
        tracemalloc.stop()
        if enabled:
            gc.enable()


# -- NumPy -------------------------------------------------------------------------------------------


def numpy_runners(set_name: str, shapes: list, algorithms: Sequence[str]) -> list[Runner]:
    import array_api_compat.numpy as xnp

    from adaptlr.backends.fast import FlatOptimizer, flat_safety, sums_replayable

    host_params, grads = _host_data(shapes)
    runners = []
    for name in algorithms:
        opt = ALGORITHMS[name]()
        flat, blockwise, _ = flat_safety(opt)

        box: dict = {"params": [xnp.asarray(p.copy()) for p in host_params]}
        box["state"] = opt.init(box["params"])

        def pure(opt: Any = opt, box: dict = box) -> None:
            updates, box["state"] = opt.update(grads, box["state"], box["params"])
            box["params"] = adaptlr.apply_updates(box["params"], updates)

        runners.append(Runner(set_name, "numpy", name, "pure", "adaptlr", pure, lambda s=pure: _tracemalloc_peak(s)))
        in_blocks = blockwise or sums_replayable(opt)  # FlatOptimizer's blocks: one pass, or two with sums
        modes = [("flat", None)] + ([("blocked", block_size(host_params))] if in_blocks else [])
        for path, block in modes:
            fo = FlatOptimizer(opt, [p.copy() for p in host_params], block_size=block)
            fo.step(grads)  # grads land in the flat gradient buffer once; later steps reuse them
            note = "" if flat else "not flat-safe: per-tensor fallback"
            step = fo.step
            runners.append(Runner(set_name, "numpy", name, path, "adaptlr", step,
                                  lambda s=step: _tracemalloc_peak(s), note))
    words = int(3.5 * sum(int(np.prod(s)) for s in shapes))
    src, dst = np.ones(words, dtype=np.float32), np.empty(words, dtype=np.float32)
    runners.append(Runner(set_name, "numpy", "copy", "bound", "bound", lambda: np.copyto(dst, src)))
    return runners


# -- torch -------------------------------------------------------------------------------------------


def _torch_memory(torch: Any, step: Callable[[], None], device: str) -> int | None:
    """Peak bytes of tensors allocated and alive during ``step`` (CUDA: the allocator's own count)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    mode = _torch_peak_mode(torch)
    gc.collect()
    with mode:
        step()
    return mode.peak


def count_aten_ops(step: Callable[[], Any]) -> int:
    """The number of aten operations ``step()`` dispatches (a ``TorchDispatchMode`` counter).

    Deterministic and machine-independent: on a GPU each is (at least) one kernel launch, so it is
    the launch count of an optimizer step; views and 0-D scalar arithmetic count too. Profiler
    markers (``profiler.*``, which ``torch.optim`` emits around its step) are not operations and
    are left out.
    """
    return step_costs(step).launches


@dataclass
class StepCosts:
    """What one step would cost on a GPU, counted on any device (:func:`step_costs`)."""

    launches: int  # dispatched aten operations: kernel launches on a GPU
    syncs: int  # host synchronisations on the parameters' device (``.item()`` of a device tensor)
    bytes: int  # bytes read and written by the operations (views and 0-D tensors not counted)
    fresh: int = 0  # of those, bytes written into new tensors (results not written into an argument)


def step_costs(step: Callable[[], Any]) -> StepCosts:
    """The aten operations, host synchronisations and bytes moved by ``step()`` (a ``TorchDispatchMode``).

    Bytes: every tensor argument is read; the arguments an operation mutates (by its schema) and
    its results that are not arguments are written. Syncs: ``aten._local_scalar_dense`` (``.item()``,
    ``float(t)``, ``if t:``, and ``torch._foreach_add(tensors, t)`` with a 0-D tensor ``t``, which
    resolves to the ``.Scalar`` overload; :mod:`adaptlr.backends.foreach` names the ``.Tensor`` one).
    Deterministic: the basis of the GPU estimates in docs/performance.md.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.costs = StepCosts(0, 0, 0)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if str(func).startswith("profiler."):
                return out
            self.costs.launches += 1
            if func is torch.ops.aten._local_scalar_dense.default:
                self.costs.syncs += 1
            if not func.is_view:
                moved, fresh = _bytes_moved(torch, func, args, kwargs, out)
                self.costs.bytes += moved
                self.costs.fresh += fresh
            return out

    counter = Counter()
    with counter:
        step()
    return counter.costs


def _bytes_moved(torch: Any, func: Any, args: Any, kwargs: dict, out: Any) -> tuple[int, int]:
    """The bytes ``func`` reads and writes, and of those the bytes of its results in new tensors."""
    from torch.utils._pytree import tree_leaves

    def tensors(tree: Any) -> list:
        return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.ndim]

    read = tensors((args, kwargs))
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written.extend(tensors(args[i] if i < len(args) else kwargs.get(argument.name)))
    inputs = {id(t) for t in read}
    fresh = [t for t in tensors(out) if id(t) not in inputs]
    return (sum(t.numel() * t.element_size() for t in read + written + fresh),
            sum(t.numel() * t.element_size() for t in fresh))


def _torch_peak_mode(torch: Any) -> Any:
    """A dispatch mode that adds up the storages each op creates, minus those freed since.

    Torch's CPU allocator keeps no statistics, so this counts new output storages (not views or
    in-place results) and subtracts them when they are freed: the live bytes of new tensors.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class PeakMode(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.level = self.peak = 0
            self.live: set[int] = set()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                if size == 0 or ptr in inputs or ptr in self.live:
                    continue
                self.live.add(ptr)
                self.level += size
                self.peak = max(self.peak, self.level)
                weakref.finalize(storage, self._free, ptr, size)
            return out

        def _free(self, ptr: int, size: int) -> None:
            self.level -= size
            self.live.discard(ptr)

    return PeakMode()


def torch_runners(set_name: str, shapes: list, algorithms: Sequence[str], device: str,
                  compile_algorithms: Sequence[str]) -> list[Runner]:
    """Torch runners on ``device`` (``"cpu"``, ``"cuda"``): the adaptlr paths, the adapter's paths, the
    upstream and native optimizers and the copy bound; on CUDA every step ends synchronised."""
    import array_api_compat.torch as xtorch
    import torch

    from adaptlr.backends import foreach_chunks
    from adaptlr.backends.fast import FlatOptimizer, flat_safety, partitionable, sums_replayable

    host_params, host_grads = _host_data(shapes)
    grads = [torch.asarray(g, device=device) for g in host_grads]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def params_copy(requires_grad: bool = False) -> list:
        return [torch.asarray(p.copy(), device=device).requires_grad_(requires_grad) for p in host_params]

    def runner(name: str, path: str, kind: str, step: Callable[[], None], note: str = "") -> Runner:
        def synced() -> None:
            step()
            sync()

        return Runner(set_name, "torch", name, path, kind, synced,
                      lambda: _torch_memory(torch, synced, device), note, ops=lambda: count_aten_ops(step))

    torch_block = block_size(grads) if device == "cpu" else None
    runners = []
    try:
        from adaptlr.backends.torch import Optimizer as TorchAdapter
    except Exception as error:  # the adapter is optional for the benchmark
        TorchAdapter, adapter_error = None, f"{type(error).__name__}: {error}"
    for name in algorithms:
        opt = ALGORITHMS[name]()
        flat, blockwise, _ = flat_safety(opt)

        box: dict = {"params": params_copy()}
        box["state"] = opt.init(box["params"])

        def pure(opt: Any = opt, box: dict = box) -> None:
            with torch.no_grad():
                updates, box["state"] = opt.update(grads, box["state"], box["params"])
                box["params"] = [p + u for p, u in zip(box["params"], updates)]

        runners.append(runner(name, "pure", "adaptlr", pure))
        if TorchAdapter is not None:
            try:
                tparams = params_copy(True)
                for p, g in zip(tparams, grads):
                    p.grad = g.clone()
                adapter = TorchAdapter(tparams, opt)
                adapter.step()  # the first step builds the flat buffers
                note = adapter.fast_path
                budgets = adapter._row_block_budgets(tparams) if adapter.fast_path == "list" else None
                rows = budgets is not None  # torch_rows
                if rows:
                    sizes = "/".join(str(b) for b in sorted(set(budgets), reverse=True))
                    note = f"list, tensors above {sizes} elements in row blocks, two passes"
                runners.append(runner(name, "adapter", "adaptlr", adapter.step, note))
                others = [("adapter-foreach", "foreach")] if flat and adapter.fast_path != "foreach" else []
                if adapter.fast_path != "list" or rows:
                    others.append(("adapter-list", False))
                for path, fast in others:  # the GPU default ("foreach"), the per-tensor list path
                    tparams = params_copy(True)
                    for p, g in zip(tparams, grads):
                        p.grad = g.clone()
                    adapter = TorchAdapter(tparams, opt, fast=fast)
                    adapter.step()
                    runners.append(runner(name, path, "adaptlr", adapter.step, adapter.fast_path))
                if flat and (partitionable(opt) or sums_replayable(opt)):
                    # the foreach step over chunks of the largest tensor's eighth (at least 2^16
                    # elements): what a model too large for one update over its lists gets
                    chunk = max(-(-max(int(np.prod(s)) for s in shapes) // foreach_chunks.LIVE_CHUNKS), 1 << 16)
                    tparams = params_copy(True)
                    for p, g in zip(tparams, grads):
                        p.grad = g.clone()
                    adapter = TorchAdapter(tparams, opt, fast="foreach")
                    adapter.foreach_chunk_elements = chunk
                    adapter.step()
                    passes = "one pass" if partitionable(opt) else "two passes"
                    runners.append(runner(name, "adapter-foreach-chunks", "adaptlr", adapter.step,
                                          f"{adapter.fast_path}, chunks of {chunk} elements, {passes}"))
                compiled = [("adapter-compiled", "compile"), ("adapter-compiled-flat", "compile-flat")]
                if len(shapes) > 100:  # the 500-tensor list step compiled in 381 s (docs/bench.md)
                    compiled = compiled[1:]
                for path, fast in compiled if name in compile_algorithms and flat else ():
                    tparams = params_copy(True)
                    for p, g in zip(tparams, grads):
                        p.grad = g.clone()
                    adapter = TorchAdapter(tparams, opt, fast=fast)
                    started = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        adapter.step()
                    sync()
                    made = runner(name, path, "adaptlr", adapter.step,
                                  f"first step (compile) {time.perf_counter() - started:.1f} s")
                    if not device.startswith("cuda"):
                        made.memory = lambda: None  # a dispatch mode would run the graph eagerly
                    made.ops = lambda: None
                    runners.append(made)
            except Exception as error:
                print(f"  torch adapter for {name}: skipped ({type(error).__name__}: {error})", file=sys.stderr)
        try:
            upstream = _upstream_torch(name)
        except ImportError as error:
            upstream = None
            print(f"  upstream of {name}: skipped ({error})", file=sys.stderr)
        if upstream is not None:  # the package's own optimizer on the same tensors (a host sync per tensor)
            label, make = upstream
            tparams = params_copy(True)
            for p, g in zip(tparams, grads):
                p.grad = g.clone()
            native = make(tparams)
            native.step()
            runners.append(runner(label, "upstream", "native", native.step))
        note = "" if flat else "not flat-safe: per-tensor fallback"
        modes: list = [("flat", {})]
        if (blockwise or sums_replayable(opt)) and device == "cpu":
            modes.append(("blocked", {"block_size": torch_block}))
        if name in compile_algorithms and flat:
            modes.append(("compiled", {"compile": True}))
        for path, kwargs in modes:
            fo = FlatOptimizer(opt, params_copy(), **kwargs)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fo.step(grads)
            sync()
            extra = f"first step (compile) {time.perf_counter() - started:.1f} s" if path == "compiled" else ""
            made = runner(name, path, "adaptlr", fo.step, "; ".join(x for x in (note, extra) if x))
            if path == "compiled":
                made.ops = lambda: None
                if not device.startswith("cuda"):
                    made.memory = lambda: None  # a dispatch mode would run the graph eagerly: not measured
            runners.append(made)
    del xtorch
    if TorchAdapter is None:
        print(f"  torch adapter: skipped ({adapter_error})", file=sys.stderr)
    for variant in ("foreach", "fused"):
        tparams = params_copy(True)
        for p, g in zip(tparams, grads):
            p.grad = g.clone()
        try:
            native = torch.optim.AdamW(tparams, lr=1e-3, weight_decay=1e-2, **{variant: True})
            native.step()
        except Exception as error:
            print(f"  torch.optim.AdamW({variant}=True): skipped ({error})", file=sys.stderr)
            continue
        runners.append(runner("torch.optim.AdamW", variant, "native", native.step))
    words = int(3.5 * sum(int(np.prod(s)) for s in shapes))
    src = torch.ones(words, device=device)
    dst = torch.empty(words, device=device)
    runners.append(Runner(set_name, "torch", "copy", "bound", "bound", lambda: (dst.copy_(src), sync())))
    return runners


# -- JAX ---------------------------------------------------------------------------------------------


def jax_runners(set_name: str, shapes: list, algorithms: Sequence[str], device: Any = None,
                undonated: Sequence[str] | None = None) -> list[Runner]:
    """JAX runners, each compiled once ahead of time (the same executable is timed and measured).

    adaptlr algorithms and optax run on the whole step with donation (``jit-donate``) and without
    (``jit``). Compiling a 500-tensor step is the expensive part (seconds and
    hundreds of MB of compiler memory each), so no variant is compiled twice. ``device``: a
    ``jax.Device`` (e.g. ``jax.devices("gpu")[0]``) that every array is placed on; None: JAX's
    default device. The steps are compiled for the device of their arguments. ``undonated``: the
    algorithms also run without donation (None: all of them).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from adaptlr.backends.fast import jit_step

    def put(host: np.ndarray) -> Any:
        return jnp.asarray(host) if device is None else jax.device_put(host, device)

    host_params, host_grads = _host_data(shapes)
    grads = [put(g) for g in host_grads]

    def make_runner(name: str, path: str, kind: str, compile_step: Callable, init: Callable) -> Runner:
        box = {"params": [put(p) for p in host_params]}
        box["state"] = init(box["params"])
        compiled = compile_step(grads, box["state"], box["params"])

        def step() -> None:
            box["params"], box["state"] = compiled(grads, box["state"], box["params"])
            jax.block_until_ready(box["params"])

        def memory() -> int | None:
            return int(compiled.memory_analysis().temp_size_in_bytes)

        step()
        return Runner(set_name, "jax", name, path, kind, step, memory)

    runners = []
    for name in algorithms:
        opt = ALGORITHMS[name]()
        # Both: with donation some steps take longer on the CPU than without (the wrappers: XLA copies
        # what the step reads after writing it; docs/performance.md, round 16).
        both = undonated is None or name in undonated
        paths = (("jit", False), ("jit-donate", True)) if both else (("jit-donate", True),)
        for path, donate in paths:
            runners.append(make_runner(name, path, "adaptlr", jit_step(opt, donate=donate).compile, opt.init))

    tx = optax.adamw(1e-3, weight_decay=1e-2)

    def optax_step(grads: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        # The state first, then the params: the order of the donated inputs, so that each output takes
        # its own input's buffer. Returned as (params, state), JAX gives the first moments' buffers to
        # the new params wherever shapes repeat and XLA copies them (docs/performance.md, round 16).
        return state, optax.apply_updates(params, updates)

    def optax_compile(donated: tuple[int, ...]) -> Callable:
        def compile_step(grads: Any, state: Any, params: Any) -> Any:
            compiled = jax.jit(optax_step, donate_argnums=donated).lower(grads, state, params).compile()

            def run(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
                new_state, new_params = compiled(grads, state, params)
                return new_params, new_state

            run.memory_analysis = compiled.memory_analysis
            return run

        return compile_step

    for path, donated in (("jit", ()), ("jit-donate", (1, 2))):
        runners.append(make_runner("optax.adamw", path, "native", optax_compile(donated), tx.init))
    words = int(3.5 * sum(int(np.prod(s)) for s in shapes))
    # Read and written in place (donated), as the donated steps do: a fresh 3.5·P-word output per
    # call measured 14 to 116 ms on ResNet-18 shapes in runs of one day (the pages the OS hands out).
    # Times a 0-D array given at run time: XLA compiles `x * 1.0` into nothing.
    buffer, one = {"words": put(np.ones(words, dtype=np.float32))}, put(np.ones((), dtype=np.float32))
    copy = jax.jit(lambda x, one: x * one, donate_argnums=0)

    def bound() -> None:
        buffer["words"] = copy(buffer["words"], one)
        jax.block_until_ready(buffer["words"])

    bound()
    runners.append(Runner(set_name, "jax", "copy", "bound", "bound", bound))
    return runners


# -- CuPy --------------------------------------------------------------------------------------------


def _cupy_memory(cupy: Any, step: Callable[[], None]) -> int:
    """Peak bytes taken from CuPy's memory pool during ``step`` beyond what it held before (a
    ``cupy.cuda.MemoryHook`` adding up the pool's mallocs and subtracting its frees)."""

    class PeakHook(cupy.cuda.MemoryHook):
        name = "adaptlr_bench_peak"

        def __init__(self) -> None:
            super().__init__()
            self.level = self.peak = 0

        def malloc_postprocess(self, **kwargs: Any) -> None:
            self.level += kwargs["mem_size"]
            self.peak = max(self.peak, self.level)

        def free_postprocess(self, **kwargs: Any) -> None:
            self.level -= kwargs["mem_size"]

    hook = PeakHook()
    with hook:
        step()
    return hook.peak


def cupy_runners(set_name: str, shapes: list, algorithms: Sequence[str], cupy: Any = None) -> list[Runner]:
    """CuPy runners: each algorithm through the functional API (``pure``) and the flat buffers
    (``flat``), and the copy bound (``cupy.copyto`` of 3.5·P words); every step ends with a
    synchronisation of the current stream, so the time is the device's.

    Args:
        set_name: the parameter set's name (a key of ``SETS``).
        shapes: the parameter shapes.
        algorithms: names in ``ALGORITHMS``.
        cupy: the ``cupy`` module (None: imported here; a test passes a NumPy stand-in).
    """
    if cupy is None:
        import cupy

    from adaptlr.backends.fast import FlatOptimizer, flat_safety

    host_params, host_grads = _host_data(shapes)
    grads = [cupy.asarray(g) for g in host_grads]
    sync = cupy.cuda.get_current_stream().synchronize

    def runner(name: str, path: str, kind: str, step: Callable[[], None], note: str = "") -> Runner:
        def synced() -> None:
            step()
            sync()

        return Runner(set_name, "cupy", name, path, kind, synced, lambda: _cupy_memory(cupy, synced), note)

    runners = []
    for name in algorithms:
        opt = ALGORITHMS[name]()
        flat, _, _ = flat_safety(opt)
        box: dict = {"params": [cupy.asarray(p) for p in host_params]}
        box["state"] = opt.init(box["params"])

        def pure(opt: Any = opt, box: dict = box) -> None:
            updates, box["state"] = opt.update(grads, box["state"], box["params"])
            box["params"] = adaptlr.apply_updates(box["params"], updates)

        runners.append(runner(name, "pure", "adaptlr", pure))
        fo = FlatOptimizer(opt, [cupy.asarray(p) for p in host_params])
        fo.step(grads)  # grads land in the flat gradient buffer once; later steps reuse them
        runners.append(runner(name, "flat", "adaptlr", fo.step, "" if flat else "not flat-safe: per-tensor fallback"))
    words = int(3.5 * sum(int(np.prod(s)) for s in shapes))
    src = cupy.ones(words, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    runners.append(Runner(set_name, "cupy", "copy", "bound", "bound", lambda: (cupy.copyto(dst, src), sync())))
    return runners


# -- timing and report --------------------------------------------------------------------------------


def time_runners(runners: list[Runner], repeats: int, warmup: int = 1, seed: int = 0) -> None:
    """Interleaved rounds: each round runs every runner once, in a fresh random order."""
    order = list(runners)
    shuffle = random.Random(seed).shuffle
    for r in range(warmup + repeats):
        shuffle(order)
        for runner in order:
            started = time.perf_counter()
            runner.step()
            elapsed = time.perf_counter() - started
            if r >= warmup:
                runner.times.append(elapsed)


def summarise(runners: list[Runner], shapes: list, memory: bool) -> list[dict]:
    by = {(r.algorithm, r.path): r for r in runners}
    medians = {key: statistics.median(r.times) for key, r in by.items()}
    bound = medians.get(("copy", "bound"))
    natives = {
        "torch": [("foreach", ("torch.optim.AdamW", "foreach")), ("fused", ("torch.optim.AdamW", "fused"))],
        "jax": [("optax", ("optax.adamw", "jit-donate")), ("optax_nodonate", ("optax.adamw", "jit"))],
    }
    largest = max(int(np.prod(s)) for s in shapes) * 4
    rows = []
    for (algorithm, path), runner in by.items():
        t = medians[(algorithm, path)]
        row: dict[str, Any] = {
            "set": runner.set, "backend": runner.backend, "algorithm": algorithm, "path": path,
            "kind": runner.kind, "median_ms": t * 1e3, "min_ms": min(runner.times) * 1e3,
            "x_bound": t / bound if bound else None, "note": runner.note,
        }
        for label, key in natives.get(runner.backend, []):
            row[f"x_{label}"] = t / medians[key] if key in medians else None
        if algorithm in WRAPPERS and ("adamw", path) in medians:
            row["x_base"] = t / medians[("adamw", path)]
        if (UPSTREAM.get(algorithm), "upstream") in medians:
            row["x_upstream"] = t / medians[(UPSTREAM[algorithm], "upstream")]
        if runner.backend == "torch" and runner.kind != "bound":
            row["aten_ops"] = runner.ops()
        if memory and runner.kind != "bound":
            try:
                peak = runner.memory()
            except Exception as error:  # a measurement failure is reported, not fatal
                peak, row["note"] = None, (row["note"] + f"; memory: {error}").strip("; ")
            row["peak_extra_mb"] = None if peak is None else peak / 2**20
            row["x_largest_tensor"] = None if peak is None else peak / largest
        rows.append(row)
    return rows


COLUMNS = [("set", "set"), ("backend", "backend"), ("algorithm", "algorithm"), ("path", "path"),
           ("median_ms", "median ms"), ("x_bound", "× bound"), ("x_foreach", "× foreach"), ("x_fused", "× fused"),
           ("x_optax", "× optax"), ("x_optax_nodonate", "× optax jit"), ("x_base", "× base"),
           ("x_upstream", "× upstream"), ("aten_ops", "aten ops"),
           ("peak_extra_mb", "peak extra MB"), ("x_largest_tensor", "× largest tensor"), ("note", "note")]


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc's ``malloc_trim``).

    A group's runners hold gigabytes (ResNet-18 shapes, every algorithm and path: 20 GB of RSS on
    torch); freed, glibc kept 3 of every 5 GB in its heap, so the next group ran short of memory
    (on a 23 GiB VM: JAX's donated steps 2.5× slower, or the run killed).
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if key in ("median_ms", "peak_extra_mb") else f"{value:.2f}"
    return str(value)


def table(rows: list[dict], markdown: bool = False, columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    cells = [[h for _, h in columns]] + [[_fmt(row.get(k), k) for k, _ in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells_row) + " |" for cells_row in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(columns))).rstrip() for c in cells)


def machine() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "processor": platform.processor(), "cpus": _cpu_count(), "numpy": np.__version__}
    for module in ("torch", "jax", "optax"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            pass
    try:
        import os

        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adaptlr bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy,torch,jax", help="comma-separated: numpy,torch,jax,cupy")
    parser.add_argument("--algorithms", default=None,
                        help=f"comma-separated from {','.join(ALGORITHMS)} (default: {','.join(DEFAULT_ALGORITHMS)})")
    parser.add_argument("--sets", default="resnet18,small500", help="comma-separated: resnet18,small500")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="adamw and active only, 3 rounds, no torch.compile")
    parser.add_argument("--compile", default=None,
                        help="algorithms to also run through torch.compile (default: adamw; 'none' for none)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda); cuda also puts JAX on its GPU")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="the GPU suite: conformance on torch-cuda, jax-gpu, cupy and the GPU benchmark, "
                             "one JSON and one Markdown report (unavailable rows: skipped, with the reason)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write the results as a Markdown table")
    return parser.parse_args(list(argv))


def _jax_device(torch_device: str) -> Any:
    """JAX's first GPU when the torch device is CUDA, else None (JAX's default device)."""
    if not torch_device.startswith("cuda"):
        return None
    import jax

    return jax.devices("gpu")[0]


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SystemExit(f"adaptlr bench: unknown {what} {unknown}; valid: {', '.join(valid)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.gpu_suite:
        from adaptlr.backends.gpu_suite import run_suite

        return run_suite(json_path=args.json, markdown_path=args.markdown)
    backends = _names(args.backends, ("numpy", "torch", "jax", "cupy"), "backends")
    default = ("adamw", "active") if args.quick else DEFAULT_ALGORITHMS
    algorithms = _names(args.algorithms or ",".join(default), list(ALGORITHMS), "algorithms")
    available = []
    for name in algorithms:
        try:
            ALGORITHMS[name]()
            available.append(name)
        except AttributeError as error:
            print(f"adaptlr bench: skipping {name}: {error}", file=sys.stderr)
    sets = _names(args.sets, list(SETS), "sets")
    repeats = args.repeats or (3 if args.quick else 7)
    if repeats < 1:
        raise SystemExit("adaptlr bench: --repeats must be >= 1")
    compile_text = args.compile if args.compile is not None else ("none" if args.quick else "adamw")
    compile_algorithms = [] if compile_text == "none" else _names(compile_text, list(ALGORITHMS), "--compile")
    if "jax" in backends:
        import jax

        jax.config.update("jax_enable_x64", True)  # float32 runs are unaffected; matches the tests

    rows: list[dict] = []
    started = time.perf_counter()
    for set_name in sets:
        shapes = SETS[set_name]
        for backend in backends:
            print(f"[{time.perf_counter() - started:6.1f} s] {set_name} / {backend}: building", file=sys.stderr)
            try:
                if backend == "numpy":
                    runners = numpy_runners(set_name, shapes, available)
                elif backend == "torch":
                    runners = torch_runners(set_name, shapes, available, args.device, compile_algorithms)
                elif backend == "cupy":
                    runners = cupy_runners(set_name, shapes, available)
                else:
                    runners = jax_runners(set_name, shapes, available, _jax_device(args.device))
            except ImportError as error:
                print(f"  {backend}: skipped ({error})", file=sys.stderr)
                continue
            time_runners(runners, repeats)
            rows += summarise(runners, shapes, memory=not args.no_memory)
            del runners
            if backend == "jax":
                import jax

                jax.clear_caches()  # compiled steps of finished groups hold large executables
            release_freed_memory()
    print(table(rows))
    meta = {"command": "adaptlr bench " + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine(),
            "repeats": repeats,
            "sets": {name: {"tensors": len(SETS[name]), "params": int(sum(np.prod(s) for s in SETS[name])),
                            "largest_tensor_bytes": int(max(np.prod(s) for s in SETS[name])) * 4}
                     for name in sets},
            "wall_s": time.perf_counter() - started}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{meta['command']}`; machine: {json.dumps(meta['machine'])}\n\n")
            f.write(table(rows, markdown=True) + "\n")
    print(f"wall time {meta['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
