"""A second, plain implementation of the integer networks' arithmetic (numpy int64, written
from the definitions in `jaxcodec.entropy.fixedpoint`'s docstring, not from its int32 code):
tests compare the device implementation with it bit for bit."""

import numpy as np

from jaxcodec.entropy import fixedpoint as fp

L = fp.ACT_LIMIT


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _correlate(x, w, stride, pads):
    (pt, pb), (pl, pr) = pads
    x = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    kh, kw, cin, cout = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]
    cols = np.ascontiguousarray(win.transpose(0, 1, 3, 4, 2)).reshape(-1, kh * kw * cin)
    return (cols @ w.reshape(-1, cout)).reshape(win.shape[0], win.shape[1], cout)


def _conv(x, p, stride, transpose):
    mx = int(np.abs(x).max(initial=0))
    s = max(0, mx.bit_length() - fp.INPUT_BITS)
    xs = (x + (1 << (s - 1))) // (1 << s) if s else x.copy()
    xs = np.clip(xs, -(1 << fp.INPUT_BITS), (1 << fp.INPUT_BITS) - 1)
    w = np.asarray(p["kernel"], np.int64)
    kh, kw = w.shape[:2]
    if transpose:
        h, wd, c = xs.shape
        d = np.zeros(((h - 1) * stride + 1, (wd - 1) * stride + 1, c), np.int64)
        d[::stride, ::stride] = xs
        acc = _correlate(d, w, 1, (fp._transpose_pads(kh, stride), fp._transpose_pads(kw, stride)))
    else:
        pads = (_same_pads(xs.shape[0], kh, stride), _same_pads(xs.shape[1], kw, stride))
        acc = _correlate(xs, w, stride, pads)
    assert np.abs(acc).max(initial=0) < 2**31  # the bound the export guarantees
    t = np.asarray(p["rshift"], np.int64) - s
    assert t.min() >= 1
    prod = acc * np.asarray(p["mult"], np.int64)  # < 2^46: exact in int64
    out = np.clip((prod + (1 << (t - 1))) >> t, -L, L)
    return np.clip(out + np.asarray(p["bias"], np.int64), -L, L)


def _gelu(x, table):
    step = fp.ACT_BITS - fp.GELU_KNOT_BITS
    lo = -(fp.GELU_RANGE << fp.ACT_BITS)
    u = np.clip(x, lo, -lo) - lo
    k = np.minimum(u >> step, len(table) - 2)
    r = u - (k << step)
    out = table[k] + ((table[k + 1] - table[k]) * r + (1 << (step - 1))) // (1 << step)
    return np.where(x > -lo, x, np.where(x < lo, 0, out))


def _run(spec, arrays, x):
    for layer, arr in zip(spec, arrays, strict=True):
        kind = layer[0]
        if kind in ("conv", "deconv"):
            x = _conv(x, arr, layer[1], kind == "deconv")
        elif kind == "leaky_relu":
            x = np.where(x >= 0, x, (x * layer[1]) // (1 << 16))
        elif kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "gelu":
            x = _gelu(x, np.asarray(arr, np.int64))
        elif kind in ("depth_to_space", "pixel_shuffle"):
            b = layer[1]
            h, w, c = x.shape
            if kind == "pixel_shuffle":
                x = x.reshape(h, w, c // (b * b), b, b).transpose(0, 3, 1, 4, 2)
            else:
                x = x.reshape(h, w, b, b, c // (b * b)).transpose(0, 2, 1, 3, 4)
            x = x.reshape(h * b, w * b, c // (b * b))
        elif kind == "residual":
            main = _run(layer[1], arr[0], x)
            skip = _run(layer[2], arr[1], x) if layer[2] is not None else x
            x = np.clip(main + skip, -L, L)
    return x


def run(net, x_q):
    """Reference evaluation of a stored network on one image [H, W, C] → int64."""
    spec, arrays = fp.prepare(net)
    return _run(spec, arrays, np.clip(np.asarray(x_q, np.int64), -L, L))
