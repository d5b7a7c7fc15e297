"""``adaptlr.backends.torch.Optimizer``: any adaptlr optimizer as a ``torch.optim.Optimizer``.

::

    opt = adaptlr.backends.torch.Optimizer(model.parameters(), adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=S))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    scheduler.step()

How the torch concepts map onto adaptlr's (spec §0.1, ``u = -(α·κ) ⊙ d - α·λ·θ``):

- ``param_groups[i]["lr"]`` is the user's ``α`` and belongs to ``torch.optim.lr_scheduler``; the
  adaptation multiplier ``κ`` (ActiveLR's γ, AutoDrop's κ, ...) lives in the optimizer state and is
  never written into ``group["lr"]``. Each group also carries the wrapped base optimizer's
  hyper-parameters under torch's names (``weight_decay``, ``betas``/``eps`` or
  ``momentum``/``dampening``/``nesterov``; :mod:`adaptlr.backends.torch_groups`): a value changed
  there takes effect at the next step. When the wrapped optimizer's learning rate is a schedule
  ``t ↦ α_t``, ``group["lr"]`` defaults to 1.0 and multiplies it (``α = group["lr"] · α_t``).
- The state is adaptlr's functional state, created for every parameter that requires a gradient
  when the optimizer is built (and when a group is added; a frozen parameter at its first
  gradient): per-parameter fields in ``optimizer.state[p]`` (keyed by their path in the state,
  ``"base.mu"``, ``"adaptations[0].gamma"``), the fields shared by all parameters
  (the step counter, AutoDrop's angle) in ``state_dict()["adaptlr"]["global"]`` and, under
  ``"shared.<path>"``, in every parameter's entry of ``state_dict()["state"]`` (so tools that keep
  only ``"state"`` and ``"param_groups"``, such as ``torch.distributed.checkpoint``, keep them).
  :attr:`Optimizer.functional_state` assembles the :class:`adaptlr.OptimizerState` (over the list of
  parameters in group order) for :func:`adaptlr.learning_rates`, :func:`adaptlr.lr_summary` and
  :func:`adaptlr.save_state`.
- A parameter whose ``.grad`` is None is skipped for that step: it and its per-parameter state are
  untouched; the step runs on the parameters that have gradients, with their slices of every
  per-parameter field and the shared fields. The optimizer's step counter ``t`` (the adaptations'
  epochs) advances at every step; the base's bias correction counts the steps of each parameter
  (``state[p]["step"]``, as ``torch.optim``; :mod:`adaptlr.backends.torch_steps`).
  For ActiveLR, a skipped parameter adds nothing to its epoch sum ``C`` that step and, if it is
  skipped at an epoch's last step, misses that epoch boundary. For AutoDrop, the angle ω at an epoch
  start is taken over the parameters that have gradients at that step. Global sums of other
  adaptations (HD and EG with global granularity) likewise cover only the parameters with gradients.
- Mixed precision: by default the state has each parameter's dtype (as in ``torch.optim``). With
  ``state_dtype=torch.float32``, parameters of another floating dtype (bfloat16, float16) get
  float32 state: their gradient and value are upcast for the update, and ``p.add_(u)`` rounds
  ``p + u`` once to the parameter's dtype.
- Storage: no execution path changes the storage of a parameter or its ``.grad``. The step runs
  ``opt.update_leaves`` over the lists of per-parameter tensors, writes the new state into the
  state tensors in place (``copy_``; 0-D fields such as the step counter are replaced) and adds the
  update with ``p.add_(u)``. The eager list path and its parts and row blocks, and on the paths
  that step the model in parts of lists (blocks, foreach chunks) the parts after the first, are
  given their state to write into (:func:`adaptlr._inplace.donating`): the decays ``β1·m``,
  ``β2·v`` are written into the state tensors and nothing is copied back.
  ``fast`` chooses how (see :class:`Optimizer`); inside a function that
  ``torch.compile`` traces, the step always takes the list path, which Dynamo traces into the
  caller's graph.
- Schedule-Free (:func:`adaptlr.schedule_free`): as with ``schedulefree``'s optimizers, the model
  holds the training parameters ``y`` in train mode and the evaluation parameters ``x`` after
  :meth:`Optimizer.eval` (``x = y.lerp(z, 1 - 1/β1)``); :meth:`Optimizer.train` puts ``y`` back
  (``x.lerp(z, 1 - β1)``, exact to rounding). Unlike ``schedulefree`` the optimizer starts in train
  mode (``x = y = z`` before the first step); ``step()`` in eval mode raises. The switch reaches the
  Schedule-Free state through any wrapper around it (``skip_nonfinite``). ``state_dict()`` holds
  ``z`` (``"adaptations[i].z"``) and the other fields, and records the mode
  (``state_dict()["adaptlr"]["schedule_free_eval_mode"]``); the model's own ``state_dict`` holds
  whichever view the model is in: call ``eval()`` before saving weights for inference, and save the
  checkpoint to resume in either mode (``load_state_dict`` restores the mode, so ``train()`` after
  loading an eval-mode checkpoint gives back ``y``). For any other algorithm ``train()``/``eval()``
  do nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import array_api_compat.torch as xp_torch
import torch

from adaptlr import _validation, core
from adaptlr import checkpoint as _checkpoint
from adaptlr._inplace import donating
from adaptlr._precision import counter_dtype, widest_float
from adaptlr._state_tree import Node, dtype_name, field_values, rebuild_state, split_state
from adaptlr._tree import Layout
from adaptlr.backends import torch_groups, torch_steps
from adaptlr.backends.fast import ListLayout, private_code
from adaptlr.nonfinite import SkipNonfinite

__all__ = ["Optimizer"]

STATE_DICT_FORMAT = 1
SHARED_PREFIX = "shared."  # per-parameter state_dict keys that hold a copy of a shared field
_FAST_MODES = ("auto", "flat", "foreach", "fused", "compile", "compile-flat")
# The list step's parts (Optimizer._tensor_parts) hold at least this many elements: each part is one
# update_leaves call, whose fixed cost (state assembly, 0-D work, validation) outweighs its
# arithmetic on small tensors (500 tensors of 2K, DSA: one part per tensor 2.2x the time of parts of
# 128K), while 11 temporaries of 128K float32 elements are 5.8 MB (docs/performance.md, round 10).
LIST_PART_MIN_ELEMENTS = 1 << 17


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs the adaptlr optimizer ``opt``.

    Args:
        params: parameters or param groups, as for any torch optimizer; a group may set ``lr``,
            ``weight_decay`` and the base's hyper-parameters under torch's names (``betas``,
            ``eps``, ``momentum``, ``dampening``, ``nesterov``).
        opt: an adaptlr optimizer (``adaptlr.adamw(1e-3)``, ``adaptlr.active(...)``, ...). Its
            hyper-parameters are the groups' defaults; the adaptations' apply to every group.
        state_dtype: None (state in each parameter's dtype) or a floating torch dtype for the state
            of parameters of other floating dtypes (mixed precision; see the module docstring).
            Defaults to the ``state_dtype`` the adaptlr optimizer was made with.
        fast: how the step runs (same values in every case, to rounding; parameters and gradients
            always keep their own storage):

            - ``"auto"`` (default, also ``True``): on a GPU, ``"foreach"`` for every flat-safe
              algorithm; on the CPU, where :func:`~adaptlr.backends.fast.recommended_options`
              finds one (elementwise algorithms; flat-safe ones up to 16 MiB of parameters, and
              above, on blocks, those whose sums are cheap to make first: AutoDrop, HD and EG
              global, :func:`~adaptlr.backends.fast.sums_cheaply`), the
              update runs on flat buffers of a :class:`~adaptlr.backends.fast.FlatOptimizer` that
              hold the state: the parameters and gradients are copied in (one
              ``torch._foreach_copy_`` each) and the new values copied back; elsewhere the list
              path (on the CPU, torch's ``_foreach`` ops measured slower than the list path:
              docs/performance.md). Those learning-rate-free bases on a CPU model above 16 MiB take
              ``"fused"``.
            - ``"foreach"``: the list path with one ``torch._foreach_*`` op per operation of the
              algorithm over the lists of parameters, gradients and state of a param group
              (:mod:`adaptlr.backends.foreach`; about 40 aten ops per AdamW step whatever the
              number of tensors, no copies, no extra buffers), for every flat-safe algorithm.
              Algorithms without sums over elements
              (:func:`~adaptlr.backends.fast.partitionable`) run it over chunks of
              ``foreach_chunk_elements`` elements, parameters cut into views where larger, so a
              step's temporaries are a chunk's, not the model's
              (:mod:`adaptlr.backends.foreach_chunks`).
            - ``"fused"``: Prodigy (``β1 > 0``, ``slice_p = 1``), D-Adapt Adam, D-Adapt SGD, DoG (not
              LDoG) and DoWG, without adaptations, on plain contiguous float32 or float64 CPU
              tensors, whatever the model's size: steps written for torch, two passes over blocks
              of each parameter's own storage (Prodigy's moments and update in torch's fused AdamW
              kernel; :mod:`adaptlr.backends.torch_lr_free`; no copies, temporaries of a few
              blocks); Adam and AdamW alone on torch's fused Adam kernels, as
              ``torch.optim.AdamW(fused=True)`` (:mod:`adaptlr.backends.torch_fused_adam`). Any
              other step takes the list path.
            - ``"flat"``: the flat buffers for every flat-safe algorithm.
            - ``"compile"``: the list path under ``torch.compile`` (Inductor fuses the per-tensor
              updates horizontally, without shared storage; the first step compiles, seconds to a
              minute, longer the more tensors (minutes for hundreds); needs a working Inductor
              toolchain).
            - ``"compile-flat"``: for flat-safe algorithms, the state in flat buffers and the update
              on them compiled once by ``torch.compile`` (one graph whatever the number of
              tensors: a few seconds to compile), the parameters and gradients copied in and out as
              on the ``"flat"`` path; the fastest CPU path for the learning-rate-free optimizers
              (docs/performance.md). Other algorithms: as ``"compile"``.
            - a dict: :class:`~adaptlr.backends.fast.FlatOptimizer` options (``{"block_size": 65536}``).
            - ``False`` / ``None``: the list path, eager.

            Algorithms that are not flat-safe (per-tensor reductions: DSA's default factors, HD
            ``granularity="tensor"``, EG ``scale="tensor"``), tensor subclasses (DTensor),
            parameters whose state dtype differs from their dtype and groups with different base
            hyper-parameters take the list path.

    Attributes:
        fast_path: the path of the last eager step: ``"blocked"``, ``"flat"`` (flat buffers),
            ``"foreach"``, ``"fused"``, ``"compiled"`` (the compiled list path), ``"compiled-flat"`` or ``"list"``;
            None before the first step.
        foreach_chunk_elements: the most elements per chunk of the ``"foreach"`` step of an
            algorithm without sums over elements; None (default): the largest of the largest
            parameter's numel / 8, 2^24 and the model's numel / 64
            (:func:`adaptlr.backends.foreach_chunks.default_budget`). May be changed between steps.
    """

    def __init__(
        self, params: Iterable[Any], opt: core.Optimizer, *, state_dtype: torch.dtype | None = None,
        fast: str | bool | dict | None = "auto",
    ) -> None:
        if not isinstance(opt, core.Optimizer):
            raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be None or a floating torch dtype, got {state_dtype!r}")
        if opt.state_dtype is not None:  # adaptlr.adamw(..., state_dtype="float32") carries it
            if state_dtype is not None and dtype_name(state_dtype) != opt.state_dtype:
                raise ValueError(f"state_dtype={state_dtype} differs from the optimizer's "
                                 f"state_dtype={opt.state_dtype!r}")
            state_dtype = getattr(torch, opt.state_dtype)
        learning_rate = opt.base.learning_rate
        self.opt = opt
        self.state_dtype = state_dtype
        self._flat: _FlatPath | None = None
        self._compiled: Callable | None = None
        self.fast = fast
        self.fast_path: str | None = None
        self._schedule: Callable[[Any], Any] | None = learning_rate if callable(learning_rate) else None
        self._skeleton: Node | None = None
        self._field_kinds: list[tuple[str, bool]] = []
        self._hd_fields: list[tuple[str, bool]] = []  # HD's adapted rates (they follow the scheduler)
        self._global: dict[str, torch.Tensor] | None = None
        self._alpha_cache: dict = {}
        # per base hyper-parameters (torch_groups.hyper_key); filled before any traced step
        self._opts: dict[tuple, core.Optimizer] = {
            torch_groups.base_key(opt.base): core.Optimizer(torch_steps.PerParameterSteps(opt.base), opt.adaptations)}
        self._foreach_fields: dict[str, bool] | None = None  # per-parameter fields: per element or 0-D
        self._foreach_refused = False  # the algorithm used an operation ForeachArray does not have
        self._foreach_chunk_elements: int | None = None
        self._list_part_elements: int | None = None
        # how many sums a row-block step makes, per (optimizer, parameter shape, dtype) (_row_block_step)
        self._row_sums_made: dict[tuple, int | None] = {}
        self._flat_stale = False  # the state was replaced: copy it into the flat buffers before a flat step
        self._eval_mode = False  # Schedule-Free: the model holds x (eval) instead of y (train)
        self._built = False
        defaults = {"lr": 1.0 if self._schedule is not None else float(learning_rate),
                    **torch_groups.group_defaults(opt.base)}
        super().__init__(params, defaults)
        self._built = True
        # The state of trainable parameters exists from the start (as after a first step): DCP's
        # lr = 0 initialisation step then never runs, and HD's initial rate is each group's lr.
        self._ensure_state()

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the flat buffers and the compiled step (``copy.deepcopy``, pickling);
        ``torch.optim.Optimizer`` keeps only its own three fields, which would lose the algorithm."""
        out = dict(self.__dict__)
        out.update(_flat=None, _compiled=None, _list_signature=None)
        return out

    def __repr__(self) -> str:
        return f"adaptlr.backends.torch.Optimizer({self.opt.name}, {len(self.param_groups)} param groups)"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, with the group's values checked as torch.optim
        checks them (ValueError) and its parameters' state created."""
        super().add_param_group(param_group)
        try:
            where = f"param_groups[{len(self.param_groups) - 1}]"
            torch_groups.check_group(self.param_groups[-1], self.opt.base, where)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if self._built:
            self._ensure_state()

    @property
    def fast(self) -> str | dict | None:
        """The ``fast`` setting (``"auto"``, ``"flat"``, ``"foreach"``, ``"fused"``, ``"compile"``, ``"compile-flat"``,
        a dict or None). It may be changed between steps: the state carries over."""
        return self._fast

    @fast.setter
    def fast(self, fast: str | bool | dict | None) -> None:
        if fast is True:
            fast = "auto"
        if not (fast is None or fast is False or isinstance(fast, dict) or fast in _FAST_MODES):
            raise ValueError(f"fast must be one of {_FAST_MODES}, True, False, None or a dict, got {fast!r}")
        self._fast = dict(fast) if isinstance(fast, dict) else (fast or None)
        self._list_signature = None
        if self._flat is not None:
            self._drop_flat(())

    @property
    def foreach_chunk_elements(self) -> int | None:
        """The most elements per chunk of the ``"foreach"`` step of an algorithm without sums (None: the
        default rule, :func:`adaptlr.backends.foreach_chunks.default_budget`)."""
        return self._foreach_chunk_elements

    @foreach_chunk_elements.setter
    def foreach_chunk_elements(self, elements: int | None) -> None:
        self._foreach_chunk_elements = _elements_or_none("foreach_chunk_elements", elements)

    @property
    def list_part_elements(self) -> int | None:
        """The most elements per part of the list step of an algorithm whose sums stay within tensors
        and replay over rows (DSA, HD and EG per tensor, LDoG): tensors above it run in blocks of their
        rows, two passes (:mod:`adaptlr.backends.torch_rows`). None: the default rule
        (:meth:`_row_block_budgets`: on a CPU model above 16 MiB, ``row_block_size`` of the largest tensor and
        of the block temporaries the algorithm keeps alive)."""
        return self._list_part_elements

    @list_part_elements.setter
    def list_part_elements(self, elements: int | None) -> None:
        self._list_part_elements = _elements_or_none("list_part_elements", elements)

    # -- the step -----------------------------------------------------------------------------------

    # -- Schedule-Free's two views ------------------------------------------------------------------

    def eval(self) -> None:
        """Schedule-Free: replace the parameters by the evaluation parameters ``x`` (no-op otherwise)."""
        self._switch_view(to_eval=True)

    def train(self) -> None:
        """Schedule-Free: put the training parameters ``y`` back after :meth:`eval` (no-op otherwise)."""
        self._switch_view(to_eval=False)

    def _switch_view(self, to_eval: bool) -> None:
        from adaptlr.schedule_free import ScheduleFree

        index = next((i for i, a in enumerate(self.opt.adaptations) if isinstance(a, ScheduleFree)), None)
        if index is None or self._eval_mode == to_eval:
            self._eval_mode = to_eval and index is not None
            return
        b1 = self.opt.adaptations[index].b1
        weight = 1.0 - 1.0 / b1 if to_eval else 1.0 - b1
        zs = self.functional_state.adaptations[index].z
        with torch.no_grad():
            for p, z in zip(self._all_params(), zs):
                if p.dtype == z.dtype:
                    p.lerp_(z.to(p.device), weight)
                else:  # mixed precision: in the state dtype, rounded once
                    p.copy_(torch.lerp(p.to(z.dtype), z.to(p.device), weight))
        self._eval_mode = to_eval

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        if self._eval_mode:
            raise RuntimeError("the optimizer is in eval mode (Schedule-Free: the model holds the evaluation "
                               "parameters x); call optimizer.train() before training steps")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active, groups, where = [], [], []
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    active.append(p)
                    groups.append(group)
                    where.append((g, i))
        if not active:
            return loss
        _check_grads(active, groups, where)
        keys = self._hyper_keys(groups)
        if any(k != keys[0] for k in keys):
            _check_no_global_sums(self.opt)  # before any state changes
        if torch.compiler.is_compiling():  # traced into the caller's graph
            if any(p not in self.state for p in active):
                self._ensure_state()
            self._follow_scheduler(active, groups)
            self._list_step(active, groups, torch_steps.advance([self.state[p] for p in active]))
            return loss
        if any(p not in self.state for p in active):  # unfrozen, or appended to a group's list
            self._ensure_state()
        self._follow_scheduler(active, groups)
        old_steps = [self.state[p]["step"] for p in active]
        skipped_before = self._skip_count()
        steps = torch_steps.advance([self.state[p] for p in active])
        fast = self.fast
        if fast == "auto" and active[0].device.type != "cpu":
            fast = "foreach"  # a GPU: one multi-tensor kernel per operation, no copies (docs/performance.md)
        if fast in ("auto", "fused") and self._fused_step(active, groups, steps):
            self.fast_path = "fused"
        elif fast == "foreach" and self._foreach_step(active, groups, steps):
            self.fast_path = "foreach"
        elif fast not in (None, "compile", "foreach", "fused") and self._flat_step(active, groups, steps):
            self.fast_path = "compiled-flat" if self._flat.fo.mode == "compiled" else self._flat.fo.mode
        elif self.fast in ("compile", "compile-flat"):
            self._compiled_step(active, groups, steps)
            self.fast_path = "compiled"
        else:
            self._list_step(active, groups, steps)
            self.fast_path = "list"
        self._undo_skipped_steps(active, old_steps, skipped_before)
        return loss

    def _skip_count(self) -> torch.Tensor | None:
        """``skip_nonfinite``'s count of skipped steps (None without that wrapper)."""
        for i, adaptation in enumerate(self.opt.adaptations):
            if isinstance(adaptation, SkipNonfinite):  # a copy: on the flat path it is a view updated in place
                return self._global[f"adaptations[{i}].skipped"].clone()
        return None

    def _undo_skipped_steps(self, active: list, old_steps: list, skipped_before: torch.Tensor | None) -> None:
        """A step that ``skip_nonfinite`` skipped does not count in ``state[p]["step"]`` either (no host sync)."""
        if skipped_before is None:
            return
        skipped = self._skip_count() > skipped_before
        entries = [self.state[p] for p in active]
        # parameters that shared a count tensor keep sharing one (torch_steps: the base runs once per count)
        for new, members in torch_steps.by_identity([e["step"] for e in entries]):
            kept = torch.where(skipped, old_steps[members[0]], new)
            for i in members:
                entries[i]["step"] = kept

    def _follow_scheduler(self, active: list, groups: list) -> None:
        """Hypergradient descent: the adapted rate ``a`` follows the scheduler, ``a ← a·(α_t/α_{t-1})``,
        with ``α_{t-1}`` the group ``lr`` of the last step (``state[p]["learning_rate"]``; no change
        where it was 0). With a constant ``lr`` the ratio is exactly 1 (spec §4 unchanged). One
        global ``a`` follows the first parameter's group."""
        if not self._hd_fields:
            return
        params = [self._state_view(p) for p in active]
        ratios, known = [], []  # known: (α_t, α_{t-1}, ratio), by identity (id() would guard under Dynamo)
        for p, alpha in zip(active, self._alphas(groups, params, self._global["count"])):
            previous = self.state[p]["learning_rate"]
            for a, q, r in known:
                if a is alpha and q is previous:
                    ratio = r
                    break
            else:
                positive = previous > 0
                ratio = torch.where(positive, alpha / torch.where(positive, previous, torch.ones_like(previous)),
                                    torch.ones_like(previous))
                known.append((alpha, previous, ratio))
            ratios.append(ratio)
        for path, per_param in self._hd_fields:
            if not per_param:
                rate = self._global[path]
                self._global[path] = rate * ratios[0].to(rate.dtype)
                continue
            for p, ratio in zip(active, ratios):
                entry = self.state[p]
                rate = entry[path]
                if rate.ndim == 0:
                    entry[path] = rate * ratio.to(rate.dtype)
                else:
                    rate.mul_(ratio.to(rate.dtype))
        self._flat_stale = True

    def _opt_for(self, keys: list[tuple], steps: Any) -> core.Optimizer:
        """The adaptlr optimizer with the base hyper-parameters ``keys[0]`` (all equal), its base counting
        the steps ``steps`` (per parameter; :mod:`adaptlr.backends.torch_steps`)."""
        key = keys[0]
        found = self._opts.get(key)
        if found is None:
            base = torch_steps.PerParameterSteps(torch_groups.base_for(self.opt.base, key))
            found = self._opts[key] = core.Optimizer(base, self.opt.adaptations)
        found.base.steps = steps
        return found

    def _hyper_keys(self, groups: list[dict]) -> list[tuple]:
        base, by_group, keys = self.opt.base, {}, []
        for group in groups:
            key = by_group.get(id(group))
            if key is None:
                key = by_group[id(group)] = torch_groups.hyper_key(group, base)
            keys.append(key)
        return keys

    def _list_step(self, active: list, groups: list, steps: list) -> None:
        """The step over the lists of per-parameter tensors (eager, or traced by ``torch.compile``)."""
        keys = self._hyper_keys(groups)
        params = [self._state_view(p) for p in active]
        alpha = self._alphas(groups, params, self._global["count"])
        decay = [float(g["weight_decay"]) for g in groups]
        if all(k == keys[0] for k in keys):
            parts = None if torch.compiler.is_compiling() else self._tensor_parts(active)
            if parts is None:
                self._run(self._opt_for(keys, steps), active, [p.grad for p in active], alpha, decay)
                return
            # Nothing sums across tensors: a few tensors at a time, each part written before the next,
            # so the step's temporaries are a part's; the new 0-D values are assigned after the last
            # part (every part reads the old ones).
            pending = []
            for members in parts:
                if isinstance(members, _RowBlocks):  # a large tensor, in blocks of its rows
                    p = active[members.index]
                    opt = self._opt_for(keys, [steps[members.index]])
                    pending.append(([p], self._row_block_step(opt, p, alpha[members.index], decay[members.index],
                                                              members.blocks)))
                    continue
                sub = [active[i] for i in members]
                opt = self._opt_for(keys, [steps[i] for i in members])
                state = self._assemble(sub)
                updates, new_state = self._update(opt, sub, [p.grad for p in sub], state, [alpha[i] for i in members],
                                                  [decay[i] for i in members], donate=True)
                pending.append((sub, self._write(state, new_state, sub)))
                for p, u in zip(sub, updates):
                    p.add_(u)
                del updates, new_state, state  # not alive while the next part is computed
            for sub, scalars in pending:
                self._assign_scalars(sub, scalars)
            return
        # Groups with different base hyper-parameters: one update per set of values, on one state.
        state = self._assemble(active)
        results = []
        for key in dict.fromkeys(keys):
            members = [i for i, k in enumerate(keys) if k == key]
            sub = [active[i] for i in members]
            opt = self._opt_for([key], [steps[i] for i in members])
            results.append((members, *self._update(opt, sub, [p.grad for p in sub], self._assemble(sub),
                                                    [alpha[i] for i in members], [decay[i] for i in members])))
        new_values = [None] * len(self._field_kinds)
        for members, _, new_state in results:
            for k, ((_, per_param), value) in enumerate(zip(self._field_kinds, self._values(new_state))):
                if not per_param:
                    new_values[k] = value
                    continue
                if new_values[k] is None:
                    new_values[k] = [None] * len(active)
                for i, slot in zip(members, value):
                    new_values[k][i] = slot
        self._assign_scalars(active, self._write(state, rebuild_state(self._skeleton, new_values), active))
        for members, updates, _ in results:
            for i, u in zip(members, updates):
                active[i].add_(u)

    def _tensor_parts(self, active: list) -> list | None:
        """Consecutive parameters in parts of at most the largest one's elements (at least
        :data:`LIST_PART_MIN_ELEMENTS`), for algorithms with no sum across tensors
        (:func:`adaptlr.backends.fast.tensorwise`); None: one update.

        Where the sums within tensors are replayable over rows and budgets apply
        (:meth:`_row_block_budgets`), parts of at most the smallest budget of their members instead,
        and each tensor above its budget a :class:`_RowBlocks` part (:mod:`adaptlr.backends.torch_rows`)."""
        from adaptlr.backends import torch_rows
        from adaptlr.backends.fast import tensorwise

        if not tensorwise(self.opt):
            return None
        numels = [p.numel() for p in active]
        budgets = self._row_block_budgets(active)
        if budgets is None and len(active) < 2:
            return None
        whole = max(max(numels), LIST_PART_MIN_ELEMENTS)
        parts: list = [[]]
        size, limit = 0, whole
        for i, n in enumerate(numels):
            budget = None if budgets is None else budgets[i]
            blocks = None if budget is None else torch_rows.row_blocks(tuple(active[i].shape), budget)
            if blocks is not None:
                parts.append(_RowBlocks(i, blocks))
                parts.append([])
                size, limit = 0, whole
                continue
            if parts[-1] and size + n > min(limit, budget or whole):
                parts.append([])
                size, limit = 0, whole
            parts[-1].append(i)
            size += n
            limit = min(limit, budget or whole)
        parts = [part for part in parts if part]
        return parts if len(parts) > 1 or isinstance(parts[0], _RowBlocks) else None

    def _row_block_budgets(self, active: list) -> list[int] | None:
        """Per parameter, the most elements of a block of its rows in the list step (and of a part of
        the list step it is in), or None (whole tensors): ``list_part_elements`` where set, else on a
        CPU model above 16 MiB with ``fast="auto"``
        :func:`adaptlr.backends.fast.row_block_size` of the largest tensor and of the block
        temporaries the step keeps alive for a tensor of its dimensions
        (:func:`~adaptlr.backends.fast.row_block_live_temporaries`); only for algorithms whose
        sums stay within tensors and replay over rows (:func:`~adaptlr.backends.fast.sums_replayable_by_rows`)."""
        from adaptlr.backends.fast import (
            large_cpu_model,
            row_block_live_temporaries,
            row_block_size,
            sums_replayable_by_rows,
        )

        if not sums_replayable_by_rows(self.opt) or any(type(p.detach()) is not torch.Tensor for p in active):
            return None  # (tensor subclasses such as DTensor: whole tensors, their sums their own)
        if self._list_part_elements is not None:
            return [self._list_part_elements] * len(active)
        if self.fast != "auto" or any(p.device.type != "cpu" for p in active):
            return None
        if not large_cpu_model(active):
            return None
        largest = max(p.numel() for p in active)
        coupled = not self.opt.base.decoupled and any(float(g["weight_decay"]) > 0 for g in self.param_groups)
        sizes = {ndim: row_block_size(largest, row_block_live_temporaries(self.opt, ndim, coupled))
                 for ndim in {p.ndim for p in active}}
        return [sizes[p.ndim] for p in active]

    def _row_block_step(self, opt: core.Optimizer, p: torch.Tensor, alpha: torch.Tensor, decay: float,
                        blocks: list[slice]) -> list:
        """The step of one parameter over blocks of its rows, two passes (:mod:`adaptlr.backends.torch_rows`):
        the state fields with one entry per row written block by block, the others after the last
        block; returns the new 0-D fields in :meth:`_assign_scalars`'s order."""
        from adaptlr.backends import part_sums, torch_rows

        shape = tuple(p.shape)
        state = self._assemble([p])
        old_values = self._values(state)
        param = self._state_view(p, detach=False)
        grad = self._state_view(p, p.grad, detach=False)
        later: dict[int, tuple] = {}  # the fields read whole: their new values, written after the last block
        scalars: list = []
        step_scalars: dict[bool, core.Scalars] = {}  # one per pass (a first pass's sums are partial)

        def state_of(blocks: list[slice], cut: dict[int, torch.Tensor] | None = None) -> list:
            """The state's field values with ``blocks`` as the leaves of one step: a field with one
            entry per row cut to each block's rows (the views recorded in ``cut``), the others whole."""
            def piece(t: torch.Tensor, rows: slice) -> torch.Tensor:
                if not torch_rows.per_row(t, shape):
                    return t
                view = t[rows]
                if cut is not None:
                    cut[id(view)] = view
                return view

            return [[_map_tensors(value[0], lambda t, rows=rows: piece(t, rows)) for rows in blocks] if per_param
                    else value for (_, per_param), value in zip(self._field_kinds, old_values)]

        def run_block(rows: slice, reducer: Any, write: bool, donate: bool) -> None:
            if write not in step_scalars:
                step_scalars[write] = core.Scalars.of_step(xp_torch, state, [param])
            cut: dict[int, torch.Tensor] = {}
            values = state_of([rows], cut)
            # The block's own rows of the state may take its new values in place (adaptlr._inplace),
            # in every writing block: nothing runs a row block again (plain tensors have every
            # operation: no fallback path); the fields read whole never are.
            donated = list(cut.values()) if write and opt.donation_safe else []
            with donating(step_scalars[write], donated):
                updates, new_state = opt.update_leaves(
                    xp_torch, ListLayout(1), [grad[rows]], rebuild_state(self._skeleton, values), [param[rows]],
                    alpha=[alpha], weight_decay=[decay], reducer=reducer, scalars=step_scalars[write])
            if not write:
                return
            scalars.clear()
            new_values = _read_before_write(values, self._values(new_state))
            for (_, per_param), old, new in zip(self._field_kinds, values, new_values):
                if not per_param:
                    scalars.append(new)
                    continue
                pairs = old[0].items() if isinstance(old[0], dict) else [(None, old[0])]
                for kind, t in pairs:
                    value = new[0] if kind is None else new[0][kind]
                    if t.ndim == 0:
                        scalars.append(value)
                    elif value is t:
                        continue
                    elif id(t) in cut:
                        t.copy_(value)
                    else:
                        later[id(t)] = (t, value)
            p[rows].add_(updates[0])

        def run_group(group: list[slice], recorder: Any) -> None:
            """The first pass over consecutive row blocks in one step, each block a leaf (a step
            whose sums all come before its direction: only one block's terms at a time)."""
            if False not in step_scalars:
                step_scalars[False] = core.Scalars.of_step(xp_torch, state, [param])
            opt.update_leaves(xp_torch, ListLayout(len(group)), [grad[rows] for rows in group],
                              rebuild_state(self._skeleton, state_of(group)), [param[rows] for rows in group],
                              alpha=[alpha] * len(group), weight_decay=[decay] * len(group), reducer=recorder,
                              scalars=step_scalars[False])

        from adaptlr.backends.fast import FIRST_PASS_BLOCKS_PER_CALL, row_sums_before_direction

        groups = (FIRST_PASS_BLOCKS_PER_CALL, run_group) if row_sums_before_direction(self.opt) else None
        # the step's number of sums, counted in its first step on a tensor of this shape and dtype:
        # the first block's first pass then stops at its last sum (part_sums.run_parts)
        counted = (opt, shape, p.dtype)
        self._row_sums_made[counted] = part_sums.run_parts(xp_torch, blocks, run_block, "replay", rows=True,
                                                           first_pass_groups=groups,
                                                           sums_made=self._row_sums_made.get(counted))
        for t, value in later.values():
            t.copy_(value)
        return scalars

    def _update(self, opt: core.Optimizer, active: list, grads: list, state: core.OptimizerState, alpha: list,
                decay: list, donate: bool = False) -> tuple[list, core.OptimizerState]:
        """``update_leaves`` on the lists. ``donate``: the step may write into the state tensors of
        ``state`` (:func:`adaptlr._inplace.donating`; the caller writes the new state into them
        after it, and nothing runs it again), except under ``torch.compile`` (which is given none)
        and where the old state is read after the step (:attr:`adaptlr.Optimizer.donation_safe`)."""
        # Under step's no_grad the parameters themselves (no detach() per tensor: one op each on 500 tensors).
        params = [self._state_view(p, detach=False) for p in active]
        grads = [self._state_view(p, g, detach=False) for p, g in zip(active, grads)]
        if not (donate and opt.donation_safe) or torch.compiler.is_compiling():
            return opt.update_leaves(xp_torch, ListLayout(len(params)), grads, state, params, alpha=alpha,
                                     weight_decay=decay)
        import optree

        scalars = core.Scalars.of_step(xp_torch, state, params)
        per_param = [value for (_, of_param), value in zip(self._field_kinds, self._values(state)) if of_param]
        fields = [t for t in optree.tree_leaves(per_param) if t.ndim]
        with donating(scalars, fields):
            return opt.update_leaves(xp_torch, ListLayout(len(params)), grads, state, params, alpha=alpha,
                                     weight_decay=decay, scalars=scalars)

    def _run(self, opt: core.Optimizer, active: list, grads: list, alpha: list, decay: list,
             assign: bool = True) -> list | None:
        """``update_leaves`` on the lists; the state written in place, ``p.add_(u)``. With ``assign=False``
        the new 0-D fields are returned instead of assigned (``fast="compile"``: a compiled graph may
        return an input it was given as a constant, not the tensor passed at this call)."""
        state = self._assemble(active)
        updates, new_state = self._update(opt, active, grads, state, alpha, decay, donate=True)
        scalars = self._write(state, new_state, active)
        for p, u in zip(active, updates):
            p.add_(u)
        if not assign:
            return scalars
        self._assign_scalars(active, scalars)
        return None

    def _fused_step(self, active: list, groups: list, steps: list) -> bool:
        """A learning-rate-free base's step written for torch (:mod:`adaptlr.backends.torch_lr_free`);
        False where this step must take another path."""
        from adaptlr.backends import torch_lr_free
        from adaptlr.backends.fast import large_cpu_model
        from adaptlr.backends.torch_block_sums import plain_tensors

        keys = self._hyper_keys(groups)
        if any(k != keys[0] for k in keys):
            return False
        found = torch_lr_free.step_module(self._opt_for(keys, steps), asked=self.fast == "fused")  # the groups' values
        if found is None or (self.fast == "auto" and not large_cpu_model(active)):
            return False  # (a small model: the same step on the flat buffers; docs/performance.md, round 31)
        grads = [p.grad for p in active]
        if not plain_tensors(active, grads, self.state_dtype):
            return False
        module, base = found
        params = [p.detach() for p in active]
        alpha = self._alphas(groups, params, self._global["count"])
        count = self._global["count"] + 1
        entries = [self.state[p] for p in active]
        shared = module.step(base, params, grads, entries, self._global, alpha,
                             [float(g["weight_decay"]) for g in groups], count)
        for entry, a in zip(entries, alpha):
            entry["learning_rate"] = a
        self._global.update(shared, count=count)
        self._flat_stale = True
        return True

    def _compiled_step(self, active: list, groups: list, steps: list) -> None:
        """:meth:`_run` through ``torch.compile`` (α computed outside, so a scheduler does not recompile)."""
        keys = self._hyper_keys(groups)
        if any(k != keys[0] for k in keys):
            self._list_step(active, groups, steps)
            return
        if self._compiled is None:
            self._compiled = torch.compile(private_code(self._run))  # its own graphs (fast.private_code)
        params = [self._state_view(p) for p in active]
        alpha = self._alphas(groups, params, self._global["count"])
        scalars = self._compiled(self._opt_for(keys, steps), active, [p.grad for p in active], alpha,
                                 [float(g["weight_decay"]) for g in groups], assign=False)
        self._assign_scalars(active, scalars)

    def _write(self, state: core.OptimizerState, new_state: core.OptimizerState, active: list) -> list:
        """Write ``new_state`` into the tensors of ``state`` (of ``active``) where they have elements,
        in place; return the new 0-D fields (step counter, learning rates, global scalars) in the
        order :meth:`_assign_scalars` puts them in place of the old ones."""
        old_values = self._values(state)
        new_values = self._values(new_state)
        if not torch.compiler.is_compiling():
            new_values = _read_before_write(old_values, new_values)
        scalars = []
        for (_, per_param), old, new in zip(self._field_kinds, old_values, new_values):
            if not per_param:
                scalars.append(new)
                continue
            for old_slot, new_slot in zip(old, new):
                pairs = old_slot.items() if isinstance(old_slot, dict) else [(None, old_slot)]
                for kind, t in pairs:
                    value = new_slot if kind is None else new_slot[kind]
                    if t.ndim == 0:
                        scalars.append(value)
                    elif value is not t:
                        t.copy_(value)
        return scalars

    def _assign_scalars(self, active: list, scalars: list) -> None:
        values = iter(scalars)
        for path, per_param in self._field_kinds:
            if not per_param:
                self._global[path] = next(values)
                continue
            for p in active:
                entry = self.state[p]
                slot = entry[path]
                if isinstance(slot, dict):
                    for kind, t in slot.items():
                        if t.ndim == 0:
                            slot[kind] = next(values)
                elif slot.ndim == 0:
                    entry[path] = next(values)
        self._flat_stale = True

    def _values(self, state: core.OptimizerState) -> list:
        return field_values(self._skeleton, state, len(self._field_kinds))

    # -- the foreach path ---------------------------------------------------------------------------

    def _foreach_step(self, active: list, groups: list, steps: list) -> bool:
        """The step with ``torch._foreach_*`` ops over the lists of per-parameter tensors, one list per
        (param group, dtype, device) (:mod:`adaptlr.backends.foreach`); False where it does not apply
        (the caller takes another path; nothing has changed)."""
        from adaptlr.backends import foreach, part_sums

        keys = self._hyper_keys(groups)
        if any(k != keys[0] for k in keys) or any(s is not steps[0] for s in steps):
            return False
        if self._foreach_refused or not self._foreach_eligible(active):
            return False
        kinds: dict = {}
        members: list[list[int]] = []
        for i, (g, p) in enumerate(zip(groups, active)):
            key = (id(g), p.dtype, p.device)
            k = kinds.get(key)
            if k is None:
                k = kinds[key] = len(members)
                members.append([])
            members[k].append(i)
        entries = [self.state[p] for p in active]
        per_element = self._per_element_fields(active)
        if per_element is None:
            return False
        t = self._global["count"] + 1 if self._schedule is not None else None
        alpha = [self._alpha(groups[rows[0]]["lr"], active[rows[0]].dtype, active[rows[0]].device, t)
                 for rows in members]
        decay = [float(groups[rows[0]]["weight_decay"]) for rows in members]
        opt = self._opt_for(keys, steps[0])
        old_global = dict(self._global)
        old_rates = {path: [entries[rows[0]][path] for rows in members]  # 0-D per parameter: per list
                     for path, per_param in self._field_kinds if per_param and not per_element[path]}
        new_global: dict = {}
        new_rates: list[tuple[int, str, Any]] = []
        lrs = [groups[rows[0]]["lr"] for rows in members]
        one_rate = all(lr is lrs[0] or (not isinstance(lr, torch.Tensor) and not isinstance(lrs[0], torch.Tensor)
                       and float(lr) == float(lrs[0])) for lr in lrs)
        chunks, two_pass = self._foreach_plan(active, members, entries, per_element, one_rate)
        written = False

        def run_chunk(chunk: list, reducer: Any, write: bool, donate: bool) -> None:
            nonlocal written
            self._foreach_chunk(opt, active, entries, chunk, per_element, old_global, old_rates, alpha, decay,
                                reducer, new_global if write else None, new_rates if write else None,
                                donate=donate and opt.donation_safe)
            written = written or write

        try:
            part_sums.run_parts(foreach.namespace, chunks, run_chunk, "replay" if two_pass else "none")
        except NotImplementedError:
            # An operation with no list form: the first update meets it, before anything is written
            # (every chunk runs the same operations). The list path from now on.
            if written:
                raise
            self._foreach_refused = True
            return False
        self._global.update(new_global)
        for i, path, value in new_rates:
            entries[i][path] = value
        self._flat_stale = True
        return True

    def _foreach_plan(self, active: list, members: list[list[int]], entries: list[dict],
                      per_element: dict[str, bool], one_rate: bool) -> tuple[list, bool]:
        """The chunks of the foreach step (:mod:`adaptlr.backends.foreach_chunks`) and whether they
        take two passes: chunks of ``foreach_chunk_elements`` for algorithms without sums over
        elements; for those with replayable sums, chunks in two passes where a chunk size is set or
        the model is larger than ``TWO_PASS_MIN``, if every group has the same ``lr`` (``one_rate``:
        the learning-rate-free bases weight their sums by the largest α of the step's leaves,
        which a chunk would take over its own); else the whole lists."""
        from adaptlr.backends import foreach_chunks
        from adaptlr.backends.fast import partitionable, sums_replayable

        whole = [[(k, [(i, None) for i in rows]) for k, rows in enumerate(members)]], False
        numels = [p.numel() for p in active]
        budget = self._foreach_chunk_elements or foreach_chunks.default_budget(numels)
        if budget >= sum(numels):
            return whole
        if partitionable(self.opt):
            two_pass = False
        elif one_rate and sums_replayable(self.opt) and (self._foreach_chunk_elements is not None
                                                         or sum(numels) > foreach_chunks.TWO_PASS_MIN):
            two_pass = True
        else:
            return whole
        fields = [path for path, per_param in self._field_kinds if per_param and per_element[path]]
        splittable = [p.is_contiguous() and p.grad.is_contiguous()
                      and all(entries[i][f].is_contiguous() and entries[i][f].shape == p.shape for f in fields)
                      for i, p in enumerate(active)]
        return foreach_chunks.plan(members, numels, splittable, budget), two_pass

    def _foreach_chunk(self, opt: core.Optimizer, active: list, entries: list[dict], chunk: list,
                       per_element: dict[str, bool], old_global: dict, old_rates: dict, alpha: list, decay: list,
                       reducer: Any = None, new_global: dict | None = None, new_rates: list | None = None,
                       donate: bool = False) -> None:
        """One chunk of the foreach step: its per-element state written and its parameters updated in
        place; the new global and per-parameter 0-D values collected into ``new_global`` /
        ``new_rates`` (assigned after the last chunk: every chunk reads the old ones). With
        ``new_global=None`` only the update runs (the first pass, ``reducer`` recording its sums).
        ``donate``: the step may write into the chunk's per-element state (:func:`adaptlr._inplace.donating`)."""
        from adaptlr.backends import foreach

        def piece(t: torch.Tensor, where: slice | None) -> torch.Tensor:
            return t if where is None else t.view(-1)[where]

        values = []
        for path, per_param in self._field_kinds:
            if not per_param:
                values.append(old_global[path])
            elif per_element[path]:
                values.append([foreach.ForeachArray([piece(entries[i][path], w) for i, w in pieces])
                               for _, pieces in chunk])
            else:  # one 0-D value per parameter (its learning rate): one per list, as on a flat buffer
                values.append([old_rates[path][k] for k, _ in chunk])
        state = rebuild_state(self._skeleton, values)
        params = [foreach.ForeachArray([piece(active[i], w) for i, w in pieces]) for _, pieces in chunk]
        grads = [foreach.ForeachArray([piece(active[i].grad, w) for i, w in pieces]) for _, pieces in chunk]
        scalars = core.Scalars.of_step(foreach.namespace, state, params)
        donated = [x for value in values if isinstance(value, list) for x in value
                   if isinstance(x, foreach.ForeachArray)] if donate else []
        with donating(scalars, donated):
            updates, new_state = opt.update_leaves(
                foreach.namespace, ListLayout(len(chunk)), grads, state, params,
                alpha=[alpha[k] for k, _ in chunk], weight_decay=[decay[k] for k, _ in chunk], reducer=reducer,
                scalars=scalars)
        if new_global is None or new_rates is None:
            return
        old_values, new_values = values, self._values(new_state)
        # a new value that is an old tensor of another field (ActiveLR's G_prev ← C at an epoch
        # boundary, C written into by a donated step) is read before any field is written: every
        # copy is planned (and such a value cloned) first, then made
        owner = {}
        for k, old in enumerate(old_values):
            if isinstance(old, list):
                for slot in old:
                    for x in slot.tensors if isinstance(slot, foreach.ForeachArray) else [slot]:
                        owner[id(x)] = k
        copies = []
        for k, ((path, per_param), old, new) in enumerate(zip(self._field_kinds, old_values, new_values)):
            if not per_param:
                new_global[path] = new
                continue
            for (_, pieces), old_slot, new_slot in zip(chunk, old, new):
                if isinstance(old_slot, foreach.ForeachArray):
                    if not isinstance(new_slot, foreach.ForeachArray):
                        new_slot = foreach.ForeachArray([new_slot] * len(pieces))  # a broadcast 0-D value
                    dst, src = [], []
                    for (i, _), d, s in zip(pieces, old_slot.tensors, new_slot.tensors):
                        if d.ndim == 0:  # a 0-D parameter's state is replaced, as on the list path
                            entries[i][path] = s
                        elif d is not s:
                            dst.append(d)
                            src.append(s.clone() if owner.get(id(s), k) != k else s)
                    if dst:
                        copies.append((dst, src))
                else:
                    new_rates.extend((i, path, new_slot) for i, _ in pieces)
        for dst, src in copies:
            torch._foreach_copy_(dst, src)
        for (_, pieces), u in zip(chunk, updates):
            torch._foreach_add_([piece(active[i], w) for i, w in pieces], u.tensors)

    def _per_element_fields(self, active: list) -> dict[str, bool] | None:
        """Per-parameter field path -> whether it holds one value per element (``base.mu``) rather
        than one 0-D value per parameter (``learning_rate``), told apart on a parameter with
        dimensions; None when the state is not one tensor per parameter (DSA's factor dicts) or
        no parameter has dimensions."""
        known = self._foreach_fields
        if known is not None:
            return known
        probe = next((p for p in active if p.ndim > 0), None)
        if probe is None:
            return None
        entry = self.state[probe]
        slots = {path: entry[path] for path, per_param in self._field_kinds if per_param}
        if not all(isinstance(t, torch.Tensor) for t in slots.values()):
            self._foreach_refused = True
            return None
        self._foreach_fields = {path: t.ndim > 0 for path, t in slots.items()}
        return self._foreach_fields

    def _foreach_eligible(self, active: list) -> bool:
        from adaptlr.backends.fast import flat_safety

        if self.state_dtype is not None and any(p.dtype != self.state_dtype for p in active):
            return False
        if any(type(p) not in (torch.Tensor, torch.nn.Parameter) or p.layout != torch.strided for p in active):
            return False  # tensor subclasses (DTensor, ...)
        return flat_safety(self.opt)[0]

    # -- the flat buffers ---------------------------------------------------------------------------

    def _flat_step(self, active: list, groups: list, steps: list) -> bool:
        """Run this step on the flat buffers; False where it must take the list path."""
        signature = [id(g) for g in groups] + [id(p) for p in active]
        keys = self._hyper_keys(groups)
        if any(k != keys[0] for k in keys) or any(s is not steps[0] for s in steps):
            return False  # one set of base values and one step count per flat update
        flat = self._flat
        if flat is None or flat.signature != signature:
            if signature == self._list_signature:
                return False
            options = self._flat_options(active)
            if options is None:
                self._drop_flat(())
                self._list_signature = signature
                return False
            self._drop_flat({id(p) for p in active})
            flat = self._flat = self._build_flat(active, groups, signature, options)
            self._list_signature = None
        elif self._flat_stale:
            self._copy_state_into(flat)
        self._flat_stale = False
        fo = flat.fo
        fo.opt = self._opt_for(keys, steps[0])
        # α and λ per (group, dtype, device) of the step, spread to the parameters.
        t = self._global["count"] + 1 if self._schedule is not None else None
        alphas = [self._alpha(g["lr"], dtype, device, t) for g, dtype, device in flat.kinds]
        decays = [float(g["weight_decay"]) for g, _, _ in flat.kinds]
        alpha, weight_decay = [alphas[k] for k in flat.kind_of], [decays[k] for k in flat.kind_of]
        if fo.mode == "blocked":  # blocks of the parameters' own storage; only small ones are copied
            fo.step_on(active, [p.grad for p in active], alpha=alpha, weight_decay=weight_decay)
            return True
        # (under step's no_grad: the parameters themselves, no detach() per tensor)
        torch._foreach_copy_(fo.params, active)  # the parameters may have changed since the last step
        torch._foreach_copy_(fo.grads, [p.grad for p in active])
        fo.step(None, alpha=alpha, weight_decay=weight_decay)
        torch._foreach_copy_(active, fo.params)  # bumps the parameters' versions, as p.add_ would
        return True

    def _flat_options(self, params: list[torch.Tensor]) -> dict | None:
        """The FlatOptimizer options for a step on ``params``, or None (the list path)."""
        from adaptlr.backends.fast import flat_safety, recommended_options

        if self.state_dtype is not None and any(p.dtype != self.state_dtype for p in params):
            return None
        if any(type(p.detach()) is not torch.Tensor or p.layout != torch.strided for p in params):
            return None  # tensor subclasses (DTensor, ...)
        if not flat_safety(self.opt)[0]:
            return None
        if self.fast == "auto":
            options = recommended_options(self.opt, [p.detach() for p in params])
            if options and "block_size" in options and not flat_safety(self.opt)[1]:
                # Blocks with sums need one buffer (FlatOptimizer); several: the list path, not
                # whole flat temporaries.
                group_of = self._group_of()
                if len({(id(group_of[id(p)]), p.dtype, p.device) for p in params}) > 1:
                    return None
            return options
        if self.fast == "flat":
            return {}
        if self.fast == "compile-flat":
            return {"compile": True}
        return dict(self.fast)

    def _build_flat(self, active: list, groups: list, signature: list, options: dict) -> _FlatPath:
        from adaptlr.backends.fast import FlatOptimizer

        fo = FlatOptimizer(self.opt, [p.detach() for p in active], groups=[id(g) for g in groups], **options)
        values = self._values(fo.per_tensor_state())
        per_param, shared = {}, {}
        for (path, is_per_param), value in zip(self._field_kinds, values):
            if is_per_param:
                per_param[path] = list(value)
            else:
                shared[path] = value
        # Blocked: one state per buffer, each with its own copy of the shared fields (the step counter).
        extra = []
        if fo.mode == "blocked":
            for bucket_state in fo.state[1:]:
                bucket_values = self._values(bucket_state)
                extra.append({path: v for (path, is_pp), v in zip(self._field_kinds, bucket_values) if not is_pp})
        flat = _FlatPath(fo, list(active), signature, per_param, shared, extra)
        kinds: dict = {}
        for g, p in zip(groups, active):
            key = (id(g), p.dtype, p.device)
            if key not in kinds:
                kinds[key] = len(flat.kinds)
                flat.kinds.append((g, p.dtype, p.device))
            flat.kind_of.append(kinds[key])
        self._copy_state_into(flat)
        return flat

    def _copy_state_into(self, flat: _FlatPath) -> None:
        """Copy the state (``self.state``, the shared fields) into the flat buffers and make
        ``self.state[p]`` and the shared fields the views into them."""
        sources = {path: self._global[path] for path in flat.shared}
        for i, p in enumerate(flat.params):
            entry = self.state[p]
            for path, views in flat.per_param.items():
                view, source = views[i], entry[path]
                if source is not view:
                    _copy_tree(view, source)
                    entry[path] = view
        for path, view in flat.shared.items():
            if sources[path] is not view:
                view.copy_(sources[path])
        for bucket in flat.extra:
            for path, view in bucket.items():
                view.copy_(sources[path])
        self._global = dict(flat.shared)

    def _drop_flat(self, keep: set) -> None:
        """Stop using the flat buffers; the state of parameters not in ``keep`` (ids) gets tensors of
        its own again (so the old buffers can be freed)."""
        flat, self._flat = self._flat, None
        if flat is None:
            return
        for i, p in enumerate(flat.params):
            entry = self.state.get(p)
            if id(p) in keep or entry is None:
                continue
            for path, views in flat.per_param.items():
                if entry.get(path) is views[i]:
                    entry[path] = _map_tensors(views[i], torch.clone)
        if self._global is not None:
            self._global = {path: t.clone() for path, t in self._global.items()}

    # -- the functional state -----------------------------------------------------------------------

    @property
    def functional_state(self) -> core.OptimizerState:
        """The :class:`adaptlr.OptimizerState` over the list of all parameters in group order
        (the live state tensors: later steps update them in place). Parameters that never had a
        gradient and do not require one get their initial state here."""
        self._ensure_state(everyone=True)
        return self._assemble(self._all_params())

    def set_functional_state(self, state: core.OptimizerState) -> None:
        """Replace the state by ``state`` (for example from :func:`adaptlr.load_state`), which must
        have exactly the structure, shapes and dtypes this optimizer's state has (else ValueError)."""
        params = self._all_params()
        layout, _ = Layout.of([self._state_view(p) for p in params])
        template = self._init_state(params)
        if not isinstance(state, core.OptimizerState):
            raise TypeError(f"state must be an adaptlr OptimizerState, got {type(state).__name__}")
        _checkpoint._check_against(state, template, layout, "state", "")
        if self._skeleton is None:
            self._set_skeleton(template, layout)
        device = params[0].device
        state = _map_tensors(state, lambda t: t.to(device=device, copy=True))
        self._scatter(state, params)
        for p in params:
            self.state[p]["step"] = self._global["count"]

    # -- torch's state_dict -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` plus ``"adaptlr"``: the format version, the optimizer's name,
        ``state_dtype`` and the shared fields. Each parameter's entry under ``"state"`` holds its
        per-parameter fields and, under ``"shared.<path>"``, the shared fields (the same tensors),
        so a copy that keeps only ``"state"`` and ``"param_groups"`` loads too. As with
        ``torch.optim``, the tensors are the live state (``torch.save`` it, or deep-copy it)."""
        out = super().state_dict()
        shared = {SHARED_PREFIX + path: t for path, t in (self._global or {}).items()}
        out["state"] = {i: {**entry, **shared} for i, entry in out["state"].items()}
        out["adaptlr"] = {
            "format_version": STATE_DICT_FORMAT,
            "optimizer": self.opt.name,
            "state_dtype": None if self.state_dtype is None else dtype_name(self.state_dtype),
            "global": dict(self._global) if self._global is not None else {},
            "schedule_free_eval_mode": self._eval_mode,
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` made by :meth:`state_dict` of an optimizer with the same algorithm,
        parameter groups and shapes (also one reduced to ``"state"`` and ``"param_groups"``, as
        ``torch.distributed.checkpoint`` gives it); the state keeps its saved values bit for bit
        (moved to the parameters' device). A mismatch raises ValueError and leaves this optimizer
        unchanged."""
        meta = state_dict.get("adaptlr")
        saved_state = state_dict.get("state", {})
        saved_groups = state_dict["param_groups"]
        indices = [i for g in saved_groups for i in g["params"]]
        with_state = [i for i in indices if i in saved_state]  # frozen parameters may have none
        has_shared = bool(with_state) and any(
            isinstance(k, str) and k.startswith(SHARED_PREFIX) for k in saved_state[with_state[0]])
        if meta is None and not has_shared:
            raise ValueError("state_dict was not made by adaptlr.backends.torch.Optimizer (no 'adaptlr' entry)")
        if meta is not None:
            _check_meta(meta, self.opt.name, self.state_dtype)
            eval_mode = bool(meta.get("schedule_free_eval_mode", False))
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("state_dict has param groups of other sizes than this optimizer's")
        for k, group in enumerate(saved_groups):
            torch_groups.check_group({**self.param_groups[k], **group}, self.opt.base, f"saved param_groups[{k}]")
        params = self._all_params()
        new_state = None
        if with_state:
            layout, _ = Layout.of([self._state_view(p) for p in params])
            template = self._init_state(params)
            skeleton, fields = split_state(template, layout.treespec)
            first = saved_state[with_state[0]]
            values = []
            for f in fields:
                if f.per_param:  # a parameter without saved state gets the initial one
                    try:
                        values.append([saved_state[i][f.path] if i in saved_state else f.value[k]
                                       for k, i in enumerate(indices)])
                    except KeyError:
                        raise ValueError(f"state_dict has no state field {f.path}") from None
                elif meta is not None and f.path in meta["global"]:
                    values.append(meta["global"][f.path])
                elif SHARED_PREFIX + f.path in first:
                    values.append(first[SHARED_PREFIX + f.path])
                else:
                    raise ValueError(f"state_dict has no shared state field {f.path}")
            known = {f.path if f.per_param else SHARED_PREFIX + f.path for f in fields} | {"step"}
            extra = set(first) - known
            if extra:
                raise ValueError(f"state_dict has state fields {sorted(extra)} this optimizer does not have")
            new_state = rebuild_state(skeleton, values)
            _checkpoint._check_against(new_state, template, layout, "state_dict", "")
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        self.state.clear()
        self._global = None
        if self._flat is not None:
            self._flat = None
        if new_state is not None:
            self.set_functional_state(new_state)
            for k, i in enumerate(indices):
                if i not in saved_state:
                    del self.state[params[k]]  # as saved: no state until its first gradient
            if all("step" in saved_state[i] for i in with_state):
                self._load_steps([saved_state[i]["step"] for i in with_state],
                                 [params[k] for k, i in enumerate(indices) if i in saved_state])
        else:
            self._ensure_state()
        if meta is not None:
            self._eval_mode = eval_mode  # the view the saved model holds

    def _load_steps(self, saved: list, params: list) -> None:
        """Per-parameter step counts from a state_dict; equal counts share one tensor (a host sync, once)."""
        count = self._global["count"]
        shared: dict[int, torch.Tensor] = {}
        for p, step in zip(params, saved):
            value = int(step)
            if value not in shared:
                shared[value] = torch.tensor(value, dtype=count.dtype, device=count.device)
            self.state[p]["step"] = shared[value]

    # -- internals ----------------------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _state_view(self, p: torch.Tensor, value: torch.Tensor | None = None, detach: bool = True) -> torch.Tensor:
        """``value`` (default: ``p``) detached (unless ``detach=False``), in the state dtype of ``p``."""
        x = p if value is None else value
        if detach:
            x = x.detach()
        dtype = self._dtype_of(p)
        return x if x.dtype == dtype else x.to(dtype)

    def _dtype_of(self, p: torch.Tensor) -> torch.dtype:
        if self.state_dtype is not None and p.is_floating_point():
            return self.state_dtype
        return p.dtype

    def _group_of(self) -> dict[int, dict]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _alphas(self, groups: list[dict], params: list, count: torch.Tensor) -> list:
        """``α`` per parameter for the step after ``count``: its group's ``lr`` (times the schedule's
        ``α_t``) as a 0-D tensor in the parameter's (state) dtype."""
        out, by_key, t = [], {}, None
        for group, p in zip(groups, params):
            key = (id(group), p.dtype, p.device)
            alpha = by_key.get(key)
            if alpha is None:
                if self._schedule is not None and t is None:
                    t = count + 1
                alpha = by_key[key] = self._alpha(group["lr"], p.dtype, p.device, t)
            out.append(alpha)
        return out

    def _alpha(self, lr: Any, dtype: torch.dtype, device: torch.device, t: torch.Tensor | None) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            base = lr.detach().to(dtype=dtype, device=device)
        elif torch.compiler.is_compiling():
            base = torch.tensor(float(lr), dtype=dtype, device=device)
        else:
            key = (float(lr), dtype, device)
            base = self._alpha_cache.get(key)
            if base is None:
                if len(self._alpha_cache) > 64:
                    self._alpha_cache.clear()
                base = self._alpha_cache[key] = torch.tensor(float(lr), dtype=dtype, device=device)
        if self._schedule is None:
            return base
        wide = widest_float(xp_torch, device)  # schedules see t in the widest float (adaptlr._precision)
        value = self._schedule(xp_torch.astype(t, wide))
        if not torch.compiler.is_compiling():
            _validation.check_scheduled_learning_rate(value, t)  # eager CPU values only: no device sync
        scheduled = xp_torch.astype(xp_torch.asarray(value, device=device), dtype)
        return scheduled if (not isinstance(lr, torch.Tensor) and float(lr) == 1.0) else scheduled * base

    def _init_state(self, params: list[torch.Tensor]) -> core.OptimizerState:
        """A fresh state for ``params`` (as ``opt.init`` with each group's ``lr`` as ``α``)."""
        views = [self._state_view(p) for p in params]
        layout = ListLayout(len(views))
        device = views[0].device
        count = torch.zeros((), dtype=counter_dtype(xp_torch, device), device=device)
        group_of = self._group_of()
        alpha = self._alphas([group_of[id(p)] for p in params], views, count)
        base_state = self.opt.base.init(views, layout, xp_torch)
        adaptations = tuple(a.init(views, alpha, layout, xp_torch) for a in self.opt.adaptations)
        return core.OptimizerState(count, list(alpha), base_state, adaptations)

    def _ensure_state(self, everyone: bool = False) -> None:
        """Initialise the state of parameters that have none and require or have a gradient (all of
        them with ``everyone``). Like ``torch.optim``, frozen parameters cost no state memory."""
        fresh = [p for p in self._all_params()
                 if p not in self.state and (everyone or p.requires_grad or p.grad is not None)]
        for p in fresh:  # library_of caches by type: fill it here, not inside a traced step (a guard)
            core.scalar_device(p)
        if fresh:
            state = self._init_state(fresh)
            if self._skeleton is None:
                self._set_skeleton(state, Layout.of([self._state_view(p) for p in fresh])[0])
            keep_global = self._global
            self._scatter(state, fresh)
            if keep_global is not None:
                self._global = keep_global
            never = torch.zeros_like(state.count)  # steps that updated the parameter (torch_steps)
            for p in fresh:
                self.state[p]["step"] = never

    def _set_skeleton(self, state: core.OptimizerState, layout: Layout) -> None:
        skeleton, fields = split_state(state, layout.treespec)
        self._skeleton = skeleton
        self._field_kinds = [(f.path, f.per_param) for f in fields]
        from adaptlr.hypergradient import Hypergradient

        rates = {f"adaptations[{i}].lr" for i, a in enumerate(self.opt.adaptations) if isinstance(a, Hypergradient)}
        self._hd_fields = [(path, per_param) for path, per_param in self._field_kinds if path in rates]

    def _assemble(self, params: list[torch.Tensor]) -> core.OptimizerState:
        values = []
        for path, per_param in self._field_kinds:
            values.append([self.state[p][path] for p in params] if per_param else self._global[path])
        return rebuild_state(self._skeleton, values)

    def _scatter(self, state: core.OptimizerState, params: list[torch.Tensor]) -> None:
        """Make ``state`` (over ``params``) the state of ``params``; every tensor with elements gets its
        own storage (later steps write into it), none shared with a parameter or gradient."""
        values = self._values(state)
        taken = {_storage(p) for p in params} | {_storage(p.grad) for p in params if p.grad is not None}
        taken.discard(None)
        seen: set[int] = set()

        def own(t: torch.Tensor) -> torch.Tensor:
            if t.ndim and (id(t) in seen or _storage(t) in taken):
                t = t.clone()
            seen.add(id(t))
            return t

        new_global = {}
        for (path, per_param), value in zip(self._field_kinds, values):
            if per_param:
                for p, slot in zip(params, value):
                    self.state[p][path] = _map_tensors(slot, lambda t, p=p: own(_placed_like(t, p)))
            else:
                new_global[path] = value
        self._global = new_global
        self._flat_stale = True


