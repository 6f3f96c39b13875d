"""Latent compressor: a learned codec of a diffusion model's latent features, with an
ELIC-style space–channel context (RDEIC's ``Compression``; DiffCR's ``compressor_v3`` is the
same network on other inputs and sizes; ResULIC's ``ELIC`` is the ``layout="elic"`` variant).

    h (in_channels, H/8) ──g_a──▶ y (M, H/16) ──h_a──▶ z (N, H/64) ──VQ──▶ indices (fixed bits)
    z_q ──h_s──▶ hyper features (2M, H/16) ──context──▶ ŷ (checkerboard + channel groups)
    ŷ ──g_s──▶ hint (M, H/8) ──out──▶ z_c (out_channels, H/8)

RDEIC feeds the SD-VAE encoder's 512-channel feature (× 0.18215) and gets z_c (the compressed
SD latent the relay diffusion starts from) and the 256-channel hint for the control adapter;
DiffCR feeds the VAE's 8 moments and gets 8. Layer for layer the official modules (the importer
in :mod:`jaxcodec.weights.rdeic` maps their keys): g_a/h_a/h_s/g_s are ``ResidualBlock``s,
one ``…WithStride`` in g_a and two in h_a, ``…Upsample`` blocks in h_s and g_s. The codebook is
jaxcodec's online-clustered VQ (``vq_stats``, see :mod:`jaxcodec.entropy.vq`), not a parameter.

``layout="elic"`` (ResULIC, He et al.'s ELIC as ``model/compressor.py`` of the official code
builds it) runs on the SD latent itself and has no separate hint (the hint *is* z_c)::

    z_0 (4, H/8) ──g_a──▶ y (M, H/32) ──h_a──▶ z (N, H/128) ──factorized prior──▶ ẑ
    ẑ ──h_s──▶ hyper features (2M, H/32) ──context──▶ ŷ ──g_s──▶ z_c (4, H/8)

g_a/g_s: strided / sub-pixel residual blocks, each followed by ``bottlenecks`` ELIC residual
bottlenecks (GELU), and a 3×3 conv; h_a: convs with GELU; h_s: torch-style transposed convs with
GELU (:class:`~jaxcodec.nn.transforms.ConvTranspose`, exported to integer networks exactly as
a sub-pixel conv). ``hyper="factorized"`` codes z with an
:class:`~jaxcodec.entropy.EntropyBottleneck` instead of the VQ codebook.

Host side (:class:`LatentCoding`): VQ indices at a fixed ⌈log2 K⌉ bits, or z with the
factorized prior's integer tables, then y coded with integer tables; h_s and the context
networks run as integer networks on the device (bit-exact on every machine).

``rate`` set: one compressor for every rate point, conditioned on q (:mod:`jaxcodec.nn.rate`:
gain units or an affine λ modulation of y and z; the hyper latent h_s sees goes through an
integer table per q). Without it the parameters and files are those of the fixed-rate model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import EntropyBottleneck, coder, fixedpoint
from jaxcodec.entropy import context as context_lib
from jaxcodec.entropy import vq as vq_lib
from jaxcodec.entropy.context import SpaceChannelContext, channel_groups
from jaxcodec.nn import layers
from jaxcodec.nn import rate as rate_lib
from jaxcodec.nn.rate import RateConditioning, RateConfig
from jaxcodec.nn.transforms import (
    ConvTranspose,
    ResidualBlock,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    ResidualBottleneck,
    gelu,
)

Y_STRIDE = 2  # RDEIC: y relative to the input feature map
Z_STRIDE = 8  # RDEIC: z relative to the input feature map
LAYOUTS = ("rdeic", "elic")
HYPERS = ("vq", "factorized")
# ELIC's h_s: (features as a multiple of M/2, kernel, stride) of its transposed convs.
_ELIC_H_S = ((2, 5, 2), (3, 5, 2), (4, 3, 1))


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
    # 'rdeic' (above) or 'elic' (ResULIC: y at 1/4, z at 1/16 of the input, no separate hint).
    layout: str = "rdeic"
    hyper: str = "vq"  # 'vq' (fixed-length indices) or 'factorized' (an entropy bottleneck)
    # 'elic': ELIC residual bottlenecks after each of g_a's / g_s's two resampling blocks (3),
    # and g_a's width (the official ``enc_mid[2]``; g_s runs at N).
    bottlenecks: int = 3
    enc_channels: int = 128
    # 'factorized': hidden widths of the entropy bottleneck's density (CompressAI's default).
    bottleneck_filters: tuple[int, ...] = (3, 3, 3, 3)
    rate: RateConfig | None = None  # set: rate-conditioned (one model for every rate)

    def __post_init__(self):
        object.__setattr__(self, "groups", channel_groups(self.M, self.groups))
        object.__setattr__(self, "res_blocks", tuple(int(b) for b in self.res_blocks))
        if len(self.res_blocks) != 2 or min(self.res_blocks) < 1:
            raise ValueError(f"res_blocks must be two counts >= 1, got {self.res_blocks}")
        if self.layout not in LAYOUTS or self.hyper not in HYPERS:
            raise ValueError(f"layout must be in {LAYOUTS} and hyper in {HYPERS}")
        if self.bottlenecks < 0:
            raise ValueError(f"bottlenecks must be >= 0, got {self.bottlenecks}")

    @classmethod
    def elic(cls, in_channels: int = 4, **sizes) -> LatentCompressorConfig:
        """ResULIC's ELIC (official ``ELIC(in_nc=4, out_nc=4, enc_mid=[64, 128, 128], N=128,
        M=192, slice_ch=[16, 16, 32, 32, 96])``): on the SD latent, factorized prior on z."""
        kw = dict(out_channels=in_channels, N=128, M=192, groups=(16, 16, 32, 32, 96))
        kw |= dict(enc_channels=128, bottlenecks=3, context="rdeic")
        return cls(in_channels=in_channels, layout="elic", hyper="factorized", **(kw | sizes))

    @property
    def y_stride(self) -> int:
        """y's downsampling of the input feature map."""
        return 4 if self.layout == "elic" else Y_STRIDE

    @property
    def z_stride(self) -> int:
        """z's downsampling of the input feature map (inputs are multiples of it)."""
        return 16 if self.layout == "elic" else Z_STRIDE


