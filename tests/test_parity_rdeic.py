"""RDEIC's importer against the official PyTorch modules (RDEIC b179274): the compressor
(``Compression``) and the control adapter (``NoiseEstimator`` driving an LDM UNet of the same
code, random ``scale_list`` and run-time ``control_scale`` 0.7), built from the public code at
a small size with every weight perturbed; reference inputs, state dicts and outputs of every
stage are in tests/data/parity/ (written by the make_rdeic_*.py scripts there, never in CI).
The state dicts go through `jaxcodec.weights.rdeic.from_official`, what `jaxcodec
import-weights --format rdeic` runs, and a bare ``Compression`` through the command itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_files import DATA, close, f32, reference

from jaxcodec.nn.control import ControlAdapterConfig, ControlledUNet
from jaxcodec.nn.latent_compressor import LatentCompressor, LatentCompressorConfig
from jaxcodec.weights import diffusers as dw
from jaxcodec.weights import rdeic

# The small official modules in jaxcodec's configs (tests/data/parity/make_rdeic_*.py).
COMPRESSOR = LatentCompressorConfig(
    in_channels=16, out_channels=4, N=16, M=16, groups=(16,), num_codes=32, res_blocks=(4, 3)
)
ADAPTER = ControlAdapterConfig.rdeic(size_ratio=0.25, head_channels=4, hint_channels=16)


@pytest.fixture(scope="module")
def unet():
    """The base UNet (diffusers layout, as --sd gives it): (config, params)."""
    return dw.load_unet(DATA / "rdeic_adapter" / "unet")


def test_compressor_matches_the_official(unet):
    """A bare ``Compression`` state dict: every stage of the eval forward; the adapter is
    reported absent and CompressAI's CDF buffers skipped by name."""
    meta, ref = reference("rdeic_compression")
    assert meta["commit"] == "b179274"
    state = rdeic.read_checkpoint(DATA / "rdeic_compression" / "weights.safetensors")
    params, variables, report = rdeic.from_official(state, COMPRESSOR, unet[0], ADAPTER)
    assert report["absent"] == ["adapter"] and set(params) == {"compressor"}
    (skipped,) = report["skipped"].values()
    assert skipped == sorted(k for k in state if k.startswith("gaussian_conditional."))

    def stages(m, h):
        y, z = m.analyse(h)
        vq = m.vq(z, train=False)
        hyper = m.hyper_synthesis(vq.z_q)
        y_hat, lik = m.context(y, hyper, train=False)
        z_c, hint = m.synthesise(y_hat)
        return dict(y=y, z=z, indices=vq.indices, z_q=vq.z_q, hyper=hyper, y_hat=y_hat,
                    likelihoods=lik, hint=hint, z_c=z_c)  # fmt: skip

    out = jax.jit(LatentCompressor(COMPRESSOR).apply, static_argnames="method")(
        {"params": params["compressor"], **variables}, f32(ref["a.h"]), method=stages
    )
    np.testing.assert_array_equal(out.pop("indices"), ref["a.indices"])
    for name, got in out.items():
        close(got, ref[f"a.{name}"], name)


@pytest.fixture(scope="module")
def controlled(unet):
    """(jitted ε and control features of the ControlledUNet, imported adapter, report, ref)."""
    meta, ref = reference("rdeic_adapter")
    state = rdeic.read_checkpoint(DATA / "rdeic_adapter" / "weights.safetensors")
    config, unet_params = unet
    params, _, report = rdeic.from_official(
        state, COMPRESSOR, config, ADAPTER, control_scale=meta["control_scale"]
    )
    model = ControlledUNet(config, ADAPTER)

    @jax.jit
    def forward(adapter, x, t, context, hint):
        variables = {"params": {"unet": unet_params, "adapter": adapter}}
        eps, state = model.apply(variables, x, t, context, hint, capture_intermediates=True)
        cap = state["intermediates"]["adapter"]
        ctrl = [cap["conv_in"]["__call__"][0]]
        for level in range(len(config.block_out_channels)):
            block = cap[f"down_blocks_{level}"]
            ctrl.append(block["attentions_0" if "attentions_0" in block else "resnets_0"])
            if "downsamplers" in block:
                ctrl.append(block["downsamplers"])
        ctrl = [c["__call__"][0] if isinstance(c, dict) else c for c in ctrl]
        mid = cap["mid_block"]["__call__"][0][1]
        return eps, ctrl, mid

    inputs = [f32(ref["a.x"]), jnp.asarray(ref["a.t"]), f32(ref["a.context"])]
    inputs.append(f32(ref["a.hint"]))
    return forward, params["adapter"], report, ref, state, inputs


def test_controlled_unet_matches_the_official(controlled):
    """ε of the NoiseEstimator-driven UNet (scale_list × control_scale folded into the zero
    convolutions), and the control branch's output of every input block and of its middle."""
    forward, adapter, report, ref, state, inputs = controlled
    assert report["absent"] == ["compressor"] and report["skipped"] == {}
    scales = np.asarray(state[rdeic.SCALE_LIST_KEY], np.float64) * 0.7
    np.testing.assert_allclose(report["scales"], sorted(set(scales)))
    eps, ctrl, mid = forward(adapter, *inputs)
    n_blocks = sum(k.startswith("a.control.input_blocks.") for k in ref)
    assert len(ctrl) == n_blocks
    for i, got in enumerate(ctrl):
        close(got, ref[f"a.control.input_blocks.{i}"], f"control input block {i}")
    close(mid, ref["a.control.middle_block"], "control middle block")
    close(eps, ref["a.eps"], "controlled ε")


