"""The interface every image codec offers to evaluation: classical baselines and jaxcodec models.

Kept apart from ``evaluate`` so a model can implement it without importing the evaluation
stack (matplotlib, metrics networks).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageCodec(Protocol):
    """Compresses a uint8 HxWx3 image to the bytes of a complete file, and back.

    ``bpp`` is always ``8 * len(compress(image)) / (H * W)`` of the original image, so
    ``compress`` must return everything the decoder needs (headers included). A codec may
    also expose ``timings``: a dict of seconds for the last call, with keys among
    ``encode``, ``denoise`` and ``decode``.
    """

    name: str

    def compress(self, image: np.ndarray) -> bytes: ...

    def decompress(self, data: bytes) -> np.ndarray: ...
