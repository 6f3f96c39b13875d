"""Integer CDF tables, scale-index selection and the fixed-point entropy-parameter networks."""

import flax.linen as nn
import intnet_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from jaxcodec.entropy import fixedpoint, tables
from jaxcodec.nn.hyperprior import (
    H_S_SPEC,
    MeanScaleHyperprior,
    factorized_entropy_tables,
    gaussian_entropy_tables,
)
from jaxcodec.train_shapes import jit_init


def _check_valid(t):
    total = 1 << tables.PRECISION
    for i, n in enumerate(t["lengths"]):
        f = t["freqs"][i, : n + 1]
        assert f.min() >= 1 and f.sum() == total  # every symbol and the escape codable


def test_gaussian_tables_match_the_discretised_gaussian():
    t = gaussian_tables = tables.gaussian_tables()
    _check_valid(t)
    assert len(t["scales"]) == 64
    np.testing.assert_allclose(t["scales"][[0, -1]], [0.11, 256.0])
    # Table 40: integer frequencies / 2^16 ≈ bin masses of N(0, σ²).
    i = 40
    sigma, off, n = t["scales"][i], t["offsets"][i], t["lengths"][i]
    k = np.arange(off, off + n)
    pmf = ndtr((k + 0.5) / sigma) - ndtr((k - 0.5) / sigma)
    np.testing.assert_allclose(t["freqs"][i, :n] / 2.0**16, pmf, atol=2.0 / 2**16)
    assert gaussian_tables["offsets"][-1] < -1500  # σ=256 tables reach ±6σ


def test_pmf_to_freqs_keeps_every_symbol_and_the_sum():
    f = tables.pmf_to_freqs(np.array([1.0, 0.0, 1e-12, 0.5]), tail=0.0)
    assert f.min() >= 1 and f.sum() == 2**16 and f[0] > f[3] > f[1]


def test_scale_index_is_integer_and_picks_the_first_scale_not_below():
    t = gaussian_entropy_tables()
    thr = t["thresholds"]
    scales = np.array([-5.0, 0.0, 0.11, 0.5, 3.0, 255.9, 256.0, 1e4])
    q = fixedpoint.to_fixed(scales)
    idx = tables.scale_index(q, thr)
    for s, i in zip(fixedpoint.from_fixed(q), idx, strict=True):  # the scale as quantised
        if s <= t["scales"][-1]:
            assert t["scales"][i] >= s
            assert i == 0 or t["scales"][i - 1] < s
        else:
            assert i == len(thr) - 1
    # Boundaries are exact integer comparisons: threshold itself maps to its table.
    np.testing.assert_array_equal(tables.scale_index(thr, thr), np.arange(len(thr)))
    np.testing.assert_array_equal(tables.scale_index(thr + 1, thr)[:-1], np.arange(1, len(thr)))


@pytest.fixture(scope="module")
def hyperprior():
    model = MeanScaleHyperprior(N=16, M=24)

    def init(key):
        return model.init({"params": key}, jnp.zeros((1, 64, 64, 3)), train=False)

    # jit_init compiles initialisers for compile time (LLVM level 0 or 1 on a CPU): 2.0 s here
    # at level 1, against 6.1 s at level 2.
    params = jit_init(init, jax.random.key(0))["params"]  # without the logical-axis boxes
    return model, params


def test_factorized_tables_follow_the_bottleneck_density(hyperprior):
    model, params = hyperprior
    t = factorized_entropy_tables(jax.tree.map(np.asarray, params["entropy_bottleneck"]))
    _check_valid(t)
    # Compare with the JAX likelihood at the table's symbols for channel 3.
    c = 3
    n, off = t["lengths"][c], t["offsets"][c]
    med = fixedpoint.from_fixed(t["medians_q"])
    z = np.zeros((n, 16), np.float32)
    z[:, c] = med[c] + np.arange(off, off + n)
    lik = model.apply(
        {"params": params},
        jnp.asarray(z),
        method=lambda m, v: m.entropy_bottleneck.likelihood(v),
    )
    np.testing.assert_allclose(
        t["freqs"][c, :n] / 2.0**16, np.asarray(lik)[:, c], atol=n * 2.0**-15
    )


