"""Deterministic fixed-point evaluation of the entropy-parameter networks (h_s, context models).

Why: XLA's float convolutions may change their summation order with batch size, thread count
or CPU, and a one-ulp change of a predicted scale can pick another CDF table and desynchronise
the decoder. Here activations live on a 2^-ACT_BITS grid and weights on a 2^-WEIGHT_BITS grid,
stored as integers with the entropy tables. Products and sums are then integers held exactly
in float64, so BLAS may add them in any order and every machine gets bit-identical outputs
(the idea of Ballé et al. 2019, "Integer networks", applied after training). Exactness needs
every partial sum below 2^53 whatever the order: each convolution checks the bound
max|x| · max_out Σ|w| + max|b| before it runs, and export refuses weights that do not fit.
Convolutions run in bands of output rows, so memory follows the band, not the image.

A network is a list of layers, each a dict of numpy arrays with `kind` one of
`conv` / `deconv` (Flax `Conv` / `ConvTranspose` with SAME padding), `leaky_relu` (slope
0.01 unless the layer stores its own), `relu`, `gelu` (a stored integer table, interpolated),
`depth_to_space` (pixel shuffle, as in `jaxcodec.nn.transforms.SubpixelConv`),
`pixel_shuffle` (torch's channel order, as in `jaxcodec.nn.transforms.pixel_shuffle`) and
`residual` (two sub-networks whose outputs add; no `skip` is the identity).
Inputs are single images [H, W, C] of integers (grid 2^-ACT_BITS).
"""

from typing import Any

import numpy as np

ACT_BITS = 12
WEIGHT_BITS = 14
LEAKY_SLOPE = 0.01  # flax.linen.leaky_relu's default
_SLOPE_BITS = 16
_EXACT_LIMIT = float(2**53)  # float64 holds every integer below this exactly
_BAND_BYTES = 32 << 20  # im2col memory per band of output rows

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
    """An accumulator left the range where float64 holds integers exactly."""


def to_fixed(x: np.ndarray, bits: int = ACT_BITS) -> np.ndarray:
    """float → integer grid (as int64); deterministic (IEEE multiply by 2^bits, then round)."""
    return np.round(np.asarray(x, np.float64) * (1 << bits)).astype(np.int64)


def from_fixed(q: np.ndarray, bits: int = ACT_BITS) -> np.ndarray:
    return np.asarray(q, np.float64) / (1 << bits)


def conv_layer(kernel: np.ndarray, bias: np.ndarray, stride: int, transpose: bool = False):
    """Quantises a Flax Conv/ConvTranspose kernel [kh, kw, cin, cout] and bias [cout]."""
    kernel = np.asarray(kernel, np.float64)
    bias = np.asarray(bias, np.float64)
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
        raise FixedPointOverflow("non-finite weights cannot be quantised")
    if np.abs(kernel).max(initial=0.0) * (1 << WEIGHT_BITS) >= 2**31 - 1:
        raise FixedPointOverflow(
            f"kernel weight {np.abs(kernel).max():.4g} does not fit int32 at 2^-{WEIGHT_BITS}"
        )
    if np.abs(bias).max(initial=0.0) * 2.0 ** (WEIGHT_BITS + ACT_BITS) >= 2**52:
        raise FixedPointOverflow(f"bias {np.abs(bias).max():.4g} does not fit the fixed-point grid")
    return {
        "kind": np.array(KIND_CODES["deconv" if transpose else "conv"], np.int32),
        "stride": np.array(stride, np.int32),
        "kernel": to_fixed(kernel, WEIGHT_BITS).astype(np.int32),
        "bias": to_fixed(bias, WEIGHT_BITS + ACT_BITS),
    }


def act_layer(kind: str, slope: float | None = None) -> dict[str, np.ndarray]:
    """An activation; `slope` is a leaky ReLU's negative slope (stored on a 2^-16 grid)."""
    if kind == "gelu":
        return gelu_layer()
    layer = {"kind": np.array(KIND_CODES[kind], np.int32)}
    if slope is not None:
        if kind != "leaky_relu":
            raise ValueError(f"only leaky_relu takes a slope, not {kind}")
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
    """Builds a fixed-point network from Flax params following `spec`, a list of
    ('conv' | 'deconv', 'path/to/module', stride), ('depth_to_space', block) and
    ('leaky_relu' | 'relu',) entries. Layers are keyed '000', '001', ... so the pytree keeps
    its order through a checkpoint."""
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


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _transpose_pads(k: int, s: int) -> tuple[int, int]:
    # lax.conv_transpose with padding='SAME'.
    pad_len = k + s - 2
    pad_a = k - 1 if s > k - 1 else int(np.ceil(pad_len / 2))
    return pad_a, pad_len - pad_a


