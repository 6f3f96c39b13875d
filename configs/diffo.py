"""DiffO ("Single-step Diffusion for Image Compression at Ultra-Low Bitrates"), two stages.

Arg: `VARIANT[,stage=N]`, e.g. `configs/diffo.py:tiny,stage=1`.

stage 1 — the latent space: a taming-style VQGAN f16 trained from scratch (for users without the
          taming weights, and for the CPU variants). Skip it with
          `jaxcodec import-weights --format vqgan` and `--config.model.vqgan_path=...`.
stage 2 — DiffO: the VQGAN frozen (from `--config.init_from=STAGE1_WORKDIR` or `vqgan_path`); the
          base code (residual VQ of the latent, 256 entries a stage), its decoder and the one-step
          residual-shifting denoiser (ResShift's Swin-UNet) trained with 0.8·MSE + 0.2·LPIPS.

tiny — minutes on a 2-core CPU (scikit-image photos, 64-pixel crops, small networks).
full — the official sizes (configs/config.yaml of the public code): VQGAN ch 128 ×[1,1,2,2,4],
       16384 codes; base-code autoencoder ch 128 ×[4]; Swin-UNet 160 ×[1,2,2,4], 119.5 M
       parameters, with the official code's shifted-window mask (`swin_shift_mask="resshift"`,
       which its weights need); lr 5e-5, batch 8, 256 crops, EMA 0.999. The official weights
       import as a codec bundle: `jaxcodec import-weights --format vqgan GT_VQ.pth.tar VQGAN`,
       then `--format diffo EMA_MODEL.pth OUT --base VQ_MODEL.pth.tar --vqgan VQGAN`.

Rate points: `model.rvq_stages` residual VQ stages; rate point r sends the first r + 1 stages and
decodes at noise level `model.noise_levels[r]` (rate-adaptive noise modulation: more noise at the
lower rate). One model serves them all; the file header carries the rate index and the noise
level (relative to the rate point's trained level).
"""

import ml_collections

from jaxcodec.configlib import base_config, parse_arg
from jaxcodec.data import default_data_config

VARIANTS = ("tiny", "full")


def _vqgan(variant: str) -> ml_collections.ConfigDict:
    """taming's VQGAN f16 (`VAEConfig` fields): attention in the lowest-resolution level."""
    if variant == "full":
        channels, layers, groups, codes = (128, 128, 256, 256, 512), 2, 32, 16384
    else:  # ≥ 24 channels into conv_out: XLA CPU convolutions from ≤ 16 channels to ≤ 4
        # round differently with another device count, and decoding must not
        channels, layers, groups, codes = (24, 24, 32, 32, 64), 1, 8, 512
    n = len(channels)
    return ml_collections.ConfigDict(
        dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
            layers_per_block=layers,
            latent_channels=256 if variant == "full" else 32,
            vq_embed_dim=256 if variant == "full" else 32,
            num_vq_embeddings=codes,
            norm_num_groups=groups,
            scaling_factor=1.0,
        )
    )


def _base(variant: str) -> ml_collections.ConfigDict:
    """The base-code autoencoder (DiffO's EMAVQModelTorch): no resampling, attention."""
    full = variant == "full"
    latent = 256 if full else 32
    return ml_collections.ConfigDict(
        dict(
            in_channels=latent,
            out_channels=latent,
            block_out_channels=(512,) if full else (64,),
            down_block_types=("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",),
            layers_per_block=2 if full else 1,
            latent_channels=latent,
            vq_embed_dim=latent,
            num_vq_embeddings=256 if full else 64,
            norm_num_groups=32 if full else 8,
            conv_in_channels=128 if full else 32,
            scaling_factor=1.0,
        )
    )


