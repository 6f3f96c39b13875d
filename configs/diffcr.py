"""DiffCR (Xia et al., AAAI-26). `configs/diffcr.py:VARIANT[,stage=S][,lambda_r=L][,backbone=DIR]`.

tiny — RDEIC's random tiny SD backbone (`configs/rdeic.py:tiny_sd_folder`), a small compressor
       (one channel group: no channel context, the fastest compile) and FaSE (one RRDB), the
       empty prompt as the UNet's context (no CLIP weights): both stages train in seconds on a
       CPU. `tiny,backbone=DIR` runs on a backbone trained by `configs/ldm.py` (its diffusers
       folder, WORKDIR/stage2/backbone; its learned text condition is the empty prompt).
full — SD 2.1-base from a local diffusers folder (`--config.model.sd_path=DIR`, which also takes
       a backbone trained here: unet/, vae/, text_encoder/), OpenCLIP ViT-H/14 for the image
       condition (`--config.model.clip_path=DIR`, an open_clip folder; or
       `--config.model.condition=empty_prompt` without it), the official compressor (N = M =
       256, 10 slices, 32 codes) and FaSE (`Time_aware_refinementX(4, 4, 320)`); FSDP over all
       devices, the UNet frozen, bf16 activations, remat.

Stages (one model per rate point λ_r; there is no public training code: the recipe is
jaxcodec's, see jaxcodec/methods/diffcr.py):
  stage=1  compressor + FaSE: R + L_vq + λ_r·(‖ĉ − z_0‖² + ẑ_0 losses + consistency against an
           EMA target FaSE); batch 4, 512 crops, lr 1e-4 then 2e-5.
  stage=2  compressor frozen, FaSE through the real two-step sampler, the VAE decoder and the
           colour correction: MSE + LPIPS in pixel space; 256 crops, lr 2e-5; starts from stage 1
           (`--config.init_from=STAGE1_WORKDIR`).
Rate points: λ_r ∈ {1, 0.5, 0.25, 0.1}, meant to span the four released models (≈ 0.06, 0.04,
0.03, 0.02 bpp on Kodak); `launch/diffcr_rates.sh` trains both stages of all of them.
"""

import importlib.util
from pathlib import Path

import ml_collections

from jaxcodec.configlib import base_config, parse_arg, sd_method_variant
from jaxcodec.data import default_data_config

VARIANTS = ("tiny", "full")
RATE_POINTS = (1.0, 0.5, 0.25, 0.1)
# The public code's base prompt (`DiffCR.base_txt_context`), also its default user prompt.
BASE_PROMPT = "A high-resolution, 8K, ultra-realistic image, best quality, and extremely detail"


def tiny_sd_folder() -> str:
    """RDEIC's tiny random SD folder (one backbone, written once, shared by both methods)."""
    spec = importlib.util.spec_from_file_location(
        "jaxcodec_configs_rdeic", Path(__file__).with_name("rdeic.py")
    )
    rdeic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rdeic)
    return rdeic.tiny_sd_folder()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, variants=VARIANTS, stage=1, lambda_r=0.5, backbone="")
    variant, stage, lambda_r = a["variant"], a["stage"], a["lambda_r"]
    if stage not in (1, 2):
        raise ValueError(f"DiffCR has stages 1 and 2, not {stage}")
    c = base_config("diffcr", variant, stage)  # stage 2: init_from = the stage-1 workdir

    # --- Model. The SD folder's own config.json files are the authority for the backbone.
    c.model = ml_collections.ConfigDict(
        dict(
            sd_path=a["backbone"],  # diffusers SD folder; '' = SD 2.1-base shapes only
            unet_dtype="float32",
            remat=False,  # rematerialise UNet blocks (and the VAE decoder in stage 2)
            scale_factor=0.0,  # 0: the backbone's vae/config.json `scaling_factor`
            condition="clip",  # 'clip': ProjLayer([CLIP image, prompt, base]); 'empty_prompt'
            clip_path="",  # open_clip ViT-H/14 folder (image tower) for condition='clip'
            prompt=BASE_PROMPT,  # the decoder's text prompt (the public code's `txt`)
            base_prompt=BASE_PROMPT,  # the public code's `base_txt_context`
            sigma_data=0.5,  # the consistency boundary's σ_data
            grid_steps=50,  # the DDIM grid the start step is chosen on
            colour_correction=True,  # send the 6 colour statistics and correct at the end
            compressor=ml_collections.ConfigDict(
                dict(
                    N=256,
                    M=256,
                    groups=(8, 8, 8, 8, 16, 16, 32, 32, 64, 64),
                    num_codes=32,
                    res_blocks=(4, 3),
                )
            ),
            fase=ml_collections.ConfigDict(
                dict(
                    model_channels=320,
                    fda_channels=96,
                    fda_heads=3,
                    feature_channels=32,
                    num_rrdb=24,
                    grow_channels=32,
                    norm_groups=32,
                )
            ),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            lambda_r=lambda_r,  # the rate point: weight of every latent distortion (stage 1)
            x0_weight=1.0,  # ẑ_0 losses (stage 1)
            consistency_weight=1.0,  # consistency against the EMA target (stage 1)
            target_decay=0.95,  # the target FaSE's EMA (the public code's ema_decay)
            mse_weight=1.0,  # stage 2, MSE on [-1, 1]
            lpips_weight=1.0,  # stage 2
        )
    )
    # Decoder settings written into every file's header (the decoder repeats them).
    c.decode = ml_collections.ConfigDict(dict(steps=2))

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
        c.model.condition = "empty_prompt"
        c.model.compressor = ml_collections.ConfigDict(
            dict(N=32, M=32, groups=(32,), num_codes=32, res_blocks=(1, 1))
        )
        c.model.fase = ml_collections.ConfigDict(
            dict(
                model_channels=16,
                fda_channels=8,
                fda_heads=2,
                feature_channels=8,
                num_rrdb=1,
                grow_channels=4,
                norm_groups=4,
            )
        )
    sd_method_variant(c, variant, lr=3e-3 if stage == 1 else 1e-3)
    return c
