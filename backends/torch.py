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
  never written into ``group["lr"]``. Groups may override ``lr`` and ``weight_decay``; the defaults
  are the wrapped optimizer's ``learning_rate`` and ``weight_decay``. When the wrapped optimizer's
  learning rate is a schedule ``t ↦ α_t``, ``group["lr"]`` defaults to 1.0 and multiplies it
  (``α = group["lr"] · α_t``), so torch schedulers still compose with it.
- The state is adaptlr's functional state: per-parameter fields in ``optimizer.state[p]`` (keyed by
  their path in the state, ``"base.mu"``, ``"adaptations[0].gamma"``), the fields shared by all
  parameters (the step counter, AutoDrop's angle) in ``state_dict()["adaptlr"]["global"]``.
  :attr:`Optimizer.functional_state` assembles the :class:`adaptlr.OptimizerState` (over the list of
  parameters in group order) for :func:`adaptlr.learning_rates`, :func:`adaptlr.lr_summary` and
  :func:`adaptlr.save_state`.
- A parameter whose ``.grad`` is None is skipped for that step: the step runs on the parameters
  that have gradients, with their slices of every per-parameter field and the shared fields. The
  step counter ``t`` is global and still advances. For ActiveLR, a skipped parameter adds nothing
  to its epoch sum ``C`` that step and, if it is skipped at an epoch's last step, misses that epoch
  boundary (its γ is not adjusted and its ``C`` carries over into the next epoch). For AutoDrop, the
  angle ω at an epoch start is taken over the parameters that have gradients at that step (and
  their stored ``x_{e-1}``), so keep the set of trained parameters fixed across epoch starts.
  Global sums of other adaptations (HD and EG with global granularity) likewise cover only the
  parameters with gradients.
- Mixed precision: by default the state has each parameter's dtype (as in ``torch.optim``). With
  ``state_dtype=torch.float32``, parameters of another floating dtype (bfloat16, float16) get
  float32 state: their gradient and value are upcast for the update, and ``p.add_(u)`` rounds
  ``p + u`` once to the parameter's dtype. Updates smaller than the parameter's resolution are then
  lost, as with any low-precision parameter; keep float32 master weights (autocast) where that
  matters.
- Fast path (``fast="auto"``, the default): where :func:`adaptlr.backends.fast.recommended_options`
  finds one for the algorithm and the parameters (blocks of flat buffers for elementwise algorithms
  on CPU, whole flat buffers on a GPU; ``fast="compile"`` adds ``torch.compile``), the step runs the
  same ``update_leaves`` through a :class:`~adaptlr.backends.fast.FlatOptimizer` over the parameters
  that have gradients. Their ``.data`` then points into one flat buffer per dtype, device and group,
  their ``.grad`` (after a step) into a flat gradient buffer, and ``optimizer.state[p]`` holds views
  into the flat state buffers, all updated in place (as ``torch.optim`` does); the values are those
  of the generic per-tensor path (same elementwise operations; global sums reassociated). A change
  of the set of parameters with gradients (or of a parameter's ``.data``) rebuilds the flat buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import array_api_compat.torch as xp_torch
import torch
from torch.autograd.graph import increment_version

from adaptlr import checkpoint as _checkpoint
from adaptlr import core
from adaptlr._precision import counter_dtype, widest_float
from adaptlr._state_tree import Node, dtype_name, field_values, from_slots, rebuild_state, slots, split_state
from adaptlr._tree import Layout

__all__ = ["Optimizer"]

STATE_DICT_FORMAT = 1
_FAST_MODES = ("auto", "flat", "compile")


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs the adaptlr optimizer ``opt``.

    Args:
        params: parameters or param groups, as for any torch optimizer; a group may set ``lr`` and
            ``weight_decay``.
        opt: an adaptlr optimizer (``adaptlr.adamw(1e-3)``, ``adaptlr.active(...)``, ...). Its other
            hyper-parameters apply to every group.
        state_dtype: None (state in each parameter's dtype) or a floating torch dtype for the state
            of parameters of other floating dtypes (mixed precision; see the module docstring).
        fast: how the step runs (same values in every case; see the module docstring):

            - ``"auto"`` (default, also ``True``): through a
              :class:`~adaptlr.backends.fast.FlatOptimizer` with the options
              :func:`~adaptlr.backends.fast.recommended_options` gives (CPU: blocks of flat
              buffers for elementwise algorithms; GPU: whole flat buffers for every flat-safe
              algorithm), else the generic per-tensor path.
            - ``"flat"``: whole flat buffers for every flat-safe algorithm (also AutoDrop, HD and
              EG with global sums on CPU).
            - ``"compile"``: flat buffers and ``torch.compile`` of the flat step (fastest on CPU
              and GPU once compiled; the first step compiles, seconds; needs a working Inductor
              toolchain).
            - a dict: :class:`~adaptlr.backends.fast.FlatOptimizer` options (``{"block_size": 65536}``).
            - ``False`` / ``None``: always the generic per-tensor path (parameters keep their own
              storage, state tensors are new tensors each step).

            Algorithms that are not flat-safe (per-tensor reductions: DSA's default factors, HD
            ``granularity="tensor"``, EG ``scale="tensor"``) and parameters whose state dtype
            differs from their dtype (``state_dtype``) always take the generic path.

    Attributes:
        fast_path: the path of the last step: ``"blocked"``, ``"flat"``, ``"compiled"`` (a
            ``FlatOptimizer`` mode) or ``"generic"``; None before the first step.
    """

    def __init__(
        self, params: Iterable[Any], opt: core.Optimizer, *, state_dtype: torch.dtype | None = None,
        fast: str | bool | dict | None = "auto",
    ) -> None:
        if not isinstance(opt, core.Optimizer):
            raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be None or a floating torch dtype, got {state_dtype!r}")
        learning_rate = opt.base.learning_rate
        self.opt = opt
        self.state_dtype = state_dtype
        self._flat: _FlatPath | None = None
        self.fast = fast
        self.fast_path: str | None = None
        self._schedule: Callable[[Any], Any] | None = learning_rate if callable(learning_rate) else None
        self._skeleton: Node | None = None
        self._per_param_paths: list[str] = []
        self._field_kinds: list[tuple[str, bool]] = []
        self._global: dict[str, torch.Tensor] | None = None
        self._alpha_cache: dict = {}
        self._flat_stale = False  # the state was replaced: copy it into the flat buffers before a fast step
        self._ensured: tuple | None = None  # (id, size) of the state and number of parameters when all had state
        defaults = {
            "lr": 1.0 if self._schedule is not None else float(learning_rate),
            "weight_decay": float(opt.base.weight_decay),
        }
        super().__init__(params, defaults)

    def __repr__(self) -> str:
        return f"adaptlr.backends.torch.Optimizer({self.opt.name}, {len(self.param_groups)} param groups)"

    @property
    def fast(self) -> str | dict | None:
        """The ``fast`` setting (``"auto"``, ``"flat"``, ``"compile"``, a dict or None). It may be changed
        between steps: the state carries over, and the parameters get their own storage back until
        the next fast step."""
        return self._fast

    @fast.setter
    def fast(self, fast: str | bool | dict | None) -> None:
        if fast is True:
            fast = "auto"
        if not (fast is None or fast is False or isinstance(fast, dict) or fast in _FAST_MODES):
            raise ValueError(f"fast must be one of {_FAST_MODES}, True, False, None or a dict, got {fast!r}")
        self._fast = dict(fast) if isinstance(fast, dict) else (fast or None)
        self._generic_signature = None
        if self._flat is not None:
            self._drop_flat(())

    # -- the step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active, grads, groups, signature, num_params = [], [], [], [], 0
        for group in self.param_groups:
            signature.append(id(group))
            group_params = group["params"]
            num_params += len(group_params)
            for p in group_params:
                grad = p.grad
                if grad is not None:
                    active.append(p)
                    grads.append(grad)
                    groups.append(group)
                    signature.append(id(p))
        known = (id(self.state), len(self.state), num_params)
        if known != self._ensured:  # parameters without state (before the first step, new groups)
            self._ensure_state()
            self._ensured = (id(self.state), len(self.state), num_params)
        if not active:
            return loss
        if self.fast is not None and self._flat_step(active, grads, groups, signature):
            self.fast_path = self._flat.fo.mode
            return loss
        _check_dense(grads)
        self._ensure_state()
        self.fast_path = "generic"
        params = [self._state_view(p) for p in active]
        grads = [self._state_view(p, p.grad) for p in active]
        layout, _ = Layout.of(params)
        state = self._assemble(active, layout)
        alpha = self._alphas(groups, params, state.count)
        weight_decay = [float(g["weight_decay"]) for g in groups]
        updates, new_state = self._update(xp_torch, layout, grads, state, params, alpha, weight_decay)
        self._scatter(new_state, active, layout)
        for p, u in zip(active, updates):
            p.add_(u)
        return loss

    def _update(
        self, xp: Any, layout: Layout, grads: list, state: core.OptimizerState, params: list, alpha: list,
        weight_decay: list,
    ) -> tuple[list, core.OptimizerState]:
        """``(updates, new state)`` on leaf lists: the one place the generic path runs the algorithm
        (the fast path runs the same ``update_leaves`` on flat buffers)."""
        return self.opt.update_leaves(xp, layout, grads, state, params, alpha=alpha, weight_decay=weight_decay)

    # -- the fast path ------------------------------------------------------------------------------

    def _flat_step(self, active: list, grads: list, groups: list, signature: list) -> bool:
        """Run this step through the flat buffers; False where it must take the generic path."""
        flat = self._flat
        if flat is None or flat.signature != signature or [p.data_ptr() for p in active] != flat.data_ptrs:
            if signature == self._generic_signature:
                return False
            self._ensure_state()
            options = self._flat_options(active)
            if options is None:
                self._drop_flat(())
                self._generic_signature = signature
                return False
            self._drop_flat({id(p) for p in active})
            flat = self._flat = self._build_flat(active, groups, signature, options)
            self._generic_signature = None
        elif self._flat_stale:
            self._copy_state_into(flat)
        # Gradients that are not the flat buffer's views are copied into it: check them first.
        _check_dense([g for g, view in zip(grads, flat.fo.grads) if g is not view])
        self._flat_stale = False
        # α and λ per (group, dtype, device) of the step, spread to the parameters.
        t = self._global["count"] + 1 if self._schedule is not None else None
        alphas = [self._alpha(g["lr"], dtype, device, t) for g, dtype, device in flat.kinds]
        decays = [float(g["weight_decay"]) for g, _, _ in flat.kinds]
        flat.fo.step(grads, alpha=[alphas[k] for k in flat.kind_of], weight_decay=[decays[k] for k in flat.kind_of])
        # Later backward passes accumulate straight into the flat gradient buffer (``zero_grad()``
        # sets .grad to None; a fresh gradient is copied in at the next step).
        for p, grad, view in zip(active, grads, flat.fo.grads):
            if grad is not view:
                p.grad = view
        _bump_versions(active)  # as p.add_ would: autograd sees that the parameters changed in place
        return True

    def _flat_options(self, params: list[torch.Tensor]) -> dict | None:
        """The FlatOptimizer options for a step on ``params``, or None (the generic path)."""
        from adaptlr.backends.fast import flat_safety, recommended_options

        if self.state_dtype is not None and any(p.dtype != self.state_dtype for p in params):
            return None
        if any(type(p.detach()) is not torch.Tensor or p.layout != torch.strided for p in params):
            return None  # tensor subclasses (DTensor, ...) keep their own storage
        if not flat_safety(self.opt)[0]:
            return None
        if self.fast == "auto":
            return recommended_options(self.opt, [p.detach() for p in params])
        if self.fast == "flat":
            return {}
        if self.fast == "compile":
            return {"compile": True}
        return dict(self.fast)

    def _build_flat(self, active: list, groups: list, signature: list, options: dict) -> _FlatPath:
        from adaptlr.backends.fast import FlatOptimizer

        fo = FlatOptimizer(self.opt, [p.detach() for p in active], groups=[id(g) for g in groups], **options)
        values = field_values(self._skeleton, fo.per_tensor_state(), len(self._field_kinds))
        treespec = Layout.of(fo.params)[0].treespec
        per_param, shared = {}, {}
        for (path, is_per_param), value in zip(self._field_kinds, values):
            if is_per_param:
                per_param[path] = slots(value, treespec)
            else:
                shared[path] = value
        # Blocked: one state per buffer, each with its own copy of the shared fields (the step counter).
        extra = []
        if fo.mode == "blocked":
            for bucket_state in fo.state[1:]:
                bucket_values = field_values(self._skeleton, bucket_state, len(self._field_kinds))
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
        for p, view in zip(active, fo.params):
            p.data = view
        flat.data_ptrs = [p.data_ptr() for p in active]
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
        """Stop using the flat buffers; parameters not in ``keep`` (ids), and their gradient and
        state, get storage of their own again (so the old buffers can be freed)."""
        flat, self._flat = self._flat, None
        if flat is None:
            return
        fo = flat.fo
        for i, p in enumerate(flat.params):
            if id(p) in keep:
                continue
            if p.data_ptr() == fo.params[i].data_ptr():
                p.data = p.data.clone()
            if p.grad is not None and p.grad is fo.grads[i]:
                p.grad = p.grad.clone()
            entry = self.state.get(p)
            if entry is None:
                continue
            for path, views in flat.per_param.items():
                if entry.get(path) is views[i]:
                    entry[path] = _map_tensors(views[i], torch.clone)

    # -- the functional state -----------------------------------------------------------------------

    @property
    def functional_state(self) -> core.OptimizerState:
        """The :class:`adaptlr.OptimizerState` over the list of all parameters in group order
        (the live state tensors: later steps may update them in place)."""
        self._ensure_state()
        params = self._all_params()
        layout, _ = Layout.of([self._state_view(p) for p in params])
        return self._assemble(params, layout)

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
        self._scatter(state, params, layout)

    # -- torch's state_dict -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` (per-parameter fields under ``"state"``) plus ``"adaptlr"``: the format
        version, the optimizer's name, ``state_dtype`` and the shared fields. As with ``torch.optim``,
        the tensors are the live state (``torch.save`` it, or deep-copy it to keep a snapshot)."""
        out = super().state_dict()
        out["adaptlr"] = {
            "format_version": STATE_DICT_FORMAT,
            "optimizer": self.opt.name,
            "state_dtype": None if self.state_dtype is None else dtype_name(self.state_dtype),
            "global": dict(self._global) if self._global is not None else {},
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` made by :meth:`state_dict` of an optimizer with the same algorithm,
        parameter groups and shapes; the state keeps its saved values bit for bit (moved to the
        parameters' device). A mismatch raises ValueError and leaves this optimizer unchanged."""
        meta = state_dict.get("adaptlr")
        if meta is None:
            raise ValueError("state_dict was not made by adaptlr.backends.torch.Optimizer (no 'adaptlr' entry)")
        if meta.get("format_version") != STATE_DICT_FORMAT:
            raise ValueError(
                f"state_dict has format version {meta.get('format_version')}, expected {STATE_DICT_FORMAT}"
            )
        if meta.get("optimizer") != self.opt.name:
            raise ValueError(f"state_dict holds a state of {meta.get('optimizer')}, not of {self.opt.name}")
        saved_dtype = meta.get("state_dtype")
        if saved_dtype != (None if self.state_dtype is None else dtype_name(self.state_dtype)):
            raise ValueError(
                f"state_dict was saved with state_dtype={saved_dtype}, this optimizer has {self.state_dtype}"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved_groups, self.param_groups)
        ):
            raise ValueError("state_dict has param groups of other sizes than this optimizer's")
        indices = [i for g in saved_groups for i in g["params"]]
        saved_state = state_dict["state"]
        params = self._all_params()
        new_state = None
        if saved_state or meta["global"]:
            missing = [i for i in indices if i not in saved_state]
            if missing:
                raise ValueError(f"state_dict has no state for parameter index {missing[0]}")
            layout, _ = Layout.of([self._state_view(p) for p in params])
            template = self._init_state(params)
            skeleton, fields = split_state(template, layout.treespec)
            values = []
            for f in fields:
                if f.per_param:
                    try:
                        values.append(from_slots([saved_state[i][f.path] for i in indices], layout.treespec))
                    except KeyError:
                        raise ValueError(f"state_dict has no state field {f.path}") from None
                else:
                    if f.path not in meta["global"]:
                        raise ValueError(f"state_dict has no shared state field {f.path}")
                    values.append(meta["global"][f.path])
            extra = set(saved_state[indices[0]]) - {f.path for f in fields if f.per_param}
            if extra:
                raise ValueError(f"state_dict has state fields {sorted(extra)} this optimizer does not have")
            new_state = rebuild_state(skeleton, values)
            _checkpoint._check_against(new_state, template, layout, "state_dict", "")
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        self.state.clear()
        self._global = None
        if new_state is not None:
            self.set_functional_state(new_state)

    # -- internals ----------------------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _state_view(self, p: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        """``value`` (default: ``p``) detached, in the state dtype of ``p``."""
        x = (p if value is None else value).detach()
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
        scheduled = xp_torch.astype(xp_torch.asarray(self._schedule(xp_torch.astype(t, wide)), device=device), dtype)
        return scheduled if (not isinstance(lr, torch.Tensor) and float(lr) == 1.0) else scheduled * base

    def _init_state(self, params: list[torch.Tensor]) -> core.OptimizerState:
        """A fresh state for ``params`` (as ``opt.init`` with each group's ``lr`` as ``α``)."""
        views = [self._state_view(p) for p in params]
        layout, leaves = Layout.of(views)
        device = leaves[0].device
        count = torch.zeros((), dtype=counter_dtype(xp_torch, device), device=device)
        group_of = self._group_of()
        alpha = self._alphas([group_of[id(p)] for p in params], leaves, count)
        base_state = self.opt.base.init(leaves, layout, xp_torch)
        adaptations = tuple(a.init(leaves, alpha, layout, xp_torch) for a in self.opt.adaptations)
        return core.OptimizerState(count, layout.tree(alpha), base_state, adaptations)

    def _ensure_state(self) -> None:
        """Initialise the state of parameters that have none (all of them before the first step)."""
        fresh = [p for p in self._all_params() if p not in self.state]
        if not fresh:
            return
        layout, _ = Layout.of([self._state_view(p) for p in fresh])
        state = self._init_state(fresh)
        if self._skeleton is None:
            self._set_skeleton(state, layout)
        keep_global = self._global
        self._scatter(state, fresh, layout)
        if keep_global is not None:
            self._global = keep_global

    def _set_skeleton(self, state: core.OptimizerState, layout: Layout) -> None:
        skeleton, fields = split_state(state, layout.treespec)
        self._skeleton = skeleton
        self._field_kinds = [(f.path, f.per_param) for f in fields]

    def _assemble(self, params: list[torch.Tensor], layout: Layout) -> core.OptimizerState:
        values = []
        for path, per_param in self._field_kinds:
            if per_param:
                values.append(from_slots([self.state[p][path] for p in params], layout.treespec))
            else:
                values.append(self._global[path])
        return rebuild_state(self._skeleton, values)

    def _scatter(self, state: core.OptimizerState, params: list[torch.Tensor], layout: Layout) -> None:
        # The fields by the skeleton found at the first step (split_state per step would format the
        # whole state into error messages of optree while it probes for per-parameter subtrees).
        values = field_values(self._skeleton, state, len(self._field_kinds))
        # The functional update may keep a parameter or gradient itself in its state (HD's d_prev = g
        # for SGD): copy those, since the parameter is updated in place and the gradient reused.
        shared = {p.untyped_storage().data_ptr() for p in params}
        shared |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        new_global = {}
        for (path, per_param), value in zip(self._field_kinds, values):
            if per_param:
                for p, slot in zip(params, slots(value, layout.treespec)):
                    self.state[p][path] = (_unshared(slot, shared) if isinstance(slot, torch.Tensor)
                                           else _map_tensors(slot, lambda t: _unshared(t, shared)))
            else:
                new_global[path] = _unshared(value, shared)
        self._global = new_global
        self._flat_stale = True


class _FlatPath:
    """A :class:`~adaptlr.backends.fast.FlatOptimizer` over the parameters that have gradients, with
    the views of its state in the per-parameter layout of ``Optimizer.state``."""

    __slots__ = ("data_ptrs", "extra", "fo", "kind_of", "kinds", "params", "per_param", "shared", "signature")

    def __init__(self, fo: Any, params: list, signature: list, per_param: dict, shared: dict, extra: list) -> None:
        self.fo = fo
        self.params = params
        self.signature = signature
        self.per_param = per_param  # path -> one slot (view) per parameter
        self.shared = shared  # path -> the 0-D tensor of a shared field
        self.extra = extra  # blocked: the shared fields of the other buffers' states
        self.data_ptrs: list[int] = []
        self.kinds: list[tuple] = []  # (group, dtype, device) of the parameters, each once
        self.kind_of: list[int] = []  # per parameter: its index in kinds


def _bump_versions(params: list) -> None:
    """Mark ``params`` modified in place (the flat step writes through the buffer, not through them)."""
    try:
        increment_version(params)
    except TypeError:  # torch < 2.5 takes one tensor
        for p in params:
            increment_version(p)


def _check_dense(grads: list) -> None:
    for grad in grads:
        if grad.is_sparse:
            raise RuntimeError("adaptlr optimizers do not support sparse gradients")


def _copy_tree(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    import optree

    for d, s in zip(optree.tree_leaves(dst), optree.tree_leaves(src)):
        d.copy_(s)


def _unshared(t: torch.Tensor, storages: set) -> torch.Tensor:
    return t.clone() if t.untyped_storage().data_ptr() in storages else t


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    import optree

    return optree.tree_map(fn, tree)
