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
    h, w = latent.shape[:2]
    if h <= tile and w <= tile:
        return np.asarray(synthesise(latent[None]))[0]
    rows, cols = -(-h // tile), -(-w // tile)
    padded = np.pad(
        latent,
        ((halo, rows * tile - h + halo), (halo, cols * tile - w + halo), (0, 0)),
        mode="edge",
    )
    out = None
    for i in range(rows):
        for j in range(cols):
            span = tile + 2 * halo
            window = padded[i * tile : i * tile + span, j * tile : j * tile + span]
            piece = np.asarray(synthesise(window[None]))[0]
            if out is None:
                out = np.empty((h * scale, w * scale, piece.shape[-1]), piece.dtype)
            core = piece[halo * scale : (halo + tile) * scale, halo * scale : (halo + tile) * scale]
            r0, c0 = i * tile * scale, j * tile * scale
            r1, c1 = min(r0 + tile * scale, h * scale), min(c0 + tile * scale, w * scale)
            out[r0:r1, c0:c1] = core[: r1 - r0, : c1 - c0]
    return out
