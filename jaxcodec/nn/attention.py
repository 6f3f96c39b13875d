"""Attention for the SD UNet / VAE: one multi-head op with selectable implementations.

Implementations (``impl``):
- ``'xla'`` / ``'cudnn'``: ``jax.nn.dot_product_attention`` with that backend.
- ``'blockwise'``: online-softmax attention over query and key blocks (Rabe & Staats 2021,
  FlashAttention's recurrence) written in JAX. On CPU, XLA materialises the full Tq×Tk score
  matrix at 4096 tokens and its ``exp`` dominates; blocks keep the working set in cache.
- ``'auto'``: ``'blockwise'`` on CPU from ``AUTO_BLOCKWISE_MIN_TOKENS`` keys (measured faster there
  than both XLA and PyTorch's fused CPU attention), otherwise ``jax.nn.dot_product_attention``'s
  own default.

Module names follow diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out_0`` ↔ ``to_out.0``,
``ff.net_0.proj`` ↔ ``ff.net.0.proj``) so that state-dict keys map mechanically.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blockwise")

# Block sizes for the blockwise implementation (tokens): blocks of at most this many, balanced
# so that a sequence splits without padding when it can. Chosen on CPU (benchmarks/unet_speed.py):
# small query blocks with up to 4096 keys keep each score block (128×4096×4 B = 2 MiB per head)
# near the cache; longer key sequences fall back to the online-softmax recurrence.
Q_BLOCK = 128
KV_BLOCK = 4096
# 'auto' uses the blockwise path on CPU from this many keys on (XLA's materialised softmax
# is slower there from about a thousand tokens; below, one block is the whole matrix anyway).
AUTO_BLOCKWISE_MIN_TOKENS = 1024


def _balanced_block(length: int, max_block: int) -> int:
    n = math.ceil(length / max_block)
    return math.ceil(length / n)


def _xla_attention(q, k, v, scale):
    s = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", p, v)


def blockwise_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    q_block: int = Q_BLOCK,
    kv_block: int = KV_BLOCK,
    scale: float | None = None,
) -> jnp.ndarray:
    """Exact softmax attention computed block by block with a running max and sum.

    q: (B, Tq, N, H); k, v: (B, Tk, N, H). Returns (B, Tq, N, H) in q's dtype; the softmax
    statistics and the accumulator stay in float32.
    """
    b, tq, n, h = q.shape
    tk = k.shape[1]
    scale = h**-0.5 if scale is None else scale
    q_block, kv_block = _balanced_block(tq, q_block), _balanced_block(tk, kv_block)
    nq, nk = math.ceil(tq / q_block), math.ceil(tk / kv_block)
    pad_q, pad_k = nq * q_block - tq, nk * kv_block - tk
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    if pad_k:
        k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    # (blocks, B, N, T_block, H): heads next to batch so each block is a batched matmul.
    qb = q.reshape(b, nq, q_block, n, h).transpose(1, 0, 3, 2, 4) * jnp.asarray(scale, q.dtype)
    kb = k.reshape(b, nk, kv_block, n, h).transpose(1, 0, 3, 2, 4)
    vb = v.reshape(b, nk, kv_block, n, h).transpose(1, 0, 3, 2, 4)
    key_valid = (jnp.arange(nk * kv_block) < tk).reshape(nk, kv_block)

    def one_query_block(qi):
        def step(carry, inputs):
            m, denom, acc = carry
            kj, vj, valid = inputs
            s = jnp.einsum("bnqh,bnkh->bnqk", qi, kj, preferred_element_type=jnp.float32)
            if pad_k:
                s = jnp.where(valid, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(-1)
            pv = jnp.einsum(
                "bnqk,bnkh->bnqh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            acc = acc * corr[..., None] + pv
            return (m_new, denom, acc), None

        init = (
            jnp.full((b, n, q_block), -jnp.inf, jnp.float32),
            jnp.zeros((b, n, q_block), jnp.float32),
            jnp.zeros((b, n, q_block, h), jnp.float32),
        )
        if nk == 1:
            (m, denom, acc), _ = step(init, (kb[0], vb[0], key_valid[0]))
        else:
            (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, key_valid))
        return (acc / denom[..., None]).astype(q.dtype)

    out = jax.lax.map(one_query_block, qb) if nq > 1 else one_query_block(qb[0])[None]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * q_block, n, h)
    return out[:, :tq]


def dot_product_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, impl: str = "auto"
) -> jnp.ndarray:
    """Multi-head attention on (B, T, N, H) arrays with a selectable implementation."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        on_cpu = jax.default_backend() == "cpu"
        impl = "blockwise" if on_cpu and k.shape[1] >= AUTO_BLOCKWISE_MIN_TOKENS else None
    if impl == "blockwise":
        return blockwise_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _multi_head_attention(x, context, heads, dim_head, out_dim, qkv_bias, impl, kw):
    """Builds to_q/to_k/to_v/to_out_0 in the calling compact module (diffusers' layout)."""
    inner = heads * dim_head
    q = layers.dense(inner, ("embed", "heads"), use_bias=qkv_bias, name="to_q", **kw)(x)
    k = layers.dense(inner, ("embed", "heads"), use_bias=qkv_bias, name="to_k", **kw)(context)
    v = layers.dense(inner, ("embed", "heads"), use_bias=qkv_bias, name="to_v", **kw)(context)
    split = lambda t: t.reshape(*t.shape[:2], heads, dim_head)
    o = dot_product_attention(split(q), split(k), split(v), impl)
    o = o.reshape(*o.shape[:2], inner)
    return layers.dense(out_dim, ("heads", "embed"), name="to_out_0", **kw)(o)


