"""ELIC-style space–channel context model (He et al. 2022) for the Gaussian latent y.

y's channels are split into uneven groups (e.g. 16, 16, 32, 64, 192 for M = 320, or RDEIC's
8, 8, 8, 8, 16, 16, 32, 32, 64, 64 for M = 256). Group k is coded in two checkerboard passes:
anchors first (context: hyperprior features + a channel context from groups < k), then
non-anchors (plus a spatial context from group k's decoded anchors). Small early groups give
later groups a cheap, informative context.

Training (`SpaceChannelContext.__call__`) runs both passes in parallel per group; coding
(`code_y`) repeats them pass by pass with integer copies of the same networks (`export`,
`jaxcodec.entropy.fixedpoint`) in jitted functions on the device, so the entropy parameters
are bit-identical on every machine; the host only range-codes each pass's symbols.

Two recipes (`RECIPES`) fix the layers and wiring:
- `"elic"` (HFD's default): small 3×3 channel-context nets, one parameter net per group shared
  by both passes (the anchor pass feeds zeros for the spatial context), anchors at even i + j;
- `"rdeic"` (RDEIC's and DiffCR's official `Compression` / `compressor_v3`): 5×5 channel-context
  nets 224 → 128 → 2C_k with GELU, separate anchor / non-anchor parameter nets of 1×1 convs
  (2C·5/3 → 2C·4/3 → 2C, GELU), anchors at odd i + j, inputs ordered [spatial, channel, hyper],
  so that the official weights load layer for layer.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.entropy import coder, fixedpoint
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


# ---------------------------------------------------------------------------------------------
# Coding: the integer entropy-parameter networks on the device, range coding on the host.
# ---------------------------------------------------------------------------------------------

SYMBOL_LIMIT = 1 << 18  # |y symbol| bound: y_hat = symbol·2^12 + μ stays inside int32


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static structure of the entropy-parameter program of y: the prepared h_s (None when
    the caller gives the hyper features) and, with a context model, its networks per group
    (None: plain mean–scale, one pass over all of y). Hashable: jit compiles once per plan
    and image size."""

    h_s: tuple | None
    groups: tuple[int, ...] | None
    recipe: int = 0
    channel: tuple = ()
    spatial: tuple = ()
    param_anchor: tuple = ()
    param_nonanchor: tuple = ()

    @property
    def num_passes(self) -> int:
        return 1 if self.groups is None else 2 * len(self.groups)


def build_program(h_s_net: dict | None, nets: dict | None, y_tables: dict) -> tuple[Plan, dict]:
    """(Plan, arrays) from stored integer networks and y's tables; raises
    `fixedpoint.FixedPointOverflow` for any network that could overflow int32."""
    hs_spec, hs_arrays = fixedpoint.prepare(h_s_net) if h_s_net is not None else (None, None)
    thresholds = np.asarray(y_tables["thresholds"], np.int64)
    if thresholds.min() < 0 or thresholds.max() > fixedpoint.ACT_LIMIT:
        raise ValueError("scale thresholds out of range")
    arrays = {"h_s": hs_arrays, "thresholds": thresholds.astype(np.int32)}
    if nets is None:
        return Plan(hs_spec, None), arrays
    groups = tuple(int(g) for g in nets["groups"])
    r = _BY_CODE[int(nets["recipe"])] if "recipe" in nets else RECIPES["elic"]
    specs: dict[str, list] = {"channel": [], "spatial": [], "param_a": [], "param_n": []}
    for name in specs:
        arrays[name] = []
    for k in range(len(groups)):
        names = {
            "channel": f"channel_{k}" if k > 0 else None,
            "spatial": f"spatial_{k}",
            "param_a": f"param_anchor_{k}" if r.split_params else f"param_{k}",
            "param_n": f"param_nonanchor_{k}" if r.split_params else f"param_{k}",
        }
        for slot, key in names.items():
            spec, arr = fixedpoint.prepare(nets[key]) if key else (None, None)
            specs[slot].append(spec)
            arrays[slot].append(arr)
    plan = Plan(
        hs_spec,
        groups,
        r.code,
        tuple(specs["channel"]),
        tuple(specs["spatial"]),
        tuple(specs["param_a"]),
        tuple(specs["param_n"]),
    )
    return plan, arrays


def _pass_layout(plan: Plan, p: int, h: int, w: int):
    """(positions: flat indices into h·w, first channel, channel count) of pass p."""
    if plan.groups is None:
        return np.arange(h * w), 0, None
    k, anchor = divmod(p, 2)
    r = _BY_CODE[plan.recipe]
    mask = anchor_mask(h, w, r.anchor_parity)
    pos = np.flatnonzero(mask if anchor == 0 else ~mask)
    return pos, int(sum(plan.groups[:k])), plan.groups[k]


