"""ResULIC (Ke et al., semantic residual coding and compression-aware diffusion).

`configs/resulic.py:VARIANT[,stage=S][,add_steps=N][,l_bpp=W][,backbone=DIR]`.

tiny — a random SD-shaped backbone with a random tiny CLIP (text and image towers), written on
       the fly as a diffusers folder (`tiny_sd_folder`), a small ELIC and adapter, the
       scikit-image photos with their captions: both stages train in seconds on a CPU.
       `tiny,backbone=DIR` runs on a backbone trained by `configs/ldm.py` (WORKDIR/stage2/
       backbone): it has no text tower, so no captions; its learned empty prompt conditions.
full — SD 2.1-base from a local diffusers folder (`--config.model.sd_path=DIR`: unet/, vae/,
       text_encoder/), the official ELIC (N 128, M 192, slices [16, 16, 32, 32, 96]) and
       CDDM adapter (0.2 width, 16-channel heads, hint z_c); FSDP, bf16 activations, remat.
       Training photos `--config.data.path=DIR`, captions `--config.data.captions=FILE.json`.

One model per rate point: `add_steps` (the relay start N, 50 … 800: more steps for lower
rates, where z_c is further from z_0) with the rate weight `l_bpp` of the official configs
(`RATE_POINTS`; override with `l_bpp=`). `launch/resulic_rates.sh` trains them all.

Stages:
  stage=1  ‖ε_θ(z_t, t, c, z_c) − ε‖² + l_bpp·R + ‖z_c − z_0‖² (+ the bottleneck's aux loss),
           t ~ U{0..N}, z_t the compression-aware forward process; lr 1e-4.
  stage=2  adds MSE + LPIPS between the image and the VAE decode of ẑ_0 (the relay formula
           applied to ε_θ at t); starts from stage 1 (`--config.init_from=STAGE1_WORKDIR`).
Captions: `data.captions` (a JSON {image name: caption}) give the training condition, dropped
to the empty prompt with probability `loss.caption_dropout`; `encode.captions` (a JSON file or
`module:function`) is the caption source of compressed files (their semantic residual), and
`encode.prompt_search.enabled` searches a hard prompt (PEZ) at the encoder instead.
"""

import importlib.util
import os
from pathlib import Path

import ml_collections

from jaxcodec.configlib import base_config, parse_arg, sd_method_variant
from jaxcodec.data import default_data_config
from jaxcodec.data.captions import SKIMAGE_CAPTIONS

VARIANTS = ("tiny", "full")
# add_steps → (stage-1 l_bpp, stage-2 l_bpp), from the official configs (configs/model/stage*/):
# stage 2 moves some start steps to multiples of 3 (405, 495, 705, 795) so that the default
# 3 DDIM steps divide them.
RATE_POINTS = {
    50: (1.0, 1.5),
    100: (1.0, 1.5),
    150: (1.0, 1.5),
    200: (3.0, 3.5),
    300: (4.0, 6.0),
    405: (14.0, 12.0),
    495: (14.0, 16.0),
    600: (24.0, 27.0),
    705: (24.0, 36.0),
    795: (24.0, 36.0),
}
# The official decode text: the caption + this suffix, against this negative prompt.
POSITIVE_PROMPT = "best quality, extremely detailed"
NEGATIVE_PROMPT = (
    "oil painting, cartoon, blurring, dirty, messy, low quality, frames, deformed, lowres, "
    "over-smooth."
)


