"""ResULIC's parts: the official parameter counts and state-dict keys at full size, torch's
transposed convolution, the compression-aware diffusion maths and the caption coder (parity
with the official modules: tests/test_parity_resulic.py)."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_files import official_keys, uniform

from jaxcodec.entropy import text_coder
from jaxcodec.entropy.coder import CodingError
from jaxcodec.nn import latent_compressor as lc
from jaxcodec.nn.control import ControlAdapterConfig
from jaxcodec.nn.text import default_tokenizer
from jaxcodec.nn.unet import SD21_BASE_UNET, UNetConfig
from jaxcodec.weights import resulic as importer

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x) -> jax.Array:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- official sizes


def test_official_sizes_counts_and_every_key():
    """ELIC (N 128, M 192, slices [16, 16, 32, 32, 96]) and the CDDM adapter at SD 2.1 width:
    parameter counts equal the official modules', and every official state-dict key maps with
    its shape (the ELIC's f_c, built but never called by the official code, is the difference
    of 265,344 in the ELIC total)."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method

    method = get_method(load_config("configs/resulic.py:full,stage=2,add_steps=495"))
    c, unet, adapter = method.compressor_config, method.unet_config, method.adapter_config
    assert c == lc.LatentCompressorConfig.elic() and adapter == ControlAdapterConfig.resulic()
    assert unet == UNetConfig.from_diffusers(SD21_BASE_UNET, dtype="bfloat16", remat=True)
    assert method.start == 495 and method.config.loss.l_bpp == 16.0  # the official rate point
    assert method.text_config.layers == 23 and method.text_layer == -1  # SD 2.1's text encoder
    elic = official_keys(DATA / "resulic_elic_keys.txt")
    cddm = official_keys(DATA / "resulic_cddm_keys.txt")
    assert len(elic) == 239 and len(cddm) == 387
    plan = importer.plan(c, unet, adapter)
    assert importer.check(plan, {"elic": elic, "cddm": cddm}) == ([], [], [])
    f_c = sum(int(np.prod(s)) for k, s in elic.items() if k.startswith("f_c."))
    assert f_c == 265_344 and importer.f_c_shapes(c) == {
        k: s for k, s in elic.items() if k.startswith("f_c.")
    }
    size = lambda entries: sum(int(np.prod(e.shape)) for e in entries)  # noqa: E731
    comp = [e for e in plan["elic"].values() if e.module == "compressor"]
    assert size(comp) + f_c == 13_072_908  # official ELIC
    assert size(e for e in comp if e.path[0] == "g_a") == 1_007_040  # its encoder
    assert size(e for e in comp if e.path[0] == "h_s") == 2_992_992  # its hyper decoder
    ctrl = [e for e in plan["cddm"].values() if e.module == "adapter"]
    zero = [e for e in ctrl if "_to_" in e.path[-2]]  # zero convs, both directions
    assert size(ctrl) == 54_807_680  # official CDDM with its zero convs
    assert size(ctrl) - size(zero) == 40_480_640  # its ControlModule


def test_transposed_conv_is_torchs_and_exports_exactly():
    """jaxcodec's ConvTranspose (a sub-pixel conv) against torch's ConvTranspose2d, and its
    integer export against the float layer."""
    torch = pytest.importorskip("torch")
    from jaxcodec.entropy import fixedpoint
    from jaxcodec.nn.transforms import ConvTranspose

    x = uniform(3, 2 * 6 * 5 * 7).reshape(2, 6, 5, 7).astype(np.float32) * 2 - 1
    for k, s, p, op in ((5, 2, 2, 1), (3, 1, 1, 0)):
        torch.manual_seed(k)
        ref = torch.nn.ConvTranspose2d(6, 8, k, s, p, op)
        want = ref(torch.from_numpy(x)).detach().numpy()
        params = {
            "kernel": ref.weight.detach().numpy().transpose(2, 3, 0, 1),
            "bias": ref.bias.detach().numpy(),
        }
        got = ConvTranspose(8, k, s, p, op).apply({"params": params}, _nhwc(x))
        assert np.abs(_nchw(got) - want).max() < 1e-6 * np.abs(want).max()
        net = ConvTranspose.fixed_point(params, s, p, op)
        fixed = fixedpoint.run(net, fixedpoint.to_fixed(np.asarray(_nhwc(x))[0]))
        assert np.abs(fixedpoint.from_fixed(fixed) - want[0].transpose(1, 2, 0)).max() < 0.02


# ----------------------------------------------------------------------------- diffusion


def test_compression_aware_x0_inverts_the_forward_process():
    from jaxcodec.diffusion import relay_forward, relay_x0_from_eps, scaled_linear_schedule

    schedule, start = scaled_linear_schedule(), 300
    k = jax.random.split(jax.random.key(0), 3)
    z0, z_c, eps = (jax.random.normal(ki, (3, 4, 6, 4)) for ki in k)
    t = jnp.array([0, 150, start])
    z_t, _ = relay_forward(schedule, z0, z_c, t, eps, start + 1)
    x0 = relay_x0_from_eps(schedule, z_t, t, eps, z_c, start + 1)
    np.testing.assert_allclose(x0[:2], z0[:2], atol=2e-4)  # the pure ε recovers z_0 …
    np.testing.assert_array_equal(x0[2], z_c[2])  # … and at the start the process is z_c's


# ----------------------------------------------------------------------------- captions


def test_caption_coder_round_trip_and_cost():
    tok = default_tokenizer()
    captions = (DATA.parent.parent / "benchmarks" / "data" / "captions_varied.txt").read_text()
    captions = captions.splitlines()
    assert len(captions) == 200
    for caption in captions[:20] + ["", "Ünïcode & <end_of_text> edge cases!!"]:
        tokens = [t for t in tok.encode(caption) if t < text_coder.SOT][: text_coder.MAX_TOKENS]
        assert text_coder.decode(text_coder.encode(tokens)) == tokens
    assert text_coder.encode(None) == b"" and text_coder.decode(b"") is None
    stats = text_coder.compare(captions)
    print("bits per caption on 200 varied captions:", stats)
    assert stats["coder_bits"] < 0.75 * stats["token16_bits"] < stats["zlib_bits"]
    with pytest.raises(ValueError, match="at most 75"):
        text_coder.encode([320] * 76)
    with pytest.raises(CodingError):  # a stream that never ends in <end_of_text>
        text_coder.decode(b"\xff" * 64)


def test_caption_file_matches_images_by_pixels(tmp_path):
    from PIL import Image

    from jaxcodec.data.captions import CaptionFile, caption_source
    from jaxcodec.methods.base import pad_to_multiple

    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "captions.json").write_text('{"a.png": "a red door", "chelsea": "a cat"}')
    pad = lambda im: pad_to_multiple(im, 32)  # noqa: E731
    source = caption_source(str(tmp_path / "captions.json"), pad)
    assert isinstance(source, CaptionFile) and source.by_name("chelsea") == "a cat"
    assert source(pad(image)) == "a red door" and source(pad(image[::-1])) is None
    assert caption_source("") is None
    assert caption_source("os.path:basename") is os.path.basename
    with pytest.raises(ValueError, match="module:function"):
        caption_source("nonsense")
