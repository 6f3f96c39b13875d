"""Official RDEIC checkpoints ↔ jaxcodec parameters (what `jaxcodec import-weights --format
rdeic` reads; :mod:`jaxcodec.importers` builds the codec bundle from them).

The official release (Li et al., `model/compression.py`, `model/rdeic.py`) keeps the trained
parts in one state dict: ``preprocess_model.*`` — the ``Compression`` module (jaxcodec's
:class:`~jaxcodec.nn.latent_compressor.LatentCompressor`) — and ``control_model.*`` — the
``NoiseEstimator``: its ``ControlModule`` (``control_model.control_model.*``) and zero convs
(``enc_zero_convs_out``, ``middle_block_out``, ``dec_zero_convs_out``; jaxcodec's
:class:`~jaxcodec.nn.control.ControlAdapter` in RDEIC's wiring). A bare module's state dict
(``Compression`` or ``NoiseEstimator`` alone, without those prefixes) gives that module only.
The frozen SD 2.1 parts come from a diffusers folder; if the file carries them as well
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) they are skipped,
as are the diffusion-schedule buffers and CompressAI's ``gaussian_conditional`` buffers
(float-derived CDFs: jaxcodec builds its own integer tables from the imported weights); the
report names every skipped key with its reason.

Every mapping is a rule from a jaxcodec parameter path to an official key (`compressor_key`,
`adapter_key`), so a plan of every expected key and shape exists before any tensor is read
(`plan`), import checks all of them at once (missing, unexpected and mis-shaped keys are listed
by name) and export (`to_official`) is the same table read the other way. The codebook becomes
the VQ state: ``quantize.embedding.weight`` → ``vq_stats/vq/codebook``, ``quantize.embed_prob``
(usage probabilities) → the EMA counts. The official forward multiplies zero conv i by
``scale_list[i] · control_scale`` (``scale_list``, a buffer, holds the training-time control
scale; ``control_scale`` is the run-time config value, an argument here): both are folded into
the zero convs' kernels and biases (exact: they are linear).

Reading checkpoints never runs code from them: ``.safetensors`` are plain arrays; ``.ckpt`` /
``.pth`` pickles go through :func:`jaxcodec.metrics.weights.read_torch_state_dict`, which
rebuilds tensors from raw storages and replaces every other global by an inert stand-in.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.metrics.weights import WeightsError, read_torch_state_dict
from jaxcodec.nn.control import ControlAdapterConfig, controlled_param_shapes
from jaxcodec.nn.latent_compressor import LatentCompressor, LatentCompressorConfig
from jaxcodec.nn.unet import UNetConfig
from jaxcodec.weights import diffusers as dw

COMPRESSION_PREFIX = "preprocess_model."
NOISE_ESTIMATOR_PREFIX = "control_model."
# Parts of a full RDEIC LightningModule state dict that are not trained by RDEIC.
IGNORED_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "model_ema.",
    "perceptual_loss.",
)
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)
# CompressAI's float CDF tables and bounds: rebuilt as integer tables, never read.
REBUILT_BUFFERS = (
    "gaussian_conditional._offset",
    "gaussian_conditional._quantized_cdf",
    "gaussian_conditional._cdf_length",
    "gaussian_conditional.scale_table",
    "gaussian_conditional.scale_bound",
    "gaussian_conditional.likelihood_lower_bound.bound",
    "gaussian_conditional.lower_bound_scale.bound",
    "quantize.usage",
)
CODEBOOK_KEY = "quantize.embedding.weight"
EMBED_PROB_KEY = "quantize.embed_prob"
SCALE_LIST_KEY = "scale_list"
_COMPRESSOR_CHILDREN = (
    "encoder.",
    "hyper_enc.",
    "hyper_dec.",
    "decoder.",
    "out.",
    "local_context.",
    "channel_context.",
    "entropy_parameters_anchor.",
    "entropy_parameters_nonanchor.",
    "quantize.",
    "gaussian_conditional.",
)
_NOISE_ESTIMATOR_CHILDREN = (
    "control_model.",
    "enc_zero_convs_out.",
    "dec_zero_convs_out.",
    "middle_block_out.",
    SCALE_LIST_KEY,
)


# ----------------------------------------------------------------------------- key rules

_TRANSFORMS = {"g_a": "encoder.g_a", "h_a": "hyper_enc.hyper_enc", "h_s": "hyper_dec.hyper_dec"}
_TRANSFORMS["g_s"] = "decoder.g_s"
_CONTEXT = {
    "spatial": "local_context.{k}",
    "channel": "channel_context.{k}.fushion",  # sic: the official name
    "param_anchor": "entropy_parameters_anchor.{k}.fusion",
    "param_nonanchor": "entropy_parameters_nonanchor.{k}.fusion",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def compressor_key(path: tuple[str, ...], config: LatentCompressorConfig) -> str:
    """jaxcodec compressor parameter path → official ``Compression`` key."""
    head, *rest = path
    leaf = _LEAF[rest[-1]]
    m = re.fullmatch(r"(g_a|h_a|h_s|g_s)_(\d+)", head)
    if m:
        name, i = m.group(1), int(m.group(2))
        base = f"{_TRANSFORMS[name]}.{i}"
        if len(rest) == 1:  # a plain conv (g_a's last, g_s's first)
            return f"{base}.{leaf}"
        layer = rest[0]
        if layer == "skip":
            strided = (name == "g_a" and i == config.res_blocks[0]) or (name == "h_a" and i >= 2)
            upsampling = (name == "h_s" and i < 2) or (
                name == "g_s" and i == config.res_blocks[1] + 1
            )
            layer = "downsample" if strided else "upsample.0" if upsampling else "adaptor"
        elif layer == "subpel_conv":
            layer = "subpel_conv.0"
        return f"{base}.{layer}.{leaf}"
    if head == "out":
        return f"out.{leaf}"
    if head == "context":
        m = re.fullmatch(r"(spatial|channel|param_anchor|param_nonanchor)_(\d+)", rest[0])
        if m and len(rest) == 3:
            base = _CONTEXT[m.group(1)].format(k=int(m.group(2)))
            layer = int(rest[1].removeprefix("layer_"))
            return base + (f".{leaf}" if m.group(1) == "spatial" else f".{2 * layer}.{leaf}")
    raise ValueError(f"no official name for compressor parameter {'/'.join(path)}")


_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _ldm_sub(path: tuple[str, ...]) -> str:
    """A resnet / transformer sub-path in LDM names (transformers keep diffusers' names)."""
    if path[0] in _RESNET:
        return f"{_RESNET[path[0]]}.{_LEAF[path[-1]]}"
    return dw.flax_path_to_key(path)


def _input_block(level: int, j: int, layers_per_block: int) -> int:
    """Index in the LDM ``input_blocks`` of level ``level``'s sub-block ``j`` (j ==
    layers_per_block: its downsampler); input_blocks.0 is conv_in."""
    return 1 + level * (layers_per_block + 1) + j


def adapter_key(path: tuple[str, ...], unet: UNetConfig) -> str:
    """jaxcodec adapter parameter path (RDEIC wiring) → official ``NoiseEstimator`` key."""
    head, *rest = path
    lpb = unet.layers_per_block
    cm = "control_model."
    if head == "time_embedding":
        return f"{cm}time_embed.{0 if rest[0] == 'linear_1' else 2}.{_LEAF[rest[-1]]}"
    if head == "conv_in":
        return f"{cm}input_blocks.0.0.{_LEAF[rest[-1]]}"
    if head == "control_to_base_for_conv_in":
        return f"enc_zero_convs_out.0.0.{_LEAF[rest[-1]]}"
    m = re.fullmatch(r"down_blocks_(\d+)", head)
    if m:
        level, sub = int(m.group(1)), rest[0]
        if sub == "downsamplers":
            b = _input_block(level, lpb, lpb)
            return f"{cm}input_blocks.{b}.0.op.{_LEAF[rest[-1]]}"
        kind, j = re.fullmatch(r"(resnets|attentions|ctrl_to_base)_(\d+)", sub).groups()
        b = _input_block(level, int(j), lpb)
        if kind == "ctrl_to_base":
            return f"enc_zero_convs_out.{b}.0.{_LEAF[rest[-1]]}"
        return f"{cm}input_blocks.{b}.{0 if kind == 'resnets' else 1}.{_ldm_sub(tuple(rest[1:]))}"
    if head == "mid_block":
        if rest[0] == "ctrl_to_base":
            return f"middle_block_out.0.{_LEAF[rest[-1]]}"
        kind, j = re.fullmatch(r"(resnets|attentions)_(\d+)", rest[1]).groups()
        index = 1 if kind == "attentions" else 2 * int(j)
        return f"{cm}middle_block.{index}.{_ldm_sub(tuple(rest[2:]))}"
    m = re.fullmatch(r"up_connections_(\d+)", head)
    if m:
        j = int(re.fullmatch(r"ctrl_to_base_(\d+)", rest[0]).group(1))
        k = int(m.group(1)) * (lpb + 1) + j
        return f"dec_zero_convs_out.{k}.0.{_LEAF[rest[-1]]}"
    raise ValueError(f"no official name for adapter parameter {'/'.join(path)}")


def _zero_conv_order(unet: UNetConfig) -> list[str]:
    """Official keys (weights) of the zero convs in ``scale_list`` order: encoder, middle,
    decoder."""
    n, lpb = len(unet.block_out_channels), unet.layers_per_block
    num_enc = 1 + n * lpb + (n - 1)
    return (
        [f"enc_zero_convs_out.{i}.0.weight" for i in range(num_enc)]
        + ["middle_block_out.0.weight"]
        + [f"dec_zero_convs_out.{i}.0.weight" for i in range(n * (lpb + 1))]
    )


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Entry:
    module: str  # "compressor" | "adapter"
    path: tuple[str, ...]  # jaxcodec parameter path inside the module
    shape: tuple[int, ...]  # jaxcodec (Flax) shape
    torch_shape: tuple[int, ...]


def plan(
    compressor: LatentCompressorConfig, unet: UNetConfig, adapter: ControlAdapterConfig
) -> dict[str, dict[str, Entry]]:
    """Every official key jaxcodec expects, per module ("compression", "noise_estimator"), with
    its jaxcodec path and shapes — from parameter shapes only (``jax.eval_shape``)."""
    h = jax.ShapeDtypeStruct((1, 8, 8, compressor.in_channels), jnp.float32)
    init = lambda h: LatentCompressor(compressor).init(
        {"params": jax.random.key(0)}, h, train=False
    )
    comp = nn.unbox(jax.eval_shape(init, h))
    ctrl = nn.unbox(controlled_param_shapes(unet, adapter)["adapter"])
    out: dict[str, dict[str, Entry]] = {"compression": {}, "noise_estimator": {}}
    for module, tree, key_fn, group in (
        ("compressor", comp["params"], lambda p: compressor_key(p, compressor), "compression"),
        ("adapter", ctrl, lambda p: adapter_key(p, unet), "noise_estimator"),
    ):
        for path, leaf in dw._flatten(tree).items():
            shape = tuple(leaf.shape)
            entry = Entry(module, path, shape, dw._torch_shape(shape, path[-1]))
            out[group][key_fn(path)] = entry
    codebook = comp["vq_stats"]["vq"]["codebook"].shape
    out["compression"][CODEBOOK_KEY] = Entry("vq", ("codebook",), codebook, codebook)
    out["compression"][EMBED_PROB_KEY] = Entry("vq", ("embed_prob",), codebook[:1], codebook[:1])
    n = len(_zero_conv_order(unet))
    out["noise_estimator"][SCALE_LIST_KEY] = Entry("scales", (), (n,), (n,))
    return out


def split_modules(
    state: Mapping[str, Any],
    prefixes: tuple[str, str],
    children: tuple[tuple[str, ...], tuple[str, ...]],
) -> tuple[dict, dict, list[str], list[str]]:
    """(first module's keys, second module's keys, ignored keys, unknown keys) of a full
    LightningModule state dict (the modules under `prefixes`; RDEIC's and ResULIC's) or of one
    module's own state dict (keys starting with one of its `children`). SD parts, loss networks
    and schedule buffers are ignored."""
    first, second, ignored, unknown = {}, {}, [], []
    full = any(k.startswith(prefixes[0]) for k in state) or any(
        k.startswith(prefixes[1] + prefixes[1]) for k in state
    )
    for key, value in state.items():
        if full and key.startswith(prefixes[0]):
            first[key.removeprefix(prefixes[0])] = value
        elif full and key.startswith(prefixes[1]):
            second[key.removeprefix(prefixes[1])] = value
        elif not full and key.startswith(children[0]):
            first[key] = value
        elif not full and key.startswith(children[1]):
            second[key] = value
        elif key.startswith(IGNORED_PREFIXES) or key in SCHEDULE_BUFFERS:
            ignored.append(key)
        else:
            unknown.append(key)
    return first, second, sorted(ignored), sorted(unknown)


def split_state(state: Mapping[str, Any]) -> tuple[dict, dict, list[str], list[str]]:
    """(compression keys, noise-estimator keys, ignored keys, unknown keys) of a full RDEIC
    LightningModule state dict or of one module's own state dict."""
    return split_modules(
        state,
        (COMPRESSION_PREFIX, NOISE_ESTIMATOR_PREFIX),
        (_COMPRESSOR_CHILDREN, _NOISE_ESTIMATOR_CHILDREN),
    )


def check(
    the_plan: Mapping[str, Mapping[str, Entry]], shapes: Mapping[str, Mapping[str, tuple]]
) -> tuple[list[str], list[str], list[tuple]]:
    """(missing, unexpected, mis-shaped) official keys of ``shapes`` ({module: {key: shape}})
    against the plan; CompressAI's rebuilt buffers count as known. Only the modules present in
    ``shapes`` are checked (a bare module's state dict)."""
    missing, unexpected, mismatched = [], [], []
    for group in ("compression", "noise_estimator"):
        if group not in shapes:
            continue
        want, have = the_plan[group], shapes[group]
        for key, entry in want.items():
            if key not in have:
                if key not in _OPTIONAL:
                    missing.append(key)
            elif tuple(have[key]) != entry.torch_shape:
                mismatched.append((key, tuple(have[key]), entry.torch_shape))
        known = set(want) | (set(REBUILT_BUFFERS) if group == "compression" else set())
        unexpected += [k for k in have if k not in known]
    return sorted(missing), sorted(unexpected), mismatched


# Keys a checkpoint may lack: EMA usage probabilities (default uniform), the control scales
# (default ones; the official NoiseEstimator always stores them).
_OPTIONAL = (EMBED_PROB_KEY, SCALE_LIST_KEY)
# Why each kind of key is left out of an import (the report lists them under these reasons).
SKIP_REASONS = {
    "model.diffusion_model.": "frozen SD UNet: comes from the diffusers folder (--sd)",
    "first_stage_model.": "frozen SD VAE: comes from the diffusers folder (--sd)",
    "cond_stage_model.": "frozen text encoder: the empty prompt comes from --sd",
    "model_ema.": "EMA copy of the frozen SD UNet",
    "perceptual_loss.": "training-only LPIPS network",
    "schedule": "diffusion-schedule buffers: recomputed from the SD schedule",
    "rebuilt": "CompressAI's float CDF tables: jaxcodec builds integer tables",
}


def _skip_reason(key: str) -> str:
    for prefix in IGNORED_PREFIXES:
        if key.startswith(prefix):
            return SKIP_REASONS[prefix]
    return SKIP_REASONS["schedule"]


def _zero_conv_scales(ne: Mapping[str, Any], unet: UNetConfig, control_scale: float) -> dict:
    """{zero-conv weight key: the factor its output is multiplied by}: the official forward
    multiplies zero conv i by ``scale_list[i] · control_scale`` (``scale_list`` already holds
    the training-time control scale; ``control_scale`` is the run-time config value)."""
    order = _zero_conv_order(unet)
    scales = np.asarray(ne.get(SCALE_LIST_KEY, np.ones(len(order))), np.float64).reshape(-1)
    if scales.shape != (len(order),):
        raise dw.WeightsMismatchError(
            [], [], [(SCALE_LIST_KEY, tuple(np.shape(ne[SCALE_LIST_KEY])), (len(order),))]
        )
    return dict(zip(order, scales * float(control_scale), strict=True))


# ----------------------------------------------------------------------------- conversion


def from_official(
    state: Mapping[str, Any],
    compressor: LatentCompressorConfig,
    unet: UNetConfig,
    adapter: ControlAdapterConfig,
    *,
    control_scale: float = 1.0,
) -> tuple[dict, dict, dict[str, Any]]:
    """An official state dict → (params {"compressor", "adapter"}, state {"vq_stats"}, report).

    A bare module's state dict gives that module only (the other is absent from params and
    state, and ``report["absent"]`` names it). ``control_scale`` is the official run-time
    ``control_scale`` (a config value, not in the checkpoint); with the stored ``scale_list``
    it is folded into the zero convolutions' kernels and biases (exact: they are linear).
    ``report["skipped"]`` maps a reason to every key left out for it. Raises
    :class:`~jaxcodec.weights.diffusers.WeightsMismatchError` naming every unknown, missing and
    mis-shaped key."""
    comp, ne, ignored, unknown = split_state(state)
    the_plan = plan(compressor, unet, adapter)
    groups = {"compression": comp, "noise_estimator": ne}
    present = {g: tensors for g, tensors in groups.items() if tensors}
    if not present and not unknown:
        raise dw.WeightsMismatchError(
            [f"{COMPRESSION_PREFIX}* or {NOISE_ESTIMATOR_PREFIX}* (no RDEIC module found)"], [], []
        )
    shapes = {g: {k: np.shape(v) for k, v in t.items()} for g, t in present.items()}
    missing, unexpected, mismatched = check(the_plan, shapes)
    lightning = any(
        k.startswith(COMPRESSION_PREFIX) or k.startswith("control_model.control_model.")
        for k in state
    )
    if lightning:
        prefixes = {"compression": COMPRESSION_PREFIX, "noise_estimator": NOISE_ESTIMATOR_PREFIX}
        unexpected = [
            prefixes["compression" if k in comp else "noise_estimator"] + k for k in unexpected
        ]
    if missing or unexpected or unknown or mismatched:
        raise dw.WeightsMismatchError(missing, sorted(unexpected + unknown), mismatched)

    scale_of = _zero_conv_scales(ne, unet, control_scale) if ne else {}
    flat = {"compressor": {}, "adapter": {}}
    for group, tensors in present.items():
        for key, entry in the_plan[group].items():
            if entry.module not in flat:
                continue
            value = np.asarray(tensors[key], np.float64)
            weight_key = re.sub(r"\.(weight|bias)$", ".weight", key)
            if entry.module == "adapter" and weight_key in scale_of:
                value = value * scale_of[weight_key]  # kernel and bias: the conv is linear
            value = dw.from_torch_layout(value, entry.path[-1], len(entry.shape))
            flat[entry.module][entry.path] = value.astype(np.float32)
    params = {k: dw._unflatten(v) for k, v in flat.items() if v}
    skipped: dict[str, list[str]] = {}
    for key in ignored:
        skipped.setdefault(_skip_reason(key), []).append(key)
    rebuilt = [COMPRESSION_PREFIX * lightning + k for k in comp if k in REBUILT_BUFFERS]
    if rebuilt:
        skipped[SKIP_REASONS["rebuilt"]] = sorted(rebuilt)
    report = {
        "compressor_parameters": sum(v.size for v in flat["compressor"].values()),
        "adapter_parameters": sum(v.size for v in flat["adapter"].values()),
        "absent": [m for m, g in (("compressor", comp), ("adapter", ne)) if not g],
        "skipped": skipped,
        "ignored": ignored,
    }
    variables: dict[str, Any] = {}
    if comp:
        codebook = np.asarray(comp[CODEBOOK_KEY], np.float32)
        num_codes = codebook.shape[0]
        prob = comp.get(EMBED_PROB_KEY, np.full(num_codes, 1.0 / num_codes))
        prob = np.asarray(prob, np.float64)
        # EMA counts on the scale of one batch of codes, never zero (no dead-code restart).
        count = np.maximum(prob * num_codes, 1e-3).astype(np.float32)
        vq = {"codebook": codebook, "ema_count": count, "ema_sum": codebook * count[:, None]}
        variables["vq_stats"] = {"vq": vq}
        report["codebook"] = tuple(codebook.shape)
    if ne:
        report["scales"] = sorted({float(s) for s in scale_of.values()})
    return params, variables, report


def to_official(
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    compressor: LatentCompressorConfig,
    unet: UNetConfig,
    adapter: ControlAdapterConfig,
    *,
    lightning: bool = True,
) -> dict[str, np.ndarray]:
    """jaxcodec RDEIC variables → the official state dict (torch layouts; Lightning prefixes
    unless ``lightning=False``, which gives the two modules' own keys)."""
    the_plan = plan(compressor, unet, adapter)
    params = jax.tree.map(np.asarray, nn.unbox(params))
    vq = jax.tree.map(np.asarray, state["vq_stats"]["vq"])
    out = {}
    for group, prefix in (
        ("compression", COMPRESSION_PREFIX),
        ("noise_estimator", NOISE_ESTIMATOR_PREFIX),
    ):
        prefix = prefix if lightning else ""
        for key, entry in the_plan[group].items():
            if entry.module == "vq":
                value = (
                    vq["codebook"]
                    if key == CODEBOOK_KEY
                    else vq["ema_count"] / vq["ema_count"].sum()
                )
            elif entry.module == "scales":
                value = np.ones(entry.shape)
            else:
                node = params[entry.module]
                for p in entry.path:
                    node = node[p]
                value = dw.to_torch_layout(np.asarray(node), entry.path[-1])
            out[prefix + key] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


# ----------------------------------------------------------------------------- files


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` file or a PyTorch ``.ckpt``/``.pth`` (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return dw.read_safetensors(path)
    return read_torch_state_dict(path)
