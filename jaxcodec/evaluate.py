"""``python -m jaxcodec.evaluate``: rate, distortion, perception and speed of image codecs.

Evaluates trained jaxcodec checkpoints (``--checkpoint WORKDIR ...``, one rate point per
workdir) or classical codecs (``--codec jpeg webp ...``, one rate point per quality) on a
folder of images, following DESIGN §5:

- bpp = 8 x bytes of the complete file / (H x W of the original image);
- metrics on the 8-bit reconstruction at full resolution (padding is the codec's business);
- per-image values averaged over the dataset; per-image rows are kept in the JSON;
- timings of encode / denoise / decode after ``--warmup`` untimed calls (JIT compilation);
- results as CompressAI-style JSON (``name``, ``description``, ``results`` lists), a markdown
  table, one RD plot per metric (published points overlaid with ``--reference``) and, with
  ``--anchor``, BD-rates of every curve against the anchor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from jaxcodec.codec_api import ImageCodec

PER_IMAGE_METRICS = ("psnr", "ms-ssim", "lpips", "lpips-vgg", "dists")
DATASET_METRICS = ("fid", "kid")
ALL_METRICS = PER_IMAGE_METRICS + DATASET_METRICS
DEFAULT_METRICS = ("psnr", "ms-ssim", "lpips", "dists")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
TIMING_KEYS = ("encode", "denoise", "decode")


# ----------------------------------------------------------------------------- images


def clic_preprocess(image: np.ndarray, size: int = 768) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre-crop ``size`` x ``size``."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


PREPROCESS: dict[str, tuple[Callable[[np.ndarray], np.ndarray] | None, str]] = {
    "none": (None, "none: images at their original resolution"),
    "clic": (clic_preprocess, "clic: short side resized to 768 (bicubic), centre crop 768x768"),
}


def load_images(
    data_dir: str, preprocess: str = "none", limit: int | None = None
) -> list[tuple[str, np.ndarray]]:
    """(file name, uint8 HxWx3) for every image in ``data_dir``, sorted by name."""
    from jaxcodec.data.images import read_rgb

    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data {data_dir}: not a directory")
    names = sorted(f for f in os.listdir(data_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if limit is not None:
        names = names[:limit]
    if not names:
        raise FileNotFoundError(f"--data {data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    fn = PREPROCESS[preprocess][0]
    images = []
    for name in names:
        img = read_rgb(os.path.join(data_dir, name))
        images.append((name, fn(img) if fn else img))
    return images


# ----------------------------------------------------------------------------- metrics


class MetricSuite:
    """Computes the chosen metrics; networks are loaded once, on first use."""

    def __init__(self, names: Sequence[str], inception: str | None = None):
        unknown = sorted(set(names) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
        self.per_image = [m for m in PER_IMAGE_METRICS if m in names]
        self.dataset = [m for m in DATASET_METRICS if m in names]
        self._fid = None
        self._ref_features: dict[str, np.ndarray] = {}  # originals: same at every rate point
        if self.dataset:
            from jaxcodec.metrics.fid import PatchFID

            if inception is None:
                raise ValueError(
                    "FID/KID need Inception weights: pass --inception FILE (.npz or .safetensors "
                    "with pytorch-fid's FIDInceptionV3 state-dict names; see jaxcodec.metrics.fid)"
                )
            self._fid = PatchFID(inception)

    def image(self, ref: np.ndarray, rec: np.ndarray) -> dict[str, float]:
        from jaxcodec import metrics as M

        fns = {
            "psnr": lambda a, b: M.psnr(a, b),
            "ms-ssim": lambda a, b: M.ms_ssim(a, b),
            "lpips": lambda a, b: M.lpips(a, b, net="alex"),
            "lpips-vgg": lambda a, b: M.lpips(a, b, net="vgg"),
            "dists": lambda a, b: M.dists(a, b),
        }
        return {m: float(np.asarray(fns[m](ref[None], rec[None]))[0]) for m in self.per_image}

    def patch_features(self, name: str, ref: np.ndarray, rec: np.ndarray) -> np.ndarray | None:
        """Inception features of the reconstruction's patches (the original's are cached)."""
        if self._fid is None:
            return None
        if name not in self._ref_features:
            self._ref_features[name] = self._fid.features([ref])
        return self._fid.features([rec])

    def dataset_metrics(self, names: list[str], rec_features: list[np.ndarray]) -> dict:
        if self._fid is None:
            return {}
        from jaxcodec.metrics.fid import frechet_distance, kernel_inception_distance

        fa = np.concatenate([self._ref_features[n] for n in names])
        fb = np.concatenate(rec_features)
        out = {"fid": frechet_distance(fa, fb), "kid": kernel_inception_distance(fa, fb)[0]}
        return {m: out[m] for m in self.dataset} | {"fid_patches": len(fa)}


# ----------------------------------------------------------------------------- evaluation


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
    except ImportError:  # a plain stderr line per item

        def gen():
            for i, item in enumerate(iterable):
                print(f"\r{desc}: {i + 1}/{total}", end="", file=sys.stderr, flush=True)
                yield item
            print(file=sys.stderr)

        return gen()


def evaluate_point(
    codec: ImageCodec,
    images: list[tuple[str, np.ndarray]],
    suite: MetricSuite,
    warmup: int = 1,
    progress: bool = True,
) -> dict:
    """One rate point: per-image bpp/metrics/timings and their means."""
    for _ in range(warmup):  # compile / cache; never timed
        codec.decompress(codec.compress(images[0][1]))
    rows, rec_features = [], []
    for name, img in _progress(images, len(images), codec.name, progress):
        t0 = time.perf_counter()
        data = codec.compress(img)
        t1 = time.perf_counter()
        enc_timings = dict(getattr(codec, "timings", None) or {})
        rec = codec.decompress(data)
        t2 = time.perf_counter()
        dec_timings = dict(getattr(codec, "timings", None) or {})
        rec = np.asarray(rec)
        if rec.shape != img.shape or rec.dtype != np.uint8:
            raise RuntimeError(
                f"{codec.name} returned {rec.dtype} {rec.shape} for {name} {img.shape}; "
                "a codec must return the uint8 image at the original size"
            )
        h, w = img.shape[:2]
        row = {"image": name, "height": h, "width": w, "bytes": len(data)}
        row["bpp"] = 8.0 * len(data) / (h * w)
        if getattr(codec, "target_bpp", None) is not None:  # a --target-bpp search
            s = codec.last_search
            row |= {"target_bpp": s["target_bpp"], "reached": float(s["reached"])}
            row |= {"quality": s["quality"], "probes": s["probes"]}
        row.update(suite.image(img, rec))
        # A codec may report a breakdown ("denoise", "entropy_s", ...): keep all of it.
        enc = {k.removesuffix("_s"): float(v) for k, v in enc_timings.items()}
        dec = {k.removesuffix("_s"): float(v) for k, v in dec_timings.items()}
        timings = {"encode": enc.pop("encode", t1 - t0), "decode": dec.pop("decode", t2 - t1)}
        timings |= {f"encode_{k}": v for k, v in enc.items()} | dec
        row.update({f"{k}_time": v for k, v in timings.items()})
        rows.append(row)
        if suite.dataset:
            rec_features.append(suite.patch_features(name, img, rec))
    keys = [k for k in rows[0] if k not in ("image", "height", "width")]
    point = {"name": codec.name, **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    point.update(suite.dataset_metrics([r["image"] for r in rows], rec_features))
    point["per_image"] = rows
    return point


def results_document(name: str, description: str, points: list[dict], meta: dict) -> dict:
    """CompressAI's layout: ``results`` maps each quantity to one value per rate point."""
    order = np.argsort([p["bpp"] for p in points])
    points = [points[i] for i in order]
    keys = [k for k in points[0] if k not in ("per_image", "name")]
    return {
        "name": name,
        "description": description,
        "meta": meta,
        "results": {"rate_point": [p["name"] for p in points]}
        | {k: [p.get(k) for p in points] for k in keys},
        "per_image": {p["name"]: p["per_image"] for p in points},
    }


