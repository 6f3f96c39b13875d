"""Images per second of `jaxcodec compress/decompress` on a folder (one process, batches of one
padded size on the device) against one process per image, and a check that both write the
same files: every `.jxc` byte for byte, every decoded image pixel for pixel.

For each model (`--model NAME=WORKDIR_OR_BUNDLE`): a warm-up run of the folder commands at
every batch size fills the model's compilation cache (its own folder under `--scratch`), so
every timed run, folder or single file, finds its compiled functions on disk, as a user's
repeated calls do. Then, timed by wall clock from process start to exit: the folder commands
at each `--batch-sizes`, and one `jaxcodec compress IN OUT` / `decompress IN OUT` process per
image. Prints one JSON line (and writes it to `--out`).

    python benchmarks/batch_cli.py --model hfd=runs/hfd_tiny/stage1 --model diffo=runs/diffo \
        --data ../shared/data/kodak [--batch-sizes 8 1] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _run(args: list[str], env: dict[str, str]) -> float:
    """Seconds of one `python -m jaxcodec ...` process, from start to exit."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jaxcodec", *args], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"jaxcodec {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def _same_files(a: Path, b: Path, suffix: str) -> list[str]:
    """Names whose files differ (bytes for .jxc, pixels for .png) or exist on one side only."""
    names = sorted({p.name for p in a.glob(f"*{suffix}")} | {p.name for p in b.glob(f"*{suffix}")})
    differ = []
    for name in names:
        x, y = a / name, b / name
        if not (x.is_file() and y.is_file()):
            differ.append(name)
        elif suffix == ".jxc" and x.read_bytes() != y.read_bytes():
            differ.append(name)
        elif suffix == ".png" and not np.array_equal(
            np.asarray(Image.open(x)), np.asarray(Image.open(y))
        ):
            differ.append(name)
    return differ


def bench_model(
    name: str, model: str, images: list[Path], scratch: Path, batch_sizes: list[int]
) -> dict:
    work = scratch / name
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "images"
    folder.mkdir(parents=True)
    for path in images:
        shutil.copyfile(path, folder / path.name)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXCODEC_COMPILATION_CACHE"] = str(work / "xla")
    ckpt = ["--checkpoint", model, "--quiet"]
    n = len(images)

    def log(text: str) -> None:
        print(f"[{name}] {text}", file=sys.stderr, flush=True)

    for b in batch_sizes:  # warm-up: fills the compilation cache, never timed
        _run(["compress", str(folder), str(work / "warm_jxc"), *ckpt, "--batch-size", str(b)], env)
        decoded = str(work / "warm_png")
        _run(["decompress", str(work / "warm_jxc"), decoded, *ckpt, "--batch-size", str(b)], env)
    log("compilation cache warm")

    out: dict = {"images": n, "folder": {}}
    for b in batch_sizes:
        jxc, png = work / f"jxc_b{b}", work / f"png_b{b}"
        c = _run(["compress", str(folder), str(jxc), *ckpt, "--batch-size", str(b)], env)
        d = _run(["decompress", str(jxc), str(png), *ckpt, "--batch-size", str(b)], env)
        out["folder"][f"batch_{b}"] = {
            "compress_images_per_s": n / c,
            "decompress_images_per_s": n / d,
        }
        log(f"folder, batch {b}: compress {n / c:.3f} img/s, decompress {n / d:.3f} img/s")

    single_jxc, single_png = work / "jxc_single", work / "png_single"
    single_jxc.mkdir()
    single_png.mkdir()
    model_arg = ["--checkpoint", model]
    c = sum(
        _run(["compress", str(p), str(single_jxc / f"{p.stem}.jxc"), *model_arg], env)
        for p in sorted(folder.iterdir())
    )
    d = sum(
        _run(["decompress", str(p), str(single_png / f"{p.stem}.png"), *model_arg], env)
        for p in sorted(single_jxc.iterdir())
    )
    out["one_process_per_image"] = {
        "compress_images_per_s": n / c,
        "decompress_images_per_s": n / d,
    }
    log(f"one process per image: compress {n / c:.3f} img/s, decompress {n / d:.3f} img/s")

    reference = out["one_process_per_image"]
    for b in batch_sizes:
        row = out["folder"][f"batch_{b}"]
        for kind in ("compress", "decompress"):
            row[f"{kind}_speedup"] = row[f"{kind}_images_per_s"] / reference[f"{kind}_images_per_s"]
        row["jxc_differ_from_single"] = _same_files(work / f"jxc_b{b}", single_jxc, ".jxc")
        row["png_differ_from_single"] = _same_files(work / f"png_b{b}", single_png, ".png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--data", default="../shared/data/kodak")
    p.add_argument("--limit", type=int, default=None, help="the first N images only")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1])
    p.add_argument("--scratch", default="runs/batch_cli")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    images = sorted(Path(args.data).glob("*.png"))[: args.limit]
    if not images:
        raise SystemExit(f"no PNG images in {args.data}")
    result = {
        "benchmark": "batch_cli",
        "data": os.path.abspath(args.data),
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU threads",
        "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
        "timing": "wall clock per process, compilation cache warm; folder: one process for all",
        "models": {},
    }
    for spec in args.model:
        name, _, path = spec.partition("=")
        result["models"][name] = {"path": path} | bench_model(
            name, path, images, Path(args.scratch), args.batch_sizes
        )
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
