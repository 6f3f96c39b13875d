"""Deterministic fixed-point evaluation of the entropy-parameter networks (h_s, context models).

Why: XLA's float convolutions may change their summation order with batch size, thread count
or CPU, and a one-ulp change of a predicted scale can pick another CDF table and desynchronise
the decoder. Here activations live on a 2^-ACT_BITS grid and weights on a 2^-WEIGHT_BITS grid,
stored as integers with the entropy tables. Products and sums are then integers held exactly
in float64 (checked to stay below 2^52), so BLAS may add them in any order and every machine
gets bit-identical outputs (the idea of Ballé et al. 2019, "Integer networks", applied after
training).

A network is a list of layers, each a dict of numpy arrays with `kind` one of
`conv` / `deconv` (Flax `Conv` / `ConvTranspose` with SAME padding), `leaky_relu`, `relu`,
`depth_to_space` (pixel shuffle, as in `jaxcodec.nn.transforms.SubpixelConv`).
Inputs are single images [H, W, C] of integers (grid 2^-ACT_BITS).
"""

from typing import Any

import numpy as np

ACT_BITS = 12
WEIGHT_BITS = 14
LEAKY_SLOPE = 0.01  # flax.linen.leaky_relu's default
_SLOPE_BITS = 16
_EXACT_LIMIT = float(2**52)

KIND_CODES = {"conv": 0, "deconv": 1, "leaky_relu": 2, "relu": 3, "depth_to_space": 4}
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
    return {
        "kind": np.array(KIND_CODES["deconv" if transpose else "conv"], np.int32),
        "stride": np.array(stride, np.int32),
        "kernel": to_fixed(kernel, WEIGHT_BITS).astype(np.int32),
        "bias": to_fixed(bias, WEIGHT_BITS + ACT_BITS),
    }


def act_layer(kind: str) -> dict[str, np.ndarray]:
    return {"kind": np.array(KIND_CODES[kind], np.int32)}


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
    """x [H, W, Cin] float64 integers, w [kh, kw, Cin, Cout]; cross-correlation like lax.conv."""
    (pt, pb), (pl, pr) = pads
    x = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    kh, kw, cin, cout = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
    win = win[::stride, ::stride]  # [Ho, Wo, Cin, kh, kw]
    ho, wo = win.shape[:2]
    cols = np.ascontiguousarray(win.transpose(0, 1, 3, 4, 2)).reshape(ho * wo, kh * kw * cin)
    return (cols @ w.reshape(kh * kw * cin, cout)).reshape(ho, wo, cout)


def _conv(x: np.ndarray, layer: dict, transpose: bool) -> np.ndarray:
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
    acc = acc + np.asarray(layer["bias"], np.float64)
    if acc.size and np.abs(acc).max() >= _EXACT_LIMIT:
        raise FixedPointOverflow("fixed-point accumulator overflow")
    # Back to the activation grid: round half up, exact on integers held in float64.
    return np.floor(acc * 2.0**-WEIGHT_BITS + 0.5)


def run(net: dict[str, dict], x_q: np.ndarray) -> np.ndarray:
    """Evaluates a fixed-point network on one image x_q [H, W, C] (integers) → int64."""
    x = np.asarray(x_q, np.float64)
    if x.size and np.abs(x).max() >= 2.0**40:
        raise FixedPointOverflow("fixed-point input out of range")
    slope = float(round(LEAKY_SLOPE * (1 << _SLOPE_BITS)))
    for key in sorted(net):
        layer = net[key]
        kind = _KIND_NAMES[int(layer["kind"])]
        if kind == "conv":
            x = _conv(x, layer, transpose=False)
        elif kind == "deconv":
            x = _conv(x, layer, transpose=True)
        elif kind == "leaky_relu":
            x = np.where(x >= 0, x, np.floor(x * slope * 2.0**-_SLOPE_BITS))
        elif kind == "relu":
            x = np.maximum(x, 0.0)
        elif kind == "depth_to_space":
            b = int(layer["block"])
            h, w, c = x.shape
            x = x.reshape(h, w, b, b, c // (b * b)).transpose(0, 2, 1, 3, 4)
            x = x.reshape(h * b, w * b, c // (b * b))
    return x.astype(np.int64)
