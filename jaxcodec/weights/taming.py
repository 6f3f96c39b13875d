"""Importers for DiffO's networks in their public layouts: taming-transformers' VQGAN (the
latent space), DiffO's base-code autoencoder (``EMAVQModelTorch``) and its Swin-UNet
(ResShift's ``UNetModelSwin``).

Reading checkpoints never runs code from them. ``.safetensors`` are plain arrays. PyTorch
``.ckpt``/``.pth`` files are pickles: they are read by
:func:`jaxcodec.metrics.weights.read_torch_state_dict`, an unpickler that rebuilds tensors as
numpy arrays from their raw storages and replaces every other global a file names (Lightning's
callbacks, hyper-parameter objects, anything else) by an inert stand-in — nothing is imported or
called. Safetensors is the format to prefer for files from untrusted sources.

Keys are renamed by rule into the diffusers-style names jaxcodec's modules carry
(``encoder.down.2.block.0.nin_shortcut`` → ``encoder/down_blocks_2/resnets_0/conv_shortcut``;
``input_blocks.4.1.blocks.0.attn.qkv`` → ``unet/down_blocks_1/attentions_0/blocks_0/attn/qkv``)
and laid out for Flax (OIHW → HWIO, (out, in) → (in, out); taming's 1×1-conv attention
projections become dense kernels). Every missing, unexpected or mis-shaped key is reported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from jaxcodec.metrics.weights import WeightsError, read_torch_state_dict
from jaxcodec.weights import diffusers as dw

VQGAN_FORMAT = "jaxcodec-vqgan"  # metadata tag of the files `import-weights --format vqgan` writes
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` or PyTorch checkpoint (see the module doc), by key."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return dw.read_safetensors(path)
    return read_torch_state_dict(path)


# ----------------------------------------------------------------------------- key rules


def _sub(name: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def autoencoder_key(key: str, num_levels: int) -> str | None:
    """taming/LDM ``Encoder``/``Decoder`` key → diffusers ``VQModel`` key (None: not a
    parameter of the autoencoder, e.g. ``loss.*`` or ``quantize.*``)."""
    m = re.match(r"^(encoder|decoder)\.(.*)$", key)
    if not m:
        return key if re.match(r"^(quant_conv|post_quant_conv)\.", key) else None
    part, rest = m.groups()
    rules = [
        (r"^norm_out\.(.*)", lambda g: f"conv_norm_out.{g[0]}"),
        (r"^conv_(in|out)\.(.*)", lambda g: f"conv_{g[0]}.{g[1]}"),
        (r"^mid\.block_([12])\.(.*)", lambda g: f"mid_block.resnets.{int(g[0]) - 1}.{g[1]}"),
        (r"^mid\.attn_1\.(.*)", lambda g: f"mid_block.attentions.0.{_sub(g[0], _ATTENTION)}"),
        (
            r"^down\.(\d+)\.block\.(\d+)\.(.*)",
            lambda g: f"down_blocks.{g[0]}.resnets.{g[1]}.{g[2]}",
        ),
        (
            r"^down\.(\d+)\.attn\.(\d+)\.(.*)",
            lambda g: f"down_blocks.{g[0]}.attentions.{g[1]}.{_sub(g[2], _ATTENTION)}",
        ),
        (r"^down\.(\d+)\.downsample\.(.*)", lambda g: f"down_blocks.{g[0]}.downsamplers.0.{g[1]}"),
        (
            r"^up\.(\d+)\.block\.(\d+)\.(.*)",
            lambda g: f"up_blocks.{num_levels - 1 - int(g[0])}.resnets.{g[1]}.{g[2]}",
        ),
        (
            r"^up\.(\d+)\.attn\.(\d+)\.(.*)",
            lambda g: (
                f"up_blocks.{num_levels - 1 - int(g[0])}.attentions.{g[1]}."
                + _sub(g[2], _ATTENTION)
            ),
        ),
        (
            r"^up\.(\d+)\.upsample\.(.*)",
            lambda g: f"up_blocks.{num_levels - 1 - int(g[0])}.upsamplers.0.{g[1]}",
        ),
    ]
    for pattern, make in rules:
        mm = re.match(pattern, rest)
        if mm:
            new = make(mm.groups())
            return f"{part}.{_sub_resnet(new)}"
    return f"{part}.{rest}"  # unknown: reported as unexpected by the caller


def _sub_resnet(key: str) -> str:
    return re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", key)


def swin_unet_key(key: str, layers_per_block: int, num_levels: int) -> str | None:
    """DiffO/ResShift ``UNetModelSwin`` key → the jaxcodec ``ResShiftDenoiser`` path (dots);
    None for buffers that are recomputed (relative-position index, shift masks)."""
    if key.endswith(("relative_position_index", "attn_mask")):
        return None
    per = layers_per_block + 1
    simple = {
        "time_embed.0": "unet.time_embedding.linear_1",
        "time_embed.2": "unet.time_embedding.linear_2",
    }
    simple |= {"input_blocks.0.0": "unet.conv_in", "out.0": "unet.conv_norm_out"}
    simple |= {"out.2": "unet.conv_out", "conv_in_extended": "conv_in_extended"}
    for old, new in simple.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        k, sub, rest = int(m[1]) - 1, int(m[2]), m[3]
        level, j = divmod(k, per)
        if j == layers_per_block:  # the level's downsampler
            return f"unet.down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        if sub == 0:
            return f"unet.down_blocks.{level}.resnets.{j}.{_sub(rest, _RESBLOCK)}"
        return f"unet.down_blocks.{level}.attentions.{j}.{rest}"
    m = re.match(r"^middle_block\.(\d)\.(.*)$", key)
    if m:
        i, rest = int(m[1]), m[2]
        if i == 1:
            return f"unet.mid_block.attentions.0.{rest}"
        return f"unet.mid_block.resnets.{i // 2}.{_sub(rest, _RESBLOCK)}"
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        (u, i), sub, rest = divmod(int(m[1]), per), int(m[2]), m[3]
        if sub == 0:
            return f"unet.up_blocks.{u}.resnets.{i}.{_sub(rest, _RESBLOCK)}"
        if rest.startswith("conv."):  # Upsample after the level's last resnet
            return f"unet.up_blocks.{u}.upsamplers.0.{rest}"
        return f"unet.up_blocks.{u}.attentions.{i}.{rest}"
    return key


# ----------------------------------------------------------------------------- conversion


def _flax_key(path: tuple[str, ...]) -> tuple[str, str]:
    """(dotted key of a Flax parameter path, its leaf name)."""
    *modules, leaf = path
    parts = [dw._LIST_RE.sub(r"\1.\2", m) for m in modules]
    parts = [re.sub(r"^(blocks)_(\d+)$", r"\1.\2", p) for p in parts]
    name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*parts, name]), leaf


def to_params(state: Mapping[str, np.ndarray], template, dtype=np.float32) -> dict:
    """A renamed state dict → Flax params shaped like ``template`` (dense kernels accept
    1×1-conv weights); raises :class:`diffusers.WeightsMismatchError` naming every problem."""
    flat = dw._flatten(template)
    out, missing, mismatched, used = {}, [], [], set()
    for path, leaf in flat.items():
        key, name = _flax_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(state[key])
        if name == "kernel" and len(leaf.shape) == 2 and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                mismatched.append((key, tuple(value.shape), dw._torch_shape(leaf.shape, name)))
                continue
            value = value[:, :, 0, 0]  # a 1×1 conv used as a linear projection
        expected = dw._torch_shape(tuple(leaf.shape), name)
        if tuple(value.shape) != expected:
            mismatched.append((key, tuple(value.shape), expected))
            continue
        out[path] = dw.from_torch_layout(value, name, len(leaf.shape)).astype(dtype)
    unexpected = sorted(set(state) - used)
    if missing or unexpected or mismatched:
        raise dw.WeightsMismatchError(sorted(missing), unexpected, mismatched)
    return dw._unflatten(out)


def vqgan_state(state: Mapping[str, np.ndarray], num_levels: int) -> tuple[dict, dict]:
    """Splits a taming ``VQModel`` state dict: (renamed autoencoder tensors, the rest by original
    key: ``quantize.*`` and training-only ``loss.*``)."""
    renamed, rest = {}, {}
    for key, value in state.items():
        new = autoencoder_key(key, num_levels)
        if new is None:
            rest[key] = value
        else:
            renamed[new] = value
    return renamed, rest


def vqgan_params(state: Mapping[str, np.ndarray], config) -> tuple[dict, np.ndarray | None]:
    """taming VQGAN state dict → (jaxcodec ``VQModel`` params, codebook or None)."""
    from jaxcodec.nn.vae import vae_param_shapes

    renamed, rest = vqgan_state(state, len(config.block_out_channels))
    codebook = rest.get("quantize.embedding.weight")
    return to_params(renamed, vae_param_shapes(config)), codebook


# ----------------------------------------------------------------------------- jaxcodec files


def save_vqgan(path: str | os.PathLike, config, params, codebook: np.ndarray | None = None):
    """A VQGAN in jaxcodec's format: diffusers-style keys, the architecture in the metadata."""
    from safetensors.numpy import save_file

    tensors = dw.params_to_state_dict(nn.unbox(params))
    if codebook is not None:
        tensors["quantize.embedding.weight"] = np.asarray(codebook, np.float32)
    meta = {"format": VQGAN_FORMAT, "config": json.dumps(config.to_diffusers(), sort_keys=True)}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_vqgan(path: str | os.PathLike, config) -> dict:
    """Host params of a VQGAN file written by :func:`save_vqgan`, checked against ``config``
    (the architecture the method was configured with)."""
    from safetensors import safe_open

    from jaxcodec.nn.vae import VAEConfig, vae_param_shapes

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"VQGAN weights not found: {path}")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if meta.get("format") != VQGAN_FORMAT:
        raise WeightsError(
            f"{path} is not a jaxcodec VQGAN file; convert taming's checkpoint with "
            "`jaxcodec import-weights --format vqgan`"
        )
    stored = VAEConfig.from_diffusers(json.loads(meta["config"]))
    if stored.to_diffusers() != config.to_diffusers():
        raise WeightsError(f"{path} holds a VQGAN of another architecture: {stored}")
    state = dw.read_safetensors(path)
    state.pop("quantize.embedding.weight", None)
    return dw.state_dict_to_params(state, vae_param_shapes(config))


