"""open_clip / Hugging Face CLIP checkpoints ↔ :mod:`jaxcodec.nn.clip` params, without torch.

Two naming schemes load into the same Flax trees:

- **open_clip** (``open_clip_model.safetensors`` of a hub folder, or a ``CLIP`` state dict saved
  as safetensors): text keys at the top level (``token_embedding.weight``,
  ``transformer.resblocks.3.attn.in_proj_weight``, ``ln_final.*``, ``text_projection``), image
  keys under ``visual.``; ``CustomTextCLIP`` puts the text tower under ``text.``; a bare tower's
  own state dict has no prefix.
- **transformers** (``CLIPModel``, ``CLIPTextModel`` — SD 2.x's ``text_encoder`` folder —,
  ``CLIPTextModelWithProjection``, ``CLIPVisionModelWithProjection``): ``text_model.*`` /
  ``vision_model.*`` with separate ``q_proj``/``k_proj``/``v_proj`` (concatenated here into
  open_clip's fused ``in_proj``), ``text_projection.weight``, ``visual_projection.weight``.

Only safetensors are read (``safetensors.numpy``; bfloat16 through ml_dtypes): pickled
``.bin``/``.pt`` checkpoints can run code when loaded and are refused with a message naming them.
A checkpoint that does not fit the model raises one
:class:`~jaxcodec.weights.diffusers.WeightsMismatchError` listing every missing, unexpected and
mis-shaped key. Keys of the other tower and non-parameters (``logit_scale``, ``position_ids``)
are not "unexpected" when one tower is loaded.

Configs come from the folder (``open_clip_config.json``'s ``model_cfg``/``preprocess_cfg``, or
transformers' ``config.json``) or are passed in (e.g. ``CLIPConfig.from_open_clip(clip.VIT_H_14)``
for a bare safetensors file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxcodec.nn.clip import (
    CLIPConfig,
    TextConfig,
    VisionConfig,
    text_param_shapes,
    vision_param_shapes,
)
from jaxcodec.weights.diffusers import (
    WeightsMismatchError,
    _flatten,
    _unflatten,
    read_safetensors,
    write_safetensors,
)

NAMINGS = ("open_clip", "transformers")
OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_CONFIG = "config.json"
# Weight files looked for in a folder, in this order (a sharded index is also accepted).
WEIGHT_NAMES = ("open_clip_model.safetensors", "model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Entries that are not tower parameters (buffers some exporters keep, the contrastive scale).
_NON_PARAMS = re.compile(r"^(logit_scale|logit_bias|attn_mask|.*position_ids)$")

Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one Flax leaf is stored: under ``keys`` (torch shapes ``shapes``), read with
    ``load(arrays) -> leaf`` and written with ``save(leaf) -> arrays``."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    load: Callable[[Arrays], np.ndarray]
    save: Callable[[np.ndarray], Arrays]


def _same(key: str, shape) -> _Spec:
    return _Spec((key,), (tuple(shape),), lambda a: a[0], lambda v: [v])


def _linear(key: str, shape) -> _Spec:  # Flax (in, out) ↔ torch (out, in)
    return _Spec((key,), (tuple(shape[::-1]),), lambda a: a[0].T, lambda v: [v.T])


def _conv(key: str, shape) -> _Spec:  # HWIO ↔ OIHW
    h, w, i, o = shape
    return _Spec(
        (key,),
        ((o, i, h, w),),
        lambda a: a[0].transpose(2, 3, 1, 0),
        lambda v: [v.transpose(3, 2, 0, 1)],
    )


def _qkv(prefix: str, leaf: str, shape) -> _Spec:
    """open_clip's fused in_proj from transformers' separate q/k/v projections."""
    keys = tuple(f"{prefix}.{p}_proj.{'weight' if leaf == 'kernel' else 'bias'}" for p in "qkv")
    if leaf == "kernel":
        width = shape[0]
        return _Spec(
            keys,
            ((width, width),) * 3,
            lambda a: np.concatenate(a, axis=0).T,
            lambda v: list(np.split(v.T, 3, axis=0)),
        )
    return _Spec(
        keys,
        ((shape[0] // 3,),) * 3,
        lambda a: np.concatenate(a),
        lambda v: list(np.split(v, 3)),
    )


def _leaf_spec(key: str, leaf: str, shape) -> _Spec:
    """``module.path`` + Flax leaf → torch key with the layout rule of that leaf kind."""
    if leaf == "kernel" and len(shape) == 4:
        return _conv(f"{key}.weight", shape)
    if leaf == "kernel":
        return _linear(f"{key}.weight", shape)
    if leaf in ("scale", "embedding"):
        return _same(f"{key}.weight", shape)
    if leaf == "bias":
        return _same(f"{key}.bias", shape)
    raise ValueError(f"no checkpoint name for parameter {key}/{leaf}")


def _module_key(parts) -> str:
    return ".".join(re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", p) for p in parts)


def _open_clip_spec(path: tuple[str, ...], shape, prefix: str, proj_bias: bool) -> _Spec:
    *modules, leaf = path
    if not modules:  # class_embedding, positional_embedding
        return _same(prefix + leaf, shape)
    key = prefix + _module_key(modules)
    if modules[-1] == "in_proj":  # torch MultiheadAttention's fused parameters
        name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
        spec = _linear if leaf == "kernel" else _same
        return spec(prefix + _module_key(modules[:-1]) + "." + name, shape)
    if modules == ["proj"] or (modules == ["text_projection"] and not proj_bias):
        return _same(key, shape)  # plain (width, output_dim) matrices, used as x @ proj
    return _leaf_spec(key, leaf, shape)


_HF_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "c_fc": "fc1", "c_proj": "fc2"}
_HF_BLOCK |= {"attn": "self_attn"}


def _transformers_spec(path: tuple[str, ...], shape, root: str) -> _Spec:
    *modules, leaf = path
    if modules[:1] == ["transformer"]:
        _, block, *rest = modules
        prefix = f"{root}encoder.layers.{block.split('_')[1]}"
        if rest[-1] == "in_proj":
            return _qkv(f"{prefix}.self_attn", leaf, shape)
        return _leaf_spec(".".join([prefix, *(_HF_BLOCK.get(m, m) for m in rest)]), leaf, shape)
    if not modules:  # positional_embedding, class_embedding
        name = "position_embedding.weight" if leaf == "positional_embedding" else leaf
        return _same(f"{root}embeddings.{name}", shape)
    names = {
        "token_embedding": f"{root}embeddings.token_embedding",
        "conv1": f"{root}embeddings.patch_embedding",
        "ln_final": f"{root}final_layer_norm",
        "ln_pre": f"{root}pre_layrnorm",  # sic: transformers' spelling
        "ln_post": f"{root}post_layernorm",
        "text_projection": "text_projection",
        "proj": "visual_projection",
    }
    return _leaf_spec(names[modules[0]], leaf, shape)


# transformers' bare CLIPTextModel / CLIPVisionModel (as saved since transformers 5) have no
# text_model. / vision_model. prefix.
_HF_BARE = ("embeddings.token_embedding.weight", "embeddings.patch_embedding.weight")


def detect_naming(state: Mapping[str, Any]) -> str:
    hf = any(k.startswith(("text_model.", "vision_model.")) for k in state)
    return "transformers" if hf or any(k in state for k in _HF_BARE) else "open_clip"


def _tower_prefix(state: Mapping[str, Any], tower: str, naming: str) -> str:
    if naming == "transformers":
        root = "text_model." if tower == "text" else "vision_model."
        return root if any(k.startswith(root) for k in state) else ""
    if tower == "vision":
        return "visual." if any(k.startswith("visual.") for k in state) else ""
    return "text." if "text.token_embedding.weight" in state else ""


def _belongs(key: str, tower: str, naming: str, prefix: str) -> bool:
    """Whether ``key`` is a parameter of ``tower`` (and so must be used when loading it)."""
    if _NON_PARAMS.match(key):
        return False
    if naming == "transformers":
        if not prefix:  # a bare one-tower model
            return True
        projection = "text_projection.weight" if tower == "text" else "visual_projection.weight"
        return key.startswith(prefix) or key == projection
    if prefix:
        return key.startswith(prefix)
    other = "visual." if tower == "text" else "text."
    return not key.startswith(other) and not (tower == "vision" and key == "text_projection")


def _specs(template, tower: str, naming: str, prefix: str, proj_bias: bool):
    for path, leaf in _flatten(template).items():
        if naming == "open_clip":
            yield path, leaf, _open_clip_spec(path, leaf.shape, prefix, proj_bias)
        else:
            yield path, leaf, _transformers_spec(path, leaf.shape, prefix)


def tower_params(
    state: Mapping[str, np.ndarray],
    config: TextConfig | VisionConfig,
    naming: str | None = None,
    dtype: Any = None,
) -> dict:
    """One tower's params (open_clip or transformers naming, detected unless given).

    Raises :class:`WeightsMismatchError` naming every missing, unexpected or mis-shaped key of
    that tower.
    """
    tower = "text" if isinstance(config, TextConfig) else "vision"
    naming = naming or detect_naming(state)
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    prefix = _tower_prefix(state, tower, naming)
    template = text_param_shapes(config) if tower == "text" else vision_param_shapes(config)
    proj_bias = getattr(config, "proj_bias", False)
    dtype = config.params_dtype if dtype is None else dtype
    out, missing, mismatched, used = {}, [], [], set()
    for path, _, spec in _specs(template, tower, naming, prefix, proj_bias):
        absent = [k for k in spec.keys if k not in state]
        if absent:
            missing.extend(absent)
            continue
        used.update(spec.keys)
        arrays = [np.asarray(state[k]) for k in spec.keys]
        bad = [
            (k, tuple(a.shape), s)
            for k, a, s in zip(spec.keys, arrays, spec.shapes, strict=True)
            if tuple(a.shape) != s
        ]
        if bad:
            mismatched.extend(bad)
            continue
        out[path] = np.asarray(spec.load([a.astype(np.float32) for a in arrays])).astype(dtype)
    unexpected = sorted(k for k in state if _belongs(k, tower, naming, prefix) and k not in used)
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(sorted(missing), unexpected, mismatched)
    return _unflatten(out)


def to_state_dict(
    config: CLIPConfig,
    text_params=None,
    vision_params=None,
    naming: str = "open_clip",
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """The inverse of :func:`tower_params`: open_clip's ``CLIP`` layout (text at the top level,
    image under ``visual.``) or transformers' ``CLIPModel`` layout."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    state: dict[str, np.ndarray] = {}
    prefixes = ("", "visual.") if naming == "open_clip" else ("text_model.", "vision_model.")
    towers = (("text", text_params, prefixes[0]), ("vision", vision_params, prefixes[1]))
    for tower, params, prefix in towers:
        if params is None:
            continue
        cfg = config.text if tower == "text" else config.vision
        proj_bias = getattr(cfg, "proj_bias", False)
        flat = _flatten(params)
        for path, _, spec in _specs(params, tower, naming, prefix, proj_bias):
            arrays = spec.save(np.asarray(flat[path], dtype=np.float32))
            for key, value in zip(spec.keys, arrays, strict=True):
                state[key] = np.ascontiguousarray(value).astype(dtype)
    return state


