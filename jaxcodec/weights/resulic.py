"""Official ResULIC checkpoints ↔ jaxcodec params (a converter only: no bundles, no methods).

The official release (``model/compressor.py``, ``model/cldm_zc_xs_*.py`` of NJUVISION's
ResULIC) keeps the trained parts in one LightningModule state dict: ``preprocess_model.*`` —
``ELIC`` (jaxcodec's :class:`~jaxcodec.nn.latent_compressor.LatentCompressor` with
``layout="elic"``) — and ``control_model.*`` — ``CDDM``: its ``ControlModule``
(``control_model.control_model.*``) and the zero convs both ways (``enc_zero_convs_out``,
``enc_zero_convs_in``, ``middle_block_out``, ``dec_zero_convs_out``; jaxcodec's
:class:`~jaxcodec.nn.control.ControlAdapter` in :meth:`ControlAdapterConfig.resulic`'s wiring).
A bare module's own state dict is accepted too. SD parts and schedule buffers are ignored as in
:mod:`jaxcodec.weights.rdeic`, whose adapter and context key rules this module extends (the
base→control convs are the only adapter keys RDEIC lacks).

Not converted: CompressAI's float-derived CDF buffers (jaxcodec rebuilds integer tables from
the weights) and ELIC's ``f_c`` (built by the official ``__init__`` but never called by its
``forward``, ``compress`` or ``decompress``; `to_official` writes zeros there so the official
module loads strictly). The ``scale_list`` control scales are folded into the zero convs that
the official forward multiplies by them (not into ``enc_zero_convs_in``, which it does not).
Transposed convolutions (``hyper_dec``) are torch's ``(in, out, k, k)``, jaxcodec's
``(k, k, in, out)``. Reading never runs code from a checkpoint (see
:func:`jaxcodec.weights.rdeic.read_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.nn.control import ControlAdapterConfig, controlled_param_shapes
from jaxcodec.nn.latent_compressor import LatentCompressor, LatentCompressorConfig
from jaxcodec.nn.unet import UNetConfig
from jaxcodec.weights import diffusers as dw
from jaxcodec.weights import rdeic
from jaxcodec.weights.rdeic import Entry, read_checkpoint

__all__ = ["from_official", "plan", "read_checkpoint", "to_official"]

ELIC_PREFIX, CDDM_PREFIX = "preprocess_model.", "control_model."
SCALE_LIST_KEY = rdeic.SCALE_LIST_KEY
# CompressAI buffers of ELIC's entropy models: rebuilt as integer tables, never read.
REBUILT_BUFFERS = (
    *(k for k in rdeic.REBUILT_BUFFERS if k.startswith("gaussian_conditional.")),
    "entropy_bottleneck._offset",
    "entropy_bottleneck._quantized_cdf",
    "entropy_bottleneck._cdf_length",
    "entropy_bottleneck.target",
    "entropy_bottleneck.likelihood_lower_bound.bound",
)
UNUSED_PREFIX = "f_c."  # official ELIC.f_c: constructed, never called
_ELIC_CHILDREN = (
    "encoder.",
    "hyper_enc.",
    "hyper_dec.",
    "decoder.",
    UNUSED_PREFIX,
    "local_context.",
    "channel_context.",
    "entropy_parameters_anchor.",
    "entropy_parameters_nonanchor.",
    "entropy_bottleneck.",
    "gaussian_conditional.",
)
_CDDM_CHILDREN = (
    "control_model.",
    "enc_zero_convs_out.",
    "enc_zero_convs_in.",
    "dec_zero_convs_out.",
    "middle_block_out.",
    SCALE_LIST_KEY,
)
_SEQUENTIALS = {
    "g_a": "encoder.g_a1",
    "h_a": "hyper_enc.h_a",
    "h_s": "hyper_dec.hyper_dec",
    "g_s": "decoder.g_s",
}
_BOTTLENECK = {"conv1": "branch.0", "conv2": "branch.2", "conv3": "branch.4"}
_RESAMPLING = {"skip_g_a": "downsample", "skip_g_s": "upsample.0", "subpel_conv": "subpel_conv.0"}
_LEAF = {"kernel": "weight", "bias": "bias"}


def _is_transposed(path: tuple[str, ...]) -> bool:
    return path[0] == "h_s" and path[-1] == "kernel"


# ----------------------------------------------------------------------------- key rules


def elic_key(path: tuple[str, ...], config: LatentCompressorConfig) -> str:
    """jaxcodec compressor parameter path (ELIC layout) → official ``ELIC`` key."""
    head, *rest = path
    if head == "context":
        return rdeic.compressor_key(path, config)  # the same context networks as RDEIC's
    if head == "entropy_bottleneck":
        name = rest[0]
        return f"entropy_bottleneck.{name if name == 'quantiles' else '_' + name}"
    if head in _SEQUENTIALS and len(rest) in (2, 3):
        i = int(rest[0].removeprefix("layers_"))
        base, leaf = f"{_SEQUENTIALS[head]}.{i}", _LEAF[rest[-1]]
        if len(rest) == 2:  # a plain conv of the Sequential
            return f"{base}.{leaf}"
        layer = rest[1]
        if i in (0, config.bottlenecks + 1):  # the strided / sub-pixel residual blocks
            layer = _RESAMPLING.get(f"{layer}_{head}", _RESAMPLING.get(layer, layer))
        else:
            layer = _BOTTLENECK[layer]
        return f"{base}.{layer}.{leaf}"
    raise ValueError(f"no official name for compressor parameter {'/'.join(path)}")


def cddm_key(path: tuple[str, ...], unet: UNetConfig) -> str:
    """jaxcodec adapter parameter path (ResULIC wiring) → official ``CDDM`` key: RDEIC's rules
    plus the base→control convs, ``enc_zero_convs_in.k`` reading the output of input block k."""
    head, *rest = path
    lpb, n = unet.layers_per_block, len(unet.block_out_channels)
    leaf = _LEAF.get(rest[-1], rest[-1])
    m = re.fullmatch(r"base_to_ctrl_(\d+)", rest[0])
    if m and head.startswith("down_blocks_"):
        level = int(head.removeprefix("down_blocks_"))
        block = rdeic._input_block(level, int(m.group(1)), lpb)
        return f"enc_zero_convs_in.{block - 1}.0.{leaf}"
    if head == "mid_block" and rest[0] == "base_to_ctrl":
        return f"enc_zero_convs_in.{n * lpb + n - 1}.0.{leaf}"  # after the last input block
    return rdeic.adapter_key(path, unet)


def f_c_shapes(config: LatentCompressorConfig) -> dict[str, tuple[int, ...]]:
    """Official ELIC.f_c's keys and shapes (three transposed convs N → N/2 → N/4 → N/4)."""
    n = config.N
    out = {}
    for i, (cin, cout, k) in zip(
        (0, 2, 4), ((n, n // 2, 5), (n // 2, n // 4, 5), (n // 4, n // 4, 3)), strict=True
    ):
        out[f"f_c.{i}.weight"] = (cin, cout, k, k)
        out[f"f_c.{i}.bias"] = (cout,)
    return out


# ----------------------------------------------------------------------------- the plan


def plan(
    config: LatentCompressorConfig | None,
    unet: UNetConfig | None = None,
    adapter: ControlAdapterConfig | None = None,
) -> dict[str, dict[str, Entry]]:
    """Every official key jaxcodec reads, per module ("elic" with a compressor config, "cddm"
    with the UNet's and the adapter's), with its jaxcodec path and shapes — from parameter
    shapes only (``jax.eval_shape``)."""
    parts = []
    if config is not None:
        if config.layout != "elic" or config.hyper != "factorized":
            raise ValueError("the ResULIC importer converts the ELIC layout, factorized prior")
        side = config.z_stride
        z = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
        init = lambda z: LatentCompressor(config).init(
            {"params": jax.random.key(0)}, z, train=False
        )
        comp = nn.unbox(jax.eval_shape(init, z))["params"]
        parts.append(("compressor", comp, lambda p: elic_key(p, config), "elic"))
    if unet is not None:
        ctrl = nn.unbox(controlled_param_shapes(unet, adapter)["adapter"])
        parts.append(("adapter", ctrl, lambda p: cddm_key(p, unet), "cddm"))
    out: dict[str, dict[str, Entry]] = {}
    for module, tree, key_fn, group in parts:
        out[group] = {}
        for path, leaf in dw._flatten(tree).items():
            shape = tuple(leaf.shape)
            torch_shape = (
                (shape[2], shape[3], shape[0], shape[1])
                if _is_transposed(path)
                else dw._torch_shape(shape, path[-1])
            )
            out[group][key_fn(path)] = Entry(module, path, shape, torch_shape)
    if unet is not None:
        n = len(rdeic._zero_conv_order(unet))
        out["cddm"][SCALE_LIST_KEY] = Entry("scales", (), (n,), (n,))
    return out


def split_state(state: Mapping[str, Any]) -> tuple[dict, dict, list[str], list[str]]:
    """(ELIC keys, CDDM keys, ignored keys, unknown keys) of a full ResULIC LightningModule
    state dict or of one module's own state dict."""
    return rdeic.split_modules(state, (ELIC_PREFIX, CDDM_PREFIX), (_ELIC_CHILDREN, _CDDM_CHILDREN))


def check(
    the_plan: Mapping[str, Mapping[str, Entry]], shapes: Mapping[str, Mapping[str, tuple]]
) -> tuple[list[str], list[str], list[tuple]]:
    """(missing, unexpected, mis-shaped) official keys of ``shapes`` ({module: {key: shape}})
    against the plan; rebuilt buffers and ELIC's unused ``f_c`` count as known."""
    missing, unexpected, mismatched = [], [], []
    for group in ("elic", "cddm"):
        want, have = the_plan.get(group, {}), shapes.get(group, {})
        for key, entry in want.items():
            if key not in have:
                if key != SCALE_LIST_KEY:  # optional: scales default to 1
                    missing.append(key)
            elif tuple(have[key]) != entry.torch_shape:
                mismatched.append((key, tuple(have[key]), entry.torch_shape))
        known = set(want) | (set(REBUILT_BUFFERS) if group == "elic" else set())
        unexpected += [k for k in have if k not in known and not k.startswith(UNUSED_PREFIX)]
    return sorted(missing), sorted(unexpected), mismatched


# ----------------------------------------------------------------------------- conversion


def from_official(
    state: Mapping[str, Any],
    config: LatentCompressorConfig | None,
    unet: UNetConfig | None = None,
    adapter: ControlAdapterConfig | None = None,
) -> tuple[dict, dict[str, Any]]:
    """An official state dict → (params {"compressor", "adapter"}, report).

    The modules converted are those the checkpoint holds among those whose configs are given
    (a bare ``ELIC`` or ``CDDM`` state dict gives that module; ``report["absent"]`` names the
    other). ``report["skipped"]`` maps a reason to every key left out for it. Raises
    :class:`~jaxcodec.weights.diffusers.WeightsMismatchError` naming every unknown, missing and
    mis-shaped key."""
    elic, cddm, ignored, unknown = split_state(state)
    the_plan = plan(config, unet, adapter)
    present = {g: t for g, t in (("elic", elic), ("cddm", cddm)) if t and g in the_plan}
    unknown += [k for g, t in (("elic", elic), ("cddm", cddm)) if g not in the_plan for k in t]
    if not present and not unknown:
        raise dw.WeightsMismatchError(
            [f"{ELIC_PREFIX}* or {CDDM_PREFIX}* (no ResULIC module found)"], [], []
        )
    shapes = {g: {k: np.shape(v) for k, v in t.items()} for g, t in present.items()}
    missing, unexpected, mismatched = check({g: the_plan[g] for g in present}, shapes)
    lightning = any(k.startswith(ELIC_PREFIX) for k in state) or any(
        k.startswith(CDDM_PREFIX + CDDM_PREFIX) for k in state
    )
    if lightning:
        unexpected = [(ELIC_PREFIX if k in elic else CDDM_PREFIX) + k for k in unexpected]
    if missing or unexpected or unknown or mismatched:
        raise dw.WeightsMismatchError(missing, sorted(unexpected + unknown), mismatched)

    # CDDM multiplies zero conv i by scale_list[i] (control_scale is already in the buffer).
    scale_of = rdeic._zero_conv_scales(cddm, unet, 1.0) if "cddm" in present else {}
    flat = {m: {} for m, g in (("compressor", "elic"), ("adapter", "cddm")) if g in present}
    for group, tensors in present.items():
        for key, entry in the_plan[group].items():
            if entry.module not in flat:
                continue
            value = np.asarray(tensors[key], np.float64)
            weight_key = re.sub(r"\.(weight|bias)$", ".weight", key)
            if entry.module == "adapter" and weight_key in scale_of:
                value = value * scale_of[weight_key]  # kernel and bias: the conv is linear
            if _is_transposed(entry.path):
                value = value.transpose(2, 3, 0, 1)
            else:
                value = dw.from_torch_layout(value, entry.path[-1], len(entry.shape))
            flat[entry.module][entry.path] = value.astype(np.float32)
    skipped: dict[str, list[str]] = {}
    for key in ignored:
        skipped.setdefault(rdeic._skip_reason(key), []).append(key)
    prefix = ELIC_PREFIX if lightning else ""
    rebuilt = [prefix + k for k in elic if k in REBUILT_BUFFERS]
    if rebuilt:
        skipped[rdeic.SKIP_REASONS["rebuilt"]] = sorted(rebuilt)
    unused = [prefix + k for k in elic if k.startswith(UNUSED_PREFIX)]
    if unused:
        skipped["ELIC's f_c: built by the official code, never called"] = sorted(unused)
    report = {
        "compressor_parameters": sum(v.size for v in flat.get("compressor", {}).values()),
        "adapter_parameters": sum(v.size for v in flat.get("adapter", {}).values()),
        "absent": [
            m
            for m, g in (("compressor", "elic"), ("adapter", "cddm"))
            if g in the_plan and g not in present
        ],  # fmt: skip
        "skipped": skipped,
        "unused": sorted(unused),
        "scales": sorted({float(s) for s in scale_of.values()}),
    }
    return {k: dw._unflatten(v) for k, v in flat.items()}, report


def to_official(
    params: Mapping[str, Any],
    config: LatentCompressorConfig | None,
    unet: UNetConfig | None = None,
    adapter: ControlAdapterConfig | None = None,
    *,
    lightning: bool = True,
) -> dict[str, np.ndarray]:
    """jaxcodec ResULIC params → the official state dict (torch layouts; Lightning prefixes
    unless ``lightning=False``, which gives the two modules' own keys; ``f_c`` as zeros)."""
    the_plan = plan(config, unet, adapter)
    params = jax.tree.map(np.asarray, nn.unbox(params))
    out = {}
    for group, prefix in (("elic", ELIC_PREFIX), ("cddm", CDDM_PREFIX)):
        if group not in the_plan:
            continue
        prefix = prefix if lightning else ""
        for key, entry in the_plan[group].items():
            if entry.module == "scales":
                value = np.ones(entry.shape)
            else:
                node = params[entry.module]
                for p in entry.path:
                    node = node[p]
                value = np.asarray(node)
                if _is_transposed(entry.path):
                    value = value.transpose(2, 3, 0, 1)
                else:
                    value = dw.to_torch_layout(value, entry.path[-1])
            out[prefix + key] = np.ascontiguousarray(np.asarray(value, np.float32))
        if group == "elic":
            for key, shape in f_c_shapes(config).items():
                out[prefix + key] = np.zeros(shape, np.float32)
    return out
