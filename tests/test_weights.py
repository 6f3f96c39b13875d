"""diffusers-format weights: full SD 2.1-base shapes, key mapping, errors, round trips."""

import json

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes
import numpy as np
import pytest

from jaxcodec.nn.control import ControlAdapterConfig, controlled_param_shapes  # noqa: E402
from jaxcodec.nn.unet import SD21_BASE_UNET, UNetConfig, unet_param_shapes  # noqa: E402
from jaxcodec.nn.vae import SD21_BASE_VAE, AutoencoderKL, VAEConfig, vae_param_shapes  # noqa: E402
from jaxcodec.weights import diffusers as dw  # noqa: E402


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dw.nn.meta.unbox(tree)))


def _torch_shapes(shapes) -> dict:
    """The state dict jaxcodec would export for ``shapes`` (key -> torch shape), no data."""
    flat = dw._flatten(shapes)
    return {dw.flax_path_to_key(p): dw._torch_shape(tuple(v.shape), p[-1]) for p, v in flat.items()}


@pytest.fixture(scope="module")
def sd21():
    unet = UNetConfig.from_diffusers(SD21_BASE_UNET)
    vae = VAEConfig.from_diffusers(SD21_BASE_VAE)
    return unet, vae, unet_param_shapes(unet), vae_param_shapes(vae)


def test_sd21_base_parameter_counts(sd21):
    unet, _, unet_shapes, vae_shapes = sd21
    assert unet.heads == (5, 10, 20, 20)  # 64-channel heads
    assert _count(unet_shapes) == 865_910_724
    assert _count(vae_shapes) == 83_653_863
    adapter = dw.nn.meta.unbox(controlled_param_shapes(unet, ControlAdapterConfig())["adapter"])
    # RDEIC's adapter: 0.2 x width, 16-channel heads, 256-channel hint concatenated with x_t.
    assert adapter["conv_in"]["kernel"].shape == (3, 3, 4 + 256, 64)
    assert _count(adapter) == ADAPTER_SD21_PARAMS


# Reported in the task report; pinned so that structural changes are noticed.
ADAPTER_SD21_PARAMS = 52_902_272


def test_sd21_base_keys_and_shapes_match_diffusers(sd21):
    """Same state-dict keys and shapes as diffusers' models (built on the meta device)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    _, _, unet_shapes, vae_shapes = sd21
    cfg = {k: v for k, v in SD21_BASE_UNET.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel(**cfg)
        ref_vae = diffusers.AutoencoderKL(
            **{k: v for k, v in SD21_BASE_VAE.items() if not k.startswith("_")}
        )
    for ref, shapes in [(ref_unet, unet_shapes), (ref_vae, vae_shapes)]:
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert _torch_shapes(shapes) == want


def test_key_mapping_examples():
    f = dw.flax_path_to_key
    assert (
        f(("down_blocks_0", "resnets_1", "conv1", "kernel"))
        == "down_blocks.0.resnets.1.conv1.weight"
    )
    assert (
        f(("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "bias"))
        == "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.bias"
    )
    assert f(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    assert f(("conv_norm_out", "scale")) == "conv_norm_out.weight"
    with pytest.raises(ValueError, match="no diffusers name"):
        f(("conv_in", "embedding"))


TINY_VAE = VAEConfig(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=4,
)


def _random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), dw.nn.meta.unbox(shapes)
    )


def test_loader_names_missing_unexpected_and_misshaped_keys():
    shapes = vae_param_shapes(TINY_VAE)
    state = dw.params_to_state_dict(_random_params(shapes))
    del state["encoder.conv_in.bias"]
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    state["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)  # should be 1x1
    with pytest.raises(dw.WeightsMismatchError) as info:
        dw.state_dict_to_params(state, shapes)
    msg = str(info.value)
    assert "missing keys (2)" in msg and "encoder.conv_in.bias" in msg
    assert "decoder.mid_block.attentions.0.to_q.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "quant_conv.weight (checkpoint (8, 8, 3, 3), model expects (8, 8, 1, 1))" in msg


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_export_import_round_trip(tmp_path, dtype):
    shapes = vae_param_shapes(TINY_VAE)
    params = _random_params(shapes, 1)
    max_shard = 20_000 if dtype == np.float32 else None  # also exercise sharding + index
    dw.write_folder(
        tmp_path, TINY_VAE.to_diffusers(), params, dtype=dtype, max_shard_bytes=max_shard
    )
    if max_shard:
        index = json.loads((tmp_path / (dw.WEIGHTS_NAME + ".index.json")).read_text())
        assert len(set(index["weight_map"].values())) > 1
    config, loaded = dw.load_vae(tmp_path)
    assert config == TINY_VAE
    want = jax.tree.map(lambda a: np.asarray(a.astype(dtype), np.float32), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, loaded)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
    # The loaded parameters run.
    out = AutoencoderKL(config).apply(
        {"params": loaded}, jnp.zeros((1, 4, 4, 4)), method=AutoencoderKL.decode
    )
    assert out.shape == (1, 8, 8, 3)


def test_missing_files_and_text_condition(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        dw.read_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        dw.read_folder(tmp_path)
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_prompt_embedding"):
        dw.load_text_condition(unet_dir)
    emb = np.random.default_rng(0).normal(size=(1, 77, 1024)).astype(np.float32)
    np.save(tmp_path / "empty_prompt_embedding.npy", emb)  # next to the model folders
    np.testing.assert_array_equal(dw.load_text_condition(unet_dir), emb)
    dw.write_safetensors({"embedding": emb[:, :5]}, unet_dir / "empty_prompt_embedding.safetensors")
    np.testing.assert_array_equal(dw.load_text_condition(unet_dir), emb[:, :5])


def test_parameters_carry_logical_axes(sd21):
    _, _, unet_shapes, _ = sd21
    specs = dw.nn.get_partition_spec(unet_shapes)
    block = specs["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert tuple(block["attn1"]["to_q"]["kernel"]) == ("embed", "heads")
    assert tuple(block["attn2"]["to_out_0"]["kernel"]) == ("heads", "embed")
    assert tuple(block["ff"]["net_0"]["proj"]["kernel"]) == ("embed", "mlp")
    assert tuple(block["ff"]["net_2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["conv_in"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(specs["conv_norm_out"]["scale"]) == ("norm",)
