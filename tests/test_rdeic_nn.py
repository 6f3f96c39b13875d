"""RDEIC's parts, small and fast: residual blocks and context networks against torch layers
built from the official layouts, the fixed-point GELU / pixel shuffle / residual layers, the
'rdeic' context recipe (causality with odd-parity anchors, exact coding round trip), the
compressor's host coding, and the RDEIC adapter wiring (zero init = the plain UNet)."""

import flax.linen as nn
import intnet_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcodec.entropy import coder, fixedpoint
from jaxcodec.entropy import context as context_lib
from jaxcodec.nn import transforms

torch = pytest.importorskip("torch")


def RBG(seed: int) -> jax.Array:  # noqa: N802
    """Initialisation keys: XLA's RngBitGenerator compiles much faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def random_init(module, *args, seed: int = 0, **kwargs) -> dict:
    """Variables of ``module`` drawn with numpy from its shapes: no initialiser to compile."""
    from jaxcodec.weights.diffusers import random_params

    shapes = jax.eval_shape(lambda: module.init({"params": RBG(0)}, *args, **kwargs))
    return random_params(shapes, seed)


def _to_torch_conv(conv: "torch.nn.Conv2d", p: dict) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.array(p["bias"])))


def _nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_residual_blocks_match_torch_layers():
    """The official blocks' layouts (conv names, slopes 0.01/0.1, torch PixelShuffle order)."""
    nn_t = torch.nn
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 8))
    f = lambda v: torch.nn.functional.leaky_relu(v, 0.01)  # noqa: E731
    g = lambda v: torch.nn.functional.leaky_relu(v, 0.1)  # noqa: E731

    up = transforms.ResidualBlockUpsample(12)
    p = nn.unbox(jax.jit(up.init)(RBG(1), x)["params"])
    sub, conv, skip = (
        nn_t.Conv2d(8, 48, 1),
        nn_t.Conv2d(12, 12, 3, padding=1),
        nn_t.Conv2d(8, 48, 1),
    )
    for m, name in ((sub, "subpel_conv"), (conv, "conv"), (skip, "skip")):
        _to_torch_conv(m, p[name])
    shuffle, xt = nn_t.PixelShuffle(2), _nchw(x)
    want = g(conv(f(shuffle(sub(xt))))) + shuffle(skip(xt))
    np.testing.assert_allclose(
        np.asarray(jax.jit(up.apply)({"params": p}, x)), _nhwc(want), atol=1e-5
    )

    down = transforms.ResidualBlockWithStride(12)
    p = nn.unbox(jax.jit(down.init)(RBG(2), x)["params"])
    c1, c2 = nn_t.Conv2d(8, 12, 3, stride=2, padding=1), nn_t.Conv2d(12, 12, 3, padding=1)
    ds = nn_t.Conv2d(8, 12, 1, stride=2)
    for m, name in ((c1, "conv1"), (c2, "conv2"), (ds, "skip")):
        _to_torch_conv(m, p[name])
    want = g(c2(f(c1(xt)))) + ds(xt)
    np.testing.assert_allclose(
        np.asarray(jax.jit(down.apply)({"params": p}, x)), _nhwc(want), atol=1e-5
    )

    res = transforms.ResidualBlock(12)
    p = nn.unbox(jax.jit(res.init)(RBG(3), x)["params"])
    c1, c2, ad = (
        nn_t.Conv2d(8, 12, 3, padding=1),
        nn_t.Conv2d(12, 12, 3, padding=1),
        nn_t.Conv2d(8, 12, 1),
    )
    for m, name in ((c1, "conv1"), (c2, "conv2"), (ad, "skip")):
        _to_torch_conv(m, p[name])
    want = f(c2(f(c1(xt)))) + ad(xt)
    np.testing.assert_allclose(
        np.asarray(jax.jit(res.apply)({"params": p}, x)), _nhwc(want), atol=1e-5
    )


