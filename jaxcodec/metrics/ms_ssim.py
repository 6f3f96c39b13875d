"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) with the standard constants.

Five scales, Gaussian window 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, exponents
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333). Follows the conventions of tf.image.ssim_multiscale
(the reference in the tests): "valid" filtering, contrast-structure terms clipped at zero,
2x2 average pooling between scales (symmetric padding of odd sizes), the product over scales
taken per channel and then averaged over channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.metrics.common import check_pair

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(coords**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _blur(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """Separable 'valid' Gaussian filter of (B, H, W, 1) maps."""
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(
        x, g.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn
    )
    return jax.lax.conv_general_dilated(
        x, g.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dn
    )


def _ssim_terms(x, y, g, k1, k2):
    c1, c2 = k1**2, k2**2
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    num0 = 2.0 * mu_x * mu_y
    den0 = mu_x**2 + mu_y**2
    luminance = (num0 + c1) / (den0 + c1)
    num1 = 2.0 * _blur(x * y, g)
    den1 = _blur(x * x + y * y, g)
    cs = (num1 - num0 + c2) / (den1 - den0 + c2)
    return jnp.mean(luminance * cs, axis=(1, 2, 3)), jnp.mean(cs, axis=(1, 2, 3))


def _downsample(x: jnp.ndarray) -> jnp.ndarray:
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="symmetric")
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


@functools.partial(jax.jit, static_argnames=("filter_size", "sigma", "k1", "k2", "weights"))
def _ms_ssim(x, y, filter_size=11, sigma=1.5, k1=0.01, k2=0.03, weights=WEIGHTS):
    n, h, w, c = x.shape
    # Each channel is its own map: (N, H, W, C) -> (N*C, H, W, 1).
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w, 1)
    y = jnp.transpose(y, (0, 3, 1, 2)).reshape(n * c, h, w, 1)
    g = jnp.asarray(_gaussian_1d(filter_size, sigma))
    factors = []
    for scale in range(len(weights)):
        if scale:
            x, y = _downsample(x), _downsample(y)
        ssim, cs = _ssim_terms(x, y, g, k1, k2)
        factors.append(jax.nn.relu(ssim if scale == len(weights) - 1 else cs))
    stacked = jnp.stack(factors, axis=-1)
    per_channel = jnp.prod(stacked ** jnp.asarray(weights, jnp.float32), axis=-1)
    return per_channel.reshape(n, c).mean(axis=-1)


def ms_ssim(x, y, *, filter_size: int = 11, sigma: float = 1.5) -> jnp.ndarray:
    """MS-SSIM of each image pair (NHWC, uint8 or float in [0, 1]); shape (N,)."""
    x, y = check_pair(x, y)
    min_side = filter_size * 2 ** (len(WEIGHTS) - 1)
    if min(x.shape[1:3]) < min_side:
        raise ValueError(f"MS-SSIM with 5 scales needs images of at least {min_side} px a side")
    return _ms_ssim(x, y, filter_size=filter_size, sigma=sigma)
