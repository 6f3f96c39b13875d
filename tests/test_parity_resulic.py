"""ResULIC's importer against the official PyTorch modules (ResULIC 1b014ef): the compressor
(``ELIC``) and the control adapter (``CDDM``: ControlModule + zero convs both ways, a random
``scale_list``) driving an LDM UNet of the same code, built from the public code at a small
size with every weight drawn from a seed; inputs, outputs and the seeded state dicts' entries
are in tests/data/parity/resulic_* (written by make_resulic_*.py there, never in CI). The state
dicts go through `jaxcodec.weights.resulic.from_official`, what `jaxcodec import-weights
--format resulic` runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from parity_files import close, f32, reference, seeded_state

from jaxcodec.nn.control import ControlAdapterConfig, ControlledUNet
from jaxcodec.nn.latent_compressor import LatentCompressor, LatentCompressorConfig
from jaxcodec.nn.unet import UNet, UNetConfig, unet_param_shapes
from jaxcodec.weights import diffusers as dw
from jaxcodec.weights import resulic


def _elic_config(args: dict) -> LatentCompressorConfig:
    return LatentCompressorConfig.elic(
        args["in_nc"],
        N=args["N"],
        M=args["M"],
        groups=tuple(args["slice_ch"]),
        enc_channels=args["enc_mid"][2],
    )


def test_elic_matches_the_official():
    """A bare ``ELIC`` state dict (its unused f_c reported as skipped): y, z_c and the
    likelihoods of y and z of the evaluation forward, on a non-square latent."""
    meta, ref = reference("resulic_elic")
    assert meta["commit"] == "1b014ef" and ref["x"].shape == (1, 48, 80, 4)
    config = _elic_config(meta["args"])
    params, report = resulic.from_official(seeded_state(meta), config)
    assert report["absent"] == [] and set(params) == {"compressor"}
    assert report["unused"] == sorted(resulic.f_c_shapes(config))
    model = LatentCompressor(config)

    def stages(m, x):
        out = m(x, train=False)
        return dict(y=m.analyse(x)[0], z_c=out.z_c, y_likelihoods=out.y_likelihoods,
                    z_likelihoods=out.z_likelihoods)  # fmt: skip

    out = jax.jit(model.apply, static_argnames="method")(
        {"params": params["compressor"]}, f32(ref["x"]), method=stages
    )
    for name, got in out.items():
        close(got, ref[name], name)


def test_cddm_matches_the_official():
    """The official CDDM driving the official LDM UNet vs jaxcodec's ControlledUNet with the
    imported adapter (the LDM UNet's weights through diffusers' converter, as --sd gives it)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    meta, ref = reference("resulic_cddm")
    state = seeded_state(meta)
    base = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    cddm = {k: v for k, v in state.items() if k not in base}
    unet_config = UNetConfig.from_diffusers(meta["unet_diffusers"])
    converted = convert_ldm_unet_checkpoint(base, meta["unet_diffusers"])
    unet = dw.state_dict_to_params(converted, unet_param_shapes(unet_config))
    a = meta["args"]["cddm"]
    adapter = ControlAdapterConfig.resulic(
        a["control_model_ratio"], a["num_head_channels"], a["hint_channels"]
    )
    params, report = resulic.from_official(cddm, None, unet_config, adapter)
    assert set(params) == {"adapter"} and len(report["scales"]) > 1  # folded scale_list
    x, hint, t, ctx = (f32(ref[k]) for k in ("x", "hint", "t", "context"))
    t = t.astype(np.int32)
    eps_base = jax.jit(UNet(unet_config).apply)({"params": unet}, x, t, ctx)
    v = {"params": {"unet": unet, "adapter": params["adapter"]}}
    eps = jax.jit(ControlledUNet(unet_config, adapter).apply)(v, x, t, ctx, hint)
    close(eps_base, ref["eps_base"], "eps_base")
    close(eps, ref["eps"], "eps")
    assert np.abs(ref["eps"] - ref["eps_base"]).max() > 0.1 * np.abs(ref["eps"]).max()


def test_export_imports_back_and_bad_keys_are_named():
    meta, _ = reference("resulic_elic")
    config = _elic_config(meta["args"])
    params, _ = resulic.from_official(seeded_state(meta), config)
    official = resulic.to_official(params, config, lightning=True)
    assert all(k.startswith("preprocess_model.") for k in official)
    again, report = resulic.from_official(official, config)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    assert "preprocess_model.f_c.0.weight" in report["unused"]
    official["preprocess_model.hyper_dec.hyper_dec.0.weight"] = np.zeros((1, 2, 5, 5))
    official["something.else"] = np.zeros(1)
    with pytest.raises(dw.WeightsMismatchError) as info:
        resulic.from_official(official, config)
    assert "hyper_dec.hyper_dec.0.weight (checkpoint (1, 2, 5, 5)" in str(info.value)
    assert "something.else" in str(info.value)
