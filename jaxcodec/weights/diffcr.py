"""Official DiffCR checkpoints ↔ jaxcodec parameters (a pure converter: arrays in, arrays out).

The official release (Darc8-sun/DiffCR@c26465f, ``diffcr_denosing.DiffCR``) keeps its trained
parts in one Lightning state dict: ``compress_model.*`` — ``compressor_v3``, the RDEIC-style
compressor (jaxcodec's :class:`~jaxcodec.nn.latent_compressor.LatentCompressor`, mapped by
RDEIC's rule :func:`jaxcodec.weights.rdeic.compressor_key`) with its frozen ``quant`` pair
(``quant.qconv`` = the SD VAE's ``quant_conv``, ``quant.post_quant_conv``) —, ``tar.*`` — FaSE
(:class:`~jaxcodec.nn.fase.FaSE`) — and ``proj_layer.*`` — the CLIP ``ProjLayer``. A bare
module's own state dict (``compressor_v3``, ``Time_aware_refinementX`` or ``ProjLayer``, keys
without prefix) is accepted too. The SD parts (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``) and the schedule buffers are listed as ignored:
jaxcodec takes them from the SD folder. CompressAI's ``gaussian_conditional`` buffers are
float-derived CDFs; jaxcodec rebuilds integer tables from the weights instead.

jaxcodec computes ĉ with the SD VAE's own ``quant_conv`` (a frozen part), so the pair is
returned beside the parameters (``quant``) for the caller to compare with the VAE it runs on.
The codebook becomes the VQ state, as for RDEIC. Every key is planned from parameter shapes
before a tensor is read; unknown, missing and mis-shaped keys are reported together
(:class:`~jaxcodec.weights.diffusers.WeightsMismatchError`); nothing in a file is executed
(:func:`~jaxcodec.weights.rdeic.read_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.nn.fase import FaSEConfig, ProjLayer, fase_param_shapes
from jaxcodec.nn.latent_compressor import LatentCompressor, LatentCompressorConfig
from jaxcodec.weights import diffusers as dw
from jaxcodec.weights.rdeic import (
    CODEBOOK_KEY,
    EMBED_PROB_KEY,
    REBUILT_BUFFERS,
    SCHEDULE_BUFFERS,
    Entry,
    compressor_key,
    read_checkpoint,
)

PREFIXES = {"compressor": "compress_model.", "fase": "tar.", "proj": "proj_layer."}
IGNORED_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "model_ema.",
)
# compressor_v3's frozen pair: (jaxcodec VAE module, official key stem).
QUANT = {"quant_conv": "quant.qconv", "post_quant_conv": "quant.post_quant_conv"}
_BARE_CHILDREN = {
    "compressor": ("encoder.", "hyper_enc.", "hyper_dec.", "decoder.", "out.", "local_context.",
                   "channel_context.", "entropy_parameters_", "quantize.", "gaussian_conditional.",
                   "quant."),
    "fase": ("FQCA.", "time_embed.", "in_layer.", "emb_layer.", "mid_layer.", "out_layer."),
    "proj": ("dense1.", "dense2.", "LayerNorm."),
}  # fmt: skip
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_FASE_LAYERS = {
    ("fda", "conv_in"): "FQCA.conv_in",
    ("fda", "conv_in_c"): "FQCA.conv_in_c",
    ("fda", "out_conv"): "FQCA.out.0",
    ("fda", "out_norm"): "FQCA.out.1",
    ("time_embedding", "linear_1"): "time_embed.0",
    ("time_embedding", "linear_2"): "time_embed.2",
    ("emb_proj",): "emb_layer.1",
    ("in_conv",): "in_layer.0",
    ("in_norm",): "in_layer.1",
    ("out_conv1",): "out_layer.0",
    ("out_norm",): "out_layer.1",
    ("out_conv2",): "out_layer.3",
}
_BANDS = {"attention_high": "FQCA.cross_attetion_h", "attention_low": "FQCA.cross_attetion_l"}
_PROJ = {"norm": "LayerNorm", "dense1": "dense1", "dense2": "dense2"}


# ----------------------------------------------------------------------------- key rules


def fase_key(path: tuple[str, ...]) -> str:
    """jaxcodec FaSE parameter path → official ``Time_aware_refinementX`` key."""
    *modules, leaf = path
    if tuple(modules) in _FASE_LAYERS:
        return f"{_FASE_LAYERS[tuple(modules)]}.{_LEAF[leaf]}"
    if len(modules) > 2 and modules[0] == "fda" and modules[1] in _BANDS:
        return f"{_BANDS[modules[1]]}.{dw.flax_path_to_key(tuple(path[2:]))}"  # sic: "attetion"
    m = re.fullmatch(r"rrdb_(\d+)", modules[0]) if len(modules) == 3 else None
    if m and re.fullmatch(r"rdb[123]", modules[1]) and re.fullmatch(r"conv[1-5]", modules[2]):
        return f"mid_layer.{m.group(1)}.{modules[1]}.{modules[2]}.{_LEAF[leaf]}"
    raise ValueError(f"no official name for FaSE parameter {'/'.join(path)}")


def proj_key(path: tuple[str, ...]) -> str:
    """jaxcodec ProjLayer parameter path → official ``ProjLayer`` key."""
    if len(path) == 2 and path[0] in _PROJ:
        return f"{_PROJ[path[0]]}.{_LEAF[path[1]]}"
    raise ValueError(f"no official name for ProjLayer parameter {'/'.join(path)}")


# ----------------------------------------------------------------------------- the plan


def _entries(tree, key_fn, module: str) -> dict[str, Entry]:
    out = {}
    for path, leaf in dw._flatten(tree).items():
        shape = tuple(leaf.shape)
        out[key_fn(path)] = Entry(module, path, shape, dw._torch_shape(shape, path[-1]))
    return out


def compressor_plan(config: LatentCompressorConfig, *, quant: bool = True) -> dict[str, Entry]:
    """Every official compressor key (RDEIC's rule), its codebook as VQ state, and (``quant``)
    compressor_v3's frozen pair — from parameter shapes only."""
    h = jax.ShapeDtypeStruct((1, 8, 8, config.in_channels), jnp.float32)
    init = lambda h: LatentCompressor(config).init({"params": jax.random.key(0)}, h, train=False)
    shapes = nn.unbox(jax.eval_shape(init, h))
    out = _entries(shapes["params"], lambda p: compressor_key(p, config), "compressor")
    codebook = tuple(shapes["vq_stats"]["vq"]["codebook"].shape)
    out[CODEBOOK_KEY] = Entry("vq", ("codebook",), codebook, codebook)
    out[EMBED_PROB_KEY] = Entry("vq", ("embed_prob",), codebook[:1], codebook[:1])
    if quant:
        moments, latent = config.out_channels, config.out_channels // 2
        for name, stem, c_in, c_out in (
            ("quant_conv", QUANT["quant_conv"], moments, moments),
            ("post_quant_conv", QUANT["post_quant_conv"], latent, latent),
        ):
            kernel = (1, 1, c_in, c_out)
            out[f"{stem}.weight"] = Entry("quant", (name, "kernel"), kernel, (c_out, c_in, 1, 1))
            out[f"{stem}.bias"] = Entry("quant", (name, "bias"), (c_out,), (c_out,))
    return out


def plan(
    compressor: LatentCompressorConfig,
    fase: FaSEConfig,
    proj_dims: tuple[int, int, int] | None = (1024, 1024, 2048),
) -> dict[str, dict[str, Entry]]:
    """Every official key per module ("compressor", "fase", "proj"; ``proj_dims`` = ProjLayer's
    (in, out, hidden), None for a model without it)."""
    out = {
        "compressor": compressor_plan(compressor),
        "fase": _entries(nn.unbox(fase_param_shapes(fase)), fase_key, "fase"),
    }
    if proj_dims is not None:
        d_in, d_out, hidden = proj_dims
        x = jax.ShapeDtypeStruct((1, 1, d_in), jnp.float32)
        init = lambda x: ProjLayer(d_out, hidden).init(jax.random.key(0), x)  # noqa: E731
        out["proj"] = _entries(nn.unbox(jax.eval_shape(init, x))["params"], proj_key, "proj")
    return out


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, dict], list[str], list[str]]:
    """({module: {key: array}}, ignored keys, unknown keys) of a full DiffCR Lightning state
    dict or of one module's own state dict."""
    full = any(k.startswith(tuple(PREFIXES.values())) for k in state)
    groups: dict[str, dict] = {m: {} for m in PREFIXES}
    ignored, unknown = [], []
    for key, value in state.items():
        module = next(
            (
                m
                for m in PREFIXES
                if (key.startswith(PREFIXES[m]) if full else key.startswith(_BARE_CHILDREN[m]))
            ),
            None,
        )
        if module is not None:
            groups[module][key.removeprefix(PREFIXES[module]) if full else key] = value
        elif key.startswith(IGNORED_PREFIXES) or key in SCHEDULE_BUFFERS:
            ignored.append(key)
        else:
            unknown.append(key)
    return groups, sorted(ignored), sorted(unknown)


