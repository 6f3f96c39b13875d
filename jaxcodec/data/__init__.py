"""Data pipelines: grain over image folders, tfds data sources and scikit-image's photos."""

from jaxcodec.data.images import fit_to_crop, image_size, random_crop_flip, read_rgb
from jaxcodec.data.pipeline import (
    default_data_config,
    load_eval_images,
    make_source,
    make_train_iterator,
)
from jaxcodec.data.sources import SKIMAGE_PHOTOS

__all__ = [
    "SKIMAGE_PHOTOS",
    "default_data_config",
    "fit_to_crop",
    "image_size",
    "load_eval_images",
    "make_source",
    "make_train_iterator",
    "random_crop_flip",
    "read_rgb",
]
