"""Classical image codecs as ``ImageCodec`` objects: JPEG, WebP, AVIF, HEIC (x265), JPEG XL.

Each codec is configured by one quality knob and comes with a default sweep that reaches the
lowest bitrate the library allows (JPEG q=1, WebP/AVIF/HEIC q=0, JPEG XL distance 25): at the
bitrates diffusion codecs target (< 0.1 bpp) only some of them get there at all, and the
sweep shows where each one stops. HEIC through libheif/x265 stands in for BPG.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


def _pillow_encoder(fmt: str, **options) -> Callable[[np.ndarray, float], bytes]:
    def encode(image: np.ndarray, quality: float) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, quality=int(quality), **options)
        return buf.getvalue()

    return encode


def _pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _heic_encode(image: np.ndarray, quality: float) -> bytes:
    import pillow_heif

    buf = io.BytesIO()
    heif = pillow_heif.from_bytes(
        mode="RGB", size=(image.shape[1], image.shape[0]), data=image.tobytes()
    )
    heif.save(buf, quality=int(quality), chroma=420)
    return buf.getvalue()


def _heic_decode(data: bytes) -> np.ndarray:
    import pillow_heif

    heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
    return np.asarray(heif.to_pillow().convert("RGB"))


def _jxl_encode(image: np.ndarray, distance: float) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(image, distance=float(distance), effort=7))


def _jxl_decode(data: bytes) -> np.ndarray:
    import imagecodecs

    out = np.asarray(imagecodecs.jpegxl_decode(data))
    return out[..., :3] if out.ndim == 3 else np.repeat(out[..., None], 3, axis=-1)


@dataclasses.dataclass(frozen=True)
class Backend:
    """How one classical format encodes/decodes, its knob and its default sweep."""

    encode: Callable[[np.ndarray, float], bytes]
    decode: Callable[[bytes], np.ndarray]
    knob: str  # what the sweep value means
    sweep: tuple[float, ...]  # default sweep, lowest rate first


BACKENDS: dict[str, Backend] = {
    "jpeg": Backend(
        _pillow_encoder("JPEG", optimize=True), _pillow_decode, "quality",
        (1, 2, 3, 5, 8, 12, 20, 30, 50, 75, 90),
    ),
    "webp": Backend(
        _pillow_encoder("WEBP", method=6), _pillow_decode, "quality",
        (0, 2, 5, 10, 20, 35, 50, 75, 90),
    ),
    "avif": Backend(
        _pillow_encoder("AVIF", speed=6), _pillow_decode, "quality",
        (0, 5, 10, 15, 20, 35, 50, 75, 90),  # q0 and q2 give the same file
    ),
    "heic": Backend(_heic_encode, _heic_decode, "quality", (0, 2, 5, 10, 20, 35, 50, 75, 90)),
    "jxl": Backend(_jxl_encode, _jxl_decode, "distance", (25, 15, 10, 6, 4, 2.5, 1.5, 1.0, 0.5)),
}  # fmt: skip


class ClassicalCodec:
    """One rate point of a classical codec (``ImageCodec``), with encode/decode timings."""

    def __init__(self, codec: str, value: float):
        if codec not in BACKENDS:
            raise ValueError(f"unknown classical codec {codec!r}; choose from {sorted(BACKENDS)}")
        self.codec, self.value = codec, value
        self.backend = BACKENDS[codec]
        self.name = f"{codec}-{self.backend.knob[0]}{value:g}"
        self.timings: dict[str, float] = {}

    def compress(self, image: np.ndarray) -> bytes:
        image = _check_image(image)
        t0 = time.perf_counter()
        data = self.backend.encode(image, self.value)
        self.timings = {"encode": time.perf_counter() - t0}
        return data

    def decompress(self, data: bytes) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.backend.decode(data)
        self.timings["decode"] = time.perf_counter() - t0
        return _check_image(out)


def sweep(codec: str, values: Sequence[float] | None = None) -> list[ClassicalCodec]:
    """Codec objects for each sweep value (the default sweep when ``values`` is None)."""
    if codec not in BACKENDS:
        raise ValueError(f"unknown classical codec {codec!r}; choose from {sorted(BACKENDS)}")
    return [ClassicalCodec(codec, v) for v in (values or BACKENDS[codec].sweep)]
