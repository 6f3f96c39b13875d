"""Patch-wise generation of images larger than the training crop (HFD).

The canvas is covered by P×P patches on a regular grid of stride S = P - O (O the overlap,
at most P/2), padded so that the grid covers it. Patches fall into four groups by the parity of
their (row, column) grid index; patches of one group never overlap, so a group is generated in
parallel. Group 0 is generated from the condition alone; every later patch also sees the pixels
that earlier groups already wrote inside its window (as context: values and a mask). It writes
the pixels nobody wrote before and, over the known band of its window, feathers from its own
output (next to the new pixels) to the context (at the window's edge): the network makes the
content continue its context, and the feathering keeps the image continuous even where a model
has not learnt to.

Patches are generated in batches of a fixed size (the last one padded), so one compiled
sampler serves every image size and memory follows the patch and the batch, not the image.
Each patch draws its noise from the decode key folded with its grid index: the result does not
depend on the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

# (condition [B, P, P, C], context [B, P, P, c], mask [B, P, P, 1], keys [B]) → patches [B, P, P, c]
PatchSampler = Callable[[np.ndarray, np.ndarray, np.ndarray, jax.Array], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """Where the patches of an H×W image go, in generation order."""

    height: int
    width: int
    patch: int
    overlap: int

    def __post_init__(self):
        if not 0 <= 2 * self.overlap <= self.patch:
            raise ValueError(f"overlap {self.overlap} must be in [0, patch/2 = {self.patch // 2}]")

    @property
    def stride(self) -> int:
        return self.patch - self.overlap

    def _count(self, size: int) -> int:
        return max(1, -(-(size - self.overlap) // self.stride))

    @property
    def shape(self) -> tuple[int, int]:
        """Grid rows and columns."""
        return self._count(self.height), self._count(self.width)

    @property
    def canvas(self) -> tuple[int, int]:
        """The padded size the grid covers exactly."""
        rows, cols = self.shape
        return (rows - 1) * self.stride + self.patch, (cols - 1) * self.stride + self.patch

    def groups(self) -> list[list[tuple[int, int, int]]]:
        """Four lists of (index, top, left), by (row, column) parity; empty groups dropped."""
        rows, cols = self.shape
        out = []
        for pr, pc in ((0, 0), (0, 1), (1, 0), (1, 1)):
            group = [
                (r * cols + c, r * self.stride, c * self.stride)
                for r in range(pr, rows, 2)
                for c in range(pc, cols, 2)
            ]
            if group:
                out.append(group)
        return out


def generate_in_patches(
    sample: PatchSampler,
    condition: np.ndarray,
    *,
    patch: int,
    overlap: int,
    batch: int,
    channels: int,
    key: jax.Array,
    feather: bool = True,
) -> np.ndarray:
    """condition [H, W, C] (e.g. the stage-1 reconstruction) → generated image [H, W, channels].

    An image that fits one patch is generated whole, at its own size.
    """
    h, w = condition.shape[:2]
    if h <= patch and w <= patch:
        keys = jax.random.fold_in(key, 0)[None]
        ctx = np.zeros((1, h, w, channels), np.float32)
        return np.asarray(sample(condition[None], ctx, np.zeros((1, h, w, 1), np.float32), keys))[0]
    grid = PatchGrid(h, w, patch, overlap)
    ch, cw = grid.canvas
    cond = np.pad(condition, ((0, ch - h), (0, cw - w), (0, 0)), mode="edge")
    canvas = np.zeros((ch, cw, channels), np.float32)
    written = np.zeros((ch, cw, 1), np.float32)
    for group in grid.groups():
        for start in range(0, len(group), batch):
            part = group[start : start + batch]
            padded = part + [part[-1]] * (batch - len(part))  # fixed batch: one compilation
            window = [(slice(t, t + patch), slice(left, left + patch)) for _, t, left in padded]
            cond_b = np.stack([cond[r, c] for r, c in window])
            mask_b = np.stack([written[r, c] for r, c in window])
            ctx_b = np.stack([canvas[r, c] for r, c in window]) * mask_b
            keys = jax.numpy.stack([jax.random.fold_in(key, i) for i, _, _ in padded])
            out = np.asarray(sample(cond_b, ctx_b, mask_b, keys))
            for (r, c), piece, known in zip(window[: len(part)], out, mask_b, strict=False):
                keep = _context_weight(known, overlap) if feather else known
                canvas[r, c] = keep * canvas[r, c] + (1.0 - keep) * piece
        for _, t, left in group:
            written[t : t + patch, left : left + patch] = 1.0
    return canvas[:h, :w]


def _context_weight(known: np.ndarray, overlap: int) -> np.ndarray:
    """1 on known pixels at least `overlap` away from the new ones, falling linearly to 1/O next
    to them; 0 on new pixels."""
    from scipy import ndimage

    if not known.any():
        return known
    distance = ndimage.distance_transform_cdt(known[..., 0] > 0, metric="chessboard")
    return np.minimum(distance / max(overlap, 1), 1.0)[..., None].astype(np.float32)


def context_mask(
    key: jax.Array, batch: int, patch: int, overlap: int, probability: float = 0.75
) -> jax.Array:
    """Training masks shaped like decode-time context: each side strip of `overlap` pixels and
    each O×O corner is known with probability 1/2 (a superset of the patterns later groups see),
    and with probability 1 - `probability` nothing is known (group 0). [batch, P, P, 1]."""
    k_use, k_parts = jax.random.split(key)
    use = jax.random.bernoulli(k_use, probability, (batch,))
    parts = jax.random.bernoulli(k_parts, 0.5, (batch, 8)) & use[:, None]
    idx = jax.numpy.arange(patch)
    near, far = idx < overlap, idx >= patch - overlap
    rows = [near, far]
    cols = [near, far]

    def part(i, r, c):  # known where the row test r and the column test c both hold
        return parts[:, i, None, None] & r[None, :, None] & c[None, None, :]

    every = jax.numpy.ones(patch, bool)
    mask = part(0, near, every) | part(1, far, every) | part(2, every, near) | part(3, every, far)
    for i, (r, c) in enumerate((r, c) for r in rows for c in cols):
        mask = mask | part(4 + i, r, c)
    return mask[..., None].astype(jax.numpy.float32)
