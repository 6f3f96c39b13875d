"""Seeded weights for the ResULIC parity references (tests/data/parity/resulic_*/).

The reference files hold no weights: a manifest lists every official state-dict entry as
``[key, shape, offset, scale]`` and a seed; entry values are ``offset + scale·(2u − 1)`` with u
uniform in [0, 1) from PCG64's raw 64-bit stream (``(bits >> 11)·2^-53``, stable across numpy
versions), drawn in manifest order. The generating scripts (beside the data, run by hand in a
scratch environment with the official code) and the tests draw the same numbers here, so every
weight is perturbed and the files stay a few hundred kilobytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PARITY = Path(__file__).resolve().parent / "data" / "parity"


def uniform(seed: int, n: int) -> np.ndarray:
    """n doubles in [0, 1) from PCG64(seed)'s raw stream."""
    raw = np.random.PCG64(seed).random_raw(n)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def draw(manifest: dict) -> dict[str, np.ndarray]:
    """The state dict a manifest describes (float32 arrays)."""
    entries = manifest["entries"]
    sizes = [int(np.prod(shape)) for _, shape, _, _ in entries]
    u = uniform(int(manifest["seed"]), sum(sizes))
    out, start = {}, 0
    for (key, shape, offset, scale), size in zip(entries, sizes, strict=True):
        values = offset + scale * (2.0 * u[start : start + size] - 1.0)
        out[key] = values.reshape(shape).astype(np.float32)
        start += size
    return out


def weight_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, scale) of an entry: kernels ±sqrt(3/fan_in) (unit-variance activations),
    norm scales 1 ± 0.1, everything else ± 0.1."""
    if len(shape) >= 2:
        return 0.0, float(np.sqrt(3.0 / np.prod(shape[1:])))
    if "norm" in key and key.endswith(".weight"):
        return 1.0, 0.1
    return 0.0, 0.1


def load(module: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, arrays: inputs and reference outputs) of tests/data/parity/resulic_<module>."""
    folder = PARITY / f"resulic_{module}"
    manifest = json.loads((folder / "manifest.json").read_text())
    with np.load(folder / "reference.npz") as f:
        return manifest, dict(f)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def stub_missing(*names: str) -> None:
    """Generators only: importable empty stand-ins for packages the official code imports but
    the parity computation never uses (e.g. torchvision for compressai's dataset registry,
    pytorch_lightning for the training module around CDDM). Present packages are left alone."""
    import importlib.util
    import sys
    import types
    from importlib.machinery import ModuleSpec

    missing = {n for n in names if importlib.util.find_spec(n) is None}

    class _Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *a, **k: None})

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            return (
                ModuleSpec(name, self, is_package=True) if name.split(".")[0] in missing else None
            )

        def create_module(self, spec):
            module = _Stub(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def read_official_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: torch shape} of a ``*_keys.txt`` listing (../shared/reference/official), without
    non-persistent buffers."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("#") or line.startswith("buffer(non-persistent)"):
            continue
        _, key, rest = line.split(" ", 2)
        out[key] = tuple(int(d) for d in rest.rsplit(" ", 1)[0].strip("()").split(",") if d)
    return out
