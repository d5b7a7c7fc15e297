"""``adaptlr.backends.keras.Optimizer(opt)``: any adaptlr optimizer as a Keras 3 optimizer.

::

    os.environ["KERAS_BACKEND"] = "jax"   # or "torch", "tensorflow" (before importing keras)
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
  eagerly under ``torch.no_grad()``; on the TensorFlow backend see the last point.
- ``optimizer.learning_rate`` (a Keras variable) is the user's ``α``, as ``param_groups[i]["lr"]``
  is for the torch adapter: it starts at the wrapped optimizer's learning rate and Keras callbacks
  that set it (``LearningRateScheduler``, ``ReduceLROnPlateau``) change ``α`` for the following
  steps. When the wrapped optimizer's learning rate is a schedule ``t ↦ α_t``, it starts at 1.0 and
  multiplies it (``α = learning_rate · α_t``). A Keras ``LearningRateSchedule`` is not accepted:
  give adaptlr the schedule instead. The adaptation multiplier ``κ`` lives in the state.
- Weight decay is the wrapped optimizer's (``adaptlr.adamw(1e-3, weight_decay=1e-2)``); Keras'
  ``weight_decay=`` is rejected, so the decay is not applied twice.
- The state is adaptlr's functional :class:`adaptlr.OptimizerState` for the list of trainable
  variables, one Keras variable per array (named after its path in the state, ``base.mu_0``,
  ``adaptations_0.gamma_1``), after Keras' own ``iteration`` and ``learning_rate`` variables. So
  ``model.save`` / ``keras.saving.load_model`` and ``model.save_weights`` / ``load_weights`` save
  and restore it with the model; :attr:`Optimizer.functional_state` assembles the state for
  :func:`adaptlr.learning_rates`, :func:`adaptlr.lr_summary` and :func:`adaptlr.save_state`.
- Loading a ``.keras`` file needs the adaptlr optimizer, which is Python code and not part of the
  saved config: pass ``custom_objects=adaptlr.backends.keras.custom_objects(opt)``. The saved config
  records ``opt.name`` and loading checks it.
- Every trainable variable must get a gradient at every step (Keras drops variables whose gradient
  is None; the step then raises).
- TensorFlow tensors are not array-API arrays: on the TensorFlow backend the step runs on NumPy
  copies through ``tf.numpy_function`` (a host round trip per step, no XLA: on a GPU compile with
  ``jit_compile=False``), and :attr:`Optimizer.functional_state` holds NumPy arrays.

Tested against the functional API on every backend (``tests/test_keras_adapter.py``,
docs/frameworks/keras.md).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import array_api_compat
import keras
import numpy as np
import optree

from adaptlr import core
from adaptlr._precision import next_count, widest_float
from adaptlr._state_tree import dtype_name
from adaptlr._tree import Layout
from adaptlr.schedule_free import schedule_free_eval_params

__all__ = ["Optimizer", "ScheduleFreeEval", "custom_objects"]

_BACKENDS = ("jax", "torch", "tensorflow")


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
                f"the Keras {keras.backend.backend()!r} backend is not supported "
                f"(use KERAS_BACKEND={' or '.join(_BACKENDS)})"
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
            state = self.opt.init(_arrays([v.value for v in variables]))
        self._layout = Layout.of(list(variables))[0]
        accessors, leaves, self._state_treespec = optree.tree_flatten_with_accessor(state)
        self._state_variables = [
            self.add_variable(
                shape=tuple(leaf.shape),
                initializer=_Constant(leaf),
                dtype=dtype_name(leaf.dtype),
                name=_variable_name(accessor),
            )
            for accessor, leaf in zip(accessors, leaves)
        ]

    @property
    def functional_state(self) -> core.OptimizerState:
        """The :class:`adaptlr.OptimizerState` for the list of trainable variables (current values)."""
        if not self.built:
            raise ValueError("the optimizer is not built yet: fit the model or call optimizer.build(variables)")
        return optree.tree_unflatten(self._state_treespec, _arrays([v.value for v in self._state_variables]))

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        if len(trainable_variables) != len(self._trainable_variables) or any(
            v is not w for v, w in zip(trainable_variables, self._trainable_variables)
        ):
            raise ValueError(
                f"{self.opt.name} steps all {len(self._trainable_variables)} trainable variables at once, "
                f"but Keras passed {len(trainable_variables)}: every trainable variable needs a gradient"
            )
        lr = learning_rate.value if isinstance(learning_rate, keras.Variable) else learning_rate
        params = [v.value for v in trainable_variables]
        state_values = [v.value for v in self._state_variables]
        if keras.backend.backend() == "tensorflow":
            new_params, new_state_values = self._tensorflow_step(list(grads), params, state_values, lr)
        else:
            with _no_grad():
                new_params, new_state_values = self._step(list(grads), params, state_values, lr)
        for variable, value in zip(trainable_variables, new_params):
            variable.assign(value)
        for variable, value in zip(self._state_variables, new_state_values):
            variable.assign(value)

    def _step(self, grads: list, params: list, state_values: list, lr: Any) -> tuple[list, list]:
        """The adaptlr step on arrays: (new params, new state values)."""
        xp = array_api_compat.array_namespace(*params)
        state = optree.tree_unflatten(self._state_treespec, state_values)
        alpha = self._alpha(xp, lr, state.count, params)
        updates, new_state = self.opt.update_leaves(xp, self._layout, grads, state, params, alpha=alpha)
        return [p + u for p, u in zip(params, updates)], self._state_treespec.flatten_up_to(new_state)

    def _tensorflow_step(self, grads: list, params: list, state_values: list, lr: Any) -> tuple[list, list]:
        """:meth:`_step` on NumPy copies, through ``tf.numpy_function`` (TensorFlow tensors are not array-API)."""
        import tensorflow as tf

        sizes = [len(grads), len(params), len(state_values)]

        def step(*arrays: Any) -> list:
            arrays = [np.asarray(a) for a in arrays]
            grads, params, state_values = (arrays[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3))
            new_params, new_state_values = self._step(grads, params, state_values, arrays[-1])
            return [np.asarray(x) for x in (*new_params, *new_state_values)]

        inputs = [*grads, *params, *state_values, lr]
        dtypes = [x.dtype for x in (*params, *state_values)]
        outputs = tf.numpy_function(step, [tf.convert_to_tensor(x) for x in inputs], dtypes, stateful=True)
        for out, x in zip(outputs, (*params, *state_values)):
            out.set_shape(x.shape)
        return outputs[:len(params)], outputs[len(params):]

    def _alpha(self, xp: Any, learning_rate: Any, count: Any, params: list) -> list:
        """``α`` per parameter for the step after ``count``: Keras' learning rate (times ``α_t``)."""
        lr = xp.asarray(learning_rate)
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

    Args:
        opt: the adaptlr optimizer the model was compiled with (same algorithm and hyper-parameters).

    Returns:
        ``{"Optimizer": ...}``, to pass as ``keras.saving.load_model(path, custom_objects=...)``.
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


