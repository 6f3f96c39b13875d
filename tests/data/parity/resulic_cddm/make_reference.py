"""Writes manifest.json + reference.npz: the official ResULIC CDDM's ε on seeded weights.

Run by hand (never in CI), from the project root, with an interpreter that has torch and
einops and the official code checked out (NJUVISION/ResULIC c874f54, or lihao612/ResULIC
1b014ef: model/cldm_zc_xs_stage2_eps_ddim.py, ldm/):

    python tests/data/parity/resulic_cddm/make_reference.py OFFICIAL_SRC

The official ``CDDM`` (``ControlModule`` + zero convs both ways) at a small width driving the
official LDM ``UNetModel`` (2 levels, cross-attention in the second and the middle; control
ratio 0.5 so that the control branch's attention widths are multiples of 32, as LDM's
GroupNorm(32) needs), every parameter and the ``scale_list`` drawn from the seeded stream of
tests/resulic_parity.py. Inputs: a 2×4×12×20 latent and hint (non-square, not powers of two),
two timesteps, a 2×7×32 context. Outputs: the plain UNet's ε and the controlled ε.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # tests/ (resulic_parity)
import resulic_parity as rp  # noqa: E402

SEED = 4242
COMMON = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=64,
    attention_resolutions=[2],
    num_res_blocks=1,
    channel_mult=[1, 2],
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=32,
    legacy=False,
)
UNET = dict(COMMON, num_head_channels=32)
CDDM = dict(COMMON, num_head_channels=16, hint_channels=4, control_model_ratio=0.5)
# The same base UNet in diffusers' terms (jaxcodec's UNet is built from this).
DIFFUSERS_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=[64, 128],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[2, 4],
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    sample_size=32,
)
BASE_PREFIX = "model.diffusion_model."


def main(src: str) -> None:
    sys.path.insert(0, src)
    rp.stub_missing(  # imported by the training module around CDDM, never used here
        "pytorch_lightning", "omegaconf", "torchvision", "open_clip", "kornia", "cv2", "tqdm"
    )
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from model.cldm_zc_xs_stage2_eps_ddim import CDDM as OfficialCDDM

    base, cddm = UNetModel(**UNET).eval(), OfficialCDDM(**CDDM).eval()
    tensors = [(BASE_PREFIX + k, v) for k, v in base.named_parameters()]
    tensors += [*cddm.named_parameters(), ("scale_list", cddm.scale_list)]
    entries = []
    for key, value in tensors:
        offset, scale = rp.weight_rule(key, tuple(value.shape))
        if key == "scale_list":  # non-trivial control scales, folded by the importer
            offset, scale = 1.0, 0.5
        entries.append([key, list(value.shape), offset, scale])
    manifest = {
        "unet": UNET,
        "cddm": CDDM,
        "unet_diffusers": DIFFUSERS_UNET,
        "seed": SEED,
        "entries": entries,
    }
    state = rp.draw(manifest)
    with torch.no_grad():
        for key, value in tensors:
            value.copy_(torch.from_numpy(state[key]))

    u = rp.uniform(SEED + 1, 2 * 2 * 4 * 12 * 20 + 2 * 7 * 32)
    x = (4.0 * u[:1920] - 2.0).reshape(2, 4, 12, 20).astype(np.float32)
    hint = (4.0 * u[1920:3840] - 2.0).reshape(2, 4, 12, 20).astype(np.float32)
    context = (2.0 * u[3840:] - 1.0).reshape(2, 7, 32).astype(np.float32)
    t = np.array([150, 37], np.int64)
    with torch.no_grad():
        args = [torch.from_numpy(a) for a in (x, hint, t, context)]
        eps_base = base(args[0], timesteps=args[2], context=args[3])
        eps = cddm(x=args[0], hint=args[1], timesteps=args[2], context=args[3], base_model=base)
    np.savez_compressed(
        HERE / "reference.npz",
        x=x,
        hint=hint,
        t=t,
        context=context,
        eps_base=eps_base.numpy(),
        eps=eps.numpy(),
    )
    (HERE / "manifest.json").write_text(json.dumps(manifest) + "\n")
    print(f"{len(entries)} entries; |ε| {np.abs(eps.numpy()).max():.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
