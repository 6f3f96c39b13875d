"""Integer CDF tables, scale-index selection and the fixed-point entropy-parameter networks."""

import flax.linen as nn
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
    init = jax.jit(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)), train=False)
    )
    params = nn.unbox(init()["params"])  # host arrays, without the logical-axis boxes
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


@pytest.mark.parametrize(
    "kind,k,s,hw", [("conv", 5, 2, (7, 6)), ("conv", 3, 1, (5, 4)), ("deconv", 5, 2, (3, 5))]
)
def test_fixed_point_conv_matches_flax(kind, k, s, hw):
    mod = _flax_conv(kind, 6, k, s)
    x = np.random.default_rng(0).normal(size=(1, *hw, 4)).astype(np.float32) * 3
    p = mod.init(jax.random.key(2), jnp.asarray(x))["params"]
    ref = np.asarray(mod.apply({"params": p}, jnp.asarray(x)))[0]
    layer = fixedpoint.conv_layer(
        np.asarray(p["kernel"]), np.asarray(p["bias"]), s, kind == "deconv"
    )
    out = fixedpoint.run({"000": layer}, fixedpoint.to_fixed(x[0]))
    assert out.dtype == np.int64 and out.shape == ref.shape
    np.testing.assert_allclose(fixedpoint.from_fixed(out), ref, atol=3e-3)


def test_fixed_point_h_s_matches_flax_and_is_exactly_reproducible(hyperprior):
    model, params = hyperprior
    net = fixedpoint.export_sequential(jax.tree.map(np.asarray, params["h_s"]), H_S_SPEC)
    z = np.round(np.random.default_rng(1).normal(size=(1, 2, 3, 16)) * 4)
    ref = np.asarray(
        model.apply({"params": params}, jnp.asarray(z, jnp.float32), method=lambda m, v: m.h_s(v))
    )
    zq = fixedpoint.to_fixed(z[0])
    out = fixedpoint.run(net, zq)
    np.testing.assert_allclose(fixedpoint.from_fixed(out), ref[0], atol=5e-3)
    # Integer arithmetic held exactly in float64: permuting the input channels (and the
    # kernel's matching rows) changes the BLAS summation order but not a single bit.
    perm = np.random.default_rng(2).permutation(16)
    net2 = jax.tree.map(np.copy, net)
    net2["000"]["kernel"] = net["000"]["kernel"][:, :, perm]
    np.testing.assert_array_equal(fixedpoint.run(net2, zq[..., perm]), out)


def test_fixed_point_overflow_is_detected():
    layer = fixedpoint.conv_layer(np.full((1, 1, 1, 1), 1000.0), np.zeros(1), 1)
    with pytest.raises(fixedpoint.FixedPointOverflow):
        fixedpoint.run({"000": layer}, np.full((1, 1, 1), 2**39))


def test_fixed_point_partial_sums_are_bounded_before_the_product():
    """Weights of opposite signs cancel in the result but not in BLAS's partial sums: the
    bound must see max|x| · Σ|w|, not the final accumulator."""
    kernel = np.array([100_000.0, -100_000.0]).reshape(1, 1, 2, 1)
    layer = fixedpoint.conv_layer(kernel, np.zeros(1), 1)
    x = np.full((1, 1, 2), 2**39, np.int64)  # x·w cancels to exactly 0
    with pytest.raises(fixedpoint.FixedPointOverflow, match="partial sums"):
        fixedpoint.run({"000": layer}, x)
    small = np.full((1, 1, 2), 2**20, np.int64)
    assert fixedpoint.run({"000": layer}, small).item() == 0


def test_weights_that_do_not_fit_the_grid_are_refused():
    with pytest.raises(fixedpoint.FixedPointOverflow, match="int32"):
        fixedpoint.conv_layer(np.full((1, 1, 1, 1), 1e6), np.zeros(1), 1)
    with pytest.raises(fixedpoint.FixedPointOverflow, match="bias"):
        fixedpoint.conv_layer(np.zeros((1, 1, 1, 1)), np.full(1, 1e9), 1)
    with pytest.raises(fixedpoint.FixedPointOverflow, match="non-finite"):
        fixedpoint.conv_layer(np.full((1, 1, 1, 1), np.nan), np.zeros(1), 1)
