"""Parts of `benchmarks/accelerator_check.sh`, one per call, each ending with one JSON line.

    python benchmarks/accelerator_check.py detect
    python benchmarks/accelerator_check.py decode --method hfd|rdeic|diffo [--variant full]
        [--size 768x512] [--repeats 2]
    python benchmarks/accelerator_check.py train-mfu [--config configs/hfd.py:full] [--stage 1]
        [--steps 6] [--batch-per-device 8]
    python benchmarks/accelerator_check.py pytest-summary LOG
    python benchmarks/accelerator_check.py report DIR

decode: the method's decoder at its configuration with random weights (trainable parts from
their initialisers, pretrained frozen parts drawn at their shapes), on device, through the
method's own BitstreamCoder: a real bitstream of a photo of the given size is decoded once
(compilation), then timed `--repeats` times (entropy decoding on the host included).

train-mfu: a few steps of the real train loop (`jaxcodec.train.train_and_evaluate`, the config
with scikit-image photos as data, `--batch-per-device` crops per device, no evaluation) timed
step by step; MFU and TFLOP/s per device as the loop reports them (XLA's cost analysis of the
compiled step, the peak of the device kind from `jaxcodec.throughput`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------
# detect
# ---------------------------------------------------------------------------------------------


def detect(_args) -> None:
    import jax

    devices = jax.devices()
    out = {
        "platform": devices[0].platform,  # cpu | gpu | tpu
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
    }
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        out["torch"] = None
        out["torch_cuda"] = False
    _emit(out)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


def _photo(height: int, width: int):
    import numpy as np
    from skimage import data

    photo = data.astronaut()  # 512 x 512
    reps = (-(-height // photo.shape[0]), -(-width // photo.shape[1]), 1)
    return np.ascontiguousarray(np.tile(photo, reps)[:height, :width])


def _init(method, key):
    """(params, mutable state) from the method's initialisers, on device."""
    import flax.linen as nn
    import jax

    variables = dict(nn.unbox(jax.jit(method.init)(key, method.dummy_batch(1))))
    return variables.pop("params"), variables


def _random_frozen(method, skip=("lpips",)):
    """Pretrained frozen parts at their shapes, random (numpy-drawn), on device."""
    import jax
    import jax.numpy as jnp

    from jaxcodec.weights.diffusers import random_params

    abstract = method.abstract_frozen() or {}
    shapes = {k: v for k, v in abstract.items() if k not in skip}
    return jax.tree.map(jnp.asarray, random_params(shapes, seed=1))


def build_decoder(name: str, variant: str):
    """(method, Variables, tables) of `name`'s decoding stage with random weights."""
    import jax
    import numpy as np

    from jaxcodec.configlib import load_config, stage_config
    from jaxcodec.methods import Variables, get_method

    key = jax.random.key(0)
    if name == "hfd":
        config = load_config(f"configs/hfd.py:{variant}")
        ae = get_method(stage_config(config, 1))
        ae_params, ae_state = _init(ae, key)
        method = get_method(stage_config(config, 2))
        params, state = _init(method, jax.random.key(1))
        frozen = {"autoencoder": {"params": ae_params, **ae_state}}
    elif name == "rdeic":
        config = load_config(f"configs/rdeic.py:{variant},stage=2")
        method = get_method(config)
        params, state = _init(method, key)
        frozen = _random_frozen(method)
    elif name == "diffo":
        config = load_config(f"configs/diffo.py:{variant}")
        config.model.vqgan_path = "random"  # shapes only: the VQGAN is drawn below
        method = get_method(config)
        params, state = _init(method, key)
        frozen = _random_frozen(method)
    else:
        raise ValueError(f"unknown method {name!r}")
    host = jax.tree.map(np.asarray, (params, state, frozen))
    tables = method.entropy_tables(Variables(*host))
    return method, Variables(params, state, frozen), tables


def decode(args) -> None:
    import jax

    from jaxcodec.methods.base import pad_to_multiple, padded_size

    width, height = (int(v) for v in args.size.lower().split("x"))
    t0 = time.perf_counter()
    method, variables, tables = build_decoder(args.method, args.variant)
    build_s = time.perf_counter() - t0
    coder = method.coder
    options = coder.options()
    image = pad_to_multiple(_photo(height, width), coder.stride)
    hw = padded_size((height, width), coder.stride)
    streams, _ = coder.compress(variables, tables, image, options)
    num_bytes = sum(len(s) for s in streams)
    key = jax.random.key(0)

    def run():
        out, info = coder.decompress(variables, tables, streams, hw, options, key)
        jax.block_until_ready(out)
        return info

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times, info = [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        info = run()
        times.append(time.perf_counter() - t0)
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
    _emit(
        {
            "method": args.method,
            "variant": args.variant,
            "image": f"{width}x{height}",
            "device": jax.devices()[0].device_kind,
            "options": {k: v for k, v in options.items()},
            "params": count(variables.params),
            "frozen_params": count(variables.frozen),
            "bytes": num_bytes,
            "bpp": 8 * num_bytes / (width * height),
            "decode_s": statistics.median(times),
            "decode_runs_s": times,
            "first_decode_s": first,  # compilation included
            "build_s": build_s,
            "parts_s": {k: v for k, v in info.items() if k.endswith("_s")},
        }
    )


# ---------------------------------------------------------------------------------------------
# train-mfu
# ---------------------------------------------------------------------------------------------


def _train_config(args):
    import jax

    from jaxcodec.configlib import load_config, stage_config
    from jaxcodec.data import default_data_config

    config = load_config(args.config)
    if config.get("stages"):
        config.stages = ()
    config = stage_config(config, args.stage)
    crop = int(config.data.crop_size)
    config.data = default_data_config(source="skimage", crop_size=crop)
    config.batch_size = args.batch_per_device * jax.device_count()
    config.total_steps = args.steps
    config.log_every = 1
    config.eval_every = 0
    config.real_file_eval = False
    config.checkpoint_every = args.steps
    return config


def train_mfu(args) -> None:
    import jax

    from jaxcodec.train import train_and_evaluate

    config = _train_config(args)
    marks: list[tuple[int, float]] = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="accel_check_train_"))
    t0 = time.perf_counter()
    summary = train_and_evaluate(
        config, workdir, on_step=lambda step, _: marks.append((step, time.perf_counter()))
    )
    wall = time.perf_counter() - t0
    # Steps after the first two (the first compiles): per-step wall time, synchronised by the
    # loop's per-step metric fetch (log_every = 1).
    gaps = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks[1:], marks[2:], strict=False)]
    step_s = statistics.median(gaps) if gaps else None
    kind = jax.devices()[0].device_kind
    n = jax.device_count()
    out = {
        "config": args.config,
        "stage": args.stage,
        "device": kind,
        "devices": n,
        "global_batch": int(config.batch_size),
        "crop": int(config.data.crop_size),
        "steps": args.steps,
        "step_s": step_s,
        "examples_per_sec": config.batch_size / step_s if step_s else None,
        "wall_s": wall,
    }
    loop = summary.get("throughput") or {}  # XLA's cost analysis of the compiled step
    out |= {
        "mfu": loop.get("mfu"),
        "tflops_per_device": loop.get("tflops_per_device"),
        "loop_examples_per_sec": loop.get("examples_per_sec"),
        "peak_tflops_per_device": loop.get("peak_tflops_per_device"),
    }
    _emit(out)


