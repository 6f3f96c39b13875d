"""RDEIC (Li et al., relay residual diffusion). `configs/rdeic.py:VARIANT[,stage=S][,lambda_r=L]`.

tiny — a random SD-shaped backbone (written on the fly as a diffusers folder, see
       `tiny_sd_folder`), a small compressor and adapter: both stages train in seconds on a CPU.
       `tiny,backbone=DIR` runs on a backbone trained by `configs/ldm.py` (its diffusers folder,
       WORKDIR/stage2/backbone) instead: a real prior, so decoded images are images.
full — SD 2.1-base from a local diffusers folder (`--config.model.sd_path=DIR`: unet/, vae/ and
       text_encoder/ or empty_prompt_embedding.npy), the paper's compressor (N = M = 256, 10
       slices, 16384 codes) and adapter (0.2 width, 16-channel heads); FSDP over all devices, the
       UNet frozen, bf16 activations, remat. Training photos: `--config.data.path=DIR`. The
       paper's batch of 4 splits over up to 4 devices; raise `batch_size` on larger meshes.

Stages (one model per rate point λ_r ∈ {2, 1, 0.5, 0.25, 0.1}):
  stage=1  independent timesteps: λ_r·‖ẑ_0 − z_0‖² + R + L_vq + λ_r·‖z_c − z_0‖²;
           batch 4, 512 crops, lr 1e-4 then 2e-5.
  stage=2  fixed-step fine-tuning through the whole 2-step (λ_r ≥ 1) or 5-step chain and the VAE
           decoder: λ_r·(MSE + 0.5·LPIPS) + R + L_vq + λ_r·‖z_c − z_0‖²; 256 crops, lr 2e-5;
           starts from stage 1 (`--config.init_from=STAGE1_WORKDIR`).
`launch/rdeic_rates.sh` trains both stages of all five rate points.

One model for every rate point: `variable_rate=1[,rate_kind=gain|affine]` conditions the compressor
on q (`compressor.rate`, see `jaxcodec.nn.rate`): λ_r drawn per example, log-uniform over
[0.1, 2] (`lambda_r` is then unused); files carry q, and their default sampler steps follow it
(`decode.steps_by_rate`: the fixed-rate configs' steps). Stage 2 of such a model fine-tunes
through one chain of `loss.fixed_steps` (default 2). `launch/variable_rate.sh` trains them.
"""

import os
from pathlib import Path

import ml_collections

from jaxcodec.configlib import base_config, parse_arg, sd_method_variant
from jaxcodec.data import default_data_config

VARIANTS = ("tiny", "full")
RATE_POINTS = (2.0, 1.0, 0.5, 0.25, 0.1)

