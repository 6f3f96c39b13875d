"""BD-rate / BD-metric: known shifts of a synthetic RD curve, negation, overlap checks."""

from __future__ import annotations

import numpy as np
import pytest

from jaxcodec.metrics.bd_rate import NoOverlapError, bd_metric, bd_rate

RATE = np.array([0.05, 0.1, 0.2, 0.4, 0.8])
PSNR = 30 + 6 * np.log2(RATE / 0.1)  # 6 dB per doubling


def test_half_the_rate_is_minus_50_percent():
    # Same quality at half the bits everywhere: exactly -50 %, and +6 dB at equal rate.
    assert bd_rate(RATE, PSNR, RATE / 2, PSNR) == pytest.approx(-50.0, abs=1e-6)
    assert bd_metric(RATE, PSNR, RATE / 2, PSNR) == pytest.approx(6.0, abs=1e-6)
    assert bd_rate(RATE, PSNR, RATE, PSNR) == pytest.approx(0.0, abs=1e-9)


def test_lower_is_better_metrics_are_negated():
    lp = 0.5 - 0.1 * np.log2(RATE / 0.05)  # LPIPS falls as rate grows
    # The test codec reaches each LPIPS at half the rate: better, so negative BD-rate.
    assert bd_rate(RATE, lp, RATE / 2, lp, metric="lpips") == pytest.approx(-50.0, abs=1e-6)
    # At equal rate the test codec's LPIPS is lower by 0.1: the raw delta is -0.1.
    assert bd_metric(RATE, lp, RATE / 2, lp, metric="lpips") == pytest.approx(-0.1, abs=1e-6)
    # Taken as higher-is-better, the same numbers get worse with rate: refused.
    with pytest.raises(ValueError, match="must improve strictly"):
        bd_rate(RATE, PSNR, RATE, lp, metric="psnr")


def test_overlap_checks():
    with pytest.raises(NoOverlapError, match="do not overlap"):
        bd_rate(RATE, PSNR, RATE, PSNR + 100)
    with pytest.warns(UserWarning, match="overlap on only"):
        bd_rate(RATE, PSNR, RATE, PSNR + 20)


def test_order_and_nan_points_do_not_matter():
    perm = np.array([3, 0, 4, 1, 2])
    rate_t = np.append(RATE[perm] * 0.8, np.nan)
    psnr_t = np.append(PSNR[perm], 31.0)
    assert bd_rate(RATE, PSNR, rate_t, psnr_t) == pytest.approx(-20.0, abs=1e-6)
    # Two settings that give the same file (AVIF q0 and q2 do) count once...
    dup_r, dup_q = np.append(RATE, RATE[0]), np.append(PSNR, PSNR[0])
    assert bd_rate(RATE, PSNR, dup_r * 0.8, dup_q) == pytest.approx(-20.0, abs=1e-6)
    # ...but the same rate with a different quality is not a curve.
    with pytest.raises(ValueError, match="must improve strictly"):
        bd_rate(RATE, PSNR, np.append(RATE, RATE[0]), np.append(PSNR, PSNR[0] + 1))
