"""The generative decoder reproduces what it was trained on (benchmarks/fit_check.py, fast):
HFD's score decoder, trained on two 64² crops, decodes their real files better in LPIPS than the
stage-1 autoencoder it refines; the two-stage workdir compresses with its last finished stage;
the main command's stage table."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcodec import cli
from jaxcodec.checkpoint import CODEC_FILE, CheckpointError, bundle_path, describe_bundle_choice
from jaxcodec.train import stage_comparison

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fit_check  # noqa: E402

# A micro HFD: a 16-channel autoencoder and a two-level 8/16-channel UNet, both trained on the
# same two crops; the decoder's LPIPS must beat stage 1's by more than run-to-run noise.
MICRO = [
    "model.N=16",
    "model.M=16",
    "model.context_groups=(8,8)",
    "decoder.unet.block_out_channels=(8,16)",
    "decoder.unet.down_block_types=('DownBlock2D','CrossAttnDownBlock2D')",
    "decoder.unet.up_block_types=('CrossAttnUpBlock2D','UpBlock2D')",
    "decoder.unet.attention_head_dim=(1,2)",
    "decoder.unet.norm_num_groups=4",
    "optimizer.lr=3e-3",
    "stage2.optimizer.lr=3e-3",
]
STEPS = (150, 300)
MARGIN = 0.05  # LPIPS


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    from skimage import data

    out = tmp_path_factory.mktemp("fit")
    photos = out / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.png")
    argv = ["--method", "hfd", "--out", str(out), "--photos", str(photos), "--crops", "2"]
    argv += ["--size", "64", "--steps1", str(STEPS[0]), "--steps2", str(STEPS[1])]
    for field in MICRO:
        argv += ["--set", field]
    code = fit_check.main(argv)
    return out, code


def test_score_decoder_reproduces_its_training_crops_better_than_stage_one(fit):
    import json

    out, code = fit
    result = json.loads((out / "fit_check.json").read_text())
    rows = {r["label"]: r for r in result["table"]}
    stage1, inner, decoded = (
        rows["stage 1: MSE autoencoder"],
        rows["stage 2's file, stage-1 decode"],
        rows["stage 2: score decoder"],
    )
    # Stage 2's files carry stage 1's streams: the same reconstruction, the same rate.
    assert inner["psnr"] == pytest.approx(stage1["psnr"]) and inner["bpp"] == decoded["bpp"]
    assert 0 < decoded["bpp"] - stage1["bpp"] < 8 * 6 / 64**2  # header options only
    assert decoded["lpips"] < inner["lpips"] - MARGIN, rows
    assert code == 0 and result["verdicts"][0]["wins"]
    side_by_side = np.asarray(Image.open(result["side_by_side"]))
    assert side_by_side.shape == (2 * 64, 4 * 64, 3)


def test_a_two_stage_workdir_compresses_with_its_last_finished_stage(fit, tmp_path, capsys):
    out, _ = fit
    crop = sorted((out / "crops").glob("*.png"))[0]
    jxc, png = tmp_path / "a.jxc", tmp_path / "a.png"
    assert cli.main(["compress", str(crop), str(jxc), "--checkpoint", str(out)]) == 0
    assert cli.main(["decompress", str(jxc), str(png), "--checkpoint", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"using stage2 ({out / 'stage2' / CODEC_FILE})" in printed
    expected = np.asarray(Image.open(out / "files" / "stage2" / f"{crop.stem}.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), expected)


def test_bundle_path_takes_the_last_finished_stage(tmp_path):
    with pytest.raises(CheckpointError, match="not a training workdir"):
        bundle_path(tmp_path)
    for n in (1, 2, 10):
        (tmp_path / f"stage{n}").mkdir()
    with pytest.raises(CheckpointError, match="none of its stages .stage1, stage2, stage10."):
        bundle_path(tmp_path)
    (tmp_path / "stage1" / CODEC_FILE).write_bytes(b"")
    (tmp_path / "stage2" / CODEC_FILE).write_bytes(b"")
    chosen = bundle_path(tmp_path)
    assert chosen == tmp_path / "stage2" / CODEC_FILE
    assert describe_bundle_choice(tmp_path, chosen).endswith("not finished: stage10")
    assert describe_bundle_choice(tmp_path / "stage2", bundle_path(tmp_path / "stage2")) is None


def test_stage_comparison_puts_the_stages_side_by_side():
    one = {"real_files": {"bpp": 0.1, "psnr": 25.0, "lpips": 0.4, "dists": 0.2, "files": 2}}
    inner = {"psnr": 25.0, "lpips": 0.4, "dists": 0.2}
    two = {
        "real_files": {
            "bpp": 0.1004,
            "psnr": 23.0,
            "lpips": 0.3,
            "dists": 0.15,
            "files": 2,
            "stage1_reconstruction": inner,
            "side_by_side": "x.png",
        }
    }
    text = stage_comparison([(1, one), (2, two)])
    lines = text.splitlines()
    assert lines[0].split() == ["BPP", "PSNR", "LPIPS", "DISTS"]
    assert lines[1].startswith("stage 1 ") and lines[1].split()[-4:] == [
        "0.1000",
        "25.0000",
        "0.4000",
        "0.2000",
    ]
    assert lines[2].startswith("stage 2's files, stage-1 decode")
    assert lines[3].startswith("stage 2 ") and lines[3].split()[-2:] == ["0.3000", "0.1500"]
    assert lines[-1].endswith("x.png")
    assert stage_comparison([(2, two)]) is None
