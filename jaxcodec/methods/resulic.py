"""ResULIC (Ke et al., "Semantic Residual Coding and Compression-aware Diffusion").

Composition of shared parts: the frozen SD VAE (its latent z_0 = mean × 0.18215 is what is
compressed; its decoder makes the image), the ELIC layout of the
:class:`~jaxcodec.nn.latent_compressor.LatentCompressor` (z_0 → y → factorized z → ŷ → z_c),
the frozen SD UNet driven by the CDDM control adapter (ControlNet-XS both ways, hint z_c:
:meth:`~jaxcodec.nn.control.ControlAdapterConfig.resulic`), the CLIP text tower for the
caption, and compression-aware diffusion from the start step N = ``add_steps`` of the rate
point: z_t = α_t z_0 + σ_t (ε + (z_c − z_0)/λ_N), the network predicts the pure ε, and
ẑ_0 = (z_t − σ_t (ε̂ + z_c/λ_N)) / (α_t − σ_t/λ_N) (`relay_x0_from_eps`).

Decoding starts from z_N = α_N z_c + σ_N ε, runs DDIM (η = 0) on the grid {N, N − N/S, …, 0}
for S steps (S divides N; at N itself ẑ_0 = z_c, so the chain starts one grid step lower with
the same ε) with classifier-free guidance between the caption (+ a positive suffix) and a
negative prompt, both through the controlled UNet, and ends at ᾱ_0 as the official sampler.

The semantic residual: each file carries a caption (from the configured source, or found by
the encoder's hard-prompt search, :mod:`jaxcodec.prompt_search`) as CLIP tokens range-coded in
its own stream (:mod:`jaxcodec.entropy.text_coder`); its bytes are part of the file, so of the
bpp. See configs/resulic.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxcodec.diffusion import (
    ddim_sample,
    guided_denoiser,
    relay_forward,
    relay_x0_from_eps,
    scaled_linear_schedule,
)
from jaxcodec.entropy import text_coder
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
    pad_to_multiple,
    psnr_from_mse,
    to_float,
    to_uint8,
)
from jaxcodec.methods.rdeic import fast_key, latent_scale, sd_configs, text_condition_shape
from jaxcodec.nn import latent_compressor as lc
from jaxcodec.nn.clip import TextConfig, TextTransformer, text_param_shapes
from jaxcodec.nn.control import ControlAdapterConfig, ControlledUNet
from jaxcodec.nn.text import CONTEXT_LENGTH, default_tokenizer
from jaxcodec.nn.unet import unet_param_shapes
from jaxcodec.nn.vae import AutoencoderKL, vae_param_shapes
from jaxcodec.weights import diffusers as dw

MAX_START = 999  # the last index of SD's 1000-step schedule


def text_tower_spec(sd_path: str) -> tuple[TextConfig | None, int]:
    """The text tower of an SD folder (its config from the checkpoint's headers, nothing
    loaded) and the block SD 2.x reads (-1 for a diffusers ``CLIPTextModel``, already cut below
    the last block; -2 for an open_clip tower); SD 2.1's shapes without a folder. None for a
    folder with only the empty prompt's embedding (a backbone trained by configs/ldm.py)."""
    from jaxcodec.weights import open_clip as oc

    if not sd_path:
        return TextConfig(layers=23, output_dim=None), -1
    folder = Path(sd_path) / "text_encoder"
    if not folder.is_dir():
        if any((Path(sd_path) / n).is_file() for n in dw.TEXT_CONDITION_NAMES):
            return None, -1
        raise FileNotFoundError(
            f"model.sd_path={sd_path} has no text_encoder/ (CLIP text tower) and no "
            f"{dw.TEXT_CONDITION_NAMES[0]} (the empty prompt's embedding)"
        )
    keys = oc.checkpoint_keys(folder)
    bare_hf = oc.detect_naming(dict.fromkeys(keys)) == "transformers"
    bare_hf = bare_hf and "text_projection.weight" not in keys
    return oc.read_config(folder, keys).text, (-1 if bare_hf else -2)


