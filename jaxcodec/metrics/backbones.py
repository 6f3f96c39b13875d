"""ImageNet backbones of the perceptual metrics (torchvision layer layouts, NHWC).

AlexNet and VGG16 as used by LPIPS (taps after the ReLUs of each stage) and VGG16 with L2
pooling as used by DISTS. Parameter names follow the order of the convolutions (conv0, ...),
so one set of VGG16 weights serves both metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _max_pool_valid(x: jnp.ndarray, window: int, stride: int) -> jnp.ndarray:
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


def l2_pool(x: jnp.ndarray) -> jnp.ndarray:
    """DISTS' L2 pooling: sqrt of a Hanning-blurred square, stride 2 (anti-aliased pooling)."""
    a = np.hanning(5)[1:-1]
    g = np.outer(a, a)
    g = (g / g.sum()).astype(np.float32)
    c = x.shape[-1]
    kernel = jnp.tile(jnp.asarray(g)[:, :, None, None], (1, 1, 1, c))
    out = jax.lax.conv_general_dilated(
        x * x,
        kernel,
        window_strides=(2, 2),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )
    return jnp.sqrt(out + 1e-12)


class AlexNetFeatures(nn.Module):
    """torchvision ``alexnet().features`` up to relu5; returns the five ReLU taps."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        specs = [(64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
        taps = []
        for i, (feat, k, s, p) in enumerate(specs):
            if i in (1, 2):
                x = _max_pool_valid(x, 3, 2)
            x = nn.Conv(feat, (k, k), strides=(s, s), padding=((p, p), (p, p)), name=f"conv{i}")(x)
            x = nn.relu(x)
            taps.append(x)
        return taps


VGG16_CFG: Sequence[int | str] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features`` up to relu5_3; returns relu1_2 .. relu5_3.

    ``pooling="max"`` is the ImageNet network (LPIPS); ``"l2"`` swaps each max pool for
    L2 pooling, as DISTS does.
    """

    pooling: str = "max"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        if self.pooling not in ("max", "l2"):
            raise ValueError(f"unknown pooling {self.pooling!r}")
        taps, conv = [], 0
        for i, v in enumerate(VGG16_CFG):
            if v == "M":
                taps.append(x)
                x = _max_pool_valid(x, 2, 2) if self.pooling == "max" else l2_pool(x)
                continue
            x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{conv}")(x)
            x = nn.relu(x)
            conv += 1
            if i == len(VGG16_CFG) - 1:
                taps.append(x)
        return taps
