"""ControlNet-XS adapter: parity with diffusers' UNetControlNetXSModel, zero init, partition."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxcodec.nn.control import (  # noqa: E402
    ControlAdapterConfig,
    ControlledUNet,
    largest_group_count,
    param_labels,
    trainable_mask,
)
from jaxcodec.nn.unet import UNet  # noqa: E402
from jaxcodec.weights import diffusers as dw  # noqa: E402

# diffusers' adapter supports exactly 2 resnets per level (SD / SDXL), so this tiny UNet has 2.
# norm_eps=1e-6: diffusers' UNetControlNetXSModel rebuilds the base resnets with the
# ResnetBlock2D default eps (1e-6) whatever the UNet's norm_eps (SD: 1e-5) — a small deviation
# of its own from the UNet it wraps; with 1e-6 both references agree and parity is exact.
TINY_UNET = dict(
    norm_eps=1e-6,
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
)


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def xs(tmp_path_factory):
    unet = _randomize(diffusers.UNet2DConditionModel(**TINY_UNET).eval(), 0)
    adapter = diffusers.ControlNetXSAdapter.from_unet(
        unet,
        block_out_channels=[8, 16],  # odd group counts: (8+32) -> 8, (16+64) -> 16, ...
        num_attention_heads=[2, 2],
        conditioning_embedding_out_channels=(4, 8),
    )
    _randomize(adapter, 1)  # zero convs become non-zero so that parity sees every path
    unet_dir, adapter_dir = tmp_path_factory.mktemp("unet"), tmp_path_factory.mktemp("xs")
    unet.save_pretrained(unet_dir, safe_serialization=True)
    adapter.save_pretrained(adapter_dir, safe_serialization=True)
    ref = diffusers.UNetControlNetXSModel.from_unet(unet, controlnet=adapter).eval()
    unet_config, unet_params = dw.load_unet(unet_dir)
    adapter_config, adapter_params = dw.load_control_adapter(adapter_dir, unet_config)
    return ref, unet_config, adapter_config, {"unet": unet_params, "adapter": adapter_params}


def test_controlnet_xs_matches_diffusers(xs):
    ref, unet_config, adapter_config, params = xs
    assert adapter_config.hint_mode == "embedding"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 7, 32, generator=g)
    cond = torch.randn(2, 3, 32, 32, generator=g)  # image-space condition, 2x the latent
    with torch.no_grad():
        want = ref(x, t, ctx, controlnet_cond=cond, conditioning_scale=0.7).sample
    model = ControlledUNet(unet_config, adapter_config)
    got = jax.jit(model.apply)(
        {"params": params},
        _nhwc(x),
        jnp.asarray(t.numpy()),
        jnp.asarray(ctx.numpy()),
        _nhwc(cond),
        0.7,
    )
    err = np.abs(np.asarray(got) - want.numpy().transpose(0, 2, 3, 1)).max()
    assert err <= 1e-4, err


def test_zero_initialised_adapter_leaves_the_unet_unchanged(xs):
    """Zero convs at init: the controlled UNet (hint concatenated with x_t, base features read
    into the control branch) equals the plain UNet; RDEIC's wiring only drops those reads."""
    _, unet_config, _, params = xs
    adapter_config = ControlAdapterConfig(size_ratio=0.25, head_channels=4, hint_channels=6)
    model = ControlledUNet(unet_config, adapter_config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 16, 16, 4)), jnp.float32)
    t = jnp.array([500.0])
    ctx = jnp.asarray(rng.normal(size=(1, 3, 32)), jnp.float32)
    hint = jnp.asarray(rng.normal(size=(1, 16, 16, 6)), jnp.float32)

    def controlled(unet_params, key):
        fresh = dw.nn.meta.unbox(model.init(key, x, t, ctx, hint)["params"])
        full = {"unet": unet_params, "adapter": fresh["adapter"]}
        return model.apply({"params": full}, x, t, ctx, hint), fresh["adapter"]

    out, adapter = jax.jit(controlled)(params["unet"], jax.random.key(0))
    plain = jax.jit(UNet(unet_config).apply)({"params": params["unet"]}, x, t, ctx)
    assert np.abs(np.asarray(out) - np.asarray(plain)).max() <= 1e-5
    # The adapter is real: 0.2-style widths, heads of head_channels, non-zero inner weights.
    assert adapter["conv_in"]["kernel"].shape == (3, 3, 4 + 6, 8)
    block = adapter["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert block["attn1"]["to_q"]["kernel"].shape == (8, 8)  # 2 heads of 4 channels
    assert np.abs(np.asarray(adapter["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])).max() > 0
    zero = adapter["down_blocks_0"]["ctrl_to_base_0"]["kernel"]
    assert not np.asarray(zero).any()


def test_partition_for_optax(xs):
    _, _, _, params = xs
    labels = param_labels(params)
    assert set(jax.tree.leaves(labels["unet"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["adapter"])) == {"trainable"}
    tx = optax.multi_transform({"trainable": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels)

    @jax.jit  # one program, not one eager dispatch per leaf and op
    def step(params):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = step(params)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new)
    assert not any(jax.tree.leaves(changed["unet"]))
    assert all(jax.tree.leaves(changed["adapter"]))
    mask = trainable_mask(params)
    assert all(jax.tree.leaves(mask["adapter"])) and not any(jax.tree.leaves(mask["unet"]))


def test_group_counts_and_config_errors(xs):
    _, unet_config, _, _ = xs
    assert largest_group_count(40) == 20 and largest_group_count(80) == 20
    assert largest_group_count(12) == 12 and largest_group_count(7, 4) == 1
    with pytest.raises(ValueError, match="exactly one"):
        ControlAdapterConfig(size_ratio=0.2, block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="hint_mode"):
        ControlAdapterConfig(hint_mode="add")
    no_mid = dataclasses.replace(unet_config, mid_block_type=None)
    with pytest.raises(ValueError, match="mid block"):
        jax.eval_shape(
            ControlledUNet(no_mid).init,
            jax.random.key(0),
            jnp.zeros((1, 4, 4, 4)),
            jnp.zeros((1,)),
            jnp.zeros((1, 1, 32)),
            jnp.zeros((1, 4, 4, 256)),
        )
