"""`jaxcodec import-weights --format F SOURCE OUTPUT`: public checkpoints → jaxcodec files.

The converters in :mod:`jaxcodec.weights` only map foreign state dicts to parameters; this
command layer builds what a user runs: a VQGAN weights file (``vqgan``) or a codec bundle
with its integer entropy tables (``rdeic``, ``resulic``, ``diffcr``, ``diffo``). Every importer
returns a report that names every key of the checkpoints it left out, with the reason (by count
where there are hundreds).

- ``vqgan``: taming's VQGAN (DiffO's GT latent space) → a file for ``model.vqgan_path``.
- ``rdeic``: an official RDEIC checkpoint (or a bare ``Compression`` / ``NoiseEstimator`` state
  dict: the other module starts fresh) + SD 2.1-base from ``--sd`` → a codec bundle; the
  official run-time ``control_scale`` is ``--control-scale``.
- ``resulic``: an official ResULIC checkpoint (ELIC + CDDM, or either alone) + SD 2.1-base from
  ``--sd`` → a codec bundle of one rate point (``add_steps`` in ``--config``).
- ``diffcr``: an official DiffCR checkpoint (compressor, FaSE, ProjLayer) + SD 2.1-base from
  ``--sd`` → a stage-2 codec bundle (the compressor a frozen stage-1 part).
- ``diffo``: DiffO's Swin-UNet (``ema_model_*.pth``) + base-code autoencoder (``--base
  vq_model_*.pth.tar``) + an imported VQGAN (``--vqgan``) → a codec bundle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# Skipped keys are listed by name up to this many per reason, else counted.
LIST_LIMIT = 40


def describe_skipped(skipped: Mapping[str, list[str]], limit: int = LIST_LIMIT) -> list[str]:
    """One line per reason: the keys by name, or their count when there are more than
    ``limit``."""
    lines = []
    for reason, keys in skipped.items():
        if len(keys) <= limit:
            lines.append(f"skipped {len(keys)} ({reason}): {', '.join(keys)}")
        else:
            lines.append(f"skipped {len(keys)} keys ({reason}), e.g. {keys[0]}")
    return lines


def _fresh_variables(method, seed: int, select: Callable[[dict], Any]) -> Any:
    """``select`` of the method's initial variables, on the host. Jitted, so only what
    ``select`` keeps is computed (frozen parts built inside `init`, and the modules a
    checkpoint provides, are dead code)."""
    import flax.linen as nn
    import jax

    from jaxcodec.train_shapes import jit_init

    init = lambda key: select(nn.unbox(method.init(key, method.dummy_batch(1))))  # noqa: E731
    return jax.tree.map(np.asarray, jit_init(init, jax.random.key(seed)))


def _variable_shapes(method) -> dict:
    import flax.linen as nn
    import jax

    return nn.unbox(jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1)))


def _save_bundle(method, config, params, state, output) -> None:
    from jaxcodec.checkpoint import save_bundle
    from jaxcodec.codec import build_bundle, load_frozen

    _, identity = load_frozen(method, {}, "import-weights")
    save_bundle(output, build_bundle(method, config, params, state, {}, identity, step=0))


# ----------------------------------------------------------------------------- formats


def import_vqgan(source, output, config_spec: str | None = None) -> str:
    """taming's VQGAN → jaxcodec VQGAN file; the architecture is the config's ``model.vqgan``
    (default `configs/diffo.py:full`: taming's f16, 16384 codes)."""
    from jaxcodec.configlib import load_config
    from jaxcodec.nn.vae import VAEConfig
    from jaxcodec.weights import taming

    config = load_config(config_spec or "configs/diffo.py:full")
    vqgan = VAEConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.model.vqgan.items()}
    )
    info = taming.import_vqgan(source, output, vqgan)
    lines = [
        f"VQGAN with {info['parameters']:,} parameters and codebook {info['codebook']}; "
        "use it with --config.model.vqgan_path",
        *describe_skipped(info["skipped"]),
    ]
    return "\n".join(lines)


