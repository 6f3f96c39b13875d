"""``python -m jaxcodec.evaluate`` end to end on three Kodak images (tiny JPEG sweep)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxcodec.evaluate import clic_preprocess, main

KODAK = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kodak")
REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                         "published_rd_points.txt")  # fmt: skip


@pytest.fixture(scope="module")
def kodak3(tmp_path_factory):
    if not os.path.isdir(KODAK):
        pytest.skip("Kodak is not at ../shared/data/kodak")
    d = tmp_path_factory.mktemp("kodak3")
    for n in ("kodim01.png", "kodim04.png", "kodim23.png"):  # landscape and portrait
        shutil.copy(os.path.join(KODAK, n), d / n)
    return d


def test_cli_writes_json_table_and_plots(kodak3, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jaxcodec.evaluate", "--codec", "jpeg", "webp",
           "--data", str(kodak3), "--out", str(out), "--qualities", "5,30,70",
           "--metrics", "psnr,ms-ssim", "--anchor", "jpeg", "--no-progress"]  # fmt: skip
    if os.path.isfile(REFERENCE):
        cmd += ["--reference", REFERENCE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "jpeg.json").read_text())
    res = doc["results"]
    assert doc["name"] == "jpeg" and doc["meta"]["num_images"] == 3
    assert len(res["bpp"]) == len(res["psnr"]) == len(res["ms-ssim"]) == 3
    assert res["bpp"] == sorted(res["bpp"]) and res["psnr"] == sorted(res["psnr"])
    # bpp is 8 * bytes / pixels of the real files, averaged per image.
    per = doc["per_image"]["jpeg-q5"]
    assert [r["image"] for r in per] == ["kodim01.png", "kodim04.png", "kodim23.png"]
    for r in per:
        assert r["bpp"] == pytest.approx(8 * r["bytes"] / (r["height"] * r["width"]))
        assert r["encode_time"] > 0 and r["decode_time"] > 0
    assert res["bpp"][0] == pytest.approx(np.mean([r["bpp"] for r in per]))
    assert 20 < res["psnr"][0] < res["psnr"][2] < 45
    for m in ("psnr", "ms-ssim"):
        png = out / f"rd_{m}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    table = (out / "results.md").read_text()
    assert "| jpeg-q30 |" in table and "BD-rate against jpeg" in table
    bd = json.loads((out / "bd_rate.json").read_text())["bd_rate_percent"]["webp"]["psnr"]
    assert bd.startswith("-") or bd.startswith("n/a")  # WebP beats JPEG (or says why not)


def test_checkpoint_codec_and_fid_option(kodak3, tmp_path, monkeypatch):
    """A model codec is loaded through jaxcodec.codec.load_codec; each workdir is a point."""
    import types

    class Posterize:
        def __init__(self, workdir, options):
            assert options == {}  # no --option given
            self.bits = int(open(os.path.join(workdir, "bits")).read())
            self.name = f"posterize-{self.bits}"
            self.timings = {}

        def compress(self, image):
            self.timings = {"encode": 1e-3}
            flag = b"L" if image.shape[1] > image.shape[0] else b"P"  # Kodak: 768x512 or 512x768
            return (image >> (8 - self.bits)).astype(np.uint8).tobytes() + flag

        def decompress(self, data):
            self.timings = {"decode": 3e-3, "denoise_s": 2e-3}
            h, w = (512, 768) if data[-1:] == b"L" else (768, 512)
            q = np.frombuffer(data[:-1], np.uint8).reshape(h, w, 3)
            return (q << (8 - self.bits)).astype(np.uint8)

    mod = types.ModuleType("jaxcodec.codec")
    mod.load_codec = Posterize
    mod.parse_options = dict.fromkeys
    monkeypatch.setitem(sys.modules, "jaxcodec.codec", mod)
    dirs = []
    for bits in (3, 6):
        d = tmp_path / f"w{bits}"
        d.mkdir()
        (d / "bits").write_text(str(bits))
        dirs.append(str(d))
    out = tmp_path / "out"
    assert main(["--checkpoint", *dirs, "--data", str(kodak3), "--out", str(out), "--limit", "2",
                 "--metrics", "psnr", "--name", "toy", "--no-progress"]) == 0  # fmt: skip
    res = json.loads((out / "toy.json").read_text())["results"]
    assert res["rate_point"] == ["posterize-3", "posterize-6"]
    assert res["denoise_time"] == [pytest.approx(2e-3)] * 2
    assert res["encode_time"] == [pytest.approx(1e-3)] * 2
    assert res["decode_time"] == [pytest.approx(3e-3)] * 2
    assert res["psnr"][0] < res["psnr"][1]
    with pytest.raises(ValueError, match="--inception"):
        main(["--codec", "jpeg", "--data", str(kodak3), "--out", str(out), "--metrics", "psnr,fid"])


def test_clic_preprocessing():
    img = np.random.default_rng(0).integers(0, 256, (900, 1400, 3), dtype=np.uint8)
    out = clic_preprocess(img)
    assert out.shape == (768, 768, 3)
    ref = np.asarray(Image.fromarray(img).resize((1195, 768), Image.BICUBIC))[:, 213:981]
    np.testing.assert_array_equal(out, ref)
