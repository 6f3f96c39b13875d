"""Classical codecs: real files round trip, and bpp and quality rise along each sweep."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from jaxcodec.baselines import BACKENDS, ClassicalCodec, sweep
from jaxcodec.codec_api import ImageCodec
from jaxcodec.metrics import psnr


@pytest.fixture(scope="module")
def image():
    return np.ascontiguousarray(data.astronaut()[100:228, 150:342])  # 128 x 192


@pytest.mark.parametrize("codec", sorted(BACKENDS))
def test_round_trip_and_rate_order(image, codec):
    values = BACKENDS[codec].sweep
    lo, hi = ClassicalCodec(codec, values[0]), ClassicalCodec(codec, values[-1])
    assert isinstance(lo, ImageCodec)
    d_lo, d_hi = lo.compress(image), hi.compress(image)
    r_lo, r_hi = lo.decompress(d_lo), hi.decompress(d_hi)
    for r in (r_lo, r_hi):
        assert r.dtype == np.uint8 and r.shape == image.shape
    assert len(d_lo) < len(d_hi)  # the sweep runs from low to high rate
    p_lo, p_hi = float(psnr(image, r_lo)[0]), float(psnr(image, r_hi)[0])
    assert 15 < p_lo < p_hi and p_hi > 30, (p_lo, p_hi)
    assert set(lo.timings) == {"encode", "decode"} and lo.timings["encode"] > 0
    # A different decoder instance reads the file: nothing rides along outside the bytes.
    np.testing.assert_array_equal(ClassicalCodec(codec, values[3]).decompress(d_lo), r_lo)


def test_errors(image):
    with pytest.raises(ValueError, match="unknown classical codec"):
        sweep("bpg")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        ClassicalCodec("jpeg", 50).compress(image.astype(np.float32))
    assert [c.name for c in sweep("jxl", [25, 1])] == ["jxl-d25", "jxl-d1"]
