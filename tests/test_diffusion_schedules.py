"""Schedules against their formulas and against diffusers (the numerical reference)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from jaxcodec import diffusion as dd

SCHED = dd.scaled_linear_schedule()
SD_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


# --------------------------------------------------------------------------------------------
# Stable Diffusion discrete schedule
# --------------------------------------------------------------------------------------------


def test_scaled_linear_matches_diffusers_and_formula():
    ref = DDPMScheduler(num_train_timesteps=1000, **SD_KW)
    np.testing.assert_allclose(SCHED.betas, ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(SCHED.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    ab = np.cumprod(1 - betas)
    t = jnp.asarray([0, 299, 999])
    np.testing.assert_allclose(SCHED.alpha_bar(t), ab[[0, 299, 999]], rtol=1e-6)
    np.testing.assert_allclose(SCHED.sqrt_ab(t), np.sqrt(ab[[0, 299, 999]]), rtol=1e-6)
    np.testing.assert_allclose(SCHED.sqrt_1mab(t), np.sqrt(1 - ab[[0, 299, 999]]), rtol=1e-6)
    assert SCHED.num_timesteps == 1000
    # a pytree: passes through jit as data
    assert jax.jit(lambda s: s.alpha_bar(10))(SCHED) == SCHED.alpha_bar(10)


@pytest.mark.parametrize(
    "num_steps,spacing,offset",
    [(50, "leading", 1), (50, "trailing", 0), (50, "linspace", 0), (7, "leading", 1),
     (7, "trailing", 0), (2, "linspace", 0)],
)  # fmt: skip
def test_spaced_timesteps_match_diffusers(num_steps, spacing, offset):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, **SD_KW)
    ref.set_timesteps(num_steps)
    ours = dd.spaced_timesteps(num_steps, 1000, spacing, offset)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def _guided_diffusion_respacing(num_timesteps, count):
    """guided-diffusion's ``space_timesteps(T, str(count))`` for one section (RDEIC's sampler)."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return sorted({round(i * stride) for i in range(count)}, reverse=True)


@pytest.mark.parametrize("num_steps", [2, 5, 10])
def test_relay_spacing_is_rdeic_respacing(num_steps):
    ours = dd.spaced_timesteps(num_steps, 300, "linspace")
    assert list(ours) == _guided_diffusion_respacing(300, num_steps)
    assert ours[0] == 299 and ours[-1] == 0


def test_spaced_timesteps_rejects_bad_requests():
    with pytest.raises(ValueError):
        dd.spaced_timesteps(0, 1000)
    with pytest.raises(ValueError):
        dd.spaced_timesteps(10, 1000, "leading", steps_offset=200)
    with pytest.raises(ValueError):
        dd.spaced_timesteps(10, 1000, "cosine")


def test_ddim_chain_matches_diffusers():
    """SD's own scheduler config (leading, offset 1, final ᾱ_0) with a toy ε-model, η = 0."""
    ref = DDIMScheduler(steps_offset=1, set_alpha_to_one=False, **SD_KW)
    ref.set_timesteps(10)
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)

    def eps_np(z, t):
        return 0.2 * z + 0.1 * np.sin(z) + 1e-4 * t

    sample = torch.from_numpy(x)
    for t in ref.timesteps:
        eps = torch.from_numpy(eps_np(sample.numpy(), float(t)).astype(np.float32))
        sample = ref.step(eps, t, sample, eta=0.0).prev_sample

    def eps_jax(z, t):
        return 0.2 * z + 0.1 * jnp.sin(z) + 1e-4 * t[:, None, None, None]

    ours = dd.ddim_sample(
        eps_jax, SCHED, jnp.asarray(x), num_steps=10, spacing="leading", steps_offset=1,
        set_alpha_to_one=False,
    )  # fmt: skip
    np.testing.assert_allclose(ours, sample.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_ddim_step_matches_diffusers_with_noise(eta):
    ref = DDIMScheduler(steps_offset=0, timestep_spacing="trailing", **SD_KW)
    ref.set_timesteps(20)  # t -> t - 50
    rng = np.random.default_rng(1)
    z, eps, noise = (rng.normal(size=(2, 3, 3, 4)).astype(np.float32) for _ in range(3))
    for t in (999, 549, 49):
        expected = ref.step(
            torch.from_numpy(eps), t, torch.from_numpy(z), eta=eta,
            variance_noise=torch.from_numpy(noise),
        ).prev_sample.numpy()  # fmt: skip
        a_t, s_t = SCHED.alpha_sigma(t)
        a_s, s_s = SCHED.alpha_sigma(t - 50) if t >= 50 else (1.0, 0.0)  # set_alpha_to_one
        x0, e = dd.to_x0_eps(jnp.asarray(eps), "eps", jnp.asarray(z), a_t, s_t)
        ours = dd.ddim_step(x0, e, a_t, s_t, a_s, s_s, eta=eta, noise=jnp.asarray(noise))
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=2e-5)


