"""Softmax regression, small MLPs and a small 1-D CNN with a hand-written array-API forward and backward pass.

Params are a dict ``{"layer0": {"w": (out, in), "b": (out,)}, ...}`` of arrays of any array-API
backend; rows of ``w`` are output units (the ``row`` factor of DSA, spec §5). Hidden layers use ReLU;
the loss is the mean softmax cross-entropy::

    h_0 = x,  z_k = h_{k-1} W_kᵀ + b_k,  h_k = relu(z_k)  (k < L),  logits = z_L
    loss = mean_i( logsumexp(logits_i) - logits_i[y_i] )

and the backward pass is the chain rule in reverse (``∂loss/∂logits = (softmax - onehot)/n``).

:class:`MLP` wraps those functions; :class:`CNN1d` (in :mod:`.cnn`) is the 1-D convolutional network of
the MNIST-1D experiments. Both offer ``init``, ``loss_and_grad``, ``loss_value``, ``logits`` and
``describe``, which is all the training loop uses.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MLP", "accuracy", "init_mlp", "log_softmax", "logits", "loss_and_grad", "loss_value", "one_hot"]


def init_mlp(sizes: list[int], seed: int, backend: Any, dtype: str = "float64") -> dict:
    """He-initialised weights (zero biases) for layer sizes ``[in, hidden..., out]``.

    ``sizes = [64, 10]`` is softmax regression; ``[64, 64, 10]`` an MLP with one hidden layer.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        scale = np.sqrt(2.0 / fan_in) if k < len(sizes) - 2 else np.sqrt(1.0 / fan_in)
        params[f"layer{k}"] = {
            "w": backend.asarray(rng.normal(0.0, scale, size=(fan_out, fan_in)), dtype),
            "b": backend.asarray(np.zeros(fan_out), dtype),
        }
    return params


def one_hot(y: np.ndarray, classes: int, backend: Any, dtype: str = "float64") -> Any:
    out = np.zeros((len(y), classes))
    out[np.arange(len(y)), y] = 1.0
    return backend.asarray(out, dtype)


def _layers(params: dict) -> list[dict]:
    return [params[f"layer{k}"] for k in range(len(params))]


def _forward(params: dict, x: Any, xp: Any) -> tuple[Any, list[Any]]:
    layers = _layers(params)
    inputs = []
    h = x
    for k, layer in enumerate(layers):
        inputs.append(h)
        z = xp.matmul(h, xp.permute_dims(layer["w"], (1, 0))) + layer["b"]
        h = xp.where(z > 0, z, xp.zeros_like(z)) if k < len(layers) - 1 else z
    return h, inputs


def logits(params: dict, x: Any, xp: Any) -> Any:
    """The network's output ``z_L`` for inputs ``x`` (n, in)."""
    return _forward(params, x, xp)[0]


def log_softmax(z: Any, xp: Any) -> Any:
    shifted = z - xp.max(z, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def loss_value(params: dict, x: Any, y_onehot: Any, xp: Any) -> Any:
    """The mean cross-entropy, a 0-D array."""
    logp = log_softmax(logits(params, x, xp), xp)
    return -xp.sum(logp * y_onehot) / logp.shape[0]


def loss_and_grad(params: dict, x: Any, y_onehot: Any, xp: Any) -> tuple[Any, dict]:
    """``(loss, grads)``: the mean cross-entropy and its gradient, a tree shaped like ``params``."""
    z, inputs = _forward(params, x, xp)
    n = z.shape[0]
    logp = log_softmax(z, xp)
    loss = -xp.sum(logp * y_onehot) / n
    delta = (xp.exp(logp) - y_onehot) / n  # ∂loss/∂z_L
    layers = _layers(params)
    grads: dict = {}
    for k in range(len(layers) - 1, -1, -1):
        h = inputs[k]
        grads[f"layer{k}"] = {"w": xp.matmul(xp.permute_dims(delta, (1, 0)), h), "b": xp.sum(delta, axis=0)}
        if k > 0:
            back = xp.matmul(delta, layers[k]["w"])
            delta = xp.where(h > 0, back, xp.zeros_like(back))  # h = relu(z_{k-1}) > 0 exactly where z > 0
    return loss, {f"layer{k}": grads[f"layer{k}"] for k in range(len(layers))}


def accuracy(params: dict, x: Any, y: np.ndarray, xp: Any, backend: Any, model: Any = None) -> float:
    """The fraction of ``x`` classified as ``y`` (``y``: NumPy labels) by ``model`` (default: the MLP)."""
    out = logits(params, x, xp) if model is None else model.logits(params, x, xp)
    predicted = np.argmax(backend.to_numpy(out), axis=1)
    return float(np.mean(predicted == y))


@dataclass(frozen=True)
class MLP:
    """A ReLU MLP of layer sizes ``[in, hidden..., out]`` (``[in, out]``: softmax regression)."""

    sizes: tuple[int, ...]

    def init(self, seed: int, backend: Any, dtype: str = "float64") -> dict:
        return init_mlp(list(self.sizes), seed, backend, dtype)

    def loss_and_grad(self, params: dict, x: Any, y_onehot: Any, xp: Any) -> tuple[Any, dict]:
        return loss_and_grad(params, x, y_onehot, xp)

    def loss_value(self, params: dict, x: Any, y_onehot: Any, xp: Any) -> Any:
        return loss_value(params, x, y_onehot, xp)

    def logits(self, params: dict, x: Any, xp: Any) -> Any:
        return logits(params, x, xp)

    def describe(self) -> str:
        return ("softmax regression " if len(self.sizes) == 2 else "MLP ") + "-".join(map(str, self.sizes))
