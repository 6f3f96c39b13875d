"""Sharding that takes effect: logical axes on every parameter, the rules in force, FSDP on 8 fake
devices matching 1 device, gradient accumulation, remat policies, throughput numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from run_configs import loop_step
from tiny_unet import TINY_UNET

from jaxcodec import sharding as shd
from jaxcodec import throughput as tput
from jaxcodec import train
from jaxcodec.configlib import base_config, load_config
from jaxcodec.methods import Method, get_method, register
from jaxcodec.methods.base import to_float, to_uint8
from jaxcodec.nn import layers
from jaxcodec.nn.transforms import AnalysisTransform, SynthesisTransform
from jaxcodec.nn.unet import UNet, UNetConfig, unet_param_shapes

RULES = shd.rules_of(base_config("x", "tiny"))


def _placements(tree, mesh, **kw):
    return {r.path: r for r in shd.placements(tree, shd.tree_shardings(tree, mesh, RULES, **kw))}


@pytest.mark.parametrize(
    "spec",
    [
        "configs/hfd.py:tiny",
        "configs/hfd.py:tiny,stage=2",
        "configs/rdeic.py:tiny,stage=2",
        "configs/diffo.py:tiny,stage=1",
        "configs/diffo.py:tiny,stage=2",
    ],
)
def test_every_parameter_has_logical_axes(spec):
    path, _, arg = spec.partition(":")
    variant, _, stage = arg.partition(",")
    config = load_config(f"{path}:{variant}", [stage] if stage else [])
    method = get_method(config)
    params = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))["params"]
    assert params and not shd.unannotated(params)
    if method.name == "rdeic":  # the frozen SD backbone too (LPIPS and the text replicate)
        frozen = method.abstract_frozen()
        assert not shd.unannotated({"unet": frozen["unet"], "vae": frozen["vae"]})


def test_rules_shard_unet_like_maxdiffusion():
    """Conv kernels split their output channels, q/k/v (fsdp, tensor), to_out (tensor, fsdp),
    norms replicate; a dimension fsdp does not divide stays whole; big unnamed arrays fall back
    to fsdp on their largest divisible dimension."""
    mesh = shd.create_mesh((1, 4, 2))
    config = UNetConfig(**TINY_UNET)
    rows = _placements(unet_param_shapes(config), mesh)
    assert rows["down_blocks_0/resnets_0/conv1/kernel"].spec == P(None, None, None, "fsdp")
    attn = "down_blocks_0/attentions_0/transformer_blocks_0/attn1"
    assert rows[f"{attn}/to_q/kernel"].spec == P("fsdp", "tensor")
    assert rows[f"{attn}/to_out_0/kernel"].spec == P("tensor", "fsdp")
    assert rows["conv_norm_out/scale"].spec == P()
    # conv_out: 32 → 4 channels; 4 % 4 == 0 splits the output channels, but 4 channels over 8
    # would not: the input channels (32) are split instead; a kernel nothing divides stays whole.
    assert rows["conv_out/kernel"].spec == P(None, None, None, "fsdp")
    eight_mesh = shd.create_mesh((1, 8, 1))
    eight = _placements(unet_param_shapes(config), eight_mesh)
    assert eight["conv_out/kernel"].spec == P(None, None, "fsdp")
    assert eight["conv_out/kernel"].bytes_per_device * 8 == eight["conv_out/kernel"].bytes
    odd = shd.leaf_spec((3, 3, 6, 4), 4, (None, None, "conv_in", "conv_out"), eight_mesh, RULES)
    assert odd == P()
    # The size-gated fallback: an unnamed 8 MiB array splits its largest divisible dimension.
    big = {"table": jax.ShapeDtypeStruct((6, 4096, 85), jnp.float32)}
    assert _placements(big, mesh)["table"].spec == P(None, "fsdp")
    assert _placements(big, mesh, fsdp_min_bytes=None)["table"].spec == P()


def test_constraints_take_effect_only_in_scope_and_skip_what_does_not_divide():
    mesh = shd.create_mesh((1, 8, 1))

    def f(x):
        return layers.constrain(x * 2.0, layers.ACT_NHWC)

    x8 = jnp.ones((8, 4, 4, 16))
    with shd.scope(mesh, RULES):
        hlo = jax.jit(f).lower(x8).as_text()
        assert 'sharding_constraint %1 <@mesh, [{"data", "fsdp"}, {}, {}, {}]>' in hlo
        one = jax.jit(f).lower(jnp.ones((1, 4, 4, 16))).as_text()  # 1 image on 8 devices
        assert "sharding_constraint" not in one
    assert "sharding_constraint" not in jax.jit(f).lower(x8).as_text()  # no rules, no mesh


def _tiny_rdeic_config(devices: int):
    return load_config(
        "configs/rdeic.py:tiny,stage=1",
        [
            "mesh.shape=(1,-1,1)",
            f"mesh.num_devices={devices}",
            "batch_size=8",
            "data.crop_size=64",
            "mesh.fsdp_min_bytes=-1",  # the rules alone must split the largest parameters
            # test_rdeic's fixture's stage-1 settings: on one device this is the same program,
            # which one of the two then takes from the compilation cache.
            "total_steps=120",
        ],
    )


def _run_steps(config, steps: int = 2):
    """Steps of the loop's own compiled step on random photos-sized batches."""
    run = loop_step(config)
    rng = np.random.default_rng(0)
    state, losses = run.state, []
    for _ in range(steps):
        image = rng.integers(0, 256, (config.batch_size, 64, 64, 3), dtype=np.uint8)
        state, metrics = run.step(state, run.frozen, run.batch(image))
        losses.append(float(metrics["loss"]))
    return state, run.frozen, losses, run.speed


