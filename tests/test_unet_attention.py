"""Attention implementations agree: blockwise online softmax == XLA's materialised softmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcodec.nn import attention


@pytest.mark.parametrize(
    "tq,tk,q_block,kv_block",
    [
        (50, 37, 16, 8),  # several query and key blocks, padding on both (ragged sizes)
        (64, 64, 32, 64),  # keys in one block
        (24, 77, 128, 4096),  # one block each (cross-attention shape)
    ],
)
def test_blockwise_matches_reference(tq, tk, q_block, kv_block):
    rng = np.random.default_rng(tq)
    q = jnp.asarray(rng.normal(size=(2, tq, 3, 8)) * 3, jnp.float32)  # peaky softmax
    k = jnp.asarray(rng.normal(size=(2, tk, 3, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, tk, 3, 8)), jnp.float32)
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    got = jax.jit(
        functools.partial(attention.blockwise_attention, q_block=q_block, kv_block=kv_block)
    )(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_impl_selection():
    q = jnp.ones((1, 4, 2, 8))
    for impl in ("auto", "xla", "blockwise"):
        out = attention.dot_product_attention(q, q, q, impl)
        np.testing.assert_allclose(np.asarray(out), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="attention impl"):
        attention.dot_product_attention(q, q, q, "flash")
