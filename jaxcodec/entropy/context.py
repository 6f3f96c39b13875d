"""ELIC-style space–channel context model (He et al. 2022) for the Gaussian latent y.

y's channels are split into uneven groups (e.g. 16, 16, 32, 64, 192 for M = 320, or RDEIC's
8, 8, 8, 8, 16, 16, 32, 32, 64, 64 for M = 256). Group k is coded in two checkerboard passes:
anchors first (context: hyperprior features + a channel context from groups < k), then
non-anchors (plus a spatial context from group k's decoded anchors). Small early groups give
later groups a cheap, informative context.

Training (`SpaceChannelContext.__call__`) runs both passes in parallel per group; coding
(`code`) repeats them on the host with the fixed-point copies of the same networks
(`export`), so the entropy parameters are bit-identical on every machine.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import coder, fixedpoint
from jaxcodec.entropy import tables as tables_lib
from jaxcodec.entropy.gaussian import gaussian_likelihood
from jaxcodec.entropy.quantization import quantize

DEFAULT_GROUPS = {
    320: (16, 16, 32, 64, 192),  # ELIC
    256: (8, 8, 8, 8, 16, 16, 32, 32, 64, 64),  # RDEIC / DiffCR
    192: (16, 16, 32, 64, 64),
    96: (8, 8, 16, 32, 32),
}


def channel_groups(M: int, groups: Sequence[int] | None = None) -> tuple[int, ...]:
    """The configured groups (checked to sum to M), or a default for common M."""
    if not groups:
        if M not in DEFAULT_GROUPS:
            raise ValueError(f"no default channel groups for M={M}; set model.context_groups")
        groups = DEFAULT_GROUPS[M]
    groups = tuple(int(g) for g in groups)
    if sum(groups) != M or min(groups) < 1:
        raise ValueError(f"channel groups {groups} must be positive and sum to M={M}")
    return groups


def anchor_mask(h: int, w: int) -> np.ndarray:
    """Checkerboard: True where (i + j) is even — the anchors, coded first."""
    return (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0


# Layer recipes: (kind, features(C_k) → int, kernel, stride, activation after).
def _channel_spec(c: int):
    return [("conv", 2 * c, 3, 1, "leaky_relu"), ("conv", 2 * c, 3, 1, None)]


def _spatial_spec(c: int):
    return [("conv", 2 * c, 5, 1, None)]


def _param_spec(c: int):
    hidden = max(4 * c, 64)
    return [
        ("conv", hidden, 1, 1, "leaky_relu"),
        ("conv", hidden, 1, 1, "leaky_relu"),
        ("conv", 2 * c, 1, 1, None),
    ]


class ConvStack(nn.Module):
    """Convolutions with optional leaky ReLUs, named `layer_i` so `export_stack` can follow."""

    layers: Sequence[tuple]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (kind, features, k, s, act) in enumerate(self.layers):
            cls = nn.Conv if kind == "conv" else nn.ConvTranspose
            x = cls(features, (k, k), strides=(s, s), padding="SAME", name=f"layer_{i}")(x)
            if act == "leaky_relu":
                x = nn.leaky_relu(x)
        return x


def export_stack(params: dict, layers: Sequence[tuple]) -> dict:
    spec = []
    for i, (kind, _, _, s, act) in enumerate(layers):
        spec.append((kind if kind == "conv" else "deconv", f"layer_{i}", s))
        if act:
            spec.append((act,))
    return fixedpoint.export_sequential(params, spec)


class SpaceChannelContext(nn.Module):
    """y [B, h, w, M] and hyper features [B, h, w, F] → (y_hat, likelihoods)."""

    groups: Sequence[int]

    def setup(self):
        g = self.groups
        self.channel_ctx = [
            ConvStack(_channel_spec(c), name=f"channel_{k}") for k, c in enumerate(g) if k > 0
        ]
        self.spatial_ctx = [
            ConvStack(_spatial_spec(c), name=f"spatial_{k}") for k, c in enumerate(g)
        ]
        self.param_nets = [ConvStack(_param_spec(c), name=f"param_{k}") for k, c in enumerate(g)]

    def __call__(
        self, y: jax.Array, hyper: jax.Array, *, train: bool, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        anchors = jnp.asarray(anchor_mask(*y.shape[1:3]))[None, :, :, None]
        splits = np.cumsum(self.groups)[:-1]
        y_groups = jnp.split(y, splits, axis=-1)
        keys = jax.random.split(key, len(self.groups)) if train else [None] * len(self.groups)
        mode = "ste" if train else "round"
        y_hats, liks = [], []
        for k, (y_k, c) in enumerate(zip(y_groups, self.groups, strict=True)):
            ctx = [hyper]
            if k > 0:
                ctx.append(self.channel_ctx[k - 1](jnp.concatenate(y_hats, axis=-1)))
            zeros = jnp.zeros((*y_k.shape[:3], 2 * c), y.dtype)
            scales_a, means_a = jnp.split(
                self.param_nets[k](jnp.concatenate([*ctx, zeros], -1)), 2, -1
            )
            y_hat_a = quantize(y_k, mode, offset=means_a) * anchors
            spatial = self.spatial_ctx[k](y_hat_a)
            scales_n, means_n = jnp.split(
                self.param_nets[k](jnp.concatenate([*ctx, spatial], -1)), 2, -1
            )
            scales = jnp.where(anchors, scales_a, scales_n)
            means = jnp.where(anchors, means_a, means_n)
            y_hat = quantize(y_k, mode, offset=means)
            if train:
                noisy = quantize(y_k, "noise", key=keys[k])
                liks.append(gaussian_likelihood(noisy, scales, means))
            else:
                liks.append(gaussian_likelihood(y_hat, scales, means))
            y_hats.append(y_hat)
        return jnp.concatenate(y_hats, -1), jnp.concatenate(liks, -1)


def export(params: dict, groups: Sequence[int]) -> dict:
    """Fixed-point copies of every context network (stored with the entropy tables)."""
    out = {}
    for k, c in enumerate(groups):
        if k > 0:
            out[f"channel_{k}"] = export_stack(params[f"channel_{k}"], _channel_spec(c))
        out[f"spatial_{k}"] = export_stack(params[f"spatial_{k}"], _spatial_spec(c))
        out[f"param_{k}"] = export_stack(params[f"param_{k}"], _param_spec(c))
    out["groups"] = np.asarray(groups, np.int32)
    return out


def code(nets, y_tables, hyper_q, y=None, encoder=None, decoder=None):
    """Both passes of every group, in coding order, on fixed-point hyper features hyper_q.
    Encodes y (float [h, w, M]) when given an encoder, else decodes from `decoder`.
    Returns (y_hat_q [h, w, M] on the fixed-point grid, symbols, table indices)."""
    groups = [int(g) for g in nets["groups"]]
    h, w = hyper_q.shape[:2]
    anchors = anchor_mask(h, w)
    table_coder = coder.cached_coder(y_tables)
    thresholds = y_tables["thresholds"]
    starts = np.concatenate([[0], np.cumsum(groups)])
    y_hat_q = np.zeros((h, w, starts[-1]), np.int64)
    symbols = np.zeros_like(y_hat_q)
    indices = np.zeros(y_hat_q.shape, np.int32)
    for k, c in enumerate(groups):
        sl = slice(starts[k], starts[k + 1])
        ctx = [hyper_q]
        if k > 0:
            ctx.append(fixedpoint.run(nets[f"channel_{k}"], y_hat_q[..., : starts[k]]))
        ctx = np.concatenate(ctx, -1)
        for is_anchor in (True, False):
            pos = anchors if is_anchor else ~anchors
            if is_anchor:
                spatial = np.zeros((int(pos.sum()), 2 * c), np.int64)
            else:
                masked = np.where(anchors[..., None], y_hat_q[..., sl], 0)
                spatial = fixedpoint.run(nets[f"spatial_{k}"], masked)[pos]
            rows = np.concatenate([ctx[pos], spatial], -1)[:, None, :]
            params = fixedpoint.run(nets[f"param_{k}"], rows)[:, 0, :]
            scales_q, means_q = params[:, :c], params[:, c:]
            idx = tables_lib.scale_index(scales_q, thresholds)
            if encoder is not None:
                mu = fixedpoint.from_fixed(means_q)
                sym = np.round(np.asarray(y[pos][:, sl], np.float64) - mu).astype(np.int64)
                table_coder.encode(encoder, sym, idx)
            else:
                sym = table_coder.decode(decoder, idx).reshape(idx.shape)
            y_hat_q[pos, sl] = sym * (1 << fixedpoint.ACT_BITS) + means_q
            symbols[pos, sl] = sym
            indices[pos, sl] = idx
    return y_hat_q, symbols, indices