def test_fsdp_splits_the_largest_unet_and_compressor_parameters_and_matches_one_device():
    state8, frozen8, loss8, speed = _run_steps(_tiny_rdeic_config(8))
    for tree, name in ((state8.params["compressor"], "compressor"), (frozen8["unet"], "unet")):
        leaves = jax.tree.leaves(tree)
        largest = max(leaves, key=lambda x: x.size)
        shard = largest.addressable_shards[0].data
        assert "fsdp" in largest.sharding.spec, name
        assert shard.size * 8 == largest.size, (name, largest.shape, shard.shape)
    # Adam's moments follow their parameters; the whole trainable state is split ~8 ways.
    total = sum(x.nbytes for x in jax.tree.leaves(state8.params))
    assert shd.array_bytes_per_device(state8.params) < 0.2 * total
    assert speed.flops_per_step and speed.flops_per_step > 0

    _, _, loss1, speed1 = _run_steps(_tiny_rdeic_config(1))
    np.testing.assert_allclose(loss8, loss1, rtol=2e-4)
    assert loss1[0] != loss1[1]
    # XLA's FLOPs per device: the 8-device program does about an eighth of the work.
    assert 0.08 < speed.flops_per_step / speed1.flops_per_step < 0.3


# --- Gradient accumulation ---------------------------------------------------------------------


@register("test_sharding_autoencoder")
class _Autoencoder(Method):
    """A deterministic MSE autoencoder (analysis/synthesis transforms): its loss is a mean over
    examples, so micro-batch gradients average to the whole batch's."""

    console_metrics = ("mse",)

    def __init__(self, config):
        super().__init__(config)

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return SynthesisTransform(8)(AnalysisTransform(8, 8)(x))

        self.model = Net()

    def init(self, rng, batch):
        return self.model.init(rng, to_float(batch["image"]))

    def loss(self, params, frozen, state, batch, rng):
        x = to_float(batch["image"])
        mse = jnp.mean(jnp.square(self.model.apply({"params": params}, x) - x))
        return mse, {"mse": mse, "loss": mse}, state

    def evaluate(self, variables, images, valid_hw, rng):
        x = to_float(images)
        recon = self.model.apply({"params": variables.params}, x)
        h, w = valid_hw
        mse = jnp.mean(jnp.square(recon - x)[:, :h, :w], axis=(1, 2, 3))
        return {"mse": mse}, to_uint8(recon[:, :h, :w])


