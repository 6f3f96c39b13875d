"""DiffCR (Xia et al., AAAI-26, "Frequency-aware Diffusion Prior Refinement").

Composition of shared parts: the frozen SD VAE (its encoder's 8 moments before ``quant_conv``
feed the compressor; its ``quant_conv`` turns the compressor's 8 output channels into the
compressed latent ĉ = scale · mean; its decoder makes the image), RDEIC's
:class:`LatentCompressor` with DiffCR's sizes (32-entry VQ hyper latent), the frozen SD UNet
with no adapter, and FaSE (:mod:`jaxcodec.nn.fase`), the small consistency estimator that
refines the UNet's ẑ_0 with frequency-decoupled attention.

Decoding (the public code's ``CRSampler``): the encoder picks a start index on the 50-step DDIM
grid from the SNR of ĉ's error (:func:`~jaxcodec.diffusion.snr_start_index`) and writes it into
the file; from ``sqrt(ᾱ_t)·ĉ`` each of the two steps runs UNet ε → ẑ_0 → FaSE → consistency
boundary (σ_data 0.5) → DDIM move with the UNet's ε. The official decoder's last step, a
per-channel colour correction towards the original's mean and standard deviation, needs those
six numbers: they travel in the file, quantised to 8 bits as the public code does, and count in
the rate. The UNet's context is, as in the public code, ProjLayer([CLIP image embedding of the
decoded ĉ, prompt, base prompt]) (``model.condition='clip'``), or SD's empty prompt without
CLIP weights (``'empty_prompt'``).

Training (no public code; jaxcodec's design): stage 1 trains compressor + FaSE with the rate,
λ·‖ĉ − z_0‖², a consistency loss against an EMA target FaSE (the latent-consistency recipe on
the 50-step grid: the frozen UNet's DDIM step from t to t − 20 is the teacher) and ẑ_0 losses
(the refined estimate at a noised z_t and at the decoder's real start state), with the UNet's ε
held constant in its input (no backward pass through the UNet); stage 2 freezes
the compressor and trains FaSE through the real two-step sampler, the VAE decoder and the colour
correction with MSE + LPIPS in pixel space. See configs/diffcr.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxcodec.diffusion import (
    ConsistencyBoundary,
    consistency_sample,
    consistency_start_latent,
    consistency_timestep_table,
    scaled_linear_schedule,
    snr_start_index,
)
from jaxcodec.entropy.coder import CodingError
from jaxcodec.methods import register
from jaxcodec.methods.base import (
    Batch,
    BitstreamCoder,
    Method,
    Pretrained,
    StageStart,
    Variables,
    bits,
    lpips_loss_part,
    psnr_from_mse,
    to_float,
    to_uint8,
)
from jaxcodec.methods.rdeic import fast_key, latent_scale, sd_configs, text_condition_shape
from jaxcodec.nn import clip
from jaxcodec.nn import latent_compressor as lc
from jaxcodec.nn.fase import FaSE, FaSEConfig, ProjLayer
from jaxcodec.nn.unet import UNet, unet_param_shapes
from jaxcodec.nn.vae import AutoencoderKL, vae_param_shapes
from jaxcodec.weights import diffusers as dw

STRIDE = 64  # z is at H/64
CONDITIONS = ("clip", "empty_prompt")
COLOUR_BITS = 8  # the public code's bitquant(·, bits=8)


# ----------------------------------------------------------------------------- colour statistics


def colour_stats(x01: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and std (unbiased variance + eps) of [B, H, W, C] images."""
    flat = x01.reshape(x01.shape[0], -1, x01.shape[-1]).astype(jnp.float32)
    mean = jnp.mean(flat, axis=1)
    var = jnp.sum(jnp.square(flat - mean[:, None]), axis=1) / (flat.shape[1] - 1)
    return mean, jnp.sqrt(var + eps)


def colour_codes(x01: jax.Array) -> jax.Array:
    """The six integers [B, 6] (means, stds) the decoder's correction needs: the public code's
    ``round(v·255 + 0.5)``, half to even."""
    mean, std = colour_stats(x01)
    scale = 2**COLOUR_BITS - 1
    return jnp.round(jnp.concatenate([mean, std], axis=-1) * scale + 0.5).astype(jnp.int32)


