"""RDEIC (Li et al., "Relay Residual Diffusion Extreme Image Compression").

Composition of shared parts: the frozen SD VAE (its encoder's 512-channel feature h feeds the
compressor; its decoder makes the image), the :class:`LatentCompressor` (h → y → VQ hyper
latent → ŷ → hint and z_c), the frozen SD UNet driven by RDEIC's control adapter
(ε_θ(z_t, t, c, hint), c = the empty prompt), relay residual diffusion from N (training target
ε̃ = ε + (z_c − z_0)/λ; sampling from z_N = sqrt(ᾱ_N)·z_c + sqrt(1 − ᾱ_N)·ε in 2 or 5 spaced
DDPM steps) and, at decode time, the guidance λ_s between the plain and the controlled UNet.

Stage 1 trains compressor + adapter on independent timesteps, stage 2 through the whole
fixed-step chain and the VAE decoder (LPIPS from the frozen `lpips` part). See configs/rdeic.py.

One model for every rate (`configs/rdeic.py:VARIANT,variable_rate=1`): the compressor is
rate-conditioned (`jaxcodec.nn.rate`), every training example draws its own λ_r (log-uniform over
the five rate points' range) and weighs its distortion terms by it, and the decoder knows the
rate: the sampler steps a file gets by default follow q, interpolated from the fixed-rate configs
(`decode.steps_by_rate`). The relay start N stays the model's: the paper's N is 300 at every rate
point, so N(q) is that constant.
"""

from __future__ import annotations

import json
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
    guided_denoiser,
    relay_loss,
    relay_sample,
    relay_start_latent,
    relay_training_sample,
    scaled_linear_schedule,
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
from jaxcodec.nn import latent_compressor as lc
from jaxcodec.nn import rate as rate_lib
from jaxcodec.nn.control import ControlAdapterConfig, ControlledUNet
from jaxcodec.nn.rate import RateConfig, interpolate_setting
from jaxcodec.nn.unet import SD21_BASE_UNET, UNet, UNetConfig, unet_param_shapes
from jaxcodec.nn.vae import SD21_BASE_VAE, AutoencoderKL, VAEConfig, vae_param_shapes
from jaxcodec.weights import diffusers as dw

STRIDE = 64  # z is at H/64


def sd_configs(model: Any) -> tuple[UNetConfig, VAEConfig]:
    """The backbone's configs from the SD folder's config.json files (the authority), or SD
    2.1-base's when no folder is set (shapes only: nothing can be loaded then)."""
    kw = dict(dtype=model.get("unet_dtype", "float32"), remat=model.get("remat", False))
    if not model.sd_path:
        return UNetConfig.from_diffusers(SD21_BASE_UNET, **kw), VAEConfig.from_diffusers(
            SD21_BASE_VAE, remat=kw["remat"]
        )
    root = Path(model.sd_path)
    configs = []
    for sub in ("unet", "vae"):
        path = root / sub / dw.CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"model.sd_path={root} has no {sub}/{dw.CONFIG_NAME}: point it at a diffusers "
                "Stable Diffusion 2.1-base folder (unet/, vae/, text_encoder/)"
            )
        configs.append(json.loads(path.read_text()))
    return UNetConfig.from_diffusers(configs[0], **kw), VAEConfig.from_diffusers(
        configs[1], remat=kw["remat"]
    )


def latent_scale(model: Any, vae: VAEConfig) -> float:
    """`model.scale_factor`, or where it is 0 the backbone's own `scaling_factor` (its
    vae/config.json: 0.18215 for SD 2.1, the measured one for a backbone trained by
    configs/ldm.py)."""
    return float(model.scale_factor) or vae.scaling_factor


