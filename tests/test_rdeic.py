"""RDEIC end to end on the tiny variant: both stages train through the real loop (losses fall),
files round-trip exactly in a fresh process, λ_s = 0 is the plain SD UNet, the official
checkpoint format round-trips (export → import → identical outputs); and the full variant's
shapes and parameter counts against the official modules."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from run_configs import run_config

from jaxcodec.configlib import load_config
from jaxcodec.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100 : 100 + h, 150 : 150 + w])


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1, then stage 2 from it, through `train_and_evaluate` (the tiny SD folder is
    written into a temporary cache)."""
    from jaxcodec.train import train_and_evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCODEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        root = tmp_path_factory.mktemp("rdeic")
        c1 = run_config("configs/rdeic.py:tiny", total_steps=120, batch_size=8)
        s1 = train_and_evaluate(c1, root / "stage1")
        c2 = run_config(
            "configs/rdeic.py:tiny,stage=2",
            total_steps=40,
            batch_size=8,
            init_from=str(root / "stage1"),
        )
        s2 = train_and_evaluate(c2, root / "stage2")
        yield {"root": root, "stage1": s1, "stage2": s2}


def _losses(summary):
    return [h["loss"] for h in summary["history"]]


def test_both_stages_train_and_losses_fall(runs):
    """Per-step losses, averaged over the first and last steps of each stage (the relay
    timestep and the crops make single steps noisy)."""
    s1, s2 = _losses(runs["stage1"]), _losses(runs["stage2"])
    assert len(s1) == 120 and len(s2) == 40 and all(np.isfinite(s1 + s2))
    first1, last1 = np.mean(s1[:10]), np.mean(s1[-20:])
    first2, last2 = np.mean(s2[:5]), np.mean(s2[-10:])
    print(f"stage 1 loss {first1:.4f} -> {last1:.4f}; stage 2 loss {first2:.4f} -> {last2:.4f}")
    assert last1 < 0.85 * first1 and last2 < 0.95 * first2
    assert runs["stage1"]["nonfinite_total"] == runs["stage2"]["nonfinite_total"] == 0
    last = runs["stage2"]["history"][-1]
    assert {"lpips", "mse", "bpp", "z_c_mse", "vq_loss"} <= set(last)