def _rdeic_config():
    """configs/rdeic.py (its tiny backbone's fields): configs are files, not a package."""
    spec = importlib.util.spec_from_file_location(
        "_rdeic_config", Path(__file__).with_name("rdeic.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sd_folder() -> str:
    """Writes (once) and returns a random tiny SD folder — RDEIC tiny's UNet and VAE plus a
    random tiny CLIP (text and image towers, `jaxcodec.nn.clip.TINY`) in text_encoder/ — in
    $JAXCODEC_CACHE (default ~/.cache/jaxcodec); deterministic, so its digests are stable."""
    import shutil
    import tempfile

    from jaxcodec.nn import clip
    from jaxcodec.nn.unet import UNetConfig
    from jaxcodec.nn.vae import VAEConfig
    from jaxcodec.weights import open_clip as oc
    from jaxcodec.weights.diffusers import random_params, write_random_pipeline

    rdeic = _rdeic_config()
    root = Path(os.environ.get("JAXCODEC_CACHE", Path.home() / ".cache" / "jaxcodec"))
    folder = root / "resulic_tiny_sd_v1"
    unet = UNetConfig.from_diffusers(rdeic.TINY_UNET)
    vae = VAEConfig.from_diffusers(rdeic.TINY_VAE)
    write_random_pipeline(folder, unet, vae, rdeic.TINY_TEXT_SHAPE, seed=0)
    text_dir = folder / "text_encoder"
    if not (text_dir / oc.OPEN_CLIP_CONFIG).is_file():
        cfg = clip.CLIPConfig.from_open_clip(clip.TINY)
        tmp = Path(tempfile.mkdtemp(prefix=".text_encoder.", dir=folder))
        try:
            text = random_params(clip.text_param_shapes(cfg.text), seed=3)
            vision = random_params(clip.vision_param_shapes(cfg.vision), seed=4)
            oc.save(tmp, cfg, clip.TINY, text, vision)
            try:
                os.replace(tmp, text_dir)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(folder)


def decode_steps(add_steps: int) -> int:
    """The official 3 DDIM steps where they divide the start step, else 2 (or the smallest
    divisor): the sampler's grid must divide [0, add_steps] evenly."""
    for steps in (3, 2, *range(4, add_steps + 1)):
        if add_steps % steps == 0:
            return steps
    return add_steps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, variants=VARIANTS, stage=1, add_steps=300, l_bpp=-1.0, backbone="")
    variant, stage, add_steps = a["variant"], a["stage"], a["add_steps"]
    if stage not in (1, 2):
        raise ValueError(f"ResULIC has stages 1 and 2, not {stage}")
    if a["l_bpp"] < 0 and add_steps not in RATE_POINTS:
        raise ValueError(
            f"add_steps={add_steps} is no official rate point {sorted(RATE_POINTS)}; give l_bpp="
        )
    l_bpp = a["l_bpp"] if a["l_bpp"] >= 0 else RATE_POINTS[add_steps][stage - 1]
    c = base_config("resulic", variant, stage)

    # --- Model. The SD folder's own config.json files are the authority for the backbone.
    c.model = ml_collections.ConfigDict(
        dict(
            sd_path=a["backbone"],  # diffusers SD folder; '' = SD 2.1-base shapes only
            unet_dtype="float32",
            remat=False,
            scale_factor=0.0,  # 0: the backbone's vae/config.json `scaling_factor`
            add_steps=add_steps,  # N: the compression-aware forward process starts at index N
            compressor=ml_collections.ConfigDict(
                dict(N=128, M=192, groups=(16, 16, 32, 32, 96), enc_channels=128, bottlenecks=3)
            ),
            adapter=ml_collections.ConfigDict(dict(size_ratio=0.2, head_channels=16)),
        )
    )
    # Encoder-side settings (not part of the model's identity: any caption decodes).
    c.encode = ml_collections.ConfigDict(
        dict(
            # Caption source of compressed files: '' (none), a JSON {name: caption} file (names
            # resolved against `captions_root`, default the file's folder, or scikit-image
            # photo names), or 'module:function' called with the padded uint8 image.
            captions="",
            captions_root="",
            # Hard-prompt search (PEZ); the tokens it finds replace the source's caption.
            prompt_search=ml_collections.ConfigDict(
                dict(
                    enabled=False,
                    length=8,  # tokens searched when there is no caption to start from
                    iterations=100,
                    eval_every=25,  # decode and keep the best prompt by LPIPS this often
                    lr=0.1,
                    weight_decay=0.1,
                    clip_weight=0.1,
                    diffusion_weight=1.0,
                    clip_path="",  # open_clip image+text towers ('' = sd_path's text_encoder)
                    seed=0,
                )
            ),
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            l_bpp=l_bpp,
            l_guide=1.0,  # ‖z_c − z_0‖²
            l_eps=1.0,
            caption_dropout=0.1,  # probability of training with the empty prompt
            lpips_weight=1.0,  # stage 2: MSE + this · LPIPS on the decoded ẑ_0
        )
    )
    # Decoder settings written into every file's header (the decoder repeats them); the text
    # around the caption is part of the model.
    c.decode = ml_collections.ConfigDict(
        dict(
            steps=decode_steps(add_steps),  # DDIM steps over [0, add_steps]: must divide it
            guidance=2.5,  # classifier-free guidance scale (1 = the caption alone)
            seed=0,
            positive_prompt=POSITIVE_PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
        )
    )

    c.data = default_data_config(source="folder", crop_size=512 if stage == 1 else 256)
    c.batch_size = 4
    c.optimizer.update(lr=1e-4, schedule="constant", aux_lr=1e-3)
    c.total_steps = 100_000 if stage == 1 else 200_000
    c.eval_every = 10_000

    if variant == "tiny":
        c.model.sd_path = a["backbone"] or tiny_sd_folder()
        c.model.compressor = ml_collections.ConfigDict(
            dict(N=32, M=32, groups=(8, 24), enc_channels=32, bottlenecks=1)
        )
        c.model.adapter = ml_collections.ConfigDict(dict(size_ratio=0.25, head_channels=4))
        c.encode.captions = "" if a["backbone"] else str(SKIMAGE_CAPTIONS)
        c.decode.steps = 2
        c.decode.guidance = 1.0
    sd_method_variant(c, variant, lr=3e-3, crop=128)
    if variant == "tiny" and not a["backbone"]:
        c.data.captions = str(SKIMAGE_CAPTIONS)
    return c