def import_rdeic(
    source,
    output,
    config_spec: str | None = None,
    *,
    sd: str | None = None,
    control_scale: float = 1.0,
    seed: int = 0,
) -> str:
    """An official RDEIC checkpoint → a codec bundle (default config
    `configs/rdeic.py:full,stage=2`: the released models are fine-tuned). A module the
    checkpoint lacks starts from the method's initialisation (``seed``); the adapter's zero
    convolutions then make the controlled UNet the plain SD UNet."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.weights import rdeic

    config = load_config(config_spec or "configs/rdeic.py:full,stage=2")
    if sd:
        config.model.sd_path = str(sd)
    if not config.model.sd_path:
        raise ValueError(
            "import-weights --format rdeic needs --sd SD_FOLDER (SD 2.1-base, diffusers)"
        )
    method = get_method(config)
    params, state, r = rdeic.from_official(
        rdeic.read_checkpoint(source),
        method.compressor_config,
        method.unet_config,
        method.adapter_config,
        control_scale=control_scale,
    )
    if r["absent"]:

        def select(v):
            fresh = {m: v["params"][m] for m in r["absent"]}
            return fresh, v["vq_stats"] if "compressor" in r["absent"] else None

        fresh, vq_stats = _fresh_variables(method, seed, select)
        params.update(fresh)
        if vq_stats is not None:
            state["vq_stats"] = vq_stats
    _save_bundle(method, config, params, state, output)
    parts = []
    if "compressor" not in r["absent"]:
        parts.append(
            f"compressor {r['compressor_parameters']:,} parameters + codebook {r['codebook']}"
        )
    if "adapter" not in r["absent"]:
        lo, hi = min(r["scales"]), max(r["scales"])
        folded = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
        parts.append(
            f"adapter {r['adapter_parameters']:,} (scale_list × control_scale {control_scale:g} "
            f"folded into the zero convolutions: {folded})"
        )
    lines = [f"RDEIC codec bundle: {', '.join(parts)}"]
    for module in r["absent"]:
        held = "Compression" if module == "adapter" else "NoiseEstimator"
        plain = ", so the controlled UNet is the plain SD UNet" if module == "adapter" else ""
        lines.append(
            f"{module}: not in the checkpoint (a bare {held} state dict): starts fresh "
            f"(seed {seed}){plain}"
        )
    lines += describe_skipped(r["skipped"])
    lines.append("use it with jaxcodec compress/decompress/evaluate --checkpoint")
    return "\n".join(lines)


def import_diffo(
    source,
    output,
    config_spec: str | None = None,
    *,
    base: str | None = None,
    vqgan: str | None = None,
    seed: int = 0,
) -> str:
    """DiffO's Swin-UNet checkpoint (``source``) and base-code autoencoder (``base``) → a codec
    bundle on the frozen VQGAN ``vqgan`` (a file of ``--format vqgan``; default: the config's
    ``model.vqgan_path``). Default config `configs/diffo.py:full`; the Swin layers use the
    ``resshift`` shift mask the official weights were trained with. Rate point 0 is the
    official model; jaxcodec's further residual-VQ stages and its noise-level embedding
    (zero) are not in the official model."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.weights import taming

    config = load_config(config_spec or "configs/diffo.py:full")
    if vqgan:
        config.model.vqgan_path = str(vqgan)
    if not base:
        raise ValueError("import-weights --format diffo needs --base VQ_MODEL (vq_model_*.pth.tar)")
    if not config.model.vqgan_path:
        raise ValueError(
            "import-weights --format diffo needs --vqgan VQGAN.safetensors "
            "(taming's GT VQGAN imported with --format vqgan)"
        )
    lines = []
    if config.model.unet.swin_shift_mask != "resshift":
        lines.append(
            f"swin_shift_mask: {config.model.unet.swin_shift_mask!r} → 'resshift' "
            "(the mask the official weights were trained with)"
        )
        config.model.unet.swin_shift_mask = "resshift"
    method = get_method(config)
    c = method.unet_config
    params, state, r = taming.diffo_params(
        taming.read_checkpoint(source),
        taming.read_checkpoint(base),
        _variable_shapes(method)["params"],
        layers_per_block=c.layers_per_block,
        num_levels=len(c.block_out_channels),
    )
    # the residual-VQ stages the official model lacks keep their initialisation
    fresh = _fresh_variables(method, seed, lambda v: {k: x for k, x in v.items() if k != "params"})
    vq_stats = dict(fresh["vq_stats"])
    vq_stats["rvq"] = {**vq_stats["rvq"], **state["vq_stats"]["rvq"]}
    _save_bundle(method, config, params, {**fresh, "vq_stats": vq_stats}, output)
    import jax

    count = lambda tree: sum(int(np.size(a)) for a in jax.tree.leaves(tree))  # noqa: E731
    lines.insert(
        0,
        f"DiffO codec bundle: Swin-UNet {count(params['denoiser']):,} parameters, base-code "
        f"autoencoder {count(params['base']):,} + codebook "
        f"{state['vq_stats']['rvq']['stage_0']['codebook'].shape} (rate point 0), "
        f"VQGAN {config.model.vqgan_path}",
    )
    extra = sorted(set(vq_stats["rvq"]) - {"stage_0"})
    if extra:
        lines.append(f"not in the official model, kept at initialisation: rvq {', '.join(extra)}")
    lines += describe_skipped(r["skipped"])
    lines.append("use it with jaxcodec compress/decompress/evaluate --checkpoint")
    return "\n".join(lines)


