"""The parts of benchmarks/fit_check.py the main command shares: a multi-stage workdir stands
for its last finished stage; the main command's stage table. (The two-stage workdir through
the CLI: tests/test_hfd.py.)"""

import pytest

from jaxcodec.checkpoint import CODEC_FILE, CheckpointError, bundle_path, describe_bundle_choice
from jaxcodec.train import stage_comparison


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


# --- The memorisation check, at micro size ---------------------------------------------------

# HFD with a small hyperprior autoencoder (its EMA short enough for a short run) and a two-level
# score decoder without attention, trained on 2 crops of 64² (scikit-image's astronaut and coffee)
# for FAST_STEPS, every crop without decode-time context: the crop is one patch, decoded without
# context, and the tiny config's 0.75 spends three quarters of a short run on the other task.
# Measured alone on 2 cores (8 host devices, as here): 90 s, the decoder's LPIPS 0.171 against
# stage 1's 0.226 (1 host device, whose rounding trains other weights: 0.174 against 0.214).
# With the context share at 0.75 it took 800 steps (172 s) to win by 0.043.
FAST_STEPS = (150, 400)
FAST_SET = (
    "model.N=16",
    "model.M=16",
    "model.entropy_model=hyperprior",
    "optimizer.lr=3e-3",
    "ema_decay=0.9",
    "decoder.unet.block_out_channels=(16,32)",
    "decoder.unet.down_block_types=('DownBlock2D','DownBlock2D')",
    "decoder.unet.up_block_types=('UpBlock2D','UpBlock2D')",
    "decoder.unet.attention_head_dim=(1,1)",
    "decoder.context_probability=0.0",
    "stage2.optimizer.lr=2e-3",
)


def test_hfd_score_decoder_reproduces_its_training_crops(tmp_path):
    """benchmarks/fit_check.py --method hfd at micro size: both stages trained on 2 crops, then
    real files of those crops. A score decoder whose chain is right (schedule, v read the same
    way by the loss and the sampler, the reconstruction wired as its condition, EMA weights
    decoded) reproduces its training crops better than the stage-1 reconstruction it refines;
    one with a bug in that chain does not, however long it trains."""
    import json
    import sys

    from PIL import Image
    from skimage import data

    from jaxcodec.configlib import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    import fit_check

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.png")
    out = tmp_path / "fit"
    argv = ["--method", "hfd", "--out", str(out), "--photos", str(photos), "--crops", "2"]
    argv += ["--size", "64", "--steps1", str(FAST_STEPS[0]), "--steps2", str(FAST_STEPS[1])]
    for field in FAST_SET:
        argv += ["--set", field]
    code = fit_check.main(argv)
    result = json.loads((out / "fit_check.json").read_text())
    rows = {r["label"]: r for r in result["table"]}
    stage1, base = rows["stage 1: MSE autoencoder"], rows["stage 2's file, stage-1 decode"]
    generative = rows["stage 2: score decoder"]
    # Stage 1 is a real codec on these crops, and stage 2's file carries the same streams.
    assert stage1["psnr"] > 20.0 and base["psnr"] == pytest.approx(stage1["psnr"], abs=1e-9)
    assert base["bpp"] == pytest.approx(generative["bpp"], abs=1e-12)
    # The score decoder beats it in LPIPS by a margin well above numerical noise.
    assert generative["lpips"] < base["lpips"] - 0.02, result["verdicts"]
    assert code == (0 if result["verdicts"][0]["wins"] else 1)
