"""Quantisation proxies: uniform noise for the rate, straight-through rounding for distortion."""

from typing import Literal

import jax
import jax.numpy as jnp

QuantMode = Literal["noise", "ste", "round"]


def round_ste(x: jax.Array) -> jax.Array:
    """Rounds in the forward pass, identity in the backward pass."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(
    x: jax.Array,
    mode: QuantMode,
    *,
    offset: jax.Array | float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantises `x` around `offset` (a mean or median), the way the decoder will see it.

    `noise` is the training proxy for the rate term (uniform noise has the same density as the
    rounding error); `ste` and `round` return `round(x - offset) + offset`, with and without a
    straight-through gradient.
    """
    if mode == "noise":
        if key is None:
            raise ValueError("quantize(mode='noise') needs a PRNG key")
        return x + jax.random.uniform(key, x.shape, x.dtype, -0.5, 0.5)
    if mode == "ste":
        return round_ste(x - offset) + offset
    if mode == "round":
        return jnp.round(x - offset) + offset
    raise ValueError(f"unknown quantisation mode {mode!r}; expected 'noise', 'ste' or 'round'")