def check(
    the_plan: Mapping[str, Mapping[str, Entry]], shapes: Mapping[str, Mapping[str, tuple]]
) -> tuple[list[str], list[str], list[tuple]]:
    """(missing, unexpected, mis-shaped) keys of the modules ``shapes`` holds; the optional
    codebook usage and quant pair may be absent, CompressAI's rebuilt buffers are known."""
    optional = {
        EMBED_PROB_KEY,
        *(f"{s}.{leaf}" for s in QUANT.values() for leaf in ("weight", "bias")),
    }
    missing, unexpected, mismatched = [], [], []
    for module, have in shapes.items():
        want = the_plan.get(module, {})
        missing += [f"{module}: {k}" for k in want if k not in have and k not in optional]
        known = set(want) | (set(REBUILT_BUFFERS) if module == "compressor" else set())
        unexpected += [f"{module}: {k}" for k in have if k not in known]
        mismatched += [
            (f"{module}: {k}", tuple(v), want[k].torch_shape)
            for k, v in have.items()
            if k in want and tuple(v) != want[k].torch_shape
        ]
    return sorted(missing), sorted(unexpected), mismatched


# ----------------------------------------------------------------------------- conversion


def vq_state(codebook: np.ndarray, embed_prob: np.ndarray | None = None) -> dict:
    """The official codebook and its EMA usage probabilities → jaxcodec's ``vq_stats``."""
    codebook = np.asarray(codebook, np.float32)
    k = codebook.shape[0]
    prob = np.full(k, 1.0 / k) if embed_prob is None else np.asarray(embed_prob, np.float64)
    count = np.maximum(prob * k, 1e-3).astype(np.float32)  # never zero: no restart at once
    return {"vq": {"codebook": codebook, "ema_count": count, "ema_sum": codebook * count[:, None]}}


