"""Data pipeline: determinism, resumption, multi-process sharding, policies, decoding."""

import hashlib
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcodec.data import (
    SKIMAGE_PHOTOS,
    default_data_config,
    fit_to_crop,
    load_eval_images,
    make_train_iterator,
    read_rgb,
)

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "photos"


def _take(it, n):
    return [next(it)["image"] for _ in range(n)]


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    h, w = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def tiny_cfg():
    return default_data_config(crop_size=32, read_threads=2, prefetch=2)


# ---------------------------------------------------------------- determinism and resumption


def test_batches_shape_and_same_seed_same_stream(tiny_cfg):
    a = _take(make_train_iterator(tiny_cfg, global_batch_size=6, seed=3), 4)
    b = _take(make_train_iterator(tiny_cfg, global_batch_size=6, seed=3), 4)
    assert a[0].shape == (6, 32, 32, 3) and a[0].dtype == np.uint8
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = _take(make_train_iterator(tiny_cfg, global_batch_size=6, seed=4), 4)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Batches differ from each other (shuffling/cropping actually happen).
    assert not np.array_equal(a[0], a[1])


_FRESH_PROCESS = """
import hashlib, sys
from jaxcodec.data import default_data_config, make_train_iterator
it = make_train_iterator(default_data_config(crop_size=32), global_batch_size=6, seed=3)
h = hashlib.sha256()
for _ in range(4):
    h.update(next(it)["image"].tobytes())
print(h.hexdigest())
"""


def test_same_seed_same_stream_across_fresh_processes(tiny_cfg):
    h = hashlib.sha256()
    for x in _take(make_train_iterator(tiny_cfg, global_batch_size=6, seed=3), 4):
        h.update(x.tobytes())
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == h.hexdigest()


