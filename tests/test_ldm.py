"""LDM, the backbone trained here: the GAN's gradients land on their own player; a micro
backbone trains through both stages of the real loop and exports a diffusers folder that
diffusers' own PyTorch classes load with the same outputs as jaxcodec; RDEIC's tiny variant
runs on that folder and round-trips a file; `full` has SD 2.1-base's shapes."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcodec.configlib import load_config
from jaxcodec.nn import discriminator as gan
from jaxcodec.train_shapes import jit_init

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro_backbone import make_micro_backbone  # noqa: E402

# --- The GAN in one pytree ---------------------------------------------------------------


def test_adversarial_gradients_land_on_their_own_player():
    """One scalar w·g + d over {'gen', 'disc'}: the generator's gradient is that of w·g with the
    discriminator held fixed, the discriminator's that of d with the fakes held fixed."""
    disc = gan.PatchDiscriminator(ndf=4, num_layers=1, norm="batch")
    real = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
    params = {
        "gen": {"a": jnp.asarray(0.7), "b": jnp.full((3,), 0.1)},
        "disc": jit_init(disc.init, jax.random.key(1), real)["params"],  # one program
    }
    w = 0.3

    def fake_of(gen):  # a toy generator: fakes are a function of its parameters
        return jnp.tanh(gen["a"] * real[::-1] + gen["b"])

    def total(p):
        g, d = gan.adversarial_losses(disc, p["disc"], real, fake_of(p["gen"]))
        return w * g + d

    grads = jax.jit(jax.grad(total))(params)
    disc_const = jax.tree.map(np.asarray, params["disc"])
    fake_const = np.asarray(fake_of(params["gen"]))
    want_gen = jax.jit(
        jax.grad(lambda gp: w * gan.generator_loss(disc.apply({"params": disc_const}, fake_of(gp))))
    )(params["gen"])
    want_disc = jax.jit(
        jax.grad(
            lambda dp: gan.discriminator_loss(
                disc.apply({"params": dp}, real), disc.apply({"params": dp}, fake_const)
            )
        )
    )(params["disc"])
    for got, want in ((grads["gen"], want_gen), (grads["disc"], want_disc)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    assert float(jnp.abs(want_gen["a"])) > 1e-4  # the check has something to compare

    # Without the stop-gradients the generator would also be pushed by the discriminator's
    # loss (towards being detected): the test above would fail.
    def naive(p):
        fake = fake_of(p["gen"])
        g = gan.generator_loss(disc.apply({"params": p["disc"]}, fake))
        d = gan.discriminator_loss(
            disc.apply({"params": p["disc"]}, real), disc.apply({"params": p["disc"]}, fake)
        )
        return w * g + d

    wrong = jax.jit(jax.grad(naive))(params)["gen"]["a"]
    assert abs(float(wrong) - float(want_gen["a"])) > 1e-3 * abs(float(want_gen["a"]))


def test_gan_switches_on_at_disc_start():
    assert [float(gan.gan_factor(s, 3)) for s in (0, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    hinge = gan.discriminator_loss(jnp.asarray([2.0, 0.5]), jnp.asarray([-2.0, 0.0]))
    assert float(hinge) == pytest.approx(0.5 * (0.25 + 0.5))  # relu(1 - r), relu(1 + f)


# --- The micro backbone ------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    folder, summaries = make_micro_backbone(root)
    return {"root": root, "folder": folder, "stage1": summaries[0], "stage2": summaries[1]}


def test_both_stages_train_and_write_their_artefacts(backbone):
    from PIL import Image

    s1, s2 = backbone["stage1"], backbone["stage2"]
    for s in (s1, s2):
        assert s["nonfinite_total"] == 0 and all(np.isfinite(h["loss"]) for h in s["history"])
    assert {"rec", "lpips", "kl", "g_loss", "d_loss"} <= set(s1["history"][-1])
    assert s1["history"][-1]["gan_on"] == 1.0  # disc_start=1: the discriminator trained
    grid = np.asarray(Image.open(s1["outputs"]["reconstructions grid"]))
    assert grid.ndim == 3 and grid.shape[1] == 2 * grid.shape[0]  # original | reconstruction
    samples = np.asarray(Image.open(s2["outputs"]["samples grid"]))
    assert samples.shape == (32, 64, 3)  # 2 samples of 32² side by side
    # Stage 2 trains on latents × the measured scale factor: about unit spread.
    assert 0.5 < s2["history"][-1]["latent_std"] < 2.0
    folder = backbone["folder"]
    for name in ("unet/config.json", "vae/config.json", "empty_prompt_embedding.npy"):
        assert (folder / name).is_file(), name
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (
        scheduler["beta_schedule"] == "scaled_linear" and scheduler["prediction_type"] == "epsilon"
    )


def test_export_loads_in_diffusers_with_the_same_outputs(backbone):
    """The folder through diffusers' PyTorch UNet2DConditionModel / AutoencoderKL against
    jaxcodec's modules on the trained (EMA) weights of the stage-2 model: ≤ 1e-5 relative."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxcodec.checkpoint import load_bundle
    from jaxcodec.methods.ldm import CALIBRATION, LDM
    from jaxcodec.nn.text import encode_prompt

    folder = backbone["folder"]
    bundle = load_bundle(backbone["root"] / "stage2" / "codec.safetensors")
    stage1 = load_bundle(backbone["root"] / "stage1" / "codec.safetensors")
    method = LDM(bundle.config)
    scale = float(stage1.state[CALIBRATION]["scale_factor"])
    vae_ref = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    unet_ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    assert vae_ref.config.scaling_factor == pytest.approx(scale, rel=1e-6)
    text = np.asarray(encode_prompt("", folder))
    np.testing.assert_array_equal(text, bundle.params["text"])

    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
    z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    t = np.asarray([10, 700], np.int32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    nhwc = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    with torch.no_grad():
        want_moments = nhwc(vae_ref.encode(nchw(x)).latent_dist.parameters)
        want_image = nhwc(vae_ref.decode(nchw(z)).sample)
        want_eps = nhwc(
            unet_ref(nchw(z), torch.from_numpy(t), torch.from_numpy(np.repeat(text, 2, 0))).sample
        )
    vae = {"params": bundle.frozen["vae"]}
    got_moments = jax.jit(lambda v, a: method.vae.apply(v, a, method="encode")["moments"])(vae, x)
    got_image = jax.jit(lambda v, a: method.vae.apply(v, a, method="decode"))(vae, z)
    got_eps = jax.jit(method.eps_theta)(bundle.params, z, t)

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))

    assert rel(got_moments, want_moments) <= 1e-5
    assert rel(got_image, want_image) <= 1e-5
    assert rel(got_eps, want_eps) <= 1e-5


def test_export_backbone_command_writes_the_same_folder(backbone, tmp_path):
    from jaxcodec.cli import main
    from jaxcodec.weights import diffusers as dw

    out = tmp_path / "exported"
    assert (
        main(["export-backbone", "--checkpoint", str(backbone["root"] / "stage2"), str(out)]) == 0
    )
    for part in ("unet", "vae"):
        want_cfg, want = dw.read_folder(backbone["folder"] / part)
        got_cfg, got = dw.read_folder(out / part)
        assert got_cfg == want_cfg and sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # A stage-1 model is no backbone: refused with a clear error.
    assert (
        main(["export-backbone", "--checkpoint", str(backbone["root"] / "stage1"), str(out)]) == 2
    )


@pytest.mark.parametrize("method", ["rdeic", "diffcr", "resulic"])
def test_sd_method_tiny_on_the_backbone_loads_and_codes(method, backbone, tmp_path):
    """`configs/{rdeic,diffcr,resulic}.py:tiny,backbone=DIR`: the UNet/VAE shapes and the scale
    factor come from the folder, and a model on it saves and loads as a codec; RDEIC's writes a
    real file that decodes twice the same (the methods' training loops and the other two's
    files are their own tests', on the same code paths). ResULIC, with no text tower there,
    conditions on the backbone's text condition and refuses captions."""
    from skimage import data

    from jaxcodec.codec import load_codec, save_codec
    from jaxcodec.methods import get_method

    folder = backbone["folder"]
    c = load_config(f"configs/{method}.py:tiny,backbone={folder}")
    if method == "resulic":
        with pytest.raises(ValueError, match="encode.captions need a CLIP text tower"):
            get_method(
                load_config(
                    f"configs/resulic.py:tiny,backbone={folder}", ["encode.captions=captions.json"]
                )
            )
    model = get_method(c)
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert model.scale == pytest.approx(vae_config["scaling_factor"])
    if method == "rdeic":
        variables = jit_init(model.init, jax.random.key(0), model.dummy_batch(1))
    else:  # no file: the shapes, as zeros, save and load the same (no init to compile)
        shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_batch(1))
        variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params = variables.pop("params")
    save_codec(tmp_path / method, c, params, variables)

    codec = load_codec(tmp_path / method)
    assert codec.method.scale == pytest.approx(vae_config["scaling_factor"])
    if method == "rdeic":
        image = np.ascontiguousarray(data.astronaut()[:72, :100])
        file = codec.compress(image)
        decoded = codec.decompress(file)
        assert decoded.shape == image.shape and decoded.dtype == np.uint8
        np.testing.assert_array_equal(codec.decompress(file), decoded)
    if method == "resulic":  # every prompt is the backbone's text condition
        text = np.load(folder / "empty_prompt_embedding.npy")
        ids = jax.numpy.asarray(np.stack([model.prompt_ids([320]), model.prompt_ids()]))
        context = model.encode_text(codec.variables.frozen, ids)
        np.testing.assert_array_equal(
            context, np.broadcast_to(text.reshape(1, *text.shape[-2:]), context.shape)
        )


# --- Configs -------------------------------------------------------------------------------


def test_init_logvar_narrows_only_the_posterior_log_variance():
    import flax.linen as nn

    from jaxcodec.methods.ldm import LDM

    c = load_config("configs/ldm.py:tiny")
    c.model.init_logvar = -6.0
    method = LDM(c)
    bias = nn.Partitioned(jnp.arange(8.0), ("conv_out",))
    params = {"quant_conv": {"bias": bias, "kernel": jnp.ones((1, 1, 8, 8))}, "encoder": {}}
    out = method._narrow_posterior(params)
    assert out["quant_conv"]["bias"].names == ("conv_out",)  # logical axes kept
    np.testing.assert_array_equal(out["quant_conv"]["bias"].value, [0, 1, 2, 3] + [-6.0] * 4)
    assert out["quant_conv"]["kernel"] is params["quant_conv"]["kernel"]
    c.model.init_logvar = 0.0
    assert LDM(c)._narrow_posterior(params) is params  # diffusers' init unless asked


def test_full_variant_has_sd21_base_shapes():
    from jaxcodec.methods.ldm import unet_config, vae_config
    from jaxcodec.nn.unet import SD21_BASE_UNET, UNetConfig
    from jaxcodec.nn.vae import SD21_BASE_VAE, VAEConfig

    c = load_config("configs/ldm.py:full")
    sd_unet = UNetConfig.from_diffusers(SD21_BASE_UNET)
    sd_vae = VAEConfig.from_diffusers(SD21_BASE_VAE)
    assert unet_config(c.model).to_diffusers() == sd_unet.to_diffusers()
    ours = vae_config(c.model).to_diffusers()
    theirs = sd_vae.to_diffusers()
    assert {k: v for k, v in ours.items() if k != "sample_size"} == {
        k: v for k, v in theirs.items() if k != "sample_size"
    }
    assert c.model.text_length == 77 and c.stages == (1, 2)


def test_tiny_data_defaults_to_the_shared_photos_when_present():
    from jaxcodec.configlib import PROJECT_ROOT

    c = load_config("configs/ldm.py:tiny")
    photos = PROJECT_ROOT.parent / "shared" / "data" / "photos"
    if photos.is_dir():
        assert c.data.source == "folder" and Path(c.data.path) == photos
    else:
        assert c.data.source == "skimage"


def test_cpu_backbone_launcher_runs_valid_configs(tmp_path, monkeypatch):
    """`launch/cpu_backbone.sh --dry-run`: every training command's config and overrides load
    (a misspelt field fails here, not an hour into the run), in the documented order."""
    import shlex
    import subprocess

    from jaxcodec.configlib import PROJECT_ROOT

    monkeypatch.setenv("JAXCODEC_CACHE", str(tmp_path / "cache"))
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    out = subprocess.run(
        ["bash", "launch/cpu_backbone.sh", "--dry-run", str(tmp_path / "runs"), "--config.seed=3"],
        cwd=PROJECT_ROOT,
        env={**dict(__import__("os").environ), "KODAK": str(kodak)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [shlex.split(line) for line in out.splitlines() if line.strip()]
    trains = [c for c in commands if c[1:3] == ["-m", "jaxcodec.train"]]
    specs = [c[c.index("--config") + 1] for c in trains]
    assert specs[0] == "configs/ldm.py:tiny" and "--config.seed=3" in trains[0]
    backbone = str(tmp_path / "runs" / "ldm" / "stage2" / "backbone")
    assert specs[1:] == [
        f"configs/{method}.py:tiny{on},stage={stage}"
        for method in ("rdeic", "diffcr", "resulic")
        for on in (f",backbone={backbone}", "")
        for stage in (1, 2)
    ]
    for cmd, spec in zip(trains, specs, strict=True):
        overrides = [a for a in cmd if a.startswith("--config.")]
        c = load_config(spec, overrides)
        if not spec.startswith("configs/ldm.py"):
            assert c.eval_data.path == str(kodak)
        if "backbone=" in spec:
            assert c.model.sd_path == backbone
    evaluations = [c for c in commands if c[1:3] == ["-m", "jaxcodec.evaluate"]]
    assert len(evaluations) == 9 and commands[-1][1] == "launch/backbone_report.py"
