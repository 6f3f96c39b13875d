"""Integer entropy-parameter networks (h_s, context models), exact on every platform.

Why: a one-ulp change of a predicted scale can pick another CDF table and desynchronise the
range decoder, and float convolutions round differently with the platform, batch size, thread
count or XLA's fusion choices. Here the networks are integer programs (Ballé et al. 2019,
"Integer networks for data compression with latent-variable models", applied after training),
run on the device inside jitted functions: int8 × int8 products accumulated in int32 with a
proven bound, then integer requantisation. Integer arithmetic is exact, so every platform,
summation order and fusion gives the same bits.

Numbers:
- Activations are int32 on the 2^-ACT_BITS grid (ACT_BITS = 12: the grid of decoded latents,
  table medians and codebooks), saturated to ±ACT_LIMIT = 2^28 (±65536) after every layer.
- A convolution first brings its input to 15 bits with one data-dependent shift per tensor,
  s = max(0, bitlength(max|x|) − 14), x' = round(x / 2^s) ∈ [−2^14, 2^14) (block floating
  point: the shift is an exact function of the integers, identical on every machine), and
  splits x' = 128·hi + lo into two int8 limbs (hi ∈ [−128, 127], lo ∈ [0, 127]).
- Weights are int8 per output channel c, W = round(w / q_c) with the step q_c = m_c · 2^-r_c
  (m_c ∈ [2^14, 2^15), r_c ∈ [16, 45]), chosen so that max|W| ≤ 127 and Σ|W_c| ≤ L1_MAX.
- acc = 128·conv(hi, W) + conv(lo, W) = Σ W·x' in int32; then y = round(acc · m_c / 2^(r_c − s))
  computed exactly with 16-bit splits in int32 (`_requantize`), + bias (int32 on the grid).

Bound (why int32 never overflows, in any summation order): |x'| ≤ 2^14, so every partial sum of
Σ W·hi or Σ W·lo is at most 2^7·Σ|W_c| and acc at most 2^14·Σ|W_c| ≤ 2^14·(2^17 − 1) < 2^31.
Export refuses weights that cannot meet Σ|W_c| ≤ L1_MAX with a step of at least 2^-15 (i.e.
max|w| > 63 or Σ|w_c| > 2^16 per output channel) and biases beyond ±2^16 (then
|requantised + bias| ≤ 2^29 before saturating); `prepare` re-checks
every stored layer, so no table can run with a possible overflow. Inputs are saturated to
±2^28, so s ≤ 15 and r_c ≥ 16 give a right shift t = r_c − s ≥ 1 in the requantisation.

A network is stored as a dict of layers keyed '000', '001', ... (dicts of numpy arrays, kept
in the codec bundle with the entropy tables), each with `kind` one of `conv` / `deconv` (Flax
`Conv` / `ConvTranspose` with SAME padding), `leaky_relu` (slope 0.01 unless the layer stores
its own on a 2^-16 grid), `relu`, `gelu` (a stored integer table, interpolated),
`depth_to_space` (as `jaxcodec.nn.transforms.SubpixelConv`), `pixel_shuffle` (torch's channel
order, as `jaxcodec.nn.transforms.pixel_shuffle`) and `residual` (two sub-networks whose
outputs add; no `skip` is the identity). `prepare` turns one into a static structure and
integer arrays for `apply` (traceable); networks stored by earlier versions (int32 kernels on
a 2^-14 grid) are requantised there, deterministically, from their stored integers.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ACT_BITS = 12
ACT_LIMIT = 1 << 28  # activations saturate at ±2^28 on the 2^-12 grid (±65536)
INPUT_BITS = 14  # a convolution's input x' ∈ [−2^14, 2^14): two int8 limbs
LIMB_BITS = 7
WEIGHT_MAX = 127
L1_MAX = (1 << 17) - 1  # Σ|W_c| per output channel: 2^14 · L1_MAX < 2^31
MULT_BITS = 15  # requantisation multipliers m_c ∈ [2^14, 2^15)
MIN_RSHIFT, MAX_RSHIFT = 16, 45  # weight steps m·2^-r between 2^-31 and 2^-1 (see above)
LEAKY_SLOPE = 0.01  # flax.linen.leaky_relu's default
_SLOPE_BITS = 16
_LEGACY_WEIGHT_BITS = 14  # version-2 bundles: int32 kernels on 2^-14, biases on 2^-26

KIND_CODES = {
    "conv": 0,
    "deconv": 1,
    "leaky_relu": 2,
    "relu": 3,
    "depth_to_space": 4,
    "gelu": 5,
    "pixel_shuffle": 6,
    "residual": 7,
}
# GELU table: knots every 2^-GELU_KNOT_BITS over [-GELU_RANGE, GELU_RANGE]; outside it GELU(x)
# is x (above) or 0 (below) to within 2^-ACT_BITS.
GELU_KNOT_BITS = 5
GELU_RANGE = 8
_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


class FixedPointOverflow(ArithmeticError):
    """A network whose integer evaluation could overflow int32 (refused)."""


def to_fixed(x: np.ndarray, bits: int = ACT_BITS) -> np.ndarray:
    """float → integer grid (as int64); deterministic (IEEE multiply by 2^bits, then round)."""
    return np.round(np.asarray(x, np.float64) * (1 << bits)).astype(np.int64)


def from_fixed(q: np.ndarray, bits: int = ACT_BITS) -> np.ndarray:
    return np.asarray(q, np.float64) / (1 << bits)


# ---------------------------------------------------------------------------------------------
# Export: float weights → integer layers (once, when the entropy tables are built)
# ---------------------------------------------------------------------------------------------


def _weight_step(amax: float, l1: float) -> tuple[int, int]:
    """The finest step m·2^-r (m a 15-bit multiplier) at which weights of this maximum and L1
    norm fit int8 and the accumulator bound."""
    scale = min(WEIGHT_MAX / amax if amax > 0 else np.inf, L1_MAX / l1 if l1 > 0 else np.inf)
    scale = min(scale, 2.0 ** (MAX_RSHIFT - MULT_BITS))
    frac, exp = np.frexp(1.0 / scale)  # step = frac · 2^exp, frac ∈ [0.5, 1)
    m, r = int(np.ceil(frac * (1 << MULT_BITS))), MULT_BITS - int(exp)
    if m == 1 << MULT_BITS:
        m, r = m >> 1, r - 1
    return m, r


def conv_layer(kernel: np.ndarray, bias: np.ndarray, stride: int, transpose: bool = False):
    """Quantises a Flax Conv/ConvTranspose kernel [kh, kw, cin, cout] and bias [cout] to int8
    weights with a step per output channel; refuses weights that cannot meet the bound."""
    kernel = np.asarray(kernel, np.float64)
    bias = np.asarray(bias, np.float64)
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
        raise FixedPointOverflow("non-finite weights cannot be quantised")
    cout = kernel.shape[-1]
    w = kernel.reshape(-1, cout)
    q = np.zeros(w.shape, np.int64)
    mult = np.zeros(cout, np.int64)
    rshift = np.zeros(cout, np.int64)
    for c in range(cout):
        a = np.abs(w[:, c])
        amax, l1 = float(a.max(initial=0.0)), float(a.sum())
        m, r = _weight_step(amax, l1)
        while True:
            q[:, c] = np.round(w[:, c] * (2.0**r / m))
            if np.abs(q[:, c]).max(initial=0) <= WEIGHT_MAX and np.abs(q[:, c]).sum() <= L1_MAX:
                break
            m += 1  # rounding overshot the bound: a slightly coarser step
            if m == 1 << MULT_BITS:
                m, r = m >> 1, r - 1
        if r < MIN_RSHIFT:
            raise FixedPointOverflow(
                f"output channel {c}: weights (max {amax:.4g}, L1 {l1:.4g}) exceed the int32 "
                f"accumulator bound (max|w| ≤ 63, Σ|w| ≤ 65536 per output channel)"
            )
        mult[c], rshift[c] = m, r
    b = to_fixed(bias)
    if np.abs(b).max(initial=0) > ACT_LIMIT:
        raise FixedPointOverflow(f"bias {np.abs(bias).max():.4g} exceeds ±{ACT_LIMIT >> ACT_BITS}")
    return {
        "kind": np.array(KIND_CODES["deconv" if transpose else "conv"], np.int32),
        "stride": np.array(stride, np.int32),
        "kernel": q.reshape(kernel.shape).astype(np.int8),
        "mult": mult.astype(np.int32),
        "rshift": rshift.astype(np.int32),
        "bias": b.astype(np.int32),
    }


def act_layer(kind: str, slope: float | None = None) -> dict[str, np.ndarray]:
    """An activation; `slope` is a leaky ReLU's negative slope (stored on a 2^-16 grid)."""
    if kind == "gelu":
        return gelu_layer()
    layer = {"kind": np.array(KIND_CODES[kind], np.int32)}
    if slope is not None:
        if kind != "leaky_relu":
            raise ValueError(f"only leaky_relu takes a slope, not {kind}")
        if not 0.0 <= slope <= 1.0:
            raise FixedPointOverflow(f"leaky ReLU slope {slope} outside [0, 1]")
        layer["slope"] = np.array(round(slope * (1 << _SLOPE_BITS)), np.int64)
    return layer


