"""Reference file of ResULIC's control adapter (``CDDM`` of
model/cldm_zc_xs_stage2_eps_ddim.py, ResULIC 1b014ef — NJUVISION c874f54 has the same module)
driving a small LDM ``UNetModel`` of the same code, for tests/test_parity_resulic.py. Never
runs in CI; see official.py for the scratch environment, and unpack the official code with
``git archive 1b014ef model ldm utils | tar -x -C /work/scratch/parity/resulic``:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_resulic_cddm.py \\
        /work/scratch/parity/resulic

ControlModule + zero convs both ways (``enc_zero_convs_in``: base → control) at a small width:
64 channels × [1, 2], one resnet a level, cross-attention in the second level and the middle;
control ratio 0.5, so that the control branch's attention widths are multiples of 32 (LDM's
GroupNorm(32)); heads of 16 (control) and 32 (base); context 32. Every parameter and the
``scale_list`` are seeded (tests/parity_files.py). Inputs: 2×4×12×20 latents and hints
(non-square, not powers of two), timesteps 150 and 37, a 2×7×32 context. Outputs: ε of the
plain UNet and of the controlled one.
"""

import sys
from pathlib import Path

import numpy as np
import official
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: parity_files
import parity_files as pf  # noqa: E402

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
DIFFUSERS_UNET = dict(  # the same base UNet as a diffusers config (jaxcodec's UNet from it)
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


def main(root: str) -> None:
    official.stub_torchvision()
    for name in ("cv2", "kornia", "open_clip"):
        official.stub(name)
    official.use_repository(root)
    import ldm.models.diffusion  # noqa: F401  (the real packages, before stubbing modules
    import model  # noqa: F401  in them)

    # Training-only classes the file imports (the Lightning module and its sampler): stand-ins.
    official.stub("pytorch_lightning.utilities.types", EPOCH_OUTPUT=object)
    official.stub("ldm.models.diffusion.ddpm", LatentDiffusion=torch.nn.Module)
    official.stub("model.ddim_zc", DDIMSampler=object)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from model.cldm_zc_xs_stage2_eps_ddim import CDDM as OfficialCDDM

    base, cddm = UNetModel(**UNET).eval(), OfficialCDDM(**CDDM).eval()
    tensors = [(BASE_PREFIX + k, v) for k, v in base.named_parameters()]
    tensors += [*cddm.named_parameters(), ("scale_list", cddm.scale_list)]
    entries = []
    for key, value in tensors:
        offset, scale = pf.seeded_rule(key, tuple(value.shape))
        if key == "scale_list":  # non-trivial control scales, folded by the importer
            offset, scale = 1.0, 0.5
        entries.append([key, list(value.shape), offset, scale])
    meta = {
        "repository": "lihao612/ResULIC (NJUVISION/ResULIC c874f54: the same module)",
        "commit": "1b014ef",
        "class": "CDDM (model/cldm_zc_xs_stage2_eps_ddim.py) + ldm UNetModel",
        "args": {"cddm": CDDM, "unet": UNET},
        "unet_diffusers": DIFFUSERS_UNET,
        "seed": SEED,
        "entries": entries,
    }
    state = pf.seeded_state(meta)
    with torch.no_grad():
        for key, value in tensors:
            value.copy_(torch.from_numpy(state[key]))
    u = torch.from_numpy(pf.uniform(SEED + 1, 2 * 1920 + 2 * 7 * 32)).float()
    x = (4.0 * u[:1920] - 2.0).reshape(2, 4, 12, 20)
    hint = (4.0 * u[1920:3840] - 2.0).reshape(2, 4, 12, 20)
    context = (2.0 * u[3840:] - 1.0).reshape(2, 7, 32)
    t = torch.tensor([150, 37])
    with torch.no_grad():
        eps_base = base(x, timesteps=t, context=context)
        eps = cddm(x=x, hint=hint, timesteps=t, context=context, base_model=base)
    ref = {"x": x, "hint": hint, "t": t.int(), "context": context.numpy()}
    ref |= {"eps_base": eps_base, "eps": eps}
    official.write("resulic_cddm", {}, ref, meta)
    print(f"|ε| ≤ {np.abs(eps.numpy()).max():.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
