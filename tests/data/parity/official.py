"""Helpers of the make_*.py scripts beside this file, which write the reference files of the
parity tests (tests/test_parity_*.py) from the official PyTorch code. They never run in CI.

Scratch environment (outside the project; what wrote the files here):

    python3.11 -m venv /work/scratch/parity/venv
    # torch (CPU), numpy, safetensors, transformers: jaxcodec's own environment
    echo $JAXCODEC_VENV/lib/python3.11/site-packages \\
        > /work/scratch/parity/venv/lib/python3.11/site-packages/jaxcodec.pth
    /work/scratch/parity/venv/bin/pip install --no-deps compressai==1.2.4 einops omegaconf

Official code, at the pinned commits (../shared/reference/official/README.md), unpacked with
`git archive` from the public repositories:

    RDEIC  b179274 (official history, read through github.com/ShreyasBhaktharam/RDEIC)
           git archive b179274 model ldm utils configs | tar -x -C /work/scratch/parity/rdeic
    DiffO  dd56f49 (github.com/Freemasti/DiffO)
           git archive dd56f49 | tar -x -C /work/scratch/parity/diffo

Then, from the project root:
    /work/scratch/parity/venv/bin/python tests/data/parity/make_<module>.py /work/scratch/parity/X

Training-only imports of the official files that this environment lacks are replaced by inert
stand-ins (:func:`stub`): nothing they provide runs in the modules compared (timm's DropPath /
trunc_normal_ at drop rate 0 and with every weight overwritten, torchvision's transforms that
CompressAI registers, the Lightning base classes, metric and entropy-coder packages).

Every parameter is drawn anew (zero-initialised layers included) and rounded to float16 values,
so the float16 weight files hold exactly what the official forward used; inputs likewise.
Outputs are float32.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent


def stub(name: str, **attributes) -> types.ModuleType:
    """An inert module ``name`` (and its parents) holding ``attributes``."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        full = ".".join(parts[:i])
        if full not in sys.modules:
            module = types.ModuleType(full)
            module.__path__ = []
            sys.modules[full] = module
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], module)
    module = sys.modules[name]
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def stub_timm() -> None:
    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, std=1.0, **_):
        return torch.nn.init.trunc_normal_(tensor, std=std)

    stub("timm.models.layers", DropPath=torch.nn.Identity, to_2tuple=to_2tuple,
         trunc_normal_=trunc_normal_)  # fmt: skip


def stub_torchvision() -> None:
    stub("torchvision.transforms", ToPILImage=object)


def use_repository(root: str | Path) -> None:
    sys.path.insert(0, str(Path(root).resolve()))


def fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest float16 value (kept float32)."""
    return t.half().float()


def perturb(module: torch.nn.Module, seed: int, *, skip: tuple[str, ...] = ()) -> None:
    """Every parameter drawn anew (no zero-initialised layer hides a mistake), rounded to
    float16: kernels ~ N(0, 1/fan_in), 1-D ``weight`` (norm scales) ~ 1 + N(0, 0.2²), biases
    ~ N(0, 0.2²). Parameters named in ``skip`` (codebooks) are left to the caller."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in skip:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                value = noise / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                value = 1.0 + 0.2 * noise
            else:
                value = 0.2 * noise
            p.copy_(fp16(value))


def codebook_from(vectors: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """A codebook at the scale of real latents: ``num`` of the (N, D) ``vectors`` plus noise of
    a third of their spread, rounded to float16."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, vectors.shape[0], (num,), generator=g)
    spread = vectors.std(dim=0, keepdim=True)
    return fp16(vectors[pick] + 0.3 * spread * torch.randn(num, vectors.shape[1], generator=g))


def state_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict as numpy: float parameters as float16 (exact: see :func:`perturb`),
    buffers in their own dtype (float masks as float16 when that is exact)."""
    out = {}
    for key, value in module.state_dict().items():
        a = value.detach().cpu().numpy()
        if a.dtype == np.float32 and np.array_equal(a.astype(np.float16).astype(np.float32), a):
            a = a.astype(np.float16)
        out[key] = np.ascontiguousarray(a)
    return out


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)


def as_input(t: torch.Tensor) -> np.ndarray:
    """An input tensor as stored: NHWC float16 (it must be float16-exact: see :func:`fp16`)."""
    a = nchw_to_nhwc(t)
    assert np.array_equal(a.astype(np.float16).astype(a.dtype), a), "round inputs with fp16()"
    return a.astype(np.float16)


def write(module_name: str, weights: dict, reference: dict, meta: dict) -> Path:
    """tests/data/parity/<module_name>/{weights,reference}.safetensors and meta.json.
    Reference arrays are NHWC (jaxcodec's layout); inputs are float16-exact."""
    folder = HERE / module_name
    folder.mkdir(exist_ok=True)
    if weights:  # seeded modules (tests/parity_files.py) keep their weights in meta.json
        save_file(weights, str(folder / "weights.safetensors"))
    ref = {}
    for k, v in reference.items():
        a = nchw_to_nhwc(v) if isinstance(v, torch.Tensor) else np.asarray(v)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        ref[k] = np.ascontiguousarray(a)
    save_file(ref, str(folder / "reference.safetensors"))
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{folder}: {size / 1024:.0f} KiB")
    return folder
