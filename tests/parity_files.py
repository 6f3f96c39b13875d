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
