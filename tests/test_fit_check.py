"""The parts of benchmarks/fit_check.py the main command shares: a multi-stage workdir stands
for its last finished stage; the main command's stage table. (HFD's fit check itself, whose
two-stage workdir the main command's tests use through the CLI: tests/test_hfd.py.)"""

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