def gelu_layer() -> dict[str, np.ndarray]:
    """GELU x·Φ(x) (erf form, torch's default) as integers on the activation grid at knots
    2^-GELU_KNOT_BITS apart: built here once with float64 and stored with the tables, so the
    decoder only interpolates integers (linear, floor division: exact everywhere)."""
    from scipy.special import ndtr

    knots = np.arange(-GELU_RANGE << GELU_KNOT_BITS, (GELU_RANGE << GELU_KNOT_BITS) + 1)
    x = knots / float(1 << GELU_KNOT_BITS)
    return {
        "kind": np.array(KIND_CODES["gelu"], np.int32),
        "table": to_fixed(x * ndtr(x)).astype(np.int32),
    }


def pixel_shuffle_layer(block: int) -> dict[str, np.ndarray]:
    return {"kind": np.array(KIND_CODES["pixel_shuffle"], np.int32), "block": np.array(block)}


def residual_layer(main: dict, skip: dict | None = None) -> dict:
    """out = main(x) + skip(x) (identity when `skip` is None): residual blocks of transforms."""
    layer = {"kind": np.array(KIND_CODES["residual"], np.int32), "main": main}
    if skip is not None:
        layer["skip"] = skip
    return layer


def export_sequential(params: dict[str, Any], spec: list[tuple]) -> dict[str, dict]:
    """Builds an integer network from Flax params following `spec`, a list of
    ('conv' | 'deconv', 'path/to/module', stride), ('depth_to_space', block) and
    ('leaky_relu' | 'relu' | 'gelu',) entries. Layers are keyed '000', '001', ... so the
    pytree keeps its order through a checkpoint."""
    layers = []
    for entry in spec:
        kind = entry[0]
        if kind == "depth_to_space":
            layers.append(
                {
                    "kind": np.array(KIND_CODES[kind], np.int32),
                    "block": np.array(entry[1], np.int32),
                }
            )
        elif kind in ("conv", "deconv"):
            p = params
            for name in entry[1].split("/"):
                p = p[name]
            layers.append(
                conv_layer(
                    np.asarray(p["kernel"]), np.asarray(p["bias"]), entry[2], kind == "deconv"
                )
            )
        else:
            layers.append(act_layer(kind))
    return {f"{i:03d}": layer for i, layer in enumerate(layers)}


