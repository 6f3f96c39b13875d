"""DiffCR decoding of a 768×512 image at the full configuration: XLA cost per part, H100 projection.

The full model (SD 2.1-base UNet and VAE, OpenCLIP ViT-H/14's image tower, the official
compressor, FaSE and ProjLayer; random weights, float32) decodes a real bitstream of a 768×512
image's latents: host entropy decoding (VQ indices, fixed-point h_s and context networks, range
coding), g_s and ĉ, the UNet's context (the VAE decoder on ĉ, CLIP's image tower, ProjLayer —
the public decoder's conditioning), `--steps` consistency steps (frozen UNet + FaSE each), the VAE
decoder and the colour correction. For each part: XLA's cost analysis (FLOPs, bytes accessed),
the CPU time after a warm-up (unless `--no-cpu`: then the large parts are compiled from shapes
only, nothing allocated), and the projection onto one H100 at its dense bf16 peak (roofline
max(FLOPs / peak, bytes / HBM bandwidth), and at `--mfu` of the peak), next to the paper's
≈ 0.4 s per image (≤ 0.05 bpp, one GPU). XLA:CPU's byte counts are of unfused operations, so
the memory side of the roofline is pessimistic. The host entropy decoding is timed on this CPU
and reported apart (its integer networks run on the accelerator when there is one).

    .venv/bin/python benchmarks/diffcr_decode.py [--steps 2] [--no-cpu] [--condition clip]

With `--no-cpu` it needs about 4 GB of RAM and several minutes of compiling on a CPU (more with
CPU timing: every part's weights are drawn). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rdeic_decode import HEIGHT, WIDTH, _cost, _h100_ms, _time  # noqa: E402

PAPER_DECODE_S = 0.4  # DiffCR's reported decoding time per image (≤ 0.05 bpp, one GPU)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak for the MFU projection")
    p.add_argument("--no-cpu", action="store_true", help="cost analysis only (no CPU timing)")
    p.add_argument("--condition", default="clip", choices=("clip", "empty_prompt"))
    args = p.parse_args()

    from jaxcodec.configlib import load_config
    from jaxcodec.diffusion import consistency_timesteps
    from jaxcodec.methods import get_method
    from jaxcodec.nn import clip
    from jaxcodec.nn import latent_compressor as lc
    from jaxcodec.nn.unet import unet_param_shapes
    from jaxcodec.nn.vae import vae_param_shapes
    from jaxcodec.weights.diffusers import random_params

    config = load_config("configs/diffcr.py:full,stage=2")
    config.model.condition = args.condition
    config.model.unet_dtype = "float32"
    config.model.remat = False
    method = get_method(config)  # model.sd_path '' → SD 2.1-base shapes; CLIP ViT-H/14 shapes
    shapes = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))["params"]
    c1 = get_method(load_config("configs/diffcr.py:full"))
    comp_shapes = jax.eval_shape(c1.init, jax.random.key(0), c1.dummy_batch(1))
    rng = np.random.default_rng(0)
    vq = comp_shapes["vq_stats"]["vq"]
    codebook = (rng.normal(size=vq["codebook"].shape) / 16).astype(np.float32)
    count = np.ones(vq["ema_count"].shape, np.float32)
    comp = {
        "params": random_params(comp_shapes["params"]["compressor"], seed=0),
        "vq_stats": {"vq": {"codebook": codebook, "ema_count": count, "ema_sum": codebook}},
    }
    heavy = {
        "unet": unet_param_shapes(method.unet_config),
        "vae": vae_param_shapes(method.vae_config),
        "text": jax.ShapeDtypeStruct((2, 77, 1024), jnp.float32),
    }
    if args.condition == "clip":
        heavy["clip"] = clip.vision_param_shapes(method._vision_config)
    if args.no_cpu:  # shapes only: compile and read the costs, allocate nothing big
        import flax.linen as nn

        frozen = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(heavy)
        )  # fmt: skip
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nn.unbox(shapes))
    else:
        frozen = {k: random_params(v, seed=i + 1) for i, (k, v) in enumerate(heavy.items())}
        frozen["text"] = rng.normal(size=(2, 77, 1024)).astype(np.float32)
        params = jax.tree.map(jnp.asarray, random_params(shapes, seed=9))
        frozen = jax.tree.map(jnp.asarray, frozen)
    cc = method.compressor_config

    # --- A real bitstream of a 768×512 image's latents: random VQ indices and a small random y
    # (most symbols round to the predicted mean, as at the paper's rates; with random weights the
    # size is not the paper's, the number of symbols coded is).
    t0 = time.perf_counter()
    tables = lc.entropy_tables(cc, comp["params"], comp["vq_stats"])
    tables_s = time.perf_counter() - t0
    y = (rng.normal(size=(HEIGHT // 16, WIDTH // 16, cc.M)) * 0.25).astype(np.float32)
    indices = rng.integers(0, cc.num_codes, (HEIGHT // 64, WIDTH // 64))
    coding = lc.LatentCoding()
    streams, y_hat, _ = coding.encode(tables, y, indices)
    num_bytes = sum(len(s) for s in streams) + 8  # + start index and colour codes

    model = method.compressor
    vc = jax.tree.map(jnp.asarray, comp)
    z_q = jnp.asarray(codebook[indices])[None]
    y_hat = jnp.asarray(y_hat)[None]
    latent = (1, HEIGHT // 8, WIDTH // 8, 4)
    c_hat = jax.ShapeDtypeStruct(latent, jnp.float32)
    timesteps = consistency_timesteps(30, args.steps)  # a mid-grid start (host ints)

    def entropy_parameters(v, z_q, y_hat):  # h_s + both context passes of every group (float)
        hyper = model.apply(v, z_q, method="hyper_synthesis")
        return model.apply(v, y_hat, hyper, method=lambda m, y, h: m.context(y, h, train=False))

    def synthesise(v, f, y_hat):
        return method.c_hat(f, model.apply(v, y_hat, method="synthesise")[0])

    def step(p, f, c_hat, context, z):  # one consistency step: UNet ε → ẑ_0 → FaSE → boundary
        t = jnp.full((1,), int(timesteps[0]))
        return method.consistency_f(p["fase"], f["unet"], c_hat, context, z, t)[0]

    def vae_decode(f, z, codes):
        from jaxcodec.methods.diffcr import colour_correct

        return colour_correct((method._decode_latent(f, z) + 1.0) / 2.0, codes)

    context_shape = jax.eval_shape(method.context, params, frozen, c_hat)
    codes = jnp.asarray([[128, 120, 110, 60, 58, 55]], jnp.int32)
    parts = {
        "entropy_parameters": (entropy_parameters, (vc, z_q, y_hat)),
        "synthesis": (synthesise, (vc, frozen, y_hat)),
        "context": (method.context, (params, frozen, c_hat)),
        "denoise_step": (step, (params, frozen, c_hat, context_shape, c_hat)),
        "vae_decoder": (vae_decode, (frozen, c_hat, codes)),
    }
    results = {}
    for name, (fn, fargs) in parts.items():
        fn = jax.jit(fn)
        compiled = fn.lower(*fargs).compile()
        r = _cost(compiled) | _h100_ms(_cost(compiled), args.mfu)
        if not args.no_cpu:
            concrete = [
                jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a
                for a in fargs
            ]
            r["cpu_s"] = _time(lambda fn=fn, a=concrete: fn(*a), args.repeats)
        results[name] = r
        print(f"{name:20s} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)

    # Host entropy decoding of the real streams (fixed point + range coding), as the coder does.
    t0 = time.perf_counter()
    coding.decode(tables, streams, (HEIGHT // 64, WIDTH // 64))
    entropy_decode_s = time.perf_counter() - t0

    n = args.steps
    keys = ("gflop", "h100_bf16_roofline_ms", "h100_bf16_at_mfu_ms")
    other = ("entropy_parameters", "synthesis", "context", "vae_decoder")
    total = {k: n * results["denoise_step"][k] + sum(results[q][k] for q in other) for k in keys}
    out = {
        "benchmark": "diffcr_decode",
        "image": f"{WIDTH}x{HEIGHT}",
        "steps": n,
        "condition": args.condition,
        "bytes": num_bytes,
        "bpp": 8 * num_bytes / (HEIGHT * WIDTH),
        "parts": results,
        "entropy_decode_cpu_s": entropy_decode_s,
        "tables_build_s": tables_s,
        "denoise_gflop": n * results["denoise_step"]["gflop"],
        "total_gflop": total["gflop"],
        "h100_bf16_total_ms": total["h100_bf16_roofline_ms"],
        "h100_bf16_total_at_mfu_ms": total["h100_bf16_at_mfu_ms"],
        # device parts only: on an accelerator the entropy-parameter networks run there too
        # (integer programs, ~ the float entropy_parameters part); range coding stays on the host
        "h100_projected_device_s": total["h100_bf16_at_mfu_ms"] / 1e3,
        "mfu": args.mfu,
        "paper_decode_s": PAPER_DECODE_S,
        "load_average": os.getloadavg()[0],
    }
    if not args.no_cpu:
        out["cpu_total_s"] = (
            entropy_decode_s
            + n * results["denoise_step"]["cpu_s"]
            + sum(results[q]["cpu_s"] for q in other[1:])
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
