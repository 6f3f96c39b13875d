"""PatchGAN discriminator and GAN losses of the LDM / taming-transformers autoencoder recipe.

``PatchDiscriminator`` is taming's ``NLayerDiscriminator`` (pix2pix's PatchGAN, Isola et al.
2017): 4×4 convolutions, ``num_layers`` of them with stride 2 and widths ``ndf·min(2^n, 8)``, one
more at stride 1, then a 1-channel 4×4 convolution: one real/fake logit per overlapping patch
(70×70 pixels for 3 layers). Normalisation ``"batch"`` normalises each call's batch with its own
statistics, as taming's BatchNorm does in training mode (the discriminator is never used in
inference, so no running averages are kept); ``"none"`` leaves it out.

The losses follow taming's ``vqperceptual.py``: hinge (or non-saturating "vanilla") for the
discriminator, ``-mean(D(x̂))`` for the generator, and a switch (`gan_factor`) that turns both on
after a warm-up. Used by the LDM autoencoder (`jaxcodec.methods.ldm`) and written to serve any
other autoencoder stage (e.g. a VQGAN).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers

NORMS = ("batch", "none")
D_LOSSES = ("hinge", "vanilla")
BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's


class BatchStatNorm(nn.Module):
    """Per-channel normalisation by the statistics of the current batch, with a learned scale
    (initialised N(1, 0.02), as taming's ``weights_init``) and bias."""

    eps: float = BATCH_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param(
            "scale",
            layers.partitioned(
                lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s, jnp.float32), ("norm",)
            ),
            (c,),
        )
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("norm",)), (c,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


class PatchDiscriminator(nn.Module):
    """Images in [-1, 1], NHWC → patch logits [N, h, w, 1]."""

    ndf: int = 64
    num_layers: int = 3
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {self.norm!r}")
        init = nn.initializers.normal(0.02)  # taming's weights_init for convolutions

        def conv4(features: int, stride: int, bias: bool, name: str) -> nn.Conv:
            return nn.Conv(
                features,
                (4, 4),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                use_bias=bias,
                kernel_init=layers.partitioned(init, layers.CONV_KERNEL_AXES),
                bias_init=layers.partitioned(nn.initializers.zeros, layers.CONV_BIAS_AXES),
                name=name,
            )

        normed = self.norm != "none"
        h = nn.leaky_relu(conv4(self.ndf, 2, True, "conv_0")(x), 0.2)
        for n in range(1, self.num_layers + 1):
            stride = 2 if n < self.num_layers else 1
            h = conv4(self.ndf * min(2**n, 8), stride, not normed, f"conv_{n}")(h)
            if normed:
                h = BatchStatNorm(name=f"norm_{n}")(h)
            h = nn.leaky_relu(h, 0.2)
        return conv4(1, 1, True, f"conv_{self.num_layers + 1}")(h)


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str = "hinge"):
    """taming's ``hinge_d_loss`` / ``vanilla_d_loss``: ½·(loss on real + loss on fake)."""
    if kind == "hinge":
        real = jnp.mean(jax.nn.relu(1.0 - logits_real))
        fake = jnp.mean(jax.nn.relu(1.0 + logits_fake))
    elif kind == "vanilla":
        real = jnp.mean(jax.nn.softplus(-logits_real))
        fake = jnp.mean(jax.nn.softplus(logits_fake))
    else:
        raise ValueError(f"discriminator loss must be one of {D_LOSSES}, got {kind!r}")
    return 0.5 * (real + fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's adversarial term, ``-mean(D(x̂))`` (taming, for either D loss)."""
    return -jnp.mean(logits_fake)


def adversarial_losses(
    disc: nn.Module, disc_params, real: jax.Array, fake: jax.Array, kind: str = "hinge"
) -> tuple[jax.Array, jax.Array]:
    """(generator term, discriminator term) for one trainable pytree holding both players:
    the generator term sees the discriminator's parameters through ``stop_gradient`` (it moves
    only the generator), the discriminator term sees ``stop_gradient(fake)`` (it moves only the
    discriminator), so one scalar ``w·g + d`` has, for each part, exactly its own gradient."""
    frozen = {"params": jax.lax.stop_gradient(disc_params)}
    g = generator_loss(disc.apply(frozen, fake))
    live = {"params": disc_params}
    d = discriminator_loss(
        disc.apply(live, real), disc.apply(live, jax.lax.stop_gradient(fake)), kind
    )
    return g, d


def gan_factor(step: jax.Array, start: int) -> jax.Array:
    """1.0 from step ``start`` on, 0.0 before (taming's ``adopt_weight``)."""
    return (jnp.asarray(step) >= start).astype(jnp.float32)
