"""ResShift's conditional denoiser (Yue et al. 2023), DiffO's one-step decoder network.

ResShift's ``UNetModelSwin`` with ``cond_lq``: the condition (DiffO: the base code) passes a 3×3
``conv_in_extended`` and is concatenated to the noisy latent before the UNet, which is the
project's UNet configured as the Swin-UNet (:mod:`jaxcodec.nn.unet`). The UNet sees the timestep
index as ResShift does. ``noise_embedding`` (jaxcodec's addition for DiffO's rate-adaptive noise
modulation) embeds the noise level like a timestep and adds it to the time embedding; its last
layer starts at zero, so an untrained (or imported) model ignores it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers
from jaxcodec.nn.resnet import timestep_embedding
from jaxcodec.nn.unet import UNet, UNetConfig

NOISE_LEVEL_SCALE = 1000.0  # levels in [0, 1] are embedded like timesteps in [0, 1000]


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal embedding of the noise level → linear_1 → SiLU → linear_2 (zero-initialised)."""

    features: int
    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, level: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = timestep_embedding(NOISE_LEVEL_SCALE * level, self.features).astype(self.dtype)
        h = layers.dense(self.dim, ("embed", "mlp"), name="linear_1", **kw)(emb)
        return layers.dense(self.dim, ("mlp", "embed"), zero_init=True, name="linear_2", **kw)(
            nn.silu(h)
        )


class ResShiftDenoiser(nn.Module):
    """x̂0 = UNet(concat(z_t_scaled, conv_in_extended(lq)), t, class_emb=noise level)."""

    config: UNetConfig
    lq_channels: int = 64
    noise_conditioning: bool = True

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        self.conv_in_extended = layers.conv(self.lq_channels, 3, **kw)
        self.unet = UNet(c)
        if self.noise_conditioning:
            self.noise_embedding = NoiseLevelEmbedding(
                c.block_out_channels[0], c.time_embed_dim, **kw
            )

    def __call__(
        self, z_t: jax.Array, t: jax.Array, lq: jax.Array, noise_level: jax.Array | float = 1.0
    ) -> jax.Array:
        """z_t already divided by ResShift's input std; t: timestep indices (batch,)."""
        x = jnp.concatenate([z_t, self.conv_in_extended(lq).astype(z_t.dtype)], axis=-1)
        class_emb = None
        if self.noise_conditioning:
            level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), (z_t.shape[0],))
            class_emb = self.noise_embedding(level)
        return self.unet(x, t, class_emb=class_emb).astype(jnp.float32)
