"""Captions of images: ResULIC's training condition and the semantic residual of its files.

One file format serves both: a JSON object ``{name: caption}`` whose names are image files
(relative to a root folder, by default the JSON file's own folder) or scikit-image photo names
(`jaxcodec.data.sources.SKIMAGE_PHOTOS`), i.e. the names a data source gives its images.
Training looks captions up by name (`CaptionFile.by_name`, `caption_ids`); an encoder, which
only sees pixels, by the digest of the image (`CaptionFile.__call__`): every named image is read
once and its digest taken after the codec's padding, so a picture gets its caption from
whatever path it is compressed. ``SKIMAGE_CAPTIONS`` captions the bundled scikit-image photos
(the tiny configs').

`caption_source(spec, prepare)` builds an encoder's source from a config string: '' (none), a
JSON file, or ``module:function`` — any callable taking the padded uint8 image and returning a
caption or None (a local captioning model, a lookup of one's own). Nothing here uses a network.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

SKIMAGE_CAPTIONS = Path(__file__).with_name("skimage_captions.json")
CaptionSource = Callable[[np.ndarray], "str | None"]


def image_digest(image: np.ndarray) -> str:
    """SHA-256 of a uint8 image's shape and pixels."""
    image = np.ascontiguousarray(image, np.uint8)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()


class CaptionFile:
    """Captions of a JSON file, by image name or (called on an image) by its pixels."""

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.path = Path(path)
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ValueError(f"{self.path}: captions must be a JSON object of name: caption")
        self.captions: dict[str, str] = data
        self.root = Path(root) if root else self.path.parent
        self.prepare = prepare or (lambda image: image)  # e.g. the codec's padding
        self._by_digest: dict[str, str] | None = None

    def by_name(self, name: str) -> str | None:
        return self.captions.get(name)

    def _image(self, name: str) -> np.ndarray:
        from jaxcodec.data.images import read_rgb
        from jaxcodec.data.sources import skimage_source

        path = self.root / name
        if path.is_file():
            return read_rgb(path)
        try:
            return skimage_source([name])[0]
        except ValueError:
            raise FileNotFoundError(
                f"{self.path}: no image {name!r} under {self.root} (nor a scikit-image photo)"
            ) from None

    def __call__(self, image: np.ndarray) -> str | None:
        if self._by_digest is None:
            self._by_digest = {
                image_digest(self.prepare(self._image(n))): c for n, c in self.captions.items()
            }
        return self._by_digest.get(image_digest(image))


def caption_source(
    spec: str, prepare: Callable[[np.ndarray], np.ndarray] | None = None, root: str = ""
) -> CaptionSource | None:
    """An encoder's caption source from a config string (see the module docstring);
    ``prepare`` is what the encoder did to the image before asking (its padding)."""
    if not spec:
        return None
    if spec.endswith(".json"):
        return CaptionFile(spec, root or None, prepare)
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"caption source {spec!r}: give a .json file or module:function")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"caption source {spec!r} is not callable")
    return fn


def caption_ids(names, captions: str | Path) -> np.ndarray:
    """CLIP token ids [len(names), 77] (int32) of the captions of `names` in a caption file;
    images without one get the empty prompt."""
    from jaxcodec.nn.text import default_tokenizer

    file = CaptionFile(captions)
    return default_tokenizer()([file.by_name(n) or "" for n in names])
