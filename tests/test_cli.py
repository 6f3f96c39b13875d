"""`jaxcodec compress/decompress`: image conversions, bpp, errors, and a decoder fuzz test."""

import time

import numpy as np
import pytest
from PIL import Image
from test_codec import make_workdir, photo

from jaxcodec import cli
from jaxcodec.codec import load_codec
from jaxcodec.entropy import container, fuzz
from jaxcodec.entropy.container import BitstreamError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def codec(workdir):
    return load_codec(workdir)


def test_compress_decompress_png(workdir, tmp_path, capsys):
    src, jxc, out = tmp_path / "in.png", tmp_path / "a.jxc", tmp_path / "out.png"
    image = photo(70, 90)
    Image.fromarray(image).save(src)
    assert cli.main(["compress", str(src), str(jxc), "--checkpoint", str(workdir)]) == 0
    size = jxc.stat().st_size
    printed = capsys.readouterr().out
    assert f"{8 * size / (70 * 90):.4f} bpp" in printed
    assert cli.main(["decompress", str(jxc), str(out), "--checkpoint", str(workdir)]) == 0
    decoded = np.asarray(Image.open(out))
    assert decoded.shape == (70, 90, 3) and decoded.dtype == np.uint8
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "make",
    [
        lambda a: Image.fromarray(a[..., 0]),  # grey
        lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])),  # RGBA
        lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257),  # 16-bit grey
        lambda a: Image.fromarray(a).convert("P"),  # palette
    ],
)
def test_other_image_modes_are_converted(codec, tmp_path, make):
    src, jxc = tmp_path / "in.png", tmp_path / "a.jxc"
    make(photo(40, 50)).save(src)
    r = cli.compress_file(codec, src, jxc)
    assert (r["height"], r["width"]) == (40, 50)
    assert codec.decompress(jxc.read_bytes()).shape == (40, 50, 3)


