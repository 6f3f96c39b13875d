"""The reference files of the parity tests (tests/data/parity/, written from the official code
by the make_*.py scripts there) and the one error measure they use."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.weights import diffusers as dw

DATA = Path(__file__).parent / "data" / "parity"
RTOL = 1e-5  # max |jax − official| / max |official|, float32 end to end


def reference(module: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta.json, reference arrays) of one official module."""
    folder = DATA / module
    meta = json.loads((folder / "meta.json").read_text())
    return meta, dw.read_safetensors(folder / "reference.safetensors")


def close(got, want, what: str, rtol: float = RTOL) -> float:
    """Asserts max |got − want| / max |want| ≤ rtol (shapes equal); returns it."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= rtol, f"{what}: max relative error {err:.2e} > {rtol:.0e}"
    return err


def f32(a) -> jax.Array:
    return jnp.asarray(np.asarray(a, np.float32))


# Seeded weights: a module whose parameters would not fit a small file (ResULIC's ELIC: its
# channel contexts are 224 and 128 wide at any size) keeps in meta.json its state dict's
# entries ``[key, shape, offset, scale]`` and a seed; every value is ``offset + scale·(2u − 1)``
# with u uniform in [0, 1) from PCG64's raw 64-bit stream (``(bits >> 11)·2^-53``, stable across
# numpy versions), drawn in entry order — by the make_*.py script and by the test alike.


def uniform(seed: int, n: int) -> np.ndarray:
    """n doubles in [0, 1) from PCG64(seed)'s raw stream."""
    raw = np.random.PCG64(seed).random_raw(n)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def seeded_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(offset, scale) of an entry: kernels ±sqrt(3/fan_in) (unit-variance activations),
    norm scales 1 ± 0.1, everything else ± 0.1."""
    if len(shape) >= 2:
        return 0.0, float(np.sqrt(3.0 / np.prod(shape[1:])))
    if "norm" in key and key.endswith(".weight"):
        return 1.0, 0.1
    return 0.0, 0.1


def seeded_state(meta: dict) -> dict[str, np.ndarray]:
    """The state dict meta.json's ``entries`` and ``seed`` describe (float32 arrays)."""
    entries = meta["entries"]
    sizes = [int(np.prod(shape)) for _, shape, _, _ in entries]
    u = uniform(int(meta["seed"]), sum(sizes))
    out, start = {}, 0
    for (key, shape, offset, scale), size in zip(entries, sizes, strict=True):
        values = offset + scale * (2.0 * u[start : start + size] - 1.0)
        out[key] = values.reshape(shape).astype(np.float32)
        start += size
    return out


def official_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: torch shape} of a ``*_keys.txt`` listing (../shared/reference/official), without
    non-persistent buffers."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("#") or line.startswith("buffer(non-persistent)"):
            continue
        _, key, rest = line.split(" ", 2)
        out[key] = tuple(int(d) for d in rest.rsplit(" ", 1)[0].strip("()").split(",") if d)
    return out