def test_state_restores_next_batch_and_is_json(tiny_cfg):
    it = make_train_iterator(tiny_cfg, global_batch_size=4, seed=11)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 2)
    fresh = make_train_iterator(tiny_cfg, global_batch_size=4, seed=11)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 2), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_union_is_global_batch(tiny_cfg, process_count):
    global_batch = 6
    single = _take(make_train_iterator(tiny_cfg, global_batch_size=global_batch, seed=5), 5)
    shards = [
        _take(
            make_train_iterator(
                tiny_cfg,
                global_batch_size=global_batch,
                seed=5,
                process_index=p,
                process_count=process_count,
            ),
            5,
        )
        for p in range(process_count)
    ]
    for step in range(5):
        local = [shards[p][step] for p in range(process_count)]
        assert all(x.shape[0] == global_batch // process_count for x in local)
        np.testing.assert_array_equal(np.concatenate(local), single[step])


def test_bad_batch_and_process_arguments(tiny_cfg):
    with pytest.raises(ValueError, match="multiple of"):
        make_train_iterator(tiny_cfg, global_batch_size=5, seed=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        make_train_iterator(tiny_cfg, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(KeyError, match="crop_sise"):
        default_data_config(crop_sise=3)


def test_worker_processes_give_the_in_process_stream(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        _save(tmp_path / f"{i}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    cfg = default_data_config(source="folder", path=str(tmp_path), crop_size=16)
    ref_it = make_train_iterator(cfg, global_batch_size=4, seed=1)
    ref = _take(ref_it, 6)
    cfg.num_workers = 1  # each worker process imports jax; keep the spawns few
    it = make_train_iterator(cfg, global_batch_size=4, seed=1)
    try:
        got = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    it2 = make_train_iterator(cfg, global_batch_size=4, seed=1)
    try:
        it2.set_state(state)
        got += _take(it2, 3)
    finally:
        it2.close()
    for x, y in zip(ref, got, strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------ small-image policies


def test_pad_reflect_is_centred_mirror_padding():
    im = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = fit_to_crop(im, 8, "pad_reflect")
    np.testing.assert_array_equal(out, np.pad(im, ((1, 2), (1, 1), (0, 0)), mode="reflect"))
    # Deficits beyond one reflection and 1-pixel dimensions still reach the crop.
    for shape in [(3, 2, 3), (1, 1, 3), (1, 40, 3), (50, 50, 3)]:
        tiny = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        out = fit_to_crop(tiny, 20, "pad_reflect")
        assert out.shape[0] >= 20 and out.shape[1] >= 20
        assert set(np.unique(out)) <= set(np.unique(tiny))
    big = np.zeros((30, 40, 3), np.uint8)
    assert fit_to_crop(big, 20, "resize") is big


def test_resize_keeps_aspect_ratio():
    im = np.random.default_rng(0).integers(0, 256, (4, 8, 3), dtype=np.uint8)
    assert fit_to_crop(im, 10, "resize").shape == (10, 20, 3)
    assert fit_to_crop(im[:, :3], 10, "resize").shape == (14, 10, 3)
    with pytest.raises(ValueError, match="skip"):
        fit_to_crop(im, 10, "skip")
    with pytest.raises(ValueError, match="unknown"):
        fit_to_crop(im, 10, "stretch")


def _policy_folder(root: Path) -> Path:
    _save(root / "small.png", np.full((10, 12, 3), 7, np.uint8))
    _save(root / "big_a.png", np.full((40, 40, 3), 100, np.uint8))
    _save(root / "sub" / "big_b.png", np.full((33, 50, 3), 200, np.uint8))
    return root


@pytest.mark.parametrize("policy", ["pad_reflect", "resize", "skip"])
def test_small_image_policies_in_pipeline(tmp_path, policy):
    cfg = default_data_config(
        source="folder", path=str(_policy_folder(tmp_path)), crop_size=32, small_image_policy=policy
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = np.concatenate(_take(make_train_iterator(cfg, global_batch_size=3, seed=0), 4))
    assert batches.shape == (12, 32, 32, 3)
    colours = {int(x[0, 0, 0]) for x in batches}
    assert all(len(np.unique(x)) == 1 for x in batches)  # constant images stay constant
    if policy == "skip":
        assert colours == {100, 200}
        assert any("dropped 1 of 3" in str(w.message) for w in caught)
    else:
        assert colours == {7, 100, 200}


def test_skip_policy_with_nothing_large_enough(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    cfg = default_data_config(
        source="folder", path=str(tmp_path), crop_size=32, small_image_policy="skip"
    )
    with pytest.raises(ValueError, match="no image"):
        make_train_iterator(cfg, global_batch_size=2, seed=0)


# ------------------------------------------------------------------------------- folder errors


def test_empty_or_unreadable_folder_names_the_folder(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty_dir"):
        load_eval_images(default_data_config(source="folder", path=str(empty)))
    junk = tmp_path / "junk_dir"
    junk.mkdir()
    (junk / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="junk_dir"), pytest.warns(UserWarning):
        make_train_iterator(
            default_data_config(source="folder", path=str(junk)), global_batch_size=1, seed=0
        )
    with pytest.raises(ValueError, match="missing_dir"):
        load_eval_images(default_data_config(source="folder", path=str(tmp_path / "missing_dir")))


def test_unreadable_file_is_skipped_with_warning(tmp_path):
    _save(tmp_path / "b.png", np.full((20, 20, 3), 9, np.uint8))
    _save(tmp_path / "a" / "c.jpg", np.full((20, 30, 3), 90, np.uint8))
    (tmp_path / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="a.png"):
        images = load_eval_images(default_data_config(source="folder", path=str(tmp_path)))
    assert [n for n, _ in images] == ["a/c.jpg", "b.png"]
    assert images[0][1].shape == (20, 30, 3) and images[1][1].shape == (20, 20, 3)


# ------------------------------------------------------------------------------------ read_rgb


def test_read_rgb_conversions(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_rgb(_save(tmp_path / "rgb.png", rgb)), rgb)

    grey = rgb[..., 0]
    out = read_rgb(_save(tmp_path / "grey.png", grey))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))

    # RGBA: composited over white: alpha 0 -> white, 255 -> colour, 128 -> blend.
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[0, :, 3] = [0, 255, 128]
    out = read_rgb(_save(tmp_path / "rgba.png", rgba)).astype(int)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    np.testing.assert_allclose(out[0, 2], (np.array([10, 20, 30]) * 128 + 255 * 127) / 255, atol=1)

    la = Image.fromarray(np.stack([grey, np.zeros_like(grey)], -1), mode="LA")
    la.save(tmp_path / "la.png")
    assert (read_rgb(tmp_path / "la.png") == 255).all()

    # 16-bit: top 8 bits of each sample, grey and RGB alike.
    x16 = np.random.default_rng(1).integers(0, 65536, (5, 4, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16(x16))
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgb16.png"), (x16 >> 8).astype(np.uint8))
    (tmp_path / "grey16.png").write_bytes(_png16(x16[..., 1]))
    out = read_rgb(str(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(out, np.repeat((x16[..., 1:2] >> 8).astype(np.uint8), 3, -1))

    # Palette, with and without a transparent entry.
    pal = Image.fromarray(rgb).quantize(colors=8)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "pal.png"), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal_t.png", transparency=0)
    out = read_rgb(tmp_path / "pal_t.png")
    idx = np.asarray(pal)
    assert (out[idx == 0] == 255).all()
    np.testing.assert_array_equal(out[idx != 0], np.asarray(pal.convert("RGB"))[idx != 0])

    # Encoded bytes work too (the tfds path).
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    np.testing.assert_array_equal(read_rgb(buf.getvalue()), rgb)


def test_read_rgb_unreadable_raises_value_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_rgb(bad)
    with pytest.raises(ValueError, match="nope.png"):
        read_rgb(tmp_path / "nope.png")
    with pytest.raises(ValueError):
        read_rgb(b"")


# ------------------------------------------------------------------------- eval + real images


def test_skimage_photos_all_load_offline_and_are_colour():
    images = load_eval_images(default_data_config())
    assert [n for n, _ in images] == sorted(SKIMAGE_PHOTOS)
    for name, im in images:
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3, name
        assert min(im.shape[:2]) >= 256, name
        spread = np.abs(im[..., 0].astype(int) - im[..., 2].astype(int)).mean()
        assert spread > 3, f"{name} looks grey"
    two = load_eval_images(default_data_config(), max_images=2)
    assert [n for n, _ in two] == sorted(SKIMAGE_PHOTOS)[:2]
    np.testing.assert_array_equal(two[1][1], images[1][1])


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="shared photos folder not available")
def test_shared_photos_folder_trains_and_loads():
    cfg = default_data_config(
        source="folder", path=str(PHOTOS), crop_size=256, cache_max_mb=0, read_threads=0
    )
    batch = next(make_train_iterator(cfg, global_batch_size=4, seed=0))["image"]
    assert batch.shape == (4, 256, 256, 3) and batch.dtype == np.uint8
    assert batch.std() > 10
    names = [n for n, _ in load_eval_images(cfg, max_images=3)]
    assert names == sorted(names) and len(names) == 3


@pytest.mark.parametrize("numpy_shuffle", [True, False])
def test_each_epoch_visits_every_image_once_in_a_new_order(tmp_path, monkeypatch, numpy_shuffle):
    from jaxcodec.data import pipeline

    if not numpy_shuffle:  # the grain index_shuffle path used for very large sources
        monkeypatch.setattr(pipeline, "_NUMPY_SHUFFLE_MAX", 0)
    n = 7
    for i in range(n):
        _save(tmp_path / f"{i:02d}.png", np.full((20, 24, 3), 10 * i, np.uint8))
    cfg = default_data_config(source="folder", path=str(tmp_path), crop_size=16)
    it = make_train_iterator(cfg, global_batch_size=n, seed=2)
    orders = [tuple(int(x[0, 0, 0]) // 10 for x in batch) for batch in _take(it, 4)]
    assert all(sorted(o) == list(range(n)) for o in orders)  # batch b == epoch b
    assert len(set(orders)) > 1


def test_exif_orientation_applied_and_header_size_agrees(tmp_path):
    from jaxcodec.data import image_size

    im = np.zeros((10, 30, 3), np.uint8)
    im[:, :5] = 255  # bright stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    Image.fromarray(im).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = read_rgb(tmp_path / "rot.jpg")
    assert out.shape == (30, 10, 3) == (*image_size(tmp_path / "rot.jpg"), 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the left stripe is now on top


def test_single_process_state_resumes_on_two_processes(tiny_cfg):
    """A checkpoint from a 1-process run restores on 2 processes at the same global batch."""
    single = make_train_iterator(tiny_cfg, global_batch_size=4, seed=8)
    _take(single, 3)
    state = json.loads(json.dumps(single.get_state()))
    expected = next(single)["image"]
    local = []
    for p in range(2):
        it = make_train_iterator(
            tiny_cfg, global_batch_size=4, seed=8, process_index=p, process_count=2
        )
        it.set_state(state)
        local.append(next(it)["image"])
    np.testing.assert_array_equal(np.concatenate(local), expected)
