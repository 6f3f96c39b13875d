"""Mean–scale hyperprior compressor (Minnen et al. 2018): HFD's stage-1 autoencoder."""

import time
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import EntropyBottleneck, GaussianConditional, coder, fixedpoint
from jaxcodec.entropy import context as context_lib
from jaxcodec.entropy import tables as tables_lib
from jaxcodec.entropy.context import SpaceChannelContext, channel_groups
from jaxcodec.nn.transforms import (
    AnalysisTransform,
    HyperAnalysis,
    HyperSynthesis,
    SynthesisTransform,
)

STRIDE = 64  # total downsampling of the hyper latent: inputs are padded to a multiple of this


class CodecOutput(NamedTuple):
    x_hat: jax.Array
    likelihoods: dict[str, jax.Array]


class MeanScaleHyperprior(nn.Module):
    """x in [0, 1] (NHWC) → reconstruction and the likelihoods of y and z.

    In training, rates are measured on noisy latents (the density of uniform noise matches the
    rounding error) while the synthesis sees straight-through rounded latents, so the decoder
    learns from the values it will get at test time.
    """

    N: int = 128
    M: int = 192
    # Non-empty: y is coded with the ELIC-style space–channel context over these channel
    # groups (h_s output becomes the context's hyper features); empty: plain mean–scale.
    context_groups: Sequence[int] = ()

    def setup(self):
        self.g_a = AnalysisTransform(self.N, self.M)
        self.g_s = SynthesisTransform(self.N)
        self.h_a = HyperAnalysis(self.N)
        self.h_s = HyperSynthesis(self.N, self.M)
        self.entropy_bottleneck = EntropyBottleneck(self.N)
        self.gaussian_conditional = GaussianConditional()
        if self.context_groups:
            self.context = SpaceChannelContext(channel_groups(self.M, self.context_groups))

    def __call__(self, x: jax.Array, *, train: bool, key: jax.Array | None = None) -> CodecOutput:
        y = self.g_a(x)
        z = self.h_a(y)
        if train:
            if key is None:
                raise ValueError("training forward pass needs a PRNG key for quantisation noise")
            kz, ky = jax.random.split(key)
            _, z_lik = self.entropy_bottleneck(z, mode="noise", key=kz)
            z_hat = self.entropy_bottleneck(z, mode="ste")[0]
        else:
            z_hat, z_lik = self.entropy_bottleneck(z, mode="round")
        hyper = self.h_s(z_hat)
        if self.context_groups:
            y_hat, y_lik = self.context(y, hyper, train=train, key=ky if train else None)
            return CodecOutput(self.g_s(y_hat), {"y": y_lik, "z": z_lik})
        scales, means = jnp.split(hyper, 2, axis=-1)
        if train:
            _, y_lik = self.gaussian_conditional(y, scales, means, mode="noise", key=ky)
            y_hat = self.gaussian_conditional(y, scales, means, mode="ste")[0]
        else:
            y_hat, y_lik = self.gaussian_conditional(y, scales, means, mode="round")
        x_hat = self.g_s(y_hat)
        return CodecOutput(x_hat, {"y": y_lik, "z": z_lik})

    def aux_loss(self) -> jax.Array:
        return self.entropy_bottleneck.aux_loss()

    def analyse(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder side: x → (y, z), unquantised."""
        y = self.g_a(x)
        return y, self.h_a(y)

    def synthesise(self, y_hat: jax.Array) -> jax.Array:
        return self.g_s(y_hat)


# ---------------------------------------------------------------------------------------------
# Coding (host side): integer tables built once from trained parameters, then range coding.
# ---------------------------------------------------------------------------------------------

# h_s layer by layer, following HyperSynthesis's submodule names (SubpixelConv upsampling).
H_S_SPEC = [
    ("conv", "SubpixelConv_0/Conv_0", 1),
    ("depth_to_space", 2),
    ("leaky_relu",),
    ("conv", "SubpixelConv_1/Conv_0", 1),
    ("depth_to_space", 2),
    ("leaky_relu",),
    ("conv", "Conv_0", 1),
]


def factorized_entropy_tables(bottleneck_params: dict) -> dict:
    """Integer tables of an EntropyBottleneck (one per channel) plus its fixed-point medians."""

    quantiles = np.asarray(bottleneck_params["quantiles"], np.float64)[:, 0, :]
    channels = quantiles.shape[0]
    module = EntropyBottleneck(channels)
    medians_q = fixedpoint.to_fixed(quantiles[:, 1])
    medians = fixedpoint.from_fixed(medians_q)

    def logits(v):
        return np.asarray(
            module.apply(
                {"params": bottleneck_params},
                jnp.asarray(v[:, None, :], jnp.float32),
                True,
                method=EntropyBottleneck._logits_cumulative,
            ),
            np.float64,
        )[:, 0, :]

    def pmf_fn(ks):
        centre = medians[:, None] + ks
        lower, upper = logits(centre - 0.5), logits(centre + 0.5)
        sig = lambda a: 1.0 / (1.0 + np.exp(-a))
        sign = -np.sign(lower + upper)
        pmf = np.abs(sig(sign * upper) - sig(sign * lower))
        return pmf, np.zeros(channels)

    out = tables_lib.factorized_tables(pmf_fn, medians, quantiles)
    # Tail mass beyond each channel's range: below the first and above the last symbol.
    lo = -out["offsets"].astype(np.float64)
    hi = out["lengths"] - 1 - lo
    first = logits((medians - lo - 0.5)[:, None])[:, 0]
    last = logits((medians + hi + 0.5)[:, None])[:, 0]
    tail = 1.0 / (1.0 + np.exp(-first)) + 1.0 / (1.0 + np.exp(last))
    pmfs, _ = pmf_fn(np.arange(out["freqs"].shape[1] - 1)[None, :] - lo[:, None])
    for c in range(channels):
        n = int(out["lengths"][c])
        out["freqs"][c, : n + 1] = tables_lib.pmf_to_freqs(pmfs[c, :n], tail[c])
    out["medians_q"] = medians_q
    return out


def gaussian_entropy_tables() -> dict:
    """Scale tables of y plus the integer thresholds that select them from fixed-point scales."""

    out = tables_lib.gaussian_tables()
    out["thresholds"] = tables_lib.scale_thresholds(out["scales"], fixedpoint.ACT_BITS)
    return out


def encode_factorized(encoder, z_tables: dict, z) -> np.ndarray:
    """Codes z [h, w, C] around the fixed-point medians; returns z_hat on the fixed-point grid."""
    med = fixedpoint.from_fixed(z_tables["medians_q"])
    sym = np.round(np.asarray(z, np.float64) - med).astype(np.int64)
    idx = np.broadcast_to(np.arange(sym.shape[-1]), sym.shape)
    coder.cached_coder(z_tables).encode(encoder, sym, idx)
    return sym * (1 << fixedpoint.ACT_BITS) + z_tables["medians_q"]


def decode_factorized(decoder, z_tables: dict, shape) -> np.ndarray:

    idx = np.broadcast_to(np.arange(shape[-1]), shape)
    sym = coder.cached_coder(z_tables).decode(decoder, idx).reshape(shape)
    return sym * (1 << fixedpoint.ACT_BITS) + z_tables["medians_q"]


def gaussian_symbols(y, means_q) -> np.ndarray:
    """Integer symbols round(y − μ) with μ the decoder-side fixed-point mean."""

    return np.round(np.asarray(y, np.float64) - fixedpoint.from_fixed(means_q)).astype(np.int64)


def dequantize(sym, means_q) -> np.ndarray:
    """y_hat = symbol + μ on the fixed-point grid (int64)."""

    return sym * (1 << fixedpoint.ACT_BITS) + means_q


def _coding_seconds(tables) -> float:
    return coder.cached_coder(tables["z"]).seconds + coder.cached_coder(tables["y"]).seconds


class HyperpriorCoding:
    """Compress / decompress of a trained MeanScaleHyperprior with its integer tables.

    Float transforms (g_a, h_a, g_s) run in JAX; everything that feeds the coder (z symbols,
    h_s, scale indices, means) is integer or fixed point on the host. The encoder decodes its own
    z (z_hat) and runs the same fixed-point h_s as the decoder.
    """

    stride = STRIDE

    def __init__(self, model: "MeanScaleHyperprior"):
        self.model = model
        self.last_timings: dict[str, float] = {}
        self._analyse = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="analyse"))
        self._synthesise = jax.jit(
            lambda p, y: self.model.apply({"params": p}, y, method="synthesise")
        )

    def entropy_tables(self, params) -> dict:
        params = jax.tree.map(np.asarray, params)
        out = {
            "z": factorized_entropy_tables(params["entropy_bottleneck"]),
            "y": gaussian_entropy_tables(),
            "h_s": fixedpoint.export_sequential(params["h_s"], H_S_SPEC),
        }
        if self.model.context_groups:
            groups = channel_groups(self.model.M, self.model.context_groups)
            out["context"] = context_lib.export(params["context"], groups)
        return out

    def _code_y(self, tables, z_hat_q, y=None, encoder=None, decoder=None):
        """Entropy parameters from the fixed-point h_s on z_hat, then y in coding order."""
        hyper_q = fixedpoint.run(tables["h_s"], z_hat_q)
        if "context" in tables:
            return context_lib.code(tables["context"], tables["y"], hyper_q, y, encoder, decoder)
        m = hyper_q.shape[-1] // 2
        scales_q, means_q = hyper_q[..., :m], hyper_q[..., m:]
        idx = tables_lib.scale_index(scales_q, tables["y"]["thresholds"])
        table_coder = coder.cached_coder(tables["y"])
        if encoder is not None:
            sym = gaussian_symbols(y, means_q)
            table_coder.encode(encoder, sym, idx)
        else:
            sym = table_coder.decode(decoder, idx).reshape(idx.shape)
        return dequantize(sym, means_q), sym, idx

    def compress(self, params, tables, image) -> tuple[list[bytes], dict]:
        """image: uint8 [H, W, 3], H and W multiples of `stride` → ([z stream, y stream], info)."""
        x = jnp.asarray(image, jnp.float32)[None] / 255.0
        y, z = jax.device_get(self._analyse(params, x))
        enc_z = coder.new_encoder()
        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        z_hat_q = encode_factorized(enc_z, tables["z"], z[0])
        enc_y = coder.new_encoder()
        _, y_sym, idx = self._code_y(tables, z_hat_q, y=y[0], encoder=enc_y)
        streams = [coder.finish(enc_z), coder.finish(enc_y)]
        z_sym = (z_hat_q - tables["z"]["medians_q"]) >> fixedpoint.ACT_BITS
        info = {
            "y_symbols": y_sym,
            "y_idx": idx,
            "z_symbols": z_sym,
            "entropy_s": time.perf_counter() - t0,  # host side: coding + fixed-point nets
            "coding_s": _coding_seconds(tables) - c0,  # range coding only
        }
        return streams, info

    def decode_latents(self, tables, streams: list[bytes], hw: tuple[int, int]):
        """Host side of decoding: streams → (y_hat float32 [h, w, M], y symbols, table indices)."""
        h, w = hw
        n = tables["z"]["lengths"].shape[0]
        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        z_hat_q = decode_factorized(
            coder.new_decoder(streams[0]), tables["z"], (h // STRIDE, w // STRIDE, n)
        )
        y_hat_q, y_sym, idx = self._code_y(tables, z_hat_q, decoder=coder.new_decoder(streams[1]))
        self.last_timings = {
            "entropy_s": time.perf_counter() - t0,
            "coding_s": _coding_seconds(tables) - c0,
        }
        return fixedpoint.from_fixed(y_hat_q).astype(np.float32), y_sym, idx

    def synthesise(self, params, y_hat: np.ndarray) -> np.ndarray:
        """y_hat [B, h, w, M] → uint8 images [B, H, W, 3] (batched on the device)."""
        x_hat = self._synthesise(params, jnp.asarray(y_hat))
        return np.asarray(jnp.clip(jnp.round(x_hat * 255.0), 0, 255).astype(jnp.uint8))

    def decompress(self, params, tables, streams: list[bytes], hw: tuple[int, int]):
        """→ (uint8 [H, W, 3], info with the decoded y symbols)."""
        y_hat, y_sym, idx = self.decode_latents(tables, streams, hw)
        t0 = time.perf_counter()
        image = self.synthesise(params, y_hat[None])[0]
        info = {"y_symbols": y_sym, "y_idx": idx, "synthesis_s": time.perf_counter() - t0}
        return image, info | self.last_timings
