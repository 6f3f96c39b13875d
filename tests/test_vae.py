"""VAE parity with diffusers' AutoencoderKL (tiny random config), through the loader."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcodec.nn.vae import AutoencoderKL, VAEConfig  # noqa: E402
from jaxcodec.weights import diffusers as dw  # noqa: E402

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    ref = diffusers.AutoencoderKL(**TINY_VAE).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder, safe_serialization=True)
    config, params = dw.load_vae(folder)
    return ref, config, params


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_vae_encoder_matches_diffusers(tiny_vae):
    ref, config, params = tiny_vae
    assert config.scaling_factor == pytest.approx(0.18215)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        enc = ref.encoder
        h = enc.conv_in(x)
        for block in enc.down_blocks:
            h = block(h)
        h = enc.conv_act(enc.conv_norm_out(enc.mid_block(h)))
        want_feature = _nhwc(h)
        want_pre = _nhwc(enc.conv_out(h))
        want_moments = _nhwc(ref.quant_conv(enc.conv_out(h)))
        assert np.allclose(want_moments, _nhwc(ref.encode(x).latent_dist.parameters), atol=1e-6)
    model = AutoencoderKL(config)
    got = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(
        params, jnp.asarray(_nhwc(x))
    )
    assert got["feature"].shape == (2, 8, 8, 32)  # the widest channel count, at H/2 here
    for name, want in [
        ("feature", want_feature),
        ("moments_pre_quant", want_pre),
        ("moments", want_moments),
    ]:
        err = np.abs(np.asarray(got[name]) - want).max()
        assert err <= 1e-4, (name, err)
    mean = np.asarray(got["mean"])
    assert np.allclose(mean, want_moments[..., :4], atol=1e-4)


def test_vae_decoder_matches_diffusers(tiny_vae):
    ref, config, params = tiny_vae
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = _nhwc(ref.decode(z).sample)
    model = AutoencoderKL(config)
    got = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.decode))(
        params, jnp.asarray(_nhwc(z))
    )
    assert got.shape == (1, 16, 24, 3)
    err = np.abs(np.asarray(got) - want).max()
    assert err <= 1e-4, err


def test_vae_config_round_trip():
    config = VAEConfig.from_diffusers({**TINY_VAE, "scaling_factor": None, "force_upcast": True})
    assert config.scaling_factor == pytest.approx(0.18215)
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="shift_factor"):
        VAEConfig.from_diffusers({**TINY_VAE, "shift_factor": 0.1})
