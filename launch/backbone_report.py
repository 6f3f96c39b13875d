"""The comparison `launch/cpu_backbone.sh` ends with: each jaxcodec model beside the classical
codecs' rate points nearest to it in bpp (Kodak, real files), and a side-by-side PNG of one image.

    python launch/backbone_report.py EVAL_DIR --models NAME=WORKDIR ... --image kodim23.png \
        --ldm LDM_WORKDIR

EVAL_DIR holds one `jaxcodec evaluate` output folder per curve (`EVAL_DIR/*/NAME.json`). Writes
EVAL_DIR/nearest_bpp.md (and prints it) and EVAL_DIR/side_by_side.png: the original, each model's
decoding of it, and each classical codec's at the quality nearest to the first model's bpp;
with --ldm, EVAL_DIR/ldm_losses.png: the backbone's training curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

METRICS = ("psnr", "lpips", "dists")


def load_curves(eval_dir: Path) -> dict[str, dict]:
    curves = {}
    for path in sorted(eval_dir.glob("*/*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "results" in doc and "name" in doc:
            curves[doc["name"]] = doc["results"]
    return curves


def points(results: dict) -> list[dict]:
    keys = [k for k in ("rate_point", "bpp", *METRICS) if k in results]
    return [
        dict(zip(keys, row, strict=True)) for row in zip(*(results[k] for k in keys), strict=True)
    ]


def nearest(results: dict, bpp: float) -> dict:
    return min(points(results), key=lambda p: abs(p["bpp"] - bpp))


def table(curves: dict[str, dict], models: list[str]) -> str:
    """Each model's point, then every classical codec's point nearest to it in bpp."""
    metrics = [m for m in METRICS if any(m in r for r in curves.values())]
    head = "| curve | rate point | bpp | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    classical = [n for n in curves if n not in models]
    for name in models:
        for p in points(curves[name]):
            rows = [(name, p)] + [(c, nearest(curves[c], p["bpp"])) for c in classical]
            for curve, q in rows:
                vals = " | ".join(f"{q[m]:.4f}" if q.get(m) is not None else "-" for m in metrics)
                lines.append(f"| {curve} | {q['rate_point']} | {q['bpp']:.4f} | {vals} |")
    return "\n".join(lines) + "\n"


def side_by_side(image_path: Path, models: dict[str, str], curves: dict, out: Path) -> Path:
    """original | each model's decoding | each classical codec nearest the first model's bpp,
    labelled in the order of `out`'s caption file (out with .txt)."""
    from PIL import Image

    from jaxcodec.baselines import BACKENDS, ClassicalCodec
    from jaxcodec.codec import load_codec
    from jaxcodec.data import read_rgb

    image = read_rgb(image_path)
    panels, captions = [image], ["original"]
    first_bpp = None
    for name, workdir in models.items():
        codec = load_codec(workdir)
        data = codec.compress(image)
        bpp = 8.0 * len(data) / (image.shape[0] * image.shape[1])
        first_bpp = bpp if first_bpp is None else first_bpp
        panels.append(codec.decompress(data))
        captions.append(f"{name} {bpp:.4f} bpp")
    for name in (n for n in curves if n not in models and n in BACKENDS):
        best = nearest(curves[name], first_bpp)
        codec = ClassicalCodec(name, float(best["rate_point"].split("-")[-1][1:]))
        data = codec.compress(image)
        panels.append(codec.decompress(data))
        captions.append(f"{codec.name} {8.0 * len(data) / image[..., 0].size:.4f} bpp")
    Image.fromarray(np.concatenate(panels, axis=1)).save(out)
    out.with_suffix(".txt").write_text(" | ".join(captions) + "\n")
    return out


def loss_curves(ldm_workdir: Path, out: Path) -> Path:
    """The backbone's training curves from its stages' summary.json: the autoencoder's L1 and
    LPIPS, the latent UNet's ε-MSE (log scale: it starts at about 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, stage, keys in ((axes[0], 1, ("rec", "lpips")), (axes[1], 2, ("eps_mse",))):
        history = json.loads((ldm_workdir / f"stage{stage}" / "summary.json").read_text())[
            "history"
        ]
        for k in keys:
            ax.plot([h["step"] for h in history], [h[k] for h in history], label=k)
        ax.set(xlabel="step", title=f"stage {stage}", yscale="log" if stage == 2 else "linear")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("eval_dir", type=Path)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=WORKDIR")
    p.add_argument("--image", type=Path, default=None, help="image for the side-by-side PNG")
    p.add_argument("--ldm", type=Path, default=None, help="the backbone's workdir: loss curves")
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    curves = load_curves(args.eval_dir)
    missing = [m for m in models if m not in curves]
    if missing:
        raise SystemExit(f"no evaluation of {missing} under {args.eval_dir}")
    text = "# Kodak, real files: each model beside the classical rate points nearest in bpp\n\n"
    text += table(curves, list(models))
    (args.eval_dir / "nearest_bpp.md").write_text(text)
    print(text)
    if args.ldm is not None:
        print(f"backbone loss curves: {loss_curves(args.ldm, args.eval_dir / 'ldm_losses.png')}")
    if args.image is not None:
        out = side_by_side(args.image, models, curves, args.eval_dir / "side_by_side.png")
        print(f"side by side ({out.with_suffix('.txt').read_text().strip()}): {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
