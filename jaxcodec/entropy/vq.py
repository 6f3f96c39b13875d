"""Vector-quantised hyper latent (RDEIC: 16384 codes, indices at a fixed 14 bits; DiffCR: 32).

The codebook is not a parameter: it follows the encoder outputs by exponential moving averages
of code counts and sums (van den Oord et al. 2017, appendix; "online clustering"), kept in the
flax collection `vq_stats`. Codes whose average count falls below `dead_threshold` are restarted
on random encoder outputs of the batch, so the codebook does not collapse. The loss returned is
the commitment term β·‖z − sg(e)‖².

Training loops must carry the collection: `apply({'params': p, 'vq_stats': s}, ...,
mutable=['vq_stats'], rngs={'vq_restart': key})` and keep the returned `vq_stats` in the
train state (and its EMA copy, if any, unchanged: the statistics are already averages).
Without `mutable` (evaluation, coding) the codebook is read-only.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import coder, fixedpoint
from jaxcodec.entropy import tables as tables_lib

COLLECTION = "vq_stats"


class VQOutput(NamedTuple):
    z_q: jax.Array  # straight-through quantised latent, same shape as z
    indices: jax.Array  # int32, z.shape[:-1]
    loss: jax.Array  # commitment loss
    perplexity: jax.Array  # exp(entropy of code usage in the batch)


class VectorQuantizer(nn.Module):
    num_codes: int = 16384
    dim: int = 64
    beta: float = 0.25
    decay: float = 0.99
    eps: float = 1e-5
    dead_threshold: float = 1e-3

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_codes)))

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool) -> VQOutput:
        k, d = self.num_codes, self.dim
        if z.shape[-1] != d:
            raise ValueError(f"VQ of dim {d} got latents with {z.shape[-1]} channels")

        def init_codebook():
            key = self.make_rng("params") if self.has_rng("params") else jax.random.key(0)
            return jax.random.normal(key, (k, d), jnp.float32) / math.sqrt(d)

        codebook = self.variable(COLLECTION, "codebook", init_codebook)
        ema_count = self.variable(COLLECTION, "ema_count", lambda: jnp.ones((k,), jnp.float32))
        ema_sum = self.variable(COLLECTION, "ema_sum", lambda: codebook.value)

        flat = z.reshape(-1, d).astype(jnp.float32)
        e = codebook.value
        dist = jnp.sum(flat**2, -1, keepdims=True) - 2.0 * flat @ e.T + jnp.sum(e**2, -1)[None, :]
        idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        e_q = e[idx]
        loss = self.beta * jnp.mean(jnp.square(flat - jax.lax.stop_gradient(e_q)))
        z_q = flat + jax.lax.stop_gradient(e_q - flat)
        counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)
        p = counts / flat.shape[0]
        perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))

        if train and self.is_mutable_collection(COLLECTION) and not self.is_initializing():
            sums = jnp.zeros((k, d), jnp.float32).at[idx].add(jax.lax.stop_gradient(flat))
            count = self.decay * ema_count.value + (1.0 - self.decay) * counts
            total = self.decay * ema_sum.value + (1.0 - self.decay) * sums
            n = jnp.sum(count)
            smoothed = (count + self.eps) / (n + k * self.eps) * n  # Laplace smoothing
            new_codebook = total / smoothed[:, None]
            # Dead-code restart: unused codes jump onto random encoder outputs.
            dead = count < self.dead_threshold
            pick = jax.random.randint(self.make_rng("vq_restart"), (k,), 0, flat.shape[0])
            fresh = jax.lax.stop_gradient(flat[pick])
            codebook.value = jnp.where(dead[:, None], fresh, new_codebook)
            ema_sum.value = jnp.where(dead[:, None], fresh, total)
            ema_count.value = jnp.where(dead, 1.0, count)
        return VQOutput(
            z_q.reshape(z.shape).astype(z.dtype), idx.reshape(z.shape[:-1]), loss, perplexity
        )


class RVQOutput(NamedTuple):
    codes: jax.Array  # [stages, *z.shape]: each stage's chosen codes (no gradient)
    indices: jax.Array  # int32, [*z.shape[:-1], stages]
    perplexity: jax.Array  # [stages]


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ (Zeghidour et al. 2021, SoundStream): stage k quantises what stages < k
    left. The first `d` stages make a code of `d` indices per position, so one model serves
    several rates (DiffO's rate points); each stage is a `VectorQuantizer` (`stage_k`) with
    its own EMA codebook in `vq_stats`. Every stage sees every example in training, so a
    stage's codebook does not depend on which rates a batch used."""

    num_stages: int = 2
    num_codes: int = 256
    dim: int = 256
    beta: float = 0.25
    decay: float = 0.99
    dead_threshold: float = 1e-3

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool) -> RVQOutput:
        residual, codes, indices, perplexity = z, [], [], []
        for k in range(self.num_stages):
            out = VectorQuantizer(
                self.num_codes,
                self.dim,
                self.beta,
                self.decay,
                dead_threshold=self.dead_threshold,
                name=f"stage_{k}",
            )(residual, train=train)
            code = jax.lax.stop_gradient(out.z_q)
            residual = residual - code
            codes.append(code)
            indices.append(out.indices)
            perplexity.append(out.perplexity)
        return RVQOutput(jnp.stack(codes), jnp.stack(indices, -1), jnp.stack(perplexity))


