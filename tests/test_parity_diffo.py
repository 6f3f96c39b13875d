"""DiffO's importers against the official PyTorch modules (DiffO dd56f49): the GT VQGAN, the
base-code autoencoder and the Swin-UNet, each built from the public code at a small size with
every weight perturbed; reference inputs, state dicts and outputs of every stage are in
tests/data/parity/ (written by the make_*.py scripts there, never in CI). The files go through
the importers `jaxcodec import-weights` runs, and then through the imported codec bundle."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_files import DATA, close, f32, reference

from jaxcodec.entropy import vq as vq_lib
from jaxcodec.nn import swin
from jaxcodec.nn.resshift import ResShiftDenoiser
from jaxcodec.nn.unet import UNetConfig
from jaxcodec.nn.vae import VAEConfig, VQModel
from jaxcodec.weights import taming

# The small official modules in jaxcodec's configs (tests/data/parity/make_diffo_*.py).
VQGAN = dict(  # taming VQModel: ch 32, ch_mult [1, 1], 1 resnet, attention at res 16, z 4
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=16,
    norm_num_groups=32,
    scaling_factor=1.0,
)
BASE = dict(  # EMAVQModelTorch: ch 32, ch_mult [1], 1 resnet, attention, 4 → 4, 16 codes
    in_channels=4,
    out_channels=4,
    block_out_channels=(32,),
    down_block_types=("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",),
    layers_per_block=1,
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=16,
    norm_num_groups=32,
    conv_in_channels=32,
    scaling_factor=1.0,
)
UNET = dict(  # UNetModelSwin: 32 channels × [1, 1], 1 resnet a level, Swin 32 wide, heads of 16
    in_channels=8,
    out_channels=4,
    block_out_channels=(32, 32),
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
    layers_per_block=1,
    attention_head_dim=(1, 1),
    cross_attention_dim=None,
    norm_num_groups=32,
    resnet_time_scale_shift="scale_shift",
    attention_block="swin",
    attention_layers="first",
    swin_embed_dim=32,
    swin_head_channels=16,
    swin_window_size=(4, 4),  # the official window_size (final_window_size only at 640 ch)
    swin_mid_window_size=2,  # final_window_size
    swin_depth=2,
    swin_mlp_ratio=4.0,
    swin_shift_mask="resshift",
)


def test_gt_vqgan_matches_the_official(tmp_path):
    """`import-weights --format vqgan` of taming's VQModel: encoder, encode, decode."""
    meta, ref = reference("diffo_vqgan")
    assert meta["commit"] == "dd56f49"
    config = VAEConfig(**VQGAN)
    info = taming.import_vqgan(DATA / "diffo_vqgan" / "weights.safetensors", tmp_path / "v", config)
    assert info["codebook"] == (16, 4) and info["skipped"] == {}
    params = taming.load_vqgan(tmp_path / "v", config)
    model, x = VQModel(config), f32(ref["a.x"])
    h = model.apply({"params": params}, x, method=lambda m, x: m.encoder(x)[1])
    z = model.apply({"params": params}, x, method="encode")
    rec = model.apply({"params": params}, f32(ref["a.z"]), method="decode")
    for got, name in ((h, "encoder"), (z, "z"), (rec, "decode")):
        close(got, ref[f"a.{name}"], name)


def test_base_autoencoder_matches_the_official():
    """The base-code EMAVQModelTorch: encode, nearest codes, decode of the codes."""
    meta, ref = reference("diffo_base")
    state = taming.read_checkpoint(DATA / "diffo_base" / "weights.safetensors")
    config = VAEConfig(**BASE)
    model = VQModel(config)
    template = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 4))))
    params, stage = taming.base_autoencoder_params(state, template["params"])
    np.testing.assert_array_equal(stage["codebook"], state["quantize.embedding.weight"])
    h = model.apply({"params": params}, f32(ref["a.z0"]), method="encode")
    close(h, ref["a.h"], "encode")
    rvq = vq_lib.ResidualVectorQuantizer(1, 16, 4)
    out = rvq.apply({vq_lib.COLLECTION: {"stage_0": stage}}, f32(ref["a.h"]), train=False)
    np.testing.assert_array_equal(np.asarray(out.indices)[..., 0], ref["a.indices"])
    z_q = vq_lib.residual_code(f32(ref["a.h"]), out.codes, 1)
    close(z_q, ref["a.z_q"], "z_q")
    close(model.apply({"params": params}, z_q, method="decode"), ref["a.decode"], "decode")


@pytest.fixture(scope="module")
def swin_unet():
    """(model, imported params, skipped keys, reference)."""
    meta, ref = reference("diffo_swin_unet")
    assert meta["args"]["image_size"] == 64 and meta["commit"] == "dd56f49"
    model = ResShiftDenoiser(UNetConfig(**UNET), lq_channels=4, noise_conditioning=False)
    x = jnp.zeros((1, 8, 8, 4))
    template = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros(1), x))
    state = taming.read_checkpoint(DATA / "diffo_swin_unet" / "weights.safetensors")
    params, skipped = taming.swin_unet_params(
        state, template["params"], layers_per_block=1, num_levels=2
    )
    return model, params, skipped, state, ref


