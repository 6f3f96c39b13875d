"""UNet parity with diffusers' UNet2DConditionModel (tiny random config), through the loader."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcodec.nn.unet import UNet, UNetConfig  # noqa: E402
from jaxcodec.weights import diffusers as dw  # noqa: E402

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
    flip_sin_to_cos=True,
    freq_shift=0,
)


def _randomize(module, seed):
    """Random weights everywhere (diffusers zero-inits some layers; parity must see them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    ref = _randomize(diffusers.UNet2DConditionModel(**TINY_UNET).eval(), 0)
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder, safe_serialization=True)
    config, params = dw.load_unet(folder)
    return ref, folder, config, params


def _to_nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3.0, 917.0])
    ctx = torch.randn(2, 5, 32, generator=g)
    return x, t, ctx


def test_config_from_diffusers(tiny_unet):
    ref, _, config, _ = tiny_unet
    assert config.block_out_channels == (32, 64)
    assert config.heads == (2, 4)
    assert config.cross_attention_dim == 32
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers({**dict(ref.config), "class_embed_type": "timestep"})


def _residuals(seed):
    g = torch.Generator().manual_seed(seed)
    # conv_in output, down block 0 (1 layer + downsampler), down block 1 (1 layer).
    shapes = [(2, 32, 16, 16), (2, 32, 16, 16), (2, 32, 8, 8), (2, 64, 8, 8)]
    return [torch.randn(s, generator=g) for s in shapes], torch.randn(2, 64, 8, 8, generator=g)


def test_unet_matches_diffusers_with_and_without_control_residuals(tiny_unet):
    ref, _, config, params = tiny_unet
    x, t, ctx = _inputs()
    down, mid = _residuals(5)
    with torch.no_grad():
        plain = ref(x, t, encoder_hidden_states=ctx).sample.numpy().transpose(0, 2, 3, 1)
        controlled = (
            ref(
                x,
                t,
                encoder_hidden_states=ctx,
                down_block_additional_residuals=tuple(down),
                mid_block_additional_residual=mid,
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    assert np.abs(controlled - plain).max() > 1e-2  # the residuals matter

    apply = jax.jit(UNet(config).apply)  # one compile serves both cases
    args = ({"params": params}, _to_nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    zeros = [jnp.zeros_like(_to_nhwc(d)) for d in down]
    got_plain = apply(*args, zeros, jnp.zeros_like(_to_nhwc(mid)))
    got_controlled = apply(*args, [_to_nhwc(d) for d in down], _to_nhwc(mid))
    err_plain = np.abs(np.asarray(got_plain) - plain).max()
    err_controlled = np.abs(np.asarray(got_controlled) - controlled).max()
    assert err_plain <= 1e-4, err_plain
    assert err_controlled <= 1e-4, err_controlled
    with pytest.raises(ValueError, match="down-block residuals"):
        jax.eval_shape(UNet(config).apply, *args, zeros[:2], None)


def test_pixel_space_variant_without_cross_attention():
    """HFD's configuration: no cross-attention, conditioning by concatenation, 3 levels."""
    config = UNetConfig(
        in_channels=6,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=None,
        norm_num_groups=8,
        layers_per_block=1,
        remat=True,
    )
    model = UNet(config)
    x = jnp.ones((1, 12, 12, 6))  # not a multiple of 4: upsampling follows the skip sizes
    t = jnp.array([0.5])
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    params = _random_params(shapes, 0)
    block = params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]
    assert "attn2" not in block and "norm2" not in block
    out = jax.jit(model.apply)({"params": params}, x, t)
    assert out.shape == (1, 12, 12, 3)
    assert np.isfinite(np.asarray(out)).all()


def _random_params(shapes, seed):
    """Random params of the given shapes without compiling an initialiser (fast on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), dw.nn.meta.unbox(shapes)
    )


def test_bf16_compute_keeps_fp32_params(tiny_unet):
    ref, _, config, params = tiny_unet
    bf16 = dataclasses.replace(config, dtype="bfloat16", attention_impl="blockwise")
    x, t, ctx = _inputs(3)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample.numpy().transpose(0, 2, 3, 1)
    args = (_to_nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    out = jax.jit(UNet(bf16).apply)({"params": params}, *args)
    assert out.dtype == jnp.bfloat16
    fresh = jax.eval_shape(UNet(bf16).init, jax.random.key(0), *args)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(dw.nn.meta.unbox(fresh)))
    rel = np.abs(np.asarray(out, np.float32) - want).max() / np.abs(want).max()
    assert rel < 5e-2, rel
