"""Configs: the fields every method's config shares, big_vision-style arguments
(`configs/rdeic.py:full,stage=2,lambda_r=0.5`), and loading them the way the command line
does, for scripts, tests and the CLI."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def parse_arg(arg: str | None, *, variants: Sequence[str], **defaults: Any) -> dict[str, Any]:
    """`'VARIANT,key=value,...'` → {'variant': ..., key: value}, each value converted to the
    type of its default; unknown keys and variants are errors naming what exists."""
    out = {"variant": variants[0], **defaults}
    for i, item in enumerate(p for p in (arg or "").split(",") if p):
        key, sep, value = item.partition("=")
        if not sep and i == 0:
            out["variant"] = key
        elif sep and key in defaults:
            out[key] = type(defaults[key])(value)
        else:
            raise ValueError(f"unknown config argument {item!r}; takes {sorted(defaults)}")
    if out["variant"] not in variants:
        raise ValueError(f"unknown variant {out['variant']!r}; choose from {tuple(variants)}")
    return out


def base_config(method: str, variant: str, stage: int = 1) -> ml_collections.ConfigDict:
    """The fields the training loop reads, with defaults every method shares; a method's
    config file sets its model, loss, data and decode fields and overrides the rest."""
    from jaxcodec.data import default_data_config

    c = ml_collections.ConfigDict()
    c.variant = variant
    c.method = method
    c.stage = stage
    c.stages = ()  # stages trained in order, in WORKDIR/stageN; () = `stage`, in WORKDIR
    c.init_from = ""  # workdir (or codec bundle) of the previous stage
    c.seed = 0

    c.data = default_data_config(source="skimage", crop_size=256)
    c.eval_data = default_data_config(source="skimage")
    c.eval_data.max_images = 4
    c.batch_size = 8  # global, split over every data-parallel device and process

    # Adam with warm-up and a schedule ('constant', 'cosine' to end_factor·lr, or 'step':
    # ×decay_factor at each fraction in decay_at), global-norm clipping; entropy-bottleneck
    # quantiles have their own learning rate; `frozen` regexes keep parameters fixed.
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            schedule="cosine",
            end_factor=0.1,
            warmup_steps=0,
            decay_at=(),
            decay_factor=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=1.0,
            aux_lr=1e-3,
            frozen=(),  # regexes over parameter paths, e.g. ('g_a/.*',)
        )
    )
    c.ema_decay = 0.999

    c.total_steps = 1_000_000
    c.log_every = 100
    c.eval_every = 5_000  # 0 disables evaluation, also at the end
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3
    # Async saves overlap writing with training at the cost of a device copy of the state.
    c.checkpoint_async = False
    c.max_consecutive_nonfinite = 20
    c.num_eval_images_logged = 2
    # At the end, compress the evaluation images to real .jxc files (workdir/final_eval) and
    # report their measured bpp, PSNR and LPIPS.
    c.real_file_eval = True

    # Efficiency switches (they combine): the global batch is split into `grad_accum_steps`
    # micro-batches whose gradients are averaged before one optimiser step (activations of one
    # micro-batch live at a time); `prefetch` device batches are transferred ahead of the step;
    # the train state is donated to the step. Compute dtypes (bf16 activations, fp32 master
    # weights) and rematerialisation are model fields (`dtype`/`remat` of the UNet and VAE
    # configs; RDEIC: `model.unet_dtype`, `model.remat`).
    c.grad_accum_steps = 1
    c.prefetch = 2
    # Peak dense TFLOP/s of one device for the MFU on the console; 0 = built in for the device
    # kind (TPU v2-v6e, A100, H100, H200, B200, L4, MI300X; see jaxcodec.throughput).
    c.peak_tflops = 0.0

    # Mesh: data parallel by default (`shape=(1, -1, 1)`: FSDP over every device). The rules
    # map the logical axes of parameters and activations to mesh axes, first match wins and a
    # mesh axis is used once per array (flax's logical_to_mesh_axes); names without a rule are
    # not split. Names (maxdiffusion's, jaxcodec.nn.layers):
    #   batch       activations' batch dimension → every data-parallel axis
    #   conv_out    conv kernel [kh, kw, in, out] output channels, conv biases, GDN rows → fsdp
    #   conv_in     conv kernel input channels, GDN columns → not split (fsdp holds conv_out)
    #   embed       model width of dense kernels / embeddings (UNet, CLIP, attention) → fsdp
    #   mlp, heads  feed-forward hidden units, attention heads (in/out projections) → tensor
    #   vocab       token embedding rows (CLIP) → tensor
    #   norm        group/layer-norm scales and biases → replicated
    #   entropy_channels  per-channel factorized densities → replicated (tiny)
    #   height, width, length  spatial / token activation axes → not split
    # A dimension the mapped mesh axes do not divide stays whole; an array the rules split over
    # fsdp but whose fsdp dimension fsdp does not divide, and any array of at least
    # `fsdp_min_bytes` left without an fsdp axis, are split over fsdp along their largest
    # divisible dimension (big_vision's size-gated fsdp; -1 disables the size gate).
    c.mesh = ml_collections.ConfigDict(
        dict(
            shape=(-1, 1, 1),
            axes=("data", "fsdp", "tensor"),
            num_devices=0,  # 0 = all devices
            fsdp_min_bytes=4 * 2**20,
            logical_axis_rules=(
                ("batch", ("data", "fsdp")),
                ("conv_out", "fsdp"),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
                ("vocab", "tensor"),
                ("conv_in", None),
                ("norm", None),
                ("entropy_channels", None),
                ("height", None),
                ("width", None),
                ("length", None),
            ),
        )
    )
    return c


def sd_method_variant(c: ml_collections.ConfigDict, variant: str, *, lr: float, crop: int = 64):
    """The run settings RDEIC, DiffCR and ResULIC share per variant: `tiny` trains in seconds
    on scikit-image's photos on a CPU (its model sizes are the method's own); `full` is SD
    2.1-base in bf16 with remat, FSDP over every device, evaluated on the 24 Kodak images."""
    from jaxcodec.data import default_data_config

    if variant == "tiny":
        c.data = default_data_config(source="skimage", crop_size=crop)
        c.eval_data.max_images = 2
        c.batch_size = 4
        c.optimizer.lr = lr
        c.total_steps = 200
        c.log_every = 20
        c.eval_every = 200
        c.checkpoint_every = 100
        c.ema_decay = 0.9
    elif variant == "full":
        c.model.unet_dtype = "bfloat16"
        c.model.remat = True
        c.data.num_workers = 8
        c.eval_data = default_data_config(source="folder")
        c.eval_data.path = "../shared/data/kodak"
        c.eval_data.max_images = 24
        c.mesh.shape = (1, -1, 1)  # FSDP over every device; the batch splits over it too


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py[:variant]`; overrides are `--config.a.b=value` strings (or the
    same without the leading `--config.`), parsed exactly as `python -m jaxcodec.train` does."""
    path, _, variant = spec.partition(":")
    if not Path(path).exists() and (PROJECT_ROOT / path).exists():
        path = str(PROJECT_ROOT / path)
    if not Path(path).exists():
        raise FileNotFoundError(f"config file {path!r} not found")
    argv = ["load_config", f"--config={path}{':' + variant if variant else ''}"]
    for o in overrides:
        argv.append(o if o.startswith("--") else f"--config.{o}")
    fv = flags.FlagValues()
    # Override flags are declared from the argv the config flag is told about.
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def stage_config(config: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
    """The config one stage trains with: a copy with `stage` set and the fields of the
    `stage<N>` block (if any) laid over the top level, recursively."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.stage = int(stage)
    block = config.get(f"stage{stage}")
    if block is not None:
        _overlay(out, block.to_dict())
    return out


def _overlay(config: ml_collections.ConfigDict, fields: dict) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _overlay(config[key], value)
        else:
            config[key] = value


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote into its workdir."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json: is it a jaxcodec training workdir?")
    return ml_collections.ConfigDict(_json_load(path))


def _json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
