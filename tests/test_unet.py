"""UNet parity with diffusers' UNet2DConditionModel (tiny random config), through the loader."""

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
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers({**dict(ref.config), "class_embed_type": "timestep"})


def test_unet_matches_diffusers(tiny_unet):
    ref, _, config, params = tiny_unet
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
    got = jax.jit(UNet(config).apply)(
        {"params": params}, _to_nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    )
    err = np.abs(np.asarray(got) - want.numpy().transpose(0, 2, 3, 1)).max()
    assert err <= 1e-4, err


def test_unet_control_residuals_match_diffusers(tiny_unet):
    ref, _, config, params = tiny_unet
    x, t, ctx = _inputs(2)
    g = torch.Generator().manual_seed(5)
    # conv_in output, down block 0 (1 layer + downsampler), down block 1 (1 layer).
    shapes = [(2, 32, 16, 16), (2, 32, 16, 16), (2, 32, 8, 8), (2, 64, 8, 8)]
    down = [torch.randn(s, generator=g) for s in shapes]
    mid = torch.randn(2, 64, 8, 8, generator=g)
    with torch.no_grad():
        want = ref(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=tuple(down),
            mid_block_additional_residual=mid,
        ).sample
        plain = ref(x, t, encoder_hidden_states=ctx).sample
    got = UNet(config).apply(
        {"params": params},
        _to_nhwc(x),
        jnp.asarray(t.numpy()),
        jnp.asarray(ctx.numpy()),
        down_block_additional_residuals=[_to_nhwc(d) for d in down],
        mid_block_additional_residual=_to_nhwc(mid),
    )
    want = want.numpy().transpose(0, 2, 3, 1)
    assert np.abs(want - plain.numpy().transpose(0, 2, 3, 1)).max() > 1e-2  # residuals matter
    err = np.abs(np.asarray(got) - want).max()
    assert err <= 1e-4, err
    with pytest.raises(ValueError, match="down-block residuals"):
        UNet(config).apply(
            {"params": params},
            _to_nhwc(x),
            jnp.asarray(t.numpy()),
            jnp.asarray(ctx.numpy()),
            down_block_additional_residuals=[_to_nhwc(d) for d in down[:2]],
        )


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
    params = model.init(jax.random.key(0), x, jnp.array([0.5]))["params"]
    block = params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]
    assert "attn2" not in block and "norm2" not in block
    out = model.apply({"params": params}, x, jnp.array([0.5]))
    assert out.shape == (1, 12, 12, 3)
    assert np.isfinite(np.asarray(out)).all()


def test_bf16_compute_keeps_fp32_params(tiny_unet):
    _, _, config, params = tiny_unet
    import dataclasses

    bf16 = dataclasses.replace(config, dtype="bfloat16", attention_impl="blockwise")
    x, t, ctx = _inputs(3)
    args = (_to_nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    ref = UNet(config).apply({"params": params}, *args)
    out = UNet(bf16).apply({"params": params}, *args)
    assert out.dtype == jnp.bfloat16
    fresh = UNet(bf16).init(jax.random.key(0), *args)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(dw.nn.meta.unbox(fresh)))
    rel = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() / np.abs(ref).max()
    assert rel < 5e-2, rel