def test_unreadable_input_and_bad_checkpoint_give_clear_errors(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert cli.main(["compress", str(bad), str(tmp_path / "x.jxc"), "--checkpoint", str(workdir)])
    assert not (tmp_path / "x.jxc").exists()
    assert cli.main(
        ["decompress", str(bad), str(tmp_path / "x.png"), "--checkpoint", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 2


def test_corrupted_file_fails_without_output(workdir, codec, tmp_path, capsys):
    data = bytearray(codec.compress(photo(64, 64)))
    data[len(data) // 2] ^= 4
    src, out = tmp_path / "c.jxc", tmp_path / "c.png"
    src.write_bytes(bytes(data))
    assert cli.main(["decompress", str(src), str(out), "--checkpoint", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid bitstream" in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_fuzz_1000_files_are_all_refused_without_output(codec, tmp_path):
    valid = [codec.compress(photo(64, 64)), codec.compress(photo(70, 130))]
    out = tmp_path / "out.png"
    src = tmp_path / "in.jxc"
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for kind, data in fuzz.mutants(valid, 1000, seed=0):
        src.write_bytes(data)
        t = time.perf_counter()
        with pytest.raises(BitstreamError):
            cli.decompress_file(codec, src, out)
        assert time.perf_counter() - t < 5.0  # no hang
        assert not out.exists()
        counts[kind] = counts.get(kind, 0) + 1
    assert sum(counts.values()) == 1000 and len(counts) == len(fuzz.KINDS)
    assert time.perf_counter() - t0 < 60
    assert not list(tmp_path.glob(".*"))


def test_well_formed_files_with_garbage_streams_decode_or_fail_cleanly(codec):
    """A file with a valid header and checksum but random payload (crafted, not corrupted)
    must never crash the decoder with anything but BitstreamError."""
    rng = np.random.default_rng(3)
    outcomes = {"image": 0, "error": 0}
    for _ in range(20):
        streams = [
            rng.integers(0, 256, int(rng.integers(0, 64))).astype(np.uint8).tobytes()
            for _ in range(2)
        ]
        header = container.Header(64, 64, codec.hash[:2])
        data = container.pack(header, streams, codec.hash)
        try:
            image = codec.decompress(data)
        except BitstreamError:
            outcomes["error"] += 1
        else:
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            outcomes["image"] += 1
    assert sum(outcomes.values()) == 20


def test_evaluate_subcommand_runs_the_evaluation_on_a_checkpoint(workdir, tmp_path):
    """`jaxcodec evaluate` hands every argument to jaxcodec.evaluate: real files of a trained
    checkpoint, results JSON in CompressAI's layout."""
    import json

    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(photo(64, 96)).save(data / "a.png")
    out = tmp_path / "out"
    args = ["evaluate", "--checkpoint", str(workdir), "--data", str(data), "--out", str(out)]
    assert cli.main([*args, "--metrics", "psnr"]) == 0
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len(result["results"]["bpp"]) == 1 and result["results"]["bpp"][0] > 0
    # --option reaches the model's coder, which checks it (HFD stage 1 takes none).
    with pytest.raises(ValueError, match="no decode option"):
        cli.main([*args, "--option", "steps=2"])
    with pytest.raises(ValueError, match="is not NAME=NUMBER"):
        cli.main([*args, "--option", "steps"])


def test_forged_header_over_the_budget_is_refused_at_once(workdir, codec, tmp_path, capsys):
    """A tiny file with a valid checksum (made with the container's own pack and the model's
    hash, as anyone holding the model can) declaring a huge image: one clear error, fast, no
    output; a larger --max-pixels lets a declared size through."""
    src, out = tmp_path / "forged.jxc", tmp_path / "forged.png"
    for side in (16384, 8192):
        header = container.Header(side, side, codec.hash[:2])
        src.write_bytes(container.pack(header, [b"", b""], codec.hash))
        t0 = time.perf_counter()
        code = cli.main(["decompress", str(src), str(out), "--checkpoint", str(workdir)])
        assert code == 2 and time.perf_counter() - t0 < 1.0
        err = capsys.readouterr().err.strip()
        assert "budget" in err and f"{side}x{side}" in err and "\n" not in err
        assert not out.exists()
    small = container.pack(container.Header(64, 64, codec.hash[:2]), [b"", b""], codec.hash)
    src.write_bytes(small)
    args = ["decompress", str(src), str(out), "--checkpoint", str(workdir)]
    assert cli.main([*args, "--max-pixels", "1000"]) == 2
    assert "budget of 1,000 pixels" in capsys.readouterr().err
    assert cli.main([*args, "--max-pixels", "4096"]) in (0, 2)  # decoded, or refused as garbage


def test_decode_options_travel_in_the_header(codec):
    """HFD stage 1 declares no decode options: a file carrying one is refused, and a compress
    option it does not take is a clear error."""
    with pytest.raises(ValueError, match="no decode option"):
        load_codec_with_options(codec, {"steps": 4})
    header = container.Header(64, 64, codec.hash[:2], {"steps": 4})
    data = container.pack(header, [b"", b""], codec.hash)
    with pytest.raises(BitstreamError, match="unknown: steps"):
        codec.decompress(data)


def load_codec_with_options(codec, options):
    from jaxcodec.codec import MethodCodec

    return MethodCodec(codec.method, codec.variables, codec.tables, name="x", options=options)


def test_the_cli_keeps_compiled_decoders_on_disk(tmp_path, monkeypatch):
    import jax

    from jaxcodec.cli import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    try:
        monkeypatch.setenv("JAXCODEC_COMPILATION_CACHE", str(tmp_path / "xla"))
        assert enable_compilation_cache() == str(tmp_path / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setenv("JAXCODEC_COMPILATION_CACHE", "0")
        jax.config.update("jax_compilation_cache_dir", before)
        assert enable_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir == before
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


# ---------------------------------------------------------------------------------------------
# Many files, one process
# ---------------------------------------------------------------------------------------------


def _image_folder(path):
    """Images of two padded sizes (three of 128x192, one of 64x64), a file that is not an
    image and one that pretends to be."""
    path.mkdir()
    images = {
        "a": photo(100, 130),
        "b": np.roll(photo(120, 150), 17, axis=1),
        "c": np.ascontiguousarray(photo(128, 192)[::-1]),
        "d": photo(64, 64),
    }
    for name, image in images.items():
        Image.fromarray(image).save(path / f"{name}.png")
    (path / "notes.txt").write_text("not an image")
    (path / "broken.png").write_bytes(b"not an image either")
    return images


def test_folders_code_in_one_process_exactly_as_one_file_at_a_time(
    workdir, codec, tmp_path, capsys
):
    images = _image_folder(tmp_path / "images")
    jxc, png = tmp_path / "jxc", tmp_path / "png"
    many = ["--checkpoint", str(workdir), "--batch-size", "2", "--quiet"]
    assert cli.main(["compress", str(tmp_path / "images"), str(jxc), *many]) == 1
    out = capsys.readouterr()
    assert "skipped" in out.err and "broken.png" in out.err and "1 of 5 files skipped" in out.err
    assert "4 files" in out.out and "bpp" in out.out
    assert sorted(p.name for p in jxc.iterdir()) == ["a.jxc", "b.jxc", "c.jxc", "d.jxc"]
    # Byte for byte what one-at-a-time calls write: the CLI's one-file form, and the codec.
    one = tmp_path / "b.jxc"
    single = ["compress", str(tmp_path / "images" / "b.png"), str(one), "--checkpoint"]
    assert cli.main([*single, str(workdir)]) == 0
    assert one.read_bytes() == (jxc / "b.jxc").read_bytes()
    for name, image in images.items():
        assert (jxc / f"{name}.jxc").read_bytes() == codec.compress(image), name

    (jxc / "cut.jxc").write_bytes((jxc / "a.jxc").read_bytes()[:-5])  # truncated: skipped
    assert cli.main(["decompress", str(jxc), str(png), *many]) == 1
    assert "cut.jxc" in capsys.readouterr().err
    assert sorted(p.name for p in png.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]
    for name in images:
        decoded = np.asarray(Image.open(png / f"{name}.png"))
        np.testing.assert_array_equal(decoded, codec.decompress((jxc / f"{name}.jxc").read_bytes()))
    assert not list(tmp_path.rglob(".*.tmp"))


def test_lists_of_files_and_the_errors_of_the_many_file_form(workdir, tmp_path, capsys):
    a, b, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out"
    Image.fromarray(photo(64, 64)).save(a)
    Image.fromarray(photo(64, 70)).save(b)
    ckpt = ["--checkpoint", str(workdir)]
    # A list of files into a folder that does not exist yet; options may sit between paths.
    assert cli.main(["compress", str(a), str(b), *ckpt, str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'a.jxc'}: " in printed and "2 files" in printed
    assert sorted(p.name for p in out.iterdir()) == ["a.jxc", "b.jxc"]
    # One file into an existing folder keeps its name.
    assert cli.main(["decompress", str(out / "a.jxc"), str(tmp_path), *ckpt]) == 0
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == (64, 64, 3)

    (tmp_path / "sub").mkdir()
    Image.fromarray(photo(64, 64)).save(tmp_path / "sub" / "a.png")
    (tmp_path / "empty").mkdir()
    errors = {
        "is a file": [str(a), str(b), str(tmp_path / "a.png")],
        "not both": [str(tmp_path / "sub"), str(a), str(out)],
        "would both be written": [str(a), str(tmp_path / "sub" / "a.png"), str(out)],
        "no .png": [str(tmp_path / "empty"), str(out)],
        "needs an input and an output": [str(a)],
        "--batch-size 0": [str(a), str(b), str(out), "--batch-size", "0"],
    }
    for message, paths in errors.items():
        assert cli.main(["compress", *paths, *ckpt]) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_batched_coding_equals_single_calls_through_tiles(workdir):
    """The batched synthesis runs tile by tile for all images at once; with tiles of 4 latent
    pixels a 120x180 image is 2x3 tiles with halos."""
    codec = load_codec(workdir)  # its own coder, re-tiled
    codec.coder.tile, codec.coder.halo = 4, 2
    images = [np.roll(photo(120, 180), 23 * i, axis=1) for i in range(3)]
    files = codec.compress_batch(images)
    assert files == [codec.compress(image) for image in images]
    for data, image in zip(files, codec.decompress_batch(files), strict=True):
        np.testing.assert_array_equal(image, codec.decompress(data))
        assert image.shape == (120, 180, 3)


def test_exact_batches_fall_back_to_single_calls_where_a_batch_rounds_differently():
    import jax.numpy as jnp

    from jaxcodec.methods.base import ExactBatches

    calls = []

    def rounds_by_batch(x):  # as another convolution algorithm for another batch size can
        calls.append(x.shape[0])
        return x * 3.0 + (1e-6 if x.shape[0] > 1 else 0.0)

    def exact(x):
        calls.append(x.shape[0])
        return {"y": x * 3.0, "n": jnp.sum(x, axis=1)}

    x = jnp.arange(12.0).reshape(4, 3) / 7.0
    batches = ExactBatches()
    out = batches("f", rounds_by_batch, x)
    np.testing.assert_array_equal(out, x * 3.0)
    assert batches.exact == {("f", (4, 3), "float32"): False}
    calls.clear()
    np.testing.assert_array_equal(batches("f", rounds_by_batch, x), x * 3.0)
    assert calls == [1, 1, 1, 1]  # decided once per shape

    calls.clear()
    out = batches("g", exact, x)
    np.testing.assert_array_equal(out["y"], x * 3.0)
    assert calls == [4, 1, 1] and batches.exact[("g", (4, 3), "float32")]
    calls.clear()
    batches("g", exact, x)
    assert calls == [4]
