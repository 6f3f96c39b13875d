"""Image decoding and the per-example geometry of training crops (host-side numpy).

Everything here returns ``uint8`` HxWx3 arrays: codecs are trained and evaluated on 8-bit RGB,
so every conversion decision (alpha, grey, 16-bit, palettes) is made once, here.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

#: Suffixes a folder source picks up (compared lower-case). PNG and JPEG are the common case;
#: the rest are formats Pillow decodes without extra packages.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")

SMALL_IMAGE_POLICIES = ("pad_reflect", "resize", "skip")

ImageInput = str | os.PathLike | bytes | BinaryIO


def _describe(src: ImageInput) -> str:
    if isinstance(src, bytes | bytearray):
        return f"<{len(src)} encoded bytes>"
    return os.fspath(src) if isinstance(src, str | os.PathLike) else repr(src)


def _open(src: ImageInput) -> Image.Image:
    if isinstance(src, bytes | bytearray):
        src = io.BytesIO(src)
    try:
        return Image.open(src)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"cannot read image {_describe(src)}: {e}") from e


_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    """EXIF orientation known from the header, without decoding pixels.

    For PNG, Pillow's getexif() decodes the whole image to look for an eXIf chunk after the
    pixel data; only an eXIf chunk before the pixels (already in im.info) is honoured, so the
    header-only size and the decoded image always agree.
    """
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:
        return 1


def image_size(src: ImageInput) -> tuple[int, int]:
    """(height, width) from the header only, without decoding pixels.

    Raises ValueError for unreadable files. EXIF rotations by 90 degrees are taken into
    account, so the size agrees with what `read_rgb` returns.
    """
    with _open(src) as im:
        w, h = im.size
        orientation = _orientation(im)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: keep the top 8 bits of a 16-bit sample (x >> 8),
        # the same reduction Pillow applies to 16-bit RGB PNGs, so both paths agree.
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = np.clip(np.round(a * 255.0 if a.max(initial=0.0) <= 1.0 else a), 0, 255)
        return np.repeat(a.astype(np.uint8)[..., None], 3, axis=-1)
    if mode == "P":
        # Palette images may carry transparency (tRNS); expand it to an alpha channel first.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        # Composite over white: fully transparent pixels often hold arbitrary colours (commonly
        # black), and a viewer shows such images on a light background.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, and the composited RGBA above
    return np.asarray(im, dtype=np.uint8)


def read_rgb(src: ImageInput) -> np.ndarray:
    """Decode an image file (path, bytes or binary file object) to uint8 HxWx3.

    Conversions: grey ('L', '1') is replicated to three channels; alpha (RGBA, LA, palette
    with transparency) is composited over white (alpha is not simply dropped); 16-bit samples
    keep their top 8 bits (x >> 8); CMYK/YCbCr go through Pillow's conversion to RGB; the EXIF
    orientation tag is applied; for multi-frame files the first frame is used.
    Raises ValueError naming the file when it cannot be decoded.
    """
    with _open(src) as im:
        try:
            orientation = _orientation(im)
            im.load()
            if orientation in _TRANSPOSE_FOR_ORIENTATION:
                im = im.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
            out = _to_rgb(im)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"cannot decode image {_describe(src)}: {e}") from e
    if out.ndim != 3 or out.shape[-1] != 3 or out.shape[0] == 0 or out.shape[1] == 0:
        raise ValueError(f"image {_describe(src)} decoded to unexpected shape {out.shape}")
    return np.ascontiguousarray(out)


def _reflect_pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre `image` in a (>= height, >= width) canvas filled by mirror reflection.

    np.pad's 'reflect' cannot pad a side by more than size-1, so a tiny image is grown in
    rounds (each round at most triples it); a 1-pixel dimension is repeated (nothing to mirror).
    """
    for axis, target in ((0, height), (1, width)):
        while image.shape[axis] < target:
            size = image.shape[axis]
            need = target - size if size == 1 else min(target - size, 2 * (size - 1))
            pad = [(0, 0)] * image.ndim
            pad[axis] = (need // 2, need - need // 2)
            image = np.pad(image, pad, mode="edge" if size == 1 else "reflect")
    return image


def _resize_to_cover(image: np.ndarray, crop: int) -> np.ndarray:
    """Upscale (aspect ratio kept, bicubic) so that both sides are at least `crop`."""
    h, w = image.shape[:2]
    scale = max(crop / h, crop / w)
    new_h, new_w = max(crop, math.ceil(h * scale - 1e-6)), max(crop, math.ceil(w * scale - 1e-6))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def fit_to_crop(image: np.ndarray, crop: int, policy: str) -> np.ndarray:
    """Make an image at least crop x crop according to `small_image_policy`.

    - 'pad_reflect': centre the image and mirror-pad the missing rows/columns (keeps pixel
      statistics, no interpolation blur; the default).
    - 'resize': bicubic upscale with the aspect ratio kept until the short side equals crop.
    - 'skip': such images are removed from the source up front (see pipeline); reaching this
      function with a small image under 'skip' is a bug and raises.
    Images already large enough are returned unchanged under every policy.
    """
    h, w = image.shape[:2]
    if h >= crop and w >= crop:
        return image
    if policy == "pad_reflect":
        return _reflect_pad_to(image, crop, crop)
    if policy == "resize":
        return _resize_to_cover(image, crop)
    if policy == "skip":
        raise ValueError(f"image of size {h}x{w} < crop {crop} reached the 'skip' policy")
    raise ValueError(
        f"unknown small_image_policy {policy!r}; expected one of {SMALL_IMAGE_POLICIES}"
    )


def random_crop_flip(
    image: np.ndarray, rng: np.random.Generator, crop: int, policy: str, random_flip: bool
) -> np.ndarray:
    """A uniformly placed crop x crop patch, optionally mirrored left-right with p = 1/2."""
    image = fit_to_crop(image, crop, policy)
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    patch = image[top : top + crop, left : left + crop]
    if random_flip and rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.ascontiguousarray(patch)
