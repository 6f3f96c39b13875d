"""Vector-quantised hyper latent: nearest codes, straight-through gradients, EMA updates,
dead-code restarts, and index coding at a fixed 14 bits or with a frequency table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcodec.entropy import coder, fixedpoint, vq

K, D = 16, 4


@pytest.fixture(scope="module")
def setup():
    model = vq.VectorQuantizer(num_codes=K, dim=D, decay=0.5, dead_threshold=0.1)
    z = jax.random.normal(jax.random.key(0), (2, 3, 5, D))
    variables = model.init({"params": jax.random.key(1)}, z, train=False)
    return model, z, variables


def test_nearest_code_and_commitment(setup):
    model, z, variables = setup
    out = model.apply(variables, z, train=False)
    cb = np.asarray(variables["vq_stats"]["codebook"])
    flat = np.asarray(z).reshape(-1, D)
    ref = np.argmin(((flat[:, None] - cb[None]) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(np.asarray(out.indices).ravel(), ref)
    np.testing.assert_allclose(np.asarray(out.z_q).reshape(-1, D), cb[ref], atol=1e-6)
    np.testing.assert_allclose(out.loss, 0.25 * np.mean((flat - cb[ref]) ** 2), rtol=1e-5)
    assert model.index_bits == 4 and vq.VectorQuantizer(num_codes=16384).index_bits == 14


def test_straight_through_gradient(setup):
    model, z, variables = setup
    g = jax.grad(lambda v: jnp.sum(model.apply(variables, v, train=False).z_q * 3.0))(z)
    np.testing.assert_allclose(g, np.full(z.shape, 3.0))


def test_ema_update_and_dead_code_restart(setup):
    model, z, variables = setup
    out, new = model.apply(
        variables, z, train=True, mutable=["vq_stats"], rngs={"vq_restart": jax.random.key(5)}
    )
    idx = np.asarray(out.indices).ravel()
    flat = np.asarray(z).reshape(-1, D)
    old = jax.tree.map(np.asarray, variables["vq_stats"])
    counts = np.bincount(idx, minlength=K).astype(np.float64)
    count = 0.5 * old["ema_count"] + 0.5 * counts
    sums = np.zeros((K, D))
    np.add.at(sums, idx, flat)
    total = 0.5 * old["ema_sum"] + 0.5 * sums
    n = count.sum()
    expected = total / ((count + 1e-5) / (n + K * 1e-5) * n)[:, None]
    cb = np.asarray(new["vq_stats"]["codebook"])
    used = counts > 0
    np.testing.assert_allclose(cb[used], expected[used], rtol=1e-4, atol=1e-5)
    # Restart: an unused code whose average count falls below the threshold jumps onto an
    # encoder output of the batch; used codes with enough mass do not.
    unused = np.flatnonzero(counts == 0)
    assert unused.size
    stats = dict(old, ema_count=old["ema_count"].copy())
    stats["ema_count"][unused[0]] = 0.01  # → 0.005 after decay, below 0.1
    _, state = model.apply(
        {"vq_stats": stats},
        z,
        train=True,
        mutable=["vq_stats"],
        rngs={"vq_restart": jax.random.key(7)},
    )
    final = jax.tree.map(np.asarray, state["vq_stats"])
    row = final["codebook"][unused[0]]
    assert final["ema_count"][unused[0]] == 1.0
    assert np.min(np.abs(flat - row).sum(-1)) == 0.0  # exactly an encoder output
    np.testing.assert_allclose(final["codebook"][used], expected[used], rtol=1e-4, atol=1e-5)


def test_read_only_without_mutable(setup):
    model, z, variables = setup
    out = model.apply(variables, z, train=True)  # no mutable: no update, no error
    assert out.indices.shape == z.shape[:-1]


@pytest.mark.parametrize("mode", ["fixed", "table"])
def test_index_coding_roundtrip(mode):
    rng = np.random.default_rng(0)
    k = 16384
    stats = {
        "codebook": rng.normal(size=(k, 8)).astype(np.float32),
        "ema_count": rng.gamma(0.5, size=k).astype(np.float32) + 1e-6,
    }
    tabs = vq.vq_tables(stats, mode=mode)
    idx = rng.integers(0, k, (6, 7))
    enc = coder.new_encoder()
    vq.encode_indices(enc, tabs, idx)
    data = coder.finish(enc)
    out = vq.decode_indices(coder.new_decoder(data), tabs, idx.shape)
    np.testing.assert_array_equal(out, idx)
    if mode == "fixed":
        assert len(data) <= -(-14 * idx.size // 8) + 4  # 14 bits per index
    np.testing.assert_array_equal(
        vq.dequantize_indices(tabs, out), fixedpoint.to_fixed(stats["codebook"][idx])
    )