# ---------------------------------------------------------------------------------------------
# Preparation: stored layers → (static structure, checked integer arrays)
# ---------------------------------------------------------------------------------------------


def _checked_conv(layer: dict) -> dict[str, np.ndarray]:
    """The integer arrays of a stored conv layer, after checking every bound of the proof;
    a version-2 layer (int32 kernel on 2^-14, bias on 2^-26) is requantised first."""
    if "mult" not in layer:  # stored by format version 2: requantise from its integers
        kernel = np.asarray(layer["kernel"], np.float64) / (1 << _LEGACY_WEIGHT_BITS)
        bias = np.asarray(layer["bias"], np.float64) / 2.0 ** (_LEGACY_WEIGHT_BITS + ACT_BITS)
        layer = conv_layer(kernel, bias, int(layer["stride"]))
    kernel = np.asarray(layer["kernel"])
    mult = np.asarray(layer["mult"], np.int64)
    rshift = np.asarray(layer["rshift"], np.int64)
    bias = np.asarray(layer["bias"], np.int64)
    cout = kernel.shape[-1]
    if kernel.ndim != 4 or kernel.dtype != np.int8 or {len(mult), len(rshift), len(bias)} != {cout}:
        raise FixedPointOverflow("malformed integer conv layer")
    w = np.abs(kernel.astype(np.int64)).reshape(-1, cout)
    if w.max(initial=0) > WEIGHT_MAX or w.sum(axis=0).max(initial=0) > L1_MAX:
        raise FixedPointOverflow(
            f"Σ|W| per output channel reaches {w.sum(axis=0).max()} > {L1_MAX}: "
            "the int32 accumulator could overflow"
        )
    if mult.min(initial=0) < 0 or mult.max(initial=0) >= 1 << MULT_BITS:
        raise FixedPointOverflow("requantisation multiplier out of range")
    if rshift.min(initial=MIN_RSHIFT) < MIN_RSHIFT or rshift.max(initial=0) > MAX_RSHIFT:
        raise FixedPointOverflow("requantisation shift out of range")
    if np.abs(bias).max(initial=0) > ACT_LIMIT:
        raise FixedPointOverflow("bias out of range")
    return {
        "kernel": kernel,
        "mult": mult.astype(np.int32),
        "rshift": rshift.astype(np.int32),
        "bias": bias.astype(np.int32),
    }


