"""Reference files of DiffO's base-code autoencoder (``ldm.models.autoencoder.EMAVQModelTorch``,
DiffO dd56f49, the ``autoencoder`` of configs/config.yaml) for tests/test_parity_diffo.py.
Never runs in CI; see official.py for the scratch environment:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_diffo_base.py \\
        /work/scratch/parity/diffo

The official ddconfig at a small size (one level of 32 channels, one resnet, attention, the
4-channel latent of make_diffo_vqgan.py, 16 codes). The EMA codebook is drawn at the scale of
the encoder's outputs. Compared: ``encode`` without quantising (encoder, quant_conv), the
quantiser's indices and codes, ``decode`` of the codes (post_quant_conv, decoder). Case (a):
batch 2, 12×20 latents.
"""

import sys

import official
import torch

DDCONFIG = dict(
    double_z=False,
    z_channels=4,
    resolution=16,
    in_channels=4,
    out_ch=4,
    ch=32,
    ch_mult=[1],
    num_res_blocks=1,
    attn_resolutions=[16],
    dropout=0.0,
    padding_mode="zeros",
)
ARGS = dict(ddconfig=DDCONFIG, n_embed=16, embed_dim=4)
EMA = tuple(f"quantize.embedding.{k}" for k in ("weight", "cluster_size", "embed_avg"))


def main(root: str) -> None:
    official.use_repository(root)
    official.stub("torchac")  # entropy coder of its bpp printout, not used here
    from ldm.models.autoencoder import EMAVQModelTorch

    torch.manual_seed(0)
    net = EMAVQModelTorch(**ARGS).eval()
    official.perturb(net, seed=1, skip=EMA)
    g = torch.Generator().manual_seed(2)
    z0 = official.fp16(torch.randn(2, 4, 12, 20, generator=g))
    with torch.no_grad():
        h = net.encode(z0, force_not_quantize=True)
        vectors = h.permute(0, 2, 3, 1).reshape(-1, 4)
        emb = net.quantize.embedding
        emb.weight.copy_(official.codebook_from(vectors, 16, seed=3))
        emb.cluster_size.copy_(official.fp16(torch.rand(16, generator=g) * 50 + 1))
        emb.embed_avg.copy_(official.fp16(emb.weight * emb.cluster_size[:, None]))
        z_q, _, (_, _, indices) = net.quantize(h)
        dec = net.decode(z_q, force_not_quantize=True)
    ref = {
        "a.z0": official.as_input(z0),
        "a.h": h,
        "a.indices": indices.reshape(2, 12, 20).int(),
        "a.z_q": z_q,
        "a.decode": dec,
    }
    meta = {
        "repository": "Freemasti/DiffO",
        "commit": "dd56f49",
        "class": "ldm.models.autoencoder.EMAVQModelTorch",
        "args": ARGS,
    }
    official.write("diffo_base", official.state_arrays(net), ref, meta)


if __name__ == "__main__":
    main(sys.argv[1])
