"""Reference files of DiffO's GT VQGAN (``taming.models.vqgan.VQModel``, DiffO dd56f49, the
``GT_encoder`` of configs/config.yaml) for tests/test_parity_diffo.py. Never runs in CI; see
official.py for the scratch environment:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_diffo_vqgan.py \\
        /work/scratch/parity/diffo

The official ddconfig at a small size (two levels of 32 channels, one resnet each,
attention at the lowest level, a 4-channel latent, 16 codes). DiffO uses the encoder
unquantised: ``encode`` (encoder, quant_conv) and ``decode`` (post_quant_conv, decoder) are
compared, with the encoder's own output. Case (a): batch 2, 24×40.
"""

import sys

import official
import torch

DDCONFIG = dict(
    double_z=False,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 1],
    num_res_blocks=1,
    attn_resolutions=[16],
    dropout=0.0,
)
ARGS = dict(ddconfig=DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, n_embed=16, embed_dim=4)


def main(root: str) -> None:
    official.use_repository(root)
    official.stub("pytorch_lightning", LightningModule=torch.nn.Module)
    from ldm.util import instantiate_from_config

    official.stub("main", instantiate_from_config=instantiate_from_config)
    from taming.models.vqgan import VQModel

    torch.manual_seed(0)
    net = VQModel(**ARGS).eval()
    official.perturb(net, seed=1, skip=("quantize.embedding.weight",))
    g = torch.Generator().manual_seed(2)
    x = official.fp16(torch.rand(2, 3, 24, 40, generator=g) * 2 - 1)
    with torch.no_grad():
        h = net.encoder(x)
        z = net.encode(x)  # force_not_quantize=True: DiffO's use
        rec = net.decode(z)
        codes = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        net.quantize.embedding.weight.copy_(official.codebook_from(codes, 16, seed=3))
    ref = {"a.x": official.as_input(x), "a.encoder": h, "a.z": z, "a.decode": rec}
    meta = {
        "repository": "Freemasti/DiffO",
        "commit": "dd56f49",
        "class": "taming.models.vqgan.VQModel",
        "args": ARGS,
    }
    official.write("diffo_vqgan", official.state_arrays(net), ref, meta)


if __name__ == "__main__":
    main(sys.argv[1])
