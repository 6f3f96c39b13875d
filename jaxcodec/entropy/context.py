"""ELIC-style space–channel context model (He et al. 2022) for the Gaussian latent y.

y's channels are split into uneven groups (e.g. 16, 16, 32, 64, 192 for M = 320, or RDEIC's
8, 8, 8, 8, 16, 16, 32, 32, 64, 64 for M = 256). Group k is coded in two checkerboard passes:
anchors first (context: hyperprior features + a channel context from groups < k), then
non-anchors (plus a spatial context from group k's decoded anchors). Small early groups give
later groups a cheap, informative context.

Training (`SpaceChannelContext.__call__`) runs both passes in parallel per group; coding
(`code`) repeats them on the host with the fixed-point copies of the same networks
(`export`), so the entropy parameters are bit-identical on every machine.

Two recipes (`RECIPES`) fix the layers and wiring:
- `"elic"` (HFD's default): small 3×3 channel-context nets, one parameter net per group shared
  by both passes (the anchor pass feeds zeros for the spatial context), anchors at even i + j;
- `"rdeic"` (RDEIC's and DiffCR's official `Compression` / `compressor_v3`): 5×5 channel-context
  nets 224 → 128 → 2C_k with GELU, separate anchor / non-anchor parameter nets of 1×1 convs
  (2C·5/3 → 2C·4/3 → 2C, GELU), anchors at odd i + j, inputs ordered [spatial, channel, hyper],
  so that the official weights load layer for layer.
"""

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import coder, fixedpoint
from jaxcodec.entropy import tables as tables_lib
from jaxcodec.entropy.gaussian import gaussian_likelihood
from jaxcodec.entropy.quantization import quantize
from jaxcodec.nn import layers as nn_layers

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


def anchor_mask(h: int, w: int, parity: int = 0) -> np.ndarray:
    """Checkerboard: True where (i + j) % 2 == parity — the anchors, coded first."""
    return (np.add.outer(np.arange(h), np.arange(w)) % 2) == parity


# Layer recipes: (kind, features, kernel, stride, activation after).
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


def _rdeic_channel_spec(c: int):
    return [
        ("conv", 224, 5, 1, "gelu"),
        ("conv", 128, 5, 1, "gelu"),
        ("conv", 2 * c, 5, 1, None),
    ]


