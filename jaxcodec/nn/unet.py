"""One Flax UNet: diffusers' ``UNet2DConditionModel`` (SD 2.x) and, configured, HFD's denoiser.

Layout is NHWC. Submodule names mirror diffusers (``down_blocks_0/resnets_1/conv1`` ↔
``down_blocks.0.resnets.1.conv1``) so that :mod:`jaxcodec.weights.diffusers` converts
checkpoints by rule. Configured without cross-attention (``cross_attention_dim=None``: the
transformers keep self-attention only) and with extra input channels (conditioning by
concatenation), the same module is a pixel-space denoiser.

Blocks are built in ``setup`` so that a control adapter (:mod:`jaxcodec.nn.control`) can step
through the frozen UNet sub-block by sub-block, as ControlNet-XS requires.

Configured with ``attention_block="swin"``, ``attention_layers="first"`` and
``resnet_time_scale_shift="scale_shift"`` it is ResShift's Swin-UNet (DiffO's denoiser) layer for
layer: guided-diffusion resnets with FiLM time conditioning and one Swin layer
(:mod:`jaxcodec.nn.swin`) after the first resnet of every level and in the middle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers
from jaxcodec.nn.attention import ATTENTION_IMPLS, Transformer2D
from jaxcodec.nn.resnet import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_embedding,
)
from jaxcodec.nn.swin import SHIFT_MASKS, SwinLayer

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
ATTENTION_BLOCKS = ("transformer", "swin")
ATTENTION_LAYERS = ("all", "first")
TIME_SCALE_SHIFTS = ("default", "scale_shift")


def _per_block(value, n: int) -> tuple:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"expected {n} per-block values, got {value!r}")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig(layers.DtypeNames):
    """diffusers ``UNet2DConditionModel`` config fields that the SD 2.x family uses.

    ``attention_head_dim`` keeps diffusers' historical meaning: the number of heads when
    ``num_attention_heads`` is None (SD 2.x: 5, 10, 20, 20 heads of 64 channels).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = (5, 10, 20, 20)
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int | None = 1024
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    upcast_attention: bool = False
    sample_size: int = 64
    resnet_time_scale_shift: str = "default"  # "scale_shift": FiLM (guided diffusion, ResShift)
    # jaxcodec-only (not in diffusers' config.json):
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    # Rematerialisation per block: False, True (= "full"), a policy of layers.REMAT_POLICIES,
    # or per block kind, e.g. "resnet=dots,attention=full" (see layers.remat_policy).
    remat: bool | str = False
    # "swin": ResShift's Swin layers instead of transformers (self-attention only); "first":
    # attention after the first resnet of each attention block only (ResShift's Swin-UNet).
    attention_block: str = "transformer"
    attention_layers: str = "all"
    swin_embed_dim: int = 192
    swin_head_channels: int = 32
    swin_window_size: int | tuple[int, ...] = 4  # per down block (up blocks mirror it)
    swin_mid_window_size: int = 2
    swin_depth: int = 2
    swin_mlp_ratio: float = 4.0
    swin_shift_mask: str = "full"  # "resshift": the mask of ResShift's code (nn/swin.py)

    def __post_init__(self):
        n = len(self.block_out_channels)
        for field in ("down_block_types", "up_block_types"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} needs {n} entries")
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        bad += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if self.mid_block_type not in MID_BLOCK_TYPES:
            bad.append(self.mid_block_type)
        if bad:
            raise ValueError(f"unsupported block types {bad}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}")
        for field, allowed in (
            ("attention_block", ATTENTION_BLOCKS),
            ("attention_layers", ATTENTION_LAYERS),
            ("resnet_time_scale_shift", TIME_SCALE_SHIFTS),
            ("swin_shift_mask", SHIFT_MASKS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.attention_block == "swin" and self.cross_attention_dim is not None:
            raise ValueError("swin attention is self-attention only: set cross_attention_dim=None")

    # Derived per-block quantities, as diffusers computes them.
    @property
    def heads(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        return _per_block(heads, len(self.block_out_channels))

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels))

    @property
    def swin_windows(self) -> tuple[int, ...]:
        return _per_block(self.swin_window_size, len(self.block_out_channels))

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides) -> UNetConfig:
        """Build from a diffusers ``config.json`` dict; refuse features this UNet lacks."""
        unsupported = {
            "class_embed_type": None,
            "addition_embed_type": None,
            "num_class_embeds": None,
            "encoder_hid_dim": None,
            "time_embedding_type": "positional",
            "act_fn": "silu",
            "center_input_sample": False,
            "dual_cross_attention": False,
            "only_cross_attention": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "time_cond_proj_dim": None,
            "reverse_transformer_layers_per_block": None,
            "attention_type": "default",
        }
        for key, ok in unsupported.items():
            value = config.get(key, ok)
            if isinstance(value, list | tuple):
                value = value if key != "only_cross_attention" else any(value)
            if value != ok:
                raise ValueError(f"UNet config {key}={value!r} is not supported (need {ok!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict (jaxcodec-only fields dropped)."""
        skip = {"dtype", "param_dtype", "attention_impl", "remat"}
        skip |= {"attention_block", "attention_layers"}
        skip |= {f.name for f in dataclasses.fields(self) if f.name.startswith("swin_")}
        out = {"_class_name": "UNet2DConditionModel", "act_fn": "silu"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _maybe_remat(cls, remat: bool | str, kind: str):
    """``cls`` rematerialised with the policy the config's ``remat`` gives ``kind`` blocks."""
    return layers.remat(cls, remat, kind)


def _attention(c: UNetConfig, channels: int, heads: int, tlayers: int, cross: bool, window: int):
    """One attention layer of a block: a diffusers transformer or a ResShift Swin layer."""
    kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
    if c.attention_block == "swin":
        return _maybe_remat(SwinLayer, c.remat, "attention")(
            c.swin_embed_dim,
            c.swin_head_channels,
            window,
            c.swin_depth,
            c.swin_mlp_ratio,
            c.norm_num_groups,
            c.swin_shift_mask,
            **kw,
        )
    Tr = _maybe_remat(Transformer2D, c.remat, "attention")
    return Tr(
        heads,
        channels // heads,
        tlayers,
        c.norm_num_groups,
        cross,
        c.use_linear_projection,
        c.attention_impl,
        **kw,
    )


def _block_layers(block) -> tuple[list[nn.Module], list[nn.Module]]:
    """The resnets and (if the block has attention) transformers of a down or up block,
    created inside the block's `setup` so they take its names (resnets_i, attentions_i).
    With ``attention_layers="first"`` only the first resnet is followed by attention."""
    c = block.config
    kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
    Res = _maybe_remat(ResnetBlock2D, c.remat, "resnet")
    resnets = [
        Res(
            block.out_channels,
            groups=c.norm_num_groups,
            eps=c.norm_eps,
            time_embedding_norm=c.resnet_time_scale_shift,
            **kw,
        )
        for _ in range(block.num_layers)
    ]
    attentions = []
    if block.has_attention:
        n = 1 if c.attention_layers == "first" else block.num_layers
        attentions = [
            _attention(
                c,
                block.out_channels,
                block.heads,
                block.transformer_layers,
                block.cross_attention,
                block.window,
            )
            for _ in range(n)
        ]
    return resnets, attentions


def _attend(block, i: int, x, context):
    """Attention after resnet ``i``, if the block has one there."""
    if block.has_attention and (block.config.attention_layers == "all" or i == 0):
        return block.attentions[i](x, context)
    return x


class UNetDownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with attention) or ``DownBlock2D`` (without)."""

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    add_downsample: bool
    cross_attention: bool
    config: UNetConfig
    window: int = 0  # Swin window of this block

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        resnets, attentions = _block_layers(self)
        self.resnets = resnets
        if attentions:
            self.attentions = attentions
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, c.downsample_padding, **kw)]

    def __call__(self, x, temb, context):
        outputs = []
        for i in range(self.num_layers):
            x = _attend(self, i, self.resnets[i](x, temb), context)
            outputs.append(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UNetMidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet.

    ``groups``/``groups_out``/``resnet_eps`` override the config for ControlNet-XS adapters,
    whose mid block maps base+control channels to control channels.
    """

    out_channels: int
    heads: int
    transformer_layers: int
    cross_attention: bool
    config: UNetConfig
    groups: int | None = None
    groups_out: int | None = None
    resnet_eps: float | None = None

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        Res = _maybe_remat(ResnetBlock2D, c.remat, "resnet")
        groups = self.groups or c.norm_num_groups
        eps = self.resnet_eps or c.norm_eps
        tnorm = c.resnet_time_scale_shift
        self.resnets = [
            Res(
                self.out_channels,
                groups=groups,
                groups_out=self.groups_out,
                eps=eps,
                time_embedding_norm=tnorm,
                **kw,
            ),
            Res(
                self.out_channels,
                groups=self.groups_out or groups,
                eps=eps,
                time_embedding_norm=tnorm,
                **kw,
            ),
        ]
        if c.attention_block == "swin":
            window = c.swin_mid_window_size
            self.attentions = [_attention(c, self.out_channels, 0, 0, False, window)]
        else:
            Tr = _maybe_remat(Transformer2D, c.remat, "attention")
            self.attentions = [
                Tr(
                    self.heads,
                    self.out_channels // self.heads,
                    self.transformer_layers,
                    self.groups_out or groups,
                    self.cross_attention,
                    c.use_linear_projection,
                    c.attention_impl,
                    **kw,
                )
            ]

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        x = self.resnets[1](x, temb)
        return x


class UNetUpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: each resnet eats one skip (concatenated)."""

    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    add_upsample: bool
    cross_attention: bool
    config: UNetConfig
    window: int = 0  # Swin window of this block

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        resnets, attentions = _block_layers(self)
        self.resnets = resnets
        if attentions:
            self.attentions = attentions
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, **kw)]

    def subblock(self, i, x, skip, temb, context):
        x = self.resnets[i](jnp.concatenate([x, skip], axis=-1), temb)
        return _attend(self, i, x, context)

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i in range(self.num_layers):
            x = self.subblock(i, x, skips[-1 - i], temb, context)
        if self.add_upsample:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet(nn.Module):
    """diffusers ``UNet2DConditionModel`` in Flax (NHWC).

    ``down_block_additional_residuals`` (one per skip, conv_in's output first) and
    ``mid_block_additional_residual`` are added as a ControlNet adds them.
    """

    config: UNetConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        n = len(c.block_out_channels)
        cross = c.cross_attention_dim is not None
        heads, tlayers = c.heads, c.transformer_layers
        self.conv_in = layers.conv(c.block_out_channels[0], 3, name="conv_in", **kw)
        self.time_embedding = TimestepEmbedding(c.time_embed_dim, **kw)
        self.down_blocks = [
            UNetDownBlock(
                c.block_out_channels[i],
                c.layers_per_block,
                c.down_block_types[i] == "CrossAttnDownBlock2D",
                heads[i],
                tlayers[i],
                i < n - 1,
                cross,
                c,
                c.swin_windows[i],
            )
            for i in range(n)
        ]
        if c.mid_block_type is not None:
            self.mid_block = UNetMidBlock(
                c.block_out_channels[-1], heads[-1], tlayers[-1], cross, c
            )
        rev = list(reversed(c.block_out_channels))
        self.up_blocks = [
            UNetUpBlock(
                rev[i],
                c.layers_per_block + 1,
                c.up_block_types[i] == "CrossAttnUpBlock2D",
                heads[n - 1 - i],
                tlayers[n - 1 - i],
                i < n - 1,
                cross,
                c,
                c.swin_windows[n - 1 - i],
            )
            for i in range(n)
        ]
        self.conv_norm_out = layers.group_norm(c.norm_num_groups, c.norm_eps, **kw)
        self.conv_out = layers.conv(c.out_channels, 3, **kw)

    def embed_time(self, timesteps, batch: int):
        c = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        return self.time_embedding(emb.astype(c.compute_dtype))

    def up_and_out(self, x, skips, temb, context):
        """Decoder half: consumes ``skips`` (as produced by the encoder half)."""
        skips = list(skips)
        for block in self.up_blocks:
            block_skips = skips[-block.num_layers :]
            skips = skips[: -block.num_layers]
            size = skips[-1].shape[1:3] if skips else None
            x = block(x, block_skips, temb, context, size)
        return self.output(x)

    def output(self, x):
        x = nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)

    def __call__(
        self,
        sample: jnp.ndarray,
        timesteps: jnp.ndarray,
        encoder_hidden_states: jnp.ndarray | None = None,
        down_block_additional_residuals: Sequence[jnp.ndarray] | None = None,
        mid_block_additional_residual: jnp.ndarray | None = None,
        class_emb: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """``class_emb`` (batch, time_embed_dim) is added to the time embedding, as diffusers adds
        its class embedding (DiffO conditions on the rate point's noise level this way)."""
        c = self.config
        context = encoder_hidden_states
        if c.cross_attention_dim is not None and context is None:
            raise ValueError("this UNet has cross-attention: pass encoder_hidden_states")
        temb = self.embed_time(timesteps, sample.shape[0])
        if class_emb is not None:
            temb = temb + class_emb.astype(temb.dtype)
        x = self.conv_in(sample.astype(c.compute_dtype))
        skips = [x]
        for block in self.down_blocks:
            x, outs = block(x, temb, context)
            skips.extend(outs)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down-block residuals, "
                    f"got {len(down_block_additional_residuals)}"
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if c.mid_block_type is not None:
            x = self.mid_block(x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        return self.up_and_out(x, skips, temb, context)


def unet_param_shapes(config: UNetConfig) -> dict:
    """Parameter shapes (``jax.ShapeDtypeStruct``, logical boxes kept) via ``jax.eval_shape``."""
    side = 2 ** (len(config.block_out_channels) - 1)
    if config.attention_block == "swin":  # every level's side a multiple of its window
        side *= max(*config.swin_windows, config.swin_mid_window_size)
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = None
    if config.cross_attention_dim is not None:
        ctx = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
    module = UNet(config)
    init = lambda a, b, c: module.init(jax.random.key(0), a, b, c)
    return jax.eval_shape(init, x, t, ctx)["params"]


# diffusers' config.json of stabilityai/stable-diffusion-2-1-base/unet (the fields it sets).
SD21_BASE_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "upcast_attention": False,
    "use_linear_projection": True,
}
