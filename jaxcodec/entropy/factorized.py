"""Factorized prior (Ballé et al. 2018): a learned univariate density per channel."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy.gaussian import LIKELIHOOD_MIN, lower_bound
from jaxcodec.entropy.quantization import QuantMode, quantize


class EntropyBottleneck(nn.Module):
    """Per-channel non-parametric density for the hyper latent z (channels last).

    The cumulative is a small monotone network per channel. `quantiles` hold each channel's
    tail quantiles and median; they are trained only by `aux_loss` and later bound the symbol
    range of the integer tables, so the main loss never moves them.
    """

    channels: int
    filters: Sequence[int] = (3, 3, 3)
    init_scale: float = 10.0
    tail_mass: float = 1e-9

    def setup(self):
        dims = (1, *self.filters, 1)
        scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
        c = self.channels
        # Logical axes: a few hundred numbers per channel, replicated by the default rules.
        axes = ("entropy_channels", None, None)
        boxed = lambda init: nn.with_logical_partitioning(init, axes)  # noqa: E731
        matrices, biases, factors = [], [], []
        for i in range(len(self.filters) + 1):
            init = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
            matrices.append(
                self.param(
                    f"matrix{i}", boxed(nn.initializers.constant(init)), (c, dims[i + 1], dims[i])
                )
            )
            biases.append(
                self.param(
                    f"bias{i}",
                    boxed(lambda k, s: jax.random.uniform(k, s, jnp.float32, -0.5, 0.5)),
                    (c, dims[i + 1], 1),
                )
            )
            if i < len(self.filters):
                factors.append(
                    self.param(f"factor{i}", boxed(nn.initializers.zeros), (c, dims[i + 1], 1))
                )
        self.matrices, self.biases, self.factors = matrices, biases, factors
        s = self.init_scale
        self.quantiles = self.param(
            "quantiles",
            boxed(lambda k, shape: jnp.tile(jnp.array([[-s, 0.0, s]], jnp.float32), (c, 1, 1))),
            (c, 1, 3),
        )

    def _logits_cumulative(self, x: jax.Array, stop_gradient: bool) -> jax.Array:
        """x: [C, 1, N] → logits of the cumulative density at x, [C, 1, N]."""
        sg = jax.lax.stop_gradient if stop_gradient else (lambda a: a)
        logits = x
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases, strict=True)):
            logits = jnp.matmul(jax.nn.softplus(sg(matrix)), logits) + sg(bias)
            if i < len(self.factors):
                logits = logits + jnp.tanh(sg(self.factors[i])) * jnp.tanh(logits)
        return logits

    def medians(self) -> jax.Array:
        """[C] per-channel medians, the quantisation offsets of z."""
        return jax.lax.stop_gradient(self.quantiles[:, 0, 1])

    def aux_loss(self) -> jax.Array:
        """Pulls `quantiles` onto the tail_mass/2, 0.5 and 1-tail_mass/2 points of each density."""
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        target = float(np.log(2.0 / self.tail_mass - 1.0))
        target = jnp.array([-target, 0.0, target], jnp.float32)
        return jnp.sum(jnp.abs(logits - target))

    def likelihood(self, z_hat: jax.Array) -> jax.Array:
        """P(bin of width 1 around z_hat), z_hat [..., C]."""
        shape = z_hat.shape
        x = jnp.moveaxis(z_hat.reshape(-1, self.channels), -1, 0)[:, None, :]
        lower = self._logits_cumulative(x - 0.5, stop_gradient=False)
        upper = self._logits_cumulative(x + 0.5, stop_gradient=False)
        # Evaluate in the tail where sigmoid is most accurate.
        sign = jax.lax.stop_gradient(-jnp.sign(lower + upper))
        lik = jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))
        lik = lower_bound(lik, LIKELIHOOD_MIN)
        return jnp.moveaxis(lik[:, 0, :], 0, -1).reshape(shape)

    def __call__(
        self, z: jax.Array, *, mode: QuantMode = "round", key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        z_hat = quantize(z, mode, offset=self.medians(), key=key)
        return z_hat, self.likelihood(z_hat)
