"""One rate-conditioned model against fixed-rate models, and files that hit a target size.

Every point comes from real files (`jaxcodec.evaluate.evaluate_point`: 8 × file bytes / pixels,
metrics on the decoded 8-bit image). For each rate-conditioned model (`--variable NAME=MODEL`):

- its RD curve at `--qualities` and the Bjontegaard delta of the rate (`--metric`: psnr for
  HFD's autoencoder, lpips for RDEIC) against the curve of the fixed-rate models (`--fixed`,
  one rate point each), and whether its curve spans their bpp range;
- `--targets` (default: four bpp inside the first model's measured range): every image
  compressed with `--target-bpp` — the share of files within the target, and within 3 % of it,
  the nearest reachable rate where a target cannot be met, encode time per image with the
  search and without it (one encode at the found quality), and the number of probes;
- every target file decoded again in a fresh process, pixel for pixel against this one.

    python benchmarks/variable_rate.py --data ../shared/data/kodak \\
        --fixed runs/f1 runs/f2 runs/f3 runs/f4 --variable gain=runs/vg affine=runs/va \\
        --metric psnr --out results/variable_rate.json

Prints one JSON line with the headline figures; `--out` gets everything (per image as well).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxcodec.codec import TargetSizeCodec, load_codec  # noqa: E402
from jaxcodec.evaluate import MetricSuite, evaluate_point, load_images  # noqa: E402
from jaxcodec.metrics.bd_rate import bd_rate  # noqa: E402

WITHIN = 0.03  # a target is met when the file is ≤ target and ≥ (1 − WITHIN)·target


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def curve(points: list[dict], metric: str) -> dict:
    return {"bpp": [p["bpp"] for p in points], metric: [p[metric] for p in points]}


def delta(anchor: dict, test: dict, metric: str) -> dict:
    """BD-rate (%) of `test` against `anchor`, with a note on partial overlap."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = bd_rate(anchor["bpp"], anchor[metric], test["bpp"], test[metric], metric=metric)
        return {"bd_rate_percent": value, "note": "; ".join(str(w.message) for w in caught)}
    except ValueError as exc:
        return {"bd_rate_percent": None, "note": str(exc)}


def target_run(codec, images, targets: list[float], files_dir: Path) -> list[dict]:
    """Every image at every target: outcome, timings and the decoded pixels' digest."""
    rows = []
    warm = TargetSizeCodec(codec, targets[0])
    warm.compress(images[0][1])  # compile the probes' programs once, untimed
    codec.at_rate(0).compress(images[0][1])
    for target in targets:
        tc = TargetSizeCodec(codec, target)
        for name, image in images:
            h, w = image.shape[:2]
            t0 = time.perf_counter()
            data = tc.compress(image)
            searched = time.perf_counter() - t0
            s = dict(tc.last_search)
            plain = codec.at_rate(s["rate"])
            t0 = time.perf_counter()
            again = plain.compress(image)
            single = time.perf_counter() - t0
            if again != data:
                raise RuntimeError(f"{name}: the search's file differs from the plain encode")
            stem = f"{Path(name).stem}_{target:g}"
            (files_dir / f"{stem}.jxc").write_bytes(data)
            bpp = 8.0 * len(data) / (h * w)
            rows.append(
                {
                    "image": name,
                    "target_bpp": target,
                    "bpp": bpp,
                    "quality": s["quality"],
                    "probes": s["probes"],
                    "within_target": bpp <= target,
                    "within_3pct": (1.0 - WITHIN) * target <= bpp <= target,
                    "encode_with_search_s": searched,
                    "encode_without_search_s": single,
                    "file": f"{stem}.jxc",
                    "pixels_sha256": _digest(codec.decompress(data)),
                }
            )
    return rows


_FRESH = """
import hashlib, json, sys
import numpy as np
from jaxcodec.codec import load_codec
codec = load_codec(sys.argv[1])
out = {}
for line in sys.stdin:
    name = line.strip()
    pixels = codec.decompress(open(name, "rb").read())
    out[name] = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
print(json.dumps(out))
"""