def _flax_conv(kind, features, k, s):
    if kind == "conv":
        return nn.Conv(features, (k, k), strides=(s, s), padding="SAME")
    return nn.ConvTranspose(features, (k, k), strides=(s, s), padding="SAME")


def _error_bound(layer, x_q, fan_in):
    """What int8 weights and a 15-bit input can cost per output channel (in float units):
    half a weight step on each of fan_in inputs, half an input step on Σ|W| weights, and the
    two roundings to the 2^-12 grid."""
    step = layer["mult"] / 2.0 ** layer["rshift"]
    shift = max(0, int(np.abs(x_q).max()).bit_length() - fixedpoint.INPUT_BITS)
    w_l1 = np.abs(layer["kernel"].astype(np.int64)).reshape(-1, step.size).sum(0) * step
    x_max = np.abs(x_q).max() / 4096.0
    return 0.5 * step * fan_in * x_max + 0.5 * 2.0 ** (shift - 12) * w_l1 + 2.0**-11


@pytest.mark.parametrize(
    "kind,k,s,hw", [("conv", 5, 2, (7, 6)), ("conv", 3, 1, (5, 4)), ("deconv", 5, 2, (3, 5))]
)
def test_integer_conv_matches_flax_within_its_quantisation_and_the_reference_exactly(
    kind, k, s, hw
):
    mod = _flax_conv(kind, 6, k, s)
    x = np.random.default_rng(0).normal(size=(1, *hw, 4)).astype(np.float32) * 3
    p = jit_init(mod.init, jax.random.key(2), jnp.asarray(x))["params"]
    ref = np.asarray(mod.apply({"params": p}, jnp.asarray(x)))[0]
    layer = fixedpoint.conv_layer(
        np.asarray(p["kernel"]), np.asarray(p["bias"]), s, kind == "deconv"
    )
    assert layer["kernel"].dtype == np.int8 and np.abs(layer["kernel"]).max() <= 127
    x_q = fixedpoint.to_fixed(x[0])
    out = fixedpoint.run({"000": layer}, x_q)
    assert out.dtype == np.int64 and out.shape == ref.shape
    err = np.abs(fixedpoint.from_fixed(out) - ref)
    assert np.all(err <= _error_bound(layer, x_q, k * k * 4))
    assert err.max() < 0.05  # about 1 % of these outputs
    np.testing.assert_array_equal(out, intnet_reference.run({"000": layer}, x_q))


def test_integer_h_s_matches_flax_and_is_exactly_reproducible(hyperprior):
    model, params = hyperprior
    net = fixedpoint.export_sequential(jax.tree.map(np.asarray, params["h_s"]), H_S_SPEC)
    z = np.round(np.random.default_rng(1).normal(size=(1, 2, 3, 16)) * 4)
    ref = np.asarray(
        model.apply({"params": params}, jnp.asarray(z, jnp.float32), method=lambda m, v: m.h_s(v))
    )
    zq = fixedpoint.to_fixed(z[0])
    out = fixedpoint.run(net, zq)
    np.testing.assert_array_equal(out, intnet_reference.run(net, zq))
    err = np.abs(fixedpoint.from_fixed(out) - ref[0])
    assert err.max() < 0.02 * np.abs(ref).max()
    # Integer arithmetic: permuting the input channels (and the kernel's matching rows)
    # changes the summation order but not a single bit; so does the batch it runs in.
    perm = np.random.default_rng(2).permutation(16)
    net2 = jax.tree.map(np.copy, net)
    net2["000"]["kernel"] = net["000"]["kernel"][:, :, perm]
    np.testing.assert_array_equal(fixedpoint.run(net2, zq[..., perm]), out)
    spec, arrays = fixedpoint.prepare(net)
    batch = np.stack([zq, 7 * zq, -zq]).astype(np.int32)  # each image its own input shift
    batched = jax.jit(fixedpoint.apply, static_argnums=0)(spec, arrays, batch)  # not op by op
    np.testing.assert_array_equal(np.asarray(batched)[0], out)


