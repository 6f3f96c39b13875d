"""Diffusion training losses and the forward draws they need.

Losses return one value per example, shape ``(batch,)``, so methods can weight them (e.g. by
RDEIC's λ_r) before reducing. Every weighting is expressed relative to the x0-space error: with
``snr = α²/σ²``, ``‖ε̂-ε‖² = snr·‖x̂0-x0‖²`` and ``‖v̂-v‖² = (snr+1)·‖x̂0-x0‖²`` (VP), so a loss can
be computed in any target space and still carry a chosen effective weight.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxcodec.diffusion.parameterization import Prediction, _check, convert, from_x0_eps
from jaxcodec.diffusion.schedules import (
    DiscreteSchedule,
    ResidualShiftSchedule,
    ShiftedCosineSchedule,
    _bcast,
)

Weighting = Literal["none", "min_snr", "eps", "v", "x0"]


def _x0_weight(target: Prediction, snr: jax.Array) -> jax.Array:
    """Implicit x0-space weight of an unweighted MSE in ``target`` space."""
    _check(target)
    return {"eps": snr, "v": snr + 1.0, "x0": jnp.ones_like(snr)}[target]


def loss_weight(
    alpha: jax.Array,
    sigma: jax.Array,
    target: Prediction = "eps",
    weighting: Weighting = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """Per-example factor on the ``target``-space MSE.

    ``"none"``: the target's own MSE; ``"min_snr"``: effective x0 weight ``min(snr, γ)`` (Hang et
    al. 2023; for ε targets this is ``min(snr, γ)/snr``); ``"eps"`` / ``"v"`` / ``"x0"``: the
    effective weight of an unweighted ε- / v- / x0-MSE (``"v"`` is the v-loss-equivalent weight).
    """
    alpha, sigma = jnp.asarray(alpha), jnp.asarray(sigma)
    snr = (alpha * alpha) / (sigma * sigma)
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        total = jnp.minimum(snr, min_snr_gamma)
    elif weighting in ("eps", "v", "x0"):
        total = _x0_weight(weighting, snr)
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    return total / jnp.maximum(_x0_weight(target, snr), jnp.finfo(snr.dtype).tiny)


def _per_example_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    d = a - b
    d = d.astype(jnp.promote_types(d.dtype, jnp.float32))  # bf16 -> f32, f64 stays
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))


def regression_loss(
    pred: jax.Array,
    *,
    prediction: Prediction,
    z_t: jax.Array,
    x0: jax.Array,
    eps: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    target: Prediction = "eps",
    weighting: Weighting = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """Weighted MSE between a network output of kind ``prediction`` and the truth, in ``target``
    space (``(x0, ε)`` are the pair that made ``z_t = α x0 + σ ε``). Returns shape ``(batch,)``."""
    pred_t = convert(pred, prediction, target, z_t, alpha, sigma)
    true_t = from_x0_eps(x0, eps, target, alpha, sigma)
    w = loss_weight(alpha, sigma, target, weighting, min_snr_gamma)
    return jnp.broadcast_to(w, (pred.shape[0],)) * _per_example_mse(pred_t, true_t)


def diffusion_training_sample(
    schedule: DiscreteSchedule | ShiftedCosineSchedule, x0: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Draw ``t`` (``U{0..T-1}`` or ``U(0, 1)``) and ε; return ``(z_t, t, ε, α_t, σ_t)``."""
    k_t, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    if isinstance(schedule, DiscreteSchedule):
        t = jax.random.randint(k_t, (batch,), 0, schedule.num_timesteps)
    else:
        t = jax.random.uniform(k_t, (batch,), jnp.float32)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    z_t = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
    return z_t.astype(x0.dtype), t, eps, alpha, sigma


# --------------------------------------------------------------------------------------------
# RDEIC relay residual diffusion
# --------------------------------------------------------------------------------------------


def relay_lambda(schedule: DiscreteSchedule, relay_start: int = 300) -> jax.Array:
    """``λ = sqrt(1/ᾱ_N - 1)`` with ᾱ_N at index ``N - 1``."""
    return jnp.sqrt(1.0 / schedule.alpha_bar(relay_start - 1) - 1.0)


