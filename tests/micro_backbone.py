"""A micro LDM backbone for the tests: a few steps of both stages of `configs/ldm.py` at toy
widths on scikit-image photos, exported as the diffusers folder every SD-based method's
`model.sd_path` takes (`WORKDIR/stage2/backbone`). Seconds, not minutes: the point is the
format and the plumbing, not the quality."""

from __future__ import annotations

from pathlib import Path

from jaxcodec.configlib import load_config
from jaxcodec.data import default_data_config

MICRO_VAE = dict(
    block_out_channels=(4, 4, 8, 8),
    layers_per_block=1,
    norm_num_groups=2,
    mid_block_add_attention=True,
)
MICRO_UNET = dict(  # one level: XLA's compile time on a CPU grows with the number of layers
    block_out_channels=(16,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    attention_head_dim=(2,),
    cross_attention_dim=16,
    norm_num_groups=8,
)


def micro_config(stage1_steps: int = 3, stage2_steps: int = 3):
    c = load_config("configs/ldm.py:tiny")
    c.mesh.num_devices = 1
    c.data = default_data_config(source="skimage", crop_size=32)
    c.eval_data = default_data_config(source="skimage")
    c.eval_data.max_images = 1
    c.model.vae.update(MICRO_VAE)
    c.model.discriminator.update(ndf=8, num_layers=1)
    c.model.unet.update(MICRO_UNET)
    c.model.text_length = 4
    c.batch_size = 2
    c.total_steps = stage1_steps
    c.loss.disc_start = 1  # the discriminator's branch runs too
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 1000
    c.scale_factor_batches = 2
    c.num_eval_images_logged = 1
    c.sample.update(num=2, steps=2, size=32)
    c.stage2.update(total_steps=stage2_steps, batch_size=2)
    c.stage2.data.crop_size = 32
    c.stage2.optimizer.warmup_steps = 0
    return c


def make_micro_backbone(root: Path) -> tuple[Path, list[dict]]:
    """Trains both micro stages in `root` (resuming if done) → (backbone folder, summaries)."""
    from jaxcodec.train import train_stages

    summaries = train_stages(micro_config(), root)
    return Path(root) / "stage2" / "backbone", summaries
