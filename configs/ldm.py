"""LDM: a Stable-Diffusion-shaped backbone trained here. `configs/ldm.py:tiny` | `:base` | `:full`.

Two stages, trained in order by one command, each in its own sub-folder of the workdir
(`stages=(1, 2)`: WORKDIR/stage1, WORKDIR/stage2, each resumable):
  stage 1  the autoencoder: diffusers' AutoencoderKL (f8, 4 latent channels), L1 + LPIPS +
           KL + a PatchGAN discriminator (hinge) from step `loss.disc_start` on; the latent
           scale factor (1/std of the latents over training data) is measured when the model is
           written and stored with it;
  stage 2  the autoencoder frozen; the SD UNet (ε-prediction, SD's scaled-linear schedule,
           T = 1000) on its latents × the scale factor, cross-attending to a learned text
           condition (`model.text_length` tokens; `model.learn_text=False` keeps it fixed).
           The fields of `stage2` override the top level. At the end: WORKDIR/stage2/backbone,
           a diffusers folder that `model.sd_path` of RDEIC (DiffCR, ResULIC) takes as it takes
           SD 2.1-base; `jaxcodec export-backbone --checkpoint WORKDIR/stage2 OUT` writes one
           from any checkpoint. Grids: stage1/reconstructions.png, stage2/samples.png (and in
           TensorBoard).

tiny  — both stages within about 45 minutes on 2 CPU cores (autoencoder ≤ 25 min): trains on
        ../shared/data/photos (random crops) when that folder exists next to the project, else
        on scikit-image's photographs (`--config.data.source=folder --config.data.path=DIR` for
        any folder); evaluates the autoencoder on ../shared/data/kodak when it exists.
base  — one accelerator: autoencoder 64·[1,2,4,4] with its mid-block attention, UNet
        192·[1,2,4,4], 256 crops of a folder of photos (`--config.data.path=DIR`).
full  — SD 2.1-base's shapes (VAE 128·[1,2,4,4], UNet 320·[1,2,4,4], 77×1024 text condition),
        LDM's autoencoder recipe (disc_start 50001, KL 1e-6, VGG LPIPS), a tfds dataset.
"""

import ml_collections

from jaxcodec.configlib import PROJECT_ROOT, base_config, parse_arg
from jaxcodec.data import default_data_config

VARIANTS = ("tiny", "base", "full")
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _vae(channels, layers: int, groups: int, mid_attention: bool) -> dict:
    """diffusers AutoencoderKL fields (f8 needs four levels)."""
    n = len(channels)
    return dict(
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        mid_block_add_attention=mid_attention,
        sample_size=256,
    )


