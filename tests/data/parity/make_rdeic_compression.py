"""Reference files of RDEIC's compressor (``model.compression.Compression``, RDEIC b179274) for
tests/test_parity_rdeic.py. Never runs in CI; see official.py for the scratch environment:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_rdeic_compression.py \\
        /work/scratch/parity/rdeic

The official module at a small size: in_nc 16, N = M = 16, 32 codes, one slice of 16 channels
(``ChannelContextEX`` has fixed 224/128-wide 5×5 layers: 0.77 M parameters at any size, so the
channel context is left to tests/test_rdeic_nn.py). The codebook is drawn at the scale of the
hyper latents and ``embed_prob`` at random; CompressAI's CDF buffers stay as built (empty).
Eval-mode forward, every stage: y, z, VQ indices and codes, hyper parameters, ŷ, likelihoods,
hint, z_c. Case (a): a 24×40 feature map. The state dict is the bare module's.
"""

import sys

import official
import torch

ARGS = dict(in_nc=16, out_nc=4, N=16, M=16, slice_num=1, slice_ch=[16], codebook_size=32)


def main(root: str) -> None:
    official.stub_torchvision()  # CompressAI registers torchvision transforms
    official.stub("torchac")  # its entropy coder, used by compress() only
    official.use_repository(root)
    from model.compression import Compression

    torch.manual_seed(0)
    net = Compression(**ARGS).eval()
    official.perturb(net, seed=1, skip=("quantize.embedding.weight",))
    g = torch.Generator().manual_seed(2)
    h = official.fp16(torch.randn(1, 16, 24, 40, generator=g))
    seen = {}

    def keep(name, pre=False):
        def hook(_m, args, out=None):
            seen[name] = args[0] if pre else out

        return hook

    with torch.no_grad():
        z = net.hyper_enc(net.encoder(h))
        vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        net.quantize.embedding.weight.copy_(official.codebook_from(vectors, 32, seed=3))
        prob = torch.rand(32, generator=g)
        net.quantize.embed_prob.copy_(official.fp16(prob / prob.sum()))
        for name in ("encoder", "hyper_enc", "quantize", "hyper_dec", "decoder", "out"):
            getattr(net, name).register_forward_hook(keep(name))
        net.decoder.register_forward_pre_hook(keep("y_hat", pre=True))
        z_c, (lik,), _, _, hint = net(h)
    z_q, _, (_, _, indices) = seen["quantize"]
    ref = {
        "a.h": official.as_input(h),
        "a.y": seen["encoder"],
        "a.z": seen["hyper_enc"],
        "a.indices": indices.reshape(1, 3, 5).int(),
        "a.z_q": z_q,
        "a.hyper": seen["hyper_dec"],
        "a.y_hat": seen["y_hat"],
        "a.likelihoods": lik,
        "a.hint": hint,
        "a.z_c": z_c,
    }
    meta = {
        "repository": "ShreyasBhaktharam/RDEIC (official history)",
        "commit": "b179274",
        "class": "model.compression.Compression",
        "args": ARGS,
    }
    official.write("rdeic_compression", official.state_arrays(net), ref, meta)


if __name__ == "__main__":
    main(sys.argv[1])
