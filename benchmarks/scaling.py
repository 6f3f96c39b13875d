"""FSDP memory scaling of RDEIC's full stage-II train step, compiled (never run) on 1-8 devices.

The step is the paper's fixed-step fine-tuning at full size (`configs/rdeic.py:full,stage=2`
with no SD folder: SD 2.1-base shapes): the frozen SD UNet and VAE, the trainable compressor
(N = M = 256, 16384 codes) and control adapter, the 2-step relay chain trained through with the
VAE decoder and LPIPS, bf16 UNet activations with fp32 master weights, remat. For each device
count N (one subprocess per N, `XLA_FLAGS=--xla_force_host_platform_device_count=N`, fake CPU
devices, mesh (1, N, 1): everything FSDP) it builds the train state and frozen weights as
`jax.ShapeDtypeStruct`s with their shardings (nothing is allocated), lowers and compiles the
jitted step in the mesh and logical-axis-rules scope, and reports per device:

- parameters, optimiser state (Adam μ and ν), EMA and model state (VQ codebook) from the
  shardings, and the frozen weights;
- XLA's memory analysis of the compiled step: arguments, outputs, temporaries, aliased
  (donated) bytes, and the peak (arguments + outputs + temporaries − aliased).

Ratios are to one device. Targets: trainable state (params + optimiser + EMA) ≤ 1.1/N of one
device, and at 8-way FSDP the whole step fits a 16 GiB accelerator with a batch of 4 crops of
256² per device (`--per-device-batch`; the global batch is 4·N, so the activations per device
stay those of the paper's batch of 4).

    .venv/bin/python benchmarks/scaling.py [--devices 1 2 4 8] [--per-device-batch 4]
        [--set FIELD=VALUE ...]

Compiling the full step on a CPU takes minutes per device count and a few GB of RAM (one
compilation at a time). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/rdeic.py:full,stage=2"
GIB = 2**30
TARGET_DEVICE_BYTES = 16 * GIB


def measure(devices: int, per_device_batch: int, overrides: list[str]) -> dict:
    """In a process with `devices` fake CPU devices: compile the step, return its bytes."""
    import flax.linen as nn
    import jax

    from jaxcodec import sharding as shd
    from jaxcodec import throughput as tput
    from jaxcodec import train
    from jaxcodec.configlib import load_config

    if len(jax.devices()) != devices:
        raise RuntimeError(f"expected {devices} devices, have {len(jax.devices())}")
    config = load_config(
        CONFIG,
        [
            "mesh.shape=(1,-1,1)",
            f"batch_size={per_device_batch * devices}",
            *overrides,
        ],
    )
    t0 = time.perf_counter()
    shapes = train.model_shapes(config)
    mesh = shd.create_mesh(config.mesh.shape, config.mesh.axes)
    train.check_batch(config, mesh)
    rules = shd.rules_of(config)
    state_sh, frozen_sh = train.shardings(config, mesh, shapes)
    abstract_frozen = shapes.method.abstract_frozen()

    def structs(tree, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.unbox(tree),
            shardings,
        )

    state = structs(shapes.abstract_state, state_sh)
    frozen = structs(abstract_frozen, frozen_sh)
    dummy = shapes.method.dummy_batch(config.batch_size)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.batch_sharding(mesh)), dummy
    )
    step_fn = train.make_train_step(config, shapes, mesh, state_sh, frozen_sh)
    compiled, speed = train.compile_train_step(config, step_fn, mesh, rules, state, frozen, batch)
    seconds = time.perf_counter() - t0

    def per_device(tree_boxed, shardings) -> int:
        return shd.bytes_per_device(tree_boxed, shardings)

    abstract = shapes.abstract_state
    parts = {
        "params": per_device(abstract.params, state_sh.params),
        "opt_state": per_device(abstract.opt_state, state_sh.opt_state),
        "ema_params": per_device(abstract.ema_params, state_sh.ema_params),
        "model_state": per_device(abstract.model_state, state_sh.model_state),
        "frozen": per_device(abstract_frozen, frozen_sh),
    }
    rows = shd.placements(abstract.params, state_sh.params) + shd.placements(
        abstract_frozen, frozen_sh
    )
    largest = {}
    for prefix in ("compressor", "adapter", "unet", "vae"):
        mine = [r for r in rows if r.path.startswith(prefix + "/")]
        if mine:
            r = max(mine, key=lambda r: r.bytes)
            largest[prefix] = {
                "path": r.path,
                "shape": list(r.shape),
                "spec": [None if e is None else str(e) for e in r.spec],
                "bytes": r.bytes,
                "bytes_per_device": r.bytes_per_device,
            }
    return {
        "devices": devices,
        "batch": int(config.batch_size),
        "crop": int(config.data.crop_size),
        "state": parts,
        "trainable_state": parts["params"] + parts["opt_state"] + parts["ema_params"],
        "xla": tput.memory_stats(compiled),
        "gflop_per_device": (speed.flops_per_step or 0.0) / 1e9,
        "compile_seconds": seconds,
        "largest": largest,
    }


def _run_child(devices: int, args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, __file__, "--child", str(devices)]
    cmd += ["--per-device-batch", str(args.per_device_batch)]
    for item in args.set:
        cmd += ["--set", item]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"the {devices}-device compilation failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / GIB:7.3f}"


def report(results: list[dict]) -> dict:
    one = next((r for r in results if r["devices"] == 1), results[0])
    header = (
        f"{'N':>2} {'batch':>5} | {'params':>7} {'optim':>7} {'ema':>7} {'trainable':>9} "
        f"{'ratio':>6} {'x N':>5} | {'frozen':>7} {'ratio':>6} | {'args':>7} {'temps':>7} "
        f"{'peak':>7} {'ratio':>6} | {'compile':>7}"
    )
    print("RDEIC full stage II train step, FSDP over N fake CPU devices (GiB per device)")
    print(header)
    print("-" * len(header))
    summary = []
    for r in results:
        x, x1 = r["xla"] or {}, one["xla"] or {}
        trainable_ratio = r["trainable_state"] / one["trainable_state"]
        frozen_ratio = r["state"]["frozen"] / max(one["state"]["frozen"], 1)
        peak_ratio = x.get("peak", 0) / max(x1.get("peak", 1), 1)
        print(
            f"{r['devices']:>2} {r['batch']:>5} | {_gib(r['state']['params'])} "
            f"{_gib(r['state']['opt_state'])} {_gib(r['state']['ema_params'])} "
            f"{_gib(r['trainable_state'])}   {trainable_ratio:6.3f} "
            f"{trainable_ratio * r['devices']:5.2f}"
            f" | {_gib(r['state']['frozen'])} {frozen_ratio:6.3f} | {_gib(x.get('arguments', 0))} "
            f"{_gib(x.get('temporaries', 0))} {_gib(x.get('peak', 0))} {peak_ratio:6.3f} | "
            f"{r['compile_seconds']:6.0f}s"
        )
        summary.append(
            {
                "devices": r["devices"],
                "batch": r["batch"],
                "trainable_state_gib": r["trainable_state"] / GIB,
                "trainable_ratio": trainable_ratio,
                "trainable_ratio_times_n": trainable_ratio * r["devices"],
                "frozen_gib": r["state"]["frozen"] / GIB,
                "frozen_ratio": frozen_ratio,
                "temporaries_gib": x.get("temporaries", 0) / GIB,
                "peak_gib": x.get("peak", 0) / GIB,
                "peak_ratio": peak_ratio,
                "gflop_per_device": r["gflop_per_device"],
            }
        )
    print()
    for r in results:
        if r["devices"] == max(s["devices"] for s in results):
            for part, row in r["largest"].items():
                print(
                    f"largest {part} parameter at N={r['devices']}: {row['path']} "
                    f"{tuple(row['shape'])} spec {tuple(row['spec'])}: "
                    f"{row['bytes_per_device'] / 2**20:.2f} of {row['bytes'] / 2**20:.2f} MiB"
                )
    # Without a 1-device row the ratios are to the smallest N: no verdict on them.
    has_one = one["devices"] == 1
    trainable_ok = (
        all(s["trainable_ratio"] <= 1.1 / s["devices"] for s in summary) if has_one else None
    )
    eight = next((s for s in summary if s["devices"] == 8), None)
    fits = None if eight is None else eight["peak_gib"] * GIB <= TARGET_DEVICE_BYTES
    line = {
        "benchmark": "scaling",
        "config": CONFIG,
        "per_device_batch": results[0]["batch"] // results[0]["devices"],
        "crop": results[0]["crop"],
        "rows": summary,
        "trainable_within_1.1_over_n": trainable_ok,
        "fits_16gib_at_8": fits,
    }
    print(
        "trainable state ≤ 1.1/N of one device: "
        + ("no 1-device row; " if trainable_ok is None else "yes; " if trainable_ok else "NO; ")
        + (
            f"peak at 8-way {eight['peak_gib']:.2f} GiB per device: "
            f"{'fits' if fits else 'does NOT fit'} 16 GiB"
            if eight
            else "8-way not measured"
        )
    )
    print(json.dumps(line))
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="config override"
    )
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.per_device_batch, args.set)))
        return
    results = []
    for n in args.devices:
        results.append(_run_child(n, args))
        r = results[-1]
        print(
            f"  compiled N={n}: trainable {r['trainable_state'] / GIB:.3f} GiB, "
            f"peak {(r['xla'] or {}).get('peak', 0) / GIB:.2f} GiB per device "
            f"({r['compile_seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    report(results)


if __name__ == "__main__":
    main()