# ----------------------------------------------------------------------------- configs


def config_from_transformers(config: Mapping[str, Any], state_keys=()) -> CLIPConfig:
    """A :class:`CLIPConfig` from transformers' ``config.json`` (``CLIPConfig``,
    ``CLIPTextConfig`` or ``CLIPVisionConfig``). Projections exist when ``state_keys`` holds
    them (``CLIPTextModel``, e.g. SD 2.x's text encoder, has none); field defaults are
    transformers' own."""
    keys = set(state_keys)
    model_type = config.get("model_type", "clip")
    if model_type == "clip":
        text_cfg, vision_cfg = config.get("text_config", {}), config.get("vision_config", {})
        projection = config.get("projection_dim", 512)
    elif model_type == "clip_text_model":
        text_cfg, vision_cfg, projection = config, None, config.get("projection_dim", 512)
    elif model_type == "clip_vision_model":
        text_cfg, vision_cfg, projection = None, config, config.get("projection_dim", 512)
    else:
        raise ValueError(f"not a transformers CLIP config (model_type {model_type!r})")

    def act(cfg) -> bool:
        hidden_act = cfg.get("hidden_act", "quick_gelu")
        if hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP activation {hidden_act!r}")
        return hidden_act == "quick_gelu"

    text = vision = None
    if text_cfg is not None:
        width = text_cfg.get("hidden_size", 512)
        text = TextConfig(
            context_length=text_cfg.get("max_position_embeddings", 77),
            vocab_size=text_cfg.get("vocab_size", 49408),
            width=width,
            heads=text_cfg.get("num_attention_heads", 8),
            layers=text_cfg.get("num_hidden_layers", 12),
            mlp_ratio=text_cfg.get("intermediate_size", 2048) / width,
            output_dim=projection if "text_projection.weight" in keys else None,
            quick_gelu=act(text_cfg),
            eps=text_cfg.get("layer_norm_eps", 1e-5),
        )
    if vision_cfg is not None:
        width = vision_cfg.get("hidden_size", 768)
        vision = VisionConfig(
            image_size=vision_cfg.get("image_size", 224),
            patch_size=vision_cfg.get("patch_size", 32),
            width=width,
            head_width=width // vision_cfg.get("num_attention_heads", 12),
            layers=vision_cfg.get("num_hidden_layers", 12),
            mlp_ratio=vision_cfg.get("intermediate_size", 3072) / width,
            output_dim=projection if "visual_projection.weight" in keys else None,
            quick_gelu=act(vision_cfg),
            eps=vision_cfg.get("layer_norm_eps", 1e-5),
        )
    return CLIPConfig(text=text, vision=vision)