LOSS_REASON = "training-only loss networks (discriminator, LPIPS)"
BUFFER_REASON = "buffers recomputed from the config (relative-position index, shift masks)"


def import_vqgan(src: str | os.PathLike, dst: str | os.PathLike, config) -> dict[str, Any]:
    """taming checkpoint (``.ckpt``/``.pth``/``.safetensors``) → jaxcodec VQGAN file; the report
    names every key left out (``skipped``: reason → keys)."""
    state = read_checkpoint(src)
    params, codebook = vqgan_params(state, config)
    save_vqgan(dst, config, params, codebook)
    dropped = sorted(k for k in state if k.startswith("loss."))
    n = sum(int(np.prod(np.shape(v))) for v in dw._flatten(params).values())
    return {
        "parameters": n,
        "codebook": None if codebook is None else codebook.shape,
        "skipped": {LOSS_REASON: dropped} if dropped else {},
    }


def swin_unet_params(
    state: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    layers_per_block: int,
    num_levels: int,
) -> tuple[dict, list[str]]:
    """DiffO's/ResShift's ``UNetModelSwin`` state dict (``module.`` prefixes of DDP accepted) →
    (params shaped like ``template``, a ``ResShiftDenoiser`` tree without the noise-level
    embedding; the buffers skipped, by key: relative-position indices and shift masks, which
    :mod:`jaxcodec.nn.swin` recomputes)."""
    renamed, skipped = {}, []
    for key, value in state.items():
        new = swin_unet_key(key.removeprefix("module."), layers_per_block, num_levels)
        if new is None:
            skipped.append(key)
        else:
            renamed[new] = value
    return to_params(renamed, template), sorted(skipped)