def _hardware() -> str:
    import jax

    dev = jax.devices()[0]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, jax device {dev.platform}:{dev.device_kind}"  # noqa: E501


# ----------------------------------------------------------------------------- reports


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.2f}"


def markdown_table(doc: dict) -> str:
    res = doc["results"]
    cols = [c for c in res if c != "rate_point"]
    lines = [f"### {doc['name']}", "", doc["description"], ""]
    lines.append("| rate point | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for i, rp in enumerate(res["rate_point"]):
        lines.append(f"| {rp} | " + " | ".join(_fmt(res[c][i]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def bd_table(docs: list[dict], anchor: str, metrics: Sequence[str]) -> tuple[str, dict]:
    """BD-rate (%) of every curve against ``anchor`` for each metric (negative = better)."""
    from jaxcodec.metrics.bd_rate import bd_rate

    by_name = {d["name"]: d for d in docs}
    if anchor not in by_name:
        raise ValueError(f"--anchor {anchor}: not among the evaluated curves {sorted(by_name)}")
    a = by_name[anchor]["results"]
    table: dict[str, dict[str, float | str]] = {}
    for d in docs:
        if d["name"] == anchor:
            continue
        t = d["results"]
        row = {}
        for m in metrics:
            if m not in a or m not in t:
                continue
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    v = bd_rate(a["bpp"], a[m], t["bpp"], t[m], metric=m)
                row[m] = f"{v:+.2f}%" + (" (partial overlap)" if caught else "")
            except ValueError as e:
                row[m] = f"n/a ({e})"
        table[d["name"]] = row
    lines = [f"### BD-rate against {anchor} (negative: fewer bits for the same quality)", ""]
    lines.append("| codec | " + " | ".join(metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(row.get(m, "-") for m in metrics) + " |")
    return "\n".join(lines) + "\n", table


def plot_rd(
    docs: list[dict], metrics: Sequence[str], out_dir: str,
    reference: dict[str, dict] | None = None, dataset_label: str = "",
) -> list[str]:  # fmt: skip
    """One PNG per metric: bpp (log axis) against the metric, published points dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from jaxcodec.reference_points import SOURCE_NOTE

    def tick(v, _):  # plain numbers at 1, 2 and 5 x 10^k on the log axis
        mantissa = round(v / 10 ** np.floor(np.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if mantissa in (1, 2, 5) else ""

    ours, theirs = plt.cm.tab10.colors, plt.cm.tab20b.colors
    paths = []
    for m in metrics:
        fig, ax = plt.subplots(figsize=(7.2, 5.2), dpi=120)
        for i, d in enumerate(docs):
            r = d["results"]
            if m in r and all(v is not None for v in r[m]):
                ax.plot(r["bpp"], r[m], "o-", label=d["name"], markersize=4, linewidth=2,
                        color=ours[i % len(ours)])  # fmt: skip
        if reference:
            for j, (method, ref) in enumerate(reference.items()):
                rr = ref["results"]
                if m in rr and "bpp" in rr:
                    pts = [(b, v) for b, v in zip(rr["bpp"], rr[m], strict=True)
                           if np.isfinite(b) and np.isfinite(v)]  # fmt: skip
                    if pts:
                        b, v = zip(*sorted(pts), strict=True)
                        ax.plot(b, v, "x--", label=f"{method} (published)", markersize=4,
                                linewidth=1, color=theirs[(3 * j) % len(theirs)])  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        ax.xaxis.set_minor_formatter(FuncFormatter(tick))
        ax.set_xlabel("bpp")
        ax.set_ylabel(
            m.upper()
            + (" (lower is better)" if m in ("lpips", "lpips-vgg", "dists", "fid", "kid") else "")
        )
        title = f"{m} vs rate" + (f" — {dataset_label}" if dataset_label else "")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        if reference:
            fig.text(0.01, 0.005, f"dashed: {SOURCE_NOTE}", fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, f"rd_{m}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- CLI


def _load_checkpoint_codec(path: str, options: Sequence[str] = ()) -> ImageCodec:
    from jaxcodec.codec import load_codec, parse_options

    return load_codec(path, options=parse_options(options))


def _rate_points(codec, qualities, targets) -> list[ImageCodec]:
    """A rate-conditioned checkpoint's curve: one codec per --quality and per --target-bpp."""
    if not qualities and not targets:
        return [codec]
    from jaxcodec.codec import rate_controlled

    return [rate_controlled(codec, quality=q) for q in qualities or ()] + [
        rate_controlled(codec, target_bpp=t) for t in targets or ()
    ]


def _parse_values(text: str | None) -> list[float] | None:
    if not text:
        return None
    return [float(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    from jaxcodec.baselines import BACKENDS

    p = argparse.ArgumentParser(
        prog="python -m jaxcodec.evaluate", description=__doc__.split("\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="MODEL",
        help="codec bundles or finished training workdirs, one rate point each",
    )
    src.add_argument(
        "--codec",
        nargs="+",
        choices=sorted(BACKENDS),
        help="classical codecs, each swept over its quality range",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="decode setting for every --checkpoint, written in its files (e.g. steps=2, "
        "patch=512); default: the model's own",
    )
    p.add_argument(
        "--quality",
        nargs="+",
        type=float,
        default=None,
        metavar="Q",
        help="rate-conditioned checkpoints: one rate point per quality (0 … 100)",
    )
    p.add_argument(
        "--target-bpp",
        nargs="+",
        type=float,
        default=None,
        metavar="X",
        help="rate-conditioned checkpoints: one rate point per target, every file the largest "
        "of at most X bpp (per-image search results in the JSON)",
    )
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--name", default=None, help="curve name for --checkpoint (default: jaxcodec)")
    p.add_argument(
        "--qualities",
        default=None,
        help="comma-separated sweep values for --codec (quality, or distance for jxl)",
    )
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, from {','.join(ALL_METRICS)} (LPIPS/DISTS are slow on CPU)",
    )
    p.add_argument(
        "--inception", default=None, help="Inception weights for fid/kid (.npz/.safetensors)"
    )
    p.add_argument("--preprocess", choices=sorted(PREPROCESS), default="none")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--warmup", type=int, default=1, help="untimed compress+decompress calls first")
    p.add_argument("--reference", default=None, help="published points (text dump) to overlay")
    p.add_argument("--reference-dataset", default="Kodak", help="sheet of --reference to overlay")
    p.add_argument("--anchor", default=None, help="curve to compute BD-rates against (e.g. jpeg)")
    p.add_argument("--no-progress", action="store_true")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from jaxcodec.compilation_cache import enable_compilation_cache

    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    suite = MetricSuite(metric_names, inception=args.inception)
    images = load_images(args.data, args.preprocess, args.limit)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "data": os.path.abspath(args.data),
        "num_images": len(images),
        "preprocessing": PREPROCESS[args.preprocess][1],
        "metrics_on": "8-bit reconstruction at full resolution",
        "bpp": "8 * file bytes / (H * W) of the (preprocessed) original",
        "timings": f"seconds per image, mean, after {args.warmup} untimed warm-up call(s)",
        "hardware": _hardware(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if suite.dataset:
        meta["fid_protocol"] = "256x256 patches, plus a second pass shifted by 128 (HiFiC)"

    curves: list[tuple[str, str, list[ImageCodec]]] = []
    if args.codec and (args.quality or args.target_bpp):
        raise SystemExit("--quality and --target-bpp are for rate-conditioned --checkpoint models")
    if args.codec:
        from jaxcodec.baselines import BACKENDS, sweep

        values = _parse_values(args.qualities)
        for c in args.codec:
            desc = f"{c} via {'imagecodecs' if c == 'jxl' else 'pillow-heif' if c == 'heic' else 'Pillow'}, {BACKENDS[c].knob} sweep"  # noqa: E501
            curves.append((c, desc, sweep(c, values)))
    else:
        codecs = [
            c
            for w in args.checkpoint
            for c in _rate_points(
                _load_checkpoint_codec(w, args.option), args.quality, args.target_bpp
            )
        ]
        name = args.name or "jaxcodec"
        desc = "jaxcodec checkpoints: " + ", ".join(os.path.abspath(w) for w in args.checkpoint)
        curves.append((name, desc, codecs))

    docs = []
    for name, desc, codecs in curves:
        points = []
        for codec in codecs:
            points.append(evaluate_point(codec, images, suite, args.warmup, not args.no_progress))
            p = points[-1]
            print(f"{codec.name}: bpp {p['bpp']:.4f} " + " ".join(
                f"{m} {p[m]:.4f}" for m in metric_names if m in p), file=sys.stderr)  # fmt: skip
        doc = results_document(name, desc, points, meta)
        docs.append(doc)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(doc, f, indent=2)

    summary = ["# jaxcodec evaluation", "", f"- images: {meta['data']} ({len(images)})",
               f"- preprocessing: {meta['preprocessing']}", f"- hardware: {meta['hardware']}",
               f"- timings: {meta['timings']}", ""]  # fmt: skip
    summary += [markdown_table(d) for d in docs]
    reference = None
    if args.reference:
        from jaxcodec.reference_points import SOURCE_NOTE, parse_reference_points

        sheets = parse_reference_points(args.reference)
        if args.reference_dataset not in sheets:
            raise SystemExit(
                f"--reference-dataset {args.reference_dataset}: not in {sorted(sheets)}"
            )
        reference = sheets[args.reference_dataset]
        summary.append(f"Plots overlay {args.reference_dataset} {SOURCE_NOTE}.\n")
    if args.anchor:
        text, table = bd_table(docs, args.anchor, [m for m in metric_names if m != "kid"])
        summary.append(text)
        with open(os.path.join(args.out, "bd_rate.json"), "w") as f:
            json.dump({"anchor": args.anchor, "bd_rate_percent": table}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(summary))
    plot_rd(docs, metric_names, args.out, reference, args.reference_dataset if reference else "")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
