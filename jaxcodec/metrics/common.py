"""Input convention shared by every metric.

Images are NHWC (a single HWC image is promoted to a batch of one). Floats are taken to be in
[0, 1]; uint8 arrays are divided by 255. Metrics of a codec are computed on the 8-bit-rounded
reconstruction, so passing the uint8 arrays the codec returns is the intended use.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def to_unit_range(x) -> jnp.ndarray:
    """uint8 or float [0, 1] image(s) -> float32 NHWC in [0, 1]."""
    if isinstance(x, np.ndarray | jnp.ndarray) and x.dtype == np.uint8:
        x = jnp.asarray(x, jnp.float32) / 255.0
    else:
        x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {x.shape}")
    return x


def check_pair(x, y) -> tuple[jnp.ndarray, jnp.ndarray]:
    x, y = to_unit_range(x), to_unit_range(y)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    return x, y
