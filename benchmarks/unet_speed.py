"""SD 2.1-base speed on this machine: jaxcodec (jitted) vs diffusers/PyTorch, same random weights.

Times one UNet forward (batch 1, 64×64 latent, fp32, 77-token context) and the VAE decoder at
768×512 (latent 96×64), prints the ratios jaxcodec / PyTorch, the share of time spent in the
attention core (softmax(QKᵀ)V, timed alone at every shape the model uses, times its count),
and ends with one JSON line of headline figures.

    .venv/bin/python benchmarks/unet_speed.py [--repeats 3] [--impl auto] [--compare-xla]
        [--device cpu|cuda|auto] [--single-thread] [--profile]

``--profile`` adds where the time goes: every convolution, group norm and dense layer of the
forward (recorded from the model's own calls) timed alone in both frameworks.

JAX runs on its default backend; ``--device`` puts PyTorch on the same GPU (``auto``: when
PyTorch sees one; both then use TF32 for float32 matmuls and convolutions, JAX's GPU default).

Both frameworks use every core, or, with ``--single-thread``, the process is pinned to one core
(steadier when other jobs share the machine; the load average is printed with the numbers).
Needs about 10 GB of RAM.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

if "--single-thread" in sys.argv:  # before JAX and PyTorch start their thread pools
    # XLA:CPU's flags do not bound its threads (its matmuls and convolutions still use every
    # core), so the whole process is pinned to one core: both frameworks then run on it alone.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxcodec.nn import attention
from jaxcodec.nn.unet import SD21_BASE_UNET, UNet, UNetConfig, unet_param_shapes
from jaxcodec.nn.vae import SD21_BASE_VAE, AutoencoderKL, VAEConfig, vae_param_shapes
from jaxcodec.weights import diffusers as dw


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


DEVICE = "cpu"  # PyTorch's device (--device)


def _sync(out=None):
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    return out


def _jax_timer(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def _convert(module: torch.nn.Module, shapes) -> dict:
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    params = dw.state_dict_to_params(state, shapes)
    del state
    return jax.tree.map(jnp.asarray, params)


def _attention_times(shapes_counts, repeats, impl):
    """Seconds spent in the attention core per forward, for jaxcodec (impl) and PyTorch SDPA."""
    rng = np.random.default_rng(0)
    jax_total = torch_total = 0.0
    rows = []
    for (tq, tk, heads, dim), count in shapes_counts:
        q = jnp.asarray(rng.normal(size=(1, tq, heads, dim)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(1, tk, heads, dim)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(1, tk, heads, dim)), jnp.float32)
        f = jax.jit(functools.partial(attention.dot_product_attention, impl=impl))
        jax.block_until_ready(f(q, k, v))
        tj = min(_time(_jax_timer(f, q, k, v), repeats))
        tq_, tk_, tv_ = (
            torch.from_numpy(np.array(a)).permute(0, 2, 1, 3).contiguous().to(DEVICE)
            for a in (q, k, v)
        )
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.no_grad():
            sdpa(tq_, tk_, tv_)
            tt = min(_time(lambda: _sync(sdpa(tq_, tk_, tv_)), repeats))  # noqa: B023
        rows.append(
            dict(q=tq, k=tk, heads=heads, dim=dim, count=count, jax_ms=tj * 1e3, torch_ms=tt * 1e3)
        )
        jax_total += count * tj
        torch_total += count * tt
    return jax_total, torch_total, rows


def layer_calls(model: nn.Module, *args, method=None) -> dict[tuple, list]:
    """Every Conv, GroupNorm and Dense call of one forward, traced from shapes only:
    {(kind, input shape, settings): [count, the module unbound]}."""
    calls: dict[tuple, list] = {}

    def record(next_fun, a, kw, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, nn.Conv | nn.GroupNorm | nn.Dense):
            shape = tuple(a[0].shape)
            if isinstance(m, nn.Conv):
                key = ("conv", shape, (tuple(m.kernel_size), m.strides, m.features, m.padding))
            elif isinstance(m, nn.GroupNorm):
                key = ("group_norm", shape, (m.num_groups,))
            else:
                key = ("dense", shape, (m.features,))
            calls.setdefault(key, [0, m.clone(parent=None)])[0] += 1
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, *a: model.apply(p, *a, method=method), *args)
    return calls


def _torch_layer(kind: str, shape: tuple, settings: tuple):
    """The PyTorch counterpart of one recorded call (NCHW for images) and its input."""
    if kind == "conv":
        (kh, kw), strides, features, padding = settings
        stride = 1 if strides in (None, 1) else strides[0]
        pad = kh // 2 if padding == "SAME" or stride == 1 else padding[0][0]
        layer = torch.nn.Conv2d(shape[-1], features, (kh, kw), stride, pad)
        x = torch.randn(shape[0], shape[-1], *shape[1:-1])
    elif kind == "group_norm":
        layer = torch.nn.GroupNorm(settings[0], shape[-1])
        x = torch.randn(shape[0], shape[-1], *shape[1:-1])
    else:
        layer = torch.nn.Linear(shape[-1], settings[0])
        x = torch.randn(*shape)
    return layer.to(DEVICE), x.to(DEVICE)


def component_profile(model, variables, inputs, repeats: int, method=None) -> dict:
    """Seconds per forward in convolutions, group norms and dense layers, each call timed alone
    at its own shape in both frameworks (jitted in JAX), times its count: where the time goes
    beside the attention core. Fusion with neighbouring element-wise ops is not counted."""
    calls = layer_calls(model, variables, *inputs, method=method)
    totals: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    for (kind, shape, settings), (count, mod) in calls.items():
        layer, xt = _torch_layer(kind, shape, settings)
        with torch.no_grad():
            layer(xt)
            tt = min(_time(lambda: _sync(layer(xt)), repeats))  # noqa: B023
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        p = nn.unbox(mod.init(jax.random.key(0), x))
        f = jax.jit(mod.apply)
        jax.block_until_ready(f(p, x))
        tj = min(_time(_jax_timer(f, p, x), repeats))
        row = totals.setdefault(kind, [0.0, 0.0, 0])
        row[0] += count * tj
        row[1] += count * tt
        row[2] += count
    return {k: {"jax_s": v[0], "torch_s": v[1], "calls": v[2]} for k, v in totals.items()}


def _print_profile(prof: dict, results: dict, prefix: str) -> None:
    for kind, r in prof.items():
        print(
            f"  {kind:<11} x{r['calls']:>3}: jaxcodec {r['jax_s']:.3f}s  PyTorch "
            f"{r['torch_s']:.3f}s  ratio {r['jax_s'] / r['torch_s']:.2f}x"
        )
        results[f"{prefix}_{kind}_jax_s"] = round(r["jax_s"], 4)
        results[f"{prefix}_{kind}_torch_s"] = round(r["torch_s"], 4)


def unet_attention_shapes(config: UNetConfig, h: int, w: int, context_len: int):
    """((q tokens, k tokens, heads, head dim), count) for every attention call of one forward."""
    shapes: dict = {}
    n = len(config.block_out_channels)
    for i, kind in enumerate(config.down_block_types):
        hh, ww = h // 2**i, w // 2**i
        levels = config.layers_per_block if kind.startswith("CrossAttn") else 0
        ups = (
            config.layers_per_block + 1
            if config.up_block_types[n - 1 - i].startswith("CrossAttn")
            else 0
        )
        heads = config.heads[i]
        dim = config.block_out_channels[i] // heads
        for key in [(hh * ww, hh * ww, heads, dim), (hh * ww, context_len, heads, dim)]:
            shapes[key] = shapes.get(key, 0) + levels + ups
    hh, ww = h // 2 ** (n - 1), w // 2 ** (n - 1)
    heads = config.heads[-1]
    dim = config.block_out_channels[-1] // heads
    for key in [(hh * ww, hh * ww, heads, dim), (hh * ww, context_len, heads, dim)]:
        shapes[key] = shapes.get(key, 0) + 1
    return [(k, c) for k, c in shapes.items() if c]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", default="auto", choices=attention.ATTENTION_IMPLS)
    parser.add_argument("--compare-xla", action="store_true", help="also time impl='xla'")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time every convolution, group norm and dense layer alone (minutes)",
    )
    parser.add_argument(
        "--single-thread",
        action="store_true",
        help="pin the process to one core (steadier ratios when other jobs share the machine)",
    )
    parser.add_argument("--device", default="cpu", help="PyTorch's device: cpu, cuda or auto")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "auto":
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if DEVICE != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.single_thread:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({DEVICE}, {torch.get_num_threads()} threads), {os.cpu_count()} cpus, load avg {load:.1f}"
    )
    import diffusers

    results: dict = {
        "load_avg_start": round(load, 2),
        "repeats": args.repeats,
        "threads": 1 if args.single_thread else os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "torch_device": DEVICE,
    }

    # ------------------------------------------------------------------ UNet
    g = torch.Generator().manual_seed(1)
    if not args.skip_unet:
        cfg = {k: v for k, v in SD21_BASE_UNET.items() if not k.startswith("_")}
        ref = diffusers.UNet2DConditionModel(**cfg).eval()
        config = UNetConfig.from_diffusers(SD21_BASE_UNET, attention_impl=args.impl)
        params = _convert(ref, unet_param_shapes(config))
        ref = ref.to(DEVICE)
        x = torch.randn(1, 4, 64, 64, generator=g)
        ctx = torch.randn(1, 77, 1024, generator=g)
        t = torch.tensor([500.0])
        xd, td, cd = (a.to(DEVICE) for a in (x, t, ctx))

        with torch.no_grad():
            want = ref(xd, td, encoder_hidden_states=cd).sample.cpu()  # warm-up
            torch_times = _time(lambda: _sync(ref(xd, td, encoder_hidden_states=cd)), args.repeats)
        xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
        tj, cj = jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())

        def run_jax(impl):
            model = UNet(dataclasses.replace(config, attention_impl=impl))
            fn = jax.jit(lambda p, a, b, c: model.apply({"params": p}, a, b, c))
            start = time.perf_counter()
            out = jax.block_until_ready(fn(params, xj, tj, cj))
            compile_s = time.perf_counter() - start
            times = _time(_jax_timer(fn, params, xj, tj, cj), args.repeats)
            err = float(np.abs(np.asarray(out) - want.numpy().transpose(0, 2, 3, 1)).max())
            return times, compile_s, err

        jax_times, compile_s, err = run_jax(args.impl)
        t_torch, t_jax = min(torch_times), min(jax_times)
        att_jax, att_torch, rows = _attention_times(
            unet_attention_shapes(config, 64, 64, 77), args.repeats, args.impl
        )
        print("\nUNet forward, SD 2.1-base, 1x4x64x64 fp32")
        print(f"  PyTorch   min {t_torch:.3f}s  median {statistics.median(torch_times):.3f}s")
        print(
            f"  jaxcodec  min {t_jax:.3f}s  median {statistics.median(jax_times):.3f}s  "
            f"(impl={args.impl}, first call incl. compile {compile_s:.1f}s)"
        )
        print(f"  ratio jaxcodec/PyTorch {t_jax / t_torch:.2f}x   max|diff| {err:.2e}")
        print(
            f"  attention core: jaxcodec {att_jax:.3f}s ({100 * att_jax / t_jax:.0f}% of forward), "
            f"PyTorch {att_torch:.3f}s ({100 * att_torch / t_torch:.0f}%)"
        )
        for r in rows:
            print(
                f"    q{r['q']:>5} k{r['k']:>5} {r['heads']:>2}x{r['dim']} x{r['count']:>2}: "
                f"jaxcodec {r['jax_ms']:8.2f} ms  PyTorch {r['torch_ms']:8.2f} ms"
            )
        results.update(
            unet_torch_s=round(t_torch, 4),
            unet_jax_s=round(t_jax, 4),
            unet_ratio=round(t_jax / t_torch, 3),
            unet_max_abs_diff=err,
            unet_impl=args.impl,
            unet_compile_s=round(compile_s, 1),
            unet_attention_share_jax=round(att_jax / t_jax, 3),
            unet_attention_share_torch=round(att_torch / t_torch, 3),
        )
        if args.profile:
            model = UNet(config)
            prof = component_profile(model, {"params": params}, (xj, tj, cj), args.repeats)
            _print_profile(prof, results, "unet")
        if args.compare_xla and args.impl != "xla":
            xla_times, _, _ = run_jax("xla")
            att_xla, _, _ = _attention_times(
                unet_attention_shapes(config, 64, 64, 77), args.repeats, "xla"
            )
            print(
                f"  impl=xla: min {min(xla_times):.3f}s, ratio {min(xla_times) / t_torch:.2f}x, "
                f"attention {att_xla:.3f}s ({100 * att_xla / min(xla_times):.0f}%)"
            )
            results.update(
                unet_xla_s=round(min(xla_times), 4),
                unet_xla_ratio=round(min(xla_times) / t_torch, 3),
            )
        ref = params = None  # free ~7 GB before the VAE

    # ------------------------------------------------------------------ VAE decoder
    if not args.skip_vae:
        vref = diffusers.AutoencoderKL(
            **{k: v for k, v in SD21_BASE_VAE.items() if not k.startswith("_")}
        ).eval()
        vconfig = VAEConfig.from_diffusers(SD21_BASE_VAE, attention_impl=args.impl)
        vparams = _convert(vref, vae_param_shapes(vconfig))
        vref = vref.to(DEVICE)
        z = torch.randn(1, 4, 96, 64, generator=g)
        zd = z.to(DEVICE)
        with torch.no_grad():
            vwant = vref.decode(zd).sample.cpu()
            vtorch = _time(lambda: _sync(vref.decode(zd)), args.repeats)
        vae = AutoencoderKL(vconfig)
        dec = jax.jit(lambda p, a: vae.apply({"params": p}, a, method=AutoencoderKL.decode))
        zj = jnp.asarray(z.numpy().transpose(0, 2, 3, 1))
        start = time.perf_counter()
        out = jax.block_until_ready(dec(vparams, zj))
        vcompile = time.perf_counter() - start
        vjax = _time(_jax_timer(dec, vparams, zj), args.repeats)
        verr = float(np.abs(np.asarray(out) - vwant.numpy().transpose(0, 2, 3, 1)).max())
        vatt_jax, vatt_torch, _ = _attention_times(
            [((6144, 6144, 1, 512), 1)], args.repeats, args.impl
        )
        vt, vj = min(vtorch), min(vjax)
        print("\nVAE decoder, latent 1x4x96x64 -> 768x512 image, fp32")
        print(
            f"  PyTorch {vt:.3f}s  jaxcodec {vj:.3f}s (compile {vcompile:.1f}s)  "
            f"ratio {vj / vt:.2f}x  max|diff| {verr:.2e}"
        )
        print(
            f"  attention core: jaxcodec {100 * vatt_jax / vj:.0f}%, "
            f"PyTorch {100 * vatt_torch / vt:.0f}%"
        )
        if args.profile:
            prof = component_profile(
                vae, {"params": vparams}, (zj,), args.repeats, method=AutoencoderKL.decode
            )
            _print_profile(prof, results, "vae_decoder")
        results.update(
            vae_decoder_torch_s=round(vt, 4),
            vae_decoder_jax_s=round(vj, 4),
            vae_decoder_ratio=round(vj / vt, 3),
            vae_decoder_max_abs_diff=verr,
            vae_attention_share_jax=round(vatt_jax / vj, 3),
            vae_attention_share_torch=round(vatt_torch / vt, 3),
        )
    results["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
