"""Integer CDF tables for entropy coding, built once after training and stored with the checkpoint.

A table set holds `num_tables` categorical distributions over symbols `offset .. offset+length-1`
plus one escape symbol (index `length`) for values outside that range; escaped values are
coded separately (see `coder.py`). Frequencies are integers summing to `2**PRECISION` with
every symbol (and the escape) non-zero, so any integer value can be coded and the decoder never
needs floating-point densities.

Two builders:
- `gaussian_tables`: one table per scale of a fixed log-spaced scale table (CompressAI-like),
  for y under a (mean-)scale Gaussian; scale indices are picked by integer comparison
  (`scale_index`), the same on both sides.
- `factorized_tables`: one table per channel of an `EntropyBottleneck` (the hyper latent z),
  over the range bounded by its trained tail quantiles.
"""

import numpy as np
from scipy.special import ndtr

PRECISION = 16  # frequencies sum to 2**16
TAIL_MASS = 1e-9  # probability left outside a Gaussian table's range (coded via the escape)
NUM_SCALES = 64
SCALE_MIN, SCALE_MAX = 0.11, 256.0
MAX_TABLE_LENGTH = 1 << 14  # bounds memory of a factorized table if quantiles diverged


def scale_table(num: int = NUM_SCALES, lo: float = SCALE_MIN, hi: float = SCALE_MAX) -> np.ndarray:
    """Log-spaced Gaussian scales, float64."""
    return np.exp(np.linspace(np.log(lo), np.log(hi), num))


def pmf_to_freqs(pmf: np.ndarray, tail: float, precision: int = PRECISION) -> np.ndarray:
    """Float pmf over the symbols (+ tail mass for the escape) → integer frequencies, sum 2**p.

    Every entry gets at least 1 and rounding goes by largest remainders; the result is a
    deterministic function of the float input (and it is built once, on one machine).
    """
    probs = np.concatenate([np.asarray(pmf, np.float64), [max(float(tail), 0.0)]])
    probs = np.clip(probs, 0.0, None)
    total = 1 << precision
    n = probs.size
    if n >= total:
        raise ValueError(f"table with {n} symbols cannot fit {precision}-bit frequencies")
    scaled = probs / probs.sum() * total
    freqs = np.maximum(np.floor(scaled).astype(np.int64), 1)
    left = total - int(freqs.sum())
    if left > 0:  # largest remainders get the leftover counts (stable: ties to lower index)
        freqs[np.argsort(-(scaled - np.floor(scaled)), kind="stable")[:left]] += 1
    while left < 0:  # the floor of 1 overdrew: take single counts from the largest entries
        order = np.argsort(-freqs, kind="stable")[: min(-left, n)]
        order = order[freqs[order] > 1]
        freqs[order] -= 1
        left += len(order)
    return freqs


def _pack(freq_list: list[np.ndarray], offsets: np.ndarray) -> dict[str, np.ndarray]:
    lengths = np.array([len(f) - 1 for f in freq_list], np.int32)  # without the escape
    width = int(lengths.max()) + 1
    freqs = np.zeros((len(freq_list), width), np.int32)
    for i, f in enumerate(freq_list):
        freqs[i, : len(f)] = f
    return {"freqs": freqs, "lengths": lengths, "offsets": offsets.astype(np.int32)}


def gaussian_tables(
    scales: np.ndarray | None = None, tail_mass: float = TAIL_MASS
) -> dict[str, np.ndarray]:
    """Zero-mean discretised Gaussians N(0, σ²) on unit bins, one per table scale σ."""
    scales = scale_table() if scales is None else np.asarray(scales, np.float64)
    multiplier = -_normal_ppf(tail_mass / 2)
    freq_list, offsets = [], []
    for sigma in scales:
        half = int(np.ceil(multiplier * sigma))
        k = np.arange(-half, half + 1, dtype=np.float64)
        upper = ndtr((0.5 - np.abs(k)) / sigma)
        lower = ndtr((-0.5 - np.abs(k)) / sigma)
        pmf = upper - lower
        tail = 2.0 * ndtr(-(half + 0.5) / sigma)
        freq_list.append(pmf_to_freqs(pmf, tail))
        offsets.append(-half)
    out = _pack(freq_list, np.array(offsets))
    out["scales"] = scales.astype(np.float64)
    return out


def _normal_ppf(p: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(p))


def scale_thresholds(scales: np.ndarray, frac_bits: int) -> np.ndarray:
    """Integer thresholds floor(σ_i · 2^F): a fixed-point scale s_q selects the first table with
    σ_i ≥ s_q / 2^F by integer comparison only."""
    return np.floor(np.asarray(scales, np.float64) * (1 << frac_bits)).astype(np.int64)


def scale_index(scales_q: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the smallest table scale ≥ the predicted one (clamped to the last table)."""
    idx = np.searchsorted(thresholds, np.asarray(scales_q, np.int64), side="left")
    return np.minimum(idx, len(thresholds) - 1).astype(np.int32)


def factorized_tables(pmf_fn, medians: np.ndarray, quantiles: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel tables of a factorized prior.

    `pmf_fn(values [C, n]) -> (pmf [C, n], tail [C])` evaluates the bin masses at
    `median + k` for the symbol offsets k of each channel; `quantiles` [C, 3] are the tail
    quantiles and median. The symbol range is [ceil(q0 - m) .. ceil(q2 - m)] relative to the
    median, as in CompressAI.
    """
    medians = np.asarray(medians, np.float64)
    q = np.asarray(quantiles, np.float64).reshape(len(medians), 3)
    lo = np.ceil(medians - q[:, 0])
    hi = np.ceil(q[:, 2] - medians)
    lo = np.clip(np.nan_to_num(lo, nan=1.0), 1, MAX_TABLE_LENGTH // 2).astype(np.int64)
    hi = np.clip(np.nan_to_num(hi, nan=1.0), 1, MAX_TABLE_LENGTH // 2).astype(np.int64)
    width = int((lo + hi).max()) + 1
    ks = np.arange(width)[None, :] - lo[:, None]  # [C, width] symbol offsets
    pmf, tail = pmf_fn(ks)
    freq_list = [pmf_to_freqs(pmf[c, : lo[c] + hi[c] + 1], tail[c]) for c in range(len(medians))]
    return _pack(freq_list, -lo)


def table_bits(tables: dict[str, np.ndarray], values: np.ndarray, idx: np.ndarray) -> float:
    """Ideal code length −log2 p of integer values under the integer tables, including the
    escape payloads (a 6-bit length, then the bits in 16-bit chunks; see `coder.py`) — the
    reference for measuring the coder's overhead."""
    values = np.asarray(values, np.int64).ravel()
    idx = np.asarray(idx, np.int64).ravel()
    s = values - tables["offsets"][idx]
    lengths = tables["lengths"][idx].astype(np.int64)
    escaped = (s < 0) | (s >= lengths)
    f = tables["freqs"][idx, np.where(escaped, lengths, s)].astype(np.float64)
    bits = float(np.sum(PRECISION - np.log2(f)))
    e, n = s[escaped], lengths[escaped]
    u = np.where(e < 0, 2 * (-e - 1) + 1, 2 * (e - n))
    payload = sum(6 + 16 * -(-((int(v) + 1).bit_length() - 1) // 16) for v in u)
    return bits + float(payload)
