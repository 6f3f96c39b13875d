"""Decoding a fully-convolutional synthesis in overlapping tiles: memory follows the tile.

Every tile has the same shape (one compilation), carries a halo of latent pixels on each side
that covers the synthesis' receptive field, and contributes only its centre. Latents are
edge-replicated past the image border, as the encoder edge-pads the image itself. Whether an
image is tiled depends only on its size, so a file decodes to the same pixels everywhere.
"""

from collections.abc import Callable

import numpy as np


def synthesise_tiled(
    synthesise: Callable[[np.ndarray], np.ndarray],
    latent: np.ndarray,
    *,
    scale: int,
    tile: int,
    halo: int,
) -> np.ndarray:
    """`synthesise`: latents [1, h, w, C] → images [1, h·scale, w·scale, c] (uint8).

    latent [h, w, C] → image [h·scale, w·scale, c]. Latents no larger than `tile` on both
    sides are synthesised whole.
    """
    return synthesise_tiled_batch(synthesise, latent[None], scale=scale, tile=tile, halo=halo)[0]


def synthesise_tiled_batch(
    synthesise: Callable[[np.ndarray], np.ndarray],
    latents: np.ndarray,
    *,
    scale: int,
    tile: int,
    halo: int,
) -> np.ndarray:
    """Latents [N, h, w, C] of one size → images [N, h·scale, w·scale, c]: the same tiles as
    `synthesise_tiled`, each one synthesised for all N images in one call."""
    n, h, w = latents.shape[:3]
    if h <= tile and w <= tile:
        return np.asarray(synthesise(latents))
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.pad(
        latents,
        ((0, 0), (halo, rows * tile - h + halo), (halo, cols * tile - w + halo), (0, 0)),
        mode="edge",
    )
    out = None
    span = tile + 2 * halo
    for i in range(rows):
        for j in range(cols):
            window = padded[:, i * tile : i * tile + span, j * tile : j * tile + span]
            piece = np.asarray(synthesise(window))
            if out is None:
                out = np.empty((n, h * scale, w * scale, piece.shape[-1]), piece.dtype)
            core = piece[
                :, halo * scale : (halo + tile) * scale, halo * scale : (halo + tile) * scale
            ]
            r0, c0 = i * tile * scale, j * tile * scale
            r1, c1 = min(r0 + tile * scale, h * scale), min(c0 + tile * scale, w * scale)
            out[:, r0:r1, c0:c1] = core[:, : r1 - r0, : c1 - c0]
    return out
