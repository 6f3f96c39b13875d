"""Mean–scale hyperprior compressor (Minnen et al. 2018): HFD's stage-1 autoencoder."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.entropy import EntropyBottleneck, GaussianConditional
from jaxcodec.nn.transforms import (
    AnalysisTransform,
    HyperAnalysis,
    HyperSynthesis,
    SynthesisTransform,
)

STRIDE = 64  # total downsampling of the hyper latent: inputs are padded to a multiple of this


class CodecOutput(NamedTuple):
    x_hat: jax.Array
    likelihoods: dict[str, jax.Array]


class MeanScaleHyperprior(nn.Module):
    """x in [0, 1] (NHWC) → reconstruction and the likelihoods of y and z.

    In training, rates are measured on noisy latents (the density of uniform noise matches the
    rounding error) while the synthesis sees straight-through rounded latents, so the decoder
    learns from the values it will get at test time.
    """

    N: int = 128
    M: int = 192

    def setup(self):
        self.g_a = AnalysisTransform(self.N, self.M)
        self.g_s = SynthesisTransform(self.N)
        self.h_a = HyperAnalysis(self.N)
        self.h_s = HyperSynthesis(self.N, self.M)
        self.entropy_bottleneck = EntropyBottleneck(self.N)
        self.gaussian_conditional = GaussianConditional()

    def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> CodecOutput:
        y = self.g_a(x)
        z = self.h_a(y)
        if train:
            if key is None:
                raise ValueError("training forward pass needs a PRNG key for quantisation noise")
            kz, ky = jax.random.split(key)
            _, z_lik = self.entropy_bottleneck(z, mode="noise", key=kz)
            z_hat = self.entropy_bottleneck(z, mode="ste")[0]
        else:
            z_hat, z_lik = self.entropy_bottleneck(z, mode="round")
        scales, means = jnp.split(self.h_s(z_hat), 2, axis=-1)
        if train:
            _, y_lik = self.gaussian_conditional(y, scales, means, mode="noise", key=ky)
            y_hat = self.gaussian_conditional(y, scales, means, mode="ste")[0]
        else:
            y_hat, y_lik = self.gaussian_conditional(y, scales, means, mode="round")
        x_hat = self.g_s(y_hat)
        return CodecOutput(x_hat, {"y": y_lik, "z": z_lik})

    def aux_loss(self) -> jax.Array:
        return self.entropy_bottleneck.aux_loss()
