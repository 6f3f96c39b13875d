"""RDEIC decoding of a 768×512 image at the full configuration: XLA cost, CPU time, H100 projection.

The full model (SD 2.1-base UNet and VAE, the paper's compressor and adapter; random weights,
float32) decodes a real bitstream of a 768×512 image's latents: host entropy decoding (VQ indices,
fixed-point h_s and context networks, range coding), g_s (hint and z_c), `--steps` relay steps of
the controlled UNet (λ_s = 1: one UNet pass per step) and the VAE decoder. For each part it reports
XLA's cost analysis (FLOPs, bytes accessed) of the float computation, the measured CPU time after a
warm-up, and the projection onto one H100 at its dense bf16 peak (roofline: max(FLOPs / peak,
bytes / HBM bandwidth), and at `--mfu` of the peak), next to RDEIC's published RTX 4090 times:
0.173 s for 2-step denoising and 0.198 s for the rest of decoding (768×512).

    .venv/bin/python benchmarks/rdeic_decode.py [--steps 2] [--repeats 1] [--mfu 0.4] [--no-cpu]

Needs about 12 GB of RAM; compiling the full UNet and VAE on a CPU takes minutes. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

H100 = {"bf16_flops": 989.4e12, "hbm_bytes_per_s": 3.35e12}  # H100 SXM, dense
RTX4090_PUBLISHED_S = {"denoise_2_steps": 0.173, "rest_of_decoding": 0.198}  # RDEIC, 768×512
HEIGHT, WIDTH = 512, 768


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return {"gflop": ca.get("flops", 0.0) / 1e9, "gbytes": ca.get("bytes accessed", 0.0) / 1e9}


def _h100_ms(cost: dict[str, float], mfu: float) -> dict[str, float]:
    compute = cost["gflop"] * 1e9 / H100["bf16_flops"]
    memory = cost["gbytes"] * 1e9 / H100["hbm_bytes_per_s"]
    return {
        "h100_bf16_roofline_ms": 1e3 * max(compute, memory),
        "h100_bf16_at_mfu_ms": 1e3 * max(compute / mfu, memory),
    }


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return min(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak for the MFU projection")
    p.add_argument("--no-cpu", action="store_true", help="cost analysis only (no CPU timing)")
    args = p.parse_args()

    from jaxcodec.configlib import load_config
    from jaxcodec.methods import Variables, get_method
    from jaxcodec.nn import latent_compressor as lc
    from jaxcodec.nn.unet import unet_param_shapes
    from jaxcodec.nn.vae import vae_param_shapes
    from jaxcodec.weights.diffusers import random_params

    config = load_config("configs/rdeic.py:full")
    config.model.unet_dtype = "float32"
    config.model.remat = False
    method = get_method(config)  # model.sd_path '' → SD 2.1-base shapes
    shapes = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))
    params = random_params(shapes["params"], seed=0)
    rng = np.random.default_rng(0)
    vq = shapes["vq_stats"]["vq"]
    codebook = (rng.normal(size=vq["codebook"].shape) / 16).astype(np.float32)
    count = np.ones(vq["ema_count"].shape, np.float32)
    state = {"vq_stats": {"vq": {"codebook": codebook, "ema_count": count, "ema_sum": codebook}}}
    frozen = {
        "unet": random_params(unet_param_shapes(method.unet_config), seed=1),
        "vae": random_params(vae_param_shapes(method.vae_config), seed=2),
        "text": rng.normal(size=(1, 77, 1024)).astype(np.float32),
    }
    params, frozen = jax.tree.map(jnp.asarray, (params, frozen))
    cc = method.compressor_config

    # --- A real bitstream of a 768×512 image's latents: random VQ indices and a small random y
    # (most symbols round to the predicted mean, as at the paper's rates; with random weights the
    # size is not the paper's, the number of symbols coded is).
    t0 = time.perf_counter()
    tables = method.entropy_tables(Variables(jax.device_get(params), state, {}))
    tables_s = time.perf_counter() - t0
    y = (rng.normal(size=(HEIGHT // 16, WIDTH // 16, cc.M)) * 0.25).astype(np.float32)
    indices = rng.integers(0, cc.num_codes, (HEIGHT // 64, WIDTH // 64))
    coding = lc.LatentCoding()
    streams, y_hat, _ = coding.encode(tables, y, indices)
    num_bytes = sum(len(s) for s in streams)

    # --- The parts, jitted as the decoder runs them.
    comp = method.compressor
    vc = {"params": params["compressor"], **state}
    z_q = jnp.asarray(codebook[indices])[None]
    y_hat = jnp.asarray(y_hat)[None]

    def entropy_parameters(v, z_q, y_hat):  # h_s + both context passes of every group (float)
        hyper = comp.apply(v, z_q, method="hyper_synthesis")
        return comp.apply(v, y_hat, hyper, method=lambda m, y, h: m.context(y, h, train=False))

    synthesise = lambda v, y: comp.apply(v, y, method="synthesise")  # noqa: E731
    z_c, hint = jax.jit(synthesise)(vc, y_hat)
    ctx = method._context(frozen, 1)
    t = jnp.array([299])
    step = lambda p, f, z: method._eps_theta(p["adapter"], f["unet"], hint, ctx, z, t)  # noqa: E731
    vae_decode = lambda f, z: method._decode_latent(f, z)  # noqa: E731

    parts = {
        "entropy_parameters": (jax.jit(entropy_parameters), (vc, z_q, y_hat)),
        "synthesis": (jax.jit(synthesise), (vc, y_hat)),
        "denoise_step": (jax.jit(step), (params, frozen, z_c)),
        "vae_decoder": (jax.jit(vae_decode), (frozen, z_c)),
    }
    results = {}
    for name, (fn, fargs) in parts.items():
        compiled = fn.lower(*fargs).compile()
        r = _cost(compiled) | _h100_ms(_cost(compiled), args.mfu)
        if not args.no_cpu:
            r["cpu_s"] = _time(lambda fn=fn, fargs=fargs: fn(*fargs), args.repeats)
        results[name] = r
        print(f"{name:20s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)

    # Host entropy decoding of the real streams (fixed point + range coding), as the coder does.
    t0 = time.perf_counter()
    coding.decode(tables, streams, (HEIGHT // 64, WIDTH // 64))
    entropy_decode_s = time.perf_counter() - t0

    n = args.steps
    denoise = {k: n * results["denoise_step"][k] for k in ("gflop", "h100_bf16_roofline_ms")}
    rest_keys = ("entropy_parameters", "synthesis", "vae_decoder")
    rest = {k: sum(results[p][k] for p in rest_keys) for k in ("gflop", "h100_bf16_roofline_ms")}
    out = {
        "benchmark": "rdeic_decode",
        "image": f"{WIDTH}x{HEIGHT}",
        "steps": n,
        "bytes": num_bytes,
        "bpp": 8 * num_bytes / (HEIGHT * WIDTH),
        "parts": results,
        "entropy_decode_cpu_s": entropy_decode_s,
        "tables_build_s": tables_s,
        "denoise_gflop": denoise["gflop"],
        "rest_gflop": rest["gflop"],
        "h100_bf16_denoise_ms": denoise["h100_bf16_roofline_ms"],
        "h100_bf16_rest_ms": rest["h100_bf16_roofline_ms"],
        "h100_bf16_denoise_at_mfu_ms": n * results["denoise_step"]["h100_bf16_at_mfu_ms"],
        "h100_bf16_rest_at_mfu_ms": sum(results[p]["h100_bf16_at_mfu_ms"] for p in rest_keys),
        "mfu": args.mfu,
        "rtx4090_published_denoise_2_steps_s": RTX4090_PUBLISHED_S["denoise_2_steps"],
        "rtx4090_published_rest_s": RTX4090_PUBLISHED_S["rest_of_decoding"],
        "load_average": os.getloadavg()[0],
    }
    if not args.no_cpu:
        out["cpu_denoise_s"] = n * results["denoise_step"]["cpu_s"]
        out["cpu_rest_s"] = entropy_decode_s + sum(results[p]["cpu_s"] for p in rest_keys[1:])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
