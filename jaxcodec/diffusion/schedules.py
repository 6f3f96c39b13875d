"""Noise schedules: Stable Diffusion's discrete grid, HFD's shifted cosine log-SNR, DiffO's
residual shifting.

Every schedule is a frozen pytree (``flax.struct.dataclass``), so it can be passed into jitted
samplers as an ordinary argument without triggering a retrace when its arrays change.

Conventions shared by all samplers: a variance-preserving state ``z_t = α_t x0 + σ_t ε`` with
``α_t² + σ_t² = 1``; discrete time is the *timestep index* ``t ∈ {0, …, T-1}`` (the value SD's UNet
is conditioned on), continuous time is ``t ∈ [0, 1]`` with ``t = 1`` the noisiest.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Spacing = Literal["leading", "trailing", "linspace"]


def _bcast(coef: jax.Array, x: jax.Array) -> jax.Array:
    """Right-pad a scalar / per-example coefficient with unit axes so it broadcasts over ``x``."""
    coef = jnp.asarray(coef)
    if coef.ndim == 0 or coef.ndim >= x.ndim:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


# --------------------------------------------------------------------------------------------
# Discrete (Stable Diffusion) schedule
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class DiscreteSchedule:
    """A DDPM grid of ``T`` steps: ``betas[t]`` and ``alphas_cumprod[t] = ᾱ_t = Π_{s≤t}(1-β_s)``.

    Index ``t`` is the timestep index (0 = least noise). All tables, including sqrt(ᾱ_t) and
    sqrt(1-ᾱ_t), are computed in float64 on the host and then stored in ``dtype``: sqrt(1-ᾱ_0)
    taken in float32 would lose 5 digits to cancellation (ᾱ_0 = 0.99915). Build it with
    :func:`discrete_schedule` or :func:`scaled_linear_schedule`.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, t: jax.Array) -> jax.Array:
        """ᾱ_t for integer timestep indices ``t`` (any shape)."""
        return self.alphas_cumprod[t]

    def sqrt_ab(self, t: jax.Array) -> jax.Array:
        """sqrt(ᾱ_t): the signal scale α_t."""
        return self.sqrt_alphas_cumprod[t]

    def sqrt_1mab(self, t: jax.Array) -> jax.Array:
        """sqrt(1 - ᾱ_t): the noise scale σ_t."""
        return self.sqrt_one_minus_alphas_cumprod[t]

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.sqrt_ab(t), self.sqrt_1mab(t)

    def logsnr(self, t: jax.Array) -> jax.Array:
        ab = self.alphas_cumprod[t]
        return jnp.log(ab) - jnp.log1p(-ab)

    def q_sample(self, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """Forward process ``z_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` (``t`` scalar or per example)."""
        return _bcast(self.sqrt_ab(t), x0) * x0 + _bcast(self.sqrt_1mab(t), x0) * eps


def discrete_schedule(betas: np.ndarray, dtype: jnp.dtype = jnp.float32) -> DiscreteSchedule:
    """A :class:`DiscreteSchedule` from any beta table (tables derived in float64)."""
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("betas must be a 1-D array in (0, 1)")
    ab = np.cumprod(1.0 - betas)
    return DiscreteSchedule(
        betas=jnp.asarray(betas, dtype),
        alphas_cumprod=jnp.asarray(ab, dtype),
        sqrt_alphas_cumprod=jnp.asarray(np.sqrt(ab), dtype),
        sqrt_one_minus_alphas_cumprod=jnp.asarray(
            np.sqrt(-np.expm1(np.log1p(-betas).cumsum())), dtype
        ),
    )


def scaled_linear_schedule(
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    dtype: jnp.dtype = jnp.float32,
) -> DiscreteSchedule:
    """Stable Diffusion's "scaled_linear" betas: ``linspace(sqrt(β_0), sqrt(β_T), T)**2``."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    return discrete_schedule(betas, dtype)


def spaced_timesteps(
    num_steps: int,
    num_timesteps: int = 1000,
    spacing: Spacing = "trailing",
    steps_offset: int = 0,
) -> np.ndarray:
    """Descending timestep indices of a ``num_steps`` sub-grid of ``range(num_timesteps)``.

    Same rules as diffusers' ``timestep_spacing`` (Lin et al. 2023, table 2):
    ``"leading"``  ``arange(S) * (T // S) + steps_offset`` (SD's own scheduler config: offset 1);
    ``"trailing"`` ``round(arange(T, 0, -T / S)) - 1``: always starts at ``T - 1``, the default
    here because every sampler starts from the marginal at the last index;
    ``"linspace"`` ``round(linspace(0, T - 1, S))``: both ends included, which is exactly RDEIC's
    (guided-diffusion ``space_timesteps``) respacing of the relay range ``[0, N)``.
    ``num_timesteps`` may be smaller than the schedule length (e.g. the relay start ``N``).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if spacing == "leading":
        ts = np.arange(num_steps) * (num_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_timesteps - 1, num_steps))
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    ts = np.sort(ts.astype(np.int32))[::-1]
    if ts[0] >= num_timesteps or ts[-1] < 0 or len(np.unique(ts)) != num_steps:
        raise ValueError(f"invalid timesteps {ts} for spacing={spacing!r}, offset={steps_offset}")
    return np.ascontiguousarray(ts)


# --------------------------------------------------------------------------------------------
# Continuous shifted-cosine log-SNR (HFD)
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class ShiftedCosineSchedule:
    """Cosine log-SNR shifted by ``-2·ln η`` (HFD): ``λ_η(t) = -2·log(tan(π t / 2)) - 2·log η``.

    ``η < 1`` means less noise at every ``t`` (the autoencoder already carries the coarse image).
    ``η`` is a pytree leaf, so an η ablation reuses one compiled sampler.

    Two ways to keep λ finite (``clip``):
    * ``"interpolate"`` (default, the "shifted cosine" of simple diffusion / VDM++): the *unshifted*
      cosine is reparameterised, ``λ(t) = -2·log(tan(a·t + b))`` with ``b = atan(exp(-λ_max/2))``,
      ``a = atan(exp(-λ_min/2)) - b``, so it runs exactly from ``λ_max`` (t=0) to ``λ_min`` (t=1)
      and is smooth; the shift is added afterwards, so the range is
      ``[λ_min - 2·ln η, λ_max - 2·ln η]`` and the shift is exactly ``-2·ln η`` at every ``t``.
    * ``"hard"``: the formula verbatim, then ``clip(λ_η(t), λ_min, λ_max)``; the shift is exact
      wherever the clip is inactive.
    """

    eta: float | jax.Array = 1.0
    logsnr_min: float = flax.struct.field(pytree_node=False, default=-15.0)
    logsnr_max: float = flax.struct.field(pytree_node=False, default=15.0)
    clip: Literal["interpolate", "hard"] = flax.struct.field(
        pytree_node=False, default="interpolate"
    )

    def logsnr(self, t: jax.Array) -> jax.Array:
        t = jnp.asarray(t)
        dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
        t = t.astype(dtype)
        shift = -2.0 * jnp.log(jnp.asarray(self.eta, dtype))
        if self.clip == "interpolate":
            b = np.arctan(np.exp(-0.5 * self.logsnr_max))
            a = np.arctan(np.exp(-0.5 * self.logsnr_min)) - b
            return -2.0 * jnp.log(jnp.tan(a * t + b)) + shift
        if self.clip == "hard":
            # -2·log(tan(πt/2)) written as 2·log(sin(π(1-t)/2)) - 2·log(sin(πt/2)): float32
            # π/2 exceeds the true π/2, so tan would turn negative (NaN) at t = 1. The clamp keeps
            # the ends finite (and gradients NaN-free) well beyond the clip range.
            tiny = jnp.asarray(1e-7, dtype)
            t = jnp.clip(t, tiny, 1.0 - tiny)
            half_pi = 0.5 * jnp.pi
            raw = 2.0 * (jnp.log(jnp.sin(half_pi * (1.0 - t))) - jnp.log(jnp.sin(half_pi * t)))
            return jnp.clip(raw + shift, self.logsnr_min, self.logsnr_max)
        raise ValueError(f"unknown clip mode {self.clip!r}")

    def alpha_sigma(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``α² = sigmoid(λ)``, ``σ² = sigmoid(-λ)`` (variance preserving)."""
        lam = self.logsnr(t)
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

    def q_sample(self, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        alpha, sigma = self.alpha_sigma(t)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


# --------------------------------------------------------------------------------------------
# Residual shifting (ResShift / DiffO)
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class ResidualShiftSchedule:
    """Residual shifting: ``z_t = z_0 + η_t (z_base - z_0) + κ·sqrt(η_t)·ε``, ``t = 0 … T-1``.

    ``sqrt_etas[t]`` holds sqrt(η_{t+1}) (index 0 is ResShift's η_1). The chain ends at
    ``z_base + κ·sqrt(η_T)·ε`` (exactly so when η_T = 1), which is where decoding starts.
    """

    sqrt_etas: jax.Array
    kappa: float | jax.Array = 2.0

    @property
    def num_timesteps(self) -> int:
        return int(self.sqrt_etas.shape[0])

    @property
    def etas(self) -> jax.Array:
        return self.sqrt_etas**2

    def q_sample(
        self,
        z0: jax.Array,
        z_base: jax.Array,
        t: jax.Array,
        eps: jax.Array,
        noise_scale: float | jax.Array = 1.0,
    ) -> jax.Array:
        """Forward marginal at timestep index ``t`` (scalar or per example).

        ``noise_scale`` s (scalar or per example) multiplies the noise, ``κ → s·κ``: DiffO's
        rate-adaptive noise modulation trains and decodes each rate point at its own level.
        """
        sqrt_eta = _bcast(self.sqrt_etas[t], z0)
        scale = _bcast(jnp.asarray(noise_scale, z0.dtype), z0)
        return z0 + sqrt_eta**2 * (z_base - z0) + scale * self.kappa * sqrt_eta * eps

    def prior_sample(
        self,
        z_base: jax.Array,
        eps: jax.Array,
        t: jax.Array | int | None = None,
        noise_scale: float | jax.Array = 1.0,
    ) -> jax.Array:
        """Decoder start ``z_base + s·κ·sqrt(η_t)·ε`` (default ``t = T-1``, ``s = 1``).

        A smaller ``t`` or ``s`` is a weaker start noise: DiffO's rate-adaptive noise modulation
        picks it from the rate point (traced values, so no recompile per rate).
        """
        t = self.num_timesteps - 1 if t is None else t
        scale = _bcast(jnp.asarray(noise_scale, z_base.dtype), z_base)
        return z_base + scale * self.kappa * _bcast(self.sqrt_etas[t], z_base) * eps

    def input_std(self, t: jax.Array, noise_scale: float | jax.Array = 1.0) -> jax.Array:
        """sqrt(s²κ²η_t + 1): ResShift's ``normalize_input`` divisor for latents of unit variance
        (the network sees ``z_t / input_std``)."""
        return jnp.sqrt((noise_scale * self.kappa) ** 2 * self.etas[t] + 1.0)


def residual_shift_schedule(
    num_timesteps: int,
    sqrt_eta_1: float,
    sqrt_eta_T: float,
    kappa: float = 2.0,
    power: float = 0.3,
    dtype: jnp.dtype = jnp.float32,
) -> ResidualShiftSchedule:
    """ResShift's "exponential" schedule: sqrt(η_t) geometric from ``sqrt_eta_1`` to
    ``sqrt_eta_T`` in the warped time ``((t-1)/(T-1))**power``.

    ``sqrt(η_t) = sqrt_eta_1 · (sqrt_eta_T / sqrt_eta_1) ** (((t-1)/(T-1)) ** power)``.
    """
    if num_timesteps < 2:
        raise ValueError("residual shifting needs num_timesteps >= 2")
    if not 0.0 < sqrt_eta_1 < sqrt_eta_T:
        raise ValueError(f"need 0 < sqrt_eta_1 < sqrt_eta_T, got {sqrt_eta_1}, {sqrt_eta_T}")
    u = np.linspace(0.0, 1.0, num_timesteps, dtype=np.float64) ** power
    sqrt_etas = sqrt_eta_1 * (sqrt_eta_T / sqrt_eta_1) ** u
    return ResidualShiftSchedule(sqrt_etas=jnp.asarray(sqrt_etas, dtype), kappa=kappa)


def resshift_schedule(
    num_timesteps: int,
    min_noise_level: float = 0.04,
    etas_end: float = 0.8,
    kappa: float = 2.0,
    power: float = 0.3,
    dtype: jnp.dtype = jnp.float32,
) -> ResidualShiftSchedule:
    """The schedule from ResShift-style config fields (``get_named_eta_schedule("exponential")``).

    In the reference code both endpoints are on the sqrt scale: ``sqrt(η_T) = etas_end`` and
    ``sqrt(η_1) = min(min_noise_level / κ, min_noise_level)``; with DiffO's values (0.04, 0.8,
    κ = 2, p = 0.3) that is sqrt(η_1) = 0.02, η_T = 0.64. To set η_T or sqrt(η_1) directly use
    :func:`residual_shift_schedule`.
    """
    sqrt_eta_1 = min(min_noise_level / kappa, min_noise_level)
    return residual_shift_schedule(
        num_timesteps, sqrt_eta_1, etas_end, kappa=kappa, power=power, dtype=dtype
    )
