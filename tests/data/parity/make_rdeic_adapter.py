"""Reference files of RDEIC's control adapter (``model.rdeic.NoiseEstimator``, RDEIC b179274)
driving a small LDM ``UNetModel`` of the same code, for tests/test_parity_rdeic.py. Never runs
in CI; see official.py for the scratch environment:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_rdeic_adapter.py \\
        /work/scratch/parity/rdeic

The SD UNet of configs/model/rdeic.yaml at a small size (32 channels × [1, 1], one resnet a
level, a linear-projection transformer at the first level and in the middle, heads of 16,
context 16) and the NoiseEstimator on it (ratio 0.25, heads of 4, a 16-channel hint). Zero
convs and ``scale_list`` are drawn at random (as if trained with another control scale) and
the run-time ``control_scale`` is 0.7. The base UNet is also written in diffusers' layout
(diffusers' own LDM conversion; checked here against the LDM forward): what ``--sd`` gives.
Outputs: ε of the controlled UNet, ε of the plain UNet (``forward_unconditional``), and the
control branch's output of every input block and of its middle block. Case (a): batch 2,
12×20 latents, timesteps 10 and 299.
"""

import json
import sys

import official
import torch

UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1],
    num_res_blocks=1,
    channel_mult=[1, 1],
    num_head_channels=16,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=16,
    legacy=False,
)
ADAPTER = {
    **UNET,
    "hint_channels": 16,
    "num_head_channels": 4,
    "control_model_ratio": 0.25,
    "control_scale": 1.0,
}
CONTROL_SCALE = 0.7  # the official config's run-time control_scale
DIFFUSERS_UNET = dict(  # the same UNet as a diffusers config.json
    _class_name="UNet2DConditionModel",
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 32],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[2, 2],
    cross_attention_dim=16,
    use_linear_projection=True,
    norm_num_groups=32,
)


def main(root: str) -> None:
    # diffusers first: it probes the installed packages, which the stand-ins below are not.
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.numpy import save_file

    official.stub_torchvision()
    for name in ("pyiqa", "torchac", "cv2"):
        official.stub(name)
    official.use_repository(root)
    import ldm.models.diffusion  # noqa: F401  (the real packages, before stubbing modules
    import model  # noqa: F401  in them)

    # Training-only classes model/rdeic.py imports (the RDEIC LightningModule, its sampler,
    # LPIPS loss): inert stand-ins.
    official.stub("pytorch_lightning.utilities.types", EPOCH_OUTPUT=object)
    official.stub("ldm.models.diffusion.ddpm", LatentDiffusion=torch.nn.Module)
    official.stub("model.spaced_sampler_relay", SpacedSampler=object)
    official.stub("model.lpips", LPIPS=object)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from model.rdeic import NoiseEstimator

    torch.manual_seed(0)
    base = UNetModel(**UNET).eval()
    ne = NoiseEstimator(**ADAPTER).eval()
    official.perturb(base, seed=1)
    official.perturb(ne, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        n = ne.scale_list.numel()
        ne.scale_list.copy_(official.fp16(0.5 + torch.rand(n, generator=g)))
    ne.control_scale = CONTROL_SCALE
    x = official.fp16(torch.randn(2, 4, 12, 20, generator=g))
    hint = official.fp16(torch.randn(2, 16, 12, 20, generator=g))
    context = official.fp16(torch.randn(2, 3, 16, generator=g))
    t = torch.tensor([10, 299])
    seen = {}
    blocks = [(f"control.input_blocks.{i}", b) for i, b in enumerate(ne.control_model.input_blocks)]
    for name, m in [*blocks, ("control.middle_block", ne.control_model.middle_block)]:
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    with torch.no_grad():
        eps = ne(x, hint, t, context, base)
        eps_sd = ne.forward_unconditional(x, t, context, base)
    ref = {
        "a.x": official.as_input(x),
        "a.hint": official.as_input(hint),
        "a.context": official.as_input(context),
        "a.t": t.int(),
        "a.eps": eps,
        "a.eps_sd": eps_sd,
        **{f"a.{k}": v for k, v in seen.items()},
    }
    meta = {
        "repository": "ShreyasBhaktharam/RDEIC (official history)",
        "commit": "b179274",
        "class": "model.rdeic.NoiseEstimator + ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "args": {"noise_estimator": ADAPTER, "unet": UNET},
        "control_scale": CONTROL_SCALE,
    }
    folder = official.write("rdeic_adapter", official.state_arrays(ne), ref, meta)

    # The base UNet in diffusers' layout, converted by diffusers and checked against LDM's.
    config = {k: v for k, v in DIFFUSERS_UNET.items() if not k.startswith("_")}
    ldm = {f"model.diffusion_model.{k}": v for k, v in base.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ldm, config)
    unet = UNet2DConditionModel(**config).eval()
    unet.load_state_dict(converted)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=context).sample
    assert torch.allclose(want, eps_sd, atol=1e-5, rtol=1e-5), (want - eps_sd).abs().max()
    (folder / "unet").mkdir(exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(DIFFUSERS_UNET, indent=1) + "\n")
    tensors = {k: official.fp16(v).numpy().astype("float16") for k, v in converted.items()}
    save_file(tensors, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