def import_resulic(
    source, output, config_spec: str | None = None, *, sd: str | None = None, seed: int = 0
) -> str:
    """An official ResULIC checkpoint (``preprocess_model.*`` ELIC, ``control_model.*`` CDDM;
    or a bare module's state dict, the other starting from the method's initialisation) → a
    codec bundle. The default config is `configs/resulic.py:full,stage=2`; one model is one
    rate point: give its start step, `--config 'configs/resulic.py:full,stage=2,add_steps=N'`."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.weights import resulic

    config = load_config(config_spec or "configs/resulic.py:full,stage=2")
    if sd:
        config.model.sd_path = str(sd)
    if not config.model.sd_path:
        raise ValueError("import-weights --format resulic needs --sd SD_FOLDER (SD 2.1-base)")
    method = get_method(config)
    params, r = resulic.from_official(
        resulic.read_checkpoint(source),
        method.compressor_config,
        method.unet_config,
        method.adapter_config,
    )
    if r["absent"]:
        params.update(
            _fresh_variables(method, seed, lambda v: {m: v["params"][m] for m in r["absent"]})
        )
    _save_bundle(method, config, params, {}, output)
    parts = []
    if "compressor" not in r["absent"]:
        parts.append(f"ELIC {r['compressor_parameters']:,} parameters")
    if "adapter" not in r["absent"]:
        lo, hi = min(r["scales"]), max(r["scales"])
        folded = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
        parts.append(
            f"CDDM adapter {r['adapter_parameters']:,} (scale_list folded into the zero "
            f"convolutions: {folded})"
        )
    lines = [f"ResULIC codec bundle (add_steps {method.start}): {', '.join(parts)}"]
    for module in r["absent"]:
        lines.append(f"{module}: not in the checkpoint: starts fresh (seed {seed})")
    lines += describe_skipped(r["skipped"])
    lines.append("use it with jaxcodec compress/decompress/evaluate --checkpoint")
    return "\n".join(lines)


def import_diffcr(source, output, config_spec: str | None = None, *, sd: str | None = None) -> str:
    """`jaxcodec import-weights --format diffcr CKPT OUT --sd SD_FOLDER [--config SPEC]`: an
    official checkpoint (:mod:`jaxcodec.weights.diffcr`) → a stage-2 codec bundle (FaSE and
    ProjLayer trained, the compressor a frozen stage-1 part; integer tables built from the
    imported weights; the SD parts identified by digest from ``model.sd_path``). The default
    config is `configs/diffcr.py:full,stage=2`."""
    from jaxcodec.checkpoint import save_bundle
    from jaxcodec.codec import build_bundle, load_frozen
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.weights import diffcr as converter

    config = load_config(config_spec or "configs/diffcr.py:full,stage=2")
    if sd:
        config.model.sd_path = str(sd)
    if not config.model.sd_path:
        raise ValueError("import-weights --format diffcr needs --sd SD_FOLDER (SD 2.1-base)")
    if int(config.stage) != 2:
        raise ValueError("the released DiffCR models import into a stage-2 config")
    method = get_method(config)
    params, state, quant, report = converter.from_official(
        converter.read_checkpoint(source),
        method.compressor_config,
        method.fase_config,
        method.proj_dims,
    )
    need = {"compressor", "fase"} | ({"proj"} if method.proj_dims else set())
    if need - set(params):
        raise ValueError(f"{source} holds no {sorted(need - set(params))} of DiffCR")
    stage1 = {"compressor": {"params": params.pop("compressor"), **state}}
    frozen, identity = load_frozen(method, stage1, f"{source} (imported)")
    for name, got in quant.items():  # ĉ uses the VAE's own quant_conv: they must agree
        want = frozen["vae"][name]
        for leaf in ("kernel", "bias"):
            diff = np.abs(np.asarray(got[leaf]) - np.asarray(want[leaf])).max()
            if diff > 1e-3 * max(np.abs(np.asarray(want[leaf])).max(), 1e-6):
                raise ValueError(
                    f"{source}: compress_model.{converter.QUANT[name]} differs from the VAE's "
                    f"{name} in {config.model.sd_path} (max |Δ| {diff:.3g}): another SD VAE?"
                )
    bundle = build_bundle(method, config, params, {}, stage1, identity, step=0)
    save_bundle(output, bundle)
    counts = ", ".join(f"{k} {v:,}" for k, v in report["parameters"].items())
    ignored = f"; ignored {len(report['ignored'])} SD/schedule keys" if report["ignored"] else ""
    if report["rebuilt"]:
        ignored += f"; not read (integer tables rebuilt): {', '.join(report['rebuilt'])}"
    return (
        f"DiffCR codec bundle: {counts} parameters + codebook{ignored}; quant pair "
        f"{'checked against the VAE' if quant else 'absent (the VAE’s is used)'}; "
        "use it with jaxcodec compress/decompress/evaluate --checkpoint"
    )


FORMATS: dict[str, Callable[..., str]] = {
    "vqgan": import_vqgan,
    "rdeic": import_rdeic,
    "diffo": import_diffo,
    "resulic": import_resulic,
    "diffcr": import_diffcr,
}


def run(fmt: str, source: str | os.PathLike, output, config_spec=None, **options: Any) -> str:
    """The importer of format ``fmt``; options it does not take are refused by name."""
    import inspect

    convert = FORMATS[fmt]
    accepted = inspect.signature(convert).parameters
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(k for k in given if k not in accepted)
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ValueError(f"import-weights --format {fmt} does not take {flags}")
    return convert(source, output, config_spec, **given)
