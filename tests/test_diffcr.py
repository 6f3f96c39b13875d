"""DiffCR end to end on the tiny variant: both stages train through the real loop (losses fall),
files round-trip exactly in a fresh process and their size is everything the decoder reads,
`jaxcodec evaluate` reports the model, and the official checkpoint format round-trips (export →
`jaxcodec import-weights --format diffcr` → identical parameters and pixels)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from run_configs import run_config

ROOT = Path(__file__).resolve().parents[1]


def photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100 : 100 + h, 150 : 150 + w])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1, then stage 2 from it, through `train_and_evaluate` (the tiny SD folder is
    written into a temporary cache), and the codec of stage 2."""
    from jaxcodec.codec import load_codec
    from jaxcodec.train import train_and_evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCODEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        root = tmp_path_factory.mktemp("diffcr")
        s1 = train_and_evaluate(
            run_config("configs/diffcr.py:tiny", total_steps=30), root / "stage1"
        )
        c2 = run_config(
            "configs/diffcr.py:tiny,stage=2", total_steps=24, init_from=str(root / "stage1")
        )
        s2 = train_and_evaluate(c2, root / "stage2")
        yield {"root": root, "stage1": s1, "stage2": s2, "codec": load_codec(root / "stage2")}


def _losses(summary, key="loss"):
    return [h[key] for h in summary["history"]]


def test_both_stages_train_and_losses_fall(runs):
    """Per-step losses averaged over the first and last steps of each stage (timesteps, start
    steps and crops make single steps noisy); stage 2 trains FaSE only, the compressor frozen."""
    s1, s2 = _losses(runs["stage1"]), _losses(runs["stage2"])
    assert len(s1) == 30 and len(s2) == 24 and all(np.isfinite(s1 + s2))
    first1, last1 = np.mean(s1[:5]), np.mean(s1[-10:])
    first2, last2 = np.mean(s2[:8]), np.mean(s2[-8:])
    print(f"stage 1 loss {first1:.4f} -> {last1:.4f}; stage 2 loss {first2:.4f} -> {last2:.4f}")
    assert last1 < 0.7 * first1 and last2 < first2
    for key in ("x0_mse", "consistency"):
        values = _losses(runs["stage1"], key)
        assert np.mean(values[-10:]) < np.mean(values[:5]), key
    assert runs["stage1"]["nonfinite_total"] == runs["stage2"]["nonfinite_total"] == 0
    assert {"lpips", "mse", "bpp", "c_mse"} <= set(runs["stage2"]["history"][-1])
    codec = runs["codec"]
    assert set(codec.variables.params) == {"fase"}  # the compressor is a frozen stage-1 part
    assert "compressor" in codec.variables.frozen


def test_files_round_trip_in_a_fresh_process(runs, tmp_path):
    from jaxcodec.entropy import container

    codec = runs["codec"]
    image = photo(72, 100)  # padded to 128 × 128 inside the codec
    data = codec.compress(image)
    info = dict(codec.last_info)
    decoded = codec.decompress(data)
    timings = dict(codec.timings)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert {"entropy_s", "synthesis_s", "denoise_s", "vae_decode_s"} <= set(timings)
    assert codec.last_info["start_index"] == info["start_index"]
    # The file is everything: header, VQ indices, y, and 8 bytes of start step + colour codes.
    header, streams = container.unpack(data, codec.hash, num_streams=3, options={"steps"})
    assert header.options == {"steps": 2} and len(streams[2]) == 8
    bpp = 8 * len(data) / (72 * 100)
    start, codes = info["start_index"], list(info["colour_codes"])
    print(f"tiny DiffCR file: {len(data)} bytes, {bpp:.4f} bpp, start {start}, colour {codes}")
    print(f"decode timings {timings}")
    np.testing.assert_array_equal(codec.decompress(data), decoded)

    (tmp_path / "a.jxc").write_bytes(data)
    script = (
        "import sys, numpy as np\n"
        "from jaxcodec.codec import load_codec\n"
        "c = load_codec(sys.argv[1]); im = c.decompress(open(sys.argv[2], 'rb').read())\n"
        "np.savez(sys.argv[3], image=im, symbols=c.last_info['y_symbols'])\n"
    )
    # The same XLA:CPU configuration as this process (its 8 host devices): FaSE's dense blocks
    # round differently with 1 host device (ẑ_0 within 5e-7, a pixel or two off by one), as
    # float decoders may across configurations; the entropy-decoded latents are exact anyway.
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-c", script, str(runs["root"] / "stage2"), str(tmp_path / "a.jxc"),
         str(tmp_path / "out.npz")],
        check=True,
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    fresh = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(fresh["symbols"], info["y_symbols"])
    np.testing.assert_array_equal(fresh["image"], decoded)