def _unet(variant: str) -> ml_collections.ConfigDict:
    """ResShift's Swin-UNet (`UNetConfig` fields); in_channels = latent + lq channels."""
    full = variant == "full"
    channels = (160, 320, 320, 640) if full else (32, 64)
    n = len(channels)
    return ml_collections.ConfigDict(
        dict(
            in_channels=256 + 64 if full else 32 + 16,
            out_channels=256 if full else 32,
            block_out_channels=channels,
            down_block_types=("CrossAttnDownBlock2D",) * n,
            up_block_types=("CrossAttnUpBlock2D",) * n,
            layers_per_block=2 if full else 1,
            attention_head_dim=(1,) * n,  # unused: the Swin layers' heads are swin_* fields
            cross_attention_dim=None,
            norm_num_groups=32 if full else 8,
            resnet_time_scale_shift="scale_shift",
            attention_block="swin",
            attention_layers="first",
            swin_embed_dim=192 if full else 32,
            swin_head_channels=32 if full else 16,
            swin_window_size=(4, 4, 4, 2) if full else (2, 2),
            swin_mid_window_size=2,
            swin_depth=2,
            swin_mlp_ratio=4.0,
            # Shifted-window mask: the official weights need "resshift", the mask ResShift's
            # code computes (rows only, tokens column-major inside a window; nn/swin.py);
            # "full" is Swin's own 3×3 region mask.
            swin_shift_mask="resshift" if full else "full",
            remat=False,
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, variants=VARIANTS, stage=2)
    variant, stage = a["variant"], a["stage"]
    if stage not in (1, 2):
        raise ValueError(f"configs/diffo.py: stage must be 1 (VQGAN) or 2 (DiffO), got {stage}")
    full = variant == "full"
    # Stage 2: init_from = the stage-1 workdir (or codec bundle) whose VQGAN is frozen.
    c = base_config("diffo", variant, stage)

    # --- Model.
    c.model = ml_collections.ConfigDict(
        dict(
            vqgan=_vqgan(variant),
            # Stage 2 without init_from: a VQGAN in jaxcodec's format (`jaxcodec import-weights
            # --format vqgan` of taming's checkpoint).
            vqgan_path="",
            base=_base(variant),
            rvq_stages=2,  # residual VQ stages = rate points
            unet=_unet(variant),
            lq_channels=64 if full else 16,  # conv_in_extended: the base code as UNet input
            # Residual shifting (ResShift): κ, exponential η schedule, x0 prediction.
            diffusion=ml_collections.ConfigDict(
                dict(steps=2, kappa=2.0, min_noise_level=0.04, etas_end=0.8, power=0.3)
            ),
            # Rate-adaptive noise modulation: decode noise of rate point r (fewer stages, less
            # information: more noise), as a multiple of κ·sqrt(η_T).
            noise_levels=(1.0, 0.6),
            lpips_net="vgg" if full else "alex",
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            distortion_weight=0.8,  # MSE on [-1, 1] images through the frozen VQGAN decoder
            perceptual_weight=0.2,  # LPIPS
            vq_weight=1.0,  # the base code's commitment β‖h − sg(code)‖² (β = 0.25)
            # Stage 1 (VQGAN): L1 + LPIPS + commitment, as taming without its GAN.
            l1_weight=1.0,
            vqgan_perceptual_weight=1.0,
        )
    )
    # What evaluation and files use unless told otherwise (header options of every file).
    c.decode = ml_collections.ConfigDict(
        dict(rate_index=0, noise_level=1.0, seed=0, tile=48 if full else 32, halo=8)
    )

    # --- Data and optimiser (Adam, as the official code; warm-up then cosine).
    c.optimizer.update(lr=5e-5, warmup_steps=2000, aux_lr=5e-5)
    c.total_steps = 500_000
    c.checkpoint_every = 2_000

    if stage == 1:  # taming's VQGAN training: Adam(0.5, 0.9), lr 4.5e-6 × batch
        c.optimizer.update(dict(lr=1e-4, b1=0.5, b2=0.9, warmup_steps=0))
        c.batch_size = 12
    if full:
        c.data = default_data_config(
            source="tfds", tfds_name="clic", tfds_split="train", crop_size=256, num_workers=8
        )
        c.checkpoint_async = True
        c.model.unet.remat = True
    else:
        c.data.crop_size = 64
        c.batch_size = 4
        c.optimizer.update(dict(lr=1e-3 if stage == 2 else 5e-4, warmup_steps=0))
        c.total_steps = 200
        c.log_every = 20
        c.eval_every = 0
        c.checkpoint_every = 100
        c.ema_decay = 0.9
        c.eval_data.max_images = 2
    return c