def _prepare_layer(layer: dict) -> tuple[tuple, Any]:
    kind = _KIND_NAMES[int(layer["kind"])]
    if kind in ("conv", "deconv"):
        return (kind, int(layer["stride"])), _checked_conv(layer)
    if kind == "leaky_relu":
        slope = int(layer["slope"]) if "slope" in layer else round(LEAKY_SLOPE * (1 << _SLOPE_BITS))
        if not 0 <= slope <= 1 << _SLOPE_BITS:
            raise FixedPointOverflow(f"leaky ReLU slope {slope} / 2^16 outside [0, 1]")
        return (kind, slope), None
    if kind == "gelu":
        table = np.asarray(layer["table"], np.int64)
        if table.shape != (2 * (GELU_RANGE << GELU_KNOT_BITS) + 1,):
            raise FixedPointOverflow("GELU table of the wrong length")
        if np.abs(table).max() > ACT_LIMIT // 4 or np.abs(np.diff(table)).max() > 1 << 20:
            raise FixedPointOverflow("GELU table out of range")
        return (kind,), table.astype(np.int32)
    if kind in ("depth_to_space", "pixel_shuffle"):
        return (kind, int(layer["block"])), None
    if kind == "relu":
        return (kind,), None
    if kind == "residual":
        main_spec, main = prepare(layer["main"])
        skip_spec, skip = prepare(layer["skip"]) if "skip" in layer else (None, None)
        return (kind, main_spec, skip_spec), (main, skip)
    raise ValueError(f"unknown layer kind {kind}")


def prepare(net: dict[str, dict]) -> tuple[tuple, tuple]:
    """A stored network → (static structure: a hashable tuple, checked integer arrays: a
    pytree of numpy arrays) for `apply`. Raises FixedPointOverflow for any layer that could
    overflow int32."""
    specs, arrays = [], []
    for key in sorted(net):
        spec, arr = _prepare_layer(net[key])
        specs.append(spec)
        arrays.append(arr)
    return tuple(specs), tuple(arrays)


