"""Reference file of ResULIC's compressor (``model.compressor.ELIC``, ResULIC 1b014ef — NJUVISION
c874f54 has the same module) for tests/test_parity_resulic.py. Never runs in CI; see
official.py for the scratch environment (CompressAI), and unpack the official code with
``git archive 1b014ef model utils | tar -x -C /work/scratch/parity/resulic``:

    /work/scratch/parity/venv/bin/python tests/data/parity/make_resulic_elic.py \\
        /work/scratch/parity/resulic

The official class at reduced width (N 32, M 48, slices [8, 16, 24]; the layers, GELUs,
transposed convs, checkerboard and channel contexts as released; its channel contexts are 224
and 128 wide at any size, so the weights are seeded, not stored: tests/parity_files.py).
Input: a 1×4×48×80 latent (non-square, not powers of two). Outputs of the evaluation-mode
forward (rounding around means / medians): y, z_c and the likelihoods of y and z. The first
seed whose rounded values all stay MARGIN away from a rounding boundary is used, so float32
round-off of another implementation cannot flip a rounding.
"""

import sys
from pathlib import Path

import numpy as np
import official
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: parity_files
import parity_files as pf  # noqa: E402

ARGS = dict(in_nc=4, out_nc=4, enc_mid=[32, 32, 32], N=32, M=48, slice_num=3, slice_ch=[8, 16, 24])
SEED, MARGIN, SHAPE = 20240, 1e-4, (1, 4, 48, 80)


def run(compressor, seed: int):
    """(meta, reference, rounding margin) of the official module on seed's weights."""
    module = compressor.ELIC(**ARGS).eval()
    entries = [
        [k, list(v.shape), *pf.seeded_rule(k, tuple(v.shape))] for k, v in module.named_parameters()
    ]
    meta = {
        "repository": "lihao612/ResULIC (NJUVISION/ResULIC c874f54: the same module)",
        "commit": "1b014ef",
        "class": "model.compressor.ELIC",
        "args": ARGS,
        "seed": seed,
        "entries": entries,
    }
    state = pf.seeded_state(meta)
    with torch.no_grad():  # parameters only (CompressAI's load_state_dict wants CDF buffers)
        for name, param in module.named_parameters():
            param.copy_(torch.from_numpy(state[name]))
    margins = []
    ste = compressor.quantize_ste

    def recording_ste(v):
        frac = (v - torch.floor(v)).detach().numpy()
        margins.append(float(np.abs(frac - 0.5).min()))
        return ste(v)

    compressor.quantize_ste = recording_ste
    x = torch.from_numpy((4.0 * pf.uniform(seed + 1, int(np.prod(SHAPE))) - 2.0).reshape(SHAPE))
    x = x.float()
    with torch.no_grad():
        y = module.encoder(x)
        z_c, (y_lik, z_lik), _ = module(x, x)
    compressor.quantize_ste = ste
    ref = {"x": x, "y": y, "z_c": z_c, "y_likelihoods": y_lik, "z_likelihoods": z_lik}
    return meta, ref, min(margins)


def main(root: str) -> None:
    official.stub_torchvision()  # CompressAI's dataset registry imports it
    official.use_repository(root)
    import model.compressor as compressor

    for seed in range(SEED, SEED + 1000):
        meta, ref, margin = run(compressor, seed)
        if margin > MARGIN:
            break
    meta["rounding_margin"] = margin
    official.write("resulic_elic", {}, ref, meta)


if __name__ == "__main__":
    main(sys.argv[1])