def residual_code(z: jax.Array, codes: jax.Array, depth: jax.Array | int) -> jax.Array:
    """The code of the first `depth` stages (scalar or per example), straight through to `z`:
    forward value Σ_{k<depth} codes_k, gradient of the identity."""
    k = jnp.arange(codes.shape[0]).reshape((-1,) + (1,) * z.ndim)
    depth = jnp.asarray(depth).reshape((1, -1) + (1,) * (z.ndim - 1))
    total = jnp.sum(jnp.where(k < depth, codes, 0.0), axis=0)
    return z + jax.lax.stop_gradient(total - z)


# --- Host side -----------------------------------------------------------------------------


def vq_tables(vq_stats: dict, *, mode: str = "fixed") -> dict[str, np.ndarray]:
    """Coding tables of a trained codebook: the fixed-point codebook (what the decoder feeds
    to h_s) and, for mode='table', one integer frequency table from the code usage counts."""
    codebook = np.asarray(vq_stats["codebook"], np.float64)
    out = {
        "codebook_q": fixedpoint.to_fixed(codebook),
        "index_bits": np.array(max(1, math.ceil(math.log2(len(codebook)))), np.int32),
    }
    if mode == "table":
        counts = np.asarray(vq_stats["ema_count"], np.float64)
        freqs = tables_lib.pmf_to_freqs(counts / counts.sum(), tail=0.0)
        out["freqs"] = freqs[None].astype(np.int32)
        out["lengths"] = np.array([len(counts)], np.int32)
        out["offsets"] = np.zeros(1, np.int32)
    elif mode != "fixed":
        raise ValueError(f"VQ index coding mode {mode!r}: use 'fixed' or 'table'")
    return out


def encode_indices(encoder, tables: dict, indices: np.ndarray) -> None:
    indices = np.asarray(indices, np.int64).ravel()
    if "freqs" in tables:
        coder.cached_coder(tables).encode(encoder, indices, np.zeros_like(indices))
    else:
        coder.uniform_encode(encoder, indices, int(tables["index_bits"]))


def decode_indices(decoder, tables: dict, shape) -> np.ndarray:
    """Decoded indices, checked against the codebook size."""
    n = int(np.prod(shape))
    if "freqs" in tables:
        idx = coder.cached_coder(tables).decode(decoder, np.zeros(n, np.int64))
    else:
        idx = coder.uniform_decode(decoder, n, int(tables["index_bits"]))
    if idx.size and (idx.min() < 0 or idx.max() >= len(tables["codebook_q"])):
        raise coder.CodingError("VQ index outside the codebook")
    return idx.reshape(shape)


def dequantize_indices(tables: dict, indices: np.ndarray) -> np.ndarray:
    """Indices → the fixed-point hyper latent z_hat_q (an exact table lookup)."""
    return tables["codebook_q"][indices]
