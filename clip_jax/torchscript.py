"""The tensors of a TorchScript archive (OpenAI's released CLIP `.pt` files), read without running it.

`torch.jit.load` executes the archive: the classes in its `code/` folder are compiled and their
`__setstate__` methods run, so a crafted file can write files or worse. The tensors themselves need
none of that. An archive is a zip holding

    <name>/data.pkl        a pickle of the module tree; tensors are persistent references to storages
    <name>/data/<key>      each storage's raw bytes (little-endian unless <name>/byteorder says "big")
    <name>/code/__torch__/...py   the classes' TorchScript source, which declares
                           `__parameters__ = [...]` and `__buffers__ = [...]` per module class

This module unpickles `data.pkl` with an unpickler that can build nothing but plain containers,
numpy arrays (from the storages, bounds-checked) and inert placeholder objects standing for the
archive's `__torch__.*` classes, which only record their pickled attributes. The code files are
parsed with `ast` (never compiled or run) only to learn which attributes are parameters and
buffers, so that the result has exactly the names, order, dtypes and values of
`torch.jit.load(path).state_dict()`.

Whatever this reader cannot read with certainty it refuses with `UnsafeToRead`, saying why: a class
with its own `__setstate__` (whose state only its code can interpret), a pickled global other than
those `_RestrictedUnpickler.find_class` allows, a tensor kind other than a plain strided tensor, a
storage that is missing, too short or overrun by a view. Needs numpy (and ml_dtypes for bfloat16,
which jax brings), not torch.
"""

from __future__ import annotations

import ast
import collections
import io
import os
import pickle
import re
import sys
import zipfile
from typing import Any

import ml_dtypes  # a dependency of jax
import numpy as np


class UnsafeToRead(ValueError):
    """The archive cannot be read without running its code (or is damaged); the message says why."""


# Legacy typed-storage classes, as TorchScript pickles name them, and their element types.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

# torch.jit._pickle's helpers tag typed lists and values; each returns its first argument unchanged.
_TYPE_TAG_HELPERS = {
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "build_genericlist",
    "restore_type_tag",
}

_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_]+$")


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive, judged by its content (a `code/` folder or
    `constants.pkl`), whatever its extension. Plain `torch.save` zips have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: just the element type."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _dtype(_STORAGE_DTYPES[name])