def _correlate(x: np.ndarray, w: np.ndarray, stride: int, pads) -> np.ndarray:
    """x [H, W, Cin] float64 integers, w [kh, kw, Cin, Cout]; cross-correlation like lax.conv,
    in bands of output rows (im2col of one band at a time)."""
    (pt, pb), (pl, pr) = pads
    x = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    kh, kw, cin, cout = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
    win = win[::stride, ::stride]  # [Ho, Wo, Cin, kh, kw], a view
    ho, wo = win.shape[:2]
    w2 = w.reshape(kh * kw * cin, cout)
    out = np.empty((ho, wo, cout), np.float64)
    band = max(1, _BAND_BYTES // max(1, wo * kh * kw * cin * 8))
    for r in range(0, ho, band):
        rows = win[r : r + band].transpose(0, 1, 3, 4, 2)
        cols = np.ascontiguousarray(rows).reshape(-1, kh * kw * cin)
        out[r : r + band] = (cols @ w2).reshape(-1, wo, cout)
    return out


def _check_partial_sums(x: np.ndarray, layer: dict) -> None:
    """Every partial sum of x · w (+ b), in any order, is bounded by max|x| · max_out Σ|w| +
    max|b|; below 2^53 float64 holds all of them exactly."""
    w = np.abs(np.asarray(layer["kernel"], np.float64))
    per_output = w.reshape(-1, w.shape[-1]).sum(axis=0).max(initial=0.0)
    bound = np.abs(x).max(initial=0.0) * per_output
    bound += np.abs(np.asarray(layer["bias"], np.float64)).max(initial=0.0)
    if bound >= _EXACT_LIMIT:
        raise FixedPointOverflow(
            f"fixed-point partial sums may reach {bound:.3g} >= 2^53: not exact in float64"
        )


def _conv(x: np.ndarray, layer: dict, transpose: bool) -> np.ndarray:
    _check_partial_sums(x, layer)
    w = np.asarray(layer["kernel"], np.float64)
    s = int(layer["stride"])
    kh, kw = w.shape[:2]
    if transpose:
        h, wd, c = x.shape
        if s > 1:
            d = np.zeros(((h - 1) * s + 1, (wd - 1) * s + 1, c), np.float64)
            d[::s, ::s] = x
            x = d
        acc = _correlate(x, w, 1, (_transpose_pads(kh, s), _transpose_pads(kw, s)))
    else:
        pads = (_same_pads(x.shape[0], kh, s), _same_pads(x.shape[1], kw, s))
        acc = _correlate(x, w, s, pads)
    acc += np.asarray(layer["bias"], np.float64)
    # Back to the activation grid: round half up, exact on integers held in float64.
    return np.floor(acc * 2.0**-WEIGHT_BITS + 0.5)


def _gelu(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Linear interpolation of the stored GELU table; x and the result are float64 integers."""
    t = np.asarray(table, np.float64)
    step_bits = ACT_BITS - GELU_KNOT_BITS  # grid units between knots (a power of two)
    lo = -float(GELU_RANGE << ACT_BITS)
    u = np.clip(x, lo, -lo) - lo
    k = np.minimum(np.floor(u * 2.0**-step_bits), len(t) - 2).astype(np.int64)
    r = u - k * float(1 << step_bits)
    out = t[k] + np.floor((t[k + 1] - t[k]) * r * 2.0**-step_bits + 0.5)
    return np.where(x > -lo, x, np.where(x < lo, 0.0, out))


def _run(net: dict[str, dict], x: np.ndarray) -> np.ndarray:
    default_slope = float(round(LEAKY_SLOPE * (1 << _SLOPE_BITS)))
    for key in sorted(net):
        layer = net[key]
        kind = _KIND_NAMES[int(layer["kind"])]
        if kind == "conv":
            x = _conv(x, layer, transpose=False)
        elif kind == "deconv":
            x = _conv(x, layer, transpose=True)
        elif kind == "leaky_relu":
            slope = float(layer["slope"]) if "slope" in layer else default_slope
            x = np.where(x >= 0, x, np.floor(x * slope * 2.0**-_SLOPE_BITS))
        elif kind == "relu":
            x = np.maximum(x, 0.0)
        elif kind == "gelu":
            x = _gelu(x, layer["table"])
        elif kind == "depth_to_space":
            b = int(layer["block"])
            h, w, c = x.shape
            x = x.reshape(h, w, b, b, c // (b * b)).transpose(0, 2, 1, 3, 4)
            x = x.reshape(h * b, w * b, c // (b * b))
        elif kind == "pixel_shuffle":
            b = int(layer["block"])
            h, w, c = x.shape
            x = x.reshape(h, w, c // (b * b), b, b).transpose(0, 3, 1, 4, 2)
            x = x.reshape(h * b, w * b, c // (b * b))
        elif kind == "residual":
            main = _run(layer["main"], x)
            x = main + (_run(layer["skip"], x) if "skip" in layer else x)
            if x.size and np.abs(x).max() >= _EXACT_LIMIT:
                raise FixedPointOverflow("residual sum out of the exact float64 range")
    return x


def run(net: dict[str, dict], x_q: np.ndarray) -> np.ndarray:
    """Evaluates a fixed-point network on one image x_q [H, W, C] (integers) → int64."""
    x = np.asarray(x_q, np.float64)
    if x.size and np.abs(x).max() >= 2.0**40:
        raise FixedPointOverflow("fixed-point input out of range")
    return _run(net, x).astype(np.int64)
