"""DiffO decode time at 768×512 (Kodak size) on this CPU, and projected H100 times.

Builds the full DiffO model (official sizes: VQGAN f16 ch 128, base-code autoencoder, Swin-UNet
160·[1,2,2,4]; random weights, float32), decodes one 768×512 file's worth of indices (entropy
decoding of both residual-VQ stages, then the one jitted call from indices to pixels), times it
after a warm-up, and reads XLA's cost analysis (FLOPs, bytes) of each part. H100 projections
are rooflines: max(FLOPs / peak, bytes / HBM bandwidth), at 100 % and at `--mfu` of peak, for
TF32 (what float32 convolutions and matmuls run as by default on an H100) and BF16.

Also reports the denoiser choice measured for the issue: ResShift's Swin-UNet against the
project's UNet with global self-attention transformers in the same places (same channels,
blocks and resnets), by compile-only cost analysis at 768×512 and 2048×2048.

RDEIC (2 steps, λ_s = 1) is timed in the same run when `jaxcodec.methods.rdeic` is on main: SD
2.1-base shapes with random weights, a real file of the same image through its own coder
(needs about 12 GB of RAM); otherwise the JSON says why not.

    .venv/bin/python benchmarks/diffo_decode.py [--repeats 2] [--mfu 0.4] [--skip-rdeic]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

H100 = {"tf32_flops": 494.7e12, "bf16_flops": 989.4e12, "hbm_bytes_per_s": 3.35e12}  # SXM, dense
HEIGHT, WIDTH = 512, 768


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"gflop": ca.get("flops", 0.0) / 1e9, "gbytes": ca.get("bytes accessed", 0.0) / 1e9}


def _project(cost: dict[str, float], mfu: float) -> dict[str, float]:
    out = {}
    memory = cost["gbytes"] * 1e9 / H100["hbm_bytes_per_s"]
    for kind in ("tf32", "bf16"):
        compute = cost["gflop"] * 1e9 / H100[f"{kind}_flops"]
        out[f"h100_{kind}_roofline_ms"] = 1e3 * max(compute, memory)
        out[f"h100_{kind}_at_mfu_ms"] = 1e3 * max(compute / mfu, memory)
    return out


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())  # compile + first run
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return first, runs


def diffo(repeats: int, mfu: float) -> dict:
    from jaxcodec.configlib import load_config
    from jaxcodec.entropy import coder
    from jaxcodec.entropy import vq as vq_lib
    from jaxcodec.methods import Variables, get_method
    from jaxcodec.nn.vae import VQModel

    config = load_config("configs/diffo.py:full")
    config.model.vqgan_path = "random"
    config.model.unet.remat = False
    method = get_method(config)
    f = method.vqgan_config.downsample_factor
    hw = (HEIGHT // f, WIDTH // f)
    key = jax.random.key(0)
    variables = jax.jit(method.init)(key, method.dummy_batch(1))
    params, state = variables["params"], {"vq_stats": variables["vq_stats"]}
    params, state = nn.unbox((params, state))
    vqgan = jax.jit(VQModel(method.vqgan_config).init)(key, jnp.zeros((1, 16, 16, 3)))["params"]
    frozen = {"vqgan": vqgan}
    v = Variables(params, state, frozen)
    n_params = {
        "vqgan": sum(x.size for x in jax.tree.leaves(vqgan)),
        "base": sum(x.size for x in jax.tree.leaves(params["base"])),
        "denoiser": sum(x.size for x in jax.tree.leaves(params["denoiser"])),
    }
    # Tables from a skewed usage (about 6.5 bits an index), random indices drawn from them.
    rng = np.random.default_rng(0)
    stats = jax.tree.map(np.asarray, state["vq_stats"]["rvq"])
    for s in stats.values():
        s["ema_count"] = rng.gamma(0.7, 1.0, s["ema_count"].shape).astype(np.float32) + 1e-3
    tables = method.entropy_tables(Variables(params, {"vq_stats": {"rvq": stats}}))
    encoder = coder.new_encoder()
    for k in range(method.num_rates):
        p = stats[f"stage_{k}"]["ema_count"] / stats[f"stage_{k}"]["ema_count"].sum()
        vq_lib.encode_indices(encoder, tables[f"stage_{k}"], rng.choice(len(p), hw, p=p))
    stream = coder.finish(encoder)

    codec = method.coder
    options = {"rate_index": method.num_rates - 1, "noise_level": 1.0, "seed": 0}
    t_first, runs = _timed(
        lambda: codec.decompress(v, tables, [stream], (HEIGHT, WIDTH), options, key)[0], repeats
    )
    info = codec.decompress(v, tables, [stream], (HEIGHT, WIDTH), options, key)[1]

    # Parts: the one jitted call, split into the latent decode (base + one step) and the VQGAN.
    codebooks = jnp.asarray(method.codebooks(tables))
    window = jnp.zeros((1, *hw, method.num_rates + method.vqgan_config.embed_dim), jnp.float32)
    depth, level = method.num_rates, method.levels[-1]
    parts = {
        "decode_call": jax.jit(method.render).lower(
            params, frozen, codebooks, window, depth, level
        ),
        "latent": jax.jit(method.decode_latent).lower(params, codebooks, window, depth, level),
        "vqgan_decoder": jax.jit(
            lambda p, z: method.vqgan.apply({"params": p}, z, method="decode")
        ).lower(vqgan, jnp.zeros((1, *hw, method.vqgan_config.embed_dim))),
    }
    costs = {name: _cost(low.compile()) for name, low in parts.items()}
    latent_fn = jax.jit(method.decode_latent)
    _, latent_runs = _timed(
        lambda: latent_fn(params, codebooks, window, depth, level), max(1, repeats)
    )
    return {
        "params": n_params,
        "bytes": len(stream),
        "bpp_indices": 8 * len(stream) / (HEIGHT * WIDTH),
        "cpu_decode_s": statistics.median(runs),
        "cpu_first_decode_s": t_first,
        "cpu_entropy_s": info["entropy_s"],
        "cpu_latent_s": statistics.median(latent_runs),
        "cost": costs,
        "projected": _project(costs["decode_call"], mfu),
    }


def unet_choice() -> dict:
    """Swin-UNet vs the project's UNet with global transformers in the same places."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods.diffo import _tuples
    from jaxcodec.nn.unet import UNet, UNetConfig

    swin = UNetConfig(**_tuples(load_config("configs/diffo.py:full").model.unet.to_dict()))
    swin = dataclasses.replace(swin, remat=False)
    heads = tuple(c // 32 for c in swin.block_out_channels)  # ResShift's 32-channel heads
    transformer = dataclasses.replace(
        swin, attention_block="transformer", attention_head_dim=heads, attention_impl="xla"
    )
    out = {}
    for name, c in (("swin", swin), ("transformer", transformer)):
        model = UNet(c)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        x0 = jax.ShapeDtypeStruct((1, 32, 32, c.in_channels), jnp.float32)
        params = jax.eval_shape(lambda a, b, m=model: m.init(jax.random.key(0), a, b), x0, t)
        params = params["params"]
        row = {"params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))}
        for label, (h, w) in (("768x512", (32, 48)), ("2048x2048", (128, 128))):
            x = jax.ShapeDtypeStruct((1, h, w, c.in_channels), jnp.float32)
            fn = jax.jit(lambda p, a, b, m=model: m.apply({"params": p}, a, b))
            row[label] = _cost(fn.lower(params, x, t).compile())
        out[name] = row
    return out


def _photo() -> np.ndarray:
    from skimage import data

    photo = data.astronaut()
    return np.ascontiguousarray(np.tile(photo, (1, 2, 1))[:HEIGHT, :WIDTH])


def rdeic(repeats: int, mfu: float) -> dict:
    """RDEIC at 2 steps (λ_s = 1: the controlled UNet once a step) on the same image size, SD
    2.1-base shapes with random weights, through its own BitstreamCoder."""
    import importlib.util
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "jaxcodec/methods/rdeic.py"],
        capture_output=True,
        cwd=root,
    )
    if importlib.util.find_spec("jaxcodec.methods.rdeic") is None or tracked.returncode:
        return {"status": "RDEIC is not on main yet: no 2-step RDEIC time in this run"}
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import Variables, get_method
    from jaxcodec.nn.unet import UNet
    from jaxcodec.nn.vae import AutoencoderKL

    config = load_config("configs/rdeic.py:full")
    method = get_method(config)
    key = jax.random.key(1)
    variables = nn.unbox(jax.jit(method.init)(key, method.dummy_batch(1)))
    params, state = variables.pop("params"), variables
    uc, vc = method.unet_config, method.vae_config
    unet = jax.jit(UNet(uc).init)(
        key, jnp.zeros((1, 8, 8, uc.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, 1024))
    )["params"]
    vae = jax.jit(AutoencoderKL(vc).init)(key, jnp.zeros((1, 8, 8, 3)))["params"]
    frozen = {"unet": nn.unbox(unet), "vae": nn.unbox(vae), "text": jnp.zeros((1, 77, 1024))}
    v = Variables(params, state, frozen)
    tables = method.entropy_tables(Variables(*jax.tree.map(np.asarray, (params, state)), {}))
    codec = method.coder
    options = {"steps": 2, "guidance": 1.0, "seed": 0}
    streams, _ = codec.compress(v, tables, _photo(), options)
    t_first, runs = _timed(
        lambda: codec.decompress(v, tables, streams, (HEIGHT, WIDTH), options, key)[0], repeats
    )
    info = codec.decompress(v, tables, streams, (HEIGHT, WIDTH), options, key)[1]
    out = {
        "steps": 2,
        "params": {
            "unet": sum(x.size for x in jax.tree.leaves(frozen["unet"])),
            "adapter": sum(x.size for x in jax.tree.leaves(params["adapter"])),
            "compressor": sum(x.size for x in jax.tree.leaves(params["compressor"])),
        },
        "cpu_decode_s": statistics.median(runs),
        "cpu_first_decode_s": t_first,
        "cpu_parts_s": {k: v for k, v in info.items() if k.endswith("_s")},
    }
    try:  # the jitted parts of its coder, for the projection (private: may move)
        z_c = jnp.zeros((1, HEIGHT // 8, WIDTH // 8, vc.latent_channels))
        hint = jnp.zeros((1, HEIGHT // 8, WIDTH // 8, method.compressor_config.M))
        den = codec._denoise.lower(params, frozen, z_c, hint, key, 1.0, steps=2, mode="controlled")
        dec = codec._vae_decode.lower(frozen, z_c)
        costs = {"denoise": _cost(den.compile()), "vae_decoder": _cost(dec.compile())}
        total = {k: costs["denoise"][k] + costs["vae_decoder"][k] for k in ("gflop", "gbytes")}
        out |= {"cost": costs, "projected": _project(total, mfu)}
    except (AttributeError, TypeError) as exc:
        out["cost"] = f"unavailable: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mfu", type=float, default=0.4, help="utilisation for projections")
    parser.add_argument("--skip-rdeic", action="store_true")
    parser.add_argument("--skip-unet-choice", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    result = {
        "benchmark": "diffo_decode",
        "image": f"{WIDTH}x{HEIGHT}",
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "mfu_assumed": args.mfu,
    }
    result["diffo"] = diffo(args.repeats, args.mfu)
    d = result["diffo"]
    print(
        f"DiffO 768x512 on CPU: decode {d['cpu_decode_s']:.2f} s (entropy {d['cpu_entropy_s']:.3f}"
        f" s, latent {d['cpu_latent_s']:.2f} s), {d['cost']['decode_call']['gflop']:.0f} GFLOP;"
        f" H100 TF32 at {args.mfu:.0%}: {d['projected']['h100_tf32_at_mfu_ms']:.1f} ms"
        f" (load average {load:.1f})"
    )
    if not args.skip_unet_choice:
        result["unet_choice"] = unet_choice()
    result["rdeic"] = (
        {"status": "skipped (--skip-rdeic)"} if args.skip_rdeic else rdeic(args.repeats, args.mfu)
    )
    r = result["rdeic"]
    if "cpu_decode_s" in r:
        result["rdeic_over_diffo_cpu"] = r["cpu_decode_s"] / d["cpu_decode_s"]
        print(
            f"RDEIC 2-step 768x512 on CPU: decode {r['cpu_decode_s']:.2f} s "
            f"({result['rdeic_over_diffo_cpu']:.1f}x DiffO's)"
        )
        if isinstance(r.get("projected"), dict):
            result["rdeic_over_diffo_h100"] = (
                r["projected"]["h100_tf32_at_mfu_ms"] / d["projected"]["h100_tf32_at_mfu_ms"]
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
