"""Latent compressor: a learned codec of a diffusion model's latent features, with a
vector-quantised hyper latent and an ELIC-style space–channel context (RDEIC's ``Compression``;
DiffCR's ``compressor_v3`` is the same network on other inputs and sizes).

    h (in_channels, H/8) ──g_a──▶ y (M, H/16) ──h_a──▶ z (N, H/64) ──VQ──▶ indices (fixed bits)
    z_q ──h_s──▶ hyper features (2M, H/16) ──context──▶ ŷ (checkerboard + channel groups)
    ŷ ──g_s──▶ hint (M, H/8) ──out──▶ z_c (out_channels, H/8)

RDEIC feeds the SD-VAE encoder's 512-channel feature (× 0.18215) and gets z_c (the compressed
SD latent the relay diffusion starts from) and the 256-channel hint for the control adapter;
DiffCR feeds the VAE's 8 moments and gets 8. Layer for layer the official modules (the importer
in :mod:`jaxcodec.weights.rdeic` maps their keys): g_a/h_a/h_s/g_s are ``ResidualBlock``s,
one ``…WithStride`` in g_a and two in h_a, ``…Upsample`` blocks in h_s and g_s. The codebook is
jaxcodec's online-clustered VQ (``vq_stats``, see :mod:`jaxcodec.entropy.vq`), not a parameter.

Host side (:class:`LatentCoding`): VQ indices at a fixed ⌈log2 K⌉ bits, then y coded with
integer tables; h_s and the context networks run as integer networks on the device (bit-exact
on every machine).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from jaxcodec.entropy import coder, fixedpoint
from jaxcodec.entropy import context as context_lib
from jaxcodec.entropy import vq as vq_lib
from jaxcodec.entropy.context import SpaceChannelContext, channel_groups
from jaxcodec.nn import layers
from jaxcodec.nn.transforms import ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride

Y_STRIDE = 2  # y relative to the input feature map
Z_STRIDE = 8  # z relative to the input feature map


@dataclasses.dataclass(frozen=True)
class LatentCompressorConfig:
    """Sizes of a latent compressor. Defaults: RDEIC (official ``Compression`` arguments)."""

    in_channels: int = 512  # RDEIC: SD-VAE encoder feature; DiffCR: the VAE's 8 moments
    out_channels: int = 4  # channels of z_c
    N: int = 256  # hyper latent z (= VQ code dimension)
    M: int = 256  # y, and the hint
    groups: tuple[int, ...] = (8, 8, 8, 8, 16, 16, 32, 32, 64, 64)  # y's channel groups
    num_codes: int = 16384  # VQ codebook (index bits: ceil(log2))
    context: str = "rdeic"  # context recipe (jaxcodec.entropy.context.RECIPES)
    # Residual blocks of g_a before / after its strided block (g_s mirrors them). The official
    # (4, 3); fewer only to make tiny test models compile faster.
    res_blocks: tuple[int, int] = (4, 3)
    vq_beta: float = 0.25
    vq_decay: float = 0.99

    def __post_init__(self):
        object.__setattr__(self, "groups", channel_groups(self.M, self.groups))
        object.__setattr__(self, "res_blocks", tuple(int(b) for b in self.res_blocks))
        if len(self.res_blocks) != 2 or min(self.res_blocks) < 1:
            raise ValueError(f"res_blocks must be two counts >= 1, got {self.res_blocks}")


class CompressorOutput(NamedTuple):
    z_c: jax.Array  # compressed latent [B, H/8, W/8, out_channels]
    hint: jax.Array  # control hint [B, H/8, W/8, M]
    y_likelihoods: jax.Array  # noisy (train) or rounded (eval) y's likelihoods
    vq_loss: jax.Array  # commitment loss of the hyper latent
    indices: jax.Array  # VQ indices [B, H/64, W/64]
    perplexity: jax.Array


class LatentCompressor(nn.Module):
    """Feature map h [B, h, w, in_channels] (h, w multiples of 8) → z_c, hint and rates."""

    config: LatentCompressorConfig = LatentCompressorConfig()

    def setup(self):
        c = self.config
        M, N = c.M, c.N
        before, after = c.res_blocks
        self.g_a = [
            *[ResidualBlock(M) for _ in range(before)],
            ResidualBlockWithStride(M),
            *[ResidualBlock(M) for _ in range(after)],
            layers.conv(M, 3),
        ]
        self.h_a = [
            ResidualBlock(N),
            ResidualBlock(N),
            ResidualBlockWithStride(N),
            ResidualBlockWithStride(N),
        ]
        self.h_s = [
            ResidualBlockUpsample(M),
            ResidualBlockUpsample(M),
            ResidualBlock(M * 3 // 2),
            ResidualBlock(M * 2),
        ]
        self.g_s = [
            layers.conv(M, 3),
            *[ResidualBlock(M) for _ in range(after)],
            ResidualBlockUpsample(M),
            *[ResidualBlock(M) for _ in range(before)],
        ]
        self.out = layers.conv(c.out_channels, 3)
        self.context = SpaceChannelContext(c.groups, c.context)
        self.vq = vq_lib.VectorQuantizer(
            num_codes=c.num_codes, dim=N, beta=c.vq_beta, decay=c.vq_decay
        )

    @staticmethod
    def _seq(blocks: Sequence[nn.Module], x: jax.Array) -> jax.Array:
        for block in blocks:
            x = block(x)
        return x

    def analyse(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder side: h → (y, z), unquantised."""
        y = self._seq(self.g_a, h)
        return y, self._seq(self.h_a, y)

    def hyper_indices(self, z: jax.Array) -> jax.Array:
        return self.vq(z, train=False).indices

    def hyper_synthesis(self, z_q: jax.Array) -> jax.Array:
        return self._seq(self.h_s, z_q)

    def synthesise(self, y_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ŷ → (z_c, hint)."""
        hint = self._seq(self.g_s, y_hat)
        return self.out(hint), hint

    def __call__(
        self, h: jax.Array, *, train: bool, key: jax.Array | None = None
    ) -> CompressorOutput:
        if train and key is None:
            raise ValueError("a training forward pass needs a PRNG key (quantisation noise)")
        y, z = self.analyse(h)
        vq = self.vq(z, train=train)
        hyper = self.hyper_synthesis(vq.z_q)
        y_hat, y_lik = self.context(y, hyper, train=train, key=key)
        z_c, hint = self.synthesise(y_hat)
        return CompressorOutput(z_c, hint, y_lik, vq.loss, vq.indices, vq.perplexity)


def index_bits(config: LatentCompressorConfig) -> int:
    return max(1, int(np.ceil(np.log2(config.num_codes))))


# ---------------------------------------------------------------------------------------------
# Host side: integer tables, fixed-point networks, range coding.
# ---------------------------------------------------------------------------------------------


def export_hyper_synthesis(h_s_params: dict) -> dict:
    """Fixed-point h_s (residual blocks), layer for layer."""
    out = {}
    for i in range(len(h_s_params)):
        p = h_s_params[f"h_s_{i}"]
        block = ResidualBlockUpsample if "subpel_conv" in p else ResidualBlock
        out[f"{i:03d}"] = block.fixed_point(p)
    return out


def entropy_tables(config: LatentCompressorConfig, params: dict, vq_stats: dict) -> dict[str, Any]:
    """Everything the coder needs, built once from the trained variables: the fixed-point
    codebook, y's Gaussian tables, fixed-point h_s and context networks."""
    from jaxcodec.nn.hyperprior import gaussian_entropy_tables

    params = jax.tree.map(np.asarray, nn.unbox(params))
    hs = {k: v for k, v in params.items() if k.startswith("h_s_")}
    return {
        "z": vq_lib.vq_tables(jax.tree.map(np.asarray, vq_stats["vq"])),
        "y": gaussian_entropy_tables(),
        "h_s": export_hyper_synthesis(hs),
        "context": context_lib.export(params["context"], config.groups, config.context),
    }


def _coding_seconds(tables) -> float:
    return coder.cached_coder(tables["y"]).seconds


class LatentCoding:
    """Range coding of a :class:`LatentCompressor`'s latents: two streams (VQ indices, y).

    The encoder decodes its own hyper latent (codebook entries on the fixed-point grid) and
    runs the same fixed-point h_s and context networks as the decoder.
    """

    num_streams = 2

    @staticmethod
    def _code_y(tables, indices, y=None, encoder=None, decoder=None):
        """h_s on the codebook entries and the context model on the device, range coding on
        the host → (ŷ_q, symbols, table indices)."""
        z_q = vq_lib.dequantize_indices(tables["z"], indices)
        m = int(sum(int(g) for g in tables["context"]["groups"]))
        out = context_lib.code_y(
            tables["h_s"],
            tables["context"],
            tables["y"],
            z_q,
            m=m,
            y=y,
            encoder=encoder,
            decoder=decoder,
        )
        return out.y_hat_q, out.symbols, out.indices

    def encode(
        self, tables, y: np.ndarray, indices: np.ndarray
    ) -> tuple[list[bytes], np.ndarray, dict]:
        """y [h, w, M] (float), indices [h/4, w/4] → (streams, ŷ float32, info)."""
        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        enc_z = coder.new_encoder()
        vq_lib.encode_indices(enc_z, tables["z"], indices)
        enc_y = coder.new_encoder()
        y_hat_q, y_sym, idx = self._code_y(tables, indices, y=y, encoder=enc_y)
        info = {
            "y_symbols": y_sym,
            "y_idx": idx,
            "z_indices": np.asarray(indices),
            "entropy_s": time.perf_counter() - t0,
            "coding_s": _coding_seconds(tables) - c0,
        }
        streams = [coder.finish(enc_z), coder.finish(enc_y)]
        return streams, fixedpoint.from_fixed(y_hat_q).astype(np.float32), info

    def decode(self, tables, streams: list[bytes], z_hw: tuple[int, int]):
        """Streams → (ŷ float32 [4·zh, 4·zw, M], info)."""
        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        indices = vq_lib.decode_indices(coder.new_decoder(streams[0]), tables["z"], z_hw)
        y_hat_q, y_sym, idx = self._code_y(tables, indices, decoder=coder.new_decoder(streams[1]))
        info = {
            "y_symbols": y_sym,
            "y_idx": idx,
            "z_indices": indices,
            "entropy_s": time.perf_counter() - t0,
            "coding_s": _coding_seconds(tables) - c0,
        }
        return fixedpoint.from_fixed(y_hat_q).astype(np.float32), info