def _rows(x: jax.Array, pos: np.ndarray) -> jax.Array:
    """[h, w, C] → [1, len(pos), 1, C]: the pass's positions as a column image (1×1 nets)."""
    return x.reshape(-1, x.shape[-1])[pos][None, :, None, :]


def _init(plan: Plan, arrays: dict, z_q: jax.Array, m: int) -> dict:
    if plan.h_s is None:
        hyper = jnp.clip(z_q, -fixedpoint.ACT_LIMIT, fixedpoint.ACT_LIMIT).astype(jnp.int32)
    else:
        hyper = fixedpoint.apply(plan.h_s, arrays["h_s"], z_q[None])[0]
    y_hat = jnp.zeros((*hyper.shape[:2], m), jnp.int32)
    return {"hyper": hyper, "y_hat": y_hat}


def _params(plan: Plan, arrays: dict, p: int, state: dict):
    """Entropy parameters of pass p → (table indices, means_q) [n, c], and the state (the
    group's channel context, computed at its anchor pass, is kept for its non-anchor pass)."""
    hyper, y_hat = state["hyper"], state["y_hat"]
    h, w = hyper.shape[:2]
    pos, start, c = _pass_layout(plan, p, h, w)
    if plan.groups is None:
        m = y_hat.shape[-1]
        params = hyper.reshape(h * w, 2 * m)
    else:
        k, nonanchor = divmod(p, 2)
        r = _BY_CODE[plan.recipe]
        app = fixedpoint.apply
        if not nonanchor:
            state = dict(state, channel=None)
            if k > 0:
                ctx_in = y_hat[None, ..., :start]
                state["channel"] = app(plan.channel[k], arrays["channel"][k], ctx_in)[0]
        channel = None if state["channel"] is None else _rows(state["channel"], pos)
        if nonanchor:
            mask = anchor_mask(h, w, r.anchor_parity)[..., None]
            anchors = jnp.where(mask, y_hat[..., start : start + c], 0)
            spatial = app(plan.spatial[k], arrays["spatial"][k], anchors[None])[0]
            spatial = _rows(spatial, pos)
            net, net_arrays = plan.param_nonanchor[k], arrays["param_n"][k]
        else:
            spatial = None if r.split_params else jnp.zeros((1, len(pos), 1, 2 * c), jnp.int32)
            net, net_arrays = plan.param_anchor[k], arrays["param_a"][k]
        inputs = _inputs(r, _rows(hyper, pos), channel, spatial)
        params = app(net, net_arrays, jnp.concatenate(inputs, -1))[0, :, 0, :]
    c = params.shape[-1] // 2
    scales_q, means_q = params[:, :c], params[:, c:]
    thresholds = jnp.asarray(arrays["thresholds"])
    idx = jnp.searchsorted(thresholds, scales_q, side="left")
    idx = jnp.minimum(idx, thresholds.shape[0] - 1).astype(jnp.int32)
    return idx, means_q, state


def _write(plan: Plan, p: int, state: dict, sym: jax.Array, means_q: jax.Array) -> dict:
    """y_hat at pass p's positions = symbol·2^12 + μ."""
    y_hat = state["y_hat"]
    h, w, m = y_hat.shape
    pos, start, c = _pass_layout(plan, p, h, w)
    c = m if c is None else c
    values = sym.astype(jnp.int32) * (1 << fixedpoint.ACT_BITS) + means_q
    flat = y_hat.reshape(h * w, m).at[pos, start : start + c].set(values)
    return dict(state, y_hat=flat.reshape(h, w, m))


def _float(y_hat_q: jax.Array) -> jax.Array:
    return y_hat_q.astype(jnp.float32) * (1.0 / (1 << fixedpoint.ACT_BITS))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_first(plan: Plan, arrays: dict, z_q: jax.Array, m: int):
    state = _init(plan, arrays, z_q, m)
    idx, means_q, state = _params(plan, arrays, 0, state)
    return dict(state, means=means_q), idx


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode_step(plan: Plan, p: int, arrays: dict, state: dict, sym: jax.Array):
    """Writes pass p − 1's decoded symbols, then computes pass p's table indices."""
    state = _write(plan, p - 1, state, sym, state["means"])
    idx, means_q, state = _params(plan, arrays, p, state)
    return dict(state, means=means_q), idx


@functools.partial(jax.jit, static_argnums=0)
def _decode_last(plan: Plan, state: dict, sym: jax.Array):
    y_hat_q = _write(plan, plan.num_passes - 1, state, sym, state["means"])["y_hat"]
    return y_hat_q, _float(y_hat_q)


