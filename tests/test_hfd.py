"""HFD end to end: one command trains both stages; stage 2 decodes real files in patch groups,
identically in fresh processes, without seams; the η sweep writes its table and plot."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_diffusion_patches import _seam_ratio

from jaxcodec.codec import load_codec
from jaxcodec.configlib import PROJECT_ROOT, load_config, stage_config
from jaxcodec.diffusion.patches import PatchGrid
from jaxcodec.train import train_stages

TINY = [
    "model.N=16",
    "model.M=16",
    "model.context_groups=(8,8)",
    "data.crop_size=64",
    "batch_size=4",
    "total_steps=3",
    "log_every=1",
    "eval_every=0",
    "checkpoint_every=100",
    "eval_data.max_images=1",
    "decoder.unet.block_out_channels=(8,16)",
    "decoder.unet.down_block_types=('DownBlock2D','CrossAttnDownBlock2D')",
    "decoder.unet.up_block_types=('CrossAttnUpBlock2D','UpBlock2D')",
    "decoder.unet.attention_head_dim=(1,2)",
    "decoder.unet.norm_num_groups=4",
    "decode.steps=2",
    "decode.patch=64",
    "stage2.total_steps=8",
    "stage2.batch_size=4",
    "stage2.optimizer.lr=2e-3",
    "mesh.num_devices=1",
]


def tiny_config(*overrides: str):
    return load_config("configs/hfd.py:tiny", [*TINY, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("hfd")
    summaries = train_stages(tiny_config(), workdir)
    assert [s["final_step"] for s in summaries] == [3, 8]
    return workdir


def test_one_command_trains_both_stages_and_ends_with_real_files(trained):
    stage2 = json.loads((trained / "stage2" / "summary.json").read_text())
    losses = [h["loss"] for h in stage2["history"]]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    rf = stage2["real_files"]
    assert rf["files"] == 1 and rf["bpp"] > 0 and 0 < rf["lpips"] < 2
    assert Path(rf["side_by_side"]).is_file()
    # Stage 2 keeps the stage-1 model it started from; the rate is the autoencoder's alone.
    assert (trained / "stage2" / "previous_stage.safetensors").is_file()
    one, two = load_codec(trained / "stage1"), load_codec(trained / "stage2")
    from skimage import data

    image = data.astronaut()[:96, :160]
    a, b = one.compress(image), two.compress(image)
    np.testing.assert_array_equal(one.last_info["y_symbols"], two.last_info["y_symbols"])
    assert 0 < len(b) - len(a) <= 6  # the same streams; the header adds steps, seed, patch
    # Running the command again finds both stages trained and only reports them.
    again = train_stages(tiny_config(), trained)
    assert [(s["resumed_from"], s.get("already_trained")) for s in again] == [(3, True), (8, True)]
    assert again[-1]["real_files"] == rf


_DECODE = (
    "import sys, numpy as np\n"
    "from jaxcodec.codec import load_codec\n"
    "c = load_codec(sys.argv[1])\n"
    "np.save(sys.argv[3], c.decompress(open(sys.argv[2], 'rb').read()))\n"
)


def test_large_image_in_patches_without_seams_identical_in_fresh_processes(trained, tmp_path):
    from skimage import data

    codec = load_codec(trained / "stage2", options={"patch": 128})
    image = np.tile(data.astronaut(), (1, 2, 1))[:320, :448]
    jxc = tmp_path / "big.jxc"
    jxc.write_bytes(codec.compress(image))
    decoded = codec.decompress(jxc.read_bytes())
    assert decoded.shape == (320, 448, 3)
    assert set(codec.timings) >= {"entropy_s", "synthesis_s", "denoise_s"}
    ratio = _seam_ratio(decoded.astype(np.float64), PatchGrid(320, 448, patch=128, overlap=32))
    assert abs(ratio - 1.0) <= 0.1, ratio
    # Same device configuration as this process: XLA:CPU rounds large reductions (group norm)
    # differently with 8 host devices than with 1-4, so a float decoder is bit-exact across
    # processes of one configuration (the entropy-decoded latents are exact everywhere).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = tmp_path / "fresh.npy"
    subprocess.run(
        [sys.executable, "-c", _DECODE, str(trained / "stage2"), str(jxc), str(out)],
        check=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=600,
    )
    np.testing.assert_array_equal(np.load(out), decoded)  # a fresh process: the same pixels


def test_stage_two_alone_and_wrong_handover_are_clear(trained, tmp_path):
    config = stage_config(tiny_config("model.N=24"), 2)
    config.init_from = str(trained / "stage1")
    from jaxcodec.train import train_and_evaluate

    with pytest.raises(ValueError, match="differs from the stage-1 model"):
        train_and_evaluate(config, tmp_path / "other")


def test_the_two_stage_workdir_compresses_with_its_last_finished_stage(trained, tmp_path, capsys):
    """The README's compress/decompress example on the main command's workdir."""
    from PIL import Image
    from skimage import data

    from jaxcodec import cli
    from jaxcodec.checkpoint import CODEC_FILE

    Image.fromarray(data.astronaut()[:64, :96]).save(tmp_path / "a.png")
    jxc, png = tmp_path / "a.jxc", tmp_path / "a_decoded.png"
    assert (
        cli.main(["compress", str(tmp_path / "a.png"), str(jxc), "--checkpoint", str(trained)]) == 0
    )
    assert cli.main(["decompress", str(jxc), str(png), "--checkpoint", str(trained)]) == 0
    assert f"using stage2 ({trained / 'stage2' / CODEC_FILE})" in capsys.readouterr().out
    expected = load_codec(trained / "stage2").decompress(jxc.read_bytes())
    np.testing.assert_array_equal(np.asarray(Image.open(png)), expected)


def test_eta_sweep_writes_its_table_and_plot(trained, tmp_path):
    sys.path.insert(0, str(PROJECT_ROOT / "launch"))
    import sweep
    from PIL import Image
    from skimage import data

    shutil.copytree(trained / "stage1", tmp_path / "shared" / "stage1")  # the shared stage 1
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.astronaut()[:64, :96]).save(images / "a.png")
    # η = 0.5 is the fixture's own stage 2: its program comes from the compilation cache. The
    # runs skip their own real files: the sweep evaluates every run afterwards.
    sweep.main(
        ["--config", "configs/hfd.py:tiny", "--workdir", str(tmp_path), "--data", str(images),
         "--field", "decoder.schedule.eta", "--values", "0.5", "2", "--steps", "2",
         *sum((["--set", o] for o in TINY), []), "--set", "real_file_eval=False"]
    )  # fmt: skip
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["value"], r["steps"]) for r in rows] == [
        ("previous stage", None),
        ("0.5", 2),
        ("2", 2),
    ]
    assert all(0 < r["lpips"] < 2 and 0 <= r["dists"] < 1 and r["bpp"] > 0 for r in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (
        "| decoder.schedule.eta | steps | bpp | PSNR | LPIPS | DISTS |"
        in (tmp_path / "sweep.md").read_text()
    )
