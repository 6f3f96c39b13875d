"""DiffO's networks against the official ones: parameter counts of the full configs, every
official state-dict key importable with its shape, taming's VQGAN layout through a real torch
checkpoint against diffusers' VQModel, the Swin layer against a direct computation, the FiLM
resnet against diffusers, and a checkpoint that would run code if unpickled naively. Parity
with the official modules themselves: tests/test_parity_diffo.py."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxcodec.configlib import load_config  # noqa: E402
from jaxcodec.methods import get_method  # noqa: E402
from jaxcodec.metrics.weights import read_torch_state_dict  # noqa: E402
from jaxcodec.nn import swin  # noqa: E402
from jaxcodec.nn.resnet import ResnetBlock2D  # noqa: E402
from jaxcodec.nn.vae import VAEConfig, VQModel, vae_param_shapes  # noqa: E402
from jaxcodec.train import jit_init  # noqa: E402
from jaxcodec.weights import diffusers as dw  # noqa: E402
from jaxcodec.weights import taming  # noqa: E402

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official"


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def full():
    config = load_config("configs/diffo.py:full")
    config.model.vqgan_path = "unused.safetensors"
    method = get_method(config)
    shapes = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))
    return method, shapes


def test_full_config_has_the_official_parameter_counts(full):
    """Official counts (reference/official/diffo_summary.json), child by child."""
    method, shapes = full
    vqgan = vae_param_shapes(method.vqgan_config)
    assert {k: _count(v) for k, v in vqgan.items()} == {
        "encoder": 29_298_176,
        "decoder": 42_449_795,
        "quant_conv": 65_792,
        "post_quant_conv": 65_792,
    }
    assert _count(vqgan) + 16384 * 256 == 76_073_859  # + taming's codebook ("quantize")
    params, stats = shapes["params"], shapes["vq_stats"]["rvq"]
    base = {k: _count(v) for k, v in params["base"].items()}
    assert base == {
        "encoder": 21_813_376,
        "decoder": 30_176_000,
        "quant_conv": 65_792,
        "post_quant_conv": 65_792,
    }
    assert _count(stats["stage_0"]) == 131_328  # EMA codebook, counts, sums: the official
    denoiser = params["denoiser"]
    official_unet = _count(denoiser) - _count(denoiser["noise_embedding"])
    assert official_unet == 119_537_388
    assert _count(denoiser["unet"]) + _count(denoiser["conv_in_extended"]) == 119_537_388


def _official_state(name: str) -> dict[str, np.ndarray]:
    path = OFFICIAL / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    state = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        _, key, shape = line.split(" ", 2)
        dims = re.findall(r"\d+", shape.split(")")[0])
        state[key] = np.zeros(tuple(int(d) for d in dims), np.float32)
    return state


def test_every_official_key_imports_with_its_shape(full):
    method, shapes = full
    gt = _official_state("diffo_gt_vqgan_keys.txt")
    params, codebook = taming.vqgan_params(gt, method.vqgan_config)
    assert codebook.shape == (16384, 256) and _count(params) == 71_879_555
    unet = _official_state("diffo_unet_swin_keys.txt")
    autoencoder = _official_state("diffo_emavq_autoencoder_keys.txt")
    params, state, report = taming.diffo_params(
        unet, autoencoder, shapes["params"], layers_per_block=2, num_levels=4
    )
    # the 27 buffers (18 relative-position indices, 9 shift masks) are skipped by name
    (skipped,) = report["skipped"].values()
    assert len(skipped) == 27 and "input_blocks.1.1.blocks.1.attn_mask" in skipped
    unboxed = nn.unbox(shapes)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, unboxed["params"])
    # the official model has one VQ stage (rate point 0); later stages keep their init
    ours = jax.tree.map(np.shape, unboxed["vq_stats"]["rvq"]["stage_0"])
    assert jax.tree.map(np.shape, state["vq_stats"]["rvq"]["stage_0"]) == ours
    # the noise-level embedding (not in the official model) is zero: the import ignores it
    assert all(not np.any(x) for x in jax.tree.leaves(params["denoiser"]["noise_embedding"]))
    # a missing key is named
    del unet["middle_block.1.blocks.1.mlp.fc2.bias"]
    with pytest.raises(dw.WeightsMismatchError, match=r"mid_block\.attentions\.0\.blocks\.1"):
        taming.diffo_params(unet, autoencoder, shapes["params"], layers_per_block=2, num_levels=4)


# ---------------------------------------------------------------------------------------------
# taming's layout through a real torch checkpoint, against diffusers' VQModel
# ---------------------------------------------------------------------------------------------

TINY_VQ = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    latent_channels=8,
    vq_embed_dim=8,
    num_vq_embeddings=16,
    norm_num_groups=8,
)


def _taming_key(key: str, levels: int) -> str:
    """diffusers VQModel key → taming-transformers key (the layout of taming's checkpoints)."""
    up = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = key.replace("mid_block.attentions.0", "mid.attn_1")
    key = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", key)
    key = re.sub(r"down_blocks\.(\d+)\.attentions", r"down.\1.attn", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", key)
    key = re.sub(
        r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)",
        lambda m: f"up.{levels - 1 - int(m[1])}.{up[m[2]]}",
        key,
    )
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
        key = key.replace(old, new)
    return key.replace("to_out.0", "proj_out")


class _RunsCode:
    """Unpickling this naively runs a shell command (creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def taming_checkpoint(tmp_path_factory):
    ref = diffusers.VQModel(**TINY_VQ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = collections.OrderedDict()
    for key, value in ref.state_dict().items():
        if re.search(r"(attentions|attn)\.\d+\.to_(q|k|v|out\.0)\.weight$", key):
            value = value[:, :, None, None]  # taming's attention projections are 1×1 convs
        state[_taming_key(key, 3)] = value.clone()
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training-only
    root = tmp_path_factory.mktemp("taming")
    marker = root / "code_ran"
    ckpt = {
        "state_dict": state,
        "epoch": 3,
        "global_step": 1000,
        "callbacks": {"ModelCheckpoint": _RunsCode(marker), "path": root},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
    }
    path = root / "last.ckpt"
    torch.save(ckpt, path)
    assert not marker.exists()
    return ref, path, marker


def test_torch_checkpoints_are_read_without_running_their_code(taming_checkpoint):
    ref, path, marker = taming_checkpoint
    state = read_torch_state_dict(path)
    assert not marker.exists()
    expected = torch.load(path, weights_only=False)["state_dict"]
    assert marker.exists()  # torch.load ran it: the checkpoint really carries code
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value.numpy())


def test_imported_taming_vqgan_matches_diffusers(taming_checkpoint, tmp_path):
    ref, path, _ = taming_checkpoint
    config = VAEConfig(**TINY_VQ)
    info = taming.import_vqgan(path, tmp_path / "vqgan.safetensors", config)
    assert info["codebook"] == (16, 8)
    assert list(info["skipped"]) == [taming.LOSS_REASON]
    assert info["skipped"][taming.LOSS_REASON] and all(
        k.startswith("loss.") for k in info["skipped"][taming.LOSS_REASON]
    )
    params = taming.load_vqgan(tmp_path / "vqgan.safetensors", config)
    other = VAEConfig(**{**TINY_VQ, "layers_per_block": 2})
    with pytest.raises(Exception, match="another architecture"):
        taming.load_vqgan(tmp_path / "vqgan.safetensors", other)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        h_ref = ref.quant_conv(ref.encoder(x))
        y_ref = ref.decoder(ref.post_quant_conv(h_ref))
    model = VQModel(config)
    nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    h = jax.jit(lambda p, a: model.apply({"params": p}, a, method="encode"))(params, nhwc(x))
    np.testing.assert_allclose(h, nhwc(h_ref), atol=2e-4, rtol=2e-4)
    y = jax.jit(lambda p, a: model.apply({"params": p}, a, method="decode"))(params, nhwc(h_ref))
    np.testing.assert_allclose(y, nhwc(y_ref), atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Swin layer and FiLM resnet
# ---------------------------------------------------------------------------------------------


def _group_norm(x, scale, bias, groups, eps=1e-5):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _band(i: int, n: int, ws: int, shift: int) -> int:
    return 0 if i < n - ws else 1 if i < n - shift else 2


def _swin_block_reference(p, x, heads, ws, shift, mask, groups):
    """One Swin block token by token: the window of each query, relative-position bias, the
    shifted-window mask (regions in the rolled frame), MLP."""
    n, h, w, c = x.shape
    d = c // heads
    y = _group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], groups)
    y = np.roll(y, (-shift, -shift), axis=(1, 2))
    qkv = y @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]
    q, k, v = np.split(qkv.reshape(n, h, w, 3, heads, d), 3, axis=3)
    table = p["attn"]["relative_position_bias_table"]
    out = np.zeros((n, h, w, heads, d))
    for i in range(h):
        for j in range(w):
            keys = [
                (a, b)
                for a in range(i // ws * ws, i // ws * ws + ws)
                for b in range(j // ws * ws, j // ws * ws + ws)
            ]
            logits = np.stack(
                [np.einsum("nhd,nhd->nh", q[:, i, j, 0], k[:, a, b, 0]) for a, b in keys], -1
            )
            logits = logits / np.sqrt(d)
            for t, (a, b) in enumerate(keys):
                rel = (i % ws - a % ws + ws - 1) * (2 * ws - 1) + (j % ws - b % ws + ws - 1)
                logits[:, :, t] += table[rel]
                if shift and mask == "full":  # Swin's regions of the rolled frame
                    same = _band(i, h, ws, shift) == _band(a, h, ws, shift)
                    same &= _band(j, w, ws, shift) == _band(b, w, ws, shift)
                elif shift:  # ResShift's: the row band of the in-window column's row
                    top = i // ws * ws
                    same = _band(top + j % ws, h, ws, shift) == _band(top + b % ws, h, ws, shift)
                if shift and not same:
                    logits[:, :, t] += swin.MASK_VALUE
            prob = np.exp(logits - logits.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            out[:, i, j] = np.einsum(
                "nht,tnhd->nhd", prob, np.stack([v[:, a, b, 0] for a, b in keys])
            )
    out = out.reshape(n, h, w, c) @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"]
    x = x + np.roll(out, (shift, shift), axis=(1, 2))
    y = _group_norm(x, p["norm2"]["scale"], p["norm2"]["bias"], groups)
    fc1, fc2 = p["mlp"]["fc1"], p["mlp"]["fc2"]
    y = y @ fc1["kernel"][0, 0] + fc1["bias"]
    y = 0.5 * y * (1.0 + np.vectorize(__import__("math").erf)(y / np.sqrt(2.0)))
    return x + y @ fc2["kernel"][0, 0] + fc2["bias"]


@pytest.mark.parametrize("mask", ["full", "resshift"])
def test_swin_block_matches_a_direct_computation(mask):
    block = swin.SwinBlock(dim=16, heads=2, window=4, shift=2, groups=4, shift_mask=mask)
    x = jax.random.normal(jax.random.key(0), (1, 8, 12, 16))
    params = jit_init(block.init, jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda a: np.asarray(a, np.float64) * 3.0, params)  # sharp attention
    got = block.apply({"params": jax.tree.map(jnp.asarray, params)}, x)
    want = _swin_block_reference(params, np.asarray(x, np.float64), 2, 4, 2, mask, 4)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_scale_shift_resnet_matches_diffusers():
    from diffusers.models.resnet import ResnetBlock2D as TorchResnet

    ref = TorchResnet(
        in_channels=16, out_channels=32, temb_channels=24, groups=8, eps=1e-5,
        time_embedding_norm="scale_shift",
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x, temb = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 24, generator=g)
    block = ResnetBlock2D(32, groups=8, eps=1e-5, time_embedding_norm="scale_shift")
    template = jit_init(block.init, jax.random.key(0), jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 24)))
    params = dw.state_dict_to_params(
        {k: v.numpy() for k, v in ref.state_dict().items()}, template["params"]
    )
    got = block.apply(
        {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), temb.numpy()
    )
    with torch.no_grad():
        want = ref(x, temb).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_import_weights_cli_feeds_stage_two(tmp_path):
    """`jaxcodec import-weights --format vqgan` on a taming-layout checkpoint gives the file
    that `model.vqgan_path` loads as DiffO's frozen VQGAN, tensor for tensor."""
    from jaxcodec.cli import main

    config = load_config("configs/diffo.py:tiny")
    method = get_method(config)
    model = VQModel(method.vqgan_config)
    params = jit_init(model.init, jax.random.key(3), jnp.zeros((1, 16, 16, 3)))["params"]
    state = collections.OrderedDict()
    for key, value in dw.params_to_state_dict(params).items():
        if re.search(r"attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", key):
            value = value[:, :, None, None]
        state[_taming_key(key, 5)] = torch.from_numpy(np.ascontiguousarray(value))
    torch.save({"state_dict": state}, tmp_path / "taming.ckpt")
    out = tmp_path / "vqgan.safetensors"
    args = ["import-weights", str(tmp_path / "taming.ckpt"), str(out), "--format", "vqgan"]
    assert main([*args, "--config", "configs/diffo.py:tiny"]) == 0
    config.model.vqgan_path = str(out)
    loaded = get_method(config).pretrained()["vqgan"].load()
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
    # the wrong architecture (the full config's) is one clear error, and no output file
    assert main([*args[:2], str(tmp_path / "full.safetensors"), *args[3:]]) == 2
    assert not (tmp_path / "full.safetensors").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_full_config_losses_trace_at_the_official_crop(stage):
    """Both stages' full-size training losses, by shapes only (batch 1, 256-pixel crops)."""
    config = load_config(f"configs/diffo.py:full,stage={stage}")
    config.model.vqgan_path = "unused.safetensors"
    method = get_method(config)
    batch = method.dummy_batch(1)
    variables = jax.eval_shape(method.init, jax.random.key(0), batch)
    params = nn.unbox(variables.pop("params"))
    frozen = nn.unbox(method.abstract_frozen())
    loss, metrics, state = jax.eval_shape(
        method.loss, params, frozen, nn.unbox(variables), batch, jax.random.key(1)
    )
    assert loss.shape == () and {"mse", "lpips", "bpp"} <= set(metrics)
    assert jax.tree.map(np.shape, state) == jax.tree.map(np.shape, nn.unbox(variables))
