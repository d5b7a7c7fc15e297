"""Portable checkpoints of an optimizer state: one ``.npz`` file with a versioned JSON manifest.

A state saved from a run on one array library (PyTorch, JAX, NumPy, CuPy) loads into a run on any
other, on the device and in the dtypes of the parameters it is loaded for::

    adaptlr.save_state("opt.npz", state)                  # state from opt.init/opt.update
    state = adaptlr.load_state("opt.npz", like=params)     # params: the tree the run optimizes

The file holds every array of the state (bfloat16 as its bit pattern) and a manifest naming the
format version, the adaptlr version, the optimizer (when given to ``save_state``), the state classes
and, for each field, its path in the state, whether it is per-parameter, and the shapes and dtypes.
Loading checks the file against ``like`` (number of parameters, their paths, the dtypes the state
was made for, shapes) and, with ``optimizer=``, against a fresh ``optimizer.init(like)`` (exact
structure, shapes and dtypes, and the optimizer's name); any mismatch raises ``ValueError`` naming
what differs. Nothing is loaded partially.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import math
import os
import sys
import tempfile
from typing import Any

import array_api_compat
import numpy as np
import optree

from adaptlr import _validation as v
from adaptlr._state_tree import Node, dtype_name, from_slots, rebuild_state, slots, split_state, to_numpy
from adaptlr._tree import Layout
from adaptlr.core import Optimizer, OptimizerState

__all__ = ["FORMAT_VERSION", "load_state", "save_state"]

FORMAT = "adaptlr-optimizer-state"
FORMAT_VERSION = 1
_MANIFEST_KEY = "__manifest__"


def save_state(path: str | os.PathLike, state: OptimizerState, *, optimizer: Optimizer | None = None) -> None:
    """Write ``state`` to ``path`` (an ``.npz`` file; written atomically).

    Args:
        path: the file to write (any suffix; ``.npz`` is customary).
        state: an :class:`adaptlr.OptimizerState` of any array library and device.
        optimizer: the optimizer that made ``state``; when given, its name is recorded and checked
            on load, and ``state`` must belong to it.
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
        "state_classes": [_class_name(c) for c in _state_classes(state)],
        "params": {"paths": layout.paths(), "dtypes": [dtype_name(a.dtype) for a in alpha]},
        "skeleton": _encode(skeleton),
        "fields": field_records,
    }
    arrays[_MANIFEST_KEY] = np.asarray(json.dumps(manifest))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".adaptlr-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_state(
    path: str | os.PathLike,
    like: Any,
    *,
    optimizer: Optimizer | None = None,
    match: str = "paths",
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

    Raises:
        ValueError: the file does not fit ``like`` or ``optimizer`` (structure, shapes, dtypes,
            algorithm, format version); the message names the first difference.
    """
    v.check_choice("match", match, ("paths", "order"))
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an adaptlr Optimizer, got {type(optimizer).__name__}")
    layout, params = Layout.of(like)
    xp = v.namespace_of_leaves(params, "like", layout.paths)
    with np.load(os.fspath(path), allow_pickle=False) as data:
        if _MANIFEST_KEY not in data:
            raise ValueError(f"{path} is not an adaptlr optimizer state file (no manifest)")
        manifest = json.loads(str(data[_MANIFEST_KEY][()]))
        arrays = {key: data[key] for key in data.files if key != _MANIFEST_KEY}
    _check_manifest(manifest, path)
    version_note = f" (file written by adaptlr {manifest['adaptlr_version']})"

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
    for i, (name, p) in enumerate(zip(saved["dtypes"], params)):
        if name != dtype_name(p.dtype):
            raise ValueError(
                f"{path} holds a state made for {name} at parameter {layout.paths()[i]}, but like "
                f"has {dtype_name(p.dtype)} there; pass params in the dtype the state was made for"
            )
    if optimizer is not None and manifest["optimizer"] not in (None, optimizer.name):
        raise ValueError(f"{path} holds a state of {manifest['optimizer']}, not of {optimizer.name}")

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
            values.append(_make(xp, arrays[f"{i}"], dtype, dtypes, params[0], shape, record["path"]))
    state = rebuild_state(skeleton, values)
    if not isinstance(state, OptimizerState):
        raise ValueError(f"{path} does not hold an OptimizerState{version_note}")
    if optimizer is not None:
        _check_against(state, optimizer.init(like), layout, path, version_note)
    return state


# -- checks -------------------------------------------------------------------------------------


def _check_manifest(manifest: dict, path: Any) -> None:
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adaptlr optimizer state file (format {manifest.get('format')!r})")
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
    """A per-parameter state array has the parameter's shape, broadcasts to it, or holds every k-th
    element of the flattened parameter (Prodigy's ``slice_p``: shape ``(ceil(n/k),)``)."""
    if len(shape) == 1 and _is_strided_sample(shape[0], math.prod(param_shape)):
        return True
    if len(shape) > len(param_shape):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(param_shape)))


def _is_strided_sample(length: int, size: int) -> bool:
    """Whether ``length == ceil(size / k)`` for some stride ``k >= 1`` (ceil(size/k) falls as k grows,
    so the only candidate is the smallest ``k`` with ``ceil(size/k) <= length``)."""
    if length < 1 or length > size:
        return False
    stride = -(-size // length)
    return -(-size // stride) == length


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
    return _make(xp, arrays[f"{i}/{k}"], dtype, dtypes, param, shape, record["path"])


def _make(xp: Any, host: np.ndarray, dtype: str, dtypes: dict, param: Any, shape: tuple, what: str) -> Any:
    if tuple(host.shape) != shape:
        raise ValueError(f"state field {what}: the file's array has shape {host.shape}, its manifest {shape}")
    target = dtypes.get(dtype)
    if target is None:
        target = getattr(xp, dtype, None)
    if target is None:
        raise ValueError(f"state field {what} has dtype {dtype}, which {xp.__name__} does not have")
    device = _placement(param, shape)
    if dtype == "bfloat16":
        bits = xp.asarray(host.view(np.int16), device=device)
        out = bits.view(target)
    else:
        out = xp.asarray(host, dtype=target, device=device)
    if dtype_name(out.dtype) != dtype:
        raise ValueError(
            f"state field {what} has dtype {dtype} but {xp.__name__} made {dtype_name(out.dtype)} "
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