def test_files_round_trip_in_a_fresh_process(runs, tmp_path):
    from jaxcodec.codec import load_codec

    codec = load_codec(runs["root"] / "stage2")
    image = photo(72, 100)  # padded to 128 × 128 inside the codec
    data = codec.compress(image)
    symbols = codec.last_info["y_symbols"]
    decoded = codec.decompress(data)
    timings = dict(codec.timings)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    np.testing.assert_array_equal(codec.last_info["y_symbols"], symbols)
    assert {"entropy_s", "denoise_s", "vae_decode_s"} <= set(timings)
    bpp = 8 * len(data) / (72 * 100)
    print(f"tiny RDEIC file: {len(data)} bytes, {bpp:.4f} bpp; decode timings {timings}")
    # Same file, same seed: the same pixels again.
    np.testing.assert_array_equal(codec.decompress(data), decoded)

    (tmp_path / "a.jxc").write_bytes(data)
    # The decoding machine has its own copy of the SD folder: `--set model.sd_path=COPY`.
    sd_copy = shutil.copytree(codec.method.config.model.sd_path, tmp_path / "sd_copy")
    script = (
        "import sys, numpy as np\n"
        "from jaxcodec.codec import load_codec\n"
        "c = load_codec(sys.argv[1], overrides=[f'model.sd_path={sys.argv[4]}'])\n"
        "assert c.method.config.model.sd_path == sys.argv[4]\n"
        "im = c.decompress(open(sys.argv[2], 'rb').read())\n"
        "np.savez(sys.argv[3], image=im, symbols=c.last_info['y_symbols'])\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    # Same XLA flags as this process: the decode programs come from the shared compilation
    # cache, and what is checked is the file and the process state (another device count is
    # test_method_interface's portable decoding).
    subprocess.run(
        [sys.executable, "-c", script, str(runs["root"] / "stage2"), str(tmp_path / "a.jxc"),
         str(tmp_path / "out.npz"), str(sd_copy)],
        check=True,
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    fresh = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(fresh["symbols"], symbols)
    np.testing.assert_array_equal(fresh["image"], decoded)


def test_lambda_s_zero_is_the_plain_sd_unet(runs):
    """λ_s = 0 decodes with the frozen UNet alone, exactly; λ_s = 1 with the controlled one;
    and the guided combination at λ_s = 0 equals the plain UNet's ε bit for bit."""
    from jaxcodec.codec import load_codec
    from jaxcodec.diffusion import guided_denoiser, relay_sample, relay_start_latent
    from jaxcodec.methods.rdeic import guidance_mode

    codec = load_codec(runs["root"] / "stage2")
    method, v = codec.method, codec.variables
    key = jax.random.key(7)
    z_c = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
    hint = jax.random.normal(jax.random.key(2), (1, 8, 8, 32))
    ctx = method._context(v.frozen, 1)

    @jax.jit
    def decode_plain_mode(p, f):
        return method.relay_decode(p, f, z_c, hint, key, steps=2, lambda_s=0.0, mode="plain")

    @jax.jit
    def reference(f):  # the plain SD UNet sampled directly from the same start
        k_start, k_chain = jax.random.split(key)
        z_n = relay_start_latent(method.schedule, z_c, jax.random.normal(k_start, z_c.shape))
        eps_sd = Partial(method._eps_sd, f["unet"], ctx)
        return relay_sample(eps_sd, method.schedule, z_n, k_chain, num_steps=2)

    assert guidance_mode(0.0) == "plain" and guidance_mode(1.0) == "controlled"
    assert guidance_mode(1.5) == "guided"
    np.testing.assert_array_equal(
        np.asarray(decode_plain_mode(v.params, v.frozen)), np.asarray(reference(v.frozen))
    )

    z = jax.random.normal(jax.random.key(3), (1, 8, 8, 4))
    t = jnp.array([150])

    @jax.jit
    def eps(p, f, lambda_s):
        sd = Partial(method._eps_sd, f["unet"], ctx)
        theta = Partial(method._eps_theta, p["adapter"], f["unet"], hint, ctx)
        return sd(z, t), theta(z, t), guided_denoiser(sd, theta, lambda_s)(z, t)

    e_sd, e_theta, e_zero = eps(v.params, v.frozen, 0.0)
    np.testing.assert_array_equal(np.asarray(e_zero), np.asarray(e_sd))
    assert np.abs(np.asarray(e_theta) - np.asarray(e_sd)).max() > 1e-6  # the adapter acts


def test_official_checkpoint_round_trip(runs, tmp_path):
    """export (official key names, a torch .ckpt) → `jaxcodec import-weights` → identical
    parameters, latents and pixels."""
    torch = pytest.importorskip("torch")
    from jaxcodec import cli
    from jaxcodec.codec import load_codec
    from jaxcodec.weights import rdeic as importer

    codec = load_codec(runs["root"] / "stage2")
    m, v = codec.method, codec.variables
    official = importer.to_official(
        v.params, v.state, m.compressor_config, m.unet_config, m.adapter_config
    )
    assert any(k.startswith("preprocess_model.encoder.g_a.0.conv1") for k in official)
    assert "control_model.control_model.input_blocks.0.0.weight" in official
    ckpt = tmp_path / "rdeic_tiny.ckpt"
    state_dict = {k: torch.from_numpy(a) for k, a in official.items()}
    state_dict["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # SD parts are ignored
    torch.save({"state_dict": state_dict, "global_step": 7}, ckpt)

    out = tmp_path / "imported.safetensors"
    sd = m.config.model.sd_path
    spec = "configs/rdeic.py:tiny,stage=2"
    argv = ["import-weights", "--format", "rdeic", str(ckpt), "--sd", sd, str(out)]
    assert cli.main([*argv, "--config", spec]) == 0
    imported = load_codec(out)
    jax.tree.map(np.testing.assert_array_equal, imported.variables.params, v.params)
    np.testing.assert_array_equal(
        imported.variables.state["vq_stats"]["vq"]["codebook"],
        v.state["vq_stats"]["vq"]["codebook"],
    )
    image = photo(72, 100)  # the size of the file test: compiled programs are reused
    data = codec.compress(image)
    want = codec.decompress(data)
    data2 = imported.compress(image)
    np.testing.assert_array_equal(imported.last_info["y_symbols"], codec.last_info["y_symbols"])
    np.testing.assert_array_equal(imported.decompress(data2), want)


def test_importer_names_every_bad_key(tmp_path):
    from jaxcodec.weights import diffusers as dw
    from jaxcodec.weights import rdeic as importer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCODEC_CACHE", str(tmp_path))
        m = get_method(load_config("configs/rdeic.py:tiny"))
    cc, uc, ac = m.compressor_config, m.unet_config, m.adapter_config
    the_plan = importer.plan(cc, uc, ac)
    state = {}
    for group, prefix in (
        ("compression", "preprocess_model."),
        ("noise_estimator", "control_model."),
    ):
        for key, entry in the_plan[group].items():
            state[prefix + key] = np.zeros(entry.torch_shape, np.float32)
    params, vq_state, report = importer.from_official(state, cc, uc, ac)
    assert report["scales"] == [0.0]  # scale_list of zeros: folded into the zero convs
    del state["preprocess_model.encoder.g_a.0.conv1.weight"]
    state["control_model.control_model.input_blocks.0.0.weight"] = np.zeros((1, 2, 3, 3))
    state["preprocess_model.hyper_dec.extra.weight"] = np.zeros(3)
    state["something.else"] = np.zeros(1)
    with pytest.raises(dw.WeightsMismatchError) as info:
        importer.from_official(state, cc, uc, ac)
    msg = str(info.value)
    assert "missing keys (1): encoder.g_a.0.conv1.weight" in msg
    assert "preprocess_model.hyper_dec.extra.weight" in msg and "something.else" in msg
    assert "control_model.input_blocks.0.0.weight (checkpoint (1, 2, 3, 3)" in msg


def test_no_code_runs_from_a_checkpoint(tmp_path):
    """A pickle that would call os.system is read without calling it."""
    import pickle

    from jaxcodec.weights import rdeic as importer

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": {"x": torch.zeros(2)}, "hyper_parameters": Evil()}, path)
    assert pickle.__name__  # the file really holds the reduce call
    state = importer.read_checkpoint(path)
    assert not marker.exists()
    assert list(state) == ["x"]


def _read_keys(path: Path) -> dict[str, tuple]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.startswith("buffer(non-persistent)"):
            continue
        _, key, rest = line.split(" ", 2)
        out[key] = tuple(int(d) for d in rest.rsplit(" ", 1)[0].strip("()").split(",") if d)
    return out


def test_full_variant_shapes_and_every_official_key():
    """configs/rdeic.py:full with SD 2.1-base shapes (no weights): the official parameter counts
    module by module, and every key of the official state dicts mapped with its shape."""
    from jaxcodec.weights import rdeic as importer

    method = get_method(load_config("configs/rdeic.py:full"))
    assert method.unet_config.heads == (5, 10, 20, 20)
    assert method.unet_config.dtype == "bfloat16" and method.unet_config.remat
    the_plan = importer.plan(method.compressor_config, method.unet_config, method.adapter_config)
    size = lambda entries: sum(int(np.prod(e.shape)) for e in entries)  # noqa: E731
    comp = [e for e in the_plan["compression"].values() if e.module == "compressor"]
    adapter = [e for e in the_plan["noise_estimator"].values() if e.module == "adapter"]
    zero = [e for e in adapter if e.path[-2].startswith(("ctrl_to_base", "control_to_base"))]
    codebook = the_plan["compression"][importer.CODEBOOK_KEY].shape
    assert codebook == (16384, 256)
    assert size(comp) + codebook[0] * codebook[1] == 52_112_552  # official Compression
    assert size(adapter) == 24_555_392  # official NoiseEstimator
    assert size(adapter) - size(zero) == 20_068_352  # its ControlModule
    official = {
        "compression": _read_keys(DATA / "rdeic_compression_keys.txt"),
        "noise_estimator": _read_keys(DATA / "rdeic_noise_estimator_keys.txt"),
    }
    assert len(official["compression"]) == 323 and len(official["noise_estimator"]) == 349
    assert importer.check(the_plan, official) == ([], [], [])
    # The model builds at full size: compressor, adapter, VQ codebook from eval_shape.
    shapes = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))
    assert _count(shapes["params"]["compressor"]) == size(comp)
    assert shapes["vq_stats"]["vq"]["codebook"].shape == codebook