def test_gradient_accumulation_equals_the_whole_batch():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    results = {}
    for accum in (1, 4):
        config = base_config("test_sharding_autoencoder", "tiny")
        config.update(batch_size=32, grad_accum_steps=accum, total_steps=10)
        config.data.crop_size = 32
        config.mesh.shape = (1, -1, 1)
        run = loop_step(config)
        state, metrics = run.step(run.state, run.frozen, run.batch(image))
        results[accum] = (jax.device_get(metrics), jax.device_get(state.params))
    (m1, p1), (m4, p4) = results[1], results[4]
    print("accumulation parity:", {k: (float(m1[k]), float(m4[k])) for k in ("loss", "grad_norm")})
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro-batches"):
        config.batch_size = 24
        train.check_batch(config, shd.create_mesh((1, -1, 1)))


# --- Remat, bf16, throughput -------------------------------------------------------------------


def test_remat_policies_keep_values_and_bf16_keeps_fp32_master_weights():
    kw = dict(  # one level: resnets and attention down, mid and up, at half the compile time
        TINY_UNET,
        block_out_channels=(16,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        attention_head_dim=(2,),
        cross_attention_dim=8,
        norm_num_groups=4,
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 8))
    params = train.jit_init(UNet(UNetConfig(**kw)).init, jax.random.key(2), x, jnp.ones(2), ctx)

    def grads(config):
        f = lambda p: jnp.sum(UNet(config).apply(p, x, jnp.ones(2), ctx).astype(jnp.float32) ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    ref_value, ref_grads = grads(UNetConfig(**kw))
    for remat in (True, "resnet=dots_no_batch,attention=full"):
        value, g = grads(UNetConfig(**kw, remat=remat))
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grads), strict=True):
            # Recomputation reorders float32 sums: compare against each leaf's own scale.
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    with pytest.raises(ValueError, match="unknown remat policy"):
        layers.remat_policy("sometimes", "resnet")
    value, g = grads(UNetConfig(**kw, dtype="bfloat16"))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(g))  # fp32 master weights
    np.testing.assert_allclose(value, ref_value, rtol=0.05)


def test_flops_count_loop_trips_and_known_peaks():
    w = jnp.ones((64, 32))

    def chain(x):  # a 4-step scan: XLA's cost analysis counts its body once
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w @ w.T), None), x, None, length=4)[0]

    traced = jax.jit(chain).trace(jax.ShapeDtypeStruct((128, 64), jnp.float32))
    compiled = traced.lower().compile()
    expected = 4 * 2 * (2 * 128 * 64 * 32)
    assert tput.step_flops(compiled, traced.jaxpr) == pytest.approx(expected, rel=0.05)
    assert tput.peak_tflops("TPU v5 lite") == 197.0
    assert tput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert tput.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert tput.peak_tflops("cpu") is None
    assert tput.peak_tflops("cpu", 2.0) == 2.0
    values = tput.Throughput(8, 1e12, 100.0).at(2.0)
    assert values == {"examples_per_sec": 16.0, "tflops_per_device": 2.0, "mfu": 0.02}


def test_shardings_report_prints_every_parameter(capsys):
    from jaxcodec import cli

    assert (
        cli.main(["shardings", "--config", "configs/hfd.py:tiny", "--mesh", "1,8,1", "--top", "0"])
        == 0
    )
    out = capsys.readouterr().out
    assert "g_a/Conv_0/kernel" in out and "(None, None, None, fsdp)" in out
    assert "optimiser state" in out and "per device" in out