def _unet(channels, heads, layers: int, groups: int, cross_dim: int) -> dict:
    """diffusers UNet2DConditionModel fields in SD's layout: cross-attention transformers in
    every level but the lowest-resolution one, and in the middle block."""
    n = len(channels)
    return dict(
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=layers,
        attention_head_dim=tuple(heads),
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        norm_num_groups=groups,
        sample_size=64,
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg, variants=VARIANTS)["variant"]
    c = base_config("ldm", variant)
    c.stages = (1, 2)  # trained in order, in WORKDIR/stage1, WORKDIR/stage2
    c.real_file_eval = False  # a backbone writes no bitstreams

    # --- Model (SD 2.1-base's shapes; the variants shrink them).
    c.model = ml_collections.ConfigDict(
        dict(
            vae=_vae((128, 256, 512, 512), 2, 32, True),
            # taming's NLayerDiscriminator: ndf, num_layers (70×70 patches at 3), 'batch' norm
            discriminator=dict(ndf=64, num_layers=3, norm="batch"),
            unet=_unet((320, 640, 1280, 1280), (5, 10, 20, 20), 2, 32, 1024),
            # The posterior's initial log-variance (diffusers' init: 0); see LDM._narrow_posterior.
            init_logvar=0.0,
            text_length=77,  # tokens of the text condition (SD 2.x: 77)
            learn_text=True,  # False: a fixed random condition
        )
    )
    # Stage 1: rec (L1 or MSE on [-1, 1]) + perceptual_weight·LPIPS + kl_weight·KL (LDM's
    # units: KL summed per image against per-pixel losses summed per image)
    # + from step disc_start: disc_weight·(−D(x̂)) and the discriminator's hinge loss.
    c.loss = ml_collections.ConfigDict(
        dict(
            reconstruction="l1",
            perceptual_weight=1.0,
            lpips_net="vgg",
            kl_weight=1e-6,
            disc_weight=0.5,
            disc_start=50_001,
            disc_loss="hinge",
        )
    )
    c.scale_factor_batches = 16  # training batches the latent scale factor is measured on
    # Stage 2's pictures: DDIM samples (steps, how many, seed, image side; 0 = the training
    # crop) and the step of the evaluation's one-step denoising (eval_t).
    c.sample = ml_collections.ConfigDict(dict(steps=50, num=16, seed=0, size=0, eval_t=500))

    # --- Stage 1 optimiser: LDM's Adam(0.5, 0.9), no clipping (the discriminator's gradients
    # would otherwise scale the autoencoder's: they share one global norm).
    c.optimizer.update(lr=4.5e-6 * 12, b1=0.5, b2=0.9, clip_norm=0.0, schedule="constant")
    c.batch_size = 12
    c.total_steps = 200_000
    c.ema_decay = 0.999

    # --- Stage 2 overrides (the UNet: AdamW(0.9, 0.999), SD's lr 1e-4 with warm-up).
    c.stage2 = ml_collections.ConfigDict(
        dict(
            total_steps=500_000,
            batch_size=64,
            optimizer=dict(
                lr=1e-4, b1=0.9, b2=0.999, clip_norm=1.0, warmup_steps=10_000, schedule="constant"
            ),
            ema_decay=0.9999,
        )
    )

    if variant == "tiny":
        photos, kodak = SHARED_DATA / "photos", SHARED_DATA / "kodak"
        if photos.is_dir():
            c.data = default_data_config(source="folder", path=str(photos))
        if kodak.is_dir():
            c.eval_data = default_data_config(source="folder", path=str(kodak))
        c.eval_data.max_images = 24
        c.model.vae = _vae((16, 32, 64, 64), 1, 8, False)
        c.model.discriminator.update(ndf=16, num_layers=2)
        c.model.unet = _unet((64, 128, 128), (2, 4, 4), 1, 16, 64)
        c.model.text_length = 8
        # The GAN starts after the CPU budget (LDM's recipe too starts it on a converged
        # autoencoder): switched on at step 1500 of 2000 (weight 0.1) it cost 2.0 dB PSNR and
        # +0.05 LPIPS on the training crops and shifted colours (Kodak: 21.0 dB, 0.414 LPIPS).
        # Longer runs: --config.total_steps=N --config.loss.disc_start=M.
        c.loss.update(lpips_net="alex", disc_start=2_001, disc_weight=0.1)
        c.data.crop_size = 64
        c.batch_size = 16
        c.optimizer.update(lr=2e-3, b1=0.5, b2=0.9, schedule="cosine", end_factor=0.05)
        c.total_steps = 2_000
        c.log_every = 50
        c.eval_every = 2_000
        c.checkpoint_every = 500
        c.ema_decay = 0.99
        c.num_eval_images_logged = 2
        c.sample.update(num=16, size=128)
        # 2,000 steps took 28.4 min beside another job (1.17 steps/s); ε-MSE 0.148 at 1,550 and
        # 0.152 at 2,000: 1,500 steps keep both stages within 45 minutes.
        c.stage2.update(total_steps=1_500, batch_size=16, ema_decay=0.995)
        c.stage2.data = dict(crop_size=128)
        c.stage2.eval_data = dict(max_images=2)
        c.stage2.optimizer.update(lr=1e-3, warmup_steps=100, schedule="cosine", end_factor=0.1)
    elif variant == "base":
        c.data = default_data_config(source="folder", crop_size=256)
        c.eval_data.max_images = 24
        c.model.vae = _vae((64, 128, 256, 256), 2, 32, True)
        c.model.unet = _unet((192, 384, 768, 768), (3, 6, 12, 12), 2, 32, 512)
        c.loss.disc_start = 20_001
        c.batch_size = 16
        c.total_steps = 100_000
        c.stage2.update(total_steps=300_000, batch_size=64)
        c.stage2.data = dict(crop_size=256)
    elif variant == "full":
        c.data = default_data_config(
            source="tfds", tfds_name="clic", tfds_split="train", crop_size=256, num_workers=8
        )
        c.eval_data.max_images = 24
        c.checkpoint_async = True
        c.mesh.shape = (-1, 1, 1)
        c.stage2.update(batch_size=256)
        c.stage2.data = dict(crop_size=512)
    return c