def check_captions_off(config) -> None:
    """A backbone without a text tower conditions on the empty prompt alone: refuse settings
    that would silently drop captions."""
    encode = config.get("encode", {})
    used = {
        "data.captions": config.data.get("captions", ""),
        "encode.captions": encode.get("captions", ""),
        "encode.prompt_search.enabled": encode.get("prompt_search", {}).get("enabled", False),
    }
    used = [k for k, v in used.items() if v]
    if used:
        raise ValueError(
            f"model.sd_path={config.model.sd_path} has no text_encoder/ (only the empty prompt's "
            f"embedding): {', '.join(used)} need a CLIP text tower; unset them "
            "(configs/resulic.py:tiny,backbone=DIR does)"
        )


def check_sampler(steps: int, start: int) -> None:
    """The DDIM grid must divide [0, start] into `steps` equal steps."""
    if not 2 <= steps <= start <= MAX_START or start % steps:
        raise ValueError(
            f"steps={steps} must be ≥ 2 and divide the start step {start} (≤ {MAX_START})"
        )


def _x0_denoiser(eps_fn, schedule, z_c, start, z, t):
    return relay_x0_from_eps(schedule, z, t, eps_fn(z, t), z_c, start + 1)


@register("resulic")
class ResULIC(Method):
    console_metrics = ("bpp", "eps_mse", "z_c_mse", "psnr", "lpips")

    def __init__(self, config):
        super().__init__(config)
        if self.stage not in (1, 2):
            raise ValueError(f"ResULIC has stages 1 and 2, not {self.stage}")
        m = config.model
        self.unet_config, self.vae_config = sd_configs(m)
        latent = self.vae_config.latent_channels
        self.compressor_config = lc.LatentCompressorConfig.elic(latent, **m.compressor.to_dict())
        self.adapter_config = ControlAdapterConfig.resulic(
            m.adapter.size_ratio, m.adapter.head_channels, hint_channels=latent
        )
        # No text tower (a backbone trained here): the empty prompt is the only condition.
        self.text_config, self.text_layer = text_tower_spec(m.sd_path)
        if self.text_config is None:
            check_captions_off(config)
        self.vae = AutoencoderKL(self.vae_config)
        self.controlled = ControlledUNet(self.unet_config, self.adapter_config)
        self.compressor = lc.LatentCompressor(self.compressor_config)
        self.text = None if self.text_config is None else TextTransformer(self.text_config)
        self.schedule = scaled_linear_schedule()
        self.start = int(m.add_steps)  # N: the forward process's start index
        check_sampler(int(config.decode.steps), self.start)
        self.scale = latent_scale(m, self.vae_config)
        self.latent_stride = 2 ** (len(self.vae_config.block_out_channels) - 1)
        self._coder = ResULICCoding(self)

    # --- Variables -----------------------------------------------------------------------

    def init(self, rng, batch: Batch):
        k_c, k_a = jax.random.split(fast_key(rng))
        side = self.compressor_config.z_stride
        z = jnp.zeros((1, side, side, self.vae_config.latent_channels))
        comp = self.compressor.init({"params": k_c}, z, train=False)["params"]
        ctx = jnp.zeros((1, 1, self.unet_config.cross_attention_dim))
        adapter = self.controlled.init(k_a, z, jnp.zeros((1,)), ctx, z)["params"]["adapter"]
        return {"params": {"compressor": comp, "adapter": adapter}}

    def pretrained(self) -> dict[str, Pretrained]:
        root = Path(self.config.model.sd_path)
        if not self.config.model.sd_path:
            raise FileNotFoundError(
                "ResULIC needs Stable Diffusion 2.1-base weights: set model.sd_path to a local "
                "diffusers folder (unet/, vae/, text_encoder/)"
            )
        kw = dict(dtype=self.unet_config.dtype, remat=self.unet_config.remat)

        def text():
            from jaxcodec.nn.text import encode_prompt, load_prompt_encoder

            if self.text is None:  # the backbone's stored text condition
                return np.asarray(encode_prompt("", root), np.float32)
            return jax.tree.map(np.asarray, nn.unbox(load_prompt_encoder(root).params))

        parts = {
            "unet": Pretrained(
                str(root / "unet"), lambda: nn.unbox(dw.load_unet(root / "unet", **kw)[1])
            ),
            "vae": Pretrained(str(root / "vae"), lambda: nn.unbox(dw.load_vae(root / "vae")[1])),
            "text": Pretrained(
                str(root / "text_encoder") if self.text is not None else f"{root} (empty prompt)",
                text,
            ),
        }
        if self.stage == 2:
            parts["lpips"] = lpips_loss_part()
        return parts

    def abstract_frozen(self) -> Any:
        """UNet, VAE and text tower with their logical axes (FSDP); LPIPS replicates."""
        out = {
            "unet": unet_param_shapes(self.unet_config),
            "vae": vae_param_shapes(self.vae_config),
            "text": text_param_shapes(self.text_config)
            if self.text is not None
            else jax.ShapeDtypeStruct(
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
        if previous.config.method != "resulic":
            raise ValueError(f"stage 2 starts from a ResULIC model, not {previous.config.method}")
        return StageStart(params=previous.params, state=previous.state)

    # --- Text ----------------------------------------------------------------------------

    def prompt_ids(self, tokens: Sequence[int] | None = None, *, negative: bool = False):
        """CLIP ids [77] of the decoder's text: the caption tokens + ", " + the positive suffix
        (the suffix alone without a caption), or the negative prompt."""
        tok, d = default_tokenizer(), self.config.decode
        if negative:
            return tok(d.negative_prompt)[0]
        suffix = tok.encode(f", {d.positive_prompt}" if tokens else d.positive_prompt)
        body = [*(tokens or []), *suffix][: text_coder.MAX_TOKENS]
        length = CONTEXT_LENGTH if self.text is None else self.text_config.context_length
        ids = np.zeros(length, np.int32)
        ids[: len(body) + 2] = [tok.sot_token_id, *body, tok.eot_token_id]
        return ids

    def caption_budget(self) -> int:
        """Caption tokens that fit the text context with ", " and the positive suffix."""
        d = self.config.decode
        return text_coder.MAX_TOKENS - len(default_tokenizer().encode(f", {d.positive_prompt}"))

    def encode_text(self, frozen, ids: jax.Array) -> jax.Array:
        """ids [B, 77] → the UNet's context [B, 77, width] (SD 2.x's hidden block); without a
        text tower, the empty prompt's embedding for every row."""
        if self.text is None:
            empty = frozen["text"]
            return jnp.broadcast_to(empty[:1], (ids.shape[0], *empty.shape[1:]))
        out = self.text.apply({"params": frozen["text"]}, ids, self.text_layer)
        return out.hidden.astype(jnp.float32)

    # --- Networks ------------------------------------------------------------------------

    def eps_theta(self, adapter, unet, z_c, context, z, t):
        """ε_θ(z_t, t, c, z_c): the frozen UNet with the CDDM adapter."""
        params = {"params": {"unet": unet, "adapter": adapter}}
        return self.controlled.apply(params, z, t, context, z_c).astype(jnp.float32)

    def _encode(self, frozen, x: jax.Array) -> jax.Array:
        """x in [-1, 1] → z_0 = the VAE posterior's mean × scale (the official ``mode()``)."""
        post = self.vae.apply({"params": frozen["vae"]}, x, method="encode")
        return post["mean"].astype(jnp.float32) * self.scale

    def _decode_latent(self, frozen, z0: jax.Array) -> jax.Array:
        decode = lambda z: self.vae.apply(
            {"params": frozen["vae"]}, z / self.scale, method="decode"
        )
        if self.config.model.get("remat", False):
            decode = jax.checkpoint(decode)
        return decode(z0).astype(jnp.float32)

    def sample(self, params, frozen, z_c, cond, uncond, key, *, steps: int, guidance, start: int):
        """z_c → ẑ_0 by compression-aware DDIM over {start, …, 0} (`steps` steps) with
        classifier-free guidance (``guidance`` 1: the caption alone, one UNet call a step)."""
        c = start // steps
        top = (steps - 1) * c  # the grid step below `start`, where ẑ_0 = z_c puts the chain
        z = self.schedule.q_sample(z_c, top, jax.random.normal(key, z_c.shape, jnp.float32))
        eps = Partial(self.eps_theta, params["adapter"], frozen["unet"], z_c, cond)
        if uncond is not None:
            eps_u = Partial(self.eps_theta, params["adapter"], frozen["unet"], z_c, uncond)
            eps = guided_denoiser(eps_u, eps, guidance)
        denoise = Partial(_x0_denoiser, eps, self.schedule, z_c, start)
        return ddim_sample(
            denoise,
            self.schedule,
            z,
            num_steps=steps - 1,
            spacing="leading",
            steps_offset=c,
            t_start=top + 1,
            prediction="x0",
            set_alpha_to_one=False,
        )

    # --- Training ------------------------------------------------------------------------

    def loss(self, params, frozen, state, batch: Batch, rng: jax.Array):
        x = to_float(batch["image"]) * 2.0 - 1.0
        k_y, k_drop, k_t = jax.random.split(fast_key(rng), 3)
        z0 = self._encode(frozen, x)
        comp = {"params": params["compressor"]}
        out = self.compressor.apply(comp, z0, train=True, key=k_y)
        aux = self.compressor.apply(comp, method="aux_loss")
        num_pixels = x.shape[0] * x.shape[1] * x.shape[2]
        bpp = (bits(out.y_likelihoods) + bits(out.z_likelihoods)) / num_pixels
        z_c_mse = jnp.mean(jnp.square(out.z_c - z0))
        # The caption (or the empty prompt: no captions, or dropped) conditions the UNet.
        b = x.shape[0]
        empty = jnp.asarray(default_tokenizer()([""]))
        ids = batch.get("caption_ids", jnp.broadcast_to(empty, (b, empty.shape[1])))
        drop = jax.random.bernoulli(k_drop, self.config.loss.caption_dropout, (b, 1))
        context = self.encode_text(frozen, jnp.where(drop, empty, ids))
        # Compression-aware forward process: t ~ U{0..N}, the network predicts the pure ε.
        k_t, k_eps = jax.random.split(k_t)
        t = jax.random.randint(k_t, (b,), 0, self.start + 1)
        eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
        z_t, _ = relay_forward(self.schedule, z0, out.z_c, t, eps, self.start + 1)
        eps_pred = self.eps_theta(params["adapter"], frozen["unet"], out.z_c, context, z_t, t)
        eps_mse = jnp.mean(jnp.square(eps_pred - eps))
        lw = self.config.loss
        loss = lw.l_eps * eps_mse + lw.l_bpp * bpp + lw.l_guide * z_c_mse + aux
        metrics = {"bpp": bpp, "eps_mse": eps_mse, "z_c_mse": z_c_mse, "aux_loss": aux}
        if self.stage == 2:
            from jaxcodec.metrics.lpips import lpips_distance

            z0_hat = relay_x0_from_eps(self.schedule, z_t, t, eps_pred, out.z_c, self.start + 1)
            x_hat = self._decode_latent(frozen, z0_hat)
            mse = jnp.mean(jnp.square(x_hat - x))  # on [-1, 1], as the official loss
            lp = jnp.mean(lpips_distance(frozen["lpips"], (x_hat + 1.0) / 2.0, (x + 1.0) / 2.0))
            loss = loss + mse + lw.lpips_weight * lp
            metrics |= {"mse": mse, "lpips": lp, "psnr": psnr_from_mse(mse / 4.0)}
        metrics["loss"] = loss
        return loss, metrics, state

    def evaluate(self, variables: Variables, images: jax.Array, valid_hw, rng: jax.Array):
        """Estimated bpp of the latents (no caption) and PSNR of a full decode with the
        configured steps and guidance (the positive suffix as the text)."""
        p, frozen = variables.params, variables.frozen
        z0 = self._encode(frozen, images * 2.0 - 1.0)
        out = self.compressor.apply({"params": p["compressor"]}, z0, train=False)
        d, b = self.config.decode, images.shape[0]
        cond = self.encode_text(frozen, jnp.asarray(self.prompt_ids()[None]))
        uncond = None
        if float(d.guidance) != 1.0:
            uncond = self.encode_text(frozen, jnp.asarray(self.prompt_ids(negative=True)[None]))
            uncond = jnp.broadcast_to(uncond, (b, *uncond.shape[1:]))
        cond = jnp.broadcast_to(cond, (b, *cond.shape[1:]))
        steps, guidance = int(d.steps), float(d.guidance)
        z0_hat = self.sample(
            p, frozen, out.z_c, cond, uncond, rng, steps=steps, guidance=guidance, start=self.start
        )
        h, w = valid_hw
        recon = to_uint8((self._decode_latent(frozen, z0_hat)[:, :h, :w] + 1.0) / 2.0)
        ref = to_uint8(images[:, :h, :w]).astype(jnp.float32)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - ref), axis=(1, 2, 3))
        rate = bits(out.y_likelihoods, axis=(1, 2, 3)) + bits(out.z_likelihoods, axis=(1, 2, 3))
        return {"bpp": rate / (h * w), "psnr": psnr_from_mse(mse, 255.0)}, recon

    # --- Coding --------------------------------------------------------------------------

    @property
    def coder(self) -> ResULICCoding:
        return self._coder

    def entropy_tables(self, variables: Variables):
        return lc.entropy_tables(self.compressor_config, variables.params["compressor"])


