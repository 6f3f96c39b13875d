"""HFD (Hoogeboom et al. 2023). Variants: `configs/hfd.py:tiny` | `:base` | `:full`.

tiny  — minutes on a 2-core CPU, scikit-image's photos (no data to download).
base  — one accelerator, a folder of training photos (`--config.data.path=...`).
full  — paper scale on a pod (CLIC via tfds; batch and steps of the published setup).
Every field can be overridden on the command line, e.g. `--config.loss.lmbda=0.0018`.

Two stages, trained in order by one command, each in its own sub-folder of the workdir
(`stages=(1, 2)`: WORKDIR/stage1, WORKDIR/stage2, each resumable):
  stage 1  the MSE autoencoder, R + λ·255²·MSE (the top-level fields below);
  stage 2  the autoencoder frozen, the pixel-space score decoder (`decoder`), v-prediction on
           the shifted cosine log-SNR; the fields of `stage2` override the top level.
One stage alone: `--config.stages='(2,)'` (stage 2 starts from WORKDIR/stage1, or from
`--config.init_from`), or `--config.stages='()' --config.stage=N` in the workdir itself.

One model for every rate: `configs/hfd.py:tiny,variable_rate=1[,rate_kind=gain|affine]` makes the
autoencoder rate-conditioned (`model.rate`, see `jaxcodec.nn.rate`): λ drawn per example,
log-uniform over [rate.lmbda_min, rate.lmbda_max] (`loss.lmbda` is then unused); files pick
their rate with `jaxcodec compress --quality Q` or `--target-bpp X`. `launch/variable_rate.sh`
trains them.
"""

import ml_collections

from jaxcodec.configlib import base_config, parse_arg
from jaxcodec.data import default_data_config

VARIANTS = ("tiny", "base", "full")
# The rate-conditioned model's λ range: CompressAI's four lowest rate points' (q1 … q4).
LAMBDA_RANGE = (0.0018, 0.0130)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, variants=VARIANTS, variable_rate=0, rate_kind="gain")
    variant = a["variant"]
    c = base_config("hfd", variant)
    c.stages = (1, 2)  # trained in order, in WORKDIR/stage1, WORKDIR/stage2

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
    if a["variable_rate"]:
        # One model for every λ in the range: gain units (Cui et al.) or an affine modulation
        # from a λ embedding at the latents; `levels` q values a file can name (its header).
        c.model.rate = ml_collections.ConfigDict(
            dict(
                kind=a["rate_kind"],
                lmbda_min=LAMBDA_RANGE[0],
                lmbda_max=LAMBDA_RANGE[1],
                anchors=8,
                embed=64,
                levels=256,
                default_quality=50.0,
            )
        )

    # --- Stage 2: the score-based decoder. The project's UNet for pixels, no cross-attention
    # (diffusers field names), input concat(z_t, stage-1 reconstruction, context, mask).
    # Schedule: the cosine log-SNR shifted by η, kept finite by reparameterising the unshifted
    # cosine onto [logsnr_min, logsnr_max] ('interpolate', the default: smooth, the shift exact
    # at every t) or by clipping the shifted formula ('hard': flat where the clip is active).
    # context_probability: share of training crops that see decode-time context (patch
    # borders already generated), the rest none (the first patch group).
    c.decoder = ml_collections.ConfigDict(
        dict(
            unet=dict(
                block_out_channels=(128, 256, 256, 512),
                down_block_types=(
                    "DownBlock2D",
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                ),
                up_block_types=(
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                    "UpBlock2D",
                    "UpBlock2D",
                ),
                layers_per_block=2,
                attention_head_dim=(4, 4, 4, 8),
                norm_num_groups=32,
            ),
            schedule=dict(eta=0.5, clip="interpolate", logsnr_min=-15.0, logsnr_max=15.0),
            context_probability=0.75,
            # What is diffused: 'image' (the paper) or 'residual', (x − reconstruction) /
            # residual_scale — the detail the autoencoder lacks, at about unit spread.
            target="image",
            residual_scale=0.1,
        )
    )
    # Decode settings written into every file's header (`jaxcodec compress --option steps=8`):
    # sampler steps, the seed of its noise, the patch size (a multiple of 64; images larger
    # than one patch are generated in patch groups, overlap patch/4). patch_batch patches
    # are sampled at once; sampler_eta 0 = DDIM, 1 = ancestral.
    c.decode = ml_collections.ConfigDict(
        dict(steps=8, seed=0, patch=256, patch_batch=4, sampler_eta=0.0)
    )

    # --- Stage 2 overrides of the fields above (optimiser, steps, batch, crops, weighting).
    c.stage2 = ml_collections.ConfigDict(
        dict(
            total_steps=500_000,
            batch_size=64,
            data=dict(crop_size=256),
            optimizer=dict(lr=1e-4, warmup_steps=1_000, clip_norm=1.0),
            loss=dict(weighting="v"),  # the plain v-loss (see diffusion.loss_weight)
            ema_decay=0.9999,
        )
    )
    c.loss.weighting = "v"  # read by stage 2 only

    if variant == "tiny":
        c.model.N, c.model.M = 64, 96
        c.data.crop_size = 128
        c.batch_size = 8
        c.optimizer.lr = 3e-4
        c.total_steps = 600
        c.log_every = 50
        c.eval_every = 0  # the run ends with real files instead
        c.eval_data.max_images = 2
        c.checkpoint_every = 200
        c.ema_decay = 0.99
        c.decoder.unet.update(
            block_out_channels=(16, 32, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(1, 1, 2),
            norm_num_groups=8,
        )
        c.decode.update(steps=4, patch=128)
        c.stage2.update(total_steps=300, batch_size=8, ema_decay=0.98)
        c.stage2.data.crop_size = 64
        c.stage2.optimizer.update(lr=5e-4, warmup_steps=50)
    elif variant == "base":
        c.data = default_data_config(source="folder", crop_size=256)
        c.eval_data.max_images = 24
        c.batch_size = 16
        c.total_steps = 500_000
        c.decoder.unet.update(
            block_out_channels=(64, 128, 256),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
        )
        c.stage2.update(batch_size=16)
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
