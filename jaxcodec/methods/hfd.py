"""HFD (Hoogeboom et al. 2023): an MSE hyperprior autoencoder, then a pixel-space score decoder.

Stage 1 trains the autoencoder with `R + λ·255²·MSE`. Stage 2 freezes it (handed over from the
stage-1 workdir) and trains the project's UNet, configured for pixels, to add the detail it
lacks: input concat(z_t, stage-1 reconstruction, context, context mask), v-prediction in
continuous time on the cosine log-SNR shifted by η. Images larger than the training crop are
decoded in patch groups (`jaxcodec.diffusion.patches`), each patch conditioned on what earlier
groups generated; the model learns that conditioning from random context masks. The rate is
the autoencoder's alone.

With `model.rate` set (`configs/hfd.py:VARIANT,variable_rate=1`) the autoencoder is one model for
every rate: each training example draws its own q (λ log-uniform over the range) and the loss
weighs its distortion by that λ; files carry q in their header (`jaxcodec.nn.rate`). Stage 2
then learns from reconstructions at random q, so one score decoder serves every rate.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxcodec.diffusion import ShiftedCosineSchedule, continuous_sample, diffusion_training_sample
from jaxcodec.diffusion.losses import regression_loss
from jaxcodec.diffusion.patches import context_mask, generate_in_patches
from jaxcodec.entropy.context import channel_groups
from jaxcodec.entropy.vq import COLLECTION as VQ_STATS
from jaxcodec.methods import register
from jaxcodec.methods.base import (
    Batch,
    BitstreamCoder,
    Method,
    StageStart,
    Variables,
    bits,
    psnr_from_mse,
    to_float,
    to_uint8,
)
from jaxcodec.nn.hyperprior import HyperpriorCoding, MeanScaleHyperprior
from jaxcodec.nn.rate import RateConfig
from jaxcodec.nn.unet import UNet, UNetConfig

# Input channels of the stage-2 UNet: z_t, the stage-1 reconstruction, context, context mask.
DENOISER_INPUTS = 3 + 3 + 3 + 1


def autoencoder(config) -> MeanScaleHyperprior:
    m = config.model
    entropy_model = m.get("entropy_model", "hyperprior")
    if entropy_model not in ("hyperprior", "elic"):
        raise ValueError(f"model.entropy_model={entropy_model!r}: use 'hyperprior' or 'elic'")
    groups = channel_groups(m.M, m.get("context_groups") or None) if entropy_model == "elic" else ()
    return MeanScaleHyperprior(
        N=m.N,
        M=m.M,
        context_groups=groups,
        hyper=m.get("hyper", "factorized"),
        num_codes=m.get("num_codes", 16384),
        rate=RateConfig.from_config(m.get("rate")),
    )


@register("hfd")
class HFD(Method):
    def __init__(self, config):
        super().__init__(config)
        if self.stage not in (1, 2):
            raise ValueError(
                f"HFD has stages 1 (autoencoder) and 2 (score decoder), not {self.stage}"
            )
        self.autoencoder = autoencoder(config)
        self.ae_coder = HyperpriorCoding(self.autoencoder)
        if self.stage == 1:
            self.model, self._coder = self.autoencoder, self.ae_coder
            return
        d = config.decoder
        self.model = UNet(
            UNetConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in d.unet.items()},
                in_channels=DENOISER_INPUTS,
                out_channels=3,
                cross_attention_dim=None,
            )
        )
        s = d.schedule
        self.schedule = ShiftedCosineSchedule(
            eta=float(s.eta), logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max, clip=s.clip
        )
        self._coder = DiffusionCoder(self)

    @property
    def console_metrics(self) -> tuple[str, ...]:
        return ("bpp", "psnr") if self.stage == 1 else ("v_mse",)

    @property
    def coder(self) -> BitstreamCoder:
        return self._coder

    # --- Variables -----------------------------------------------------------------------

    def init(self, rng: jax.Array, batch: Batch):
        x = to_float(batch["image"])
        params_rng, noise_rng = jax.random.split(rng)
        if self.stage == 1:
            q = self._default_q(x.shape[0])
            return self.autoencoder.init({"params": params_rng}, x, train=True, key=noise_rng, q=q)
        inputs = jnp.zeros((*x.shape[:3], DENOISER_INPUTS), jnp.float32)
        return self.model.init(params_rng, inputs, jnp.zeros((x.shape[0],)))

    def init_from(self, previous) -> StageStart:
        """Stage 2 keeps the stage-1 autoencoder frozen, stored with the model."""
        if self.stage != 2:
            return super().init_from(previous)
        if previous.config.method != "hfd" or int(previous.config.stage) != 1:
            raise ValueError(
                f"HFD stage 2 starts from an HFD stage-1 model, not {previous.config.method} "
                f"stage {previous.config.stage}"
            )
        mine, theirs = (
            json.loads(c.model.to_json_best_effort()) for c in (self.config, previous.config)
        )
        if mine != theirs:
            raise ValueError(f"config.model {mine} differs from the stage-1 model's {theirs}")
        return StageStart(frozen={"autoencoder": {"params": previous.params, **previous.state}})

    # --- Stage 1: the autoencoder -------------------------------------------------------

    def _default_q(self, batch: int) -> jax.Array | None:
        """q of the default quality for every example (None for a fixed-rate autoencoder)."""
        rate = self.autoencoder.rate
        if rate is None:
            return None
        return jnp.full((batch,), rate.q(rate.default_index), jnp.float32)

    def _stage1_loss(self, params, state, batch: Batch, rng: jax.Array):
        x = to_float(batch["image"])
        rate = self.autoencoder.rate
        if rate is None:
            noise_rng, restart_rng = jax.random.split(rng)
            q = None
        else:
            noise_rng, restart_rng, q_rng = jax.random.split(rng, 3)
            q = rate.sample_q(q_rng, x.shape[0])
        out, new_state = self.autoencoder.apply(
            {"params": params, **state},
            x,
            train=True,
            key=noise_rng,
            q=q,
            mutable=list(state),
            rngs={"vq_restart": restart_rng},
        )
        num_pixels = x.shape[0] * x.shape[1] * x.shape[2]
        bpp_y = bits(out.likelihoods["y"]) / num_pixels
        bpp_z = bits(out.likelihoods["z"]) / num_pixels
        mse = jnp.mean(jnp.square(out.x_hat - x))
        bpp = bpp_y + bpp_z
        if rate is None:
            rd = bpp + self.config.loss.lmbda * 255.0**2 * mse
        else:  # each example's distortion weighed by its own λ(q)
            mse_i = jnp.mean(jnp.square(out.x_hat - x), axis=(1, 2, 3))
            rd = bpp + jnp.mean(rate.lmbda(q) * 255.0**2 * mse_i)
        aux = self.autoencoder.apply({"params": params, **state}, method="aux_loss")
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

    # --- Stage 2: the score-based decoder -----------------------------------------------

    def reconstruct(
        self, frozen, images: jax.Array, q: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Stage-1 decoding of float images in [0, 1] → (8-bit reconstruction in [-1, 1], bits
        per image), as the decoder will see it; a conditioned autoencoder at q [B] (default:
        the default quality)."""
        if q is None:
            q = self._default_q(images.shape[0])
        out = self.autoencoder.apply(frozen["autoencoder"], images, train=False, q=q)
        rate = bits(out.likelihoods["y"], axis=(1, 2, 3)) + bits(
            out.likelihoods["z"], axis=(1, 2, 3)
        )
        recon = to_uint8(out.x_hat).astype(jnp.float32) / 127.5 - 1.0
        return jax.lax.stop_gradient(recon), rate

    def time_input(self, t: jax.Array) -> jax.Array:
        """The UNet is conditioned on the noise level, not on t: λ mapped linearly so that the
        unshifted range [λ_max, λ_min] becomes [0, 1000] (SD's timestep scale). With η ≠ 1 the
        same t means another λ, and the network sees which."""
        s = self.schedule
        return 1000.0 * (s.logsnr_max - s.logsnr(t)) / (s.logsnr_max - s.logsnr_min)

    def denoise(self, params, recon, context, mask, z_t, t) -> jax.Array:
        """v̂(z_t, t | stage-1 reconstruction, context)."""
        inputs = jnp.concatenate([z_t, recon, context, mask], axis=-1)
        return self.model.apply({"params": params}, inputs, self.time_input(t))

    def to_target(self, x: jax.Array, recon: jax.Array) -> jax.Array:
        """What the diffusion generates: the image ('image', as in the paper) or its residual
        over the stage-1 reconstruction, scaled to unit-ish spread ('residual')."""
        d = self.config.decoder
        if d.get("target", "image") == "image":
            return x
        return (x - recon) / d.residual_scale

    def from_target(self, x0: jax.Array, recon: jax.Array) -> jax.Array:
        d = self.config.decoder
        if d.get("target", "image") == "image":
            return x0
        return recon + d.residual_scale * x0

    def _stage2_loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        x01 = to_float(batch["image"])
        q = None
        if self.autoencoder.rate is None:
            k_mask, k_diffusion = jax.random.split(rng)
        else:  # one score decoder for every rate: reconstructions at random q
            k_mask, k_diffusion, k_q = jax.random.split(rng, 3)
            q = self.autoencoder.rate.sample_q(k_q, x01.shape[0])
        recon, _ = self.reconstruct(frozen, x01, q)
        x0 = self.to_target(x01 * 2.0 - 1.0, recon)
        d = self.config.decoder
        patch = x0.shape[1]
        mask = context_mask(k_mask, x0.shape[0], patch, patch // 4, d.context_probability)
        z_t, t, eps, alpha, sigma = diffusion_training_sample(self.schedule, x0, k_diffusion)
        v = self.denoise(params, recon, x0 * mask, mask, z_t, t)
        per_example = regression_loss(
            v,
            prediction="v",
            z_t=z_t,
            x0=x0,
            eps=eps,
            alpha=alpha,
            sigma=sigma,
            target="v",
            weighting=self.config.loss.weighting,
        )
        loss = jnp.mean(per_example)
        return loss, {"loss": loss, "v_mse": loss}, state

    def sample(self, params, recon, context, mask, key, *, steps: int) -> jax.Array:
        """One image from its condition: recon/context [H, W, 3], mask [H, W, 1] → [H, W, 3].
        `context` is in image space, as decoded; the network sees it as a target."""
        k_noise, k_chain = jax.random.split(key)
        z = jax.random.normal(k_noise, (1, *recon.shape), jnp.float32)
        target_context = self.to_target(context, recon) * mask
        denoiser = Partial(self.denoise, params, recon[None], target_context[None], mask[None])
        x0 = continuous_sample(
            denoiser,
            self.schedule,
            z,
            k_chain,
            num_steps=steps,
            eta=float(self.config.decode.sampler_eta),
        )
        return jnp.clip(self.from_target(x0[0], recon), -1.0, 1.0)

    # --- The interface ------------------------------------------------------------------

    def loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        if self.stage == 1:
            return self._stage1_loss(params, state, batch, rng)
        return self._stage2_loss(params, frozen, state, batch, rng)

    def evaluate(self, variables: Variables, images: jax.Array, valid_hw, rng):
        """Estimated bpp (from likelihoods) and PSNR on the unpadded region of each image;
        stage 2 decodes whole images with the configured sampler."""
        h, w = valid_hw
        ref = to_uint8(images[:, :h, :w]).astype(jnp.float32)
        if self.stage == 1:
            q = self._default_q(images.shape[0])
            out = self.autoencoder.apply(variables.collections(), images, train=False, q=q)
            rate = bits(out.likelihoods["y"], axis=(1, 2, 3))
            rate += bits(out.likelihoods["z"], axis=(1, 2, 3))
            recon = to_uint8(out.x_hat[:, :h, :w])
        else:
            cond, rate = self.reconstruct(variables.frozen, images)
            zeros = jnp.zeros_like(cond)
            keys = jax.random.split(rng, images.shape[0])
            sample = functools.partial(self.sample, steps=int(self.config.decode.steps))
            x = jax.vmap(sample, in_axes=(None, 0, 0, 0, 0))(
                variables.params, cond, zeros, zeros[..., :1], keys
            )
            recon = to_uint8((x[:, :h, :w] + 1.0) / 2.0)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - ref), axis=(1, 2, 3))
        return {"bpp": rate / (h * w), "psnr": psnr_from_mse(mse, 255.0)}, recon

    def entropy_tables(self, variables: Variables):
        """Integer CDF tables and fixed-point entropy-parameter networks of the autoencoder."""
        if self.stage == 1:
            return self.ae_coder.entropy_tables(variables)
        ae = dict(variables.frozen["autoencoder"])
        return self.ae_coder.entropy_tables(Variables(ae.pop("params"), ae))


