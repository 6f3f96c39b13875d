"""DiffCR's refiner FaSE with its frequency-decoupled attention (FDA), and the CLIP ``ProjLayer``.

FaSE (the public code's ``Time_aware_refinementX``) refines the frozen SD UNet's estimate ẑ_0 at
timestep t, given the compressed latent ĉ:

    t ──sinusoid──▶ time_embedding ──SiLU──▶ emb_proj ──▶ + ẑ_0 ──in_conv/in_norm/SiLU──┐
    (ĉ, ẑ_0, t) ──FDA──▶ features ─────────────────────────────────────── concat ◀────┘
        ──▶ trunk (RRDBs, ESRGAN's residual-in-residual dense blocks) ──▶ out ──▶ + ĉ

FDA (``Time_aware_FQCA``) projects ĉ (the query side) and ẑ_0 (the context) to ``fda_channels``,
takes their centred 2-D spectra and splits each into a low band (a centre window of a quarter
of each half-size, ``band_masks``) and a high band (the rest). Each band is brought back to
the latent domain and runs its own transformer block (self-attention, cross-attention to the
same band of ẑ_0, GEGLU); the attention outputs are masked to their band again and blended with
the untouched band through the temporal weight τ = t / T (M_t = 1 − τ in the paper):

    high = FFT(attn_high(x_h, c_h))·mask_high·(1 − τ) + X_h·τ
    low  = FFT(attn_low(x_l, c_l))·mask_low·τ       + X_l·(1 − τ)

so at large t the low band is re-estimated and the high band kept, at small t the reverse.
``band_terms`` returns the two terms (the FDA test reads them); the inverse FFT of their sum
goes through ``out_conv``/``out_norm``/SiLU.

Layer for layer the official modules at Darc8-sun/DiffCR@c26465f (``module.py``): transformer
blocks are LDM's ``BasicTransformerBlock`` (diffusers' names here), norms are ``GroupNorm(32)``
with eps 1e-5, the time embedding LDM's ``timestep_embedding`` (cos first). The importer
(:mod:`jaxcodec.weights.diffcr`) maps their keys by rule. ``ProjLayer`` is LayerNorm → dense1 →
QuickGELU → dense2 (→ dropout): the map of [CLIP image embedding, prompt, base prompt] tokens
to the UNet's cross-attention context.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.nn import layers
from jaxcodec.nn.attention import BasicTransformerBlock
from jaxcodec.nn.resnet import TimestepEmbedding, timestep_embedding

GROUP_NORM_EPS = 1e-5  # LDM's GroupNorm32 (torch's default)


@dataclasses.dataclass(frozen=True)
class FaSEConfig(layers.DtypeNames):
    """Sizes of FaSE. Defaults: the official ``Time_aware_refinementX(4, 4, 320)``."""

    in_channels: int = 4  # latent channels of ẑ_0 and ĉ
    out_channels: int = 4
    model_channels: int = 320  # sinusoid width; the time MLP is 4× this
    fda_channels: int = 96  # FDA's inner width (heads × head_dim)
    fda_heads: int = 3
    feature_channels: int = 32  # FDA output = in_conv output; the trunk is twice this wide
    num_rrdb: int = 24
    grow_channels: int = 32  # dense growth inside each residual dense block
    band_ratio: float = 1.0  # the low band's window: int(H/2 · ratio // 4) each side of centre
    num_timesteps: int = 1000  # T in τ = t / T
    norm_groups: int = 32
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.fda_channels % self.fda_heads:
            raise ValueError(f"fda_channels {self.fda_channels} not a multiple of the heads")
        for width in (self.feature_channels, 2 * self.feature_channels):
            if width % self.norm_groups:
                raise ValueError(f"{width} channels do not split into {self.norm_groups} groups")

    @property
    def trunk_channels(self) -> int:
        return 2 * self.feature_channels


def band_masks(height: int, width: int, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 masks [height, width] of a centred (fftshifted) spectrum: the low band
    is the window ``[c − r, c + r)`` around the centre ``c = size // 2`` with
    ``r = int(c · ratio // 4)`` per axis (the public code's rule; empty below 8 rows or
    columns), the high band the rest."""
    high = np.ones((height, width), np.float32)
    crow, ccol = height // 2, width // 2
    r, c = int(crow * ratio // 4), int(ccol * ratio // 4)
    high[crow - r : crow + r, ccol - c : ccol + c] = 0.0
    return 1.0 - high, high


def to_spectrum(x: jax.Array) -> jax.Array:
    """NHWC → centred 2-D spectrum over (H, W) (complex)."""
    return jnp.fft.fftshift(jnp.fft.fft2(x, axes=(1, 2)), axes=(1, 2))


def from_spectrum(x: jax.Array) -> jax.Array:
    """Centred spectrum → NHWC (real part)."""
    return jnp.fft.ifft2(jnp.fft.ifftshift(x, axes=(1, 2)), axes=(1, 2)).real


class BandAttention(nn.Module):
    """One band's transformer (official ``my_crossattention``): tokens of x attend to
    themselves and to the same band of the context."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        block = BasicTransformerBlock(
            self.dim,
            self.heads,
            self.dim // self.heads,
            cross_attention=True,
            impl="xla",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer_blocks_0",
        )
        out = block(x.reshape(b, h * w, c), context.reshape(b, h * w, c))
        return out.reshape(b, h, w, c)


class FrequencyDecouplingAttention(nn.Module):
    """FDA: (ĉ, ẑ_0, t) → ``feature_channels`` maps (see the module doc)."""

    config: FaSEConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.conv_in = layers.conv(c.fda_channels, 1, **kw)
        self.conv_in_c = layers.conv(c.fda_channels, 1, **kw)
        self.attention_high = BandAttention(c.fda_channels, c.fda_heads, **kw)
        self.attention_low = BandAttention(c.fda_channels, c.fda_heads, **kw)
        self.out_conv = layers.conv(c.feature_channels, 3, **kw)
        self.out_norm = layers.group_norm(c.norm_groups, GROUP_NORM_EPS, **kw)

    def band_terms(self, x: jax.Array, context: jax.Array, t: jax.Array):
        """Projected features x (query side) and context → the (high, low) spectral terms."""
        tau = (jnp.asarray(t, jnp.float32) / self.config.num_timesteps).reshape(-1, 1, 1, 1)
        low_mask, high_mask = (
            jnp.asarray(m)[None, :, :, None]
            for m in band_masks(x.shape[1], x.shape[2], self.config.band_ratio)
        )
        x_f, c_f = to_spectrum(x.astype(jnp.float32)), to_spectrum(context.astype(jnp.float32))
        x_h, x_l = x_f * high_mask, x_f * low_mask
        c_h, c_l = c_f * high_mask, c_f * low_mask
        a_h = self.attention_high(from_spectrum(x_h), from_spectrum(c_h)).astype(jnp.float32)
        a_l = self.attention_low(from_spectrum(x_l), from_spectrum(c_l)).astype(jnp.float32)
        high = to_spectrum(a_h) * high_mask * (1.0 - tau) + x_h * tau
        low = to_spectrum(a_l) * low_mask * tau + x_l * (1.0 - tau)
        return high, low

    def project(self, c_hat: jax.Array, z0: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.conv_in(c_hat), self.conv_in_c(z0)

    def __call__(self, c_hat: jax.Array, z0: jax.Array, t: jax.Array) -> jax.Array:
        high, low = self.band_terms(*self.project(c_hat, z0), t)
        x = from_spectrum(high + low).astype(self.config.compute_dtype)
        return nn.silu(self.out_norm(self.out_conv(x)))


class ResidualDenseBlock(nn.Module):
    """ESRGAN's dense block: five 3×3 convs on the growing concatenation, LeakyReLU(0.2),
    residual scaled by 0.2."""

    features: int
    grow: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = [x]
        for i in range(1, 5):
            h = layers.conv(self.grow, 3, name=f"conv{i}", **kw)(jnp.concatenate(feats, -1))
            feats.append(nn.leaky_relu(h, 0.2))
        out = layers.conv(self.features, 3, name="conv5", **kw)(jnp.concatenate(feats, -1))
        return out * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, residual scaled by 0.2."""

    features: int
    grow: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = x
        for i in range(1, 4):
            out = ResidualDenseBlock(self.features, self.grow, name=f"rdb{i}", **kw)(out)
        return out * 0.2 + x


class FaSE(nn.Module):
    """FaSE(ẑ_0, ĉ, t) → refined ẑ_0 (an x0-prediction; the sampler applies the consistency
    boundary). NHWC latents; ``t`` integer timestep indices, shape (B,) or scalar."""

    config: FaSEConfig = FaSEConfig()

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.fda = FrequencyDecouplingAttention(c)
        self.time_embedding = TimestepEmbedding(4 * c.model_channels, **kw)
        self.emb_proj = layers.dense(c.in_channels, ("embed", None), **kw)
        self.in_conv = layers.conv(c.feature_channels, 3, **kw)
        self.in_norm = layers.group_norm(c.norm_groups, GROUP_NORM_EPS, **kw)
        self.trunk = [
            RRDB(c.trunk_channels, c.grow_channels, name=f"rrdb_{i}", **kw)
            for i in range(c.num_rrdb)
        ]
        self.out_conv1 = layers.conv(c.trunk_channels, 3, **kw)
        self.out_norm = layers.group_norm(c.norm_groups, GROUP_NORM_EPS, **kw)
        self.out_conv2 = layers.conv(c.out_channels, 3, **kw)

    def __call__(self, z0: jax.Array, c_hat: jax.Array, t: jax.Array) -> jax.Array:
        c = self.config
        t = jnp.broadcast_to(jnp.asarray(t).reshape(-1), (z0.shape[0],))
        emb = self.time_embedding(timestep_embedding(t, c.model_channels).astype(c.compute_dtype))
        emb = self.emb_proj(nn.silu(emb))[:, None, None, :]
        features = self.fda(c_hat, z0, t)
        h = nn.silu(self.in_norm(self.in_conv(z0.astype(c.compute_dtype) + emb)))
        h = jnp.concatenate([h, features], axis=-1)
        for block in self.trunk:
            h = block(h)
        h = self.out_conv2(nn.silu(self.out_norm(self.out_conv1(h))))
        return (h + c_hat).astype(jnp.float32)


class ProjLayer(nn.Module):
    """LayerNorm → dense1 → QuickGELU → dense2 → dropout (official ``ProjLayer``; no residual,
    whatever its comment says)."""

    out_dim: int = 1024
    hidden_dim: int = 2048
    dropout: float = 0.1
    eps: float = 1e-12

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        x = layers.layer_norm(self.eps, name="norm")(x)
        h = layers.dense(self.hidden_dim, ("embed", "mlp"), name="dense1")(x)
        h = h * jax.nn.sigmoid(1.702 * h)
        h = layers.dense(self.out_dim, ("mlp", "embed"), name="dense2")(h)
        return nn.Dropout(self.dropout, deterministic=deterministic)(h)


def fase_param_shapes(config: FaSEConfig, latent_hw: tuple[int, int] = (8, 8)) -> dict:
    """FaSE's parameter shapes (``jax.eval_shape``; nothing allocated)."""
    z = jax.ShapeDtypeStruct((1, *latent_hw, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    init = lambda z, t: FaSE(config).init(jax.random.key(0), z, z, t)  # noqa: E731
    return jax.eval_shape(init, z, t)["params"]