def colour_correct(x01: jax.Array, codes: jax.Array) -> jax.Array:
    """Adaptive instance normalisation of the decoded image to the transmitted statistics,
    clipped to [0, 1] (the public code's ``adaptive_instance_normalization``)."""
    target = codes.astype(jnp.float32) / (2**COLOUR_BITS - 1)
    mean, std = colour_stats(x01)
    t_mean, t_std = target[:, None, None, :3], target[:, None, None, 3:]
    x = (x01 - mean[:, None, None]) / std[:, None, None] * t_std + t_mean
    return jnp.clip(x, 0.0, 1.0)


def pack_side(start: int, codes: np.ndarray | None) -> bytes:
    """Side information: the start index (6 bits), then the means (9 bits each: up to 256) and
    standard deviations (8 bits: up to 128) — 57 bits in 8 bytes, or 1 byte without colour."""
    if not 0 <= int(start) < 64:
        raise ValueError(f"start index {start} does not fit 6 bits")
    value, shift = int(start), 6
    if codes is not None:
        for i, c in enumerate(np.asarray(codes, np.int64)):
            width = 9 if i < 3 else 8
            if not 0 <= c < 1 << width:
                raise ValueError(f"colour code {c} does not fit {width} bits")
            value |= int(c) << shift
            shift += width
    return value.to_bytes((shift + 7) // 8, "big")


def unpack_side(data: bytes, colour: bool, grid_steps: int) -> tuple[int, np.ndarray | None]:
    size = 8 if colour else 1
    if len(data) != size:
        raise CodingError(f"side stream of {len(data)} bytes, expected {size}")
    value = int.from_bytes(data, "big")
    start, codes, shift = value & 63, [], 6
    if start >= grid_steps:
        raise CodingError(f"start index {start} outside the {grid_steps}-step grid")
    for i in range(6 if colour else 0):
        width = 9 if i < 3 else 8
        codes.append((value >> shift) & ((1 << width) - 1))
        shift += width
    if value >> shift:
        raise CodingError("side stream has bits past its last field")
    return start, np.asarray(codes, np.int32) if colour else None


def clip_image_input(x01: jax.Array, vision: clip.VisionConfig) -> jax.Array:
    """The public code's CLIP preprocessing of the decoded image: resize to the tower's square
    (bicubic, antialiased), then ``(x + 1)/2`` — applied there to an image already in [0, 1],
    and kept because released ProjLayer weights were trained on it — then CLIP's normalisation.
    kornia's ``align_corners=True`` resize is approximated by JAX's half-pixel one."""
    s = vision.image_size
    x = jax.image.resize(x01, (x01.shape[0], s, s, x01.shape[-1]), "bicubic", antialias=True)
    return clip.normalize((x + 1.0) / 2.0, vision.mean, vision.std)


# ----------------------------------------------------------------------------- the method


@register("diffcr")
class DiffCR(Method):
    console_metrics = ("bpp", "c_mse", "x0_mse", "consistency", "psnr", "lpips")

    def __init__(self, config):
        super().__init__(config)
        if self.stage not in (1, 2):
            raise ValueError(f"DiffCR has stages 1 and 2, not {self.stage}")
        m = config.model
        self.unet_config, self.vae_config = sd_configs(m)
        if not self.vae_config.use_quant_conv:
            raise ValueError("DiffCR's ĉ goes through the VAE's quant_conv: this VAE has none")
        cc, moments = m.compressor, 2 * self.vae_config.latent_channels
        self.compressor_config = lc.LatentCompressorConfig(
            in_channels=moments,
            out_channels=moments,
            N=cc.N,
            M=cc.M,
            groups=tuple(cc.groups),
            num_codes=cc.num_codes,
            res_blocks=tuple(cc.res_blocks),
        )
        latent = self.vae_config.latent_channels
        self.fase_config = FaSEConfig(in_channels=latent, out_channels=latent, **m.fase.to_dict())
        self.condition = m.condition
        if self.condition not in CONDITIONS:
            raise ValueError(f"model.condition must be one of {CONDITIONS}, not {self.condition!r}")
        width = self.unet_config.cross_attention_dim
        self.proj_dims = (width, width, 2 * width) if self.condition == "clip" else None
        self.vae = AutoencoderKL(self.vae_config)
        self.unet = UNet(self.unet_config)
        self.compressor = lc.LatentCompressor(self.compressor_config)
        self.fase = FaSE(self.fase_config)
        self.proj = ProjLayer(width, 2 * width) if self.proj_dims else None
        self.schedule = scaled_linear_schedule()
        self.boundary = ConsistencyBoundary(sigma_data=float(m.sigma_data))
        self.grid_steps = int(m.grid_steps)
        self.scale = latent_scale(m, self.vae_config)
        self.colour = bool(m.colour_correction)
        self._coder = DiffCRCoding(self)

    # --- Variables -----------------------------------------------------------------------

    @functools.cached_property
    def _vision_config(self) -> clip.VisionConfig:
        path = self.config.model.clip_path
        if path and Path(path).is_dir():
            from jaxcodec.weights.open_clip import read_config

            return read_config(path).vision
        return clip.CLIPConfig.from_open_clip(clip.VIT_H_14).vision

    def init(self, rng, batch: Batch):
        k_c, k_f, k_p = jax.random.split(fast_key(rng), 3)
        side = 2 ** (len(self.unet_config.block_out_channels) - 1)
        z = jnp.zeros((1, side, side, self.fase_config.in_channels))
        fase = self.fase.init(k_f, z, z, jnp.zeros((1,), jnp.int32))["params"]
        out: dict[str, Any] = {"params": {"fase": fase}}
        if self.proj is not None:
            tokens = jnp.zeros((1, 1, self.proj_dims[0]))
            out["params"]["proj"] = self.proj.init(k_p, tokens)["params"]
        if self.stage == 1:
            h = jnp.zeros((1, 8, 8, self.compressor_config.in_channels))
            comp = self.compressor.init({"params": k_c}, h, train=True, key=k_c)
            out["params"]["compressor"] = comp["params"]
            out["vq_stats"] = comp["vq_stats"]
            out["fase_target"] = fase  # the consistency loss's EMA target network
        return out

    def pretrained(self) -> dict[str, Pretrained]:
        m = self.config.model
        root = Path(m.sd_path)
        if not m.sd_path:
            raise FileNotFoundError(
                "DiffCR needs Stable Diffusion 2.1-base weights: set model.sd_path to a local "
                "diffusers folder (unet/, vae/, text_encoder/ or empty_prompt_embedding.npy)"
            )
        kw = dict(dtype=self.unet_config.dtype, remat=self.unet_config.remat)
        prompts = [m.prompt, m.base_prompt] if self.condition == "clip" else [""]

        def text():
            from jaxcodec.nn.text import encode_prompt

            return np.asarray(encode_prompt(prompts, root), np.float32)

        parts = {
            "unet": Pretrained(
                str(root / "unet"), lambda: nn.unbox(dw.load_unet(root / "unet", **kw)[1])
            ),
            "vae": Pretrained(str(root / "vae"), lambda: nn.unbox(dw.load_vae(root / "vae")[1])),
            "text": Pretrained(f"{root} (prompts {prompts})", text),
        }
        if self.condition == "clip":
            if not m.clip_path:
                raise FileNotFoundError(
                    "model.condition='clip' needs OpenCLIP ViT-H/14 weights: set model.clip_path "
                    "to an open_clip folder (open_clip_config.json + safetensors), or set "
                    "model.condition='empty_prompt'"
                )
            from jaxcodec.weights.open_clip import load

            parts["clip"] = Pretrained(
                str(m.clip_path), lambda: load(m.clip_path, towers=("vision",))[1]["vision"]
            )
        if self.stage == 2:
            parts["lpips"] = lpips_loss_part()
        return parts

    def abstract_frozen(self) -> Any:
        """UNet, VAE, CLIP and the stage-1 compressor with their logical axes; text and LPIPS
        replicate."""
        n = 2 if self.condition == "clip" else 1
        text = text_condition_shape(self.config.model, self.unet_config, n)
        out = {
            "unet": unet_param_shapes(self.unet_config),
            "vae": vae_param_shapes(self.vae_config),
            "text": jax.ShapeDtypeStruct(text, jnp.float32),
        }
        if self.condition == "clip":
            out["clip"] = clip.vision_param_shapes(self._vision_config)
        if self.stage == 2:
            from jaxcodec.metrics.lpips import lpips_params

            h = jax.ShapeDtypeStruct((1, 8, 8, self.compressor_config.in_channels), jnp.float32)
            init = lambda h: self.compressor.init({"params": jax.random.key(0)}, h, train=False)  # noqa: E731
            out["compressor"] = jax.eval_shape(init, h)
            out["lpips"] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), lpips_params("alex")
            )
        return out

    def init_from(self, previous) -> StageStart:
        if self.stage != 2:
            return super().init_from(previous)
        if previous.config.method != "diffcr":
            raise ValueError(f"stage 2 starts from a DiffCR model, not {previous.config.method}")
        keep = {k: v for k, v in previous.params.items() if k in ("fase", "proj")}
        if int(previous.config.stage) == 1:
            comp = {"params": previous.params["compressor"], **previous.state}
            comp = {k: v for k, v in comp.items() if k in ("params", "vq_stats")}
            return StageStart(params=keep, frozen={"compressor": comp})
        return StageStart(params=keep, frozen={"compressor": previous.frozen["compressor"]})

    def compressor_variables(self, params, state, frozen) -> dict[str, Any]:
        """{"params", "vq_stats"} of the compressor: trained in stage 1, frozen in stage 2."""
        if self.stage == 1:
            return {"params": params["compressor"], "vq_stats": state["vq_stats"]}
        return dict(frozen["compressor"])

    # --- Networks ------------------------------------------------------------------------

    def _encode(self, frozen, x: jax.Array) -> dict[str, jax.Array]:
        """x in [-1, 1] → the compressor input h (the 8 moments), the scaled posterior mean
        z_0 and a posterior sample."""
        post = self.vae.apply({"params": frozen["vae"]}, x, method="encode")
        mean = post["mean"].astype(jnp.float32)
        return dict(
            h=post["moments_pre_quant"].astype(jnp.float32),
            z0=mean * self.scale,
            std=jnp.exp(0.5 * post["logvar"].astype(jnp.float32)) * self.scale,
        )

    def c_hat(self, frozen, out8: jax.Array) -> jax.Array:
        """The compressor's 8 channels → ĉ: the VAE's frozen quant_conv, the posterior mode
        (its mean half), × the latent scale."""
        moments = self.vae.apply(
            {"params": frozen["vae"]}, out8, method=lambda vae, v: vae.quant_conv(v)
        )
        return jnp.split(moments.astype(jnp.float32), 2, axis=-1)[0] * self.scale

    def _decode_latent(self, frozen, z0: jax.Array) -> jax.Array:
        """ẑ_0 → image in [-1, 1]."""
        decode = lambda z: self.vae.apply(  # noqa: E731
            {"params": frozen["vae"]}, z / self.scale, method="decode"
        )
        if self.config.model.get("remat", False):
            decode = jax.checkpoint(decode)
        return decode(z0).astype(jnp.float32)

    def context(self, params, frozen, c_hat, *, key: jax.Array | None = None) -> jax.Array:
        """The UNet's cross-attention context: ProjLayer([CLIP(decoded ĉ), prompt, base
        prompt]) or the empty prompt. ``key`` switches ProjLayer's dropout on (training)."""
        text = jnp.asarray(frozen["text"], jnp.float32)
        batch = c_hat.shape[0]
        if self.proj is None:
            return jnp.broadcast_to(text[:1], (batch, *text.shape[1:]))
        x01 = (self._decode_latent(frozen, jax.lax.stop_gradient(c_hat)) + 1.0) / 2.0
        vision = self._vision_config
        images = clip_image_input(x01, vision)
        emb = clip.VisionTransformer(vision).apply({"params": frozen["clip"]}, images).pooled
        tokens = jnp.concatenate(
            [emb[:, None].astype(jnp.float32),
             jnp.broadcast_to(text[None, 0], (batch, *text.shape[1:])),
             jnp.broadcast_to(text[None, 1], (batch, *text.shape[1:]))], axis=1,
        )  # fmt: skip
        rngs = {} if key is None else {"dropout": key}
        return self.proj.apply(
            {"params": params["proj"]}, tokens, deterministic=key is None, rngs=rngs
        )

    def _refine(self, fase, unet, c_hat, context, z, t, *, unet_input_grad: bool = True):
        """The denoiser of the sampler: (FaSE's refined ẑ_0, the frozen UNet's ε).
        ``unet_input_grad=False`` treats ε as constant in z (no backward pass through the UNet
        but for the context's gradient; z still reaches ẑ_0 = (z − σε)/α directly)."""
        z_in = z if unet_input_grad else jax.lax.stop_gradient(z)
        eps = self.unet.apply({"params": unet}, z_in, t, context).astype(jnp.float32)
        a, s = self.schedule.alpha_sigma(t)
        x0 = (z - s[:, None, None, None] * eps) / a[:, None, None, None]
        return self.fase.apply({"params": fase}, x0, c_hat, t), eps

    def consistency_f(self, fase, unet, c_hat, context, z, t) -> tuple[jax.Array, jax.Array]:
        """(f(z_t, t) — FaSE's estimate through the consistency boundary —, the UNet's ε), as
        stage 1 trains it: ε constant in z (see `_refine`)."""
        f, eps = self._refine(fase, unet, c_hat, context, z, t, unet_input_grad=False)
        return self.boundary(z, f, t), eps

    def sample(self, params, frozen, c_hat, context, timesteps, *, remat: bool = False):
        """ĉ → ẑ_0: the two-step consistency chain from ``sqrt(ᾱ_t)·ĉ`` (``timesteps`` (S,) or
        per example (S, B), descending)."""
        z = consistency_start_latent(self.schedule, c_hat, timesteps[0])
        denoise = Partial(self._refine, params["fase"], frozen["unet"], c_hat, context)
        return consistency_sample(
            denoise, self.schedule, z, timesteps, self.boundary, prediction="x0", remat=remat
        )

    def timestep_table(self, steps: int) -> jax.Array:
        return jnp.asarray(consistency_timestep_table(steps, self.grid_steps))

    def decode_image(self, params, frozen, c_hat, start, codes, *, steps: int):
        """ĉ, start indices [B], colour codes [B, 6] or None → images in [0, 1]: context, the
        sampler, the VAE decoder and the colour correction — the decoder's whole float path."""
        timesteps = self.timestep_table(steps)[start].T
        z0 = self.sample(params, frozen, c_hat, self.context(params, frozen, c_hat), timesteps)
        x01 = (self._decode_latent(frozen, z0) + 1.0) / 2.0
        return x01 if codes is None else colour_correct(x01, codes)

    # --- Training ------------------------------------------------------------------------

    def loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        x01 = to_float(batch["image"])
        x = x01 * 2.0 - 1.0
        k_post, k_y, k_vq, k_n, k_drop = jax.random.split(fast_key(rng), 5)
        enc = self._encode(frozen, x)
        z0 = enc["z0"] + enc["std"] * jax.random.normal(k_post, enc["z0"].shape)
        lam = float(self.config.loss.lambda_r)
        comp = self.compressor_variables(params, state, frozen)
        if self.stage == 1:
            out, new_state = self.compressor.apply(
                comp, enc["h"], train=True, key=k_y, mutable=["vq_stats"],
                rngs={"vq_restart": k_vq},
            )  # fmt: skip
        else:
            out, new_state = self.compressor.apply(comp, enc["h"], train=False), {}
        c_hat = self.c_hat(frozen, out.z_c)
        c_hat = c_hat if self.stage == 1 else jax.lax.stop_gradient(c_hat)
        num_pixels = x.shape[0] * x.shape[1] * x.shape[2]
        bpp_y = bits(out.y_likelihoods) / num_pixels
        c_mse = jnp.mean(jnp.square(c_hat - z0))
        metrics = {
            "bpp": bpp_y + out.indices.size * lc.index_bits(self.compressor_config) / num_pixels,
            "bpp_y": bpp_y,
            "c_mse": c_mse,
        }
        start = snr_start_index(
            self.schedule, jax.lax.stop_gradient(c_hat), enc["z0"], self.grid_steps
        )
        steps = int(self.config.decode.steps)
        timesteps = self.timestep_table(steps)[start].T  # (S, B)
        context = self.context(params, frozen, c_hat, key=k_drop)
        unet = frozen["unet"]
        if self.stage == 1:
            # Consistency on the 50-step grid: online f(z_t, t) against the EMA target's
            # f(z_s, s), z_s one DDIM step (t → t − T/grid) of the frozen UNet from z_t.
            k_idx, k_noise = jax.random.split(k_n)
            stride = self.schedule.num_timesteps // self.grid_steps
            t = stride * jax.random.randint(k_idx, (x.shape[0],), 1, self.grid_steps) + stride - 1
            s = t - stride
            eps = jax.random.normal(k_noise, z0.shape)
            z_t = self.schedule.q_sample(z0, t, eps)
            # The online network at z_t and at the decoder's real start state sqrt(ᾱ)·ĉ, in
            # one batch (one UNet and one FaSE in the program).
            t0 = timesteps[0]
            z_start = consistency_start_latent(self.schedule, c_hat, t0)
            twice = lambda a: jnp.concatenate([a, a])  # noqa: E731
            f, eps_online = self.consistency_f(
                params["fase"], unet, twice(c_hat), twice(context),
                jnp.concatenate([z_t, z_start]), jnp.concatenate([t, t0]),
            )  # fmt: skip
            (f_t, f_0), eps_t = jnp.split(f, 2), jnp.split(eps_online, 2)[0]
            a_t, s_t = (v[:, None, None, None] for v in self.schedule.alpha_sigma(t))
            a_s, s_s = (v[:, None, None, None] for v in self.schedule.alpha_sigma(s))
            z_s = jax.lax.stop_gradient(a_s * (z_t - s_t * eps_t) / a_t + s_s * eps_t)
            target, _ = self.consistency_f(
                state["fase_target"], unet, jax.lax.stop_gradient(c_hat),
                jax.lax.stop_gradient(context), z_s, s,
            )  # fmt: skip
            consistency = jnp.mean(jnp.square(f_t - jax.lax.stop_gradient(target)))
            x0_mse = jnp.mean(jnp.square(f_t - z0)) + jnp.mean(jnp.square(f_0 - z0))
            lw = self.config.loss
            loss = (
                bpp_y
                + out.vq_loss
                + lam * (c_mse + lw.x0_weight * x0_mse + lw.consistency_weight * consistency)
            )
            decay = float(lw.target_decay)
            new_state = dict(new_state)
            new_state["fase_target"] = jax.tree.map(
                lambda tgt, p: decay * tgt + (1.0 - decay) * jax.lax.stop_gradient(p),
                state["fase_target"],
                params["fase"],
            )
            metrics |= {
                "vq_loss": out.vq_loss,
                "perplexity": out.perplexity,
                "x0_mse": x0_mse,
                "consistency": consistency,
            }
        else:
            from jaxcodec.metrics.lpips import lpips_distance

            z0_hat = self.sample(
                params, frozen, c_hat, context, timesteps, remat=bool(self.config.model.remat)
            )
            x_hat = (self._decode_latent(frozen, z0_hat) + 1.0) / 2.0
            if self.colour:
                x_hat = colour_correct(x_hat, colour_codes(x01))
            mse = jnp.mean(jnp.square(x_hat - x01))
            lp = jnp.mean(lpips_distance(frozen["lpips"], x_hat, x01))
            lw = self.config.loss
            loss = lw.mse_weight * 4.0 * mse + lw.lpips_weight * lp  # MSE on [-1, 1]
            metrics |= {"mse": mse, "lpips": lp, "psnr": psnr_from_mse(mse)}
        metrics["loss"] = loss
        return loss, metrics, new_state

    def evaluate(self, variables: Variables, images: jax.Array, valid_hw, rng: jax.Array):
        """Estimated bpp (likelihoods, fixed-length indices, side information) and PSNR of the
        decoder's float path with the configured steps."""
        p, frozen = variables.params, variables.frozen
        comp = self.compressor_variables(p, variables.state, frozen)
        enc = self._encode(frozen, images * 2.0 - 1.0)
        out = self.compressor.apply(comp, enc["h"], train=False)
        c_hat = self.c_hat(frozen, out.z_c)
        start = snr_start_index(self.schedule, c_hat, enc["z0"], self.grid_steps)
        codes = colour_codes(images) if self.colour else None
        x01 = self.decode_image(p, frozen, c_hat, start, codes, steps=int(self.config.decode.steps))
        h, w = valid_hw
        recon = to_uint8(x01[:, :h, :w])
        ref = to_uint8(images[:, :h, :w]).astype(jnp.float32)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - ref), axis=(1, 2, 3))
        side = 8 * (8 if self.colour else 1)
        z_bits = out.indices[0].size * lc.index_bits(self.compressor_config)
        rate = bits(out.y_likelihoods, axis=(1, 2, 3)) + z_bits + side
        return {"bpp": rate / (h * w), "psnr": psnr_from_mse(mse, 255.0)}, recon

    # --- Coding --------------------------------------------------------------------------

    @property
    def coder(self) -> DiffCRCoding:
        return self._coder

    def entropy_tables(self, variables: Variables):
        comp = self.compressor_variables(variables.params, variables.state, variables.frozen)
        return lc.entropy_tables(self.compressor_config, comp["params"], comp["vq_stats"])


