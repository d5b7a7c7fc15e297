"""Checks of ``adaptlr.backends.keras`` on one Keras backend; prints one JSON line of results.

Keras picks its backend when it is imported, so ``tests/test_keras_adapter.py`` runs this once per
backend in a subprocess::

    python tests/keras_checks.py jax      # or torch, tensorflow

- ``trajectory``: ``model.fit`` against the functional API (``opt.update`` / ``apply_updates`` on
  the same backend's arrays, gradients from the backend's autodiff of the same loss; under
  ``jax.jit`` on JAX), max |Δθ| and max |Δloss| over the run, per optimizer.
- ``round_trip``: fit, save (``model.save`` / ``model.save_weights``), restore into a new model,
  fit both on: max |Δ| of the weights and of the optimizer variables (0 when it continues identically).
- ``learning_rate_callback``, ``gradient_accumulation``: Keras features that set the learning rate
  or skip updates, against the equivalent adaptlr runs.
- ``schedule_free_eval``: ``ScheduleFreeEval`` evaluates and predicts at Schedule-Free's ``x``.
- ``docs_example``: the Python blocks of docs/frameworks/keras.md, run on this backend.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

BACKEND = sys.argv[1]
os.environ["KERAS_BACKEND"] = BACKEND

import keras  # noqa: E402
import numpy as np  # noqa: E402

import adaptlr  # noqa: E402

STEPS_PER_EPOCH, BATCH, EPOCHS = 4, 8, 6
rng = np.random.default_rng(0)
X = rng.normal(size=(STEPS_PER_EPOCH * BATCH, 4)).astype(np.float32)
Y = (np.sin(X) @ rng.normal(size=(4, 2))).astype(np.float32)


def optimizers() -> dict:
    return {
        "adamw": adaptlr.adamw(1e-2, weight_decay=1e-2),
        "active(adamw)": adaptlr.active(adaptlr.adamw(1e-2, weight_decay=1e-2), steps_per_epoch=STEPS_PER_EPOCH),
        "autodrop(sgd)": adaptlr.autodrop(adaptlr.sgd(0.1, momentum=0.9), steps_per_epoch=STEPS_PER_EPOCH,
                                          theta=20.0, theta_max=90.0, patience_epochs=1, average=True),
        "hypergradient(adam)": adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-4),
        "adamw(schedule)": adaptlr.adamw(lambda t: 1e-2 / (1.0 + 0.1 * t)),
        "schedule_free_adamw": adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=1e-2),
        "mechanic(adamw)": adaptlr.mechanic(adaptlr.adamw(1e-2), s_init=1e-2),
    }


def model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])


def loss_of(ops, params, x, y):
    """Keras' ``Dense(tanh) → Dense`` and ``"mse"`` (mean over the last axis, sum over the batch / B)."""
    w1, b1, w2, b2 = params
    prediction = ops.matmul(ops.tanh(ops.matmul(x, w1) + b1), w2) + b2
    return ops.sum(ops.mean(ops.square(y - prediction), axis=-1)) / x.shape[0]


