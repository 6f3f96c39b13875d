"""FID/KID: Frechet distance vs scipy, KID vs a direct MMD, patches, Inception weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from jaxcodec.metrics.fid import (
    PatchFID,
    _expected_shapes,
    frechet_distance,
    hific_patches,
    kernel_inception_distance,
    load_inception,
    torch_name,
)
from jaxcodec.metrics.fid import (
    inception_params_from_state_dict as load_inception_from_state,
)
from jaxcodec.metrics.weights import WeightsError


def _scipy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 64))
    b = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    ref = _scipy_fid(a, b)
    assert ref > 1.0
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_kid_matches_direct_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 16)), rng.normal(size=(50, 16)) + 0.4
    k = lambda x, y: (x @ y.T / 16 + 1) ** 3
    n = 50
    ref = ((k(a, a).sum() - np.trace(k(a, a))) / (n * (n - 1))
           + (k(b, b).sum() - np.trace(k(b, b))) / (n * (n - 1)) - 2 * k(a, b).mean())  # fmt: skip
    kid, std = kernel_inception_distance(a, b, num_subsets=3, subset_size=50)
    assert kid == pytest.approx(ref, rel=1e-9) and std == pytest.approx(0, abs=1e-12)
    same, _ = kernel_inception_distance(
        a, rng.normal(size=(50, 16)), num_subsets=20, subset_size=40
    )
    assert abs(same) < 0.2 * kid


def test_hific_patches_include_shifted_grid():
    img = np.arange(512 * 768 * 3, dtype=np.int64).reshape(512, 768, 3)
    p = hific_patches(img, 256)
    assert p.shape == (6 + 2, 256, 256, 3)  # 2x3 grid + the 1x2 grid shifted by 128
    np.testing.assert_array_equal(p[6], img[128:384, 128:384])
    assert hific_patches(img[:200], 256).shape[0] == 0


def _random_state_dict(rng) -> dict[str, np.ndarray]:
    state = {}
    for name, shape in _expected_shapes().items():
        key = torch_name(name)
        if name.endswith("kernel"):
            shape = (shape[3], shape[2], shape[0], shape[1])
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            state[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)
    return state


def test_inception_weights_random_file(tmp_path):
    rng = np.random.default_rng(0)
    state = _random_state_dict(rng)
    path = tmp_path / "inception.npz"
    np.savez(path, **state)
    params = load_inception(str(path))
    assert params["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)
    # resize=75 (Inception's smallest input) keeps the test fast; the graph is the same.
    fid = PatchFID(params, patch=64, batch=4, resize=75)
    imgs = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2)]
    feats = fid.features(imgs)
    assert feats.shape == (2 * (4 + 1), 2048) and np.all(np.isfinite(feats))
    assert feats.std(0).mean() > 0
    blurred = [np.clip(i.astype(int) // 2 + 64, 0, 255).astype(np.uint8) for i in imgs]
    out = fid.compare(imgs, blurred)
    assert out["patches"] == 10 and out["fid"] > 0

    with pytest.raises(WeightsError, match="not found"):
        load_inception(str(tmp_path / "missing.npz"))
    del state["Mixed_5b.branch1x1.conv.weight"]
    np.savez(tmp_path / "broken.npz", **state)
    with pytest.raises(WeightsError, match="Mixed_5b.branch1x1.conv.weight"):
        load_inception(str(tmp_path / "broken.npz"))
    pkl = tmp_path / "inception.pth"
    pkl.write_bytes(b"not read")
    with pytest.raises(WeightsError, match=".npz or .safetensors"):
        load_inception(str(pkl))


def test_evaluate_point_with_fid(tmp_path):
    """The evaluation loop feeds the patches of originals and reconstructions to FID/KID: its
    numbers equal FID/KID computed directly on the same images. (With random Inception weights
    every FID is numerical noise, so two of them are never ordered.)"""
    from jaxcodec.baselines import ClassicalCodec
    from jaxcodec.evaluate import MetricSuite, evaluate_point

    rng = np.random.default_rng(0)
    params = load_inception_from_state(_random_state_dict(rng))
    suite = MetricSuite(["psnr"])
    suite.dataset = ["fid", "kid"]
    suite._fid = PatchFID(params, patch=64, batch=4, resize=75)
    from skimage import data

    imgs = [("a.png", data.astronaut()[:128, :192]), ("b.png", data.coffee()[:128, :192])]
    codec = ClassicalCodec("jpeg", 2)
    point = evaluate_point(codec, imgs, suite, warmup=0, progress=False)
    assert point["fid_patches"] == 2 * (6 + 2)
    recs = [codec.decompress(codec.compress(img)) for _, img in imgs]
    direct = suite._fid.compare([img for _, img in imgs], recs)
    assert direct["patches"] == point["fid_patches"]
    scale = max(abs(direct["fid"]), 1e-30)
    assert abs(point["fid"] - direct["fid"]) <= 1e-6 * scale + 1e-30
    assert np.isfinite(point["kid"])
    np.testing.assert_allclose(point["kid"], direct["kid"], rtol=1e-6, atol=1e-30)
