r"""Portable checkpoints of an optimizer state: one ``.npz`` file with a versioned JSON manifest.

A state saved from a run on one array library (PyTorch, JAX, NumPy, CuPy) loads into a run on any
other, on the device and in the dtypes of the parameters it is loaded for::

    adaptlr.save_state("opt.npz", state)                  # state from opt.init/opt.update
    state = adaptlr.load_state("opt.npz", like=params)     # params: the tree the run optimizes

The file holds every array of the state (bfloat16 as its bit pattern) and a manifest naming the
format version, the adaptlr version, the optimizer and its hyper-parameters (when given to
``save_state``), the state classes, the parameters' paths, shapes and dtypes and, for each field, its
path in the state, whether it is per-parameter, and the shapes and dtypes.

Loading checks the file against ``like`` (number of parameters, their paths, shapes and the dtypes
the state was made for) and, with ``optimizer=``, against a fresh ``optimizer.init(like)`` (exact
structure, shapes and dtypes, and the optimizer's name) and its hyper-parameters (a difference
warns, or raises with ``strict=True``). Any mismatch, and any file that is not a complete adaptlr
checkpoint (truncated, corrupted, another kind of file, an unknown format version), raises
``ValueError`` naming the file and what is wrong. Nothing is loaded partially, and nothing is ever
unpickled.

Saving writes a temporary file next to ``path`` (``.<name>.<pid>@<host>.<random>.adaptlr-tmp``, with the
permissions the umask gives), ``fsync``\ s it and renames it over ``path``: a reader sees the old file
or the new one, never a partial one. An error or interrupt during the save removes the temporary
file; a process killed outright leaves it behind, and the next save of the same ``path`` removes
temporary files of processes of this host that no longer exist.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib
import io
import json
import math
import os
import secrets
import socket
import sys
import warnings
import zipfile
import zlib
from typing import Any

import array_api_compat
import numpy as np
import optree

from adaptlr import _validation as v
from adaptlr._state_tree import Node, dtype_name, from_slots, rebuild_state, slots, split_state, to_numpy
from adaptlr._tree import Layout
from adaptlr.core import Optimizer, OptimizerState

__all__ = ["FORMAT_VERSION", "HyperparameterWarning", "hyperparameters", "load_state", "save_state"]

FORMAT = "adaptlr-optimizer-state"
FORMAT_VERSION = 1
_MANIFEST_KEY = "__manifest__"


def save_state(path: str | os.PathLike, state: OptimizerState, *, optimizer: Optimizer | None = None) -> None:
    """Write ``state`` to ``path`` (an ``.npz`` file; written atomically).

    Args:
        path: the file to write (any suffix; ``.npz`` is customary).
        state: an :class:`adaptlr.OptimizerState` of any array library and device.
        optimizer: the optimizer that made ``state``; when given, its name and hyper-parameters
            are recorded and checked on load, and ``state`` must belong to it.

    Example:
        >>> import os, tempfile, numpy as np, adaptlr
        >>> opt = adaptlr.adamw(1e-3)
        >>> params = {"w": np.ones(3)}
        >>> state = opt.init(params)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "opt.npz")
        ...     adaptlr.save_state(path, state, optimizer=opt)
        ...     restored = adaptlr.load_state(path, params, optimizer=opt)   # or torch / JAX params
        >>> int(restored.count), restored.base.mu["w"].shape
        (0, (3,))
    """
    if not isinstance(state, OptimizerState):
        raise TypeError(f"state must be an adaptlr OptimizerState, got {type(state).__name__}")
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be an adaptlr Optimizer, got {type(optimizer).__name__}")
        _check_classes(_state_classes(state), _optimizer_classes(optimizer), "state")
    layout, alpha = Layout.of(state.learning_rate)
    skeleton, fields = split_state(state, layout.treespec)
    arrays: dict[str, np.ndarray] = {}
    field_records = []
    for i, field in enumerate(fields):
        if not field.per_param:
            arrays[f"{i}"] = to_numpy(field.value, bits=True)
            field_records.append({"path": field.path, "per_param": False, "shape": list(field.value.shape),
                                  "dtype": dtype_name(field.value.dtype)})
            continue
        leaves: list = []
        encoded = [_encode_slot(slot, leaves) for slot in slots(field.value, layout.treespec)]
        for k, leaf in enumerate(leaves):
            arrays[f"{i}/{k}"] = to_numpy(leaf, bits=True)
        field_records.append({"path": field.path, "per_param": True, "slots": encoded,
                              "leaves": [[list(x.shape), dtype_name(x.dtype)] for x in leaves]})
    import adaptlr

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adaptlr_version": adaptlr.__version__,
        "optimizer": None if optimizer is None else optimizer.name,
        "hyperparameters": None if optimizer is None else hyperparameters(optimizer),
        "state_classes": [_class_name(c) for c in _state_classes(state)],
        "params": {"paths": layout.paths(), "dtypes": [dtype_name(a.dtype) for a in alpha],
                   "shapes": _param_shapes(fields, layout)},
        "skeleton": _encode(skeleton),
        "fields": field_records,
    }
    arrays[_MANIFEST_KEY] = np.asarray(json.dumps(manifest))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # pyright: ignore[reportArgumentType] (keys are field paths, not savez's options)
    _write_atomically(os.fspath(path), buffer.getvalue())


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and a rename."""
    directory, name = os.path.split(os.path.abspath(path))
    _remove_orphans(directory, name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        # Mode 0o666 filtered by the umask, as open() would make it (mkstemp makes 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


_TMP_SUFFIX = ".adaptlr-tmp"
_HOST = socket.gethostname().replace("@", "_") or "localhost"


def _remove_orphans(directory: str, name: str) -> None:
    """Remove temporary files of earlier saves of ``name`` on this host whose process no longer
    exists (a save in progress elsewhere, or on another host sharing the directory, is kept)."""
    for orphan in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*{_TMP_SUFFIX}")):
        owner = os.path.basename(orphan)[len(name) + 2:-len(_TMP_SUFFIX)].rsplit(".", 1)[0]
        pid, _, host = owner.partition("@")
        if host == _HOST and pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            try:
                os.remove(orphan)
            except OSError:
                pass


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or this platform cannot tell: keep the file
    return True


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_state(
    path: str | os.PathLike,
    like: Any,
    *,
    optimizer: Optimizer | None = None,
    match: str = "paths",
    strict: bool = False,
) -> OptimizerState:
    """The state saved in ``path``, as arrays of ``like``'s library, on its device(s).

    Args:
        path: a file written by :func:`save_state`.
        like: the params the state is for (a tree of arrays of one library), in the dtypes the
            state was made for.
        optimizer: the optimizer that will continue the run; when given, the file must hold a state
            of the same algorithm with exactly the structure, shapes and dtypes of
            ``optimizer.init(like)``, and the name recorded at save time (if any) must match.
        match: ``"paths"`` (default): the parameters' tree paths must equal those recorded;
            ``"order"``: parameters are matched by position only (for example a torch adapter's
            state, saved for a list of tensors, loaded for a dict of JAX arrays).
        strict: with ``optimizer``, raise instead of warning when its hyper-parameters differ
            from the recorded ones.

    Returns:
        the state. With ``optimizer`` (and a constant learning rate), its ``learning_rate`` is the
        optimizer's (the user's α belongs to the optimizer, as after ``optimizer.init``); the rest
        is the file's.

    Raises:
        ValueError: the file is not a complete adaptlr checkpoint (truncated, corrupted, another
            kind of file, an unknown format version), or does not fit ``like`` or ``optimizer``
            (structure, shapes, dtypes, algorithm; hyper-parameters with ``strict=True``); the
            message names the file and the first difference.

    Warns:
        HyperparameterWarning: ``optimizer`` has other hyper-parameters than the recorded ones.
    """
    v.check_choice("match", match, ("paths", "order"))
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an adaptlr Optimizer, got {type(optimizer).__name__}")
    layout, params = Layout.of(like)
    xp = v.namespace_of_leaves(params, "like", layout.paths)
    manifest, arrays = _read(path)
    version_note = f" (file written by adaptlr {manifest.get('adaptlr_version')})"
    try:
        state = _state_from(manifest, arrays, path, xp, layout, params, optimizer, match, strict, version_note)
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} has a malformed manifest ({type(error).__name__}: {error}){version_note}") from None
    if optimizer is not None:
        template = optimizer.init(like)
        _check_against(state, template, layout, path, version_note)
        if not callable(optimizer.base.learning_rate):  # a schedule's α_t is recomputed each step anyway
            state = state._replace(learning_rate=template.learning_rate)
    return state