class CompressorOutput(NamedTuple):
    z_c: jax.Array  # compressed latent [B, H/8, W/8, out_channels]
    hint: jax.Array  # control hint [B, H/8, W/8, M]
    y_likelihoods: jax.Array  # noisy (train) or rounded (eval) y's likelihoods
    vq_loss: jax.Array  # commitment loss of the hyper latent
    indices: jax.Array | None  # VQ indices [B, H/64, W/64] (None with a factorized prior)
    perplexity: jax.Array | None
    z_likelihoods: jax.Array | None = None  # factorized prior: z's (noisy in training)


class LatentCompressor(nn.Module):
    """Feature map h [B, h, w, in_channels] (h, w multiples of 8) → z_c, hint and rates."""

    config: LatentCompressorConfig = LatentCompressorConfig()

    def setup(self):
        c = self.config
        if c.layout == "elic":
            self._setup_elic()
        else:
            self._setup_rdeic()
        self.context = SpaceChannelContext(c.groups, c.context)
        if c.hyper == "vq":
            self.vq = vq_lib.VectorQuantizer(
                num_codes=c.num_codes, dim=c.N, beta=c.vq_beta, decay=c.vq_decay
            )
        else:
            self.entropy_bottleneck = EntropyBottleneck(c.N, tuple(c.bottleneck_filters))
        if c.rate is not None:
            self.rate_conditioning = RateConditioning(c.rate, c.M, c.N)

    def modulate(self, x: jax.Array, q: jax.Array | None, site: str) -> jax.Array:
        """The rate conditioning at `site` (identity for a fixed-rate model; a VQ hyper latent
        has no forward_z: its indices cost the same bits at any scale)."""
        c = self.config
        if c.rate is None or (site == "forward_z" and c.hyper == "vq"):
            return x
        return self.rate_conditioning(x, q, site)

    def inverse_z_grid(self) -> tuple[jax.Array, jax.Array]:
        """inverse_z's (scale, shift) at every q a file can name (its integer table)."""
        return self.rate_conditioning.inverse_z_grid()

    def _setup_elic(self):
        """ELIC's transforms as the official Sequentials (``layers_i`` ↔ index i)."""
        c = self.config
        M, N, E = c.M, c.N, c.enc_channels
        rb = lambda f: [ResidualBottleneck(f) for _ in range(c.bottlenecks)]  # noqa: E731
        self.g_a = nn.Sequential(
            [
                ResidualBlockWithStride(E),
                *rb(E),
                ResidualBlockWithStride(E),
                *rb(E),
                layers.conv(M, 3),
            ]
        )
        self.h_a = nn.Sequential(
            [
                layers.conv(N, 3),
                gelu,
                layers.conv(N, 5, stride=2),
                gelu,
                layers.conv(N, 5, stride=2),
            ]
        )
        h_s = []
        for i, (mult, k, s) in enumerate(_ELIC_H_S):
            h_s += [ConvTranspose(M * mult // 2, k, s, k // 2, s - 1)] + ([gelu] if i < 2 else [])
        self.h_s = nn.Sequential(h_s)
        self.g_s = nn.Sequential(
            [
                ResidualBlockUpsample(N),
                *rb(N),
                ResidualBlockUpsample(N),
                *rb(N),
                layers.conv(c.out_channels, 3),
            ]
        )

    def _setup_rdeic(self):
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

    @staticmethod
    def _seq(blocks: Sequence[nn.Module] | nn.Sequential, x: jax.Array) -> jax.Array:
        if isinstance(blocks, nn.Sequential):
            return blocks(x)
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
        """ŷ → (z_c, hint); the ELIC layout's hint is z_c itself."""
        if self.config.layout == "elic":
            z_c = self._seq(self.g_s, y_hat)
            return z_c, z_c
        hint = self._seq(self.g_s, y_hat)
        return self.out(hint), hint

    def aux_loss(self) -> jax.Array:
        """The factorized prior's quantile loss (zero for a VQ hyper latent)."""
        if self.config.hyper == "vq":
            return jnp.zeros((), jnp.float32)
        return self.entropy_bottleneck.aux_loss()

    def __call__(
        self,
        h: jax.Array,
        *,
        train: bool,
        key: jax.Array | None = None,
        q: jax.Array | None = None,
    ) -> CompressorOutput:
        """`q` [B]: each example's rate control (rate-conditioned compressors only)."""
        if train and key is None:
            raise ValueError("a training forward pass needs a PRNG key (quantisation noise)")
        if (q is None) != (self.config.rate is None):
            raise ValueError("a rate-conditioned compressor takes q [B]; a fixed-rate one none")
        y, z = self.analyse(h)
        y = self.modulate(y, q, "forward_y")
        if self.config.hyper == "vq":
            vq = self.vq(z, train=train)
            hyper = self.hyper_synthesis(self.modulate(vq.z_q, q, "inverse_z"))
            y_hat, y_lik = self.context(y, hyper, train=train, key=key)
            z_c, hint = self.synthesise(self.modulate(y_hat, q, "inverse_y"))
            return CompressorOutput(z_c, hint, y_lik, vq.loss, vq.indices, vq.perplexity)
        k_z, k_y = jax.random.split(key) if train else (None, None)
        z = self.modulate(z, q, "forward_z")
        if train:  # rate on noisy z, synthesis on straight-through rounded z (CompressAI)
            _, z_lik = self.entropy_bottleneck(z, mode="noise", key=k_z)
            z_hat = self.entropy_bottleneck(z, mode="ste")[0]
        else:
            z_hat, z_lik = self.entropy_bottleneck(z, mode="round")
        hyper = self.hyper_synthesis(self.modulate(z_hat, q, "inverse_z"))
        y_hat, y_lik = self.context(y, hyper, train=train, key=k_y)
        z_c, hint = self.synthesise(self.modulate(y_hat, q, "inverse_y"))
        zero = jnp.zeros((), jnp.float32)
        return CompressorOutput(z_c, hint, y_lik, zero, None, None, z_lik)


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


def export_elic_hyper_synthesis(h_s_params: dict) -> dict:
    """Fixed-point ELIC h_s: each transposed conv as its sub-pixel conv (+ depth_to_space),
    GELU between them."""
    layers_ = []
    for i, (_, k, s) in enumerate(_ELIC_H_S):
        conv = ConvTranspose.fixed_point(h_s_params[f"layers_{2 * i}"], s, k // 2, s - 1)
        layers_ += [conv[key] for key in sorted(conv)]
        if i < len(_ELIC_H_S) - 1:
            layers_.append(fixedpoint.gelu_layer())
    return {f"{i:03d}": layer for i, layer in enumerate(layers_)}


def entropy_tables(
    config: LatentCompressorConfig, params: dict, vq_stats: dict | None = None
) -> dict[str, Any]:
    """Everything the coder needs, built once from the trained variables: the fixed-point
    codebook or z's factorized tables, y's Gaussian tables, fixed-point h_s and context
    networks."""
    from jaxcodec.nn.hyperprior import factorized_entropy_tables, gaussian_entropy_tables

    params = jax.tree.map(np.asarray, nn.unbox(params))
    if config.layout == "elic":
        h_s = export_elic_hyper_synthesis(params["h_s"])
    else:
        h_s = export_hyper_synthesis({k: v for k, v in params.items() if k.startswith("h_s_")})
    if config.hyper == "vq":
        z = vq_lib.vq_tables(jax.tree.map(np.asarray, vq_stats["vq"]))
    else:
        z = factorized_entropy_tables(params["entropy_bottleneck"])
    out = {
        "z": z,
        "y": gaussian_entropy_tables(),
        "h_s": h_s,
        "context": context_lib.export(params["context"], config.groups, config.context),
    }
    if config.rate is not None:
        grid = LatentCompressor(config).apply({"params": params}, method="inverse_z_grid")
        out["rate"] = rate_lib.z_inverse_tables(*grid)
    return out


def _coding_seconds(tables) -> float:
    z_seconds = coder.cached_coder(tables["z"]).seconds if _factorized(tables) else 0.0
    return z_seconds + coder.cached_coder(tables["y"]).seconds


def _factorized(tables) -> bool:
    return "medians_q" in tables["z"]


class LatentCoding:
    """Range coding of a :class:`LatentCompressor`'s latents: two streams (z: VQ indices or
    factorized symbols; y).

    The encoder decodes its own hyper latent (codebook entries, or ẑ, on the fixed-point grid)
    and runs the same fixed-point h_s and context networks as the decoder.
    """

    num_streams = 2

    @staticmethod
    def _code_y(tables, z_q, y=None, encoder=None, decoder=None, index=None):
        """h_s on the decoded hyper latent (fixed-point grid; a conditioned model's through
        its integer inverse_z at q's grid index) and the context model on the device, range
        coding on the host → (ŷ_q, symbols, table indices)."""
        m = int(sum(int(g) for g in tables["context"]["groups"]))
        if index is not None:
            rate_lib.check_tables(tables["rate"], tables["rate"]["z_scale"].shape[0], z_q.shape[-1])
            z_q = rate_lib.inverse_z(tables["rate"], z_q, index)
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
        self, tables, y: np.ndarray, z: np.ndarray, index: int | None = None
    ) -> tuple[list[bytes], np.ndarray, dict]:
        """y [h, w, M] (float) and the hyper latent — VQ indices [h/4, w/4], or z itself
        [h/4, w/4, N] (float) with a factorized prior → (streams, ŷ float32, info). A
        conditioned model's y and z come modulated at q (grid index `index`)."""
        from jaxcodec.nn.hyperprior import encode_factorized

        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        enc_z = coder.new_encoder()
        if _factorized(tables):
            z_q = encode_factorized(enc_z, tables["z"], z)
            z_info = {"z_symbols": (z_q - tables["z"]["medians_q"]) >> fixedpoint.ACT_BITS}
        else:
            vq_lib.encode_indices(enc_z, tables["z"], z)
            z_q = vq_lib.dequantize_indices(tables["z"], z)
            z_info = {"z_indices": np.asarray(z)}
        enc_y = coder.new_encoder()
        y_hat_q, y_sym, idx = self._code_y(tables, z_q, y=y, encoder=enc_y, index=index)
        info = {
            "y_symbols": y_sym,
            "y_idx": idx,
            **z_info,
            "entropy_s": time.perf_counter() - t0,
            "coding_s": _coding_seconds(tables) - c0,
        }
        streams = [coder.finish(enc_z), coder.finish(enc_y)]
        return streams, fixedpoint.from_fixed(y_hat_q).astype(np.float32), info

    def decode(self, tables, streams: list[bytes], z_hw: tuple[int, int], index=None):
        """Streams → (ŷ float32 [4·zh, 4·zw, M], info); a conditioned model's ŷ before its
        float inverse_y."""
        from jaxcodec.nn.hyperprior import decode_factorized

        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        dec_z = coder.new_decoder(streams[0])
        if _factorized(tables):
            n = tables["z"]["lengths"].shape[0]
            z_q = decode_factorized(dec_z, tables["z"], (*z_hw, n))
            z_info = {"z_symbols": (z_q - tables["z"]["medians_q"]) >> fixedpoint.ACT_BITS}
        else:
            indices = vq_lib.decode_indices(dec_z, tables["z"], z_hw)
            z_q = vq_lib.dequantize_indices(tables["z"], indices)
            z_info = {"z_indices": indices}
        y_hat_q, y_sym, idx = self._code_y(
            tables, z_q, decoder=coder.new_decoder(streams[1]), index=index
        )
        info = {
            "y_symbols": y_sym,
            "y_idx": idx,
            **z_info,
            "entropy_s": time.perf_counter() - t0,
            "coding_s": _coding_seconds(tables) - c0,
        }
        return fixedpoint.from_fixed(y_hat_q).astype(np.float32), info
