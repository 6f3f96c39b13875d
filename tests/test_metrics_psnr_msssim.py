"""PSNR and MS-SSIM against TensorFlow's tf.image implementations on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from jaxcodec.metrics import ms_ssim, psnr


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    # Odd sizes exercise the padded downsampling between scales.
    a = data.astronaut()[:243, :201]
    b = data.coffee()[:243, :201]
    noisy = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    blurred = ((a.astype(np.float32) + np.roll(a, 2, axis=1)) / 2).round().astype(np.uint8)
    return np.stack([a, a, a]), np.stack([noisy, blurred, b])


def test_ms_ssim_matches_tensorflow(pairs):
    tf = pytest.importorskip("tensorflow")
    x, y = pairs
    ref = tf.image.ssim_multiscale(tf.constant(x), tf.constant(y), max_val=255).numpy()
    ours = np.asarray(ms_ssim(x, y))
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    # The same numbers from float inputs in [0, 1].
    np.testing.assert_allclose(np.asarray(ms_ssim(x / 255.0, y / 255.0)), ours, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ms_ssim(x, x)), 1.0, atol=1e-6)


def test_psnr_matches_tensorflow(pairs):
    tf = pytest.importorskip("tensorflow")
    x, y = pairs
    ref = tf.image.psnr(tf.constant(x), tf.constant(y), max_val=255).numpy()
    np.testing.assert_allclose(np.asarray(psnr(x, y)), ref, atol=1e-4)
    mse = np.mean((x[0].astype(np.float64) - y[0]) ** 2)
    assert float(psnr(x[0], y[0])[0]) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-4)


def test_input_checks(pairs):
    x, y = pairs
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, y[:, :-1])
    with pytest.raises(ValueError, match="at least 176"):
        ms_ssim(x[:, :150], y[:, :150])