def test_worst_case_accumulators_stay_exact():
    """Σ|W| at the bound and inputs at the saturation limit: the int32 accumulator comes within
    1 % of 2^31 and must neither wrap nor lose the cancellation of opposite weights."""
    n = 1024
    kernel = np.full((1, 1, n, 2), 0.5)
    kernel[0, 0, n // 2 :, 1] = -0.5  # channel 1: half the weights cancel the other half
    layer = fixedpoint.conv_layer(kernel, np.array([0.0, 0.25]), 1)
    w = layer["kernel"].astype(np.int64)
    assert np.abs(w).sum(0).max() <= fixedpoint.L1_MAX
    x = np.full((1, 1, n), 2**40, np.int64)  # saturates to +ACT_LIMIT on entry
    assert (2**fixedpoint.INPUT_BITS - 1) * np.abs(w[..., 0]).sum() > 0.99 * 2**31
    out = fixedpoint.run({"000": layer}, x)
    np.testing.assert_array_equal(out, intnet_reference.run({"000": layer}, x))
    assert out[0, 0, 0] == fixedpoint.ACT_LIMIT  # 0.5 · 1024 · 65536 saturates, positive
    assert out[0, 0, 1] == 1024  # exactly the bias 0.25 on the 2^-12 grid


def test_stored_networks_that_could_overflow_are_refused():
    layer = fixedpoint.conv_layer(np.full((1, 1, 4, 1), 0.1), np.zeros(1), 1)
    tampered = dict(layer, kernel=np.full((33, 33, 128, 1), 127, np.int8))  # Σ|W| > L1_MAX
    with pytest.raises(fixedpoint.FixedPointOverflow, match="accumulator"):
        fixedpoint.prepare({"000": tampered})
    with pytest.raises(fixedpoint.FixedPointOverflow, match="shift"):
        fixedpoint.prepare({"000": dict(layer, rshift=np.array([3], np.int32))})
    with pytest.raises(fixedpoint.FixedPointOverflow, match="malformed"):
        fixedpoint.prepare({"000": dict(layer, kernel=layer["kernel"].astype(np.int16))})


def test_weights_that_do_not_fit_the_grid_are_refused():
    with pytest.raises(fixedpoint.FixedPointOverflow, match="int32"):
        fixedpoint.conv_layer(np.full((1, 1, 1, 1), 1e6), np.zeros(1), 1)
    with pytest.raises(fixedpoint.FixedPointOverflow, match="bias"):
        fixedpoint.conv_layer(np.zeros((1, 1, 1, 1)), np.full(1, 1e9), 1)
    with pytest.raises(fixedpoint.FixedPointOverflow, match="non-finite"):
        fixedpoint.conv_layer(np.full((1, 1, 1, 1), np.nan), np.zeros(1), 1)


def test_networks_stored_by_format_2_bundles_are_requantised_on_load():
    """Bundles written before the integer networks hold int32 kernels on 2^-14 and biases on
    2^-26: they load, as the int8 layer of the same weights."""
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(size=(3, 3, 5, 7)) * 0.2, rng.normal(size=7) * 0.1
    legacy = {
        "kind": np.array(fixedpoint.KIND_CODES["conv"], np.int32),
        "stride": np.array(2, np.int32),
        "kernel": fixedpoint.to_fixed(kernel, 14).astype(np.int32),
        "bias": fixedpoint.to_fixed(bias, 26),
    }
    (spec,), (arrays,) = fixedpoint.prepare({"000": legacy})
    want = fixedpoint.conv_layer(legacy["kernel"] / 2.0**14, legacy["bias"] / 2.0**26, 2)
    assert spec == ("conv", 2)
    for key in ("kernel", "mult", "rshift", "bias"):
        np.testing.assert_array_equal(arrays[key], want[key])
    x_q = fixedpoint.to_fixed(rng.normal(size=(6, 5, 5)))
    np.testing.assert_array_equal(
        fixedpoint.run({"000": legacy}, x_q), fixedpoint.run({"000": want}, x_q)
    )
