"""A small 1-D CNN (conv-ReLU × k, then a linear layer) with a hand-written array-API forward and backward pass.

The input is a batch of sequences ``x`` of shape (n, L) (one channel). Activations are kept length-major,
``h`` of shape (L, n, C), so that each gather below is one matrix product. A convolution with kernel K,
stride s and zero padding p is two matrix products, so it needs nothing beyond the array API's ``matmul``,
``reshape`` and ``permute_dims``::

    cols = G h                 G: (L_out·K, L_in), G[o·K + j, i] = 1 where i = s·o + j − p (0 elsewhere:
                               the zero padding); cols rearranged to (L_out·n, K·C_in)
    z    = cols Wᵀ + b         W: (C_out, K·C_in), column j·C_in + c is tap j of input channel c
    h'   = relu(z)             reshaped to (n, L_out, C_out)

and the network ends with ``logits = flatten(h_last) W_headᵀ + b_head`` and the mean softmax cross-entropy.
The backward pass reverses each product: ``∂W = ∂zᵀ cols``, ``∂b = Σ ∂z``, ``∂cols = ∂z W`` and
``∂h = Gᵀ ∂cols`` (the transpose of a gather is the scatter-add that sums the overlapping windows).
A weight is a matrix whose rows are output channels, so DSA's ``row``/``col`` structure (spec §5) applies.
torch's ``conv1d`` weight of shape (C_out, C_in, K) is ``W.reshape(C_out, K, C_in)`` with its last two
axes swapped (``tests/test_reproduce.py`` checks the pass against torch autograd and finite differences).

Default architecture: the MNIST-1D paper's small CNN (Greydanus 2020): three convolutions with 25
channels, kernels 5/3/3, stride 2, padding 1 (lengths 40 → 19 → 10 → 5), then a linear layer 125 → 10.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device

from adaptlr.reproduce.models import log_softmax

__all__ = ["CNN1d", "gather_matrix"]


@functools.lru_cache(maxsize=64)
def gather_matrix(length: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """``G`` of shape (L_out·K, L): row ``o·K + j`` selects input position ``s·o + j − p`` (none: padding)."""
    out_len = (length + 2 * padding - kernel) // stride + 1
    g = np.zeros((out_len * kernel, length))
    for o in range(out_len):
        for j in range(kernel):
            i = stride * o + j - padding
            if 0 <= i < length:
                g[o * kernel + j, i] = 1.0
    return g  # cached and shared: callers must not write to it


@dataclass(frozen=True)
class CNN1d:
    """Convolutions ``channels[k]`` wide with ``kernels[k]``, ``strides[k]``, ``paddings[k]``, ReLU, then linear.

    Params: ``{"conv0": {"w": (C_0, K_0·1), "b": (C_0,)}, ..., "head": {"w": (classes, L_last·C_last),
    "b": (classes,)}}``.
    """

    length: int = 40
    channels: tuple[int, ...] = (25, 25, 25)
    kernels: tuple[int, ...] = (5, 3, 3)
    strides: tuple[int, ...] = (2, 2, 2)
    paddings: tuple[int, ...] = (1, 1, 1)
    classes: int = 10

    def lengths(self) -> list[int]:
        """The sequence length entering each convolution and leaving the last one."""
        out = [self.length]
        for k, s, p in zip(self.kernels, self.strides, self.paddings):
            out.append((out[-1] + 2 * p - k) // s + 1)
        return out

    def describe(self) -> str:
        convs = ", ".join(f"{c}×k{k}/s{s}" for c, k, s in zip(self.channels, self.kernels, self.strides))
        return f"1-D CNN (conv-ReLU {convs}, linear {self.lengths()[-1] * self.channels[-1]}→{self.classes})"

    def init(self, seed: int, backend: Any, dtype: str = "float64") -> dict:
        """He-initialised convolutions, a 1/fan_in-variance head, zero biases."""
        rng = np.random.default_rng(seed)
        params, c_in = {}, 1
        for k, (c_out, kernel) in enumerate(zip(self.channels, self.kernels)):
            fan_in = kernel * c_in
            params[f"conv{k}"] = {
                "w": backend.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, fan_in)), dtype),
                "b": backend.asarray(np.zeros(c_out), dtype),
            }
            c_in = c_out
        fan_in = self.lengths()[-1] * c_in
        params["head"] = {
            "w": backend.asarray(rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(self.classes, fan_in)), dtype),
            "b": backend.asarray(np.zeros(self.classes), dtype),
        }
        return params

    def _gathers(self, x: Any, xp: Any) -> list[Any]:
        lengths = self.lengths()
        return [xp.asarray(gather_matrix(lengths[k], self.kernels[k], self.strides[k], self.paddings[k]),
                           dtype=x.dtype, device=device(x)) for k in range(len(self.channels))]

    def _forward(self, params: dict, x: Any, xp: Any) -> tuple[Any, list[Any], list[Any], Any]:
        # Activations are length-major, (L, n, C), so that each gather is one matrix product G·(L, n·C).
        n = x.shape[0]
        lengths = self.lengths()
        gathers = self._gathers(x, xp)
        h = xp.reshape(xp.permute_dims(x, (1, 0)), (self.length, n, 1))
        cols_list, outputs = [], []
        for k in range(len(self.channels)):
            w, b = params[f"conv{k}"]["w"], params[f"conv{k}"]["b"]
            c_in, out_len = h.shape[2], lengths[k + 1]
            taps = xp.reshape(xp.matmul(gathers[k], xp.reshape(h, (lengths[k], n * c_in))),
                              (out_len, self.kernels[k], n, c_in))
            cols = xp.reshape(xp.permute_dims(taps, (0, 2, 1, 3)), (out_len * n, self.kernels[k] * c_in))
            z = xp.matmul(cols, xp.permute_dims(w, (1, 0))) + b
            h = xp.reshape(xp.where(z > 0, z, xp.zeros_like(z)), (out_len, n, w.shape[0]))
            cols_list.append(cols)
            outputs.append(h)
        flat = xp.reshape(xp.permute_dims(h, (1, 0, 2)), (n, lengths[-1] * self.channels[-1]))
        out = xp.matmul(flat, xp.permute_dims(params["head"]["w"], (1, 0))) + params["head"]["b"]
        return out, cols_list, [*outputs, flat], gathers

    def logits(self, params: dict, x: Any, xp: Any) -> Any:
        return self._forward(params, x, xp)[0]

    def loss_value(self, params: dict, x: Any, y_onehot: Any, xp: Any) -> Any:
        logp = log_softmax(self.logits(params, x, xp), xp)
        return -xp.sum(logp * y_onehot) / logp.shape[0]

    def loss_and_grad(self, params: dict, x: Any, y_onehot: Any, xp: Any) -> tuple[Any, dict]:
        """``(loss, grads)``: the mean cross-entropy and its gradient, a tree shaped like ``params``."""
        z, cols_list, outputs, gathers = self._forward(params, x, xp)
        n = z.shape[0]
        lengths = self.lengths()
        logp = log_softmax(z, xp)
        loss = -xp.sum(logp * y_onehot) / n
        delta = (xp.exp(logp) - y_onehot) / n  # ∂loss/∂logits
        flat = outputs[-1]
        grads: dict = {"head": {"w": xp.matmul(xp.permute_dims(delta, (1, 0)), flat), "b": xp.sum(delta, axis=0)}}
        last = lengths[-1], n, self.channels[-1]
        back = xp.permute_dims(xp.reshape(xp.matmul(delta, params["head"]["w"]), (n, last[0], last[2])), (1, 0, 2))
        for k in range(len(self.channels) - 1, -1, -1):
            h = outputs[k]
            dz = xp.where(h > 0, back, xp.zeros_like(back))  # h = relu(z) > 0 exactly where z > 0
            dz = xp.reshape(dz, (lengths[k + 1] * n, self.channels[k]))
            w = params[f"conv{k}"]["w"]
            grads[f"conv{k}"] = {"w": xp.matmul(xp.permute_dims(dz, (1, 0)), cols_list[k]), "b": xp.sum(dz, axis=0)}
            if k > 0:
                c_in = self.channels[k - 1]
                dtaps = xp.reshape(xp.matmul(dz, w), (lengths[k + 1], n, self.kernels[k], c_in))
                dtaps = xp.reshape(xp.permute_dims(dtaps, (0, 2, 1, 3)), (lengths[k + 1] * self.kernels[k], n * c_in))
                back = xp.reshape(xp.matmul(xp.permute_dims(gathers[k], (1, 0)), dtaps), (lengths[k], n, c_in))
        return loss, {name: grads[name] for name in params}
