"""DiffO end to end on a CPU: the one-step residual-shifting decode against an oracle, both
training stages of the tiny config (losses fall), real files at two rate points decoded
identically in fresh processes, and the index coder's rate against the tables' cross-entropy."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_configs import run_config
from skimage import data as skdata

from jaxcodec.checkpoint import CODEC_FILE, load_bundle
from jaxcodec.codec import load_codec
from jaxcodec.configlib import PROJECT_ROOT
from jaxcodec.entropy import container
from jaxcodec.entropy import tables as tables_lib
from jaxcodec.methods import get_method
from jaxcodec.train import train_and_evaluate


def _falls(history: list[dict], key: str = "loss", n: int = 5) -> tuple[float, float]:
    values = [h[key] for h in history]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


# ---------------------------------------------------------------------------------------------
# The one-step process and its inverse
# ---------------------------------------------------------------------------------------------


def test_one_step_decode_is_exact_with_an_oracle_denoiser(trained):
    """The decoder's start z_T = z_base + s·κ·sqrt(η_T)·ε (what the denoiser is given) inverts to
    the file's ε, and when the denoiser returns the true z_0 the decoded latent is z_0 exactly —
    through padding to the Swin-UNet's multiple and back (the trained stage 2's parameters)."""
    method = get_method(run_config("configs/diffo.py:tiny,stage=2"))
    sched = method.schedule
    rng = np.random.default_rng(0)
    stages, codes, dim = method.num_rates, 8, method.vqgan_config.embed_dim
    h, w = 5, 7  # not multiples of the UNet's 4: decode pads and crops
    codebooks = jnp.asarray(rng.normal(size=(stages, codes, dim)), jnp.float32)
    idx = rng.integers(0, codes, size=(1, h, w, stages))
    eps = rng.normal(size=(1, h, w, dim)).astype(np.float32)
    z0 = jnp.asarray(rng.normal(size=(1, h, w, dim)), jnp.float32)
    window = jnp.concatenate([jnp.asarray(idx, jnp.float32), jnp.asarray(eps)], axis=-1)
    params = load_bundle(trained[0] / "stage2" / CODEC_FILE).params
    s, depth = 0.6, 1
    seen = {}

    def record(t, level, eps_implied, lq):
        seen.update(t=np.asarray(t), level=float(level), eps=np.asarray(eps_implied))
        seen["lq"] = np.asarray(lq)

    def oracle(self, params, lq, level, z_t, t):  # stands in for the normalised Swin-UNet
        t_last = sched.num_timesteps - 1
        z_base = method.model.apply({"params": params}, lq, method="base_latent")
        jax.debug.callback(
            record, t, level, (z_t - z_base) / (level * sched.kappa * sched.sqrt_etas[t_last]), lq
        )
        m = method.unet_multiple
        return jnp.pad(z0, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)), mode="edge")

    method._denoiser_fn = oracle.__get__(method)
    z0_hat = method.decode_latent(params, codebooks, window, depth, s)
    np.testing.assert_array_equal(np.asarray(z0_hat), np.asarray(z0))
    jax.effects_barrier()
    assert seen["t"].tolist() == [sched.num_timesteps - 1] and seen["level"] == pytest.approx(s)
    np.testing.assert_allclose(np.asarray(seen["eps"])[:, :h, :w], eps, rtol=1e-4, atol=1e-4)
    first_stage = np.asarray(codebooks)[0][idx[..., 0]]
    np.testing.assert_array_equal(np.asarray(seen["lq"])[:, :h, :w], first_stage)
    # The forward marginal at the last step is exactly the decoder's start when z_0 = z_base,
    # and x_0 is recovered from it and ε (the process is invertible given the noise).
    z_t = sched.q_sample(z0, z0, sched.num_timesteps - 1, jnp.asarray(eps), s)
    np.testing.assert_allclose(z_t, sched.prior_sample(z0, jnp.asarray(eps), None, s), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Training, files, rate
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 (the VQGAN from scratch), then stage 2 started from it, evaluated at the end."""
    root = tmp_path_factory.mktemp("diffo")
    s1 = train_and_evaluate(
        run_config("configs/diffo.py:tiny,stage=1", total_steps=10), root / "stage1"
    )
    stage2 = run_config(
        "configs/diffo.py:tiny,stage=2",
        total_steps=30,
        init_from=str(root / "stage1"),
        eval_every=30,
    )
    stage2.eval_data.max_images = 1
    s2 = train_and_evaluate(stage2, root / "stage2")
    return root, s1, s2