class _ScriptObject:
    """An inert stand-in for an instance of one of the archive's `__torch__.*` classes.

    Unpickling creates it empty (NEWOBJ with no arguments) and hands it its state (BUILD); it keeps
    that state as it is and runs nothing: the class's own `__setstate__` is never looked at.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _ScriptObject:
        if args or kwargs:
            raise pickle.UnpicklingError(
                f"{cls.qualified_name} is created with arguments, which TorchScript never does"
            )
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_state", state)

    @property
    def state(self) -> Any:
        return getattr(self, "_state", None)


def _identity_helper(value: Any, *_: Any) -> Any:
    return value


class _ClassInfo:
    def __init__(self, is_module: bool, parameters: list[str], buffers: list[str], has_setstate: bool):
        self.is_module, self.parameters, self.buffers, self.has_setstate = is_module, parameters, buffers, has_setstate


class _Archive:
    """One TorchScript zip: its record prefix, byte order, storages and class declarations."""

    def __init__(self, zip_file: zipfile.ZipFile):
        self.zip = zip_file
        names = set(zip_file.namelist())
        pickles = sorted(n for n in names if n.count("/") == 1 and n.endswith("/data.pkl"))
        if len(pickles) != 1:
            found = "no" if not pickles else f"{len(pickles)}"
            raise UnsafeToRead(f"{found} <name>/data.pkl record (an older or unknown TorchScript layout)")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.names = names
        order = self._read_small("byteorder", default=b"little").strip()
        if order not in (b"little", b"big"):
            raise UnsafeToRead(f"unknown byte order {order[:20]!r}")
        self.swap = order.decode() != sys.byteorder
        self.storages: dict[str, np.ndarray] = {}
        self.placeholder_classes: dict[str, type] = {}
        self.class_infos: dict[str, _ClassInfo] = {}
        self.parsed_code: dict[str, ast.Module] = {}

    def _read_small(self, record: str, default: bytes) -> bytes:
        name = self.prefix + record
        if name not in self.names:
            return default
        if self.zip.getinfo(name).file_size > 64:
            raise UnsafeToRead(f"record {name} is unexpectedly large")
        return self.zip.read(name)

    def storage(self, key: Any, storage_type: Any, numel: Any) -> np.ndarray:
        if not isinstance(storage_type, _StorageType):
            raise UnsafeToRead(f"a storage of type {type(storage_type).__name__} (only plain typed storages are read)")
        if not isinstance(key, str) or not _STORAGE_KEY.match(key) or not isinstance(numel, int) or numel < 0:
            raise UnsafeToRead(f"a malformed storage reference ({key!r}, {numel!r})")
        if key in self.storages:
            cached = self.storages[key]
            if cached.dtype != storage_type.dtype or cached.size != numel:
                raise UnsafeToRead(f"storage {key} is referenced with two different types or sizes")
            return cached
        name = f"{self.prefix}data/{key}"
        if name not in self.names:
            raise UnsafeToRead(f"storage record {name} is missing")
        info = self.zip.getinfo(name)
        expected = numel * storage_type.dtype.itemsize
        if info.file_size != expected:
            raise UnsafeToRead(
                f"storage record {name} holds {info.file_size} bytes, its {numel} elements need {expected}"
            )
        array = np.empty(numel, storage_type.dtype)
        # Read straight into the array: no second copy of (possibly gigabytes of) weights.
        view = memoryview(array.view(np.uint8))
        with self.zip.open(info) as record:
            filled = 0
            while filled < expected:
                count = record.readinto(view[filled:])
                if not count:
                    raise UnsafeToRead(f"storage record {name} ends after {filled} of {expected} bytes")
                filled += count
        if self.swap and array.dtype.itemsize > 1:
            array = array.byteswap()
        self.storages[key] = array
        return array

    def placeholder(self, module: str, name: str) -> type:
        qualified = f"{module}.{name}"
        if qualified not in self.placeholder_classes:
            self.placeholder_classes[qualified] = type(
                "ScriptObject", (_ScriptObject,), {"qualified_name": qualified, "__module__": __name__}
            )
        return self.placeholder_classes[qualified]

    def class_info(self, qualified: str) -> _ClassInfo:
        """Parameter and buffer names of one class, from its TorchScript source (parsed, not run)."""
        if qualified in self.class_infos:
            return self.class_infos[qualified]
        module, _, name = qualified.rpartition(".")
        record = f"{self.prefix}code/{module.replace('.', '/')}.py"
        if record not in self.parsed_code:
            if record not in self.names:
                raise UnsafeToRead(f"class {qualified} has no source record {record}")
            try:
                self.parsed_code[record] = ast.parse(self.zip.read(record).decode("utf-8"), filename=record)
            except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as error:
                raise UnsafeToRead(f"the source of class {qualified} does not parse ({type(error).__name__})") from None
        classes = [n for n in self.parsed_code[record].body if isinstance(n, ast.ClassDef) and n.name == name]
        if len(classes) != 1:
            raise UnsafeToRead(f"class {qualified} is not defined (once) in {record}")
        node = classes[0]
        declared: dict[str, list[str]] = {}
        for statement in node.body:
            if (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and statement.targets[0].id in ("__parameters__", "__buffers__")
            ):
                try:
                    value = ast.literal_eval(statement.value)
                except ValueError:
                    value = None
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise UnsafeToRead(f"class {qualified} declares {statement.targets[0].id} oddly")
                declared[statement.targets[0].id] = value
        is_module = any(isinstance(base, ast.Name) and base.id == "Module" for base in node.bases)
        has_setstate = any(
            isinstance(statement, ast.FunctionDef) and statement.name == "__setstate__" for statement in node.body
        )
        if is_module and set(declared) != {"__parameters__", "__buffers__"}:
            raise UnsafeToRead(f"module class {qualified} does not declare its parameters and buffers")
        info = _ClassInfo(is_module, declared.get("__parameters__", []), declared.get("__buffers__", []), has_setstate)
        self.class_infos[qualified] = info
        return info


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds containers, numpy arrays and `_ScriptObject`s; any other global is refused."""

    def __init__(self, data: bytes, archive: _Archive):
        super().__init__(io.BytesIO(data))
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return self.archive.placeholder(module, name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a tensor's (empty) backward hooks
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch.jit._pickle" and name in _TYPE_TAG_HELPERS:
            return _identity_helper
        raise UnsafeToRead(f"it pickles {module}.{name}, which the safe reader does not rebuild")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeToRead(f"an unknown persistent reference {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        return self.archive.storage(key, storage_type, numel)

    @staticmethod
    def rebuild_tensor(
        storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, *_: Any
    ) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2's job, on a numpy storage, refusing views outside it."""
        if not isinstance(storage, np.ndarray) or storage.ndim != 1:
            raise UnsafeToRead("a tensor whose storage is not a storage record")
        if hooks:
            raise UnsafeToRead("a tensor with backward hooks")
        dims = (size, stride)
        if (
            not all(isinstance(d, tuple) and all(isinstance(x, int) and x >= 0 for x in d) for d in dims)
            or len(size) != len(stride)
            or not isinstance(offset, int)
            or offset < 0
        ):
            raise UnsafeToRead(
                f"a tensor with a malformed layout (offset {offset!r}, size {size!r}, stride {stride!r})"
            )
        if 0 in size:
            return np.empty(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise UnsafeToRead(
                f"a tensor (offset {offset}, size {size}, stride {stride}) reaching past its storage "
                f"of {storage.size} elements"
            )
        if offset == 0 and int(np.prod(size)) == storage.size and stride == _contiguous_strides(size):
            return storage.reshape(size)  # the usual case: one tensor per storage, no copy
        item = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
        return view.copy()


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, running = [], 1
    for n in reversed(size):
        strides.append(running)
        running *= n
    return tuple(reversed(strides))


def _collect(
    archive: _Archive, obj: _ScriptObject, prefix: str, out: dict[str, np.ndarray], path: tuple[int, ...]
) -> None:
    """state_dict's walk: each module's parameters, then its buffers, then its submodules in order."""
    where = prefix.rstrip(".") or "the top-level module"
    info = archive.class_info(obj.qualified_name)
    if not info.is_module:
        raise UnsafeToRead(f"{where} is a {obj.qualified_name}, not a module")
    if info.has_setstate:
        raise UnsafeToRead(
            f"{where} ({obj.qualified_name}) defines its own __setstate__, so only running its code can tell what it holds"
        )
    if not isinstance(obj.state, dict):
        kind = type(obj.state).__name__
        raise UnsafeToRead(f"{where} ({obj.qualified_name}) was pickled with a {kind} state, not its attributes")
    if id(obj) in path or len(path) > 200:
        raise UnsafeToRead(f"the module tree loops back on itself at {where}")
    state = obj.state
    for name in (*info.parameters, *info.buffers):
        value = state.get(name)
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif value is not None:
            raise UnsafeToRead(f"{prefix + name} is declared a tensor but holds a {type(value).__name__}")
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and archive.class_info(value.qualified_name).is_module:
            _collect(archive, value, f"{prefix}{name}.", out, (*path, id(obj)))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`torch.jit.load(path).state_dict()` as numpy arrays (same names, order, dtypes and bits),
    without running anything the archive contains. Raises `UnsafeToRead` saying why it cannot."""
    try:
        with zipfile.ZipFile(path) as zip_file:
            archive = _Archive(zip_file)
            data_name = archive.prefix + "data.pkl"
            root = _RestrictedUnpickler(zip_file.read(data_name), archive).load()
            if not isinstance(root, _ScriptObject):
                raise UnsafeToRead(f"its data.pkl holds a {type(root).__name__}, not a module")
            out: dict[str, np.ndarray] = {}
            _collect(archive, root, "", out, ())
            return out
    except UnsafeToRead:
        raise
    except (
        pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError, IndexError,
        KeyError, RecursionError, MemoryError, OverflowError, UnicodeDecodeError,
    ) as error:  # fmt: skip
        detail = " ".join(str(error).split())[:200]
        raise UnsafeToRead(
            f"its data.pkl does not unpickle as plain tensors ({type(error).__name__}: {detail})"
        ) from None