def from_official(
    state: Mapping[str, Any],
    compressor: LatentCompressorConfig,
    fase: FaSEConfig,
    proj_dims: tuple[int, int, int] | None = (1024, 1024, 2048),
) -> tuple[dict, dict, dict, dict[str, Any]]:
    """An official state dict → (params {"compressor", "fase", "proj"} — the modules present —,
    model state {"vq_stats"} (with the compressor), quant {"quant_conv", "post_quant_conv"}
    (when the checkpoint has them), report)."""
    groups, ignored, unknown = split_state(state)
    groups = {m: g for m, g in groups.items() if g}
    if not groups:
        raise dw.WeightsMismatchError([], sorted(state)[:20], [])
    the_plan = plan(compressor, fase, proj_dims)
    shapes = {m: {k: np.shape(v) for k, v in g.items()} for m, g in groups.items()}
    missing, unexpected, mismatched = check(the_plan, shapes)
    if "proj" in groups and proj_dims is None:
        unexpected.append("proj: the model has no ProjLayer (model.condition='empty_prompt')")
    if missing or unexpected or unknown or mismatched:
        raise dw.WeightsMismatchError(missing, sorted(unexpected + unknown), mismatched)

    flat: dict[str, dict] = {}
    for module, tensors in groups.items():
        for key, entry in the_plan[module].items():
            if entry.module == "vq" or key not in tensors:
                continue
            value = np.asarray(tensors[key], np.float64)
            value = dw.from_torch_layout(value, entry.path[-1], len(entry.shape))
            flat.setdefault(entry.module, {})[entry.path] = value.astype(np.float32)
    quant = dw._unflatten(flat.pop("quant", {}))
    params = {k: dw._unflatten(v) for k, v in flat.items()}
    model_state = {}
    if "compressor" in groups:
        comp = groups["compressor"]
        model_state["vq_stats"] = vq_state(comp[CODEBOOK_KEY], comp.get(EMBED_PROB_KEY))
    rebuilt = sorted(k for k in groups.get("compressor", {}) if k in REBUILT_BUFFERS)
    report = {
        "modules": sorted(groups),
        "parameters": {m: sum(v.size for v in f.values()) for m, f in flat.items()},
        "ignored": ignored,  # SD parts and schedule buffers, by name
        "rebuilt": rebuilt,  # CompressAI's float CDF buffers: integer tables are built instead
        "quant": sorted(quant),
    }
    return params, model_state, quant, report


def to_official(
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    compressor: LatentCompressorConfig,
    fase: FaSEConfig,
    proj_dims: tuple[int, int, int] | None = (1024, 1024, 2048),
    quant: Mapping[str, Any] | None = None,
    *,
    lightning: bool = True,
) -> dict[str, np.ndarray]:
    """jaxcodec DiffCR variables → the official state dict (torch layouts; Lightning prefixes
    unless ``lightning=False``). ``quant``: the VAE's quant_conv / post_quant_conv params."""
    the_plan = plan(compressor, fase, proj_dims)
    params = jax.tree.map(np.asarray, nn.unbox(dict(params)))
    trees = {**params, "quant": jax.tree.map(np.asarray, dict(quant or {}))}
    vq = jax.tree.map(np.asarray, state["vq_stats"]["vq"]) if "vq_stats" in state else None
    out = {}
    for module, entries in the_plan.items():
        if module not in params:
            continue
        prefix = PREFIXES[module] if lightning else ""
        for key, entry in entries.items():
            if entry.module == "vq":
                if vq is None:
                    continue
                counts = vq["ema_count"]
                value = vq["codebook"] if key == CODEBOOK_KEY else counts / counts.sum()
            else:
                node = trees.get(entry.module, {})
                for p in entry.path:
                    node = node.get(p) if isinstance(node, Mapping) else None
                if node is None:
                    continue  # the quant pair when not given
                value = dw.to_torch_layout(np.asarray(node), entry.path[-1])
            out[prefix + key] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


__all__ = [
    "PREFIXES",
    "QUANT",
    "check",
    "compressor_plan",
    "fase_key",
    "from_official",
    "plan",
    "proj_key",
    "read_checkpoint",
    "split_state",
    "to_official",
    "vq_state",
]