class DiffusionCoder(BitstreamCoder):
    """Stage 2's files: the autoencoder's streams; decoding runs the autoencoder, then the
    score-based decoder in patch groups. Steps, seed and patch size travel in the header."""

    num_streams = HyperpriorCoding.num_streams
    stride = HyperpriorCoding.stride

    def __init__(self, method: HFD):
        self.method = method
        self._sample = jax.jit(
            lambda params, cond, ctx, mask, keys, steps: jax.vmap(
                functools.partial(method.sample, steps=steps), in_axes=(None, 0, 0, 0, 0)
            )(params, cond, ctx, mask, keys),
            static_argnums=5,
        )

    def options(self) -> dict[str, Any]:
        d = self.method.config.decode
        out = {"steps": int(d.steps), "seed": int(d.seed), "patch": int(d.patch)}
        return out | self.method.ae_coder.options()  # a conditioned autoencoder's q

    def _autoencoder_variables(self, variables: Variables) -> Variables:
        ae = dict(variables.frozen["autoencoder"])
        return Variables(ae.pop("params"), ae)

    @property
    def rate_config(self):
        return self.method.ae_coder.rate_config

    def analyse(self, variables, image):
        return self.method.ae_coder.analyse(self._autoencoder_variables(variables), image)

    def encode_analysed(self, variables, tables, analysis, options: Mapping[str, Any]):
        return self.method.ae_coder.encode_analysed(
            self._autoencoder_variables(variables), tables, analysis, options
        )

    def compress(self, variables, tables, image, options: Mapping[str, Any]):
        return self.method.ae_coder.compress(
            self._autoencoder_variables(variables), tables, image, options
        )

    def decompress(self, variables, tables, streams, hw, options, rng):
        ae_coder = self.method.ae_coder
        index = ae_coder.rate_index(tables, options)
        y_hat, y_sym, _ = ae_coder.decode_latents(tables, streams, hw, index)
        t0 = time.perf_counter()
        recon = ae_coder.synthesise(self._autoencoder_variables(variables), y_hat, index)
        t1 = time.perf_counter()
        patch, steps = int(options["patch"]), int(options["steps"])
        if patch < 64 or patch % 64:
            raise ValueError(f"patch {patch} must be a positive multiple of 64")

        def sample(cond, ctx, mask, keys):
            return self._sample(variables.params, cond, ctx, mask, keys, steps)

        x = generate_in_patches(
            sample,
            recon.astype(np.float32) / 127.5 - 1.0,
            patch=patch,
            overlap=patch // 4,
            batch=int(self.method.config.decode.patch_batch),
            channels=3,
            key=rng,
        )
        image = np.asarray(to_uint8((jnp.asarray(x) + 1.0) / 2.0))
        info = {
            "y_symbols": y_sym,
            "stage1_reconstruction": recon,
            "synthesis_s": t1 - t0,  # the autoencoder
            "denoise_s": time.perf_counter() - t1,
        }
        return image, info | ae_coder.last_timings
