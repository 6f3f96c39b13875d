"""PSNR per image (the protocol averages per-image PSNR, not the PSNR of the mean MSE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcodec.metrics.common import check_pair


@jax.jit
def _psnr(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / mse)


def psnr(x, y) -> jnp.ndarray:
    """PSNR in dB of each image pair (NHWC, uint8 or float in [0, 1]); shape (N,)."""
    return _psnr(*check_pair(x, y))