def relay_forward(
    schedule: DiscreteSchedule,
    z0: jax.Array,
    z_c: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    relay_start: int = 300,
) -> tuple[jax.Array, jax.Array]:
    """Relay residual forward process: ``ε̃ = ε + (z_c - z_0)/λ``,
    ``z_t = sqrt(ᾱ_t) z_0 + sqrt(1-ᾱ_t) ε̃``. Returns ``(z_t, ε̃)``.

    At ``t = N - 1`` this is exactly the sampler's start ``sqrt(ᾱ_N) z_c + sqrt(1-ᾱ_N) ε``.
    """
    eps_tilde = eps + (z_c - z0) / relay_lambda(schedule, relay_start)
    return schedule.q_sample(z0, t, eps_tilde).astype(z0.dtype), eps_tilde.astype(z0.dtype)


def relay_training_sample(
    schedule: DiscreteSchedule,
    z0: jax.Array,
    z_c: jax.Array,
    key: jax.Array,
    relay_start: int = 300,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw ``t ~ U{0..N-1}`` and ε; return ``(z_t, t, ε̃)`` for relay training."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, relay_start)
    eps = jax.random.normal(k_eps, z0.shape, z0.dtype)
    z_t, eps_tilde = relay_forward(schedule, z0, z_c, t, eps, relay_start)
    return z_t, t, eps_tilde


def relay_x0_from_eps(
    schedule: DiscreteSchedule,
    z_t: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    z_c: jax.Array,
    relay_start: int = 300,
) -> jax.Array:
    """ResULIC's compression-aware reading of an ε-prediction: the relay forward process
    ``z_t = α_t z_0 + σ_t (ε + (z_c − z_0)/λ)`` solved for z_0 given the *pure* noise ε (what its
    network predicts), ``ẑ_0 = (z_t − σ_t (ε + z_c/λ)) / (α_t − σ_t/λ)``; at the start index
    N − 1 the process is z_c's alone and ẑ_0 = z_c."""
    lam = relay_lambda(schedule, relay_start)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = _bcast(alpha, z_t), _bcast(sigma, z_t)
    at_start = _bcast(jnp.asarray(t) == relay_start - 1, z_t)
    denom = jnp.where(at_start, 1.0, alpha - sigma / lam)
    x0 = (z_t - sigma * (eps + z_c / lam)) / denom
    return jnp.where(at_start, z_c, x0).astype(z_t.dtype)


def relay_loss(
    eps_pred: jax.Array,
    z_t: jax.Array,
    t: jax.Array,
    z0: jax.Array,
    eps_tilde: jax.Array,
    schedule: DiscreteSchedule,
    *,
    prediction: Prediction = "eps",
    target: Prediction = "x0",
    weighting: Weighting = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """RDEIC's diffusion term: the network's ε is turned into ẑ_0 and regressed onto z_0
    (``target="x0"``, ``‖ẑ_0 - z_0‖²`` per example; multiply by λ_r in the method). ``target="eps"``
    regresses onto ε̃ instead."""
    alpha, sigma = schedule.alpha_sigma(t)
    return regression_loss(
        eps_pred,
        prediction=prediction,
        z_t=z_t,
        x0=z0,
        eps=eps_tilde,
        alpha=alpha,
        sigma=sigma,
        target=target,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
    )


def residual_shift_training_sample(
    schedule: ResidualShiftSchedule,
    z0: jax.Array,
    z_base: jax.Array,
    key: jax.Array,
    noise_scale: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw ``t ~ U{0..T-1}`` and ε; return ``(z_t, t, ε)`` of the residual-shifting forward
    process (the network regresses x̂0 onto z_0 from ``z_t``). ``noise_scale`` (scalar or per
    example) is DiffO's rate-adaptive noise level."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, schedule.num_timesteps)
    eps = jax.random.normal(k_eps, z0.shape, z0.dtype)
    return schedule.q_sample(z0, z_base, t, eps, noise_scale).astype(z0.dtype), t, eps
