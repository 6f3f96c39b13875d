"""HFD (Hoogeboom et al. 2023): an MSE hyperprior autoencoder, then a pixel-space score decoder.

Stage 1 trains the autoencoder with `R + λ·255²·MSE`; stage 2 (the score-based decoder)
builds on the frozen stage-1 model.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy.context import channel_groups
from jaxcodec.methods import register
from jaxcodec.methods.base import Batch, Method, Metrics, bits, psnr_from_mse, to_float, to_uint8
from jaxcodec.nn.hyperprior import HyperpriorCoding, MeanScaleHyperprior


@register("hfd")
class HFD(Method):
    def __init__(self, config):
        super().__init__(config)
        if self.stage != 1:
            raise ValueError(f"HFD stage {self.stage} is not available yet; use stage 1")
        entropy_model = config.model.get("entropy_model", "hyperprior")
        if entropy_model not in ("hyperprior", "elic"):
            raise ValueError(f"model.entropy_model={entropy_model!r}: use 'hyperprior' or 'elic'")
        groups = ()
        if entropy_model == "elic":
            groups = channel_groups(config.model.M, config.model.get("context_groups") or None)
        self.model = MeanScaleHyperprior(N=config.model.N, M=config.model.M, context_groups=groups)
        self.coding = HyperpriorCoding(self.model)
        self.stride = self.coding.stride

    def init(self, rng: jax.Array, batch: Batch):
        x = to_float(batch["image"])
        params_rng, noise_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng}, x, train=True, key=noise_rng)

    def _rate_distortion(self, params, x: jax.Array, *, train: bool, key=None):
        out = self.model.apply({"params": params}, x, train=train, key=key)
        num_pixels = x.shape[0] * x.shape[1] * x.shape[2]
        bpp_y = bits(out.likelihoods["y"]) / num_pixels
        bpp_z = bits(out.likelihoods["z"]) / num_pixels
        mse = jnp.mean(jnp.square(out.x_hat - x))
        return out, bpp_y, bpp_z, mse

    def loss(self, params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        x = to_float(batch["image"])
        _, bpp_y, bpp_z, mse = self._rate_distortion(params, x, train=True, key=rng)
        bpp = bpp_y + bpp_z
        lmbda = self.config.loss.lmbda
        rd = bpp + lmbda * 255.0**2 * mse
        aux = self.model.apply({"params": params}, method=self.model.aux_loss)
        metrics = {
            "loss": rd,
            "bpp": bpp,
            "bpp_y": bpp_y,
            "bpp_z": bpp_z,
            "mse": mse,
            "psnr": psnr_from_mse(mse),
            "aux_loss": aux,
        }
        # The aux loss reaches only the quantiles and the rate terms never do (see
        # EntropyBottleneck), so one optimiser can minimise the sum.
        return rd + aux, metrics

    def evaluate(self, params, images: jax.Array, valid_hw: tuple[int, int]):
        """Estimated bpp (from likelihoods) and PSNR on the unpadded region of each image."""
        out = self.model.apply({"params": params}, images, train=False)
        h, w = valid_hw
        num_pixels = h * w
        rate = bits(out.likelihoods["y"], axis=(1, 2, 3)) + bits(
            out.likelihoods["z"], axis=(1, 2, 3)
        )
        recon = to_uint8(out.x_hat[:, :h, :w])
        ref = to_uint8(images[:, :h, :w])
        mse = jnp.mean(
            jnp.square(recon.astype(jnp.float32) - ref.astype(jnp.float32)), axis=(1, 2, 3)
        )
        return {"bpp": rate / num_pixels, "psnr": psnr_from_mse(mse, 255.0)}, recon

    # --- Real bitstreams (host side; see jaxcodec/codec.py for the container and padding) ---

    num_streams = 2

    def entropy_tables(self, params):
        """Integer CDF tables and the fixed-point entropy-parameter networks, built once."""
        return self.coding.entropy_tables(params)

    def compress(self, params, tables, image):
        """uint8 [H, W, 3] (H, W multiples of `stride`) → (streams, info)."""
        return self.coding.compress(params, tables, image)

    def decompress(self, params, tables, streams, hw):
        """Streams of `compress` → (uint8 [H, W, 3], info)."""
        return self.coding.decompress(params, tables, streams, hw)

    def decompress_batch(self, params, tables, streams_list, hw):
        """Several files of the same padded size: latents on the host, one batched g_s."""
        y_hat = [self.coding.decode_latents(tables, streams, hw)[0] for streams in streams_list]
        return self.coding.synthesise(params, np.stack(y_hat))
