"""Bjontegaard deltas (BD-rate, BD-metric) through the ``bjontegaard`` package.

Lower-is-better metrics (LPIPS, DISTS, FID, KID) are negated first, so a negative BD-rate
always means the test codec needs fewer bits for the same quality. The curves must overlap
along the integration axis: no overlap raises ``ValueError``; a partial overlap below
``min_overlap`` (fraction of the union of both ranges) warns, since the delta then describes
only a sliver of either curve.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

LOWER_IS_BETTER = frozenset({"lpips", "lpips-vgg", "dists", "fid", "kid"})


class NoOverlapError(ValueError):
    """The two RD curves share no range along the integration axis."""


def _oriented(metric: str, values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return -v if metric.lower() in LOWER_IS_BETTER else v


def _prepare(rate, values, metric, who: str) -> tuple[np.ndarray, np.ndarray]:
    rate = np.asarray(rate, dtype=np.float64)
    q = _oriented(metric, values)
    if rate.shape != q.shape or rate.ndim != 1:
        raise ValueError(f"{who}: rate and {metric} must be 1-D lists of equal length")
    ok = np.isfinite(rate) & np.isfinite(q) & (rate > 0)
    rate, q = rate[ok], q[ok]
    if len(rate) < 2:
        raise ValueError(f"{who}: need at least two finite rate points for {metric}")
    # Identical points (two settings that produce the same file) carry no extra information.
    pts = np.unique(np.stack([rate, q], axis=1), axis=0)
    rate, q = pts[:, 0], pts[:, 1]
    if np.any(np.diff(rate) <= 0) or np.any(np.diff(q) <= 0):
        better = "lower" if metric.lower() in LOWER_IS_BETTER else "higher"
        raise ValueError(f"{who}: {metric} ({better} is better) must improve strictly with rate "
                         "for a Bjontegaard delta")  # fmt: skip
    return rate, q


def _overlap(a: np.ndarray, b: np.ndarray, min_overlap: float, what: str) -> None:
    lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
    union = max(a.max(), b.max()) - min(a.min(), b.min())
    if hi <= lo:
        raise NoOverlapError(
            f"the RD curves do not overlap in {what} (anchor {a.min():.4g}..{a.max():.4g}, "
            f"test {b.min():.4g}..{b.max():.4g}); no Bjontegaard delta exists"
        )
    if (hi - lo) / union < min_overlap:
        warnings.warn(
            f"RD curves overlap on only {100 * (hi - lo) / union:.0f}% of their {what} range; "
            "the Bjontegaard delta covers only that part",
            stacklevel=3,
        )


def bd_rate(
    rate_anchor, metric_anchor, rate_test, metric_test, metric: str = "psnr",
    method: str = "akima", min_overlap: float = 0.5,
) -> float:  # fmt: skip
    """Average rate difference of test vs anchor in percent at equal ``metric``."""
    import bjontegaard

    ra, qa = _prepare(rate_anchor, metric_anchor, metric, "anchor")
    rt, qt = _prepare(rate_test, metric_test, metric, "test")
    _overlap(qa, qt, min_overlap, metric)
    return float(bjontegaard.bd_rate(ra, qa, rt, qt, method=method,
                                     require_matching_points=False, min_overlap=0))  # fmt: skip


def bd_metric(
    rate_anchor, metric_anchor, rate_test, metric_test, metric: str = "psnr",
    method: str = "akima", min_overlap: float = 0.5,
) -> float:  # fmt: skip
    """Average ``metric`` difference of test vs anchor at equal rate (sign as the raw metric)."""
    import bjontegaard

    ra, qa = _prepare(rate_anchor, metric_anchor, metric, "anchor")
    rt, qt = _prepare(rate_test, metric_test, metric, "test")
    _overlap(np.log10(ra), np.log10(rt), min_overlap, "log rate")
    delta = float(bjontegaard.bd_psnr(ra, qa, rt, qt, method=method,
                                      require_matching_points=False, min_overlap=0))  # fmt: skip
    return -delta if metric.lower() in LOWER_IS_BETTER else delta
