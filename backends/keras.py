"""``adaptlr.backends.keras.Optimizer(opt)``: any adaptlr optimizer as a Keras 3 optimizer.

::

    os.environ["KERAS_BACKEND"] = "jax"   # or "torch" (before importing keras)
    opt = adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=steps)
    model.compile(optimizer=adaptlr.backends.keras.Optimizer(opt), loss="mse")
    model.fit(x, y, batch_size=32, epochs=10)
    model.save("model.keras")
    model = keras.saving.load_model("model.keras", custom_objects=adaptlr.backends.keras.custom_objects(opt))

How the Keras concepts map onto adaptlr's (spec §0.1, ``u = -(α·κ) ⊙ d - α·λ·θ``):

- The step runs on the whole list of trainable variables at once (adaptlr's global sums and its
  shared step counter need all of them), from Keras' ``_backend_update_step`` hook: after Keras'
  own gradient clipping (``clipnorm``, ``global_clipnorm``, ``clipvalue``), loss-scale division and
  gradient accumulation, and before its EMA, all of which keep working. On the JAX backend it is
  traced into the jitted ``train_step`` (through ``stateless_apply``); on the torch backend it runs
  eagerly under ``torch.no_grad()``.
- ``optimizer.learning_rate`` (a Keras variable) is the user's ``α``, as ``param_groups[i]["lr"]``
  is for the torch adapter: it starts at the wrapped optimizer's learning rate and Keras callbacks
  that set it (``LearningRateScheduler``, ``ReduceLROnPlateau``) change ``α`` for the following
  steps. When the wrapped optimizer's learning rate is a schedule ``t ↦ α_t``, it starts at 1.0 and
  multiplies it (``α = learning_rate · α_t``). A Keras ``LearningRateSchedule`` is not accepted:
  give adaptlr the schedule instead. The adaptation multiplier ``κ`` lives in the state.
- Weight decay is the wrapped optimizer's (``adaptlr.adamw(1e-3, weight_decay=1e-2)``); Keras'
  ``weight_decay=`` is rejected, so the decay is not applied twice.
- The state is adaptlr's functional :class:`adaptlr.OptimizerState` for the list of trainable
  variables, one Keras variable per array (named after its path in the state, ``base.mu[0]``,
  ``adaptations[0].gamma[1]``), after Keras' own ``iteration`` and ``learning_rate`` variables. So
  ``model.save`` / ``keras.saving.load_model`` and ``model.save_weights`` / ``load_weights`` save
  and restore it with the model; :attr:`Optimizer.functional_state` assembles the state for
  :func:`adaptlr.learning_rates`, :func:`adaptlr.lr_summary` and :func:`adaptlr.save_state`.
- Loading a ``.keras`` file needs the adaptlr optimizer, which is Python code and not part of the
  saved config: pass ``custom_objects=adaptlr.backends.keras.custom_objects(opt)``. The saved config
  records ``opt.name`` and loading checks it.
- Every trainable variable must get a gradient at every step (Keras drops variables whose gradient
  is None; the step then raises). The TensorFlow backend is not supported: adaptlr runs on
  array-API arrays, and TensorFlow tensors are not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import array_api_compat
import keras
import optree

from adaptlr import core
from adaptlr._precision import next_count, widest_float
from adaptlr._tree import Layout

__all__ = ["Optimizer", "custom_objects"]

_BACKENDS = ("jax", "torch")


class Optimizer(keras.optimizers.Optimizer):
    """A ``keras.optimizers.Optimizer`` that runs the adaptlr optimizer ``opt``.

    Args:
        opt: an adaptlr optimizer (``adaptlr.adamw(1e-3)``, ``adaptlr.active(...)``, ...); its
            learning rate and weight decay are the ones used.
        **kwargs: Keras' optimizer options other than ``learning_rate`` and ``weight_decay``
            (``name``, ``clipnorm``, ``global_clipnorm``, ``clipvalue``, ``use_ema``,
            ``ema_momentum``, ``ema_overwrite_frequency``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``).
    """

    def __init__(self, opt: core.Optimizer, **kwargs: Any) -> None:
        if not isinstance(opt, core.Optimizer):
            raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")
        if keras.backend.backend() not in _BACKENDS:
            raise NotImplementedError(
                f"adaptlr runs on array-API arrays; the Keras {keras.backend.backend()!r} backend is not "
                f"supported (use KERAS_BACKEND={' or '.join(_BACKENDS)})"
            )
        for name in ("learning_rate", "weight_decay"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is the adaptlr optimizer's: pass it to the factory "
                    f"(adaptlr.adamw(learning_rate, weight_decay=...)), not to the Keras optimizer"
                )
            kwargs.pop(name, None)
        learning_rate = opt.base.learning_rate
        super().__init__(learning_rate=1.0 if callable(learning_rate) else float(learning_rate), **kwargs)
        self._schedule = learning_rate if callable(learning_rate) else None
        self.opt = opt
        self._state_variables: list = []
        self._state_treespec: optree.PyTreeSpec | None = None
        self._layout: Layout | None = None

    def build(self, variables: list) -> None:
        """Create one Keras variable per array of ``opt.init`` of the variables' values."""
        if self.built:
            return
        super().build(variables)
        with _no_grad():
            state = self.opt.init([v.value for v in variables])
        self._layout = Layout.of(list(variables))[0]
        accessors, leaves, self._state_treespec = optree.tree_flatten_with_accessor(state)
        self._state_variables = [
            self.add_variable(
                shape=tuple(leaf.shape),
                initializer=_Constant(leaf),
                dtype=_dtype_name(leaf.dtype),
                name=accessor.codify("").lstrip("."),
            )
            for accessor, leaf in zip(accessors, leaves)
        ]

    @property
    def functional_state(self) -> core.OptimizerState:
        """The :class:`adaptlr.OptimizerState` for the list of trainable variables (current values)."""
        if not self.built:
            raise ValueError("the optimizer is not built yet: fit the model or call optimizer.build(variables)")
        return optree.tree_unflatten(self._state_treespec, [v.value for v in self._state_variables])

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        if len(trainable_variables) != len(self._trainable_variables) or any(
            v is not w for v, w in zip(trainable_variables, self._trainable_variables)
        ):
            raise ValueError(
                f"{self.opt.name} steps all {len(self._trainable_variables)} trainable variables at once, "
                f"but Keras passed {len(trainable_variables)}: every trainable variable needs a gradient"
            )
        params = [v.value for v in trainable_variables]
        xp = array_api_compat.array_namespace(*params)
        with _no_grad():
            state = self.functional_state
            alpha = self._alpha(xp, learning_rate, state.count, params)
            updates, new_state = self.opt.update_leaves(xp, self._layout, list(grads), state, params, alpha=alpha)
            for variable, p, u in zip(trainable_variables, params, updates):
                variable.assign(p + u)
            for variable, value in zip(self._state_variables, self._state_treespec.flatten_up_to(new_state)):
                variable.assign(value)

    def _alpha(self, xp: Any, learning_rate: Any, count: Any, params: list) -> list:
        """``α`` per parameter for the step after ``count``: Keras' learning rate (times ``α_t``)."""
        lr = learning_rate.value if isinstance(learning_rate, keras.Variable) else learning_rate
        if self._schedule is None:
            return [xp.astype(lr, p.dtype, copy=True) for p in params]
        device = core.scalar_device(params[0])
        wide = widest_float(xp, device)
        t = xp.astype(next_count(xp, count), wide)
        value = xp.asarray(self._schedule(t), dtype=wide, device=device) * xp.astype(lr, wide)
        return [xp.astype(value, p.dtype, copy=True) for p in params]

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("weight_decay", None)
        config["adaptlr"] = self.opt.name
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> Optimizer:
        raise TypeError(
            f"loading an adaptlr Keras optimizer ({config.get('adaptlr')}) needs the adaptlr optimizer: "
            "pass custom_objects=adaptlr.backends.keras.custom_objects(opt) to keras.saving.load_model"
        )


def custom_objects(opt: core.Optimizer) -> dict:
    """``custom_objects`` for ``keras.saving.load_model`` of a model compiled with ``Optimizer(opt)``.

    The saved config holds the Keras options and ``opt.name`` (checked on load); the optimizer's
    state is restored from the saved variables.
    """
    if not isinstance(opt, core.Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")

    class _Loader(Optimizer):
        @classmethod
        def from_config(cls, config: dict, custom_objects: Any = None) -> Optimizer:
            config = dict(config)
            saved = config.pop("adaptlr", None)
            if saved != opt.name:
                raise ValueError(f"the saved model was compiled with {saved}, not {opt.name}")
            config.pop("learning_rate", None)  # the saved learning_rate variable restores it
            return Optimizer(opt, **config)

    return {"Optimizer": _Loader}


class _Constant:
    """A Keras initializer that returns one array (the value ``opt.init`` made)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, shape: tuple, dtype: Any = None) -> Any:
        return keras.ops.cast(keras.ops.convert_to_tensor(self.value), dtype)


def _dtype_name(dtype: Any) -> str:
    from adaptlr._state_tree import dtype_name

    return dtype_name(dtype)


def _no_grad() -> contextlib.AbstractContextManager:
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
