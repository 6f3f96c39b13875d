"""HFD (Hoogeboom et al. 2023). Variants: `configs/hfd.py:tiny` | `:base` | `:full`.

tiny  — minutes on a 2-core CPU, scikit-image's photos (no data to download).
base  — one accelerator, a folder of training photos (`--config.data.path=...`).
full  — paper scale on a pod (CLIC via tfds; batch and steps of the published setup).
Every field can be overridden on the command line, e.g. `--config.loss.lmbda=0.0018`.
"""

import ml_collections

from jaxcodec.data import default_data_config

VARIANTS = ("tiny", "base", "full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/hfd.py; choose from {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.method = "hfd"
    c.stage = 1
    c.init_from = ""  # workdir (or codec bundle) of the previous stage
    c.seed = 0

    # --- Model: stage 1 is a hyperprior autoencoder with, as in HFD, an ELIC-style entropy
    # model ('elic': checkerboard + channel-group context over context_groups, channel counts
    # summing to M, empty = the default for M) or a plain mean–scale one ('hyperprior'). The
    # hyper latent has a factorized prior, or 'vq': indices of a num_codes codebook.
    c.model = ml_collections.ConfigDict(
        dict(
            N=128,
            M=192,
            entropy_model="elic",
            context_groups=(),
            hyper="factorized",
            num_codes=16384,
        )
    )
    # R + λ·255²·MSE; λ sets the rate point (CompressAI's scale: 0.0018 ≈ 0.1 bpp on Kodak).
    c.loss = ml_collections.ConfigDict(dict(lmbda=0.0035))

    # --- Data.
    c.data = default_data_config(source="skimage", crop_size=256)
    c.eval_data = default_data_config(source="skimage")
    c.eval_data.max_images = 4
    c.batch_size = 8  # global, split over every data-parallel device and process

    # --- Optimiser: Adam with warm-up and cosine decay, global-norm clipping; the entropy
    # bottleneck's quantiles get their own learning rate (CompressAI's aux optimiser).
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

    # --- Steps, logging, checkpoints.
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
    # report their measured bpp and PSNR.
    c.real_file_eval = True

    # --- Mesh: data parallel by default; rules map logical parameter axes to mesh axes.
    c.mesh = ml_collections.ConfigDict(
        dict(
            shape=(-1, 1, 1),
            axes=("data", "fsdp", "tensor"),
            num_devices=0,  # 0 = all devices
            logical_axis_rules=(
                ("batch", ("data", "fsdp")),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
            ),
        )
    )

    if variant == "tiny":
        c.model.N, c.model.M = 64, 96
        c.data.crop_size = 128
        c.batch_size = 8
        c.optimizer.lr = 3e-4
        c.total_steps = 2_000
        c.log_every = 50
        c.eval_every = 1_000
        c.checkpoint_every = 500
        c.ema_decay = 0.99
    elif variant == "base":
        c.data = default_data_config(source="folder", crop_size=256)
        c.eval_data.max_images = 24
        c.batch_size = 16
        c.total_steps = 500_000
    elif variant == "full":
        c.model.N, c.model.M = 192, 320
        c.data = default_data_config(
            source="tfds", tfds_name="clic", tfds_split="train", crop_size=256, num_workers=8
        )
        c.batch_size = 256
        c.total_steps = 2_000_000
        c.optimizer.warmup_steps = 10_000
        c.checkpoint_async = True
        c.mesh.shape = (-1, 1, 1)
    return c
