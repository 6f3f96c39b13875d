"""Flax ``AutoencoderKL`` (the SD VAE) and ``VQModel`` (taming's VQGAN), NHWC, diffusers' names.

``encode`` returns every representation a codec here builds on:
- ``feature``: the encoder's last hidden map before ``conv_out`` (after mid block, GroupNorm
  and SiLU): 512 channels at H/8 for SD — RDEIC's compressor input;
- ``moments_pre_quant``: ``conv_out``'s 2·latent channels (before ``quant_conv``) — DiffCR's;
- ``moments``: after ``quant_conv``, the diagonal Gaussian posterior (mean, logvar).
Latents are scaled by ``scaling_factor`` (0.18215 for SD) by the caller, not in here.

The taming-transformers VQGAN (DiffO's latent space) is the same encoder/decoder family: with
``num_vq_embeddings > 0`` the encoder emits ``latent_channels`` (no posterior moments), and
``Attn*`` block types put single-head attention after every resnet of a level (taming's
``attn_resolutions``), as diffusers' ``VQModel`` expresses it. ``conv_in_channels`` is taming's
``ch`` where it differs from the first level's width (DiffO's base-code autoencoder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers
from jaxcodec.nn.attention import ATTENTION_IMPLS, SpatialSelfAttention
from jaxcodec.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

VAE_EPS = 1e-6  # every GroupNorm in diffusers' Encoder/Decoder
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


@dataclasses.dataclass(frozen=True)
class VAEConfig(layers.DtypeNames):
    """diffusers ``AutoencoderKL`` config fields (SD 2.1 values by default)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 768
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # VQModel (taming VQGAN): codebook size (0 = AutoencoderKL) and quant_conv width.
    num_vq_embeddings: int = 0
    vq_embed_dim: int | None = None
    # jaxcodec-only:
    conv_in_channels: int | None = None  # encoder conv_in width (taming's ch); None: level 0's
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    remat: bool | str = False  # per block, as UNetConfig.remat (the VAE remats resnets only)

    def __post_init__(self):
        n = len(self.block_out_channels)
        down_ok, up_ok = set(DOWN_BLOCK_TYPES), set(UP_BLOCK_TYPES)
        if not set(self.down_block_types) <= down_ok or len(self.down_block_types) != n:
            raise ValueError(f"down_block_types must be {n} of {sorted(down_ok)}")
        if not set(self.up_block_types) <= up_ok or len(self.up_block_types) != n:
            raise ValueError(f"up_block_types must be {n} of {sorted(up_ok)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}")

    @property
    def is_vq(self) -> bool:
        return self.num_vq_embeddings > 0

    @property
    def embed_dim(self) -> int:
        """Width of the latent after ``quant_conv`` (what a VQ codebook quantises)."""
        return self.vq_embed_dim or self.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides) -> VAEConfig:
        for key, ok in {"act_fn": "silu", "shift_factor": None, "latents_mean": None}.items():
            if config.get(key, ok) != ok:
                raise ValueError(f"VAE config {key}={config[key]!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields
        }
        if kwargs.get("scaling_factor") is None:
            kwargs.pop("scaling_factor", None)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        skip = {"dtype", "param_dtype", "attention_impl", "remat", "conv_in_channels"}
        if not self.is_vq:
            skip |= {"num_vq_embeddings", "vq_embed_dim"}
        out = {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
            if f.name not in skip
        }
        name = "VQModel" if self.is_vq else "AutoencoderKL"
        return {"_class_name": name, "act_fn": "silu", **out}


def _kw(c: VAEConfig) -> dict:
    return dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)


def _resnet(c: VAEConfig):
    return layers.remat(ResnetBlock2D, c.remat, "resnet")


def _resnet_stack(
    c: VAEConfig, channels: int, n: int, x: jax.Array, attention: bool = False
) -> jax.Array:
    """`n` resnets named resnets_0..n-1 in the calling (compact) block, as in diffusers, each
    followed by single-head self-attention (attentions_i) in an ``Attn*`` block."""
    Res = _resnet(c)
    for i in range(n):
        x = Res(
            channels,
            groups=c.norm_num_groups,
            eps=VAE_EPS,
            use_temb=False,
            name=f"resnets_{i}",
            **_kw(c),
        )(x)
        if attention:
            x = SpatialSelfAttention(
                None,
                c.norm_num_groups,
                VAE_EPS,
                c.attention_impl,
                name=f"attentions_{i}",
                **_kw(c),
            )(x)
    return x


class VAEMidBlock(nn.Module):
    """``UNetMidBlock2D``: resnet, single-head spatial self-attention, resnet."""

    channels: int
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        Res = _resnet(c)
        res = dict(groups=c.norm_num_groups, eps=VAE_EPS, use_temb=False, **_kw(c))
        x = Res(self.channels, name="resnets_0", **res)(x)
        if c.mid_block_add_attention:
            x = SpatialSelfAttention(
                None, c.norm_num_groups, VAE_EPS, c.attention_impl, name="attentions_0", **_kw(c)
            )(x)
        return Res(self.channels, name="resnets_1", **res)(x)


