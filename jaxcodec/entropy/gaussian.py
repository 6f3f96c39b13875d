"""Gaussian conditional entropy model: a discretised Gaussian for each latent element."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.entropy.quantization import QuantMode, quantize

SCALE_MIN = 0.11  # below this a unit-width bin holds ~all the mass; CompressAI's bound
LIKELIHOOD_MIN = 1e-9


def _std_normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * jax.scipy.special.erfc(-x / jnp.sqrt(2.0))


def lower_bound(x: jax.Array, bound: float) -> jax.Array:
    """max(x, bound), but lets gradients through that push x back above the bound."""
    return x + jax.lax.stop_gradient(jnp.maximum(x, bound) - x)


def gaussian_likelihood(y_hat: jax.Array, scales: jax.Array, means: jax.Array | None = None):
    """P(bin of width 1 around y_hat) under N(means, scales²), evaluated on the lower tail."""
    values = y_hat if means is None else y_hat - means
    scales = lower_bound(scales, SCALE_MIN)
    values = jnp.abs(values)
    upper = _std_normal_cdf((0.5 - values) / scales)
    lower = _std_normal_cdf((-0.5 - values) / scales)
    return lower_bound(upper - lower, LIKELIHOOD_MIN)


class GaussianConditional(nn.Module):
    """Quantises y around its predicted mean and returns (y_hat, likelihoods).

    The entropy parameters come from elsewhere (a hyper-synthesis or a context model), so the
    module has no parameters; it exists to keep one quantisation convention for y.
    """

    @nn.compact
    def __call__(
        self,
        y: jax.Array,
        scales: jax.Array,
        means: jax.Array | None = None,
        *,
        mode: QuantMode = "round",
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        offset = 0.0 if means is None else means
        y_hat = quantize(y, mode, offset=offset, key=key)
        return y_hat, gaussian_likelihood(y_hat, scales, means)