class DiffCRCoding(BitstreamCoder):
    """Files of a DiffCR model: VQ indices (fixed bits), y (integer tables, fixed-point entropy
    parameters) and the side information (start index, colour codes); the header carries the
    sampler steps. Decoding: entropy decoding (host) → g_s and ĉ → the UNet's context and the
    two-step sampler (one jitted function) → VAE decoder and colour correction, timed
    separately (`entropy_s`, `synthesis_s`, `denoise_s`, `vae_decode_s`)."""

    stride = STRIDE
    num_streams = 3

    def __init__(self, method: DiffCR):
        self.method = method
        self.latent = lc.LatentCoding()
        comp = method.compressor

        def analyse(comp_vars, frozen, image):
            x = image.astype(jnp.float32)[None] / 255.0
            enc = method._encode(frozen, x * 2.0 - 1.0)
            y, z = comp.apply(comp_vars, enc["h"], method="analyse")
            codes = colour_codes(x)[0] if method.colour else jnp.zeros((6,), jnp.int32)
            return y[0], comp.apply(comp_vars, z, method="hyper_indices")[0], enc["z0"], codes

        def synthesise(comp_params, frozen, y_hat):
            out8, _ = comp.apply({"params": comp_params}, y_hat, method="synthesise")
            return method.c_hat(frozen, out8)

        def denoise(params, frozen, c_hat, timesteps):
            context = method.context(params, frozen, c_hat)
            return method.sample(params, frozen, c_hat, context, timesteps)

        def vae_decode(frozen, z0, codes):
            x01 = (method._decode_latent(frozen, z0) + 1.0) / 2.0
            return to_uint8(x01 if codes is None else colour_correct(x01, codes))

        self._analyse = jax.jit(analyse)
        self._synthesise = jax.jit(synthesise)
        self._denoise = jax.jit(denoise)
        self._vae_decode = jax.jit(vae_decode)

    def options(self) -> dict[str, Any]:
        return {"steps": int(self.method.config.decode.steps)}

    def _check_steps(self, options) -> int:
        steps = int(options["steps"])
        if not 1 <= steps < self.method.grid_steps:
            raise CodingError(f"steps={steps} outside [1, {self.method.grid_steps - 1}]")
        return steps

    def compress(self, variables, tables, image: np.ndarray, options: Mapping[str, Any]):
        self._check_steps(options)
        m, frozen = self.method, variables.frozen
        comp = m.compressor_variables(variables.params, variables.state, frozen)
        t0 = time.perf_counter()
        y, idx, z0, codes = self._analyse(comp, frozen, image)
        y, idx = np.asarray(y), np.asarray(idx)
        t1 = time.perf_counter()
        streams, y_hat, info = self.latent.encode(tables, y, idx)
        t2 = time.perf_counter()
        # ĉ as the decoder will have it (g_s on the entropy-decoded ŷ), then the start step.
        c_hat = self._synthesise(comp["params"], frozen, jnp.asarray(y_hat)[None])
        start = int(snr_start_index(m.schedule, c_hat, z0, m.grid_steps)[0])
        codes = np.asarray(codes) if m.colour else None
        streams.append(pack_side(start, codes))
        info |= {"start_index": start, "colour_codes": codes}
        return streams, info | {"analysis_s": t1 - t0, "start_s": time.perf_counter() - t2}

    def decompress(self, variables, tables, streams, hw, options, rng):
        steps = self._check_steps(options)
        m, p, frozen = self.method, variables.params, variables.frozen
        start, codes = unpack_side(streams[2], m.colour, m.grid_steps)
        y_hat, info = self.latent.decode(tables, streams[:2], (hw[0] // STRIDE, hw[1] // STRIDE))
        comp = m.compressor_variables(p, variables.state, frozen)
        t0 = time.perf_counter()
        c_hat = jax.block_until_ready(
            self._synthesise(comp["params"], frozen, jnp.asarray(y_hat)[None])
        )
        t1 = time.perf_counter()
        timesteps = jnp.asarray(m.timestep_table(steps)[start])
        z0 = jax.block_until_ready(self._denoise(p, frozen, c_hat, timesteps))
        t2 = time.perf_counter()
        codes = None if codes is None else jnp.asarray(codes)[None]
        image = np.asarray(self._vae_decode(frozen, z0, codes))[0]
        t3 = time.perf_counter()
        info |= {"start_index": start, "colour_codes": codes}
        return image, info | {"synthesis_s": t1 - t0, "denoise_s": t2 - t1, "vae_decode_s": t3 - t2}
