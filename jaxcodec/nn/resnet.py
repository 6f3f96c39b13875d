"""ResNet blocks, resamplers and timestep embeddings shared by the UNet, VAE and adapter.

Names follow diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``,
``conv_shortcut``; ``conv`` inside resamplers; ``linear_1``/``linear_2``) so that state-dict
keys map mechanically onto the parameter tree.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxcodec.nn import layers


def timestep_embedding(
    t: jnp.ndarray,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jnp.ndarray:
    """Sinusoidal embedding of (possibly fractional) timesteps, diffusers' convention.

    Frequencies exp(-ln(max_period)·i/(half - freq_shift)); [sin, cos], or [cos, sin] when
    ``flip_sin_to_cos`` (SD uses flip=True, shift=0).
    """
    t = jnp.asarray(t, jnp.float32).reshape(-1)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1`` → SiLU → ``linear_2``."""

    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(self.dim, ("embed", "mlp"), name="linear_1", **kw)(emb)
        return layers.dense(self.dim, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1×1 shortcut on width change.

    ``groups_out`` differs from ``groups`` only in ControlNet-XS adapters, whose odd widths
    (base + control channels concatenated) need other group counts.
    ``time_embedding_norm="scale_shift"`` (diffusers' name; guided diffusion's
    ``use_scale_shift_norm``, used by ResShift/DiffO) projects the time embedding to a scale and
    a shift applied after ``norm2`` (FiLM) instead of adding it before.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-5
    use_temb: bool = True
    time_embedding_norm: str = "default"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None = None) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups_out = self.groups_out or self.groups
        h = nn.silu(layers.group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = layers.conv(self.out_channels, 3, name="conv1", **kw)(h)
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm={self.time_embedding_norm!r} is not supported")
        scale_shift = self.use_temb and self.time_embedding_norm == "scale_shift"
        if self.use_temb:
            if temb is None:
                raise ValueError("this ResnetBlock2D expects a time embedding")
            width = 2 * self.out_channels if scale_shift else self.out_channels
            t = layers.dense(width, ("mlp", "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
            t = t[:, None, None, :]
            if not scale_shift:
                h = h + t
        h = layers.group_norm(groups_out, self.eps, name="norm2", **kw)(h)
        if scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = h * (1.0 + scale) + shift
        h = nn.silu(h)
        h = layers.conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return layers.constrain(x + h, layers.ACT_NHWC)


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. ``padding=1`` in the UNet; the VAE pads (0,1) right/bottom only."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return layers.conv(
            self.out_channels,
            3,
            stride=2,
            padding=pad,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


def nearest_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """torch's ``interpolate(mode='nearest')``: source index floor(i·in/out)."""
    _, h, w, _ = x.shape
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest ×2 (or to ``size``) then 3×3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, size: tuple[int, int] | None = None) -> jnp.ndarray:
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, tuple(size))
        return layers.conv(
            self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