@functools.partial(jax.jit, static_argnums=0)
def _encode_all(plan: Plan, arrays: dict, z_q: jax.Array, y: jax.Array):
    """Every pass at once (the encoder knows y): the decoder's functions in the same order,
    so the integer results are identical. → (symbols, indices per pass, y_hat_q, y_hat)."""
    h, w, m = y.shape
    state = _init(plan, arrays, z_q, m)
    symbols, indices = [], []
    for p in range(plan.num_passes):
        idx, means_q, state = _params(plan, arrays, p, state)
        pos, start, c = _pass_layout(plan, p, h, w)
        c = m if c is None else c
        mu = means_q.astype(jnp.float32) * (1.0 / (1 << fixedpoint.ACT_BITS))
        sym = jnp.round(y.reshape(h * w, m)[pos, start : start + c] - mu)
        sym = jnp.clip(sym, -SYMBOL_LIMIT, SYMBOL_LIMIT).astype(jnp.int32)
        state = _write(plan, p, state, sym, means_q)
        symbols.append(sym)
        indices.append(idx)
    return tuple(symbols), tuple(indices), state["y_hat"], _float(state["y_hat"])


_PROGRAMS: dict[tuple, tuple] = {}


def program(h_s_net: dict | None, nets: dict | None, y_tables: dict) -> tuple[Plan, dict]:
    """`build_program` with the arrays on the device, once per set of stored tables."""
    held = (h_s_net, nets, y_tables["thresholds"])
    key = tuple(map(id, held))
    hit = _PROGRAMS.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], held, strict=True)):
        if len(_PROGRAMS) >= 16:
            _PROGRAMS.clear()
        plan, arrays = build_program(h_s_net, nets, y_tables)
        # The stored objects are held so their ids stay unique while cached.
        hit = (held, plan, jax.device_put(arrays))
        _PROGRAMS[key] = hit
    return hit[1], hit[2]


class CodingResult(NamedTuple):
    y_hat: np.ndarray  # float32 [h, w, M]
    y_hat_q: np.ndarray  # int32 [h, w, M] on the 2^-12 grid
    symbols: np.ndarray  # int32 [h, w, M]
    indices: np.ndarray  # int32 [h, w, M] (table of every element)


def code_y(h_s_net, nets, y_tables, z_q, *, m: int, y=None, encoder=None, decoder=None):
    """Codes y [h, w, M] (float, with an `encoder`) or decodes it (from a `decoder`): h_s on
    the integer hyper latent z_q (or, with `h_s_net` None, z_q are the hyper features), then
    every pass of the context model (or the one mean–scale pass), table indices and means on
    the device; the host only range-codes. Returns a CodingResult."""
    plan, arrays = program(h_s_net, nets, y_tables)
    table_coder = coder.cached_coder(y_tables)
    z_q = np.clip(np.asarray(z_q, np.int64), -fixedpoint.ACT_LIMIT, fixedpoint.ACT_LIMIT)
    z_q = jnp.asarray(z_q.astype(np.int32))
    if encoder is not None:
        syms, idxs, y_hat_q, y_hat = _encode_all(plan, arrays, z_q, jnp.asarray(y, jnp.float32))
        syms, idxs = jax.device_get((syms, idxs))
        for sym, idx in zip(syms, idxs, strict=True):
            table_coder.encode(encoder, sym, idx)
    else:
        state, idx = _decode_first(plan, arrays, z_q, m)
        syms, idxs = [], []
        for p in range(plan.num_passes):
            idx = np.asarray(idx)
            sym = table_coder.decode(decoder, idx).reshape(idx.shape)
            if sym.size and np.abs(sym).max() > SYMBOL_LIMIT:
                raise coder.CodingError("decoded symbol out of range")
            sym = sym.astype(np.int32)
            syms.append(sym)
            idxs.append(idx)
            if p + 1 < plan.num_passes:
                state, idx = _decode_step(plan, p + 1, arrays, state, sym)
            else:
                y_hat_q, y_hat = _decode_last(plan, state, sym)
    h, w = y_hat_q.shape[:2]
    symbols = np.zeros((h * w, m), np.int32)
    indices = np.zeros((h * w, m), np.int32)
    for p, (sym, idx) in enumerate(zip(syms, idxs, strict=True)):
        pos, start, c = _pass_layout(plan, p, h, w)
        c = m if c is None else c
        symbols[pos, start : start + c] = sym
        indices[pos, start : start + c] = idx
    return CodingResult(
        np.asarray(y_hat),
        np.asarray(y_hat_q),
        symbols.reshape(h, w, m),
        indices.reshape(h, w, m),
    )


def code(nets, y_tables, hyper_q, y=None, encoder=None, decoder=None):
    """Both passes of every group, in coding order, on integer hyper features hyper_q
    [h, w, F]. Encodes y (float [h, w, M]) when given an encoder, else decodes from `decoder`.
    Returns (y_hat_q [h, w, M] on the 2^-12 grid, symbols, table indices)."""
    m = int(sum(int(g) for g in nets["groups"]))
    out = code_y(None, nets, y_tables, hyper_q, m=m, y=y, encoder=encoder, decoder=decoder)
    return out.y_hat_q.astype(np.int64), out.symbols.astype(np.int64), out.indices
