"""HFD (Hoogeboom et al. 2023): an MSE hyperprior autoencoder, then a pixel-space score decoder.

Stage 1 trains the autoencoder with `R + λ·255²·MSE`; stage 2 (the score-based decoder)
builds on the frozen stage-1 model.
"""

import jax
import jax.numpy as jnp

from jaxcodec.entropy.context import channel_groups
from jaxcodec.entropy.vq import COLLECTION as VQ_STATS
from jaxcodec.methods import register
from jaxcodec.methods.base import (
    Batch,
    Method,
    Variables,
    bits,
    psnr_from_mse,
    to_float,
    to_uint8,
)
from jaxcodec.nn.hyperprior import HyperpriorCoding, MeanScaleHyperprior


@register("hfd")
class HFD(Method):
    def __init__(self, config):
        super().__init__(config)
        if self.stage != 1:
            raise ValueError(f"HFD stage {self.stage} is not available yet; use stage 1")
        m = config.model
        entropy_model = m.get("entropy_model", "hyperprior")
        if entropy_model not in ("hyperprior", "elic"):
            raise ValueError(f"model.entropy_model={entropy_model!r}: use 'hyperprior' or 'elic'")
        groups = ()
        if entropy_model == "elic":
            groups = channel_groups(m.M, m.get("context_groups") or None)
        self.model = MeanScaleHyperprior(
            N=m.N,
            M=m.M,
            context_groups=groups,
            hyper=m.get("hyper", "factorized"),
            num_codes=m.get("num_codes", 16384),
        )
        self._coder = HyperpriorCoding(self.model)

    @property
    def coder(self) -> HyperpriorCoding:
        return self._coder

    def init(self, rng: jax.Array, batch: Batch):
        x = to_float(batch["image"])
        params_rng, noise_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng}, x, train=True, key=noise_rng)

    def loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        x = to_float(batch["image"])
        noise_rng, restart_rng = jax.random.split(rng)
        out, new_state = self.model.apply(
            {"params": params, **state},
            x,
            train=True,
            key=noise_rng,
            mutable=list(state),
            rngs={"vq_restart": restart_rng},
        )
        num_pixels = x.shape[0] * x.shape[1] * x.shape[2]
        bpp_y = bits(out.likelihoods["y"]) / num_pixels
        bpp_z = bits(out.likelihoods["z"]) / num_pixels
        mse = jnp.mean(jnp.square(out.x_hat - x))
        bpp = bpp_y + bpp_z
        rd = bpp + self.config.loss.lmbda * 255.0**2 * mse
        aux = self.model.apply({"params": params, **state}, method=self.model.aux_loss)
        metrics = {
            "loss": rd,
            "bpp": bpp,
            "bpp_y": bpp_y,
            "bpp_z": bpp_z,
            "mse": mse,
            "psnr": psnr_from_mse(mse),
            "aux_loss": aux,
        }
        if VQ_STATS in state:
            metrics["vq_loss"] = out.vq_loss
        # The aux loss reaches only the quantiles and the rate terms never do (see
        # EntropyBottleneck), so one optimiser can minimise the sum.
        return rd + aux + out.vq_loss, metrics, dict(new_state)

    def evaluate(self, variables: Variables, images: jax.Array, valid_hw, rng):
        """Estimated bpp (from likelihoods) and PSNR on the unpadded region of each image."""
        out = self.model.apply(variables.collections(), images, train=False)
        h, w = valid_hw
        rate = bits(out.likelihoods["y"], axis=(1, 2, 3)) + bits(
            out.likelihoods["z"], axis=(1, 2, 3)
        )
        recon = to_uint8(out.x_hat[:, :h, :w])
        ref = to_uint8(images[:, :h, :w])
        mse = jnp.mean(
            jnp.square(recon.astype(jnp.float32) - ref.astype(jnp.float32)), axis=(1, 2, 3)
        )
        return {"bpp": rate / (h * w), "psnr": psnr_from_mse(mse, 255.0)}, recon

    def entropy_tables(self, variables: Variables):
        """Integer CDF tables and the fixed-point entropy-parameter networks, built once."""
        return self._coder.entropy_tables(variables)
