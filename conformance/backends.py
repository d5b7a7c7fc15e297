"""The array backends adaptlr is checked on, each with a reason when it is not available.

A :class:`Backend` turns NumPy arrays into arrays of its library (on its device, in a given dtype)
and back, so the same problem can run everywhere. Framework imports happen only when a backend is
used. The test suite's ``xp`` fixture and the conformance suite both use this registry; the
environment variable ``ADAPTLR_BACKENDS`` (comma-separated names) narrows the test suite's set.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "Backend", "available_backends", "backend"]


@dataclass(frozen=True)
class Backend:
    """One array library on one device.

    Attributes:
        name: the registry name (``"torch"``, ``"jax-gpu"``, ``"array_api_strict-device1"`` ...).
        library: the array library (``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``, ``"array_api_strict"``).
        device_name: the device, as a user would say it (``"cpu"``, ``"cuda:0"``, ``"device1"``).
    """

    name: str
    library: str
    device_name: str
    _probe: Callable[[], str | None] = field(repr=False)
    _namespace: Callable[[], Any] = field(repr=False)
    _device: Callable[[], Any] = field(repr=False)

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else why not."""
        return _cached_probe(self.name, self._probe)

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    @property
    def xp(self) -> Any:
        """The array-API namespace (array_api_compat's wrapper where the library needs one)."""
        return self._namespace()

    @property
    def device(self) -> Any:
        return self._device()

    def asarray(self, x: Any, dtype: str = "float64") -> Any:
        """``x`` (array-like) as an array of this backend, in ``dtype``, on this backend's device."""
        xp = self.xp
        host = np.asarray(x, dtype=dtype)
        return xp.asarray(host, dtype=getattr(xp, dtype), device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy of ``x`` (an array of this backend)."""
        if self.library == "torch":
            return x.detach().cpu().numpy()
        if self.library == "cupy":
            return x.get()
        if self.library == "array_api_strict":
            import array_api_strict

            return np.asarray(array_api_strict.asarray(x, device=array_api_strict.Device("CPU_DEVICE")))
        return np.asarray(x)

    def supports(self, dtype: str) -> bool:
        """Whether arrays of ``dtype`` can be made here (JAX float64 needs x64, enabled on use)."""
        return True


@functools.cache
def _cached_probe(name: str, probe: Callable[[], str | None]) -> str | None:
    try:
        return probe()
    except Exception as error:  # a broken install is a reason, not a crash
        return f"{type(error).__name__}: {error}"


def _installed(module: str) -> str | None:
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def _numpy_ns() -> Any:
    import array_api_compat.numpy

    return array_api_compat.numpy


def _strict_ns() -> Any:
    import array_api_strict

    return array_api_strict


def _torch_ns() -> Any:
    import array_api_compat.torch

    return array_api_compat.torch


def _jax_ns() -> Any:
    enable_jax_x64()
    import jax.numpy

    return jax.numpy


def _cupy_ns() -> Any:
    import array_api_compat.cupy

    return array_api_compat.cupy


def enable_jax_x64() -> None:
    """Turn on JAX's 64-bit types (needed for float64 runs; harmless for float32)."""
    import jax

    jax.config.update("jax_enable_x64", True)


def _torch_cuda_probe() -> str | None:
    reason = _installed("torch")
    if reason:
        return reason
    import torch

    return None if torch.cuda.is_available() else "torch has no CUDA device here"


def _jax_gpu_probe() -> str | None:
    reason = _installed("jax")
    if reason:
        return reason
    import jax

    try:
        jax.devices("gpu")
    except RuntimeError:
        return "JAX has no GPU device here"
    return None


def _cupy_probe() -> str | None:
    reason = _installed("cupy")
    if reason:
        return reason
    import cupy

    try:
        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "CuPy sees no GPU"
    except Exception as error:
        return f"CuPy sees no GPU ({type(error).__name__})"


def _strict_device(name: str) -> Callable[[], Any]:
    def device() -> Any:
        import array_api_strict

        return array_api_strict.Device(name)

    return device


def _torch_device(name: str) -> Callable[[], Any]:
    def device() -> Any:
        import torch

        return torch.device(name)

    return device


def _jax_device(kind: str) -> Callable[[], Any]:
    def device() -> Any:
        import jax

        return jax.devices(kind)[0]

    return device


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in [
        Backend("numpy", "numpy", "cpu", lambda: None, _numpy_ns, lambda: "cpu"),
        Backend("array_api_strict", "array_api_strict", "CPU_DEVICE", lambda: _installed("array_api_strict"),
                _strict_ns, _strict_device("CPU_DEVICE")),
        Backend("array_api_strict-device1", "array_api_strict", "device1", lambda: _installed("array_api_strict"),
                _strict_ns, _strict_device("device1")),
        Backend("torch", "torch", "cpu", lambda: _installed("torch"), _torch_ns, _torch_device("cpu")),
        Backend("torch-cuda", "torch", "cuda", _torch_cuda_probe, _torch_ns, _torch_device("cuda")),
        Backend("jax", "jax", "cpu", lambda: _installed("jax"), _jax_ns, _jax_device("cpu")),
        Backend("jax-gpu", "jax", "gpu", _jax_gpu_probe, _jax_ns, _jax_device("gpu")),
        Backend("cupy", "cupy", "cuda", _cupy_probe, _cupy_ns, lambda: None),
    ]
}


def backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name lists the valid ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}") from None


def available_backends() -> list[Backend]:
    return [b for b in BACKENDS.values() if b.available]