def test_the_scales_matter(controlled, unet):
    """Folding nothing (or only the biases, the old importer) misses the official ε by far."""
    forward, adapter, _, ref, state, inputs = controlled
    unit = {**state, rdeic.SCALE_LIST_KEY: np.ones_like(state[rdeic.SCALE_LIST_KEY])}
    plain, _, _ = rdeic.from_official(unit, COMPRESSOR, unet[0], ADAPTER)
    eps, _, _ = forward(plain["adapter"], *inputs)
    err = np.abs(np.asarray(eps) - ref["a.eps"]).max() / np.abs(ref["a.eps"]).max()
    assert err > 1e-2
    # and zeroed zero convolutions give the plain UNet: ε_sd of the official forward
    zero = {**state, rdeic.SCALE_LIST_KEY: np.zeros_like(state[rdeic.SCALE_LIST_KEY])}
    off, _, _ = rdeic.from_official(zero, COMPRESSOR, unet[0], ADAPTER)
    close(forward(off["adapter"], *inputs)[0], ref["a.eps_sd"], "plain UNet ε")


def test_full_lightning_state_dict_lists_every_skipped_key(unet):
    """Both modules under their Lightning prefixes, with SD parts and schedule buffers."""
    comp = rdeic.read_checkpoint(DATA / "rdeic_compression" / "weights.safetensors")
    ne = rdeic.read_checkpoint(DATA / "rdeic_adapter" / "weights.safetensors")
    state = {rdeic.COMPRESSION_PREFIX + k: v for k, v in comp.items()}
    state |= {rdeic.NOISE_ESTIMATOR_PREFIX + k: v for k, v in ne.items()}
    sd = {f"model.diffusion_model.input_blocks.{i}.0.weight": np.zeros(1) for i in range(50)}
    state |= sd | {"cond_stage_model.model.ln_final.weight": np.zeros(1), "betas": np.zeros(3)}
    params, _, report = rdeic.from_official(state, COMPRESSOR, unet[0], ADAPTER)
    assert set(params) == {"compressor", "adapter"} and report["absent"] == []
    skipped = report["skipped"]
    assert sorted(skipped[rdeic.SKIP_REASONS["model.diffusion_model."]]) == sorted(sd)
    assert skipped[rdeic.SKIP_REASONS["schedule"]] == ["betas"]
    rebuilt = skipped[rdeic.SKIP_REASONS["rebuilt"]]
    assert rebuilt and all(k.startswith("preprocess_model.gaussian_conditional.") for k in rebuilt)
    from jaxcodec.importers import describe_skipped

    lines = describe_skipped(skipped, limit=10)
    assert any(line.startswith("skipped 50 keys (frozen SD UNet") for line in lines)
    assert any("betas" in line for line in lines)


def test_import_weights_takes_a_bare_compressor(tmp_path, capsys):
    """`jaxcodec import-weights --format rdeic` of the official ``Compression`` alone: a codec
    bundle whose compressor is the official one and whose adapter starts fresh (zero
    convolutions: the plain SD UNet), and a report that says so."""
    from jaxcodec.checkpoint import load_bundle
    from jaxcodec.cli import main
    from jaxcodec.methods import get_method

    config = tmp_path / "rdeic_small.py"
    config.write_text(
        "from jaxcodec.configlib import load_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = load_config('configs/rdeic.py:tiny,stage=2')\n"
        "    c.model.compressor.update(\n"
        "        dict(N=16, M=16, groups=(16,), num_codes=32, res_blocks=(4, 3))\n"
        "    )\n"
        "    return c\n"
    )
    src, out = DATA / "rdeic_compression" / "weights.safetensors", tmp_path / "codec.safetensors"
    argv = ["import-weights", str(src), str(out), "--format", "rdeic", "--config", str(config)]
    assert main([*argv, "--control-scale", "0.5"]) == 0
    report = capsys.readouterr().out
    assert "adapter: not in the checkpoint (a bare Compression state dict): starts fresh" in report
    assert "gaussian_conditional._quantized_cdf" in report
    bundle = load_bundle(out)
    m = get_method(bundle.config)
    state = rdeic.read_checkpoint(src)
    imported, _, _ = rdeic.from_official(state, m.compressor_config, m.unet_config, ADAPTER)
    jax.tree.map(np.testing.assert_array_equal, bundle.params["compressor"], imported["compressor"])
    zero = [a for p, a in jax.tree_util.tree_leaves_with_path(bundle.params["adapter"])
            if "to_base" in jax.tree_util.keystr(p)]  # fmt: skip
    assert zero and not any(np.any(a) for a in zero)
    codebook = bundle.state["vq_stats"]["vq"]["codebook"]
    np.testing.assert_array_equal(codebook, state["quantize.embedding.weight"])