def _rdeic_param_spec(c: int):
    out = 2 * c
    return [
        ("conv", out * 5 // 3, 1, 1, "gelu"),
        ("conv", out * 4 // 3, 1, 1, "gelu"),
        ("conv", out, 1, 1, None),
    ]


@dataclasses.dataclass(frozen=True)
class ContextRecipe:
    """Layers and wiring of the context networks of one model family."""

    code: int  # stored with the exported networks
    channel: Callable[[int], list]  # C_k → layers of the channel context of group k
    spatial: Callable[[int], list]
    param: Callable[[int], list]
    split_params: bool  # separate anchor / non-anchor parameter networks
    anchor_parity: int  # anchors where (i + j) % 2 == parity
    hyper_first: bool  # inputs [hyper, channel, spatial] (else [spatial, channel, hyper])


RECIPES = {
    "elic": ContextRecipe(0, _channel_spec, _spatial_spec, _param_spec, False, 0, True),
    "rdeic": ContextRecipe(
        1, _rdeic_channel_spec, _spatial_spec, _rdeic_param_spec, True, 1, False
    ),
}
_BY_CODE = {r.code: r for r in RECIPES.values()}


def get_recipe(name: str) -> ContextRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown context recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


def _activation(x: jax.Array, act: str | None) -> jax.Array:
    if act == "leaky_relu":
        return nn.leaky_relu(x)
    if act == "gelu":
        return nn.gelu(x, approximate=False)  # torch's nn.GELU()
    if act is None:
        return x
    raise ValueError(f"unknown activation {act!r}")


class ConvStack(nn.Module):
    """Convolutions with optional activations, named `layer_i` so `export_stack` can follow."""

    layers: Sequence[tuple]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (kind, features, k, s, act) in enumerate(self.layers):
            conv = nn_layers.conv(
                features, k, stride=s, padding="SAME", transpose=kind != "conv", name=f"layer_{i}"
            )
            x = conv(x)
            x = _activation(x, act)
        return x


def export_stack(params: dict, layers: Sequence[tuple]) -> dict:
    spec = []
    for i, (kind, _, _, s, act) in enumerate(layers):
        spec.append((kind if kind == "conv" else "deconv", f"layer_{i}", s))
        if act:
            spec.append((act,))
    return fixedpoint.export_sequential(params, spec)


def _inputs(recipe: ContextRecipe, hyper, channel, spatial) -> list:
    """The parameter nets' inputs in the recipe's order (None entries are absent)."""
    parts = [hyper, channel, spatial] if recipe.hyper_first else [spatial, channel, hyper]
    return [p for p in parts if p is not None]


class SpaceChannelContext(nn.Module):
    """y [B, h, w, M] and hyper features [B, h, w, F] → (y_hat, likelihoods)."""

    groups: Sequence[int]
    recipe: str = "elic"

    def setup(self):
        g, r = self.groups, get_recipe(self.recipe)
        self.channel_ctx = [
            ConvStack(r.channel(c), name=f"channel_{k}") for k, c in enumerate(g) if k > 0
        ]
        self.spatial_ctx = [ConvStack(r.spatial(c), name=f"spatial_{k}") for k, c in enumerate(g)]
        if r.split_params:
            self.param_anchor = [
                ConvStack(r.param(c), name=f"param_anchor_{k}") for k, c in enumerate(g)
            ]
            self.param_nonanchor = [
                ConvStack(r.param(c), name=f"param_nonanchor_{k}") for k, c in enumerate(g)
            ]
        else:
            self.param_nets = [ConvStack(r.param(c), name=f"param_{k}") for k, c in enumerate(g)]

    def __call__(
        self, y: jax.Array, hyper: jax.Array, *, train: bool, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        r = get_recipe(self.recipe)
        anchors = jnp.asarray(anchor_mask(*y.shape[1:3], r.anchor_parity))[None, :, :, None]
        splits = np.cumsum(self.groups)[:-1]
        y_groups = jnp.split(y, splits, axis=-1)
        keys = jax.random.split(key, len(self.groups)) if train else [None] * len(self.groups)
        mode = "ste" if train else "round"
        y_hats, liks = [], []
        for k, (y_k, c) in enumerate(zip(y_groups, self.groups, strict=True)):
            channel = None
            if k > 0:
                channel = self.channel_ctx[k - 1](jnp.concatenate(y_hats, axis=-1))
            if r.split_params:
                net_a, net_n = self.param_anchor[k], self.param_nonanchor[k]
                zeros = None
            else:
                net_a = net_n = self.param_nets[k]
                zeros = jnp.zeros((*y_k.shape[:3], 2 * c), y.dtype)
            scales_a, means_a = jnp.split(
                net_a(jnp.concatenate(_inputs(r, hyper, channel, zeros), -1)), 2, -1
            )
            y_hat_a = quantize(y_k, mode, offset=means_a) * anchors
            spatial = self.spatial_ctx[k](y_hat_a)
            scales_n, means_n = jnp.split(
                net_n(jnp.concatenate(_inputs(r, hyper, channel, spatial), -1)), 2, -1
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


def export(params: dict, groups: Sequence[int], recipe: str = "elic") -> dict:
    """Fixed-point copies of every context network (stored with the entropy tables)."""
    r = get_recipe(recipe)
    out = {}
    for k, c in enumerate(groups):
        if k > 0:
            out[f"channel_{k}"] = export_stack(params[f"channel_{k}"], r.channel(c))
        out[f"spatial_{k}"] = export_stack(params[f"spatial_{k}"], r.spatial(c))
        names = ("param_anchor", "param_nonanchor") if r.split_params else ("param",)
        for name in names:
            out[f"{name}_{k}"] = export_stack(params[f"{name}_{k}"], r.param(c))
    out["groups"] = np.asarray(groups, np.int32)
    if r.code:  # the original ELIC tables carry no recipe code (old bundles stay identical)
        out["recipe"] = np.asarray(r.code, np.int32)
    return out


def code(nets, y_tables, hyper_q, y=None, encoder=None, decoder=None):
    """Both passes of every group, in coding order, on fixed-point hyper features hyper_q.
    Encodes y (float [h, w, M]) when given an encoder, else decodes from `decoder`.
    Returns (y_hat_q [h, w, M] on the fixed-point grid, symbols, table indices)."""
    groups = [int(g) for g in nets["groups"]]
    r = _BY_CODE[int(nets["recipe"])] if "recipe" in nets else RECIPES["elic"]
    h, w = hyper_q.shape[:2]
    anchors = anchor_mask(h, w, r.anchor_parity)
    table_coder = coder.cached_coder(y_tables)
    thresholds = y_tables["thresholds"]
    starts = np.concatenate([[0], np.cumsum(groups)])
    y_hat_q = np.zeros((h, w, starts[-1]), np.int64)
    symbols = np.zeros_like(y_hat_q)
    indices = np.zeros(y_hat_q.shape, np.int32)
    for k, c in enumerate(groups):
        sl = slice(starts[k], starts[k + 1])
        channel = None
        if k > 0:
            channel = fixedpoint.run(nets[f"channel_{k}"], y_hat_q[..., : starts[k]])
        for is_anchor in (True, False):
            pos = anchors if is_anchor else ~anchors
            if is_anchor:
                spatial = None if r.split_params else np.zeros((int(pos.sum()), 2 * c), np.int64)
                net = nets[f"param_anchor_{k}" if r.split_params else f"param_{k}"]
            else:
                masked = np.where(anchors[..., None], y_hat_q[..., sl], 0)
                spatial = fixedpoint.run(nets[f"spatial_{k}"], masked)[pos]
                net = nets[f"param_nonanchor_{k}" if r.split_params else f"param_{k}"]
            rows = _inputs(r, hyper_q[pos], None if channel is None else channel[pos], spatial)
            params = fixedpoint.run(net, np.concatenate(rows, -1)[:, None, :])[:, 0, :]
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
