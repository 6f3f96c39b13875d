"""Entropy-coding speed on this CPU, for Kodak-size latents (768×512 image → y 48×32×M).

Part 1 (coding only): range encode/decode of y and z with the integer tables, in the ELIC
coding order (channel groups × checkerboard passes), on symbols drawn from the tables' own
Gaussians with a trained-model-like spread of scales (mostly small). Reports ms per image and
symbols/s against the targets (≤ 30 ms encode, ≤ 60 ms decode).
Part 2: a full-size ELIC-style model (N=192, M=320; random weights — speed does not depend on
training) compresses and decompresses a Kodak image through the real file path; reports the
decode-time breakdown: range coding (target < 5 % of the decode) and the entropy-parameter path
(h_s and the context networks as integer programs on the device, target ≤ 0.1 s).

    .venv/bin/python benchmarks/entropy_coding.py [--image kodim01.png] [--repeats 5]

Ends with one JSON line of headline figures.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxcodec.entropy import coder, context, tables  # noqa: E402
from jaxcodec.nn.hyperprior import gaussian_entropy_tables  # noqa: E402
from jaxcodec.train_shapes import jit_init  # noqa: E402


def synthetic_latents(rng, h=32, w=48, m=320, n=192):
    y_tab = gaussian_entropy_tables()
    # Trained models put most elements at small scales: log σ ~ N(log 0.25, 1.2).
    sigma = np.exp(rng.normal(np.log(0.25), 1.2, (h, w, m)))
    q = np.round(sigma * 4096).astype(np.int64)
    y_idx = tables.scale_index(q, y_tab["thresholds"])
    y_sym = np.round(rng.normal(size=(h, w, m)) * y_tab["scales"][y_idx]).astype(np.int64)
    # z: per-channel discretised Gaussians of scale ~1.5 as factorized tables.
    z_scales = rng.uniform(0.5, 3.0, n)
    ks = np.arange(-12, 13)
    from scipy.special import ndtr

    freqs = np.stack(
        [
            tables.pmf_to_freqs(ndtr((ks + 0.5) / s) - ndtr((ks - 0.5) / s), 2 * ndtr(-12.5 / s))
            for s in z_scales
        ]
    )
    z_tab = {
        "freqs": freqs.astype(np.int32),
        "lengths": np.full(n, len(ks), np.int32),
        "offsets": np.full(n, ks[0], np.int32),
    }
    z_sym = np.round(rng.normal(size=(h // 4, w // 4, n)) * z_scales).astype(np.int64)
    return y_tab, y_sym, y_idx, z_tab, z_sym


def coding_only(repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y_tab, y_sym, y_idx, z_tab, z_sym = synthetic_latents(rng)
    groups = context.channel_groups(320)
    starts = np.concatenate([[0], np.cumsum(groups)])
    anchors = context.anchor_mask(*y_sym.shape[:2])
    passes = [
        (pos, slice(starts[k], starts[k + 1]))
        for k in range(len(groups))
        for pos in (anchors, ~anchors)
    ]
    z_idx = np.broadcast_to(np.arange(z_sym.shape[-1]), z_sym.shape)
    yc, zc = coder.TableCoder(y_tab), coder.TableCoder(z_tab)
    # The per-pass symbol gathers belong to the context model, not to coding: done up front.
    pass_sym = [y_sym[pos][:, sl] for pos, sl in passes]
    pass_idx = [y_idx[pos][:, sl] for pos, sl in passes]
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ez, ey = coder.new_encoder(), coder.new_encoder()
        zc.encode(ez, z_sym, z_idx)
        for sym, idx in zip(pass_sym, pass_idx, strict=True):
            yc.encode(ey, sym, idx)
        zs, ys = coder.finish(ez), coder.finish(ey)
        t1 = time.perf_counter()
        dz, dy = coder.new_decoder(zs), coder.new_decoder(ys)
        z_out = zc.decode(dz, z_idx)
        outs = [yc.decode(dy, idx) for idx in pass_idx]
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    y_out = np.zeros_like(y_sym)
    for (pos, sl), out, idx in zip(passes, outs, pass_idx, strict=True):
        y_out[pos, sl] = out.reshape(idx.shape)
    assert np.array_equal(y_out, y_sym) and np.array_equal(z_out.reshape(z_sym.shape), z_sym)
    n_sym = y_sym.size + z_sym.size
    ideal = tables.table_bits(y_tab, y_sym, y_idx) + tables.table_bits(z_tab, z_sym, z_idx)
    enc_ms, dec_ms = 1e3 * np.min(enc_t), 1e3 * np.min(dec_t)  # least disturbed run
    return {
        "symbols": int(n_sym),
        "encode_ms": float(enc_ms),
        "decode_ms": float(dec_ms),
        "encode_ms_median": float(1e3 * np.median(enc_t)),
        "decode_ms_median": float(1e3 * np.median(dec_t)),
        "encode_msym_per_s": float(n_sym / enc_ms / 1e3),
        "decode_msym_per_s": float(n_sym / dec_ms / 1e3),
        "bytes": len(ys) + len(zs),
        "overhead_pct_vs_ideal": float(100 * ((len(ys) + len(zs)) * 8 / ideal - 1)),
    }


def load_image(path: str | None) -> np.ndarray:
    from jaxcodec.data import read_rgb

    candidates = [path] if path else [str(ROOT.parent / "shared/data/kodak/kodim01.png")]
    for c in candidates:
        if c and Path(c).is_file():
            return read_rgb(c)
    from skimage import data

    return np.tile(data.astronaut(), (1, 2, 1))[:512, :768]


def elic_decode_breakdown(image: np.ndarray, repeats: int) -> dict:
    import importlib.util

    import jax

    from jaxcodec.codec import load_codec, save_codec
    from jaxcodec.methods import get_method

    spec = importlib.util.spec_from_file_location("hfd_config", ROOT / "configs" / "hfd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("full")
    config.model.entropy_model = "elic"
    config.data.crop_size = 64
    method = get_method(config)
    params = jit_init(method.init, jax.random.key(0), method.dummy_batch(1))
    with tempfile.TemporaryDirectory() as tmp:
        save_codec(tmp, config, params["params"], step=1)
        codec = load_codec(tmp)
    data = codec.compress(image)
    codec.decompress(data)  # JIT warm-up
    rows = []
    for _ in range(repeats):
        codec.compress(image)
        enc = dict(codec.timings)
        codec.decompress(data)
        rows.append((enc, dict(codec.timings)))
    med = lambda key, i: float(np.median([r[i][key] for r in rows]))  # noqa: E731
    out = {
        "encode_s": med("encode", 0),
        "decode_s": med("decode", 1),
        "decode_host_entropy_s": med("entropy_s", 1),
        "decode_coding_s": med("coding_s", 1),
        "decode_synthesis_s": med("synthesis_s", 1),
        "encode_coding_s": med("coding_s", 0),
    }
    out["coding_share_of_decode_pct"] = 100 * out["decode_coding_s"] / out["decode_s"]
    # Everything of entropy decoding but y's range coding: z, h_s and the context passes
    # (integer networks on the device), the transfers of indices and symbols.
    out["decode_entropy_params_s"] = out["decode_host_entropy_s"] - out["decode_coding_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-model", action="store_true", help="coding-only part only")
    args = p.parse_args()
    part1 = coding_only(args.repeats)
    print(
        f"coding only (y 48x32x320 + z 12x8x192 = {part1['symbols']} symbols): "
        f"encode {part1['encode_ms']:.1f} ms (target ≤ 30), decode {part1['decode_ms']:.1f} ms "
        f"(target ≤ 60); {part1['decode_msym_per_s']:.1f} Msymbols/s decoding; "
        f"file overhead vs −log2 p: {part1['overhead_pct_vs_ideal']:.3f} %"
    )
    headline = {"benchmark": "entropy_coding", **{f"coding_{k}": v for k, v in part1.items()}}
    if not args.skip_model:
        part2 = elic_decode_breakdown(load_image(args.image), args.repeats)
        print(
            f"ELIC-style full model (random weights), 768x512: decode {part2['decode_s']:.2f} s "
            f"= entropy decoding {part2['decode_host_entropy_s']:.3f} s (range coding "
            f"{1e3 * part2['decode_coding_s']:.1f} ms, entropy parameters and z "
            f"{part2['decode_entropy_params_s']:.3f} s, target ≤ 0.1) + synthesis "
            f"{part2['decode_synthesis_s']:.2f} s; coding share "
            f"{part2['coding_share_of_decode_pct']:.2f} % (target < 5 %)"
        )
        headline |= {f"elic_{k}": v for k, v in part2.items()}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