class ScheduleFreeEval(keras.callbacks.Callback):
    """Evaluate and predict at Schedule-Free's averaged parameters ``x``; train at ``y``.

    Schedule-Free (Defazio et al. 2024) trains the interpolation ``y = (1-β1)·z + β1·x`` and is meant
    to be evaluated at the average ``x = (y - (1-β1)·z) / β1`` (:func:`adaptlr.schedule_free_eval_params`).
    ``schedulefree``'s PyTorch users call ``optimizer.eval()`` / ``optimizer.train()`` around
    evaluation; in Keras this callback does it: at the start of ``evaluate`` (also the validation
    inside ``fit``) and of ``predict`` it writes ``x`` into the model's trainable variables, and at
    their end it writes back the ``y`` it saved (bit-identical, so training continues as if nothing
    happened). Use it with an :class:`Optimizer` whose adaptlr optimizer contains
    :func:`adaptlr.schedule_free` (``schedule_free_adamw``, ``schedule_free_sgd``, or one inside
    ``skip_nonfinite``)::

        model.fit(x, y, validation_data=(xv, yv), callbacks=[ScheduleFreeEval()])
        model.evaluate(xv, yv, callbacks=[ScheduleFreeEval()])

    Before the optimizer has stepped (not built) ``x = y`` and nothing is written. To save the
    evaluation weights for inference, save inside ``model.evaluate``'s swap or write
    ``schedule_free_eval_params(model.optimizer.functional_state, weights)`` yourself.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: list | None = None

    def _to_eval(self) -> None:
        optimizer = self.model.optimizer
        if not isinstance(optimizer, Optimizer):
            raise TypeError("ScheduleFreeEval needs the model compiled with adaptlr.backends.keras.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if self._saved is not None or not optimizer.built:
            return
        variables = optimizer._trainable_variables
        with _no_grad():
            x = schedule_free_eval_params(optimizer.functional_state, _arrays([v.value for v in variables]))
        self._saved = [np.array(keras.ops.convert_to_numpy(v.value), copy=True) for v in variables]
        for variable, value in zip(variables, x):
            variable.assign(value)

    def _to_train(self) -> None:
        if self._saved is None:
            return
        for variable, value in zip(self.model.optimizer._trainable_variables, self._saved):
            variable.assign(value)
        self._saved = None

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._to_eval()

    def on_test_end(self, logs: dict | None = None) -> None:
        self._to_train()

    def on_predict_begin(self, logs: dict | None = None) -> None:
        self._to_eval()

    def on_predict_end(self, logs: dict | None = None) -> None:
        self._to_train()


def _variable_name(accessor: optree.PyTreeAccessor) -> str:
    """``base.mu_0`` for ``state.base.mu[0]`` (TensorFlow scope names allow no brackets)."""
    name = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r"_\1", accessor.codify("").lstrip("."))
    return re.sub(r"[^A-Za-z0-9_.>-]", "_", name)


def _arrays(values: list) -> list:
    """Keras variable values as arrays adaptlr can step: the backend's own, NumPy for TensorFlow."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():  # Keras may build the optimizer inside the traced train step
            return [keras.ops.convert_to_numpy(x) for x in values]
    if keras.backend.backend() == "torch":
        return [x.detach() for x in values]  # tensors, not the variables' Parameters
    return values


def _no_grad() -> contextlib.AbstractContextManager:
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
