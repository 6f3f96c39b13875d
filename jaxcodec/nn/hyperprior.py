"""Mean–scale hyperprior compressor (Minnen et al. 2018): HFD's stage-1 autoencoder.

The hyper latent z is coded either with a factorized prior (`hyper="factorized"`) or as indices
of a vector-quantised codebook (`hyper="vq"`, RDEIC's choice: a fixed number of bits per index,
the codebook in the mutable collection `vq_stats`).

With `rate` set the model is rate-conditioned (`jaxcodec.nn.rate`): one model for every rate,
steered by q ∈ [0, 1]; files carry q's grid index in their header.
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import EntropyBottleneck, GaussianConditional, coder, fixedpoint
from jaxcodec.entropy import context as context_lib
from jaxcodec.entropy import tables as tables_lib
from jaxcodec.entropy import vq as vq_lib
from jaxcodec.entropy.context import SpaceChannelContext, channel_groups
from jaxcodec.methods.base import BitstreamCoder, ExactBatches, Variables, to_uint8
from jaxcodec.nn import rate as rate_lib
from jaxcodec.nn.rate import RateConditioning, RateConfig
from jaxcodec.nn.tiling import synthesise_tiled_batch
from jaxcodec.nn.transforms import (
    AnalysisTransform,
    HyperAnalysis,
    HyperSynthesis,
    SynthesisTransform,
)

STRIDE = 64  # total downsampling of the hyper latent: inputs are padded to a multiple of this
Y_STRIDE = 16  # downsampling of y
HYPER_KINDS = ("factorized", "vq")


class CodecOutput(NamedTuple):
    x_hat: jax.Array
    likelihoods: dict[str, jax.Array]
    vq_loss: jax.Array | float = 0.0  # commitment loss of a VQ hyper latent


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
    hyper: str = "factorized"  # or "vq"
    num_codes: int = 16384  # codebook size of a VQ hyper latent
    rate: RateConfig | None = None  # set: one model for every rate, conditioned on q

    def setup(self):
        if self.hyper not in HYPER_KINDS:
            raise ValueError(f"hyper={self.hyper!r}: use one of {HYPER_KINDS}")
        self.g_a = AnalysisTransform(self.N, self.M)
        self.g_s = SynthesisTransform(self.N)
        self.h_a = HyperAnalysis(self.N)
        self.h_s = HyperSynthesis(self.N, self.M)
        if self.hyper == "vq":
            self.vq = vq_lib.VectorQuantizer(num_codes=self.num_codes, dim=self.N)
        else:
            self.entropy_bottleneck = EntropyBottleneck(self.N)
        self.gaussian_conditional = GaussianConditional()
        if self.context_groups:
            self.context = SpaceChannelContext(channel_groups(self.M, self.context_groups))
        if self.rate is not None:
            self.rate_conditioning = RateConditioning(self.rate, self.M, self.N)

    def modulate(self, x: jax.Array, q: jax.Array | None, site: str) -> jax.Array:
        """The rate conditioning at `site` (identity for a fixed-rate model). A VQ hyper latent
        has no forward_z: its indices cost the same bits at any scale."""
        if self.rate is None or (site == "forward_z" and self.hyper == "vq"):
            return x
        return self.rate_conditioning(x, q, site)

    def _hyper(self, z: jax.Array, train: bool, key) -> tuple[jax.Array, jax.Array, jax.Array]:
        """z → (z_hat, likelihoods, VQ commitment loss)."""
        if self.hyper == "vq":
            out = self.vq(z, train=train)
            lik = jnp.full((*z.shape[:-1], 1), 2.0**-self.vq.index_bits, jnp.float32)
            return out.z_q, lik, out.loss
        if train:
            _, z_lik = self.entropy_bottleneck(z, mode="noise", key=key)
            return self.entropy_bottleneck(z, mode="ste")[0], z_lik, 0.0
        z_hat, z_lik = self.entropy_bottleneck(z, mode="round")
        return z_hat, z_lik, 0.0

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        key: jax.Array | None = None,
        q: jax.Array | None = None,
    ) -> CodecOutput:
        """`q` [B]: each example's rate control (rate-conditioned models only)."""
        if train and key is None:
            raise ValueError("training forward pass needs a PRNG key for quantisation noise")
        if (q is None) != (self.rate is None):
            raise ValueError("a rate-conditioned model takes q [B]; a fixed-rate one takes none")
        kz, ky = jax.random.split(key) if train else (None, None)
        y = self.g_a(x)
        z = self.h_a(y)
        y = self.modulate(y, q, "forward_y")
        z = self.modulate(z, q, "forward_z")
        z_hat, z_lik, vq_loss = self._hyper(z, train, kz)
        hyper = self.h_s(self.modulate(z_hat, q, "inverse_z"))
        if self.context_groups:
            y_hat, y_lik = self.context(y, hyper, train=train, key=ky)
        else:
            scales, means = jnp.split(hyper, 2, axis=-1)
            if train:
                _, y_lik = self.gaussian_conditional(y, scales, means, mode="noise", key=ky)
                y_hat = self.gaussian_conditional(y, scales, means, mode="ste")[0]
            else:
                y_hat, y_lik = self.gaussian_conditional(y, scales, means, mode="round")
        x_hat = self.g_s(self.modulate(y_hat, q, "inverse_y"))
        return CodecOutput(x_hat, {"y": y_lik, "z": z_lik}, vq_loss)

    def aux_loss(self) -> jax.Array:
        """The factorized prior's quantile loss (zero for a VQ hyper latent)."""
        if self.hyper == "vq":
            return jnp.zeros((), jnp.float32)
        return self.entropy_bottleneck.aux_loss()

    def analyse(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder side: x → (y, z), unquantised."""
        y = self.g_a(x)
        return y, self.h_a(y)

    def hyper_indices(self, z: jax.Array) -> jax.Array:
        """Encoder side of a VQ hyper latent: the nearest codes' indices."""
        return self.vq(z, train=False).indices

    def synthesise(self, y_hat: jax.Array) -> jax.Array:
        return self.g_s(y_hat)

    def inverse_z_grid(self) -> tuple[jax.Array, jax.Array]:
        """inverse_z's (scale, shift) at every q a file can name (its integer table)."""
        return self.rate_conditioning.inverse_z_grid()


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
    layers = sum(1 for k in bottleneck_params if k.startswith("matrix"))
    filters = tuple(int(bottleneck_params[f"matrix{i}"].shape[1]) for i in range(layers - 1))
    module = EntropyBottleneck(channels, filters)
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


def _coding_seconds(tables) -> float:
    z_seconds = coder.cached_coder(tables["z"]).seconds if "freqs" in tables["z"] else 0.0
    return z_seconds + coder.cached_coder(tables["y"]).seconds


class HyperpriorCoding(BitstreamCoder):
    """Compress / decompress of a trained MeanScaleHyperprior with its integer tables.

    Float transforms (g_a, h_a, g_s) run in JAX; everything that feeds the coder (z symbols or
    VQ indices, h_s, scale indices, means) is integer: h_s and the context model run as
    integer networks on the device (`jaxcodec.entropy.fixedpoint`), the host range-codes. The
    encoder decodes its own z (z_hat) and runs the same integer h_s as the decoder. g_s runs
    in tiles of `tile` latent pixels, so decoding memory follows the tile.

    A rate-conditioned model writes q's grid index into the header (option ``rate``): the float
    modulations run beside the transforms, the one the integer h_s sees (inverse_z) is an
    integer table lookup (`jaxcodec.nn.rate`). `analyse` + `encode_analysed` let a search over
    q (`jaxcodec.codec.MethodCodec.compress_to_size`) run the analysis transform once.
    """

    stride = STRIDE
    num_streams = 2

    def __init__(self, model: MeanScaleHyperprior, *, tile: int = 32, halo: int = 4):
        self.model = model
        self.tile, self.halo = tile, halo
        self.last_timings: dict[str, float] = {}
        self._analyse = jax.jit(lambda v, x: self.model.apply(v, x, method="analyse"))
        self._indices = jax.jit(lambda v, z: self.model.apply(v, z, method="hyper_indices"))
        self._synthesise = jax.jit(
            lambda v, y: to_uint8(self.model.apply(v, y, method="synthesise"))
        )
        self._batches = ExactBatches()
        self._modulate = jax.jit(
            lambda v, x, q, site: self.model.apply(v, x, q, site, method="modulate"),
            static_argnums=3,
        )

    @property
    def rate_config(self) -> RateConfig | None:
        return self.model.rate

    def options(self) -> dict[str, Any]:
        rate = self.model.rate
        return {} if rate is None else {"rate": rate.default_index}

    def entropy_tables(self, variables: Variables) -> dict:
        params = jax.tree.map(np.asarray, variables.params)
        if self.model.hyper == "vq":
            z_tables = vq_lib.vq_tables(jax.tree.map(np.asarray, variables.state["vq_stats"]["vq"]))
        else:
            z_tables = factorized_entropy_tables(params["entropy_bottleneck"])
        out = {
            "z": z_tables,
            "y": gaussian_entropy_tables(),
            "h_s": fixedpoint.export_sequential(params["h_s"], H_S_SPEC),
        }
        if self.model.context_groups:
            groups = channel_groups(self.model.M, self.model.context_groups)
            out["context"] = context_lib.export(params["context"], groups)
        if self.model.rate is not None:
            grid = self.model.apply(variables.collections(), method="inverse_z_grid")
            out["rate"] = rate_lib.z_inverse_tables(*grid)
        return out

    def rate_index(self, tables, options: Mapping[str, Any]) -> int | None:
        """The file's q index (checked against the model's grid and tables), or None."""
        rate = self.model.rate
        if rate is None:
            return None
        rate_lib.check_tables(tables["rate"], rate.levels, self.model.N)
        return rate.check_index(options["rate"])

    def modulate(self, variables: Variables, x, index: int | None, site: str):
        """A float modulation of one latent [h, w, C] at the q of grid index `index`."""
        if index is None:
            return x
        q = jnp.full((1,), self.model.rate.q(index), jnp.float32)
        return self._modulate(variables.collections(), jnp.asarray(x)[None], q, site)[0]

    def _code_y(self, tables, z_hat_q, y=None, encoder=None, decoder=None, index=None):
        """h_s on z_hat (after the integer inverse_z of a conditioned model) and the entropy
        parameters of y on the device (integer programs), then y range-coded on the host in
        coding order → (y_hat_q, symbols, table indices)."""
        if index is not None:
            z_hat_q = rate_lib.inverse_z(tables["rate"], z_hat_q, index)
        out = context_lib.code_y(
            tables["h_s"],
            tables.get("context"),
            tables["y"],
            z_hat_q,
            m=self.model.M,
            y=y,
            encoder=encoder,
            decoder=decoder,
        )
        return out.y_hat_q, out.symbols, out.indices

    def analyse_batch(self, variables: Variables, images: np.ndarray) -> list[dict[str, Any]]:
        """The float analysis of images of one size (uint8 [N, H, W, 3]) in one call,
        independent of q: per image y, z and, for a VQ hyper latent, its indices."""
        v = variables.collections()
        x = jnp.asarray(images, jnp.float32) / 255.0
        t0 = time.perf_counter()
        y, z = self._batches("analyse", lambda x: self._analyse(v, x), x)
        z_idx = None
        if self.model.hyper == "vq":
            z_idx = np.asarray(self._batches("indices", lambda z: self._indices(v, z), z))
        y, z = np.asarray(y), np.asarray(z)
        seconds = (time.perf_counter() - t0) / len(y)
        out = [{"y": y[i], "z": z[i], "analysis_s": seconds} for i in range(len(y))]
        for i, a in enumerate(out if z_idx is not None else []):
            a["z_indices"] = z_idx[i]
        return out

    def analyse(self, variables: Variables, image: np.ndarray) -> dict[str, Any]:
        """The float analysis of one image (uint8 [H, W, 3]): `analyse_batch` of one."""
        return self.analyse_batch(variables, image[None])[0]

    def encode_analysed(
        self, variables: Variables, tables, analysis: dict, options: Mapping[str, Any]
    ) -> tuple[list[bytes], dict]:
        """Quantisation and entropy coding of an `analyse` result at the options' q."""
        index = self.rate_index(tables, options)
        y = np.asarray(self.modulate(variables, analysis["y"], index, "forward_y"))
        enc_z = coder.new_encoder()
        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        if self.model.hyper == "vq":
            z_sym = analysis["z_indices"]
            vq_lib.encode_indices(enc_z, tables["z"], z_sym)
            z_hat_q = vq_lib.dequantize_indices(tables["z"], z_sym)
        else:
            z = np.asarray(self.modulate(variables, analysis["z"], index, "forward_z"))
            z_hat_q = encode_factorized(enc_z, tables["z"], z)
            z_sym = (z_hat_q - tables["z"]["medians_q"]) >> fixedpoint.ACT_BITS
        enc_y = coder.new_encoder()
        _, y_sym, idx = self._code_y(tables, z_hat_q, y=y, encoder=enc_y, index=index)
        streams = [coder.finish(enc_z), coder.finish(enc_y)]
        info = {
            "y_symbols": y_sym,
            "y_idx": idx,
            "z_symbols": z_sym,
            "entropy_s": time.perf_counter() - t0,  # range coding + integer entropy-parameter nets
            "coding_s": _coding_seconds(tables) - c0,  # range coding only
        }
        return streams, info

    def compress(
        self, variables: Variables, tables, image: np.ndarray, options: Mapping[str, Any]
    ) -> tuple[list[bytes], dict]:
        """image: uint8 [H, W, 3], H and W multiples of `stride` → ([z stream, y stream], info)."""
        return self.compress_batch(variables, tables, image[None], options)[0]

    def compress_batch(
        self, variables: Variables, tables, images: np.ndarray, options: Mapping[str, Any]
    ) -> list[tuple[list[bytes], dict]]:
        """images: uint8 [N, H, W, 3] → one (streams, info) per image: the float analysis of
        all of them in one call, then each image quantised at q and range-coded on its own."""
        out = []
        for analysis in self.analyse_batch(variables, images):
            streams, info = self.encode_analysed(variables, tables, analysis, options)
            out.append((streams, info | {"analysis_s": analysis["analysis_s"]}))
        return out

    def decode_latents(self, tables, streams: list[bytes], hw: tuple[int, int], index=None):
        """Host side of decoding: streams → (y_hat float32 [h, w, M], y symbols, table indices).
        A conditioned model's y_hat is in the coded domain: `synthesise` takes its q index."""
        h, w = hw
        z_shape = (h // STRIDE, w // STRIDE)
        t0, c0 = time.perf_counter(), _coding_seconds(tables)
        dec_z = coder.new_decoder(streams[0])
        if self.model.hyper == "vq":
            z_hat_q = vq_lib.dequantize_indices(
                tables["z"], vq_lib.decode_indices(dec_z, tables["z"], z_shape)
            )
        else:
            n = tables["z"]["lengths"].shape[0]
            z_hat_q = decode_factorized(dec_z, tables["z"], (*z_shape, n))
        y_hat_q, y_sym, idx = self._code_y(
            tables, z_hat_q, decoder=coder.new_decoder(streams[1]), index=index
        )
        self.last_timings = {
            "entropy_s": time.perf_counter() - t0,
            "coding_s": _coding_seconds(tables) - c0,
        }
        return fixedpoint.from_fixed(y_hat_q).astype(np.float32), y_sym, idx

    def synthesise(self, variables: Variables, y_hat: np.ndarray, index=None) -> np.ndarray:
        """y_hat [h, w, M] → uint8 image [H, W, 3], in tiles (after inverse_y at q's index)."""
        return self.synthesise_batch(variables, y_hat[None], index)[0]

    def synthesise_batch(self, variables: Variables, y_hat: np.ndarray, index=None) -> np.ndarray:
        """y_hat [N, h, w, M] → uint8 images [N, H, W, 3]: each tile of all N in one call."""
        v = variables.collections()
        if index is not None:
            y_hat = np.stack([self.modulate(variables, y, index, "inverse_y") for y in y_hat])
        return synthesise_tiled_batch(
            lambda y: self._batches("synthesise", lambda t: self._synthesise(v, t), jnp.asarray(y)),
            y_hat,
            scale=Y_STRIDE,
            tile=self.tile,
            halo=self.halo,
        )

    def decompress(self, variables, tables, streams, hw, options, rng=None):
        """→ (uint8 [H, W, 3], info with the decoded y symbols)."""
        index = self.rate_index(tables, options)
        y_hat, y_sym, idx = self.decode_latents(tables, streams, hw, index)
        t0 = time.perf_counter()
        image = self.synthesise(variables, y_hat, index)
        info = {"y_symbols": y_sym, "y_idx": idx, "synthesis_s": time.perf_counter() - t0}
        return image, info | self.last_timings

    def decompress_batch(self, variables, tables, streams_list, hw, options, rng=None):
        """Several files of the same padded size: latents on the host, then each tile of the
        synthesis for all of them in one call."""
        index = self.rate_index(tables, options)
        y_hat = np.stack([self.decode_latents(tables, s, hw, index)[0] for s in streams_list])
        return self.synthesise_batch(variables, y_hat, index)