def base_autoencoder_params(
    state: Mapping[str, np.ndarray], template: Mapping[str, Any]
) -> tuple[dict, dict]:
    """DiffO's base-code ``EMAVQModelTorch`` state dict → (``VQModel`` params shaped like
    ``template``, its EMA codebook as a ``vq_stats`` residual-VQ stage)."""
    base, rest = vqgan_state({k.removeprefix("module."): v for k, v in state.items()}, 1)
    try:
        stage = {
            "codebook": np.asarray(rest.pop("quantize.embedding.weight"), np.float32),
            "ema_count": np.asarray(rest.pop("quantize.embedding.cluster_size"), np.float32),
            "ema_sum": np.asarray(rest.pop("quantize.embedding.embed_avg"), np.float32),
        }
    except KeyError as e:
        raise WeightsError(f"the base-code autoencoder checkpoint lacks {e}") from None
    if rest:
        raise dw.WeightsMismatchError([], sorted(rest), [])
    return to_params(base, template), stage


def diffo_params(
    unet_state: Mapping[str, np.ndarray],
    autoencoder_state: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    layers_per_block: int,
    num_levels: int,
) -> tuple[dict, dict, dict[str, Any]]:
    """DiffO's official checkpoints (``ema_model_*.pth``: the Swin-UNet; ``vq_model_*.pth.tar``:
    the base-code ``EMAVQModelTorch``) → (params of jaxcodec's ``DiffOModel``, ``vq_stats``,
    report: ``skipped`` reason → keys).

    ``template`` is the DiffOModel params tree; the noise-level embedding (jaxcodec's, absent
    from the official model) is set to zero so the imported denoiser ignores it. The official
    codebook becomes the first residual-VQ stage (rate point 0); later stages, which the
    official model lacks, are not returned (the caller keeps their initialisation)."""
    denoiser_template = {k: v for k, v in template["denoiser"].items() if k != "noise_embedding"}
    denoiser, skipped = swin_unet_params(
        unet_state, denoiser_template, layers_per_block=layers_per_block, num_levels=num_levels
    )
    base, stage = base_autoencoder_params(autoencoder_state, template["base"])
    if "noise_embedding" in template["denoiser"]:
        denoiser["noise_embedding"] = _zeros(template["denoiser"]["noise_embedding"])
    report = {"skipped": {BUFFER_REASON: skipped} if skipped else {}}
    return (
        {"base": base, "denoiser": denoiser},
        {"vq_stats": {"rvq": {"stage_0": stage}}},
        report,
    )


def _zeros(tree):
    import jax

    return jax.tree.map(lambda a: np.zeros(a.shape, np.float32), nn.unbox(tree))
