"""Samplers with oracle denoisers, compile caching, gradients through fixed-step chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jaxcodec import diffusion as dd
from jaxcodec.diffusion.schedules import _bcast

SCHED = dd.scaled_linear_schedule()
SHAPE = (2, 8, 8, 4)


def _key(seed):
    """Stochastic samplers take any key; "rbg" keys compile in ~0.3 s on XLA:CPU where the
    default threefry takes ~3 s per compile, which would dominate this file's time budget."""
    return jax.random.key(seed, impl="rbg")


def _rand(seed, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _point_mass_denoiser(x_star, prediction, alpha_sigma):
    """Exact denoiser of the data distribution δ(x*): x̂0 = x*, expressed as ``prediction``."""

    def denoise(z, t):
        alpha, sigma = alpha_sigma(t)
        eps = (z - _bcast(alpha, z) * x_star) / _bcast(sigma, z)
        return dd.from_x0_eps(x_star, eps, prediction, alpha, sigma)

    return denoise


# --------------------------------------------------------------------------------------------
# Point mass: every sampler returns the point, in any number of steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,step_counts,eta", [("eps", (1, 50), 0.0), ("v", (3,), 0.0), ("x0", (7,), 1.0)]
)
def test_ddim_point_mass_any_steps(prediction, step_counts, eta):
    x_star = 0.8 * _rand(1)
    den = _point_mass_denoiser(x_star, prediction, SCHED.alpha_sigma)
    z_T = _rand(2)
    for num_steps in step_counts:
        # eta = 1 is ancestral DDPM: the injected noise is removed again by the exact denoiser
        out = dd.ddim_sample(
            den, SCHED, z_T, _key(3), num_steps=num_steps, eta=eta, prediction=prediction
        )
        np.testing.assert_allclose(out, x_star, atol=2e-5)


@pytest.mark.parametrize("num_steps,eta", [(1, 0.0), (6, 1.0)])
def test_continuous_v_sampler_point_mass(num_steps, eta):
    sched = dd.ShiftedCosineSchedule(eta=0.5)
    x_star = 0.5 * _rand(4)
    den = _point_mass_denoiser(x_star, "v", sched.alpha_sigma)
    out = dd.continuous_sample(den, sched, _rand(5), _key(6), num_steps=num_steps, eta=eta)
    np.testing.assert_allclose(out, x_star, atol=2e-5)


def test_bfloat16_state_keeps_its_dtype():
    x_star = (0.8 * _rand(1)).astype(jnp.bfloat16)
    den = _point_mass_denoiser(x_star.astype(jnp.float32), "v", SCHED.alpha_sigma)
    out = dd.ddim_sample(den, SCHED, _rand(2).astype(jnp.bfloat16), num_steps=4, prediction="v")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), x_star.astype(jnp.float32), atol=2e-2)


# --------------------------------------------------------------------------------------------
# Gaussian data: mean and variance over many draws
# --------------------------------------------------------------------------------------------