# ---------------------------------------------------------------------------------------------
# Evaluation (JAX, traceable; int32 everywhere)
# ---------------------------------------------------------------------------------------------


def _round_shift(x: jax.Array, s: jax.Array) -> jax.Array:
    """round(x / 2^s), halves up, for a scalar s ≥ 0, without forming x + 2^(s−1)."""
    v = x >> jnp.maximum(s - 1, 0)
    return jnp.where(s > 0, (v + 1) >> 1, x)


def _requantize(a: jax.Array, m: jax.Array, t: jax.Array) -> jax.Array:
    """clip(round(a · m / 2^t), ±ACT_LIMIT), halves up, exactly, in int32: |a| < 2^31,
    0 ≤ m < 2^15 and 1 ≤ t ≤ 45 per channel (broadcast over the last axis).
    With a = 2^16·ah + al (0 ≤ al < 2^16): a·m = 2^16·P + Q, P = ah·m (|P| < 2^30) and
    Q = al·m ∈ [0, 2^31)."""
    limit = ACT_LIMIT
    p = (a >> 16) * m
    q = (a & 0xFFFF) * m
    # t ≥ 16: round(a·m / 2^t) = (P + H_hi + ((Q + H_lo) >> 16)) >> (t − 16), H = 2^(t−1).
    h_hi = jnp.where(t >= 17, jnp.left_shift(1, jnp.clip(t - 17, 0, 28)), 0)
    h_lo = jnp.where(t == 16, 1 << 15, 0)
    wide = (p + h_hi + ((q + h_lo) >> 16)) >> jnp.clip(t - 16, 0, 29)
    # 1 ≤ t < 16: P·2^u + round(Q / 2^t) with u = 16 − t, saturating where P·2^u alone
    # settles the result: P·2^u ≥ 2^28, or P·2^u ≤ −(2^30 + 2^28) while round(Q/2^t) ≤ 2^30.
    tn = jnp.clip(t, 1, 15)
    u = 16 - tn
    r = (q + jnp.left_shift(1, tn - 1)) >> tn
    narrow = jnp.where(
        p >= (limit >> u),
        limit,
        jnp.where(p <= -(((1 << 30) + limit) >> u), -limit, jnp.left_shift(p, u) + r),
    )
    return jnp.clip(jnp.where(t >= 16, wide, narrow), -limit, limit)