def text_condition_shape(model: Any, unet: UNetConfig, n: int = 1) -> tuple[int, int, int]:
    """(n, tokens, width) of a backbone's text condition: its stored empty-prompt embedding's
    (n = 1: a backbone trained by configs/ldm.py has its own token count), else SD 2.x's 77."""
    path = Path(model.sd_path or ".") / dw.TEXT_CONDITION_NAMES[0]
    if n == 1 and model.sd_path and path.is_file():
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        return tuple(shape) if len(shape) == 3 else (1, *shape)
    return (n, 77, unet.cross_attention_dim)


def fast_key(rng: jax.Array) -> jax.Array:
    """An RBG key (XLA's RngBitGenerator) seeded by one draw of ``rng``: the many random ops of
    initialisation and of the rate proxy compile ~3× faster than with threefry on a CPU (their
    values then depend on the backend, which no result here relies on)."""
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def guidance_mode(lambda_s: float) -> str:
    """λ_s = 1 runs the controlled UNet only, λ_s = 0 the plain SD UNet only (one forward pass
    per step either way); anything else evaluates both."""
    return "controlled" if lambda_s == 1.0 else "plain" if lambda_s == 0.0 else "guided"


@register("rdeic")
class RDEIC(Method):
    console_metrics = ("bpp", "z_c_mse", "x0_mse", "psnr", "lpips")

    def __init__(self, config):
        super().__init__(config)
        if self.stage not in (1, 2):
            raise ValueError(f"RDEIC has stages 1 and 2, not {self.stage}")
        m = config.model
        self.unet_config, self.vae_config = sd_configs(m)
        cc = m.compressor
        self.compressor_config = lc.LatentCompressorConfig(
            in_channels=self.vae_config.block_out_channels[-1],
            out_channels=self.vae_config.latent_channels,
            N=cc.N,
            M=cc.M,
            groups=tuple(cc.groups),
            num_codes=cc.num_codes,
            res_blocks=tuple(cc.get("res_blocks", (4, 3))),
            rate=RateConfig.from_config(cc.get("rate")),
        )
        self.adapter_config = ControlAdapterConfig.rdeic(
            m.adapter.size_ratio, m.adapter.head_channels, hint_channels=cc.M
        )
        self.vae = AutoencoderKL(self.vae_config)
        self.unet = UNet(self.unet_config)
        self.controlled = ControlledUNet(self.unet_config, self.adapter_config)
        self.compressor = lc.LatentCompressor(self.compressor_config)
        self.schedule = scaled_linear_schedule()
        self.relay_start = int(m.relay_start)
        self.scale = latent_scale(m, self.vae_config)
        self.rate = self.compressor_config.rate
        self._coder = RDEICCoding(self)

    # --- The rate (rate-conditioned models) -------------------------------------------------

    def steps_at(self, index: int) -> int:
        """Sampler steps of a file at q's grid index: the fixed-rate configs' steps per λ_r
        (`decode.steps_by_rate`, (λ_r, steps) pairs: 2 for λ_r ≥ 1, 5 below) at q's λ_r,
        interpolated in log λ and rounded."""
        points = self.config.decode.get("steps_by_rate")
        if not points:
            return int(self.config.decode.steps)
        lmbda = float(self.rate.lmbda(self.rate.q(index)))
        return int(np.floor(interpolate_setting(points, lmbda) + 0.5))

    def _q(self, batch: int) -> jax.Array | None:
        """q of the default quality for every example (None for a fixed-rate model)."""
        if self.rate is None:
            return None
        return jnp.full((batch,), self.rate.q(self.rate.default_index), jnp.float32)

    # --- Variables -----------------------------------------------------------------------

    def init(self, rng, batch: Batch):
        k_c, k_a, k_n = jax.random.split(fast_key(rng), 3)
        h = jnp.zeros((1, 8, 8, self.compressor_config.in_channels))
        comp = self.compressor.init({"params": k_c}, h, train=True, key=k_n, q=self._q(1))
        side = 2 ** (len(self.unet_config.block_out_channels) - 1)
        z = jnp.zeros((1, side, side, self.unet_config.in_channels))
        hint = jnp.zeros((1, side, side, self.compressor_config.M))
        ctx = jnp.zeros((1, 1, self.unet_config.cross_attention_dim))
        # Only the adapter is kept: inside jit the UNet's initialisation is dead code.
        adapter = self.controlled.init(k_a, z, jnp.zeros((1,)), ctx, hint)["params"]["adapter"]
        return {
            "params": {"compressor": comp["params"], "adapter": adapter},
            "vq_stats": comp["vq_stats"],
        }

    def pretrained(self) -> dict[str, Pretrained]:
        root = Path(self.config.model.sd_path)
        if not self.config.model.sd_path:
            raise FileNotFoundError(
                "RDEIC needs Stable Diffusion 2.1-base weights: set model.sd_path to a local "
                "diffusers folder (unet/, vae/, text_encoder/ or empty_prompt_embedding.npy)"
            )
        kw = dict(dtype=self.unet_config.dtype, remat=self.unet_config.remat)

        def text():
            from jaxcodec.nn.text import encode_prompt

            return np.asarray(encode_prompt("", root), np.float32)

        parts = {
            "unet": Pretrained(
                str(root / "unet"), lambda: nn.unbox(dw.load_unet(root / "unet", **kw)[1])
            ),
            "vae": Pretrained(str(root / "vae"), lambda: nn.unbox(dw.load_vae(root / "vae")[1])),
            "text": Pretrained(f"{root} (empty prompt)", text),
        }
        if self.stage == 2:
            parts["lpips"] = lpips_loss_part()
        return parts

    def abstract_frozen(self) -> Any:
        """The UNet and VAE with their logical axes (FSDP); text and LPIPS replicate."""
        out = {
            "unet": unet_param_shapes(self.unet_config),
            "vae": vae_param_shapes(self.vae_config),
            "text": jax.ShapeDtypeStruct(
                text_condition_shape(self.config.model, self.unet_config), jnp.float32
            ),
        }
        if self.stage == 2:
            from jaxcodec.metrics.lpips import lpips_params

            out["lpips"] = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), lpips_params("alex")
            )
        return out

    def init_from(self, previous) -> StageStart:
        if self.stage != 2:
            return super().init_from(previous)
        if previous.config.method != "rdeic":
            raise ValueError(f"stage 2 starts from an RDEIC model, not {previous.config.method}")
        return StageStart(params=previous.params, state=previous.state)

    # --- Networks ------------------------------------------------------------------------

    def _eps_theta(self, adapter, unet, hint, context, z, t):
        """ε_θ(z_t, t, c, hint): the frozen UNet with the control adapter."""
        params = {"params": {"unet": unet, "adapter": adapter}}
        return self.controlled.apply(params, z, t, context, hint).astype(jnp.float32)

    def _eps_sd(self, unet, context, z, t):
        """ε_sd(z_t, t, c): the plain frozen SD UNet."""
        return self.unet.apply({"params": unet}, z, t, context).astype(jnp.float32)

    def _context(self, frozen, batch: int) -> jax.Array:
        text = jnp.asarray(frozen["text"], jnp.float32)
        text = text if text.ndim == 3 else text[None]
        return jnp.broadcast_to(text[:1], (batch, *text.shape[1:]))

    def _encode(self, frozen, x: jax.Array) -> dict[str, jax.Array]:
        """x in [-1, 1] → the VAE posterior and the compressor's input h (× scale factor)."""
        post = self.vae.apply({"params": frozen["vae"]}, x, method="encode")
        return dict(post, h=post["feature"].astype(jnp.float32) * self.scale)

    def _decode_latent(self, frozen, z0: jax.Array) -> jax.Array:
        """ẑ_0 → image in [-1, 1]."""
        decode = lambda z: self.vae.apply(
            {"params": frozen["vae"]}, z / self.scale, method="decode"
        )
        if self.config.model.get("remat", False):
            decode = jax.checkpoint(decode)
        return decode(z0).astype(jnp.float32)

    def relay_decode(self, params, frozen, z_c, hint, key, *, steps: int, lambda_s, mode: str):
        """z_c, hint → ẑ_0 by relay sampling from z_N with guidance λ_s (see `guidance_mode`)."""
        k_start, k_chain = jax.random.split(key)
        context = self._context(frozen, z_c.shape[0])
        eps = jax.random.normal(k_start, z_c.shape, jnp.float32)
        z_n = relay_start_latent(self.schedule, z_c, eps, self.relay_start)
        eps_theta = Partial(self._eps_theta, params["adapter"], frozen["unet"], hint, context)
        eps_sd = Partial(self._eps_sd, frozen["unet"], context)
        denoise = {
            "controlled": lambda: eps_theta,
            "plain": lambda: eps_sd,
            "guided": lambda: guided_denoiser(eps_sd, eps_theta, lambda_s),
        }[mode]()
        return relay_sample(
            denoise, self.schedule, z_n, k_chain, relay_start=self.relay_start, num_steps=steps
        )

    # --- Training ------------------------------------------------------------------------

    def loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        x = to_float(batch["image"]) * 2.0 - 1.0
        k_post, k_y, k_vq, k_diff = jax.random.split(fast_key(rng), 4)
        q = None
        if self.rate is not None:  # each example its own λ_r (drawn from the step's key)
            q = self.rate.sample_q(jax.random.fold_in(rng, 1), x.shape[0])
        enc = self._encode(frozen, x)
        z0 = enc["mean"] + jnp.exp(0.5 * enc["logvar"]) * jax.random.normal(
            k_post, enc["mean"].shape
        )
        z0 = z0.astype(jnp.float32) * self.scale  # a posterior sample, as LDM trains
        out, new_state = self.compressor.apply(
            {"params": params["compressor"], **state},
            enc["h"],
            train=True,
            key=k_y,
            q=q,
            mutable=list(state),
            rngs={"vq_restart": k_vq},
        )
        if q is None:
            lam = float(self.config.loss.lambda_r)
            weigh = lambda per_example: lam * jnp.mean(per_example)  # noqa: E731
        else:
            lam = self.rate.lmbda(q)
            weigh = lambda per_example: jnp.mean(lam * per_example)  # noqa: E731
        num_pixels = x.shape[0] * x.shape[1] * x.shape[2]
        bpp_y = bits(out.y_likelihoods) / num_pixels
        bpp_z = out.indices.size * lc.index_bits(self.compressor_config) / num_pixels
        z_c_mse = jnp.mean(jnp.square(out.z_c - z0))
        if q is None:
            loss = bpp_y + out.vq_loss + lam * z_c_mse
        else:
            loss = bpp_y + out.vq_loss + weigh(jnp.mean(jnp.square(out.z_c - z0), axis=(1, 2, 3)))
        metrics = {
            "bpp": bpp_y + bpp_z,
            "bpp_y": bpp_y,
            "vq_loss": out.vq_loss,
            "perplexity": out.perplexity,
            "z_c_mse": z_c_mse,
        }
        context = self._context(frozen, x.shape[0])
        if self.stage == 1:
            z_t, t, eps_tilde = relay_training_sample(
                self.schedule, z0, out.z_c, k_diff, self.relay_start
            )
            eps = self._eps_theta(params["adapter"], frozen["unet"], out.hint, context, z_t, t)
            x0_mse_i = relay_loss(eps, z_t, t, z0, eps_tilde, self.schedule)
            x0_mse = jnp.mean(x0_mse_i)
            loss = loss + (lam * x0_mse if q is None else weigh(x0_mse_i))
            metrics["x0_mse"] = x0_mse
        else:
            from jaxcodec.metrics.lpips import lpips_distance

            k_start, k_chain = jax.random.split(k_diff)
            z_n = relay_start_latent(
                self.schedule, out.z_c, jax.random.normal(k_start, z0.shape), self.relay_start
            )
            denoise = Partial(self._eps_theta, params["adapter"], frozen["unet"], out.hint, context)
            z0_hat = relay_sample(
                denoise,
                self.schedule,
                z_n,
                k_chain,
                relay_start=self.relay_start,
                num_steps=int(self.config.loss.fixed_steps),
                remat=True,
            )
            x_hat = self._decode_latent(frozen, z0_hat)
            mse = jnp.mean(jnp.square(x_hat - x))  # on [-1, 1], as the official loss
            lp_i = lpips_distance(frozen["lpips"], (x_hat + 1.0) / 2.0, (x + 1.0) / 2.0)
            lp = jnp.mean(lp_i)
            if q is None:
                loss = loss + lam * (mse + self.config.loss.lpips_weight * lp)
            else:
                mse_i = jnp.mean(jnp.square(x_hat - x), axis=(1, 2, 3))
                loss = loss + weigh(mse_i + self.config.loss.lpips_weight * lp_i)
            metrics |= {"mse": mse, "lpips": lp, "psnr": psnr_from_mse(mse / 4.0)}
        metrics["loss"] = loss
        return loss, metrics, dict(new_state)

    def evaluate(self, variables: Variables, images: jax.Array, valid_hw, rng: jax.Array):
        """Estimated bpp (likelihoods + fixed-length indices) and PSNR of a full decode with the
        configured steps and λ_s."""
        p, frozen = variables.params, variables.frozen
        enc = self._encode(frozen, images * 2.0 - 1.0)
        out = self.compressor.apply(
            {"params": p["compressor"], **variables.state},
            enc["h"],
            train=False,
            q=self._q(images.shape[0]),
        )
        d = self.config.decode
        z0_hat = self.relay_decode(
            p,
            frozen,
            out.z_c,
            out.hint,
            rng,
            steps=int(d.steps),
            lambda_s=float(d.guidance),
            mode=guidance_mode(float(d.guidance)),
        )
        h, w = valid_hw
        recon = to_uint8((self._decode_latent(frozen, z0_hat)[:, :h, :w] + 1.0) / 2.0)
        ref = to_uint8(images[:, :h, :w]).astype(jnp.float32)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - ref), axis=(1, 2, 3))
        z_bits = out.indices[0].size * lc.index_bits(self.compressor_config)
        rate = bits(out.y_likelihoods, axis=(1, 2, 3)) + z_bits
        return {"bpp": rate / (h * w), "psnr": psnr_from_mse(mse, 255.0)}, recon

    # --- Coding --------------------------------------------------------------------------

    @property
    def coder(self) -> RDEICCoding:
        return self._coder

    def entropy_tables(self, variables: Variables):
        return lc.entropy_tables(
            self.compressor_config, variables.params["compressor"], variables.state["vq_stats"]
        )