# ----------------------------------------------------------------------------- files


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    names = WEIGHT_NAMES
    if variant:
        names = tuple(n.replace(".safetensors", f".{variant}.safetensors") for n in names)
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / n for n in sorted(set(weight_map.values()))]
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickled = [n for n in found if n.endswith(_PICKLE_SUFFIXES)]
    hint = (
        f"; pickled checkpoints ({', '.join(pickled)}) are never loaded (unpickling can run code):"
        " convert them to safetensors"
        if pickled
        else ""
    )
    raise FileNotFoundError(f"no {' or '.join(names)} in {folder} (files: {found}){hint}")


def read_state_dict(path: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, or of a folder's (possibly sharded) weights."""
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise ValueError(
                f"{path} is not a safetensors file; pickled checkpoints are never loaded"
                " (unpickling can run code): convert it to safetensors"
            )
        return read_safetensors(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state: dict[str, np.ndarray] = {}
    for file in _weight_files(path, variant):
        state.update(read_safetensors(file))
    return state


def read_config(folder: str | os.PathLike, state_keys=()) -> CLIPConfig:
    """The config stored in a checkpoint folder (open_clip's, else transformers')."""
    folder = Path(folder)
    if (folder / OPEN_CLIP_CONFIG).is_file():
        cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        return CLIPConfig.from_open_clip(cfg["model_cfg"], cfg.get("preprocess_cfg"))
    if (folder / HF_CONFIG).is_file():
        return config_from_transformers(json.loads((folder / HF_CONFIG).read_text()), state_keys)
    raise FileNotFoundError(
        f"no {OPEN_CLIP_CONFIG} or {HF_CONFIG} in {folder}: pass the config explicitly"
        " (e.g. CLIPConfig.from_open_clip(jaxcodec.nn.clip.VIT_H_14))"
    )


def load(
    path: str | os.PathLike,
    config: CLIPConfig | None = None,
    towers: tuple[str, ...] = ("text", "vision"),
    variant: str | None = None,
) -> tuple[CLIPConfig, dict[str, dict]]:
    """Load towers from a checkpoint folder or safetensors file.

    Returns ``(config, {"text": params, "vision": params})`` with the requested towers that the
    checkpoint has (a tower whose config is None is skipped; asking for it explicitly when the
    checkpoint lacks it raises).
    """
    path = Path(path)
    state = read_state_dict(path, variant)
    if config is None:
        if not path.is_dir():
            raise ValueError(f"{path} is a bare file: pass its CLIPConfig")
        config = read_config(path, state.keys())
    params = {}
    for tower in towers:
        cfg = getattr(config, tower, None)
        if tower not in ("text", "vision"):
            raise ValueError(f"towers are 'text' and/or 'vision', got {tower!r}")
        if cfg is None:
            raise ValueError(f"{path} has no {tower} tower")
        params[tower] = tower_params(state, cfg)
    return config, params


def save(
    folder: str | os.PathLike,
    config: CLIPConfig,
    model_cfg: Mapping[str, Any],
    text_params=None,
    vision_params=None,
    dtype: Any = np.float32,
) -> None:
    """Write an open_clip hub-style folder (``open_clip_config.json`` + safetensors), e.g. to
    ship converted or fine-tuned towers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {}
    if config.vision is not None:
        preprocess = {"mean": list(config.vision.mean), "std": list(config.vision.std)}
        preprocess["interpolation"] = "bicubic"
        preprocess["resize_mode"] = "shortest"
    cfg = {"model_cfg": dict(model_cfg), "preprocess_cfg": preprocess}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(cfg, indent=2))
    state = to_state_dict(config, text_params, vision_params, dtype=dtype)
    write_safetensors(state, folder / WEIGHT_NAMES[0])


def checkpoint_shapes(config: CLIPConfig, naming: str = "open_clip") -> dict[str, tuple[int, ...]]:
    """Every key (and torch shape) a checkpoint of ``config``'s towers holds in ``naming``'s
    ``CLIP``/``CLIPModel`` layout, from ``jax.eval_shape`` alone (nothing allocated)."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    prefixes = ("", "visual.") if naming == "open_clip" else ("text_model.", "vision_model.")
    shapes: dict[str, tuple[int, ...]] = {}
    for tower, cfg, prefix in (
        ("text", config.text, prefixes[0]),
        ("vision", config.vision, prefixes[1]),
    ):
        if cfg is None:
            continue
        template = text_param_shapes(cfg) if tower == "text" else vision_param_shapes(cfg)
        for _, _, spec in _specs(template, tower, naming, prefix, getattr(cfg, "proj_bias", False)):
            shapes.update(zip(spec.keys, spec.shapes, strict=True))
    return shapes


def checkpoint_keys(path: str | os.PathLike, variant: str | None = None) -> list[str]:
    """The tensor names of a checkpoint file or folder, read from the safetensors headers only
    (nothing is loaded: enough to tell its config and naming)."""
    from safetensors import safe_open

    path = Path(path)
    files = [path] if path.is_file() else _weight_files(path, variant)
    keys: list[str] = []
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            keys += list(f.keys())
    return keys