def _predicted_variance(ts, m_var, eta, schedule):
    """Exact output variance of the discrete chain with the exact Gaussian denoiser.

    With data N(m, s²) everything is linear: if u = z_t - α_t m then x̂0 - m = α_t s²/v_t · u,
    ε̂ = σ_t/v_t · u (v_t = α_t² s² + σ_t²) and the move gives
    z_s - α_s m = (α_s α_t s² + d σ_t)/v_t · u + c·n, with d = sqrt(σ_s² - c²).
    DDIM's (η = 0) factor is cos(Δθ) of the angle θ = atan(σ/(α s)), so the chain shrinks the
    variance by Π cos²(Δθ_i): an O(1/S) discretisation bias, not a sampling error.
    """
    ab = np.asarray(schedule.alphas_cumprod, np.float64)
    s2 = m_var
    var = ab[ts[0]] * s2 + 1 - ab[ts[0]]
    for i, t in enumerate(ts):
        a_t, s_t = np.sqrt(ab[t]), np.sqrt(1 - ab[t])
        ab_s = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        a_s, s_s = np.sqrt(ab_s), np.sqrt(1 - ab_s)
        v_t = a_t**2 * s2 + s_t**2
        c2 = eta**2 * (s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2)
        d = np.sqrt(max(s_s**2 - c2, 0.0))
        var = ((a_s * a_t * s2 + d * s_t) / v_t) ** 2 * var + c2
    return var


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_gaussian_data_mean_and_variance(eta):
    m, s = 0.5, 0.8
    n_draws = 2**18

    def denoise(z, t):  # E[x0 | z_t] for x0 ~ N(m, s²), as an x0-prediction
        alpha, sigma = (_bcast(c, z) for c in SCHED.alpha_sigma(t))
        return m + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (z - alpha * m)

    num_steps = 50
    ts = dd.spaced_timesteps(num_steps, 1000, "trailing")
    a_T, s_T = (float(c) for c in SCHED.alpha_sigma(int(ts[0])))
    z_T = a_T * m + np.sqrt(a_T**2 * s**2 + s_T**2) * _rand(7, (1024, 256))
    out = dd.ddim_sample(
        denoise, SCHED, z_T, _key(8), num_steps=num_steps, eta=eta, prediction="x0"
    )
    out = np.asarray(out, np.float64).ravel()
    assert out.size == n_draws

    # Mean: the chain is affine and the denoiser exact, so E[out] = m at any step count.
    sd_mean = np.sqrt(out.var() / n_draws)
    assert abs(out.mean() - m) < 5 * sd_mean

    # Variance: 5 standard errors of a sample variance, sqrt(2/n)·var.
    predicted = _predicted_variance(ts, s**2, eta, SCHED)
    tol = 5 * np.sqrt(2.0 / n_draws) * predicted
    assert abs(out.var() - predicted) < tol, (out.var(), predicted, tol)
    # ... and that discrete-chain variance is the data's up to the known 50-step bias.
    assert 0.85 * s**2 < predicted <= s**2


# --------------------------------------------------------------------------------------------
# RDEIC relay residual sampling with the oracle ε̃
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [2, 5])
def test_relay_sampler_oracle_returns_z0(num_steps):
    n_relay = 300
    z0, z_c, eps = _rand(10), _rand(11), _rand(12)
    z_N = dd.relay_start_latent(SCHED, z_c, eps, n_relay)
    _, eps_tilde = dd.relay_forward(SCHED, z0, z_c, n_relay - 1, eps, n_relay)

    # (a) the fixed true ε̃ of this draw: exact along the deterministic (η = 0) path
    def fixed_oracle(z, t):
        return jnp.broadcast_to(eps_tilde, z.shape)

    out = dd.relay_sample(
        fixed_oracle, SCHED, z_N, relay_start=n_relay, num_steps=num_steps, eta=0.0
    )
    np.testing.assert_allclose(out, z0, atol=1e-5)

    # (b) the ε̃ consistent with the current state (knowing z_0): exact for DDPM (η = 1) as well
    def state_oracle(z, t):
        return (z - _bcast(SCHED.sqrt_ab(t), z) * z0) / _bcast(SCHED.sqrt_1mab(t), z)

    out = dd.relay_sample(
        state_oracle, SCHED, z_N, _key(13), relay_start=n_relay, num_steps=num_steps
    )
    np.testing.assert_allclose(out, z0, atol=1e-5)


def test_relay_sampler_visits_rdeic_timesteps():
    seen = []

    def recorder(z, t):
        jax.debug.callback(lambda tt: seen.append(int(tt[0])), t)
        return jnp.zeros_like(z)

    dd.relay_sample(recorder, SCHED, _rand(14), relay_start=300, num_steps=5, eta=0.0)
    jax.effects_barrier()
    assert seen == [299, 224, 150, 75, 0]
    with pytest.raises(ValueError):  # "leading" would start at 240, not where z_N lives
        dd.relay_sample(recorder, SCHED, _rand(14), relay_start=300, num_steps=5, spacing="leading")


# --------------------------------------------------------------------------------------------
# Guidance, consistency, residual shifting
# --------------------------------------------------------------------------------------------