# ---------------------------------------------------------------------------------------------
# pytest-summary, report
# ---------------------------------------------------------------------------------------------


def pytest_summary(args) -> None:
    """Counts from pytest's closing line ('3 failed, 40 passed, 1 skipped in 60.1s')."""
    text = Path(args.log).read_text(errors="replace") if Path(args.log).exists() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error)", ln)]
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    seconds = None
    if lines:
        last = lines[-1]
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last):
            counts["errors" if word.startswith("error") else word] = int(n)
        m = re.search(r"in ([\d.]+)s", last)
        seconds = float(m.group(1)) if m else None
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    _emit(counts | {"seconds": seconds, "failures": failed[:20]})


def _last_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def report(args) -> None:
    """One JSON line from a run folder: DIR/NAME.json (a part's last JSON line) and
    DIR/NAME.status ('rc seconds' or 'skipped: reason') for every part, headline figures first;
    `--set KEY=JSON` adds fields."""
    d = Path(args.dir)
    out: dict = {"benchmark": "accelerator_check"}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    parts = {}
    for status in sorted(d.glob("*.status")):
        name = status.stem
        text = status.read_text().strip()
        entry: dict = {}
        if text.startswith("skipped"):
            entry["status"] = text
        else:
            rc, seconds = text.split()[:2]
            rc = int(rc)
            entry["status"] = {0: "ok", 124: "timeout", 137: "timeout"}.get(rc, f"failed (rc {rc})")
            entry["seconds"] = round(float(seconds), 1)
        result = _last_json(d / f"{name}.json")
        if result is not None:
            entry["result"] = result
        parts[name] = entry
    out["parts"] = parts

    # Headline figures.
    def result(name):
        return parts.get(name, {}).get("result") or {}

    par = result("parity")
    out["parity_passed"], out["parity_failed"] = (
        par.get("passed"),
        par.get("failed", 0) + par.get("errors", 0),
    )
    speed = result("unet_speed")
    same = speed.get("torch_device") not in (None, "cpu") or speed.get("jax_backend") == "cpu"
    for k in ("unet_jax_s", "unet_torch_s", "vae_decoder_jax_s", "vae_decoder_torch_s"):
        out[k] = speed.get(k)
    out["unet_ratio"] = speed.get("unet_ratio") if same else None
    out["vae_decoder_ratio"] = speed.get("vae_decoder_ratio") if same else None
    out["torch_device"] = speed.get("torch_device")
    for method in ("hfd", "rdeic", "diffo"):
        r = result(f"decode_{method}")
        out[f"decode_{method}_s"] = r.get("decode_s")
    mfu = result("train_mfu")
    out["train_mfu"] = mfu.get("mfu")
    out["train_tflops_per_device"] = mfu.get("tflops_per_device")
    out["train_step_s"] = mfu.get("step_s")
    out["ok"] = all(
        p["status"] == "ok" or p["status"].startswith("skipped") for p in parts.values()
    )
    _emit(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("detect").set_defaults(fn=detect)
    d = sub.add_parser("decode")
    d.add_argument("--method", required=True, choices=("hfd", "rdeic", "diffo"))
    d.add_argument("--variant", default="full")
    d.add_argument("--size", default="768x512", help="WIDTHxHEIGHT")
    d.add_argument("--repeats", type=int, default=2)
    d.set_defaults(fn=decode)
    t = sub.add_parser("train-mfu")
    t.add_argument("--config", default="configs/hfd.py:full")
    t.add_argument("--stage", type=int, default=1)
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--batch-per-device", type=int, default=8)
    t.add_argument("--workdir", default=None)
    t.set_defaults(fn=train_mfu)
    s = sub.add_parser("pytest-summary")
    s.add_argument("log")
    s.set_defaults(fn=pytest_summary)
    r = sub.add_parser("report")
    r.add_argument("dir")
    r.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    r.set_defaults(fn=report)
    args = p.parse_args(argv)
    os.chdir(ROOT)  # configs/ paths
    args.fn(args)


if __name__ == "__main__":
    main()
