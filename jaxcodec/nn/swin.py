"""Swin Transformer layer (Liu et al. 2021) as ResShift's Swin-UNet uses it (DiffO's denoiser).

One layer is ResShift's ``BasicLayer``: a 1×1 ``patch_embed`` into ``embed_dim`` channels,
``depth`` Swin blocks alternating plain and shifted windows (shift = window // 2), and a 1×1
``patch_unembed`` back (no outer residual: the UNet's resnet before it carries the skip). A block
is pre-norm window attention with a learned relative-position bias, then a pre-norm 1×1-conv
MLP (GELU); both norms are GroupNorm(32) as in guided diffusion, not LayerNorm.

Shifted windows mask attention between tokens that the cyclic shift brought together:
``shift_mask="full"`` is Swin's 3×3 region mask. ``"resshift"`` is the mask ResShift's code
(and DiffO's copy of it, ``models/swin_transformer.py``) computes, which weights trained with
that code need: its ``calculate_mask`` writes ``img_mask[:, h, w, :]`` into a (1, 1, H, W)
tensor, so the first slice hits the size-1 channel axis and only rows are told apart; and it
flattens each mask window after ``.permute(0, 2, 3, 1)`` of an already channels-last window,
so the token order inside a window is column-major while attention's is row-major. In the
last row of windows tokens are therefore separated by their *column* inside the window
(< window − shift or not), and wrapped columns are never masked.

Names follow ResShift's state dict (``patch_embed.proj``, ``blocks.i.attn.qkv``,
``relative_position_bias_table``, ``mlp.fc1``), so checkpoints map by rule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.nn import layers

SHIFT_MASKS = ("full", "resshift")
MASK_VALUE = -100.0  # what Swin adds to masked logits (exp(-100) ≈ 0, finite in bf16)


def relative_position_index(window: int) -> np.ndarray:
    """(w², w²) index into the ((2w-1)², heads) bias table for every query/key pair."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    flat = coords.reshape(2, -1)
    rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) → (B·nW, w², C), windows in raster order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shift_attention_mask(h: int, w: int, window: int, shift: int, kind: str) -> np.ndarray:
    """(nW, w², w²) additive mask (0 or -100) of a cyclically shifted window partition, its
    windows in raster order and its tokens in attention's (row-major) order."""
    if kind not in SHIFT_MASKS:
        raise ValueError(f"shift_mask must be one of {SHIFT_MASKS}, got {kind!r}")
    bands = lambda n: np.digitize(np.arange(n), [n - window, n - shift])  # 0, 1, 2 per index
    rows = bands(h)[:, None]
    cols = bands(w)[None, :] if kind == "full" else np.zeros((1, w), np.int64)
    region = np.broadcast_to(rows * 3 + cols, (h, w))
    ids = region.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
    if kind == "resshift":  # its window flattened column-major (see the module doc)
        ids = ids.transpose(0, 1, 3, 2)
    ids = ids.reshape(-1, window * window)  # raster order of windows, as window_partition
    same = ids[:, :, None] == ids[:, None, :]
    return np.where(same, 0.0, MASK_VALUE).astype(np.float32)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a relative-position bias per head."""

    dim: int
    heads: int
    window: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x: (B·nW, w², C); mask: (nW, w², w²) or None."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n_tok, head_dim = self.window**2, self.dim // self.heads
        table = self.param(
            "relative_position_bias_table",
            nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, "heads")),
            ((2 * self.window - 1) ** 2, self.heads),
            self.param_dtype,
        )
        qkv = layers.dense(3 * self.dim, ("embed", "heads"), name="qkv", **kw)(x)
        qkv = qkv.reshape(-1, n_tok, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum(
            "bqnh,bknh->bnqk", q * head_dim**-0.5, k, preferred_element_type=jnp.float32
        )
        bias = jnp.asarray(table, jnp.float32)[relative_position_index(self.window).reshape(-1)]
        logits = logits + bias.reshape(n_tok, n_tok, self.heads).transpose(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(-1, nw, self.heads, n_tok, n_tok)
            logits = logits + jnp.asarray(mask)[None, :, None]
            logits = logits.reshape(-1, self.heads, n_tok, n_tok)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(-1, n_tok, self.dim)
        return layers.dense(self.dim, ("heads", "embed"), name="proj", **kw)(out)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual."""

    dim: int
    heads: int
    window: int
    shift: int = 0
    mlp_ratio: float = 4.0
    groups: int = 32
    shift_mask: str = "full"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, h, w, _ = x.shape
        ws, s = self.window, self.shift
        if h % ws or w % ws:
            raise ValueError(f"Swin windows of {ws} need sides divisible by it, got {h}x{w}")
        y = layers.group_norm(self.groups, 1e-5, name="norm1", **kw)(x)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        mask = shift_attention_mask(h, w, ws, s, self.shift_mask) if s else None
        y = WindowAttention(self.dim, self.heads, ws, name="attn", **kw)(
            window_partition(y, ws), mask
        )
        y = window_reverse(y, ws, h, w)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + y
        y = layers.group_norm(self.groups, 1e-5, name="norm2", **kw)(x)
        y = Mlp(int(self.dim * self.mlp_ratio), name="mlp", **kw)(y)
        return layers.constrain(x + y, layers.ACT_NHWC)


class Mlp(nn.Module):
    """1×1 conv, GELU (exact), 1×1 conv back to the input width."""

    hidden: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.conv(self.hidden, 1, name="fc1", **kw)(x)
        return layers.conv(x.shape[-1], 1, name="fc2", **kw)(nn.gelu(h, approximate=False))


class _Projection(nn.Module):
    """A 1×1 conv named ``proj`` (ResShift's PatchEmbed / PatchUnEmbed with patch size 1)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return layers.conv(self.features, 1, name="proj", **kw)(x)


class SwinLayer(nn.Module):
    """ResShift's ``BasicLayer``: 1×1 embed, ``depth`` Swin blocks, 1×1 unembed (NHWC)."""

    embed_dim: int = 192
    head_channels: int = 32
    window: int = 4
    depth: int = 2
    mlp_ratio: float = 4.0
    groups: int = 32
    shift_mask: str = "full"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *unused) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        h = _Projection(self.embed_dim, name="patch_embed", **kw)(x)
        for i in range(self.depth):
            h = SwinBlock(
                self.embed_dim,
                self.embed_dim // self.head_channels,
                self.window,
                0 if i % 2 == 0 else self.window // 2,
                self.mlp_ratio,
                self.groups,
                self.shift_mask,
                name=f"blocks_{i}",
                **kw,
            )(h)
        return _Projection(channels, name="patch_unembed", **kw)(h)