def _read(path: Any) -> tuple[dict, dict]:
    """The manifest and the arrays of the checkpoint ``path`` (``ValueError`` if it is not one)."""
    try:
        with open(os.fspath(path), "rb") as f:
            magic = f.read(4)
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not an adaptlr checkpoint") from None
    if magic != b"PK\x03\x04":
        what = "an empty file" if not magic else ("a .npy array" if magic == b"\x93NUM" else "not a zip archive")
        raise ValueError(f"{path} is not an adaptlr checkpoint ({what}; save_state writes an .npz archive)")
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            if _MANIFEST_KEY not in data.files:
                raise ValueError(f"{path} is not an adaptlr checkpoint (an .npz archive without an adaptlr manifest)")
            manifest_text = str(data[_MANIFEST_KEY][()])
            arrays = {key: data[key] for key in data.files if key != _MANIFEST_KEY}
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
        raise ValueError(f"{path} is truncated or corrupted ({type(error).__name__}: {error})") from None
    except ValueError as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path} is corrupted ({error})") from None
    try:
        manifest = json.loads(manifest_text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupted: its manifest is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is corrupted: its manifest is not a JSON object")
    _check_manifest(manifest, path)
    return manifest, arrays


def _state_from(manifest: dict, arrays: dict, path: Any, xp: Any, layout: Layout, params: list,
                optimizer: Optimizer | None, match: str, strict: bool, version_note: str) -> OptimizerState:
    saved = manifest["params"]
    if len(saved["paths"]) != len(params):
        raise ValueError(
            f"{path} holds a state for {len(saved['paths'])} parameters but like has {len(params)}"
        )
    if match == "paths" and saved["paths"] != layout.paths():
        names = layout.paths()
        i = next(k for k, (a, b) in enumerate(zip(saved["paths"], names)) if a != b)
        raise ValueError(
            f"{path} was saved for parameter {saved['paths'][i]} where like has {names[i]}; "
            "pass match='order' to match parameters by position"
        )
    # With state_dtype= (given by the optimizer, else as recorded) the state is in that dtype.
    recorded = (manifest.get("hyperparameters") or [{}])[0]
    state_dtype = getattr(optimizer, "state_dtype", None) if optimizer is not None else recorded.get("state_dtype")
    for i, (name, p) in enumerate(zip(saved["dtypes"], params)):
        if name != (state_dtype or dtype_name(p.dtype)):
            raise ValueError(
                f"{path} holds a state made for {name} at parameter {layout.paths()[i]}, but like "
                f"has {dtype_name(p.dtype)} there"
                + (f" and the state dtype is {state_dtype}" if state_dtype else "")
                + "; pass params in the dtype the state was made for"
            )
    if "shapes" in saved:  # files from adaptlr 0.1.0 do not record them: the fields' shapes are checked
        for i, (shape, p) in enumerate(zip(saved["shapes"], params)):
            if shape is not None and tuple(shape) != tuple(p.shape):
                raise ValueError(
                    f"{path} holds a state for parameter {layout.paths()[i]} of shape {tuple(shape)}, but "
                    f"like has shape {tuple(p.shape)} there"
                )
    if optimizer is not None and manifest["optimizer"] not in (None, optimizer.name):
        raise ValueError(f"{path} holds a state of {manifest['optimizer']}, not of {optimizer.name}")
    if optimizer is not None and manifest.get("hyperparameters") is not None:
        _compare_hyperparameters(manifest["hyperparameters"], hyperparameters(optimizer), path, strict)

    skeleton = _decode(manifest["skeleton"], version_note)
    dtypes = {dtype_name(p.dtype): p.dtype for p in params}
    values = []
    for i, record in enumerate(manifest["fields"]):
        if record["per_param"]:
            field_slots = []
            for j, (encoded, p) in enumerate(zip(record["slots"], params)):
                make = functools.partial(_load_leaf, xp, arrays, record, i, p, layout.paths()[j], dtypes, path)
                field_slots.append(_decode_slot(encoded, make))
            values.append(from_slots(field_slots, layout.treespec))
        else:
            shape, dtype = tuple(record["shape"]), record["dtype"]
            values.append(_make(xp, _array(arrays, f"{i}", path), dtype, dtypes, params[0], shape,
                                f"{path}: state field {record['path']}"))
    state = rebuild_state(skeleton, values)
    if not isinstance(state, OptimizerState):
        raise ValueError(f"{path} does not hold an OptimizerState{version_note}")
    return state


# -- checks -------------------------------------------------------------------------------------


def _check_manifest(manifest: dict, path: Any) -> None:
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adaptlr checkpoint (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version} (adaptlr {manifest.get('adaptlr_version')}); "
            f"this adaptlr reads version {FORMAT_VERSION}"
        )