def test_eta_one_step_is_the_ddpm_posterior():
    """η = 1: mean = coef1·x̂0 + coef2·z_t and variance β̃ of q(z_s | z_t, x0) (DDPM, fixed small)."""
    rng = np.random.default_rng(2)
    x0, z, noise = (rng.normal(size=(4, 5)) for _ in range(3))
    ab = np.asarray(SCHED.alphas_cumprod, np.float64)
    t, s = 700, 450
    beta = 1 - ab[t] / ab[s]  # the respaced process' β
    coef1 = beta * np.sqrt(ab[s]) / (1 - ab[t])
    coef2 = (1 - ab[s]) * np.sqrt(1 - beta) / (1 - ab[t])
    var = beta * (1 - ab[s]) / (1 - ab[t])
    eps = (z - np.sqrt(ab[t]) * x0) / np.sqrt(1 - ab[t])
    with jax.enable_x64(True):
        ours = dd.ddim_step(
            jnp.asarray(x0), jnp.asarray(eps), np.sqrt(ab[t]), np.sqrt(1 - ab[t]),
            np.sqrt(ab[s]), np.sqrt(1 - ab[s]), eta=1.0, noise=jnp.asarray(noise),
        )  # fmt: skip
        np.testing.assert_allclose(ours, coef1 * x0 + coef2 * z + np.sqrt(var) * noise, rtol=1e-10)


def test_consistency_scalings_match_lcm():
    ref = LCMScheduler(**SD_KW)
    boundary = dd.ConsistencyBoundary()
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)
        ours = boundary.scalings(t)
        np.testing.assert_allclose(ours, (c_skip, c_out), rtol=1e-6, atol=1e-9)
    z, f = jnp.ones((1, 2)), jnp.zeros((1, 2))
    np.testing.assert_array_equal(boundary(z, f, 0), z)  # f(z, 0) = z: the boundary condition


# --------------------------------------------------------------------------------------------
# HFD's shifted cosine log-SNR
# --------------------------------------------------------------------------------------------

T_GRID = jnp.linspace(0.0, 1.0, 201)


@pytest.mark.parametrize("eta", [0.25, 0.5, 2.0])
def test_eta_shift_adds_minus_two_log_eta_everywhere(eta):
    base = dd.ShiftedCosineSchedule(eta=1.0)
    shifted = dd.ShiftedCosineSchedule(eta=eta)
    diff = shifted.logsnr(T_GRID) - base.logsnr(T_GRID)
    np.testing.assert_allclose(diff, -2 * math.log(eta), atol=2e-5)
    # plain cosine at η = 1: exact ends, the formula in the interior, decreasing
    lam = np.asarray(base.logsnr(T_GRID))
    assert lam[0] == pytest.approx(15.0, abs=1e-4) and lam[-1] == pytest.approx(-15.0, abs=1e-4)
    inner = slice(20, 181)  # t in [0.1, 0.9]
    t_np = np.asarray(T_GRID, np.float64)[inner]
    np.testing.assert_allclose(lam[inner], -2 * np.log(np.tan(np.pi * t_np / 2)), atol=1e-2)
    assert np.all(np.diff(lam) < 0)


