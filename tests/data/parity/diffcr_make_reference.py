"""Reference files of DiffCR's parity tests (tests/test_diffcr_nn.py), written from the public
PyTorch code. Never runs in CI.

Source: github.com/Darc8-sun/DiffCR at c26465f (the commit ../shared/reference/official names):
``compressor.compressor_v3`` (``compressor.py``, ``compressor_module.py``, ``ckbd.py``),
``module.Time_aware_refinementX`` and ``module.ProjLayer`` (``module.py``, with LDM's
``ldm/modules/attention.py`` and ``ldm/modules/diffusionmodules/util.py``).

Scratch environment (outside the project; what wrote the files here):

    python3.11 -m venv /work/scratch/diffcr/venv   # + a .pth onto jaxcodec's site-packages
    /work/scratch/diffcr/venv/bin/pip install --no-deps compressai==1.2.6 omegaconf \
        antlr4-python3-runtime==4.9.3 pytorch_msssim && .../pip install pandas
    # torch 2.13.0+cpu, einops 0.8.2, transformers 5.25.0 from jaxcodec's environment
    git show c26465f:<file> for every .py/.yaml of the repository → /work/scratch/diffcr/src

The repository lacks two files its ``ldm`` package imports: ``ldm/util.py`` (re-exports
``utils_l.instantiate_from_config``) and ``ldm/xformers_state.py`` (``is_xformers_available()``
→ False: LDM's plain softmax ``CrossAttention``) are added in the scratch copy; ``torchac``,
``torchvision.transforms`` and ``torch_geometric`` (imported by ``ckbd.py`` and by CompressAI's
registries) are inert stand-ins on ``PYTHONPATH``; none of them runs in the modules compared.
``compressor_v3`` loads its frozen pair from ``.ckpt/quant_module/`` (sic): a link ``.ckpt`` →
``ckpt`` in the checkout lets the official constructor run as written. Then:

    cd /work/scratch/diffcr/src && PYTHONPATH=../stubs:. ../venv/bin/python \
        $PROJECT/tests/data/parity/diffcr_make_reference.py

Small official configurations keep the files under 2 MB each: the compressor with M = N = 16,
two slices of 8 channels and 32 codes (its channel-context widths 224/128 are fixed in the
code); FaSE with model_channels 32 and one RRDB of growth 8 (the official class, its
``mid_layer`` rebuilt with the official ``make_layer``; FDA is the official 96-wide one);
ProjLayer 64 → 128 → 64. Every parameter is drawn anew (zero-initialised layers included) and
rounded to float16 values, so the float16 weight files hold exactly what the official forward
used; the codebook is drawn from the hyper encoder's outputs (at the scale of real latents).
Inputs are float16-exact; reference arrays are NHWC float32. Sizes are non-square and not
powers of two: moments 24×40 (y 12×20, z 3×5), latents 12×20.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
REPOSITORY, COMMIT = "Darc8-sun/DiffCR", "c26465f"
COMPRESSOR = dict(channel_c=[8, 8], M=16, N=16, K=8, cb_size=32, num_slice=2)
FASE = dict(in_ch=4, out_ch=4, model_channels=32, num_rrdb=1, num_grow_ch=8)
PROJ = dict(in_dim=64, out_dim=64, hidden_dim=128)


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def perturb(module: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Kernels ~ N(0, 1/fan_in), 1-D weights (norm scales) ~ 1 + N(0, 0.2²), biases ~
    N(0, 0.2²), all rounded to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in skip:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(fp16(noise / math.sqrt(p[0].numel())))
            else:
                p.copy_(fp16((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise))


def nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)


def write(name: str, module: torch.nn.Module, reference: dict, meta: dict) -> None:
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    weights = {}
    for key, value in module.state_dict().items():
        a = value.detach().cpu().numpy()
        if a.dtype == np.float32 and np.array_equal(a.astype(np.float16).astype(np.float32), a):
            a = a.astype(np.float16)
        weights[key] = np.ascontiguousarray(a)
    save_file(weights, str(folder / "weights.safetensors"))
    ref = {}
    for k, v in reference.items():
        a = nhwc(v) if isinstance(v, torch.Tensor) else np.asarray(v)
        ref[k] = np.ascontiguousarray(a.astype(np.float32) if a.dtype == np.float64 else a)
    save_file(ref, str(folder / "reference.safetensors"))
    env = {"torch": torch.__version__}
    try:
        import compressai

        env["compressai"] = compressai.__version__
    except ImportError:
        pass
    meta = {"repository": REPOSITORY, "commit": COMMIT, "env": env, **meta}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"{folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 1024:.0f} KiB")


def compressor() -> None:
    import compressor as official

    torch.manual_seed(0)
    net = official.compressor_v3(**COMPRESSOR).eval()
    perturb(net, seed=1, skip=("quantize.embedding.weight",))
    g = torch.Generator().manual_seed(2)
    h = fp16(2.0 * torch.randn(1, 8, 24, 40, generator=g))  # the VAE's 8 moments
    with torch.no_grad():
        y = net.encoder(h)
        z = net.hyper_enc(y)
        vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, vectors.shape[0], (32,), generator=g)
        noise = 0.3 * vectors.std(0, keepdim=True) * torch.randn(32, vectors.shape[1], generator=g)
        net.quantize.embedding.weight.copy_(fp16(vectors[pick] + noise))
        net.quantize.embed_prob.copy_(torch.softmax(torch.randn(32, generator=g), 0))
        z_q, _, (_, _, indices) = net.quantize(z)
        hyper = net.hyper_dec(z_q)
        out = net(h)
        out8 = net.out(net.decoder(out["y_hat"]))
    reference = {
        "h": h.half(),
        "y": y,
        "z": z,
        "indices": indices.int(),
        "hyper": hyper,
        "y_hat": out["y_hat"],
        "y_likelihoods": out["likelihoods"]["y"],
        "out8": out8,
        "c_mode": out["x_hat"],  # quant.qconv → posterior mode (unscaled)
    }
    write("diffcr_compressor", net, reference, {"class": "compressor.compressor_v3",
                                                "args": COMPRESSOR})  # fmt: skip


def fase() -> None:
    import module as official

    torch.manual_seed(0)
    args = {k: FASE[k] for k in ("in_ch", "out_ch", "model_channels")}
    net = official.Time_aware_refinementX(**args, num_grow_ch=FASE["num_grow_ch"])
    net.mid_layer = official.make_layer(
        official.RRDB, FASE["num_rrdb"], num_feat=64, num_grow_ch=FASE["num_grow_ch"]
    )
    net = net.eval()
    perturb(net, seed=1)
    g = torch.Generator().manual_seed(2)
    z0 = fp16(torch.randn(2, 4, 12, 20, generator=g))
    c_hat = fp16(z0 + 0.5 * torch.randn(2, 4, 12, 20, generator=g))
    t = torch.tensor([599, 299])
    with torch.no_grad():
        features = net.FQCA(c_hat, z0, t)
        out = net(z0, c_hat, t)
    reference = {"z0": z0.half(), "c_hat": c_hat.half(), "t": t.int(), "fda": features, "out": out}
    write("diffcr_fase", net, reference, {"class": "module.Time_aware_refinementX",
                                          "args": FASE})  # fmt: skip


def proj_layer() -> None:
    import module as official

    torch.manual_seed(0)
    net = official.ProjLayer(**PROJ).eval()
    perturb(net, seed=1)
    g = torch.Generator().manual_seed(2)
    x = fp16(torch.randn(2, 5, PROJ["in_dim"], generator=g))
    with torch.no_grad():
        out = net(x)
    write("diffcr_proj_layer", net, {"x": x.half(), "out": out},
          {"class": "module.ProjLayer", "args": PROJ})  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ".")
    compressor()
    fase()
    proj_layer()