def _check_against(state: OptimizerState, template: OptimizerState, layout: Layout, path: Any, note: str) -> None:
    _check_classes(_state_classes(state), _state_classes(template), f"{path}", note)
    _, got = split_state(state, layout.treespec)
    _, want = split_state(template, layout.treespec)
    if [f.path for f in got] != [f.path for f in want]:
        raise ValueError(
            f"{path} holds state fields {[f.path for f in got]} but the optimizer has "
            f"{[f.path for f in want]}{note}"
        )
    names = layout.paths()
    for g, w in zip(got, want):
        if g.per_param != w.per_param:
            raise ValueError(f"{path}: state field {g.path} is laid out differently from the optimizer's{note}")
        pairs = []
        if g.per_param:
            for j, (a, b) in enumerate(zip(slots(g.value, layout.treespec), slots(w.value, layout.treespec))):
                if optree.tree_structure(a) != optree.tree_structure(b):
                    raise ValueError(
                        f"{path}: state field {g.path} of parameter {names[j]} is {optree.tree_structure(a)} "
                        f"but the optimizer needs {optree.tree_structure(b)}{note}"
                    )
                pairs += [(f"{g.path} of parameter {names[j]}", x, y)
                          for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b))]
        else:
            pairs.append((g.path, g.value, w.value))
        for where, a, b in pairs:
            if tuple(a.shape) != tuple(b.shape) or dtype_name(a.dtype) != dtype_name(b.dtype):
                raise ValueError(
                    f"{path}: state field {where} has shape {tuple(a.shape)} and dtype "
                    f"{dtype_name(a.dtype)} but the optimizer needs {tuple(b.shape)} and "
                    f"{dtype_name(b.dtype)}{note}"
                )


