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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import array_api_compat.torch as xp_torch
import torch

from adaptlr import checkpoint as _checkpoint
from adaptlr import core
from adaptlr._state_tree import Node, dtype_name, from_slots, rebuild_state, slots, split_state
from adaptlr._tree import Layout

__all__ = ["Optimizer"]

STATE_DICT_FORMAT = 1


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs the adaptlr optimizer ``opt``.

    Args:
        params: parameters or param groups, as for any torch optimizer; a group may set ``lr`` and
            ``weight_decay``.
        opt: an adaptlr optimizer (``adaptlr.adamw(1e-3)``, ``adaptlr.active(...)``, ...). Its other
            hyper-parameters apply to every group.
        state_dtype: None (state in each parameter's dtype) or a floating torch dtype for the state
            of parameters of other floating dtypes (mixed precision; see the module docstring).
    """

    def __init__(self, params: Iterable[Any], opt: core.Optimizer, *, state_dtype: torch.dtype | None = None) -> None:
        if not isinstance(opt, core.Optimizer):
            raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be None or a floating torch dtype, got {state_dtype!r}")
        learning_rate = opt.base.learning_rate
        self.opt = opt
        self.state_dtype = state_dtype
        self._schedule: Callable[[Any], Any] | None = learning_rate if callable(learning_rate) else None
        self._skeleton: Node | None = None
        self._per_param_paths: list[str] = []
        self._field_kinds: list[tuple[str, bool]] = []
        self._global: dict[str, torch.Tensor] | None = None
        self._alpha_cache: dict = {}
        defaults = {
            "lr": 1.0 if self._schedule is not None else float(learning_rate),
            "weight_decay": float(opt.base.weight_decay),
        }
        super().__init__(params, defaults)

    def __repr__(self) -> str:
        return f"adaptlr.backends.torch.Optimizer({self.opt.name}, {len(self.param_groups)} param groups)"

    # -- the step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_state()
        active, groups = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("adaptlr optimizers do not support sparse gradients")
                    active.append(p)
                    groups.append(group)
        if not active:
            return loss
        params = [self._state_view(p) for p in active]
        grads = [self._state_view(p, p.grad) for p in active]
        layout, _ = Layout.of(params)
        state = self._assemble(active, layout)
        alpha = self._alphas(groups, params, state.count + 1)
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
        """``(updates, new state)`` on leaf lists: the one place the algorithm runs (a fast path may
        replace this method; it must return the same values)."""
        return self.opt.update_leaves(xp, layout, grads, state, params, alpha=alpha, weight_decay=weight_decay)

    # -- the functional state -----------------------------------------------------------------------

    @property
    def functional_state(self) -> core.OptimizerState:
        """The :class:`adaptlr.OptimizerState` over the list of all parameters in group order."""
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
        version, the optimizer's name, ``state_dtype`` and the shared fields."""
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

    def _alphas(self, groups: list[dict], params: list, t: torch.Tensor) -> list:
        """``α`` per parameter: its group's ``lr`` (times the schedule's ``α_t``) as a 0-D tensor."""
        out, by_key = [], {}
        for group, p in zip(groups, params):
            lr = group["lr"]
            key = (id(group), p.dtype, p.device)
            if key not in by_key:
                by_key[key] = self._alpha(lr, p.dtype, p.device, t)
            out.append(by_key[key])
        return out

    def _alpha(self, lr: Any, dtype: torch.dtype, device: torch.device, t: torch.Tensor) -> torch.Tensor:
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
        scheduled = xp_torch.astype(xp_torch.asarray(self._schedule(xp_torch.astype(t, dtype)), device=device), dtype)
        return scheduled if (not isinstance(lr, torch.Tensor) and float(lr) == 1.0) else scheduled * base

    def _init_state(self, params: list[torch.Tensor]) -> core.OptimizerState:
        """A fresh state for ``params`` (as ``opt.init`` with each group's ``lr`` as ``α``)."""
        views = [self._state_view(p) for p in params]
        layout, leaves = Layout.of(views)
        device = leaves[0].device
        count = torch.zeros((), dtype=torch.int32, device=device)
        group_of = self._group_of()
        alpha = self._alphas([group_of[id(p)] for p in params], leaves, count + 1)
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
        _, fields = split_state(state, layout.treespec)
        if [(f.path, f.per_param) for f in fields] != self._field_kinds:
            raise RuntimeError(f"{self.opt.name} changed the layout of its state during a step")
        # The functional update may keep a parameter or gradient itself in its state (HD's d_prev = g
        # for SGD): copy those, since the parameter is updated in place and the gradient reused.
        shared = {p.untyped_storage().data_ptr() for p in params}
        shared |= {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
        new_global = {}
        for f in fields:
            if f.per_param:
                for p, slot in zip(params, slots(f.value, layout.treespec)):
                    self.state[p][f.path] = _map_tensors(slot, lambda t: _unshared(t, shared))
            else:
                new_global[f.path] = _unshared(f.value, shared)
        self._global = new_global


def _unshared(t: torch.Tensor, storages: set) -> torch.Tensor:
    return t.clone() if t.untyped_storage().data_ptr() in storages else t


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    import optree

    return optree.tree_map(fn, tree)