def test_both_stages_train_on_cpu_and_losses_fall(trained):
    _, s1, s2 = trained
    first, last = _falls(s1["history"], n=3)
    assert last < 0.9 * first, (first, last)
    first, last = _falls(s2["history"], n=10)
    assert last < 0.85 * first, (first, last)
    assert s1["nonfinite_total"] == 0 and s2["nonfinite_total"] == 0
    # evaluation reports every rate point; the second residual-VQ stage costs bits
    ev = s2["eval"]
    assert {"bpp", "psnr", "lpips", "bpp_r0", "bpp_r1", "psnr_r0", "psnr_r1"} <= set(ev)
    assert ev["bpp_r1"] > ev["bpp_r0"] > 0.0 and ev["bpp"] == ev["bpp_r0"]


def _image(h: int, w: int) -> np.ndarray:
    """A real photo (scikit-image's astronaut) tiled and cropped to h×w."""
    photo = skdata.astronaut()
    reps = (-(-h // photo.shape[0]), -(-w // photo.shape[1]), 1)
    return np.ascontiguousarray(np.tile(photo, reps)[:h, :w])


DECODE = textwrap.dedent(
    """
    import hashlib, sys
    from jaxcodec.codec import load_codec
    codec = load_codec(sys.argv[1])
    for path in sys.argv[2:]:
        image = codec.decompress(open(path, "rb").read())
        print(path, image.shape, hashlib.sha256(image.tobytes()).hexdigest())
    """
)


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    """One model, one photo (not a multiple of the stride), files at rate points 0 and 1."""
    root, _, _ = trained
    out = tmp_path_factory.mktemp("files")
    image = _image(500, 760)
    result = {}
    for rate in (0, 1):
        codec = load_codec(root / "stage2", options={"rate_index": rate})
        data = codec.compress(image)
        path = out / f"rate{rate}.jxc"
        path.write_bytes(data)
        result[rate] = (codec, path, dict(codec.last_info))
    return image, result


def test_files_at_two_rate_points_decode_identically_in_a_fresh_process(trained, files):
    root, _, _ = trained
    image, result = files
    expected, decoded = [], {}
    for rate, (codec, path, _) in result.items():
        data = path.read_bytes()
        decoded[rate] = codec.decompress(data)
        assert decoded[rate].shape == image.shape and decoded[rate].dtype == np.uint8
        np.testing.assert_array_equal(codec.decompress(data), decoded[rate])  # again: same
        digest = hashlib.sha256(decoded[rate].tobytes()).hexdigest()
        expected.append(f"{path} {image.shape} {digest}")
    sizes = [p.stat().st_size for _, p, _ in result.values()]
    assert sizes[1] > sizes[0]  # rate point 1 sends a second residual-VQ stage
    assert not np.array_equal(decoded[0], decoded[1])
    # A fresh process with one device and one thread (this one has 8 devices, all threads).
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    paths = [str(p) for _, p, _ in result.values()]
    out = subprocess.run(
        [sys.executable, "-c", DECODE, str(root / "stage2"), *paths],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == expected


def test_index_coder_rate_is_within_one_percent_of_the_tables_cross_entropy(files):
    _, result = files
    codec, path, info = result[1]
    idx = info["indices"]
    assert idx.shape == (32, 48, 2)  # 512×768 after padding to the stride 16
    ideal = sum(
        tables_lib.table_bits(codec.tables[f"stage_{k}"], idx[..., k], np.zeros(idx[..., k].size))
        for k in range(2)
    )
    data = path.read_bytes()
    _, streams = container.unpack(data, codec.hash)
    coded = 8 * len(streams[0])
    assert abs(coded - ideal) < 0.01 * ideal, (coded, ideal)