# The tiny backbone: SD's blocks (cross-attention transformers, a mid block, an 8× VAE with 4
# latent channels) at toy widths and one UNet level — XLA's compile time on a CPU grows with
# the number of layers, and the tests compile every program of both stages. Diffusers fields.
TINY_UNET = dict(
    block_out_channels=[32],
    down_block_types=["CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[2],
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8,
)
TINY_VAE = dict(
    block_out_channels=[8, 16, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=64,
)
TINY_TEXT_SHAPE = (1, 8, 32)  # the empty prompt's embedding (SD 2.x: 1×77×1024)


def tiny_sd_folder() -> str:
    """Writes (once) and returns a random tiny SD pipeline folder in diffusers format, in
    $JAXCODEC_CACHE (default ~/.cache/jaxcodec); deterministic, so its digest is stable."""
    from jaxcodec.nn.unet import UNetConfig
    from jaxcodec.nn.vae import VAEConfig
    from jaxcodec.weights.diffusers import write_random_pipeline

    root = Path(os.environ.get("JAXCODEC_CACHE", Path.home() / ".cache" / "jaxcodec"))
    folder = root / "rdeic_tiny_sd_v2"
    unet = UNetConfig.from_diffusers(TINY_UNET)
    vae = VAEConfig.from_diffusers(TINY_VAE)
    return str(write_random_pipeline(folder, unet, vae, TINY_TEXT_SHAPE, seed=0))


def fixed_steps(lambda_r: float) -> int:
    """The paper's fine-tuning chains: 2 steps for λ_r ∈ {2, 1}, 5 below."""
    return 2 if lambda_r >= 1.0 else 5


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(
        arg,
        variants=VARIANTS,
        stage=1,
        lambda_r=2.0,
        backbone="",
        variable_rate=0,
        rate_kind="gain",
    )
    variant, stage, lambda_r = a["variant"], a["stage"], a["lambda_r"]
    if stage not in (1, 2):
        raise ValueError(f"RDEIC has stages 1 and 2, not {stage}")
    c = base_config("rdeic", variant, stage)  # stage 2: init_from = the stage-1 workdir

    # --- Model. The SD folder's own config.json files are the authority for the backbone.
    c.model = ml_collections.ConfigDict(
        dict(
            sd_path=a["backbone"],  # diffusers SD folder; '' = SD 2.1-base shapes only
            unet_dtype="float32",  # compute dtype of the frozen UNet and the adapter
            remat=False,  # rematerialise UNet blocks (and the VAE decoder in stage 2)
            # Latent scale factor; 0 = the backbone's vae/config.json `scaling_factor` (SD 2.1:
            # 0.18215; a backbone trained by configs/ldm.py: the one measured on its data).
            scale_factor=0.0,
            relay_start=300,  # N: the sampler starts at index N - 1
            compressor=ml_collections.ConfigDict(
                dict(
                    N=256,
                    M=256,
                    groups=(8, 8, 8, 8, 16, 16, 32, 32, 64, 64),
                    num_codes=16384,
                    res_blocks=(4, 3),  # residual blocks around g_a's stride (g_s mirrors)
                )
            ),
            adapter=ml_collections.ConfigDict(dict(size_ratio=0.2, head_channels=16)),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            lambda_r=lambda_r,  # the rate point: distortion weight
            lpips_weight=0.5,  # stage 2
            fixed_steps=fixed_steps(lambda_r),  # stage 2: sampler steps trained through
        )
    )
    # Decoder settings written into every file's header (the decoder repeats them).
    c.decode = ml_collections.ConfigDict(dict(steps=fixed_steps(lambda_r), guidance=1.0, seed=0))
    if a["variable_rate"]:
        c.model.compressor.rate = ml_collections.ConfigDict(
            dict(
                kind=a["rate_kind"],
                lmbda_min=min(RATE_POINTS),
                lmbda_max=max(RATE_POINTS),
                anchors=8,
                embed=64,
                levels=256,
                default_quality=50.0,
            )
        )
        c.loss.fixed_steps = 2
        c.decode.steps_by_rate = tuple((lam, fixed_steps(lam)) for lam in RATE_POINTS)

    # --- Data.
    c.data = default_data_config(source="folder", crop_size=512 if stage == 1 else 256)
    c.batch_size = 4

    # --- Optimiser: AdamW; stage 1 drops the lr from 1e-4 to 2e-5 for its last fifth.
    c.optimizer.update(
        lr=1e-4 if stage == 1 else 2e-5,
        schedule="step" if stage == 1 else "constant",
        decay_at=(0.8,) if stage == 1 else (),
        decay_factor=0.2,
        end_factor=1.0,
        aux_lr=1e-4,
    )
    c.total_steps = 300_000 if stage == 1 else 100_000
    c.eval_every = 10_000

    if variant == "tiny":
        c.model.sd_path = a["backbone"] or tiny_sd_folder()
        c.model.compressor.update(dict(N=32, M=32, groups=(8, 24), num_codes=64, res_blocks=(1, 1)))
        c.model.adapter = ml_collections.ConfigDict(dict(size_ratio=0.25, head_channels=4))
    sd_method_variant(c, variant, lr=3e-3 if stage == 1 else 1e-3)
    return c
