"""Writes manifest.json + reference.npz: the official ResULIC ELIC's outputs on seeded weights.

Run by hand (never in CI), from the project root, with an interpreter that has torch and
compressai (1.2.x) and the official code checked out (NJUVISION/ResULIC c874f54, or
lihao612/ResULIC 1b014ef, whose model/compressor.py is the same):

    python tests/data/parity/resulic_elic/make_reference.py OFFICIAL_SRC

The module is the official class at reduced width (N 32, M 48, slices [8, 16, 24]; the layer
structure, GELUs, transposed convs, checkerboard and channel contexts as released); every
parameter is drawn from the seeded stream of tests/resulic_parity.py (the buffers are the
module's own); the input latent is 1×4×48×80 (non-square, not powers of two). Outputs of the
evaluation-mode forward (rounding around means / medians): y, z_c, and the likelihoods of y and
z. The first seed from SEED whose rounded values all stay MARGIN away from a rounding boundary
is used (float32 round-off of another implementation must not flip a rounding).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # tests/ (resulic_parity)
import resulic_parity as rp  # noqa: E402

ARGS = dict(in_nc=4, out_nc=4, enc_mid=[32, 32, 32], N=32, M=48, slice_num=3, slice_ch=[8, 16, 24])
SEED = 20240
MARGIN = 1e-4
SHAPE = (1, 4, 48, 80)


def main(src: str) -> None:
    sys.path.insert(0, src)
    rp.stub_missing("torchvision")  # compressai's dataset registry imports it
    import model.compressor as official

    for seed in range(SEED, SEED + 1000):
        manifest, x, outputs, margin = run(official, seed)
        if margin > MARGIN:
            break
    np.savez_compressed(HERE / "reference.npz", x=x, **outputs)
    (HERE / "manifest.json").write_text(json.dumps(manifest) + "\n")
    print(f"seed {seed}: {len(manifest['entries'])} parameters, rounding margin {margin:.3g}")


def run(official, seed: int):
    """(manifest, input, outputs, rounding margin) of the official module on seed's weights."""
    module = official.ELIC(**ARGS).eval()
    entries = [
        [k, list(v.shape), *rp.weight_rule(k, tuple(v.shape))] for k, v in module.named_parameters()
    ]
    manifest = {"module": "model.compressor.ELIC", "args": ARGS, "seed": seed, "entries": entries}
    state = rp.draw(manifest)
    with torch.no_grad():  # parameters only (CompressAI's load_state_dict wants CDF buffers)
        for name, param in module.named_parameters():
            param.copy_(torch.from_numpy(state[name]))
    margins = []
    ste = official.quantize_ste

    def recording_ste(v):
        frac = (v - torch.floor(v)).detach().numpy()
        margins.append(float(np.abs(frac - 0.5).min()))
        return ste(v)

    official.quantize_ste = recording_ste
    x = rp.uniform(seed + 1, int(np.prod(SHAPE))).reshape(SHAPE) * 4.0 - 2.0
    x = x.astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        y = module.encoder(xt)
        z_c, (y_lik, z_lik), _ = module(xt, xt)
    official.quantize_ste = ste
    outputs = dict(y=y, z_c=z_c, y_likelihoods=y_lik, z_likelihoods=z_lik)
    return manifest, x, {k: v.numpy() for k, v in outputs.items()}, min(margins)


if __name__ == "__main__":
    main(sys.argv[1])
