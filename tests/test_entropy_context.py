"""ELIC-style space–channel context: causality of the two checkerboard passes and channel
groups, training forward, fixed-point parity and exact coding round trips in a fresh process."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_codec import ROOT, make_workdir, photo, tiny_config

from jaxcodec.codec import load_codec
from jaxcodec.entropy import context, fixedpoint
from jaxcodec.methods import get_method
from jaxcodec.train import jit_init

GROUPS = (4, 4, 16)


def test_channel_groups_are_validated():
    assert context.channel_groups(320) == (16, 16, 32, 64, 192)
    assert sum(context.channel_groups(256)) == 256 and len(context.channel_groups(256)) == 10
    with pytest.raises(ValueError):
        context.channel_groups(24, (4, 4))
    with pytest.raises(ValueError):
        context.channel_groups(17)


@pytest.fixture(scope="module")
def ctx_model():
    model = context.SpaceChannelContext(GROUPS)
    y = jax.random.normal(jax.random.key(0), (1, 6, 6, 24)) * 3
    hyper = jax.random.normal(jax.random.key(1), (1, 6, 6, 48))

    def init(key):
        return model.init({"params": key}, y, hyper, train=False)

    params = jit_init(init, jax.random.key(2))["params"]  # without the logical-axis boxes
    return model, params, y, hyper


def test_context_is_causal(ctx_model):
    """Anchors see no non-anchor of their group; no group sees later groups."""
    model, params, y, hyper = ctx_model
    apply = jax.jit(lambda v: model.apply({"params": params}, v, hyper, train=False)[1])
    lik = lambda v: np.asarray(apply(v))  # noqa: E731
    base = lik(y)
    anchors = context.anchor_mask(6, 6)
    # Change group 1's non-anchors (channels 4..7): group 0 and group 1's anchors unchanged.
    delta = np.zeros(y.shape, np.float32)
    delta[0][~anchors, 4:8] = 5.0
    moved = lik(y + delta)
    np.testing.assert_array_equal(moved[..., :4], base[..., :4])
    np.testing.assert_array_equal(moved[0][anchors, 4:8], base[0][anchors, 4:8])
    assert not np.allclose(moved[..., 8:], base[..., 8:])  # later groups do see it
    # Non-anchors of group 1 depend on its anchors (spatial context).
    delta = np.zeros(y.shape, np.float32)
    delta[0][anchors, 4:8] = 5.0
    moved = lik(y + delta)
    assert not np.allclose(moved[0][~anchors, 4:8], base[0][~anchors, 4:8])


def test_training_forward_has_finite_rate_gradients(ctx_model):
    model, params, y, hyper = ctx_model

    def rate(p):
        _, lik = model.apply({"params": p}, y, hyper, train=True, key=jax.random.key(3))
        return -jnp.sum(jnp.log2(lik))

    value, grads = jax.jit(jax.value_and_grad(rate))(params)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["param_2"]["layer_2"]["kernel"])).sum() > 0


def test_fixed_point_coding_matches_the_float_model(ctx_model):
    """Host coding with the fixed-point nets reproduces the float model's y_hat up to the
    fixed-point error, and decoding returns exactly the encoded latents."""
    from jaxcodec.entropy import coder
    from jaxcodec.nn.hyperprior import gaussian_entropy_tables

    model, params, y, hyper = ctx_model
    y_hat_ref = np.asarray(model.apply({"params": params}, y, hyper, train=False)[0])[0]
    nets = context.export(jax.tree.map(np.asarray, params), GROUPS)
    tabs = gaussian_entropy_tables()
    hyper_q = fixedpoint.to_fixed(np.asarray(hyper)[0])
    enc = coder.new_encoder()
    y_hat_q, sym, idx = context.code(nets, tabs, hyper_q, y=np.asarray(y)[0], encoder=enc)
    data = coder.finish(enc)
    dec_q, dec_sym, dec_idx = context.code(nets, tabs, hyper_q, decoder=coder.new_decoder(data))
    np.testing.assert_array_equal(dec_q, y_hat_q)
    np.testing.assert_array_equal(dec_idx, idx)
    # The first groups match to the integer networks' precision (int8 weights with a step per
    # output channel: about 1 % of the parameters); later ones can inherit a rounding flip
    # (y − μ within that error of a .5 boundary) through the channel context.
    err = np.abs(fixedpoint.from_fixed(y_hat_q) - y_hat_ref)
    assert err[..., :8].max() < 3e-2
    assert (err < 1e-2).mean() > 0.6


def test_elic_checkpoint_roundtrip_in_a_fresh_single_thread_process(tmp_path):
    config = tiny_config("elic")
    config.model.context_groups = GROUPS
    method = get_method(config)
    params = jit_init(method.init, jax.random.key(0), method.dummy_batch(1))["params"]
    from jaxcodec.codec import save_codec

    workdir = tmp_path / "elic"
    save_codec(workdir, config, params, step=1)
    codec = load_codec(workdir)
    image = photo(100, 130)
    data = codec.compress(image)
    symbols = codec.last_info["y_symbols"]
    out = codec.decompress(data)
    np.testing.assert_array_equal(codec.last_info["y_symbols"], symbols)
    (tmp_path / "a.jxc").write_bytes(data)
    script = (
        "import sys, numpy as np\n"
        "from jaxcodec.codec import load_codec\n"
        "c = load_codec(sys.argv[1]); im = c.decompress(open(sys.argv[2], 'rb').read())\n"
        "np.savez(sys.argv[3], image=im, symbols=c.last_info['y_symbols'])\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    res = tmp_path / "res.npz"
    subprocess.run(
        [sys.executable, "-c", script, str(workdir), str(tmp_path / "a.jxc"), str(res)],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    r = np.load(res)
    np.testing.assert_array_equal(r["symbols"], symbols)
    np.testing.assert_array_equal(r["image"], out)


def test_hyperprior_and_elic_configs_build():
    assert make_workdir  # shared helper (used by the codec tests)
    for name in ("hyperprior", "elic"):
        c = tiny_config(name)
        if name == "elic":
            c.model.context_groups = GROUPS
        assert get_method(c).model.context_groups == (GROUPS if name == "elic" else ())