def test_hard_clip_mode_is_the_formula_clipped():
    for eta in (0.5, 2.0):
        sched = dd.ShiftedCosineSchedule(eta=eta, clip="hard", logsnr_min=-10.0, logsnr_max=10.0)
        t = np.asarray(T_GRID, np.float64)
        with np.errstate(divide="ignore"):
            raw = -2 * np.log(np.tan(np.pi * t / 2)) - 2 * np.log(eta)
        ours = np.asarray(sched.logsnr(T_GRID))
        np.testing.assert_allclose(ours, np.clip(raw, -10, 10), atol=1e-4)
        free = (raw > -10) & (raw < 10)
        base = dd.ShiftedCosineSchedule(eta=1.0, clip="hard", logsnr_min=-10.0, logsnr_max=10.0)
        base_lam = np.asarray(base.logsnr(T_GRID))
        base_free = (base_lam > -10) & (base_lam < 10)
        both = free & base_free
        assert both.sum() > 100
        np.testing.assert_allclose((ours - base_lam)[both], -2 * np.log(eta), atol=2e-5)
        # finite values and gradients at the ends (float32 π/2 would make tan negative at t = 1)
        grads = jax.vmap(jax.grad(sched.logsnr))(jnp.asarray([0.0, 0.5, 1.0]))
        assert np.all(np.isfinite(grads)) and np.all(np.isfinite(ours))


def test_shifted_cosine_alpha_sigma_variance_preserving():
    sched = dd.ShiftedCosineSchedule(eta=0.5)
    alpha, sigma = sched.alpha_sigma(T_GRID)
    lam = sched.logsnr(T_GRID)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(alpha**2, jax.nn.sigmoid(lam), rtol=1e-6)
    np.testing.assert_allclose(np.log(alpha**2 / sigma**2), lam, atol=1e-3)
    # η is a traced leaf: an ablation over η reuses one compile
    f = jax.jit(lambda s, t: s.logsnr(t))
    f(dd.ShiftedCosineSchedule(eta=0.5), 0.3)
    f(dd.ShiftedCosineSchedule(eta=0.25), 0.3)
    assert f._cache_size() == 1


# --------------------------------------------------------------------------------------------
# Residual shifting (DiffO / ResShift)
# --------------------------------------------------------------------------------------------


def test_resshift_schedule_matches_reference_construction():
    T, min_noise, etas_end, kappa, power = 15, 0.04, 0.8, 2.0, 0.3
    sched = dd.resshift_schedule(T, min_noise, etas_end, kappa, power)
    # ResShift's construction: geometric "increaser" raised to a power-warped step count
    start = min(min_noise / kappa, min_noise)
    increaser = math.exp(math.log(etas_end / start) / (T - 1))
    steps = np.linspace(0, 1, T) ** power * (T - 1)
    np.testing.assert_allclose(sched.sqrt_etas, increaser**steps * start, rtol=1e-6)
    assert sched.sqrt_etas[0] == pytest.approx(0.02) and sched.sqrt_etas[-1] == pytest.approx(0.8)
    assert np.all(np.diff(np.asarray(sched.etas)) > 0)
    # the endpoints can also be set directly, e.g. η_T = 0.8 and sqrt(η_1) = 0.04
    direct = dd.residual_shift_schedule(T, 0.04, math.sqrt(0.8), kappa=2.0, power=0.3)
    assert direct.etas[-1] == pytest.approx(0.8) and direct.sqrt_etas[0] == pytest.approx(0.04)
    with pytest.raises(ValueError):
        dd.residual_shift_schedule(1, 0.04, 0.8)


def test_residual_shift_forward_closed_form():
    sched = dd.resshift_schedule(15)
    rng = np.random.default_rng(3)
    z0, z_base, eps = (jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32) for _ in range(3))
    t = jnp.asarray([0, 7, 14])
    eta = np.asarray(sched.etas)[[0, 7, 14]][:, None, None, None]
    expected = z0 + eta * (z_base - z0) + 2.0 * np.sqrt(eta) * eps
    np.testing.assert_allclose(sched.q_sample(z0, z_base, t, eps), expected, rtol=1e-5, atol=1e-6)
    # the decoder start differs from the marginal only by the residual left at η_t < 1
    gap = sched.q_sample(z0, z_base, t, eps) - sched.prior_sample(z_base, eps, t)
    np.testing.assert_allclose(gap, (1 - eta) * (z0 - z_base), rtol=1e-5, atol=1e-6)