class _RowBlocks:
    """A part of the list step: parameter ``index`` (of the step's active list) in blocks of its rows."""

    __slots__ = ("blocks", "index")

    def __init__(self, index: int, blocks: list[slice]) -> None:
        self.index = index
        self.blocks = blocks


class _FlatPath:
    """A :class:`~adaptlr.backends.fast.FlatOptimizer` over the parameters that have gradients, with
    the views of its state in the per-parameter layout of ``Optimizer.state``."""

    __slots__ = ("extra", "fo", "kind_of", "kinds", "params", "per_param", "shared", "signature")

    def __init__(self, fo: Any, params: list, signature: list, per_param: dict, shared: dict, extra: list) -> None:
        self.fo = fo
        self.params = params
        self.signature = signature
        self.per_param = per_param  # path -> one slot (view) per parameter
        self.shared = shared  # path -> the 0-D tensor of a shared field
        self.extra = extra  # blocked: the shared fields of the other buffers' states
        self.kinds: list[tuple] = []  # (group, dtype, device) of the parameters, each once
        self.kind_of: list[int] = []  # per parameter: its index in kinds


def _elements_or_none(name: str, elements: Any) -> int | None:
    """``elements`` checked as a budget of elements: None or an int >= 1."""
    if elements is not None and (isinstance(elements, bool) or not isinstance(elements, int) or elements < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {elements!r}")
    return elements


def _check_grads(active: list, groups: list, where: list) -> None:
    """Sparse gradients (and other layouts) are rejected, naming the parameter."""
    for p, group, (g, i) in zip(active, groups, where):
        grad = p.grad
        if grad.is_sparse or grad.layout != torch.strided:
            names = group.get("param_names")
            name = f"{names[i]!r} " if names is not None and i < len(names) else ""
            raise RuntimeError(
                f"parameter {name}(param_groups[{g}]['params'][{i}], shape {tuple(p.shape)}) has a "
                f"{grad.layout} gradient; adaptlr optimizers support dense (strided) gradients only "
                "(use a dense embedding, sparse=False)"
            )


def _check_no_global_sums(opt: core.Optimizer) -> None:
    from adaptlr.backends.fast import flat_safety

    flat, blockwise, reason = flat_safety(opt)
    if flat and not blockwise:
        raise ValueError(
            f"param groups with different base hyper-parameters (betas, eps, momentum, ...) need one update per "
            f"group, but {opt.name} sums over all parameters ({reason}); give every group the same values"
        )


def _check_meta(meta: dict, name: str, state_dtype: torch.dtype | None) -> None:
    if meta.get("format_version") != STATE_DICT_FORMAT:
        raise ValueError(f"state_dict has format version {meta.get('format_version')}, expected {STATE_DICT_FORMAT}")
    if meta.get("optimizer") != name:
        raise ValueError(f"state_dict holds a state of {meta.get('optimizer')}, not of {name}")
    saved_dtype = meta.get("state_dtype")
    if saved_dtype != (None if state_dtype is None else dtype_name(state_dtype)):
        raise ValueError(f"state_dict was saved with state_dtype={saved_dtype}, this optimizer has {state_dtype}")


def _read_before_write(old_values: list, new_values: list) -> list:
    """``new_values`` with every tensor that is an old tensor of another field copied (it would be
    overwritten before it is read)."""
    import optree

    position = {}
    for k, old in enumerate(old_values):
        for t in optree.tree_leaves(old):
            position[id(t)] = k
    out = []
    for k, new in enumerate(new_values):
        if any(position.get(id(t), k) != k for t in optree.tree_leaves(new)):
            new = _map_tensors(new, lambda t, k=k: t.clone() if position.get(id(t), k) != k else t)
        out.append(new)
    return out


def _placed_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A plain state tensor ``t`` of a DTensor parameter ``p`` as a DTensor on ``p``'s mesh: sharded
    where ``t`` spans ``p``'s sharded axis, else replicated (DSA's row and column factors). State made
    from ``p`` (``zeros_like``) is a DTensor already; 0-D tensors stay plain (DTensor takes them as
    replicated scalars)."""
    if t.ndim == 0 or not _is_dtensor(p) or _is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = [placement if isinstance(placement, Shard) and t.ndim == p.ndim
                  and t.shape[placement.dim] == p.shape[placement.dim] else Replicate()
                  for placement in p.placements]
    return distribute_tensor(t, p.device_mesh, placements)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _storage(t: torch.Tensor) -> int | None:
    """The address of the storage of a plain tensor (None for tensor subclasses such as DTensor)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
        return None
    return t.untyped_storage().data_ptr()


def _copy_tree(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    import optree

    for d, s in zip(optree.tree_leaves(dst), optree.tree_leaves(src)):
        d.copy_(s)


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    import optree

    return optree.tree_map(fn, tree)
