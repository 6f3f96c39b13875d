"""diffusers-format folders (``config.json`` + ``*.safetensors``) ↔ jaxcodec Flax params.

The mapping is mechanical because jaxcodec keeps diffusers' module names: a Flax path
``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel`` is the state-dict key
``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight``. List-valued module
attributes (``_LIST_NAMES``) get their index split off with a dot; leaves are renamed
(``kernel``/``scale`` → ``weight``) and laid out (conv OIHW ↔ HWIO, linear (out, in) ↔ (in, out)).

Safetensors are read with ``safetensors.numpy`` (no torch); bfloat16 tensors, which numpy
cannot name, are read from the raw file through ``ml_dtypes``. Sharded checkpoints
(``*.safetensors.index.json``) are supported.

The text condition (the empty prompt's CLIP embedding, 1×77×1024 for SD 2.x) is an array file
next to the weights: ``empty_prompt_embedding.npy`` (read with ``allow_pickle=False``) or
``empty_prompt_embedding.safetensors`` (one tensor), in the model folder or its parent.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

_LIST_NAMES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
    "blocks",
    "base_to_ctrl",
    "ctrl_to_base",
    "up_connections",
)
_LIST_RE = re.compile(rf"^({'|'.join(_LIST_NAMES)})_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TEXT_CONDITION_NAMES = ("empty_prompt_embedding.npy", "empty_prompt_embedding.safetensors")

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class WeightsMismatchError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected, mis-shaped key."""

    def __init__(self, missing, unexpected, mismatched):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            desc = [f"{k} (checkpoint {a}, model expects {b})" for k, a, b in mismatched]
            parts.append(f"mis-shaped keys ({len(mismatched)}): {', '.join(desc)}")
        super().__init__("checkpoint does not match the model; " + "; ".join(parts))


# ----------------------------------------------------------------------------- key mapping


def flax_path_to_key(path: tuple[str, ...]) -> str:
    """``(down_blocks_0, resnets_1, conv1, kernel)`` → ``down_blocks.0.resnets.1.conv1.weight``."""
    *modules, leaf = path
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    parts = [_LIST_RE.sub(r"\1.\2", m) for m in modules]
    return ".".join([*parts, _LEAF_NAMES[leaf]])


def to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # HWIO → OIHW
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:  # (in, out) → (out, in)
        return value.T
    return value