class Attention(nn.Module):
    """diffusers ``Attention`` as used in transformer blocks (no q/k/v bias)."""

    heads: int
    dim_head: int
    out_dim: int
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        return _multi_head_attention(
            x, context, self.heads, self.dim_head, self.out_dim, False, self.impl, kw
        )


class GEGLU(nn.Module):
    """``proj`` to 2×inner, value × GELU(gate) (exact erf GELU, as torch's default)."""

    inner: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = layers.dense(
            2 * self.inner,
            ("embed", "mlp"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        return layers.dense(self.dim, ("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, GEGLU feed-forward, each pre-LayerNorm."""

    dim: int
    heads: int
    dim_head: int
    cross_attention: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        att = dict(heads=self.heads, dim_head=self.dim_head, out_dim=self.dim, impl=self.impl, **kw)
        x = x + Attention(name="attn1", **att)(layers.layer_norm(1e-5, name="norm1", **kw)(x))
        if self.cross_attention:
            if context is None:
                raise ValueError("this transformer has cross-attention: pass a context")
            h = layers.layer_norm(1e-5, name="norm2", **kw)(x)
            x = x + Attention(name="attn2", **att)(h, context.astype(self.dtype))
        h = layers.layer_norm(1e-5, name="norm3", **kw)(x)
        x = x + FeedForward(self.dim, name="ff", **kw)(h)
        return layers.constrain(x, layers.ACT_TOKENS)


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input) over an NHWC feature map.

    ``use_linear_projection`` selects Dense (SD 2.x) or 1×1 conv (SD 1.x) ``proj_in``/``proj_out``.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    cross_attention: bool = True
    use_linear_projection: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = layers.group_norm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = layers.dense(inner, ("embed", "heads"), name="proj_in", **kw)(
                h.reshape(b, hgt * wid, c)
            )
        else:
            h = layers.conv(inner, 1, name="proj_in", **kw)(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                self.cross_attention,
                self.impl,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        if self.use_linear_projection:
            h = layers.dense(c, ("heads", "embed"), name="proj_out", **kw)(h)
            h = h.reshape(b, hgt, wid, c)
        else:
            h = layers.conv(c, 1, name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
        return h + residual


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: GroupNorm, single-head-per-``dim_head`` self-attention,
    residual. diffusers names: ``group_norm``, ``to_q/k/v`` (with bias), ``to_out.0``."""

    dim_head: int | None = None
    norm_num_groups: int = 32
    eps: float = 1e-6
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        dim_head = self.dim_head or c
        h = layers.group_norm(self.norm_num_groups, self.eps, name="group_norm", **kw)(x)
        h = h.reshape(b, hgt * wid, c)
        h = _multi_head_attention(h, h, c // dim_head, dim_head, c, True, self.impl, kw)
        return h.reshape(b, hgt, wid, c) + x