def functional_run(opt, weights: list, with_state: bool = False) -> tuple:
    """``EPOCHS`` epochs of the functional API from ``weights``: (final params, loss per step[, state])."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        params = [jnp.asarray(w) for w in weights]
        value_and_grad = jax.value_and_grad(lambda p, x, y: loss_of(jnp, p, x, y))
    elif BACKEND == "tensorflow":  # the adapter steps NumPy copies: so does the reference
        import tensorflow as tf

        params = [np.asarray(w) for w in weights]

        def value_and_grad(p, x, y):
            p = [tf.Variable(q) for q in p]
            with tf.GradientTape() as tape:
                loss = loss_of(keras.ops, p, tf.constant(x), tf.constant(y))
            return loss.numpy(), [g.numpy() for g in tape.gradient(loss, p)]
    else:
        import torch

        params = [torch.tensor(w) for w in weights]

        def value_and_grad(p, x, y):
            p = [q.detach().requires_grad_() for q in p]
            loss = loss_of(torch, p, torch.tensor(x), torch.tensor(y))
            return loss.detach(), list(torch.autograd.grad(loss, p))

    def step(params, state, x, y):
        loss, grads = value_and_grad(params, x, y)
        updates, state = opt.update(list(grads), state, params)
        return adaptlr.apply_updates(params, updates), state, loss

    if BACKEND == "jax":
        step = jax.jit(step)  # as Keras' train step is (and eager JAX would dominate the test's time)
    state = opt.init(params)
    losses = []
    for _ in range(EPOCHS):
        for b in range(STEPS_PER_EPOCH):
            params, state, loss = step(params, state, X[b * BATCH:(b + 1) * BATCH], Y[b * BATCH:(b + 1) * BATCH])
            losses.append(float(loss))
    final = [np.asarray(keras.ops.convert_to_numpy(p)) for p in params]
    if with_state:
        x = adaptlr.schedule_free_eval_params(state, params)
        return final, losses, [np.asarray(keras.ops.convert_to_numpy(p)) for p in x]
    return final, losses


class StepLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        # Keras logs the running mean over the epoch; recover each step's loss from it.
        mean = float(logs["loss"])
        self.losses.append(mean * (batch + 1) - sum(self.losses[len(self.losses) - batch:]) if batch else mean)


def keras_run(opt) -> tuple[list, list, keras.Model]:
    from adaptlr.backends.keras import Optimizer

    m = model()
    m.compile(optimizer=Optimizer(opt), loss="mse")
    initial = m.get_weights()
    losses = StepLosses()
    m.fit(X, Y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[losses])
    return initial, losses.losses, m


def trajectory() -> dict:
    out = {}
    for name, opt in optimizers().items():
        initial, keras_losses, m = keras_run(opt)
        params, losses = functional_run(opt, initial)
        out[name] = {
            "max_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(m.get_weights(), params)),
            "max_loss_diff": max(abs(a - b) for a, b in zip(keras_losses, losses)),
            "steps": len(losses),
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
        if name.startswith("autodrop"):
            state = m.optimizer.functional_state
            out[name]["drops"] = int(keras.ops.convert_to_numpy(state.adaptations[0].drop_count))
    return out


def round_trip(tmp: str) -> dict:
    from adaptlr.backends.keras import Optimizer, custom_objects

    opt = adaptlr.active(adaptlr.adamw(1e-2, weight_decay=1e-2), steps_per_epoch=STEPS_PER_EPOCH)
    out = {}
    for how in ("model.save", "save_weights"):
        m = model()
        m.compile(optimizer=Optimizer(opt), loss="mse")
        m.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        m.fit(X[:BATCH * 2], Y[:BATCH * 2], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)  # mid-epoch
        saved = [keras.ops.convert_to_numpy(v) for v in m.optimizer.variables]
        if how == "model.save":
            path = os.path.join(tmp, "m.keras")
            m.save(path)
            restored = keras.saving.load_model(path, custom_objects=custom_objects(opt))
        else:
            path = os.path.join(tmp, "m.weights.h5")
            m.save_weights(path)
            restored = model()
            restored.compile(optimizer=Optimizer(opt), loss="mse")
            restored.optimizer.build(restored.trainable_variables)
            restored.load_weights(path)
        loaded = [keras.ops.convert_to_numpy(v) for v in restored.optimizer.variables]
        for each in (m, restored):  # across ActiveLR's next epoch boundary
            each.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        out[how] = {
            "optimizer_variables": len(saved),
            "restored_variables_diff": max(float(np.abs(a.astype(float) - b.astype(float)).max())
                                           for a, b in zip(saved, loaded)),
            "continued_weights_diff": max(float(np.abs(a - b).max())
                                          for a, b in zip(m.get_weights(), restored.get_weights())),
            "continued_optimizer_diff": max(
                float(np.abs(keras.ops.convert_to_numpy(a).astype(float)
                             - keras.ops.convert_to_numpy(b).astype(float)).max())
                for a, b in zip(m.optimizer.variables, restored.optimizer.variables)),
            "restored_type": type(restored.optimizer).__name__,
        }
    return out


def learning_rate_callback() -> dict:
    """``LearningRateScheduler`` sets Keras' learning rate = adaptlr's α: halving it each epoch
    gives the functional run with the schedule ``α_t = 1e-2 · 0.5^⌊(t-1)/S⌋``."""
    from adaptlr.backends.keras import Optimizer

    m = model()
    m.compile(optimizer=Optimizer(adaptlr.adamw(1e-2)), loss="mse")
    initial = m.get_weights()
    halve = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 1e-2 * 0.5 ** epoch)
    m.fit(X, Y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[halve])
    params, _ = functional_run(adaptlr.adamw(lambda t: 1e-2 * 0.5 ** ((t - 1) // STEPS_PER_EPOCH)), initial)
    return {"max_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(m.get_weights(), params)),
            "final_learning_rate": float(keras.ops.convert_to_numpy(m.optimizer.learning_rate))}


def gradient_accumulation() -> dict:
    """``gradient_accumulation_steps=2`` on half batches steps like full batches: adaptlr's counter
    (and so its epochs) advances only on the update steps."""
    from adaptlr.backends.keras import Optimizer

    opt = adaptlr.active(adaptlr.adamw(1e-2, weight_decay=1e-2), steps_per_epoch=STEPS_PER_EPOCH)
    weights = []
    for batch, options in ((BATCH, {}), (BATCH // 2, {"gradient_accumulation_steps": 2})):
        m = model()
        m.compile(optimizer=Optimizer(opt, **options), loss="mse")
        m.fit(X, Y, batch_size=batch, epochs=EPOCHS, shuffle=False, verbose=0)
        weights.append(m.get_weights())
        count = int(keras.ops.convert_to_numpy(m.optimizer.functional_state.count))
    return {"max_param_diff": max(float(np.abs(a - b).max()) for a, b in zip(*weights)), "adaptlr_count": count}


def schedule_free_eval() -> dict:
    """``ScheduleFreeEval``: fit's validation, ``evaluate`` and ``predict`` run at the averaged ``x`` of
    the functional run (:func:`adaptlr.schedule_free_eval_params` of its state); training stays at ``y``."""
    from adaptlr.backends.keras import Optimizer, ScheduleFreeEval

    opt = adaptlr.schedule_free_adamw(1e-2, warmup_steps=3, weight_decay=1e-2)
    m = model()
    m.compile(optimizer=Optimizer(opt), loss="mse")
    initial = m.get_weights()
    history = m.fit(X, Y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, validation_data=(X, Y),
                    callbacks=[ScheduleFreeEval()])
    y_ref, _, x_ref = functional_run(opt, initial, with_state=True)
    loss_x, loss_y = (float(loss_of(np, p, X.astype(np.float64), Y.astype(np.float64))) for p in (x_ref, y_ref))
    before = m.get_weights()
    evaluated = float(m.evaluate(X, Y, batch_size=len(X), verbose=0, callbacks=[ScheduleFreeEval()]))
    predicted = keras.ops.convert_to_numpy(m.predict(X, verbose=0, callbacks=[ScheduleFreeEval()]))
    w1, b1, w2, b2 = x_ref
    expected = np.tanh(X @ w1 + b1) @ w2 + b2
    return {
        "val_loss_minus_loss_at_x": abs(float(history.history["val_loss"][-1]) - loss_x),
        "loss_at_y_minus_loss_at_x": abs(loss_y - loss_x),
        "weights_after_fit_minus_y": max(float(np.abs(a - b).max()) for a, b in zip(before, y_ref)),
        "evaluate_minus_loss_at_x": abs(evaluated - loss_x),
        "predict_minus_prediction_at_x": float(np.abs(predicted - expected).max()),
        "weights_changed_by_evaluate_and_predict": max(float(np.abs(a - b).max())
                                                       for a, b in zip(before, m.get_weights())),
    }


def docs_example(tmp: str) -> str:
    """Run the Python blocks of docs/frameworks/keras.md in order, in one namespace: "ok" or the error."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "frameworks", "keras.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        namespace: dict = {}
        for block in blocks:
            exec(compile(block, "docs/frameworks/keras.md", "exec"), namespace)
        return f"ok ({len(blocks)} blocks)"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        os.chdir(cwd)


def rejected() -> dict:
    from adaptlr.backends.keras import Optimizer

    out = {}
    for name, make in {
        "learning_rate": lambda: Optimizer(adaptlr.adamw(1e-3), learning_rate=1e-2),
        "weight_decay": lambda: Optimizer(adaptlr.adamw(1e-3), weight_decay=1e-2),
        "not_adaptlr": lambda: Optimizer(keras.optimizers.Adam()),
        "load_without_custom_objects": lambda: Optimizer.from_config({"adaptlr": "adamw"}),
    }.items():
        try:
            make()
            out[name] = None
        except (TypeError, ValueError, NotImplementedError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = {"trajectory": trajectory(), "round_trip": round_trip(tmp),
                  "learning_rate_callback": learning_rate_callback(),
                  "gradient_accumulation": gradient_accumulation(), "rejected": rejected(),
                  "schedule_free_eval": schedule_free_eval(),
                  "docs_example": docs_example(tmp)}
    print("KERAS-CHECKS " + json.dumps(result))


if __name__ == "__main__":
    main()
