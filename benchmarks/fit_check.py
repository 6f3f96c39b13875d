"""Memorisation ("fit") check of a method's generative decoder.

A diffusion decoder without a bug in its chain (schedule, parameterisation read the same way by
training and sampler, conditioning wired to the right input, EMA weights used, clipping) can at
least reproduce the images it was trained on. This script trains a method's stages on a small
fixed set (`--crops` crops of `--size`² from the training photos, chosen by `--seed`) for a
fixed step budget, then compresses and decompresses those same crops through the real codec
path (`jaxcodec compress` / `decompress` on real `.jxc` files) and prints, per reconstruction
(first stage / base, generative decode): bpp from the file sizes, PSNR, LPIPS (AlexNet), DISTS,
and writes a side-by-side PNG (original | each reconstruction, one row per crop).

Expected: the last stage's generative decode beats the base reconstruction it refines (decoded
from the same file, so at the same bpp) in LPIPS and DISTS on its own training crops; the exit
status is 0 when it does. An earlier stage's generative rows (RDEIC's stage 1, trained on the
ε-loss alone, before the stage that trains through the sampler) are reported beside it.

    PYTHONPATH=. python benchmarks/fit_check.py --method hfd --out runs/fit_hfd
    PYTHONPATH=. python benchmarks/fit_check.py --method rdeic --backbone SD_FOLDER --out ...

`--steps1` / `--steps2` override the per-method step budgets (sized for ≤ 15 minutes per method
on 2 CPU cores); the budget is printed before training. Re-running with the same `--out` resumes
or reuses the trained stages.

Methods plug in through `FIT_CHECKS`: a `FitCheck` names the configs of its stages (trained in
order, stage N from stage N − 1) and, per real file, the reconstructions to compare: `(label,
role, image)` rows, where role is 'base' (what the generative stage refines) or 'generative'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
DEFAULT_PHOTOS = PHOTOS if PHOTOS.is_dir() else Path("/work/shared/data/photos")


# ---------------------------------------------------------------------------------------------
# The fixed training set
# ---------------------------------------------------------------------------------------------


def make_crops(photos: Path, out: Path, *, num: int, size: int, seed: int) -> list[Path]:
    """`num` crops of size² from `num` different photos in `photos` (sorted, chosen by `seed`),
    written as PNG into `out`: a folder the data pipeline reads without cropping or flipping."""
    from PIL import Image

    from jaxcodec.data import read_rgb

    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < num:
        raise ValueError(f"{photos} has {len(files)} photos, fewer than --crops={num}")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, k in enumerate(sorted(rng.choice(len(files), num, replace=False))):
        image = read_rgb(files[k])
        h, w = image.shape[:2]
        if min(h, w) < size:
            raise ValueError(f"{files[k]} ({w}x{h}) is smaller than --size={size}")
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        path = out / f"crop{i}_{files[k].stem}.png"
        Image.fromarray(image[top : top + size, left : left + size]).save(path)
        paths.append(path)
    return paths


def data_overrides(crops: Path, size: int, batch: int) -> list[str]:
    """Every training batch is the whole crop set, uncropped and unflipped; evaluation too."""
    return [
        "data.source=folder",
        f"data.path={crops}",
        f"data.crop_size={size}",
        "data.random_flip=False",
        f"batch_size={batch}",
        "eval_data.source=folder",
        f"eval_data.path={crops}",
        f"eval_data.max_images={batch}",
        "eval_every=0",
        "real_file_eval=False",  # the check's own real files follow
        "mesh.num_devices=1",
    ]


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

Row = tuple[str, str, np.ndarray]  # (label, 'base' | 'generative', reconstruction)


@dataclasses.dataclass
class FitCheck:
    """A method's check: its stages' configs and the reconstructions of one real file.

    `configs(args, crops)` → `[(stage name, config)]`, trained in order into OUT/<stage name>,
    each stage after the first starting from the one before (`init_from`); a config with
    `stages` set is trained by `train_stages` into OUT/stageN itself.
    `rows(stage, codec, data, decoded, original)` → the rows one stage's real file yields:
    `(label, role, uint8 image)`, role 'base' (what the generative decode refines, from the
    same file), 'generative', 'ceiling' (the frozen decoder's best from the original: not a
    decode of the file) or 'other'.
    """

    configs: Callable[[argparse.Namespace, Path], list[tuple[str, object]]]
    rows: Callable[[str, object, bytes, np.ndarray, np.ndarray], list[Row]]
    steps: tuple[int, int]  # default step budgets of the first and second stage
    size: int = 128  # default crop side: with `steps`, ≤ 15 minutes on 2 CPU cores


def _hfd_configs(args, crops):
    from jaxcodec.configlib import load_config

    overrides = [
        *data_overrides(crops, args.size, args.crops),
        f"total_steps={args.steps1}",
        f"stage2.total_steps={args.steps2}",
        f"stage2.batch_size={args.crops}",
        f"stage2.data.crop_size={args.size}",
        f"decode.patch={args.size}",  # the crop is one patch: no patch groups at decode
        "log_every=50",
        "checkpoint_every=1000000",
        *args.set,
    ]
    config = load_config("configs/hfd.py:tiny", overrides)
    return [("stage1", config)]  # one command: train_stages trains stage1 and stage2 under it


def _hfd_rows(stage, codec, data, decoded, original):
    if stage == "stage1":
        return [("stage 1: MSE autoencoder", "base", decoded)]
    recon = codec.last_info["stage1_reconstruction"][: decoded.shape[0], : decoded.shape[1]]
    return [
        ("stage 2's file, stage-1 decode", "base", recon),
        ("stage 2: score decoder", "generative", decoded),
    ]


def _diffo_configs(args, crops):
    from jaxcodec.configlib import load_config

    common = [
        *data_overrides(crops, args.size, args.crops),
        "log_every=50",
        "checkpoint_every=1000000",
        *args.set,
    ]
    return [
        (
            "stage1",
            load_config("configs/diffo.py:tiny,stage=1", [*common, f"total_steps={args.steps1}"]),
        ),
        (
            "stage2",
            load_config("configs/diffo.py:tiny,stage=2", [*common, f"total_steps={args.steps2}"]),
        ),
    ]


def _diffo_rows(stage, codec, data, decoded, original):
    """Stage 1's VQGAN codes its own indices; stage 2's file also yields its base
    reconstruction, the frozen VQGAN decoder on z_base (what the one step refines), and the
    VQGAN's unquantised reconstruction of the original (the ceiling of any stage-2 decode)."""
    import jax.numpy as jnp

    from jaxcodec.methods.base import to_uint8

    m = codec.method
    if stage == "stage1":
        return [("stage 1: VQGAN (own indices)", "other", decoded)]
    idx = codec.last_info["indices"]
    window = np.zeros((1, *idx.shape[:2], m.num_rates), np.float32)
    window[0, ..., : idx.shape[-1]] = idx
    v = codec.variables
    z_q = m.code(jnp.asarray(m.codebooks(codec.tables)), jnp.asarray(window), idx.shape[-1])
    z_base = m.model.apply({"params": v.params}, z_q, method="base_latent")
    x = m.vqgan.apply({"params": v.frozen["vqgan"]}, z_base, method="decode")
    base = np.asarray(to_uint8((x + 1.0) / 2.0))[0]
    x0 = jnp.asarray(original, jnp.float32)[None] / 127.5 - 1.0
    z0 = m.vqgan.apply({"params": v.frozen["vqgan"]}, x0, method="encode")
    ceiling = m.vqgan.apply({"params": v.frozen["vqgan"]}, z0, method="decode")
    return [
        ("stage 2's file, VQGAN(z_base)", "base", base[: decoded.shape[0], : decoded.shape[1]]),
        ("stage 2: one-step residual shifting", "generative", decoded),
        ("VQGAN(z_0) of the original", "ceiling", np.asarray(to_uint8((ceiling + 1.0) / 2.0))[0]),
    ]