class VAEDownBlock(nn.Module):
    """``(Attn)DownEncoderBlock2D``: resnets (and attention), then a (0,1)-padded stride-2
    conv."""

    channels: int
    add_downsample: bool
    config: VAEConfig
    attention: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = _resnet_stack(c, self.channels, c.layers_per_block, x, self.attention)
        if self.add_downsample:
            x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **_kw(c))(x)
        return x


class VAEUpBlock(nn.Module):
    """``(Attn)UpDecoderBlock2D``: layers_per_block + 1 resnets (and attention), then nearest
    ×2 and a conv."""

    channels: int
    add_upsample: bool
    config: VAEConfig
    attention: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = _resnet_stack(c, self.channels, c.layers_per_block + 1, x, self.attention)
        if self.add_upsample:
            x = Upsample2D(self.channels, name="upsamplers_0", **_kw(c))(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, x) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Returns ``(feature before conv_out, conv_out moments)``."""
        c = self.config
        boc = c.block_out_channels
        width = c.conv_in_channels or boc[0]
        x = layers.conv(width, 3, name="conv_in", **_kw(c))(x.astype(c.compute_dtype))
        for i, ch in enumerate(boc):
            attn = c.down_block_types[i] == "AttnDownEncoderBlock2D"
            x = VAEDownBlock(ch, i < len(boc) - 1, c, attn, name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(boc[-1], c, name="mid_block")(x)
        x = layers.group_norm(c.norm_num_groups, VAE_EPS, name="conv_norm_out", **_kw(c))(x)
        feature = nn.silu(x)
        out_channels = c.latent_channels if c.is_vq else 2 * c.latent_channels
        moments = layers.conv(out_channels, 3, name="conv_out", **_kw(c))(feature)
        return feature, moments


class Decoder(nn.Module):
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        rev = list(reversed(c.block_out_channels))
        x = layers.conv(rev[0], 3, name="conv_in", **_kw(c))(z.astype(c.compute_dtype))
        x = VAEMidBlock(rev[0], c, name="mid_block")(x)
        for i, ch in enumerate(rev):
            attn = c.up_block_types[i] == "AttnUpDecoderBlock2D"
            x = VAEUpBlock(ch, i < len(rev) - 1, c, attn, name=f"up_blocks_{i}")(x)
        x = layers.group_norm(c.norm_num_groups, VAE_EPS, name="conv_norm_out", **_kw(c))(x)
        return layers.conv(c.out_channels, 3, name="conv_out", **_kw(c))(nn.silu(x))


class AutoencoderKL(nn.Module):
    """The SD VAE. Images in [-1, 1], NHWC; latents unscaled (multiply by ``scaling_factor``)."""

    config: VAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = layers.conv(2 * c.latent_channels, 1, **_kw(c))
        if c.use_post_quant_conv:
            self.post_quant_conv = layers.conv(c.latent_channels, 1, **_kw(c))

    def encode(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        feature, pre = self.encoder(x)
        moments = self.quant_conv(pre) if self.config.use_quant_conv else pre
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return dict(
            feature=feature,
            moments_pre_quant=pre,
            moments=moments,
            mean=mean,
            logvar=jnp.clip(logvar, -30.0, 20.0),
        )

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jnp.ndarray, key: jax.Array | None = None) -> jnp.ndarray:
        """Reconstruction through the posterior mean, or a posterior sample given ``key``."""
        post = self.encode(x)
        z = post["mean"]
        if key is not None:
            eps = jax.random.normal(key, z.shape, jnp.float32).astype(z.dtype)
            z = z + jnp.exp(0.5 * post["logvar"]) * eps
        return self.decode(z)


class VQModel(nn.Module):
    """taming's VQGAN / diffusers' ``VQModel`` without its codebook: ``encode`` gives the
    unquantised latent after ``quant_conv`` (what DiffO diffuses in), ``decode`` maps a latent
    (quantised or not) through ``post_quant_conv`` and the decoder. The codebook, when one is
    trained, is a :class:`jaxcodec.entropy.vq.VectorQuantizer` owned by the caller."""

    config: VAEConfig

    def setup(self):
        c = self.config
        if not c.is_vq:
            raise ValueError("VQModel needs num_vq_embeddings > 0")
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = layers.conv(c.embed_dim, 1, **_kw(c))
        self.post_quant_conv = layers.conv(c.latent_channels, 1, **_kw(c))

    def encode(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.quant_conv(self.encoder(x)[1])

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.decode(self.encode(x))


def vae_param_shapes(config: VAEConfig) -> dict:
    """Parameter shapes via ``jax.eval_shape`` (nothing allocated)."""
    side = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    module = VQModel(config) if config.is_vq else AutoencoderKL(config)
    return jax.eval_shape(lambda a: module.init(jax.random.key(0), a), x)["params"]


# diffusers' config.json of stabilityai/stable-diffusion-2-1-base/vae.
SD21_BASE_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