class RDEICCoding(BitstreamCoder):
    """Files of an RDEIC model: VQ indices (fixed bits) and y (integer tables, fixed-point
    entropy parameters); the header carries the sampler steps, λ_s and the noise seed.

    Decoding: entropy decoding (host) → g_s → relay sampling → VAE decoder, timed separately
    (`entropy_s`, `synthesis_s`, `denoise_s`, `vae_decode_s`).
    """

    stride = STRIDE
    num_streams = 2

    def __init__(self, method: RDEIC):
        self.method = method
        self.latent = lc.LatentCoding()
        comp = method.compressor

        def analyse(params, state, frozen, image):
            x = image.astype(jnp.float32)[None] / 127.5 - 1.0
            h = method._encode(frozen, x)["h"]
            v = {"params": params["compressor"], **state}
            y, z = comp.apply(v, h, method="analyse")
            return y[0], comp.apply(v, z, method="hyper_indices")[0]

        def synthesise(params, y_hat, q):
            v = {"params": params["compressor"]}
            y_hat = comp.apply(v, y_hat, q, "inverse_y", method="modulate")
            return comp.apply(v, y_hat, method="synthesise")

        def forward_y(params, y, q):
            return comp.apply(
                {"params": params["compressor"]}, y, q, "forward_y", method="modulate"
            )

        def denoise(params, frozen, z_c, hint, key, lambda_s, steps, mode):
            return method.relay_decode(
                params, frozen, z_c, hint, key, steps=steps, lambda_s=lambda_s, mode=mode
            )

        def vae_decode(frozen, z0):
            return to_uint8((method._decode_latent(frozen, z0) + 1.0) / 2.0)

        self._analyse = jax.jit(analyse)
        self._synthesise = jax.jit(synthesise)
        self._forward_y = jax.jit(forward_y)
        self._denoise = jax.jit(denoise, static_argnames=("steps", "mode"))
        self._vae_decode = jax.jit(vae_decode)

    @property
    def rate_config(self) -> RateConfig | None:
        return self.method.rate

    def options(self) -> dict[str, Any]:
        d = self.method.config.decode
        out = {"steps": int(d.steps), "guidance": float(d.guidance), "seed": int(d.seed)}
        rate = self.method.rate
        if rate is not None:
            out |= self.rate_options(rate.default_index) | {"rate": rate.default_index}
        return out

    def rate_options(self, index: int) -> dict[str, Any]:
        """A file at another rate gets that rate's sampler steps by default."""
        return {"steps": self.method.steps_at(index)}

    def _rate(self, tables, options) -> tuple[int | None, jax.Array | None]:
        """(q's grid index, q [1]) of a conditioned model's file, else (None, None)."""
        rate = self.method.rate
        if rate is None:
            return None, None
        index = rate.check_index(options["rate"])
        rate_lib.check_tables(tables["rate"], rate.levels, self.method.compressor_config.N)
        return index, jnp.full((1,), rate.q(index), jnp.float32)

    def analyse(self, variables, image: np.ndarray) -> dict[str, Any]:
        """VAE encoder, g_a, h_a and the VQ indices: independent of q."""
        t0 = time.perf_counter()
        y, idx = self._analyse(variables.params, variables.state, variables.frozen, image)
        return {"y": y, "z_indices": np.asarray(idx), "analysis_s": time.perf_counter() - t0}

    def encode_analysed(self, variables, tables, analysis, options: Mapping[str, Any]):
        index, q = self._rate(tables, options)
        y = analysis["y"]
        if q is not None:
            y = self._forward_y(variables.params, y[None], q)[0]
        streams, _, info = self.latent.encode(tables, np.asarray(y), analysis["z_indices"], index)
        return streams, info

    def compress(self, variables, tables, image: np.ndarray, options: Mapping[str, Any]):
        analysis = self.analyse(variables, image)
        streams, info = self.encode_analysed(variables, tables, analysis, options)
        return streams, info | {"analysis_s": analysis["analysis_s"]}

    def decompress(self, variables, tables, streams, hw, options, rng):
        steps, lambda_s = int(options["steps"]), float(options["guidance"])
        if not 1 <= steps <= self.method.relay_start:
            raise CodingError(f"steps={steps} outside [1, {self.method.relay_start}]")
        if not np.isfinite(lambda_s):
            raise CodingError(f"guidance λ_s={lambda_s} is not finite")
        index, q = self._rate(tables, options)
        z_hw = (hw[0] // STRIDE, hw[1] // STRIDE)
        y_hat, info = self.latent.decode(tables, streams, z_hw, index)
        p, frozen = variables.params, variables.frozen
        t0 = time.perf_counter()
        z_c, hint = jax.block_until_ready(self._synthesise(p, jnp.asarray(y_hat)[None], q))
        t1 = time.perf_counter()
        z0 = jax.block_until_ready(
            self._denoise(
                p, frozen, z_c, hint, rng, lambda_s, steps=steps, mode=guidance_mode(lambda_s)
            )
        )
        t2 = time.perf_counter()
        image = np.asarray(self._vae_decode(frozen, z0))[0]
        t3 = time.perf_counter()
        return image, info | {"synthesis_s": t1 - t0, "denoise_s": t2 - t1, "vae_decode_s": t3 - t2}
