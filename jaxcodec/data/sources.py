"""Random-access image sources: a folder tree, a prepared tfds dataset, scikit-image's photos.

A source is a deterministic sequence of full uint8 HxWx3 images with stable names; grain
shuffles, crops and batches on top of it (see pipeline.py). Sources are picklable so grain
worker processes can rebuild them.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxcodec.data.images import IMAGE_EXTENSIONS, image_size, read_rgb

#: The colour photographs bundled inside scikit-image's wheel (files next to skimage.data),
#: read straight from disk so nothing is ever fetched over the network. Synthetic or
#: grey images (camera, chessboard, logo, colorwheel, ...) are left out.
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}


def _map_threads(fn, items: Sequence, threads: int) -> list:
    # Pillow releases the GIL while decoding, so threads give real parallelism here.
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


class ImageSource(Sequence):
    """Common base: `names[i]`, `sizes[i]` (h, w) and `self[i]` -> uint8 HxWx3."""

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    @abc.abstractmethod
    def __getitem__(self, index: int) -> np.ndarray:
        """The decoded image `index`, uint8 HxWx3."""

    @abc.abstractmethod
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image; used by the 'skip' small-image policy."""


class InMemorySource(ImageSource):
    """Decoded images held in memory (decoding a ~1 MP PNG costs ~20-40 ms per read)."""

    def __init__(self, names: Sequence[str], images: Sequence[np.ndarray], description: str):
        self.names = list(names)
        self._images = list(images)
        self.description = description

    def __getitem__(self, index: int) -> np.ndarray:
        return self._images[index]

    def sizes(self) -> list[tuple[int, int]]:
        return [im.shape[:2] for im in self._images]

    def __repr__(self) -> str:
        return f"InMemorySource({self.description}, {len(self)} images)"


class FolderSource(ImageSource):
    """Every image file under `root` (recursive), sorted by relative path, decoded on read.

    Unreadable files (header cannot be parsed) are skipped with a warning when the source is
    built; a folder without any readable image raises ValueError naming the folder. A file
    whose header parses but whose pixels fail to decode later raises ValueError with its path.
    """

    def __init__(self, root: str | os.PathLike, read_threads: int = 4):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist or is not a directory")
        files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        rel = [p.relative_to(self.root).as_posix() for p in files]
        sizes = _map_threads(self._try_size, files, read_threads)
        bad = [r for r, s in zip(rel, sizes, strict=True) if s is None]
        if bad:
            warnings.warn(
                f"skipping {len(bad)} unreadable file(s) in {self.root}: {bad[:5]}"
                + (" ..." if len(bad) > 5 else ""),
                stacklevel=2,
            )
        keep = [i for i, s in enumerate(sizes) if s is not None]
        if not keep:
            raise ValueError(
                f"no readable image in folder {self.root} (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}; found {len(files)} candidate file(s))"
            )
        self.names = [rel[i] for i in keep]
        self._paths = [str(files[i]) for i in keep]
        self._sizes = [sizes[i] for i in keep]

    @staticmethod
    def _try_size(path: Path) -> tuple[int, int] | None:
        try:
            return image_size(path)
        except ValueError:
            return None

    def __getitem__(self, index: int) -> np.ndarray:
        return read_rgb(self._paths[index])

    def sizes(self) -> list[tuple[int, int]]:
        return list(self._sizes)

    def decoded_nbytes(self) -> int:
        return sum(h * w * 3 for h, w in self._sizes)

    def cached(self, read_threads: int = 4) -> InMemorySource:
        images = _map_threads(self.__getitem__, range(len(self)), read_threads)
        return InMemorySource(self.names, images, str(self.root))

    def __repr__(self) -> str:
        return f"FolderSource({self.root}, {len(self)} images)"


def skimage_source(names: Sequence[str] | None = None) -> InMemorySource:
    """scikit-image's bundled colour photographs (all of SKIMAGE_PHOTOS by default)."""
    import skimage.data

    data_dir = Path(skimage.data.__file__).parent
    names = sorted(SKIMAGE_PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in SKIMAGE_PHOTOS]
    if unknown:
        raise ValueError(
            f"unknown scikit-image photo(s) {unknown}; known: {sorted(SKIMAGE_PHOTOS)}"
        )
    missing = [n for n in names if not (data_dir / SKIMAGE_PHOTOS[n]).is_file()]
    if missing:
        raise ValueError(
            f"scikit-image photo(s) {missing} are not bundled in the installed wheel ({data_dir})"
        )
    images = [read_rgb(data_dir / SKIMAGE_PHOTOS[n]) for n in names]
    return InMemorySource(names, images, "skimage.data")


class TfdsSource(ImageSource):
    """A prepared tfds dataset read through `tfds.data_source` (ArrayRecord random access).

    The image feature is read undecoded (SkipDecoding) and decoded by `read_rgb`, so tfds and
    folder data go through the same conversions. Never downloads (download=False): prepare the
    dataset beforehand with `tfds build` or point `data_dir` at a prepared copy.
    """

    def __init__(
        self, name: str, split: str, data_dir: str | None = None, image_key: str = "image"
    ):
        self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
        self._ds = None
        n = len(self._source())
        if n == 0:
            raise ValueError(f"tfds dataset {name}[{split}] in {data_dir} has no examples")
        self.names = [f"{name}/{split}/{i:07d}" for i in range(n)]

    def _source(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            try:
                self._ds = tfds.data_source(
                    self.name,
                    split=self.split,
                    data_dir=self.data_dir,
                    download=False,
                    decoders={self.image_key: tfds.decode.SkipDecoding()},
                )
            except Exception as e:
                raise ValueError(
                    f"cannot open tfds dataset {self.name!r} split {self.split!r} in "
                    f"{self.data_dir or '(default data_dir)'}: {e}"
                ) from e
        return self._ds

    def __getstate__(self):
        # The ArrayRecord readers hold file handles; workers reopen them lazily.
        state = dict(self.__dict__)
        state["_ds"] = None
        return state

    def _encoded(self, index: int) -> bytes:
        record = self._source()[index]
        if self.image_key not in record:
            raise ValueError(
                f"tfds dataset {self.name!r} has no feature {self.image_key!r}; "
                f"features: {sorted(record)}"
            )
        return record[self.image_key]

    def __getitem__(self, index: int) -> np.ndarray:
        return read_rgb(self._encoded(index))

    def sizes(self) -> list[tuple[int, int]]:
        # Header-only parse of every record: one pass over the data, no pixel decoding.
        return [image_size(self._encoded(i)) for i in range(len(self))]

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}[{self.split}], {len(self)} images)"


class SubsetSource(ImageSource):
    """The images of `parent` at `indices` (used by the 'skip' policy)."""

    def __init__(self, parent: ImageSource, indices: Sequence[int]):
        self._parent = parent
        self._indices = list(indices)
        self.names = [parent.names[i] for i in self._indices]

    def __getitem__(self, index: int) -> np.ndarray:
        return self._parent[self._indices[index]]

    def sizes(self) -> list[tuple[int, int]]:
        sizes = self._parent.sizes()
        return [sizes[i] for i in self._indices]