def test_fixed_point_residual_blocks_track_the_float_blocks():
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
    for block in (transforms.ResidualBlockUpsample(8), transforms.ResidualBlock(12)):
        p = jax.tree.map(np.asarray, nn.unbox(jax.jit(block.init)(RBG(1), x)["params"]))
        net = {"000": type(block).fixed_point(p)}
        got = fixedpoint.from_fixed(fixedpoint.run(net, fixedpoint.to_fixed(np.asarray(x)[0])))
        want = np.asarray(jax.jit(block.apply)({"params": p}, x))[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 0.01 * np.abs(want).max()  # int8 weights: ~0.5 %
        x_q = fixedpoint.to_fixed(np.asarray(x)[0])
        np.testing.assert_array_equal(fixedpoint.run(net, x_q), intnet_reference.run(net, x_q))


def test_fixed_point_gelu_and_pixel_shuffle():
    from scipy.special import ndtr

    x = np.arange(-12 * 4096, 12 * 4096, 3)
    got = fixedpoint.run({"000": fixedpoint.gelu_layer()}, x[:, None, None])[:, 0, 0]
    xf = x / 4096.0
    assert np.abs(got - xf * ndtr(xf) * 4096).max() <= 1.5  # grid units (2^-12)
    y = np.arange(2 * 3 * 8).reshape(2, 3, 8)
    shuffled = fixedpoint.run({"000": fixedpoint.pixel_shuffle_layer(2)}, y)
    want = _nhwc(torch.nn.PixelShuffle(2)(_nchw(y[None].astype(np.float32))))[0]
    np.testing.assert_array_equal(shuffled, want)


def test_rdeic_context_matches_the_official_layers():
    """'rdeic' networks = ChannelContextEX (5×5, 224, 128, GELU) and EntropyParametersEX (1×1,
    2C·5/3, 2C·4/3, GELU); the anchor pass of group k sees [channel ctx, hyper]."""
    groups = (4, 12)
    ctx = context_lib.SpaceChannelContext(groups, "rdeic")
    y = jax.random.normal(jax.random.key(0), (1, 4, 4, 16)) * 2
    hyper = jax.random.normal(jax.random.key(1), (1, 4, 4, 32))
    p = random_init(ctx, y, hyper, train=False)["params"]
    chan = p["channel_1"]
    assert [chan[f"layer_{i}"]["kernel"].shape for i in range(3)] == [
        (5, 5, 4, 224),
        (5, 5, 224, 128),
        (5, 5, 128, 24),
    ]
    assert p["param_anchor_1"]["layer_0"]["kernel"].shape == (1, 1, 24 + 32, 40)
    assert p["param_nonanchor_1"]["layer_0"]["kernel"].shape == (1, 1, 24 + 24 + 32, 40)
    seq = torch.nn.Sequential(
        torch.nn.Conv2d(4, 224, 5, padding=2),
        torch.nn.GELU(),
        torch.nn.Conv2d(224, 128, 5, padding=2),
        torch.nn.GELU(),
        torch.nn.Conv2d(128, 24, 5, padding=2),
    )
    for i in range(3):
        _to_torch_conv(seq[2 * i], chan[f"layer_{i}"])
    stack = context_lib.ConvStack(context_lib.RECIPES["rdeic"].channel(12))
    x = y[..., :4]
    got = jax.jit(stack.apply)({"params": chan}, x)
    np.testing.assert_allclose(np.asarray(got), _nhwc(seq(_nchw(x))), atol=1e-4)


def test_rdeic_context_is_causal_and_codes_exactly():
    groups = (4, 4, 8)
    ctx = context_lib.SpaceChannelContext(groups, "rdeic")
    y = jax.random.normal(jax.random.key(0), (1, 6, 6, 16)) * 3
    hyper = jax.random.normal(jax.random.key(1), (1, 6, 6, 32))
    params = random_init(ctx, y, hyper, train=False, seed=2)["params"]
    apply = jax.jit(lambda v: ctx.apply({"params": params}, v, hyper, train=False))
    _, base = apply(y)
    anchors = context_lib.anchor_mask(6, 6, parity=1)
    assert anchors[0, 1] and not anchors[0, 0]  # the official checkerboard
    delta = np.zeros(y.shape, np.float32)
    delta[0][~anchors, 4:8] = 5.0
    _, moved = apply(y + delta)
    np.testing.assert_array_equal(np.asarray(moved)[..., :4], np.asarray(base)[..., :4])
    np.testing.assert_array_equal(
        np.asarray(moved)[0][anchors, 4:8], np.asarray(base)[0][anchors, 4:8]
    )

    from jaxcodec.nn.hyperprior import gaussian_entropy_tables

    y_ref = np.asarray(apply(y)[0])[0]
    nets = context_lib.export(jax.tree.map(np.asarray, params), groups, "rdeic")
    assert int(nets["recipe"]) == 1
    tabs = gaussian_entropy_tables()
    hyper_q = fixedpoint.to_fixed(np.asarray(hyper)[0])
    enc = coder.new_encoder()
    y_q, sym, idx = context_lib.code(nets, tabs, hyper_q, y=np.asarray(y)[0], encoder=enc)
    data = coder.finish(enc)
    dec_q, _, dec_idx = context_lib.code(nets, tabs, hyper_q, decoder=coder.new_decoder(data))
    np.testing.assert_array_equal(dec_q, y_q)
    np.testing.assert_array_equal(dec_idx, idx)
    # Within the int8 networks' error (~1 % of the parameters), bar inherited rounding flips.
    assert (np.abs(fixedpoint.from_fixed(y_q) - y_ref) < 3e-2).mean() > 0.9


def test_latent_coding_round_trip():
    """The compressor's two streams decode to exactly the encoder's ŷ (fixed-point h_s)."""
    from jaxcodec.nn import latent_compressor as lc

    config = lc.LatentCompressorConfig(
        in_channels=8, N=16, M=16, groups=(4, 12), num_codes=32, res_blocks=(1, 1)
    )
    model = lc.LatentCompressor(config)
    h = jax.random.normal(jax.random.key(0), (1, 16, 16, 8))
    v = random_init(model, h, train=False, seed=1)

    @jax.jit
    def analyse(v):
        y, z = model.apply(v, h, method="analyse")
        return y, model.apply(v, z, method="hyper_indices")

    y, idx = analyse(v)
    idx = np.asarray(idx)[0]
    assert y.shape == (1, 8, 8, 16) and idx.shape == (2, 2)
    tables = lc.entropy_tables(config, v["params"], v["vq_stats"])
    coding = lc.LatentCoding()
    streams, y_hat, info = coding.encode(tables, np.asarray(y)[0], idx)
    decoded, dinfo = coding.decode(tables, streams, (2, 2))
    np.testing.assert_array_equal(decoded, y_hat)
    np.testing.assert_array_equal(dinfo["z_indices"], idx)
    assert np.abs(y_hat - np.asarray(y)[0]).max() <= 0.5 + 1e-2  # y rounded around μ


def test_rdeic_adapter_has_its_own_time_embedding_and_never_reads_the_base():
    """RDEIC's wiring of ControlledUNet (shapes only: that the zero convs make any wiring start
    as the plain UNet is test_control's)."""
    from tiny_unet import TINY_UNET

    from jaxcodec.nn.control import ControlAdapterConfig, ControlledUNet
    from jaxcodec.nn.unet import UNetConfig

    adapter = ControlAdapterConfig.rdeic(size_ratio=0.25, head_channels=4, hint_channels=6)
    model = ControlledUNet(UNetConfig(**TINY_UNET), adapter)
    x = jnp.zeros((1, 8, 8, 4))
    ctx, hint = jnp.zeros((1, 3, 16)), jnp.zeros((1, 8, 8, 6))
    params = nn.unbox(
        jax.eval_shape(lambda: model.init(RBG(3), x, jnp.array([250]), ctx, hint))["params"]
    )
    a = params["adapter"]
    assert "time_embedding" in a and not any("base_to_ctrl" in k for k in a["down_blocks_0"])
    assert any("ctrl_to_base" in k for k in a["down_blocks_0"])
    assert a["conv_in"]["kernel"].shape == (3, 3, 4 + 6, 8)
    assert a["down_blocks_0"]["resnets_0"]["conv1"]["kernel"].shape == (3, 3, 8, 8)