def fresh_process_check(model: str, files_dir: Path, rows: list[dict]) -> dict:
    """Decodes every file in a new process (one XLA thread) and compares the pixels."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXCODEC_COMPILATION_CACHE="0")
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    names = "\n".join(str(files_dir / r["file"]) for r in rows)
    out = subprocess.run(
        [sys.executable, "-c", _FRESH, model],
        input=names,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    same = sum(fresh[str(files_dir / r["file"])] == r["pixels_sha256"] for r in rows)
    return {"files": len(rows), "identical": same}


def summarise_targets(rows: list[dict], targets: list[float]) -> list[dict]:
    out = []
    for t in targets:
        rs = [r for r in rows if r["target_bpp"] == t]
        out.append(
            {
                "target_bpp": t,
                "files": len(rs),
                "within_target": sum(r["within_target"] for r in rs),
                "within_3pct": sum(r["within_3pct"] for r in rs),
                "bpp_mean": float(np.mean([r["bpp"] for r in rs])),
                "bpp_min": float(np.min([r["bpp"] for r in rs])),
                "gap_percent_max": float(max(100 * (1 - r["bpp"] / t) for r in rs)),
                "over_target": [
                    {"image": r["image"], "bpp": r["bpp"]} for r in rs if not r["within_target"]
                ],
                "encode_with_search_s": float(np.mean([r["encode_with_search_s"] for r in rs])),
                "encode_without_search_s": float(
                    np.mean([r["encode_without_search_s"] for r in rs])
                ),
                "probes_mean": float(np.mean([r["probes"] for r in rs])),
            }
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of evaluation images (e.g. Kodak)")
    p.add_argument("--fixed", nargs="+", required=True, help="fixed-rate models, one rate each")
    p.add_argument("--variable", nargs="+", required=True, metavar="NAME=MODEL")
    p.add_argument("--qualities", nargs="+", type=float, default=[0, 20, 40, 60, 80, 100])
    p.add_argument("--targets", nargs="*", type=float, default=None)
    p.add_argument("--metric", default="psnr", help="psnr | lpips | ms-ssim | dists")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON with every number")
    args = p.parse_args(argv)

    images = load_images(args.data, limit=args.limit)
    suite = MetricSuite(sorted({"psnr", args.metric}))
    result: dict = {"data": os.path.abspath(args.data), "images": len(images)}
    result["metric"] = args.metric
    fixed = []
    for model in args.fixed:
        point = evaluate_point(load_codec(model), images, suite, progress=False)
        fixed.append(point | {"model": model})
        print(f"fixed {model}: bpp {point['bpp']:.4f} {args.metric} {point[args.metric]:.4f}",
              file=sys.stderr)  # fmt: skip
    fixed.sort(key=lambda pt: pt["bpp"])
    anchor = curve(fixed, args.metric)
    result["fixed"] = [{k: v for k, v in pt.items() if k != "per_image"} for pt in fixed]
    headline = {}
    for item in args.variable:
        name, _, model = item.partition("=")
        codec = load_codec(model)
        points = []
        for q in args.qualities:
            pt = evaluate_point(codec.at_quality(q), images, suite, progress=False)
            points.append(pt | {"quality": q})
            print(f"{name} q{q:g}: bpp {pt['bpp']:.4f} {args.metric} {pt[args.metric]:.4f}",
                  file=sys.stderr)  # fmt: skip
        test = curve(points, args.metric)
        spans = min(test["bpp"]) <= min(anchor["bpp"]) and max(test["bpp"]) >= max(anchor["bpp"])
        entry = {
            "model": model,
            "points": [{k: v for k, v in pt.items() if k != "per_image"} for pt in points],
            "against_fixed": delta(anchor, test, args.metric),
            "spans_fixed_range": spans,
            "bpp_range": [min(test["bpp"]), max(test["bpp"])],
        }
        headline[name] = {
            "bd_rate_percent": entry["against_fixed"]["bd_rate_percent"],
            "spans": spans,
        }
        if args.targets is None or args.targets:
            targets = args.targets
            if not targets:  # four targets inside the measured range of the first model
                lo, hi = entry["bpp_range"]
                targets = [round(float(lo + f * (hi - lo)), 4) for f in (0.15, 0.4, 0.65, 0.9)]
            with tempfile.TemporaryDirectory() as tmp:
                rows = target_run(codec, images, targets, Path(tmp))
                entry["fresh_process"] = fresh_process_check(model, Path(tmp), rows)
            entry["targets"] = summarise_targets(rows, targets)
            entry["target_rows"] = rows
            headline[name]["targets"] = [
                {k: t[k] for k in ("target_bpp", "within_target", "within_3pct", "files")}
                | {
                    "enc_s": round(t["encode_with_search_s"], 3),
                    "enc_plain_s": round(t["encode_without_search_s"], 3),
                }
                for t in entry["targets"]
            ]
            headline[name]["fresh_process_identical"] = entry["fresh_process"]
            args.targets = targets  # the same targets for every model
        result[name] = entry
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