class ResULICCoding(BitstreamCoder):
    """Files of a ResULIC model: z (factorized tables), y (integer tables, fixed-point entropy
    parameters) and the caption (CLIP tokens, :mod:`jaxcodec.entropy.text_coder`; empty when
    there is none). The header carries the DDIM steps, the guidance scale, the start step and
    the noise seed.

    ``caption_source`` (from ``config.encode.captions``; settable) gives the caption of an image
    (it sees the padded image); ``prompt_search`` (from ``config.encode.prompt_search``) runs
    the encoder's hard-prompt search, started from that caption. Decoding: entropy decoding
    (host) → g_s → text tower → guided DDIM → VAE decoder, timed separately.
    """

    num_streams = 3

    def __init__(self, method: ResULIC):
        self.method = method
        self.stride = method.latent_stride * method.compressor_config.z_stride
        self.latent = lc.LatentCoding()
        encode = method.config.get("encode", {})
        self._caption_spec = (encode.get("captions", ""), encode.get("captions_root", ""))
        self._source, self._clip = None, None
        search = encode.get("prompt_search", {})
        self.prompt_search = dict(search) if search.get("enabled", False) else None
        comp = method.compressor

        def analyse(params, frozen, image):
            z0 = method._encode(frozen, image.astype(jnp.float32)[None] / 127.5 - 1.0)
            return comp.apply({"params": params["compressor"]}, z0, method="analyse")

        def synthesise(params, y_hat):
            return comp.apply({"params": params["compressor"]}, y_hat, method="synthesise")[0]

        def denoise(params, frozen, z_c, cond_ids, uncond_ids, key, guidance, steps, start):
            cond = method.encode_text(frozen, cond_ids)
            uncond = None if uncond_ids is None else method.encode_text(frozen, uncond_ids)
            return method.sample(
                params, frozen, z_c, cond, uncond, key, steps=steps, guidance=guidance, start=start
            )

        def vae_decode(frozen, z0):
            return to_uint8((method._decode_latent(frozen, z0) + 1.0) / 2.0)

        self._analyse = jax.jit(analyse)
        self._synthesise = jax.jit(synthesise)
        self._denoise = jax.jit(denoise, static_argnames=("steps", "start"))
        self._vae_decode = jax.jit(vae_decode)

    @property
    def caption_source(self):
        """The encoder's caption source (a callable image → caption or None), built lazily."""
        if self._source is None and self._caption_spec[0]:
            from jaxcodec.data.captions import caption_source

            spec, root = self._caption_spec
            self._source = caption_source(spec, lambda im: pad_to_multiple(im, self.stride), root)
        return self._source

    @caption_source.setter
    def caption_source(self, source) -> None:
        self._source, self._caption_spec = source, ("", "")

    def options(self) -> dict[str, Any]:
        d = self.method.config.decode
        return {
            "steps": int(d.steps),
            "guidance": float(d.guidance),
            "start_step": self.method.start,
            "seed": int(d.seed),
        }

    @staticmethod
    def _sampler_options(options: Mapping[str, Any]) -> tuple[int, float, int]:
        steps, guidance, start = (
            int(options["steps"]),
            float(options["guidance"]),
            int(options["start_step"]),
        )
        try:
            check_sampler(steps, start)
        except ValueError as exc:
            raise CodingError(str(exc)) from None
        if not np.isfinite(guidance):
            raise CodingError(f"guidance {guidance} is not finite")
        return steps, guidance, start

    def caption_tokens(self, variables, image: np.ndarray, y_hat, options) -> tuple[list, dict]:
        """The tokens this image's file carries: its caption's (truncated to what the text
        context holds), or what the prompt search finds from them; and the search's record."""
        caption = self.caption_source(image) if self.caption_source is not None else None
        budget = self.method.caption_budget()
        if caption is not None:  # literal <start_of_text>/<end_of_text> in a caption drop out
            tokens = [t for t in default_tokenizer().encode(caption) if t < text_coder.SOT]
            tokens = tokens[:budget]
        else:
            tokens = None
        if self.prompt_search is None:
            return tokens, {}
        from jaxcodec import prompt_search as ps

        if self._clip is None:
            path = self.prompt_search.get("clip_path") or Path(
                self.method.config.model.sd_path, "text_encoder"
            )
            self._clip = ps.load_clip(path)
        steps, guidance, start = self._sampler_options(options)
        z_c = self._synthesise(variables.params, jnp.asarray(y_hat)[None])
        out = ps.search(
            self.method,
            variables,
            image,
            z_c,
            tokens,
            ps.SearchConfig.from_config(self.prompt_search),
            self._clip,
            steps=steps,
            guidance=guidance,
            start=start,
        )
        return out["tokens"], {"prompt_lpips": out["lpips"], "prompt_start": tokens}

    def compress(self, variables, tables, image: np.ndarray, options: Mapping[str, Any]):
        steps, guidance, start = self._sampler_options(options)
        t0 = time.perf_counter()
        y, z = self._analyse(variables.params, variables.frozen, image)
        y, z = np.asarray(y)[0], np.asarray(z)[0]
        t1 = time.perf_counter()
        streams, y_hat, info = self.latent.encode(tables, y, z)
        t2 = time.perf_counter()
        tokens, search_info = self.caption_tokens(variables, image, y_hat, options)
        caption = text_coder.encode(tokens)
        info |= search_info | {
            "analysis_s": t1 - t0,
            "caption_s": time.perf_counter() - t2,
            "caption_tokens": tokens,
            "caption_bits": 8 * len(caption),
        }
        return [*streams, caption], info

    def decompress(self, variables, tables, streams, hw, options, rng):
        steps, guidance, start = self._sampler_options(options)
        z_hw = (hw[0] // self.stride, hw[1] // self.stride)
        y_hat, info = self.latent.decode(tables, streams[:2], z_hw)
        tokens = text_coder.decode(streams[2])
        p, frozen, m = variables.params, variables.frozen, self.method
        t0 = time.perf_counter()
        z_c = jax.block_until_ready(self._synthesise(p, jnp.asarray(y_hat)[None]))
        t1 = time.perf_counter()
        cond = jnp.asarray(m.prompt_ids(tokens)[None])
        uncond = None if guidance == 1.0 else jnp.asarray(m.prompt_ids(negative=True)[None])
        z0 = jax.block_until_ready(
            self._denoise(p, frozen, z_c, cond, uncond, rng, guidance, steps=steps, start=start)
        )
        t2 = time.perf_counter()
        image = np.asarray(self._vae_decode(frozen, z0))[0]
        t3 = time.perf_counter()
        timings = {"synthesis_s": t1 - t0, "denoise_s": t2 - t1, "vae_decode_s": t3 - t2}
        return image, info | timings | {"caption_tokens": tokens}
