"""Reference files of DiffO's Swin-UNet (``models.unet.UNetModelSwin``, DiffO dd56f49) for
tests/test_parity_diffo.py. Never runs in CI; see official.py for the scratch environment:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_diffo_swin_unet.py \\
        /work/scratch/parity/diffo

The official configs/config.yaml at a small size: every argument as there except the widths
(GroupNorm32 needs multiples of 32), one resnet per level and two levels; ``image_size`` 64 as
there, so the shift masks are precomputed for 64×64 inputs and recomputed for others. Its latent
(4 channels) is that of make_diffo_vqgan.py's and make_diffo_base.py's modules.
Cases: (a) batch 2, 8×24, every block's output; (b) 32×32; (c) 64×64 (the precomputed masks).
"""

import sys

import official
import torch

ARGS = dict(
    image_size=64,
    in_channels=8,
    model_channels=32,
    out_channels=4,
    cond_lq=True,
    attention_resolutions=[64, 32],
    dropout=0,
    channel_mult=[1, 1],
    num_res_blocks=[1, 1],
    conv_resample=True,
    dims=2,
    use_fp16=False,
    num_heads=-1,
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=False,
    swin_depth=2,
    swin_embed_dim=32,
    window_size=4,
    final_window_size=2,
    mlp_ratio=4,
)
CASES = {"a": (2, 8, 24), "b": (1, 32, 32), "c": (1, 64, 64)}


def main(root: str) -> None:
    official.stub_timm()
    official.use_repository(root)
    from models.unet import UNetModelSwin

    torch.manual_seed(0)
    net = UNetModelSwin(**ARGS).eval()
    official.perturb(net, seed=1)
    g = torch.Generator().manual_seed(2)
    ref, seen = {}, {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
        for name, m in [
            *[(f"input_blocks.{i}", b) for i, b in enumerate(net.input_blocks)],
            ("middle_block", net.middle_block),
            *[(f"output_blocks.{i}", b) for i, b in enumerate(net.output_blocks)],
        ]
    ]
    for case, (n, h, w) in CASES.items():
        c = ARGS["out_channels"]
        x = official.fp16(torch.randn(n, c, h, w, generator=g))
        lq = official.fp16(torch.randn(n, c, h, w, generator=g))
        t = torch.arange(n) % 2
        seen.clear()
        with torch.no_grad():
            out = net(x, t, lq)
        ref[f"{case}.x"], ref[f"{case}.lq"] = official.as_input(x), official.as_input(lq)
        ref[f"{case}.t"], ref[f"{case}.out"] = t.numpy().astype("int32"), out
        if case == "a":
            ref.update({f"{case}.{k}": v for k, v in seen.items()})
    for hook in hooks:
        hook.remove()
    meta = {
        "repository": "Freemasti/DiffO",
        "commit": "dd56f49",
        "class": "models.unet.UNetModelSwin",
        "args": ARGS,
        "cases": {k: list(v) for k, v in CASES.items()},
    }
    official.write("diffo_swin_unet", official.state_arrays(net), ref, meta)


if __name__ == "__main__":
    main(sys.argv[1])
