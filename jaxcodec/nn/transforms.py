"""Analysis / synthesis transforms of learned image codecs (Ballé/Minnen hyperprior family)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

_PEDESTAL = 2.0**-18


def _nonneg(p: jax.Array, minimum: float = 0.0) -> jax.Array:
    """Maps a parameter to a value ≥ minimum through a squared, lower-bounded reparameterisation.

    Squaring keeps relative updates even near zero; the straight-through lower bound keeps the
    parameter from getting stuck at the bound.
    """
    bound = (minimum + _PEDESTAL**2) ** 0.5
    p = p + jax.lax.stop_gradient(jnp.maximum(p, bound) - p)
    return p * p - _PEDESTAL**2


class GDN(nn.Module):
    """Generalised divisive normalisation, y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²), or its inverse."""

    inverse: bool = False
    beta_min: float = 1e-6
    gamma_init: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        beta_p = self.param("beta", lambda k, s: jnp.sqrt(jnp.ones(s) + _PEDESTAL**2), (c,))
        gamma_p = self.param(
            "gamma",
            lambda k, s: jnp.sqrt(self.gamma_init * jnp.eye(c) + _PEDESTAL**2),
            (c, c),
        )
        beta = _nonneg(beta_p, self.beta_min)
        gamma = _nonneg(gamma_p)
        norm = jnp.sqrt(beta + jnp.einsum("...j,ij->...i", x * x, gamma))
        return x * norm if self.inverse else x / norm


def _conv(features: int, kernel: int, stride: int, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name)


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
    """[N, H, W, C·b²] → [N, H·b, W·b, C] (pixel shuffle)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, block, block, c // (block * block))
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, c // (block * block))


class SubpixelConv(nn.Module):
    """Upsampling by a convolution to b² phases and a pixel shuffle.

    A k×k stride-b transposed convolution is a ceil(k/b)×ceil(k/b) convolution per output
    phase, so this spans the same functions; it replaces `nn.ConvTranspose` because XLA:CPU
    computes the transposed convolution's gradient some 20× slower.
    """

    features: int
    kernel: int = 5
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = -(-self.kernel // self.stride)
        y = nn.Conv(self.features * self.stride**2, (k, k), padding="SAME")(x)
        return depth_to_space(y, self.stride)


def _deconv(features: int, kernel: int, stride: int) -> SubpixelConv:
    return SubpixelConv(features, kernel, stride)


class AnalysisTransform(nn.Module):
    """g_a: image → y at 1/16 resolution (four stride-2 convolutions with GDN)."""

    N: int
    M: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(3):
            x = GDN()(_conv(self.N, 5, 2)(x))
        return _conv(self.M, 5, 2)(x)


class SynthesisTransform(nn.Module):
    """g_s: y_hat → image, mirroring g_a with inverse GDN."""

    N: int
    out_channels: int = 3

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        for _ in range(3):
            y = GDN(inverse=True)(_deconv(self.N, 5, 2)(y))
        return _deconv(self.out_channels, 5, 2)(y)


class HyperAnalysis(nn.Module):
    """h_a: y → z at 1/4 of y's resolution."""

    N: int

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        x = nn.leaky_relu(_conv(self.N, 3, 1)(y))
        x = nn.leaky_relu(_conv(self.N, 5, 2)(x))
        return _conv(self.N, 5, 2)(x)


class HyperSynthesis(nn.Module):
    """h_s: z_hat → entropy parameters of y (2M channels: scales and means)."""

    N: int
    M: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = nn.leaky_relu(_deconv(self.M, 5, 2)(z))
        x = nn.leaky_relu(_deconv(self.M * 3 // 2, 5, 2)(x))
        return _conv(self.M * 2, 3, 1)(x)