def _transpose_pads(k: int, s: int) -> tuple[int, int]:
    # lax.conv_transpose with padding='SAME'.
    pad_len = k + s - 2
    pad_a = k - 1 if s > k - 1 else -(-pad_len // 2)
    return pad_a, pad_len - pad_a


def _conv(x: jax.Array, p: dict, stride: int, transpose: bool) -> jax.Array:
    """x int32 [B, H, W, Cin] → int32 [B, Ho, Wo, Cout]; one input shift per image."""
    w = jnp.asarray(p["kernel"])
    kh, kw, cin, cout = w.shape
    b = x.shape[0]
    mx = jnp.max(jnp.abs(x).reshape(b, -1), axis=1, initial=0)
    s = jnp.maximum(32 - lax.clz(mx) - INPUT_BITS, 0)[:, None, None, None]
    xs = jnp.clip(_round_shift(x, s), -(1 << INPUT_BITS), (1 << INPUT_BITS) - 1)
    limbs = jnp.concatenate([xs >> LIMB_BITS, xs & ((1 << LIMB_BITS) - 1)]).astype(jnp.int8)
    if kh == kw == 1 and stride == 1:  # a matrix product (also for a 1×1 "transpose")
        acc = lax.dot_general(
            limbs.reshape(-1, cin),
            w.reshape(cin, cout),
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        ).reshape(*limbs.shape[:3], cout)
    else:
        if transpose:
            kw_ = dict(
                window_strides=(1, 1),
                padding=(_transpose_pads(kh, stride), _transpose_pads(kw, stride)),
                lhs_dilation=(stride, stride),
            )
        else:
            kw_ = dict(window_strides=(stride, stride), padding="SAME")
        acc = lax.conv_general_dilated(
            limbs,
            w,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.int32,
            **kw_,
        )
    acc = (acc[:b] << LIMB_BITS) + acc[b:]  # = Σ W·x', |·| ≤ 2^14·Σ|W| < 2^31
    out = _requantize(acc, jnp.asarray(p["mult"]), jnp.asarray(p["rshift"]) - s)
    return jnp.clip(out + jnp.asarray(p["bias"]), -ACT_LIMIT, ACT_LIMIT)


def _leaky(x: jax.Array, slope: int) -> jax.Array:
    """x ≥ 0: x, else floor(x · slope / 2^16), exactly: x = 2^16·q + 256·rh + rl."""
    q, r = x >> 16, x & 0xFFFF
    neg = q * slope + (((r >> 8) * slope + (((r & 0xFF) * slope) >> 8)) >> 8)
    return jnp.where(x >= 0, x, neg)


def _gelu(x: jax.Array, table: jax.Array) -> jax.Array:
    """Linear interpolation of the stored GELU table between knots, halves rounded up."""
    step_bits = ACT_BITS - GELU_KNOT_BITS  # grid units between knots (a power of two)
    lo = -(GELU_RANGE << ACT_BITS)
    u = jnp.clip(x, lo, -lo) - lo
    k = jnp.minimum(u >> step_bits, table.shape[0] - 2)
    r = u - (k << step_bits)
    t0, t1 = table[k], table[k + 1]
    out = t0 + (((t1 - t0) * r + (1 << (step_bits - 1))) >> step_bits)
    return jnp.where(x > -lo, x, jnp.where(x < lo, 0, out))


def _shuffle(x: jax.Array, b: int, torch_order: bool) -> jax.Array:
    n, h, w, c = x.shape
    if torch_order:
        x = x.reshape(n, h, w, c // (b * b), b, b).transpose(0, 1, 4, 2, 5, 3)
    else:
        x = x.reshape(n, h, w, b, b, c // (b * b)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * b, w * b, c // (b * b))


def _apply(spec: tuple, arrays: tuple, x: jax.Array) -> jax.Array:
    for layer, arr in zip(spec, arrays, strict=True):
        kind = layer[0]
        if kind in ("conv", "deconv"):
            x = _conv(x, arr, layer[1], kind == "deconv")
        elif kind == "leaky_relu":
            x = _leaky(x, layer[1])
        elif kind == "relu":
            x = jnp.maximum(x, 0)
        elif kind == "gelu":
            x = _gelu(x, jnp.asarray(arr))
        elif kind in ("depth_to_space", "pixel_shuffle"):
            x = _shuffle(x, layer[1], kind == "pixel_shuffle")
        elif kind == "residual":
            main = _apply(layer[1], arr[0], x)
            skip = _apply(layer[2], arr[1], x) if layer[2] is not None else x
            x = jnp.clip(main + skip, -ACT_LIMIT, ACT_LIMIT)
    return x


def apply(spec: tuple, arrays: tuple, x: jax.Array) -> jax.Array:
    """Evaluates a prepared network on integer images x [B, H, W, C] (the 2^-12 grid, any
    integer dtype; saturated to ±ACT_LIMIT) → int32. Traceable: call it inside jit."""
    x = jnp.clip(x, -ACT_LIMIT, ACT_LIMIT).astype(jnp.int32)
    return _apply(spec, arrays, x)


_jit_apply = jax.jit(apply, static_argnums=0)


def run(net: dict[str, dict], x_q: np.ndarray) -> np.ndarray:
    """Evaluates a stored network on one image x_q [H, W, C] (integers) → int64 numpy (a
    convenience for tests and tools; coding calls `apply` inside its own jitted steps)."""
    spec, arrays = prepare(net)
    x = np.clip(np.asarray(x_q, np.int64), -ACT_LIMIT, ACT_LIMIT).astype(np.int32)
    return np.asarray(_jit_apply(spec, arrays, x[None]))[0].astype(np.int64)
