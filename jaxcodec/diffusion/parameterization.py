"""What a denoiser predicts (ε, v or x0), conversions among them, and the consistency boundary.

All conversions take the state ``z_t = α x0 + σ ε`` and ``(α, σ)``; they hold for discrete time
(``α = sqrt(ᾱ_t)``, ``σ = sqrt(1-ᾱ_t)``) and continuous time (``α² = sigmoid(λ)``) alike.
``v = α ε - σ x0`` (Salimans & Ho 2022). The inversions divide by ``α² + σ²`` rather than assume
it is 1, so they stay exact for any (α, σ) pair.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from jaxcodec.diffusion.schedules import _bcast

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS: tuple[str, ...] = ("eps", "v", "x0")


def _check(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {kind!r}")


def to_x0_eps(
    pred: jax.Array, prediction: Prediction, z_t: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Turn a ``prediction``-kind output into the pair ``(x0, ε)`` consistent with ``z_t``."""
    _check(prediction)
    a, s = _bcast(alpha, z_t), _bcast(sigma, z_t)
    if prediction == "eps":
        return (z_t - s * pred) / a, pred
    if prediction == "x0":
        return pred, (z_t - a * pred) / s
    norm = a * a + s * s
    return (a * z_t - s * pred) / norm, (s * z_t + a * pred) / norm


def from_x0_eps(
    x0: jax.Array, eps: jax.Array, prediction: Prediction, alpha: jax.Array, sigma: jax.Array
) -> jax.Array:
    """The prediction of kind ``prediction`` that corresponds to ``(x0, ε)``."""
    _check(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def convert(
    pred: jax.Array,
    src: Prediction,
    dst: Prediction,
    z_t: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
) -> jax.Array:
    """Convert a prediction from parameterisation ``src`` to ``dst``."""
    if src == dst:
        _check(src)
        return pred
    x0, eps = to_x0_eps(pred, src, z_t, alpha, sigma)
    return from_x0_eps(x0, eps, dst, alpha, sigma)


@flax.struct.dataclass
class ConsistencyBoundary:
    """Consistency-model output ``f(z_t, t) = c_skip(t)·z_t + c_out(t)·F`` in discrete SD time.

    The form is the one Latent Consistency Models use on Stable Diffusion (and diffusers'
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``), which is what DiffCR's
    frozen-SD + refiner setup builds on: with ``s = timestep_scaling · t`` (``t`` the timestep
    index, ``s_min = 0`` at index 0)

        ``c_skip(t) = σ_data² / (s² + σ_data²)``,   ``c_out(t) = s / sqrt(s² + σ_data²)``,

    ``σ_data = 0.5``. ``F`` is an x0-prediction (already in data units), so unlike Song et al.'s
    ``c_out = σ_data (s - s_min) / sqrt(σ_data² + s²)`` there is no ``σ_data`` factor: ``f → F``
    for large ``s`` and ``f(z, 0) = z`` exactly (the boundary condition at index 0).
    """

    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)
    timestep_scaling: float = flax.struct.field(pytree_node=False, default=10.0)

    def scalings(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        s = jnp.asarray(t, jnp.float32) * self.timestep_scaling
        sd2 = self.sigma_data**2
        return sd2 / (s * s + sd2), s / jnp.sqrt(s * s + sd2)

    def __call__(self, z_t: jax.Array, x0_pred: jax.Array, t: jax.Array) -> jax.Array:
        c_skip, c_out = self.scalings(t)
        return (_bcast(c_skip, z_t) * z_t + _bcast(c_out, z_t) * x0_pred).astype(z_t.dtype)
