"""tfds source: a tiny dataset is prepared locally (no download) and read back through
`tfds.data_source`, in a process that does not have the builder code (the real situation
for a prepared dataset such as CLIC)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from jaxcodec.data import default_data_config, load_eval_images, make_train_iterator

_BUILD = """
import sys
import numpy as np
import tensorflow_datasets as tfds


class TinyPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png")}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)}


TinyPhotos(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
"""


def _expected(n):
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    data_dir = tmp_path_factory.mktemp("tfds")
    subprocess.run(
        [sys.executable, "-c", _BUILD, str(data_dir)], check=True, capture_output=True, text=True
    )
    return str(data_dir)


def _cfg(tfds_dir, **kw):
    return default_data_config(source="tfds", tfds_name="tiny_photos", tfds_data_dir=tfds_dir, **kw)


def test_tfds_eval_images_match_what_was_written(tfds_dir):
    images = load_eval_images(_cfg(tfds_dir, tfds_split="test"))
    assert [n for n, _ in images] == ["tiny_photos/test/0000000", "tiny_photos/test/0000001"]
    # tfds stores examples in a key-hash order; compare as a set of exact arrays.
    got = sorted(im.tobytes() for _, im in images)
    assert got == sorted(im.tobytes() for im in _expected(2))


def test_tfds_train_iterator_is_deterministic_and_resumable(tfds_dir):
    cfg = _cfg(tfds_dir, crop_size=16)
    it = make_train_iterator(cfg, global_batch_size=2, seed=0)
    first = [next(it)["image"] for _ in range(3)]
    assert first[0].shape == (2, 16, 16, 3)
    state = it.get_state()
    nxt = next(it)["image"]
    again = make_train_iterator(cfg, global_batch_size=2, seed=0)
    for x in first:
        np.testing.assert_array_equal(next(again)["image"], x)
    resumed = make_train_iterator(cfg, global_batch_size=2, seed=0)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], nxt)
    # Every crop is a window of one of the stored images.
    sources = _expected(3)
    for patch in np.concatenate(first + [nxt]):
        found = any(
            np.array_equal(patch, im[y : y + 16, x : x + 16])
            or np.array_equal(patch[:, ::-1], im[y : y + 16, x : x + 16])
            for im in sources
            for y in range(im.shape[0] - 15)
            for x in range(im.shape[1] - 15)
        )
        assert found


def test_tfds_skip_policy_and_missing_dataset(tfds_dir):
    cfg = _cfg(tfds_dir, crop_size=22, small_image_policy="skip")  # heights 20, 21, 22
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(make_train_iterator(cfg, global_batch_size=4, seed=0))["image"]
    assert any("dropped 2 of 3" in str(w.message) for w in caught)
    big = _expected(3)[2]
    for patch in batch:
        assert any(
            np.array_equal(p, big[:, x : x + 22]) for p in (patch, patch[:, ::-1]) for x in range(9)
        )
    with pytest.raises(ValueError, match="no_such_set"):
        load_eval_images(
            default_data_config(source="tfds", tfds_name="no_such_set", tfds_data_dir=tfds_dir)
        )
