"""FID and KID on image patches (the HiFiC protocol), with a Flax FID-Inception network.

Generative codecs are judged on distributions, and datasets of a few hundred images give too
few samples for a 2048-d Gaussian; HiFiC therefore cuts every image into 256x256 patches and
adds a second grid shifted by 128 px. ``hific_patches`` does that; ``PatchFID`` turns patches
into pool3 features of the FID Inception-v3 (the TF-ported network of pytorch-fid) and
compares reference and reconstruction sets.

Inception weights cannot be shipped or downloaded here: the user gives a ``.npz`` or
``.safetensors`` file holding the state dict of pytorch-fid's ``FIDInceptionV3`` under its
own names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``, ...;
``fc.*`` and ``num_batches_tracked`` are ignored). It is never unpickled.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcodec.metrics.weights import WeightsError, flatten, load_user_weights, unflatten

# --------------------------------------------------------------------------- the network


class FrozenBatchNorm(nn.Module):
    """Inference batch norm whose parameters carry torch's names (weight, running_mean, ...)."""

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (c,))
        b = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (w / jnp.sqrt(var + self.eps)) + b


class BasicConv2d(nn.Module):
    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)  # fmt: skip
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_exclude_pad(x):
    """3x3 stride-1 average pool that does not count the zero padding (FID variant)."""
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    pad = ((1, 1), (1, 1))
    s = nn.pool(x, 0.0, jax.lax.add, (3, 3), (1, 1), pad)
    n = nn.pool(ones, 0.0, jax.lax.add, (3, 3), (1, 1), pad)
    return s / n


def _max_pool(x, stride: int, pad: int = 0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """``max_pool_branch``: FID's Mixed_7c pools with max, Mixed_7b with pad-excluding average."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)  # fmt: skip
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)  # fmt: skip
        pooled = _max_pool(x, 1, 1) if self.max_pool_branch else _avg_pool_exclude_pad(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pool3 features (N, 2048) of images in [0, 1]; resized bilinearly to ``resize`` first."""

    resize: int = 299

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n = x.shape[0]
        x = jax.image.resize(
            x, (n, self.resize, self.resize, x.shape[-1]), "bilinear", antialias=False
        )
        x = 2.0 * x - 1.0
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(False, name="Mixed_7b")(x)
        x = InceptionE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------- weights


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(
        lambda: FIDInceptionV3(resize=75).init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    )["params"]
    return {k: v.shape for k, v in flatten(shapes).items()}


def torch_name(flax_name: str) -> str:
    """Flax path ``Mixed_5b/branch1x1/conv/kernel`` -> ``Mixed_5b.branch1x1.conv.weight``."""
    parts = flax_name.split("/")
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def inception_params_from_state_dict(state: dict[str, np.ndarray]) -> dict:
    """pytorch-fid FIDInceptionV3 state dict (numpy) -> Flax params, checking every shape."""
    expected = _expected_shapes()
    flat = {}
    for name, shape in expected.items():
        key = torch_name(name)
        if key not in state:
            raise WeightsError(f"Inception weights lack {key!r} (expected pytorch-fid names)")
        v = np.asarray(state[key], np.float32)
        if name.endswith("kernel"):
            v = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if v.shape != tuple(shape):
            raise WeightsError(
                f"Inception weight {key!r} has shape {v.shape}, expected {tuple(shape)}"
            )
        flat[name] = jnp.asarray(v)
    used = {torch_name(n) for n in expected}
    extra = [k for k in state if k not in used and not k.startswith("fc.")
             and not k.endswith("num_batches_tracked")]  # fmt: skip
    if extra:
        raise WeightsError(f"Inception weights hold unknown entries, e.g. {extra[:3]}")
    return unflatten(flat)


def load_inception(path: str | os.PathLike) -> dict:
    """Flax params of the FID Inception from a user-given ``.npz`` / ``.safetensors`` file."""
    if not os.path.isfile(path):
        raise WeightsError(
            f"Inception weights not found at {path}. FID/KID need the pytorch-fid FIDInceptionV3 "
            "state dict saved as .npz or .safetensors (no download happens here)."
        )
    return inception_params_from_state_dict(load_user_weights(path))


# --------------------------------------------------------------------------- statistics


def hific_patches(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Non-overlapping ``size`` patches, plus those of the grid shifted by ``size // 2``."""
    out = []
    for off in (0, size // 2):
        sub = image[off:, off:]
        h, w = sub.shape[0] // size, sub.shape[1] // size
        for i in range(h):
            for j in range(w):
                out.append(sub[i * size : (i + 1) * size, j * size : (j + 1) * size])
    if not out:
        return np.zeros((0, size, size, image.shape[-1]), image.dtype)
    return np.stack(out)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64.

    tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^1/2 S_b S_a^1/2 (same spectrum), which avoids the complex
    round-off of a general matrix square root.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError("need two (N >= 2, D) feature arrays of the same D")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_cov = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * tr_cov)


def kernel_inception_distance(
    feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over random subsets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError("KID needs at least two features per set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        vals.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


@functools.cache
def _inception_apply(resize: int):
    """One jitted network per input resolution, shared by every ``PatchFID``."""
    return jax.jit(FIDInceptionV3(resize=resize).apply)


class PatchFID:
    """FID/KID between reference and reconstructed image sets on HiFiC patches."""

    def __init__(self, weights: str | dict, patch: int = 256, batch: int = 16, resize: int = 299):
        self.params = load_inception(weights) if isinstance(weights, str | os.PathLike) else weights
        self.patch, self.batch = patch, batch
        self._apply = _inception_apply(resize)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        patches = [p for img in images for p in hific_patches(img, self.patch)]
        if not patches:
            raise ValueError(f"no {self.patch}x{self.patch} patch fits in the images")
        out = []
        for i in range(0, len(patches), self.batch):
            chunk = np.stack(patches[i : i + self.batch])
            n = len(chunk)
            if n < self.batch:  # one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, 0)])
            x = jnp.asarray(chunk, jnp.float32) / (255.0 if chunk.dtype == np.uint8 else 1.0)
            out.append(np.asarray(self._apply({"params": self.params}, x))[:n])
        return np.concatenate(out)

    def compare(self, refs: Sequence[np.ndarray], recs: Sequence[np.ndarray]) -> dict[str, float]:
        fa, fb = self.features(refs), self.features(recs)
        kid, kid_std = kernel_inception_distance(fa, fb)
        return {"fid": frechet_distance(fa, fb), "kid": kid, "kid_std": kid_std, "patches": len(fa)}