def test_swin_unet_skips_only_the_recomputed_buffers(swin_unet):
    """Skipped by name: the relative-position indices and shift masks — equal to jaxcodec's."""
    *_, skipped, state, _ = swin_unet
    assert all(k.endswith(("relative_position_index", "attn_mask")) for k in skipped)
    assert len(skipped) == 15  # 5 Swin layers × 2 blocks' indices + 5 shifted blocks' masks
    for key in skipped:
        if key.endswith("attn_mask"):  # precomputed at image_size 64 for the level's size
            n_windows, tokens, _ = state[key].shape
            window = int(tokens**0.5)
            side = int((n_windows * tokens) ** 0.5)
            want = swin.shift_attention_mask(side, side, window, window // 2, "resshift")
            np.testing.assert_array_equal(want, state[key].astype(np.float32), err_msg=key)
        else:
            window = int(state[key].shape[0] ** 0.5)
            np.testing.assert_array_equal(swin.relative_position_index(window), state[key])


def _official_outputs(model, params, ref, case):
    """The denoiser's output and, by the official module's names, every block's output."""
    args = (f32(ref[f"{case}.x"]), jnp.asarray(ref[f"{case}.t"]), f32(ref[f"{case}.lq"]))
    apply = jax.jit(functools.partial(model.apply, capture_intermediates=True))
    out, state = apply({"params": params}, *args)
    cap = state["intermediates"]["unet"]

    def first(path):
        node = cap
        for p in path.split("/"):
            node = node[p]
        return node["__call__"][0]

    down = [first("conv_in")]
    for level in range(2):
        down += [first(f"down_blocks_{level}/attentions_0")]
        if level == 0:
            down += [first("down_blocks_0/downsamplers_0")]
    up = []
    for level in range(2):
        up += [first(f"up_blocks_{level}/attentions_0"), first(f"up_blocks_{level}/resnets_1")]
        if level == 0:
            up[-1] = first("up_blocks_0/upsamplers_0")  # the level's last block ends upsampled
    named = {f"input_blocks.{i}": v for i, v in enumerate(down)}
    named["middle_block"] = first("mid_block")
    named |= {f"output_blocks.{i}": v for i, v in enumerate(up)}
    return out, named


@pytest.mark.parametrize("case", ["a", "b", "c"])  # 2×8×24 (every block), 32×32, 64×64
def test_swin_unet_matches_the_official(swin_unet, case):
    model, params, _, _, ref = swin_unet
    out, blocks = _official_outputs(model, params, ref, case)
    if case == "a":
        stored = {k[2:] for k in ref if k.startswith("a.")} - {"x", "lq", "t", "out"}
        assert set(blocks) == stored
        for name, got in blocks.items():
            close(got, ref[f"a.{name}"], name)
    close(out, ref[f"{case}.out"], f"{case}: output")


def test_import_weights_diffo_builds_a_codec_of_the_official_modules(tmp_path, capsys, swin_unet):
    """`import-weights --format vqgan` then `--format diffo`: the bundle holds the parameters
    compared above (rate point 0, the official shift mask), and the report lists every
    skipped buffer by name."""
    from jaxcodec.checkpoint import load_bundle
    from jaxcodec.cli import main

    _, params, skipped, _, _ = swin_unet
    config = tmp_path / "diffo_small.py"
    config.write_text(
        "from jaxcodec.configlib import load_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = load_config('configs/diffo.py:tiny')\n"
        f"    c.model.vqgan.update({VQGAN!r})\n"
        f"    c.model.base.update({BASE!r})\n"
        f"    c.model.unet.update({dict(UNET, swin_shift_mask='full')!r})\n"
        "    c.model.lq_channels = 4\n"
        "    c.data.crop_size = 32\n"
        "    return c\n"
    )
    vqgan, out = tmp_path / "vqgan.safetensors", tmp_path / "diffo.safetensors"
    src = {m: str(DATA / m / "weights.safetensors") for m in ("diffo_vqgan", "diffo_base")}
    cfg = ["--config", str(config)]
    assert main(["import-weights", src["diffo_vqgan"], str(vqgan), "--format", "vqgan", *cfg]) == 0
    unet_src = str(DATA / "diffo_swin_unet" / "weights.safetensors")
    argv = ["import-weights", unet_src, str(out), "--format", "diffo", *cfg]
    assert main([*argv, "--base", src["diffo_base"], "--vqgan", str(vqgan)]) == 0
    report = capsys.readouterr().out
    assert "'full' → 'resshift'" in report and f"skipped {len(skipped)} (" in report
    assert all(key in report for key in skipped)
    bundle = load_bundle(out)
    assert bundle.config.model.unet.swin_shift_mask == "resshift"
    imported = bundle.params["denoiser"]
    jax.tree.map(np.testing.assert_array_equal, {k: imported[k] for k in params}, params)
    assert not any(np.any(a) for a in jax.tree.leaves(imported["noise_embedding"]))
    base = taming.read_checkpoint(src["diffo_base"])
    stage = bundle.state["vq_stats"]["rvq"]["stage_0"]
    np.testing.assert_array_equal(stage["codebook"], base["quantize.embedding.weight"])
    # an option of another format is refused by name, and no output is left behind
    assert main([*argv[:2], str(tmp_path / "x"), *argv[3:], "--sd", str(tmp_path)]) == 2
    assert "does not take --sd" in capsys.readouterr().err and not (tmp_path / "x").exists()