def _check_classes(got: list, want: list, what: str, note: str = "") -> None:
    if got != want:
        raise ValueError(
            f"{what} holds a state of {', '.join(c.__name__ for c in got)} but the optimizer needs "
            f"{', '.join(c.__name__ for c in want)}{note}"
        )


def _state_classes(state: OptimizerState) -> list:
    return [type(state.base)] + [type(a) for a in state.adaptations]


def _optimizer_classes(optimizer: Optimizer) -> list:
    return [optimizer.base.state_class] + [a.state_class for a in optimizer.adaptations]


def _fits(shape: tuple, param_shape: tuple) -> bool:
    """A per-parameter state array is 0-D (a per-tensor value), has the parameter's rank and, in
    each dimension, the parameter's size or 1 (a broadcast factor), or holds every k-th element of
    the flattened parameter (Prodigy's ``slice_p``: shape ``(ceil(n/k),)``)."""
    if not shape:
        return True
    if len(shape) == 1 and _is_strided_sample(shape[0], math.prod(param_shape)):
        return True
    return len(shape) == len(param_shape) and all(a in (1, b) for a, b in zip(shape, param_shape))


def _is_strided_sample(length: int, size: int) -> bool:
    """Whether ``length == ceil(size / k)`` for some stride ``k >= 1`` (ceil(size/k) falls as k grows,
    so the only candidate is the smallest ``k`` with ``ceil(size/k) <= length``)."""
    if length < 1 or length > size:
        return False
    stride = -(-size // length)
    return -(-size // stride) == length


# -- hyper-parameters ---------------------------------------------------------------------------


class HyperparameterWarning(UserWarning):
    """:func:`load_state` was given an optimizer whose hyper-parameters differ from the recorded ones."""


def hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of ``optimizer`` as JSON: one dict per part (the base, then each
    adaptation, innermost first), each with the part's ``name``. A schedule is recorded as
    ``"<schedule>"`` (it cannot be compared), a traced array as ``"<array>"``."""
    parts = [optimizer.base, *optimizer.adaptations]
    out = [{"name": part.name, **{k: _plain(x) for k, x in sorted(vars(part).items()) if not k.startswith("_")}}
           for part in parts]
    if getattr(optimizer, "state_dtype", None) is not None:
        out[0]["state_dtype"] = _plain(optimizer.state_dtype)
    return out


def _plain(x: Any) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(type(x), "_fields"):
        return {k: _plain(y) for k, y in zip(type(x)._fields, x)}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_plain(y) for y in x]
    if isinstance(x, dict):
        return {str(k): _plain(y) for k, y in x.items()}
    if v.library_of(x) is not None:
        return "<array>" if v.is_traced(x) or x.ndim else float(to_numpy(x))  # pyright: ignore[reportAttributeAccessIssue]
    if callable(x):
        return "<schedule>"
    return f"<{type(x).__name__}>"


def _compare_hyperparameters(saved: list, given: list, path: Any, strict: bool) -> None:
    saved_flat, given_flat = _flatten_parts(saved), _flatten_parts(given)
    differences = [f"{key}: saved {saved_flat.get(key, '<absent>')!r}, given {given_flat.get(key, '<absent>')!r}"
                   for key in {**saved_flat, **given_flat} if saved_flat.get(key) != given_flat.get(key)]
    if not differences:
        return
    message = (f"{path} was saved by an optimizer with other hyper-parameters than the one given: "
               + "; ".join(differences))
    if strict:
        raise ValueError(message)
    warnings.warn(message + " (pass strict=True to make this an error)", HyperparameterWarning, stacklevel=4)


def _flatten_parts(parts: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, part in enumerate(parts):
        name = part.get("name", "?") if isinstance(part, dict) else "?"
        _flatten_into(out, f"{name}[{i}]" if i else name, {k: y for k, y in part.items() if k != "name"})
    return out


def _flatten_into(out: dict[str, Any], prefix: str, x: Any) -> None:
    """``x``'s leaves into ``out`` under dotted names (a function, not a recursive closure: no cycle)."""
    if isinstance(x, dict):
        for k, y in x.items():
            _flatten_into(out, f"{prefix}.{k}", y)
    else:
        out[prefix] = x


def _param_shapes(fields: list, layout: Layout) -> list:
    """Each parameter's shape, from the per-parameter fields that are one array per parameter (the
    moments, γ, ...: the parameter's shape, or 0-D for a per-tensor value); None where there is
    none but 0-D ones (the state does not depend on the shape). Small trees per parameter (DSA's
    broadcast factors) are not used."""
    shapes: list = [None] * layout.num_leaves
    for field in fields:
        if not field.per_param:
            continue
        for j, slot in enumerate(slots(field.value, layout.treespec)):
            if v.library_of(slot) is not None and slot.ndim and (shapes[j] is None or slot.ndim > len(shapes[j])):
                shapes[j] = list(slot.shape)
    return shapes


# -- arrays -------------------------------------------------------------------------------------


def _load_leaf(
    xp: Any, arrays: dict, record: dict, i: int, param: Any, name: str, dtypes: dict, path: Any, k: int
) -> Any:
    """Leaf ``k`` of per-parameter field ``i`` (``record``), for ``param`` (named ``name``)."""
    shape, dtype = tuple(record["leaves"][k][0]), record["leaves"][k][1]
    if not _fits(shape, tuple(param.shape)):
        raise ValueError(
            f"{path}: state field {record['path']} of parameter {name} has shape {shape}, which does "
            f"not fit the parameter's shape {tuple(param.shape)}"
        )
    return _make(xp, _array(arrays, f"{i}/{k}", path), dtype, dtypes, param, shape,
                 f"{path}: state field {record['path']} of parameter {name}")


def _array(arrays: dict, key: str, path: Any) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"{path} is corrupted: its manifest names array {key!r}, which the file does not hold")
    return arrays[key]


def _make(xp: Any, host: np.ndarray, dtype: str, dtypes: dict, param: Any, shape: tuple, what: str) -> Any:
    if tuple(host.shape) != shape:
        raise ValueError(f"{what}: the file's array has shape {host.shape}, its manifest {shape} (corrupted)")
    target = dtypes.get(dtype)
    if target is None:
        target = getattr(xp, dtype, None)
    if target is None:
        raise ValueError(f"{what} has dtype {dtype}, which {xp.__name__} does not have")
    device = _placement(param, shape)
    if dtype == "bfloat16":
        bits = xp.asarray(host.view(np.int16), device=device)
        out = bits.view(target)
    else:
        out = xp.asarray(host, dtype=target, device=device)
    if dtype_name(out.dtype) != dtype:
        raise ValueError(
            f"{what} has dtype {dtype} but {xp.__name__} made {dtype_name(out.dtype)} "
            "(for JAX float64, enable jax_enable_x64)"
        )
    return out


def _placement(param: Any, shape: tuple) -> Any:
    """Where a state array for ``param`` goes: the param's sharding (JAX, same shape) or device."""
    if v.library_of(param) == "jax":
        sharding = param.sharding
        if tuple(param.shape) == shape:
            return sharding
        devices = sharding.device_set
        return next(iter(devices)) if len(devices) == 1 else None
    return array_api_compat.device(param)


# -- the skeleton and per-parameter slots as JSON -------------------------------------------------


def _encode_slot(slot: Any, leaves: list) -> Any:
    """JSON for one parameter's slot (an array, or a dict/list/tuple of them); arrays go to ``leaves``."""
    if slot is None:
        return {"none": True}
    if isinstance(slot, dict):
        if not all(isinstance(k, str) for k in slot):
            raise TypeError(f"state slot keys must be strings to be saved, got {list(slot)}")
        return {"dict": [[k, _encode_slot(x, leaves)] for k, x in slot.items()]}
    if isinstance(slot, (list, tuple)) and not hasattr(type(slot), "_fields"):
        return {"list" if isinstance(slot, list) else "tuple": [_encode_slot(x, leaves) for x in slot]}
    if v.library_of(slot) is None:
        raise TypeError(f"state slot holds a {type(slot).__name__}, not an array")
    leaves.append(slot)
    return {"array": len(leaves) - 1}


def _decode_slot(record: dict, make: Any) -> Any:
    if "array" in record:
        return make(int(record["array"]))
    if "dict" in record:
        return {k: _decode_slot(x, make) for k, x in record["dict"]}
    if "list" in record:
        return [_decode_slot(x, make) for x in record["list"]]
    if "tuple" in record:
        return tuple(_decode_slot(x, make) for x in record["tuple"])
    return None


# -- the skeleton as JSON -------------------------------------------------------------------------


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode(node: Node) -> dict:
    out: dict[str, Any] = {"kind": node.kind}
    if node.kind == "namedtuple":
        out["class"] = _class_name(node.cls)
        out["fields"] = list(node.cls._fields)
    if node.kind == "field":
        out["index"] = node.index
    if node.children:
        out["children"] = [_encode(c) for c in node.children]
    return out


def _decode(record: dict, note: str) -> Node:
    kind = record["kind"]
    children = tuple(_decode(c, note) for c in record.get("children", ()))
    if kind == "namedtuple":
        cls = _import_class(record["class"], note)
        if tuple(cls._fields) != tuple(record["fields"]):
            raise ValueError(
                f"state class {record['class']} has fields {list(cls._fields)} here but the file "
                f"records {record['fields']}{note}"
            )
        return Node("namedtuple", cls, children)
    if kind == "field":
        return Node("field", index=int(record["index"]))
    if kind not in ("tuple", "list", "none"):
        raise ValueError(f"unknown state node kind {kind!r}{note}")
    return Node(kind, children=children)


def _import_class(name: str, note: str) -> type:
    module_name, _, qualname = name.partition(":")
    # Import only adaptlr's own modules by name; other state classes must already be imported
    # (their optimizer exists in this process), so a file never makes us import arbitrary code.
    if module_name in sys.modules:
        module = sys.modules[module_name]
    elif module_name == "adaptlr" or module_name.startswith("adaptlr."):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ValueError(f"state class {name} does not exist in this adaptlr{note}") from None
    else:
        raise ValueError(f"state class {name} comes from module {module_name}, which is not imported{note}")
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"state class {name} does not exist in this adaptlr{note}")
    if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        raise ValueError(f"{name} is not a state class{note}")
    return obj