def test_guidance_endpoints_are_exact():
    z, t = _rand(20), jnp.full((SHAPE[0],), 500, jnp.int32)
    eps_sd = lambda z, t: jnp.sin(z) + 1e-3 * t[:, None, None, None]
    eps_theta = lambda z, t: 0.3 * z - 2.0
    g0 = dd.guided_denoiser(eps_sd, eps_theta, 0.0)
    g1 = dd.guided_denoiser(eps_sd, eps_theta, 1.0)
    g2 = dd.guided_denoiser(eps_sd, eps_theta, 2.5)
    assert np.array_equal(np.asarray(g0(z, t)), np.asarray(eps_sd(z, t)))
    np.testing.assert_allclose(g1(z, t), eps_theta(z, t), atol=1e-6)
    np.testing.assert_allclose(
        g2(z, t), eps_sd(z, t) + 2.5 * (eps_theta(z, t) - eps_sd(z, t)), rtol=1e-6
    )
    # inside a jitted sampler, λ_s = 0 reproduces the unguided sampler bit for bit
    a = dd.ddim_sample(g0, SCHED, z, num_steps=3)
    b = dd.ddim_sample(eps_sd, SCHED, z, num_steps=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_consistency_sampler_two_steps():
    boundary = dd.ConsistencyBoundary()
    x_star = _rand(30)

    def oracle(z, t):  # F that makes f(z_t, t) = x* exactly
        c_skip, c_out = (_bcast(c, z) for c in boundary.scalings(t))
        return (x_star - c_skip * z) / c_out

    c_hat = x_star + 0.1 * _rand(31)
    for ts in ([699, 299], [499, 99]):
        z = dd.consistency_start_latent(SCHED, c_hat, ts[0])
        out = dd.consistency_sample(oracle, SCHED, z, jnp.asarray(ts))
        np.testing.assert_allclose(out, x_star, atol=2e-5)

    # a non-oracle F, checked against the two steps written out by hand
    F = lambda z, t: 0.5 * z + 0.1
    ts = [599, 199]
    z = dd.consistency_start_latent(SCHED, c_hat, ts[0])
    out = dd.consistency_sample(F, SCHED, z, jnp.asarray(ts))
    zz = np.asarray(z, np.float64)
    ab = np.asarray(SCHED.alphas_cumprod, np.float64)
    for i, t in enumerate(ts):
        s = 10.0 * t
        c_skip, c_out = 0.25 / (s * s + 0.25), s / np.sqrt(s * s + 0.25)
        f = c_skip * zz + c_out * (0.5 * zz + 0.1)
        if i + 1 == len(ts):
            expected = f
        else:
            eps = (zz - np.sqrt(ab[t]) * f) / np.sqrt(1 - ab[t])
            zz = np.sqrt(ab[ts[i + 1]]) * f + np.sqrt(1 - ab[ts[i + 1]]) * eps
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_residual_shift_one_step():
    sched = dd.resshift_schedule(15, min_noise_level=0.04, etas_end=0.8, kappa=2.0, power=0.3)
    z_base, eps = _rand(40), _rand(41)
    seen_t = []

    def den(z, t):  # records the state the network sees and returns it shifted by t
        jax.debug.callback(lambda tt: seen_t.append(int(tt[0])), t)
        return z + t[:, None, None, None].astype(z.dtype)

    n0 = dd.residual_shift_sample.jitted._cache_size()
    for t in (14, 3):
        out = dd.residual_shift_sample(den, sched, z_base, eps, t)
        expected = z_base + 2.0 * sched.sqrt_etas[t] * eps + t
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    jax.effects_barrier()
    assert seen_t == [14, 3]
    # the start level is traced: one compile serves every rate point
    assert dd.residual_shift_sample.jitted._cache_size() == n0 + 1
    # default start is the last index T - 1
    expected = z_base + 2.0 * sched.sqrt_etas[14] * eps + 14
    out = dd.residual_shift_sample(den, sched, z_base, eps)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_sampler_runs_on_a_batch_sharded_over_devices():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x_star = _rand(60, (8, 4, 4, 2))
    z = _rand(61, (8, 4, 4, 2))
    den = _point_mass_denoiser(x_star, "eps", SCHED.alpha_sigma)
    z_sharded = jax.device_put(z, NamedSharding(mesh, PartitionSpec("data")))
    out = dd.relay_sample(den, SCHED, z_sharded, _key(62), num_steps=2)
    np.testing.assert_allclose(out, x_star, atol=1e-5)
    assert len(out.sharding.device_set) == 8


# --------------------------------------------------------------------------------------------
# Compile caching
# --------------------------------------------------------------------------------------------


def test_sampler_compiles_once_per_step_count():
    traces = {"n": 0}

    def apply(params, z, t):
        traces["n"] += 1  # runs only while tracing
        return params["w"] * z + params["b"]

    params = {"w": jnp.float32(0.1), "b": jnp.float32(0.0)}
    before = dd.ddim_sample.jitted._cache_size()
    z = _rand(50)
    dd.ddim_sample(Partial(apply, params), SCHED, z, num_steps=4)
    assert traces["n"] == 1
    # new inputs, new parameters, a new guidance weight: no retrace
    params2 = {"w": jnp.float32(0.2), "b": jnp.float32(0.3)}
    dd.ddim_sample(Partial(apply, params2), SCHED, _rand(51), num_steps=4)
    assert traces["n"] == 1
    assert dd.ddim_sample.jitted._cache_size() == before + 1
    for lam in (0.0, 1.5):
        dd.ddim_sample(
            dd.guided_denoiser(Partial(apply, params), Partial(apply, params2), lam),
            SCHED, z, num_steps=4,
        )  # fmt: skip
    assert traces["n"] == 3  # the guided combinator traced once (two denoiser calls)
    # a different step count compiles once more
    dd.ddim_sample(Partial(apply, params), SCHED, z, num_steps=6)
    dd.ddim_sample(Partial(apply, params2), SCHED, z, num_steps=6)
    assert traces["n"] == 4
    assert dd.ddim_sample.jitted._cache_size() == before + 3

    # consistency sampling: the (traced) start step does not recompile either
    n0 = dd.consistency_sample.jitted._cache_size()
    for ts in ([600, 300], [400, 100], [900, 10]):
        dd.consistency_sample(Partial(apply, params), SCHED, z, jnp.asarray(ts))
    assert dd.consistency_sample.jitted._cache_size() == n0 + 1


# --------------------------------------------------------------------------------------------
# Gradients through a fixed-step chain
# --------------------------------------------------------------------------------------------


def _toy_eps(theta, z, t):
    return jnp.tanh(theta["w"] * z + theta["b"] * (t[:, None, None, None] / 1000.0)) + theta["c"]


@pytest.mark.parametrize("sampler", ["relay", "continuous"])
def test_two_step_chain_gradient_matches_finite_differences(sampler):
    with jax.enable_x64(True):
        sched64 = dd.scaled_linear_schedule(dtype=jnp.float64)
        theta = {"w": jnp.float64(0.7), "b": jnp.float64(-0.4), "c": jnp.float64(0.05)}
        z_T = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 2)))
        target = jnp.asarray(np.random.default_rng(1).normal(size=z_T.shape))
        key = _key(0)

        def loss(theta, z_T, remat=False):
            den = Partial(_toy_eps, theta)
            if sampler == "relay":
                out = dd.relay_sample(
                    den, sched64, z_T, key, relay_start=300, num_steps=2, eta=1.0, remat=remat
                )
            else:
                cos = dd.ShiftedCosineSchedule(eta=0.5)
                out = dd.continuous_sample(
                    den, cos, z_T, key, num_steps=2, eta=1.0, prediction="v", remat=remat
                )
            return jnp.sum((out - target) ** 2)

        g_theta, g_z = jax.grad(loss, argnums=(0, 1))(theta, z_T)
        g_theta_r, g_z_r = jax.grad(lambda a, b: loss(a, b, remat=True), argnums=(0, 1))(theta, z_T)
        assert g_z.dtype == jnp.float64
        h = 1e-6
        for name in theta:
            up = dict(theta, **{name: theta[name] + h})
            dn = dict(theta, **{name: theta[name] - h})
            fd = (loss(up, z_T) - loss(dn, z_T)) / (2 * h)
            np.testing.assert_allclose(g_theta[name], fd, rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(g_theta_r[name], g_theta[name], rtol=1e-12)
        # directional derivative along a random direction in z_T
        v = jnp.asarray(np.random.default_rng(2).normal(size=z_T.shape))
        fd = (loss(theta, z_T + h * v) - loss(theta, z_T - h * v)) / (2 * h)
        np.testing.assert_allclose(jnp.vdot(g_z, v), fd, rtol=1e-6)
        np.testing.assert_allclose(g_z_r, g_z, rtol=1e-12)