def _rdeic_configs(args, crops):
    from jaxcodec.configlib import load_config

    if args.backbone is None:
        raise SystemExit(
            "RDEIC needs --backbone: a diffusers SD-shaped folder whose VAE reconstructs (a "
            "random VAE decoder can reproduce nothing)"
        )
    common = [
        *data_overrides(crops, args.size, args.crops),
        f"model.sd_path={args.backbone}",
        "log_every=50",
        "checkpoint_every=1000000",
        *args.set,
    ]
    return [
        (
            "stage1",
            load_config("configs/rdeic.py:tiny,stage=1", [*common, f"total_steps={args.steps1}"]),
        ),
        (
            "stage2",
            load_config("configs/rdeic.py:tiny,stage=2", [*common, f"total_steps={args.steps2}"]),
        ),
    ]


def _rdeic_rows(stage, codec, data, decoded, original):
    """Each stage's file: the VAE decoder on the compressed latent z_c (the relay start's
    signal, what the diffusion refines) and the relay diffusion decode."""
    import jax.numpy as jnp

    from jaxcodec.methods.base import padded_size

    coder = codec.coder
    header, streams = codec._unpack(data)
    hw = padded_size((header.height, header.width), coder.stride)
    index, q = coder._rate(codec.tables, header.options)  # (None, None) at a fixed rate
    y_hat, _ = coder.latent.decode(
        codec.tables, streams, (hw[0] // coder.stride, hw[1] // coder.stride), index
    )
    z_c, _ = coder._synthesise(codec.variables.params, jnp.asarray(y_hat)[None], q)
    base = np.asarray(coder._vae_decode(codec.variables.frozen, z_c))[0]
    n = stage[-1]
    rows = [
        (f"stage {n}'s file, VAE(z_c)", "base", base[: decoded.shape[0], : decoded.shape[1]]),
        (f"stage {n}: relay diffusion", "generative", decoded),
    ]
    if stage == "stage2":
        m = codec.method
        x0 = jnp.asarray(original, jnp.float32)[None] / 127.5 - 1.0
        z0 = m._encode(codec.variables.frozen, x0)["mean"] * m.scale
        ceiling = np.asarray(coder._vae_decode(codec.variables.frozen, z0))[0]
        rows.append(("VAE(z_0) of the original (posterior mean)", "ceiling", ceiling))
    return rows


FIT_CHECKS: dict[str, FitCheck] = {
    # Measured on a 2-core VM: HFD 4×64², 1000 + 3000 steps: 15.6 min (with 1500 stage-2 steps,
    # 8.5 min, it did not yet beat stage 1); DiffO 4×128², 600 + 600: 14.4 min in all (1000 +
    # 1000: 19.8); RDEIC 4×128², 1000 + 300: 11.6 min.
    "hfd": FitCheck(_hfd_configs, _hfd_rows, steps=(1000, 3000), size=64),
    "diffo": FitCheck(_diffo_configs, _diffo_rows, steps=(600, 600)),
    "rdeic": FitCheck(_rdeic_configs, _rdeic_rows, steps=(1000, 300)),
}


# ---------------------------------------------------------------------------------------------
# Training and the real-file evaluation
# ---------------------------------------------------------------------------------------------


def train(method: str, args, crops: Path, out: Path) -> list[tuple[str, Path]]:
    """Trains the method's stages; returns (stage name, workdir) of each, in order."""
    from jaxcodec.train import train_stages

    check = FIT_CHECKS[method]
    workdirs = []
    for name, config in check.configs(args, crops):
        if config.get("stages"):
            summaries = train_stages(config, out)
            workdirs += [(f"stage{n}", out / f"stage{n}") for n in config.stages]
            if summaries[-1].get("preempted"):
                raise SystemExit("stopped early: run the same command again to resume")
            continue
        if workdirs:
            config.init_from = str(workdirs[-1][1])
        summary = train_stages(config, out / name)[-1]
        if summary.get("preempted"):
            raise SystemExit("stopped early: run the same command again to resume")
        workdirs.append((name, out / name))
    return workdirs


def metrics_of(images: np.ndarray, recons: np.ndarray) -> dict[str, list[float]]:
    """Per-image PSNR, LPIPS (AlexNet) and DISTS of uint8 NHWC batches."""
    from jaxcodec.metrics import dists, dists_params, lpips, lpips_params

    err = (images.astype(np.float64) - recons.astype(np.float64)) ** 2
    mse = np.maximum(err.mean(axis=(1, 2, 3)), 1e-12)
    return {
        "psnr": (10.0 * np.log10(255.0**2 / mse)).tolist(),
        "lpips": np.asarray(lpips(images, recons, params=lpips_params("alex"))).tolist(),
        "dists": np.asarray(dists(images, recons, params=dists_params())).tolist(),
    }


def evaluate(
    method: str,
    stages: Sequence[tuple[str, Path]],
    crops: Sequence[Path],
    out: Path,
    options: dict | None = None,
):
    """Real files of every crop through every stage's codec (`options`: header settings, each
    given to the stages whose files declare it); the rows' metrics (means over the crops,
    per-crop values kept) and the side-by-side PNG."""
    from PIL import Image

    from jaxcodec.cli import compress_file, decompress_file
    from jaxcodec.codec import load_codec
    from jaxcodec.data import read_rgb

    check = FIT_CHECKS[method]
    images = np.stack([read_rgb(p) for p in crops])
    rows: dict[str, dict] = {}
    for stage, workdir in stages:
        codec = load_codec(workdir)
        declared = {k: v for k, v in (options or {}).items() if k in codec.coder.options()}
        if declared:
            codec = load_codec(workdir, options=declared)
        files = out / "files" / stage
        files.mkdir(parents=True, exist_ok=True)
        for crop in crops:
            jxc = files / f"{crop.stem}.jxc"
            r = compress_file(codec, crop, jxc)
            decoded = decompress_file(codec, jxc, files / f"{crop.stem}.png")
            original = read_rgb(crop)
            for label, role, recon in check.rows(stage, codec, jxc.read_bytes(), decoded, original):
                row = rows.setdefault(label, {"stage": stage, "role": role, "bpp": [], "recon": []})
                row["bpp"].append(r["bpp"])
                row["recon"].append(np.asarray(recon, np.uint8))
    table = []
    for label, row in rows.items():
        recons = np.stack(row.pop("recon"))
        per_image = {"bpp": row.pop("bpp"), **metrics_of(images, recons)}
        mean = {k: float(np.mean(v)) for k, v in per_image.items()}
        table.append({"label": label, **row, **mean, "per_image": per_image, "recons": recons})
    grid = np.concatenate(
        [
            np.concatenate([images[i]] + [r["recons"][i] for r in table], axis=1)
            for i in range(len(images))
        ]
    )
    side_by_side = out / "side_by_side.png"
    Image.fromarray(grid).save(side_by_side)
    for r in table:
        del r["recons"]
    return table, side_by_side


def verdicts(table: list[dict]) -> list[dict]:
    """Each generative row against the base row of its own stage (the same files, so the same
    bpp): it should win in LPIPS and DISTS."""
    out = []
    for gen in (r for r in table if r["role"] == "generative"):
        bases = [r for r in table if r["role"] == "base" and r["stage"] == gen["stage"]]
        base = bases[-1] if bases else None
        if base is None:
            continue
        out.append(
            {
                "generative": gen["label"],
                "base": base["label"],
                "stage": gen["stage"],
                "d_lpips": gen["lpips"] - base["lpips"],
                "d_dists": gen["dists"] - base["dists"],
                "d_psnr": gen["psnr"] - base["psnr"],
                "wins": gen["lpips"] < base["lpips"] and gen["dists"] < base["dists"],
            }
        )
    return out


def format_table(table: list[dict]) -> str:
    lines = [
        "| reconstruction | role | bpp | PSNR | LPIPS | DISTS |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        bpp = "-" if r["role"] == "ceiling" else f"{r['bpp']:.4f}"
        lines.append(
            f"| {r['label']} | {r['role']} | {bpp} | {r['psnr']:.2f} | "
            f"{r['lpips']:.4f} | {r['dists']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=sorted(FIT_CHECKS))
    p.add_argument("--out", type=Path, default=None, help="default runs/fit_check_METHOD")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="crop side (default: the method's)")
    p.add_argument("--seed", type=int, default=0, help="which photos and where the crops are")
    p.add_argument("--steps1", type=int, default=None, help="first stage's step budget")
    p.add_argument("--steps2", type=int, default=None, help="second stage's step budget")
    p.add_argument("--backbone", type=Path, default=None, help="SD-shaped diffusers folder")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="config override"
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="decode setting stored in the files (e.g. steps=16), as `jaxcodec compress`",
    )
    args = p.parse_args(argv)
    check = FIT_CHECKS[args.method]
    args.steps1 = args.steps1 or check.steps[0]
    args.steps2 = args.steps2 or check.steps[1]
    args.size = args.size or check.size
    out = (args.out or Path("runs") / f"fit_check_{args.method}").absolute()
    out.mkdir(parents=True, exist_ok=True)

    crops = make_crops(args.photos, out / "crops", num=args.crops, size=args.size, seed=args.seed)
    print(
        f"fit check of {args.method}: {args.crops} crops of {args.size}² from {args.photos} "
        f"(seed {args.seed}) in {out / 'crops'}; step budget: stage 1 {args.steps1}, "
        f"stage 2 {args.steps2} (batch = the whole set)",
        flush=True,
    )
    t0 = time.perf_counter()
    stages = train(args.method, args, out / "crops", out)
    t_train = time.perf_counter() - t0
    from jaxcodec.codec import parse_options

    options = parse_options(args.option)
    table, side_by_side = evaluate(args.method, stages, crops, out, options)
    result = {
        "method": args.method,
        "crops": [str(c) for c in crops],
        "steps": {"stage1": args.steps1, "stage2": args.steps2},
        "options": options,
        "train_seconds": t_train,
        "table": table,
        "verdicts": verdicts(table),
        "side_by_side": str(side_by_side),
    }
    (out / "fit_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.method} on its {args.crops} training crops (real .jxc files, means):")
    print(format_table(table))
    for v in result["verdicts"]:
        word = "beats" if v["wins"] else "does NOT beat"
        print(
            f"{v['generative']} {word} {v['base']}: ΔLPIPS {v['d_lpips']:+.4f}, "
            f"ΔDISTS {v['d_dists']:+.4f}, ΔPSNR {v['d_psnr']:+.2f} dB"
        )
    print(
        f"trained in {t_train / 60:.1f} min; side by side (original | rows above): {side_by_side}"
    )
    final = [v for v in result["verdicts"] if v["stage"] == stages[-1][0]]
    return 0 if final and all(v["wins"] for v in final) else 1


if __name__ == "__main__":
    sys.exit(main())
