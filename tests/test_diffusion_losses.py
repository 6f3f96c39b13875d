"""ε/v/x0 conversions, loss weightings and the relay residual forward process."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcodec import diffusion as dd

SCHED = dd.scaled_linear_schedule()
SHAPE = (4, 6, 6, 3)


def _draw(seed, n=3, shape=SHAPE):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, shape, jnp.float32) for k in keys]


def _alpha_sigma(kind):
    if kind == "discrete":
        return SCHED.alpha_sigma(jnp.asarray([0, 250, 600, 999]))
    return dd.ShiftedCosineSchedule(eta=0.5).alpha_sigma(jnp.asarray([0.02, 0.3, 0.7, 0.97]))


# --------------------------------------------------------------------------------------------
# Parameterisations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_conversions_round_trip(time):
    x0, eps = _draw(0, 2)
    alpha, sigma = _alpha_sigma(time)
    z = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    v = dd.from_x0_eps(x0, eps, "v", alpha, sigma)
    np.testing.assert_allclose(
        v, alpha[:, None, None, None] * eps - sigma[:, None, None, None] * x0, rtol=1e-6
    )
    preds = {"eps": eps, "x0": x0, "v": v}
    for src, dst in itertools.product(preds, preds):
        out = dd.convert(preds[src], src, dst, z, alpha, sigma)
        # float32: converting through x0 at σ ≈ 0.03 (t = 0) amplifies rounding by α/σ ≈ 34
        np.testing.assert_allclose(out, preds[dst], atol=5e-5, err_msg=f"{src}->{dst}")
        back = dd.convert(out, dst, src, z, alpha, sigma)
        np.testing.assert_allclose(back, preds[src], atol=5e-5, err_msg=f"{src}->{dst}->{src}")
    x0_v, eps_v = dd.to_x0_eps(v, "v", z, alpha, sigma)
    np.testing.assert_allclose(x0_v, x0, atol=1e-5)
    np.testing.assert_allclose(eps_v, eps, atol=1e-5)
    with pytest.raises(ValueError):
        dd.convert(v, "score", "eps", z, alpha, sigma)


def test_conversions_accept_scalar_alpha_sigma():
    x0, eps = _draw(1, 2)
    alpha, sigma = SCHED.alpha_sigma(300)
    z = alpha * x0 + sigma * eps
    np.testing.assert_allclose(dd.convert(eps, "eps", "x0", z, alpha, sigma), x0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Regression losses and weightings
# --------------------------------------------------------------------------------------------


def _loss_setup(seed=2):
    x0, eps, noise = _draw(seed)
    alpha, sigma = _alpha_sigma("continuous")
    z = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    return x0, eps, noise, z, alpha, sigma


def test_perfect_prediction_has_zero_loss():
    x0, eps, _, z, alpha, sigma = _loss_setup()
    for prediction, target, weighting in itertools.product(
        ("eps", "v", "x0"), ("eps", "v", "x0"), ("none", "min_snr", "v")
    ):
        pred = dd.from_x0_eps(x0, eps, prediction, alpha, sigma)
        loss = dd.regression_loss(
            pred, prediction=prediction, z_t=z, x0=x0, eps=eps, alpha=alpha, sigma=sigma,
            target=target, weighting=weighting,
        )  # fmt: skip
        assert loss.shape == (SHAPE[0],)
        np.testing.assert_allclose(loss, 0.0, atol=1e-8)


def test_weightings_are_target_space_independent():
    x0, eps, noise, z, alpha, sigma = _loss_setup()
    pred = eps + 0.3 * noise  # an imperfect ε-prediction
    kw = dict(prediction="eps", z_t=z, x0=x0, eps=eps, alpha=alpha, sigma=sigma)
    unweighted = {t: dd.regression_loss(pred, target=t, **kw) for t in ("eps", "v", "x0")}
    snr = np.asarray(alpha**2 / sigma**2)
    # ‖ε̂-ε‖² = snr·‖x̂0-x0‖²,  ‖v̂-v‖² = (1+snr)·‖x̂0-x0‖²
    np.testing.assert_allclose(unweighted["eps"], snr * unweighted["x0"], rtol=1e-4)
    np.testing.assert_allclose(unweighted["v"], (1 + snr) * unweighted["x0"], rtol=1e-4)
    for weighting in ("min_snr", "eps", "v", "x0"):
        per_target = [
            dd.regression_loss(pred, target=t, weighting=weighting, **kw)
            for t in ("eps", "v", "x0")
        ]
        np.testing.assert_allclose(per_target[0], per_target[1], rtol=1e-4)
        np.testing.assert_allclose(per_target[0], per_target[2], rtol=1e-4)
    # the v-loss-equivalent weighting of an ε loss is the plain v loss
    v_equiv = dd.regression_loss(pred, target="eps", weighting="v", **kw)
    np.testing.assert_allclose(v_equiv, unweighted["v"], rtol=1e-4)
    # min-SNR-γ on an ε target: min(snr, γ)/snr (Hang et al. 2023)
    gamma = 5.0
    min_snr = dd.regression_loss(pred, target="eps", weighting="min_snr", min_snr_gamma=gamma, **kw)
    np.testing.assert_allclose(min_snr, np.minimum(snr, gamma) / snr * unweighted["eps"], rtol=1e-5)
    with pytest.raises(ValueError):
        dd.loss_weight(alpha, sigma, "eps", "p2")


def test_diffusion_training_sample_is_the_forward_process():
    x0 = _draw(3, 1)[0]
    for sched in (SCHED, dd.ShiftedCosineSchedule(eta=0.5)):
        z, t, eps, alpha, sigma = dd.diffusion_training_sample(sched, x0, jax.random.key(4))
        np.testing.assert_allclose(z, sched.q_sample(x0, t, eps), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(alpha, sched.alpha_sigma(t)[0], rtol=1e-6)
    assert t.dtype == jnp.float32 and np.all((0 <= t) & (t <= 1))


# --------------------------------------------------------------------------------------------
# RDEIC relay residual forward process and loss
# --------------------------------------------------------------------------------------------

N_RELAY = 300


def test_relay_forward_closed_form():
    z0, z_c, eps = _draw(5)
    ab = np.asarray(SCHED.alphas_cumprod, np.float64)
    lam = np.sqrt(1 / ab[N_RELAY - 1] - 1)
    assert float(dd.relay_lambda(SCHED, N_RELAY)) == pytest.approx(lam, rel=1e-6)
    t = jnp.asarray([0, 57, 200, N_RELAY - 1])
    z_t, eps_tilde = dd.relay_forward(SCHED, z0, z_c, t, eps, N_RELAY)
    a = np.sqrt(ab[np.asarray(t)])[:, None, None, None]
    s = np.sqrt(1 - ab[np.asarray(t)])[:, None, None, None]
    z0n, zcn, epsn = (np.asarray(x, np.float64) for x in (z0, z_c, eps))
    np.testing.assert_allclose(eps_tilde, epsn + (zcn - z0n) / lam, rtol=1e-5, atol=1e-5)
    expected = a * z0n + s * epsn + s * (zcn - z0n) / lam
    np.testing.assert_allclose(z_t, expected, rtol=1e-5, atol=1e-5)
    # at t = N - 1 the forward process lands exactly on the sampler's start latent
    start = dd.relay_start_latent(SCHED, z_c, eps, N_RELAY)
    np.testing.assert_allclose(z_t[-1], start[-1], rtol=1e-5, atol=1e-5)


def test_relay_training_sample_statistics():
    """Random draws: t ~ U{0..N-1}; the noise inside ε̃ is standard normal; z_t closed form."""
    batch = 4096
    z0 = jnp.broadcast_to(jnp.linspace(-1, 1, 8), (batch, 8))
    z_c = z0 + 0.25
    z_t, t, eps_tilde = dd.relay_training_sample(SCHED, z0, z_c, jax.random.key(6), N_RELAY)
    t = np.asarray(t)
    assert t.min() >= 0 and t.max() <= N_RELAY - 1
    assert abs(t.mean() - (N_RELAY - 1) / 2) < 5 * N_RELAY / np.sqrt(12 * batch)
    eps = np.asarray(eps_tilde) - 0.25 / float(dd.relay_lambda(SCHED, N_RELAY))
    n = eps.size
    assert abs(eps.mean()) < 5 / np.sqrt(n)
    assert abs(eps.var() - 1) < 5 * np.sqrt(2 / n)
    a, s = (np.asarray(c)[:, None] for c in SCHED.alpha_sigma(jnp.asarray(t)))
    np.testing.assert_allclose(z_t, a * np.asarray(z0) + s * np.asarray(eps_tilde), atol=1e-5)


def test_relay_loss_is_x0_regression_of_the_network_eps():
    z0, z_c, eps = _draw(7)
    t = jnp.asarray([3, 90, 180, 299])
    z_t, eps_tilde = dd.relay_forward(SCHED, z0, z_c, t, eps, N_RELAY)
    delta = 0.1 * _draw(8, 1)[0]
    loss = dd.relay_loss(eps_tilde + delta, z_t, t, z0, eps_tilde, SCHED)
    a, s = (np.asarray(c, np.float64)[:, None, None, None] for c in SCHED.alpha_sigma(t))
    z0_hat = (np.asarray(z_t) - s * np.asarray(eps_tilde + delta)) / a
    expected = np.mean((z0_hat - np.asarray(z0)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, expected, rtol=1e-3)
    np.testing.assert_allclose(dd.relay_loss(eps_tilde, z_t, t, z0, eps_tilde, SCHED), 0, atol=1e-9)
    # ε̃ as the target instead: the plain ε-MSE
    eps_loss = dd.relay_loss(eps_tilde + delta, z_t, t, z0, eps_tilde, SCHED, target="eps")
    np.testing.assert_allclose(eps_loss, np.mean(np.asarray(delta) ** 2, axis=(1, 2, 3)), rtol=1e-4)


def test_residual_shift_training_sample():
    sched = dd.resshift_schedule(15)
    z0, z_base = _draw(9, 2)
    z_t, t, eps = dd.residual_shift_training_sample(sched, z0, z_base, jax.random.key(10))
    assert np.all((np.asarray(t) >= 0) & (np.asarray(t) < 15))
    np.testing.assert_allclose(z_t, sched.q_sample(z0, z_base, t, eps), rtol=1e-6, atol=1e-6)