def from_torch_layout(value: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
    if leaf == "kernel" and ndim == 4:  # OIHW → HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if leaf == "kernel" and ndim == 2:
        return value.T
    return value


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _flatten(tree) -> dict[tuple[str, ...], Any]:
    tree = nn.meta.unbox(tree)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[tuple(str(getattr(p, "key", p)) for p in path)] = leaf
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def state_dict_to_params(
    state: Mapping[str, np.ndarray], template, dtype: Any = np.float32
) -> dict:
    """Convert a diffusers state dict into a params tree shaped like ``template``.

    ``template`` is any params tree (arrays, ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``,
    boxed or not). Raises :class:`WeightsMismatchError` naming every problem at once.
    """
    flat_template = _flatten(template)
    out, missing, mismatched, used = {}, [], [], set()
    for path, leaf in flat_template.items():
        key = flax_path_to_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(state[key])
        expected = _torch_shape(tuple(leaf.shape), path[-1])
        if tuple(value.shape) != expected:
            mismatched.append((key, tuple(value.shape), expected))
            continue
        out[path] = from_torch_layout(value, path[-1], len(leaf.shape)).astype(dtype)
    unexpected = sorted(set(state) - used)
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(sorted(missing), unexpected, mismatched)
    return _unflatten(out)


def params_to_state_dict(params, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The inverse of :func:`state_dict_to_params` (torch layouts, diffusers keys)."""
    return {
        flax_path_to_key(path): np.ascontiguousarray(
            to_torch_layout(np.asarray(v, dtype=np.float32), path[-1]).astype(dtype)
        )
        for path, v in _flatten(params).items()
    }


# ----------------------------------------------------------------------------- files


def _read_raw_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Plain reader for dtypes numpy cannot name (bfloat16)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"]).copy()
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        return safetensors.numpy.load_file(str(path))
    except TypeError:  # numpy has no bfloat16: read the raw buffer
        return _read_raw_safetensors(path)


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if all(v.dtype != ml_dtypes.bfloat16 for v in tensors.values()):
        safetensors.numpy.save_file(tensors, str(path))
        return
    header, offset = {}, 0
    for name in sorted(tensors):
        v = tensors[name]
        header[name] = {
            "dtype": _ST_NAMES[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + v.nbytes],
        }
        offset += v.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(tensors):
            f.write(tensors[name].tobytes())


def read_folder(
    folder: str | os.PathLike, variant: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, state_dict)`` of a diffusers model folder (single or sharded safetensors)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    config = json.loads(config_path.read_text())
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        raise FileNotFoundError(
            f"no {single.name} or {index.name} in {folder} (safetensors present: {found})"
        )
    state: dict[str, np.ndarray] = {}
    for name in files:
        state.update(read_safetensors(folder / name))
    return config, state


def write_folder(
    folder: str | os.PathLike,
    config: Mapping[str, Any],
    params,
    dtype: Any = np.float32,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json`` and weights (sharded, with an index, above ``max_shard_bytes``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    state = params_to_state_dict(params, dtype)
    if max_shard_bytes is None or sum(v.nbytes for v in state.values()) <= max_shard_bytes:
        write_safetensors(state, folder / WEIGHTS_NAME)
        return
    shards, current, size = [], {}, 0
    for key in sorted(state):
        if current and size + state[key].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += state[key].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())}}
    index["weight_map"] = weight_map
    (folder / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------- models


def load_unet(folder: str | os.PathLike, variant: str | None = None, **config_overrides):
    """Load a diffusers ``UNet2DConditionModel`` folder: returns ``(UNetConfig, params)``."""
    from jaxcodec.nn.unet import UNetConfig, unet_param_shapes

    config_dict, state = read_folder(folder, variant)
    config = UNetConfig.from_diffusers(config_dict, **config_overrides)
    params = state_dict_to_params(state, unet_param_shapes(config), dtype=config.params_dtype)
    return config, params


def load_vae(folder: str | os.PathLike, variant: str | None = None, **config_overrides):
    """Load a diffusers ``AutoencoderKL`` folder: returns ``(VAEConfig, params)``."""
    from jaxcodec.nn.vae import VAEConfig, vae_param_shapes

    config_dict, state = read_folder(folder, variant)
    config = VAEConfig.from_diffusers(config_dict, **config_overrides)
    params = state_dict_to_params(state, vae_param_shapes(config), dtype=config.params_dtype)
    return config, params


def load_text_condition(folder: str | os.PathLike) -> np.ndarray:
    """The fixed text condition (empty prompt's embedding) stored next to the weights."""
    folder = Path(folder)
    candidates = [d / n for d in (folder, folder.parent) for n in TEXT_CONDITION_NAMES]
    for path in candidates:
        if path.is_file():
            if path.suffix == ".npy":
                return np.load(path, allow_pickle=False)
            tensors = read_safetensors(path)
            if len(tensors) != 1:
                raise ValueError(f"{path} must hold exactly one tensor, has {sorted(tensors)}")
            return next(iter(tensors.values()))
    raise FileNotFoundError(
        "no text condition found; expected one of "
        + ", ".join(str(p) for p in candidates)
        + " (the empty prompt's text-encoder embedding, e.g. 1x77x1024 for SD 2.x)"
    )


def load_control_adapter(folder: str | os.PathLike, unet_config, variant: str | None = None):
    """Load a diffusers ``ControlNetXSAdapter`` folder for a UNet of ``unet_config``.

    Returns ``(ControlAdapterConfig, adapter_params)``; put the params under ``'adapter'`` next
    to the UNet's under ``'unet'`` for :class:`jaxcodec.nn.control.ControlledUNet`.
    """
    from jaxcodec.nn.control import ControlAdapterConfig, controlled_param_shapes

    config_dict, state = read_folder(folder, variant)
    config = ControlAdapterConfig.from_diffusers(config_dict)
    shapes = controlled_param_shapes(unet_config, config)["adapter"]
    return config, state_dict_to_params(state, shapes, dtype=unet_config.params_dtype)


def random_params(shapes, seed: int = 0) -> dict:
    """Random parameters for a params tree of shapes, drawn with numpy (no XLA compilation):
    kernels N(0, 1/fan_in), norm scales near 1, biases and everything else small. Zero-
    initialised layers get signal too, as trained weights have."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name == "kernel" and len(shape) >= 2:
            return rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.05 * rng.normal(size=shape)).astype(np.float32)
        return (0.02 * rng.normal(size=shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


def write_pipeline(
    folder: str | os.PathLike,
    unet_config,
    unet_params,
    vae_config,
    vae_params,
    text_condition: np.ndarray,
    *,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """An SD-shaped pipeline folder from given weights: ``unet/`` and ``vae/`` (``config.json`` +
    ``diffusion_pytorch_model.safetensors`` in diffusers' names and layouts), the text condition
    as ``empty_prompt_embedding.npy``, and any ``extra_json`` files (relative path → content).

    Written atomically (a temporary folder renamed into place): a folder that exists is
    complete. An existing ``folder`` is kept (another writer finished first) unless
    ``overwrite``, which replaces it.
    """
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_folder(tmp / "unet", unet_config.to_diffusers(), unet_params)
        write_folder(tmp / "vae", vae_config.to_diffusers(), vae_params)
        np.save(tmp / TEXT_CONDITION_NAMES[0], np.asarray(text_condition, np.float32))
        for name, content in (extra_json or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(dict(content), indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700: the usual modes instead
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if overwrite and folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_random_pipeline(
    folder: str | os.PathLike,
    unet_config,
    vae_config,
    text_condition_shape: tuple[int, ...],
    seed: int = 0,
) -> Path:
    """A random SD-shaped pipeline folder (``unet/``, ``vae/``, the empty prompt's embedding)
    in the real formats: what tiny configs and tests train on instead of SD weights.

    Deterministic in ``seed`` (so its digest is stable) and written atomically: a folder that
    exists is complete, and concurrent writers of the same folder do not collide.
    """
    from jaxcodec.nn.unet import unet_param_shapes
    from jaxcodec.nn.vae import vae_param_shapes

    folder = Path(folder)
    if (folder / "unet" / CONFIG_NAME).is_file() and (folder / "vae" / CONFIG_NAME).is_file():
        return folder
    unet = random_params(unet_param_shapes(unet_config), seed)
    vae = random_params(vae_param_shapes(vae_config), seed + 1)
    text = np.random.default_rng(seed + 2).normal(size=text_condition_shape)
    return write_pipeline(folder, unet_config, unet, vae_config, vae, text)