def test_evaluate_reports_the_model(runs, tmp_path):
    """`jaxcodec evaluate` on the stage-2 workdir: real files, bpp from their size."""
    from jaxcodec import cli

    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(photo(72, 100)).save(data / "a.png")
    out = tmp_path / "out"
    args = ["evaluate", "--checkpoint", str(runs["root"] / "stage2"), "--data", str(data)]
    assert cli.main([*args, "--out", str(out), "--metrics", "psnr"]) == 0
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    size = len(runs["codec"].compress(photo(72, 100)))
    assert result["results"]["bpp"] == [pytest.approx(8 * size / (72 * 100))]
    assert result["results"]["psnr"][0] > 0


def test_official_checkpoint_round_trip(runs, tmp_path, capsys):
    """export (official key names, a torch .ckpt: stage 1's compressor with its quant pair,
    stage 2's FaSE) → `jaxcodec import-weights --format diffcr` → identical parameters, codebook
    and pixels; a quant pair other than the VAE's is refused."""
    torch = pytest.importorskip("torch")
    from jaxcodec import cli
    from jaxcodec.codec import load_codec
    from jaxcodec.weights import diffcr as importer

    codec = runs["codec"]
    m, v = codec.method, codec.variables
    comp = v.frozen["compressor"]
    quant = {k: v.frozen["vae"][k] for k in ("quant_conv", "post_quant_conv")}
    official = importer.to_official(
        {"compressor": comp["params"], "fase": v.params["fase"]},
        {"vq_stats": comp["vq_stats"]},
        m.compressor_config,
        m.fase_config,
        None,
        quant,
    )
    assert "compress_model.quant.qconv.weight" in official and "tar.FQCA.conv_in.weight" in official
    state_dict = {k: torch.from_numpy(a) for k, a in official.items()}
    state_dict["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # SD parts are ignored
    ckpt = tmp_path / "diffcr_tiny.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 7}, ckpt)

    out = tmp_path / "imported.safetensors"
    sd = m.config.model.sd_path
    argv = ["import-weights", "--format", "diffcr", str(ckpt), "--sd", sd, str(out)]
    assert cli.main([*argv, "--config", "configs/diffcr.py:tiny,stage=2"]) == 0
    imported = load_codec(out)
    jax.tree.map(np.testing.assert_array_equal, imported.variables.params, v.params)
    got = imported.variables.frozen["compressor"]
    jax.tree.map(np.testing.assert_array_equal, got["params"], comp["params"])
    np.testing.assert_array_equal(
        got["vq_stats"]["vq"]["codebook"], comp["vq_stats"]["vq"]["codebook"]
    )
    image = photo(72, 100)
    data = imported.compress(image)
    np.testing.assert_array_equal(
        imported.decompress(data), codec.decompress(codec.compress(image))
    )

    state_dict["compress_model.quant.qconv.bias"] = (
        state_dict["compress_model.quant.qconv.bias"] + 1
    )
    torch.save({"state_dict": state_dict}, ckpt)
    capsys.readouterr()
    assert cli.main([*argv, "--config", "configs/diffcr.py:tiny,stage=2"]) == 2
    assert "quant.qconv differs from the VAE's quant_conv" in capsys.readouterr().err


def test_launcher_trains_every_rate_point(tmp_path):
    """launch/diffcr_rates.sh with a recording stand-in for python: both stages of the four
    rate points (stage 2 from stage 1), then one evaluation of the four final models."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), VARIANT="tiny")
    root = tmp_path / "runs"
    subprocess.run(["bash", "launch/diffcr_rates.sh", str(root), "--config.total_steps=5"],
                   check=True, env=env, cwd=ROOT, timeout=30)  # fmt: skip
    calls = log.read_text().splitlines()
    assert len(calls) == 9
    for i, lam in enumerate(("1", "0.5", "0.25", "0.1")):
        stage1, stage2 = calls[2 * i].split(), calls[2 * i + 1].split()
        assert f"configs/diffcr.py:tiny,stage=1,lambda_r={lam}" in stage1
        assert f"configs/diffcr.py:tiny,stage=2,lambda_r={lam}" in stage2
        assert f"--config.init_from={root}/lambda_{lam}/stage1" in stage2
        assert stage1[-1] == stage2[-1] == "--config.total_steps=5"
    evaluate = calls[-1].split()
    assert evaluate[:2] == ["-m", "jaxcodec.evaluate"]
    assert [a for a in evaluate if a.endswith("/stage2")] == [
        f"{root}/lambda_{lam}/stage2" for lam in ("1", "0.5", "0.25", "0.1")
    ]


def test_rate_launchers_take_a_trained_backbone_and_steps_per_stage(tmp_path):
    """BACKBONE (a configs/ldm.py folder) reaches every training command of the rate launchers
    as the tiny config's `backbone=`, and is refused before any run with the full variant;
    STEPS1 / STEPS2 reach stage 1's / stage 2's command alone, after the shared extra flags
    (absl keeps a flag's last value)."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    backbone = tmp_path / "ldm" / "stage2" / "backbone"
    shared = "--config.total_steps=5"  # an extra flag, for every training run
    for script in ("diffcr_rates.sh", "rdeic_rates.sh", "resulic_rates.sh", "variable_rate.sh"):
        log.unlink(missing_ok=True)
        env = dict(os.environ, PYTHON=str(stub), VARIANT="tiny", BACKBONE=str(backbone),
                   METHODS="rdeic", LAMBDAS="0.5", ADD_STEPS="50",
                   STEPS1="7", STEPS2="9")  # fmt: skip
        subprocess.run(["bash", f"launch/{script}", str(tmp_path / script), shared],
                       check=True, env=env, cwd=ROOT, timeout=30)  # fmt: skip
        trains = [c for c in log.read_text().splitlines() if c.startswith("-m jaxcodec.train")]
        assert len(trains) == 2, (script, trains)
        assert all(f"tiny,backbone={backbone},stage=" in c for c in trains), (script, trains)
        for command, steps in zip(trains, ("7", "9"), strict=True):
            assert command.endswith(f"{shared} --config.total_steps={steps}"), (script, command)
        refused = subprocess.run(["bash", f"launch/{script}", str(tmp_path / "full")],
                                 env=dict(env, VARIANT="full"), cwd=ROOT, capture_output=True,
                                 text=True, timeout=30)  # fmt: skip
        assert refused.returncode == 2 and "BACKBONE is for VARIANT=tiny" in refused.stderr
    # HFD trains both stages in one run: STEPS2 is its stage-2 block's step count.
    log.unlink()
    env = dict(os.environ, PYTHON=str(stub), VARIANT="tiny", METHODS="hfd", STEPS1="7", STEPS2="9")
    subprocess.run(["bash", "launch/variable_rate.sh", str(tmp_path / "hfd")],
                   check=True, env=env, cwd=ROOT, timeout=30)  # fmt: skip
    [train] = [c for c in log.read_text().splitlines() if c.startswith("-m jaxcodec.train")]
    assert train.endswith("--config.total_steps=7 --config.stage2.total_steps=9"), train
    # Without them the commands are as before: no step flag of the launcher's own.
    log.unlink()
    del env["STEPS1"], env["STEPS2"]
    subprocess.run(["bash", "launch/variable_rate.sh", str(tmp_path / "hfd2")],
                   check=True, env=env, cwd=ROOT, timeout=30)  # fmt: skip
    [train] = [c for c in log.read_text().splitlines() if c.startswith("-m jaxcodec.train")]
    assert "total_steps" not in train, train
