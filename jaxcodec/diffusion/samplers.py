"""Samplers: pure, jitted functions of a denoiser ``denoise(z_t, t) -> prediction``.

Samplers know nothing about networks. ``t`` is handed to the denoiser as a per-example array of
shape ``(batch,)``: int32 timestep indices in discrete time, float ``t ∈ [0, 1]`` in continuous
time. A denoiser is either a plain function or a :class:`jax.tree_util.Partial` binding arrays
(network parameters, conditioning) to one, e.g. ``Partial(lambda p, z, t: unet.apply(p, z, t),
params)``: the bound arrays are traced, so new parameters do not retrace the sampler. A plain
function is keyed on its identity, so pass the same function object to hit the compile cache.

Each sampler is ``jax.jit``-ted with its step count and other configuration static and runs its
steps in a ``lax.scan`` (one trace of the denoiser per compile, whatever the step count). They
are differentiable end to end (fixed-step fine-tuning of RDEIC/DiffCR) and nest inside a caller's
own ``jit``/``grad``; ``remat=True`` wraps every denoiser call in ``jax.checkpoint`` so the
backward pass stores only the chain's states.

Every chain is the generalised DDIM update (Song et al. 2021) in ``(α, σ)`` form,
``z_s = α_s x̂0 + sqrt(σ_s² - c²) ε̂ + c·n`` with ``c = η·(σ_s/σ_t)·sqrt(1 - α_t²/α_s²)``:
``η = 0`` is deterministic DDIM, ``η = 1`` is ancestral DDPM with the posterior ("fixed small")
variance of the respaced process — the sampler RDEIC uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxcodec.diffusion.parameterization import ConsistencyBoundary, Prediction, to_x0_eps
from jaxcodec.diffusion.schedules import (
    DiscreteSchedule,
    ResidualShiftSchedule,
    ShiftedCosineSchedule,
    Spacing,
    _bcast,
    spaced_timesteps,
)

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def as_denoiser(fn: Denoiser) -> Partial:
    """Wrap a callable as a pytree so it can be a (non-static) jit argument."""
    return fn if isinstance(fn, Partial) else Partial(fn)


def _apply_guidance(eps_sd: Partial, eps_theta: Partial, lambda_s, z_t, t):
    base = eps_sd(z_t, t)
    return base + lambda_s * (eps_theta(z_t, t) - base)


def guided_denoiser(eps_sd: Denoiser, eps_theta: Denoiser, lambda_s: float | jax.Array) -> Partial:
    """RDEIC's guidance ``ε = ε_sd(z) + λ_s·(ε_θ(z, c) - ε_sd(z))`` as a new denoiser.

    ``ε_sd`` is the frozen UNet without control, ``ε_θ`` the controlled one; ``λ_s = 1`` is plain
    ``ε_θ``, 0 is ``ε_sd``, > 1 sharper. ``λ_s`` is traced, so changing it does not recompile.
    """
    return Partial(
        _apply_guidance, as_denoiser(eps_sd), as_denoiser(eps_theta), jnp.asarray(lambda_s)
    )


def _sampler(*static_argnames: str):
    """jit ``fn`` with ``static_argnames``; accept plain-function denoisers as first argument."""

    def wrap(fn):
        jitted = jax.jit(fn, static_argnames=static_argnames)

        @functools.wraps(fn)
        def sampler(denoise, *args, **kwargs):
            return jitted(as_denoiser(denoise), *args, **kwargs)

        sampler.jitted = jitted  # exposes ``_cache_size()`` for compile-count checks
        return sampler

    return wrap


# --------------------------------------------------------------------------------------------
# The shared step and chain
# --------------------------------------------------------------------------------------------


def ddim_step(
    x0: jax.Array,
    eps: jax.Array,
    alpha_t: jax.Array,
    sigma_t: jax.Array,
    alpha_s: jax.Array,
    sigma_s: jax.Array,
    eta: float = 0.0,
    noise: jax.Array | None = None,
) -> jax.Array:
    """One generalised DDIM move from noise level (α_t, σ_t) to (α_s, σ_s), given (x̂0, ε̂).

    ``α_s = 1, σ_s = 0`` ("clean") returns ``x̂0``. ``noise`` is required when ``eta > 0``.
    """
    a_t, s_t = _bcast(alpha_t, x0), _bcast(sigma_t, x0)
    a_s, s_s = _bcast(alpha_s, x0), _bcast(sigma_s, x0)
    if eta == 0.0:
        return a_s * x0 + s_s * eps
    if noise is None:
        raise ValueError("eta > 0 needs noise (pass a PRNG key to the sampler)")
    c2 = eta**2 * (s_s * s_s) / (s_t * s_t) * (1.0 - (a_t * a_t) / (a_s * a_s))
    c2 = jnp.clip(c2, 0.0, s_s * s_s)
    return a_s * x0 + jnp.sqrt(s_s * s_s - c2) * eps + jnp.sqrt(c2) * noise


def _call_denoiser(denoise: Partial, z: jax.Array, t: jax.Array) -> jax.Array:
    return denoise(z, t)


def _chain(
    denoise: Partial,
    z: jax.Array,
    key: jax.Array | None,
    model_t: jax.Array,
    alpha_t: jax.Array,
    sigma_t: jax.Array,
    alpha_s: jax.Array,
    sigma_s: jax.Array,
    *,
    prediction: Prediction,
    eta: float,
    remat: bool,
    boundary: ConsistencyBoundary | None = None,
) -> jax.Array:
    """Run ``len(model_t)`` DDIM moves; move ``i`` evaluates the denoiser at ``model_t[i]`` and
    goes from (α_t[i], σ_t[i]) to (α_s[i], σ_s[i])."""
    if eta < 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0.0 and key is None:
        raise ValueError("a stochastic sampler (eta > 0) needs a PRNG key")
    call = jax.checkpoint(_call_denoiser) if remat else _call_denoiser
    num_steps = model_t.shape[0]
    keys = jax.random.split(key, num_steps) if (key is not None and eta > 0.0) else None
    batch = z.shape[0]

    def body(z, xs):
        t, a_t, s_t, a_s, s_s, k = xs
        pred = call(denoise, z, jnp.broadcast_to(t, (batch,)))
        pred, eps_hat = pred if isinstance(pred, tuple) else (pred, None)
        if eps_hat is not None and boundary is None:
            raise ValueError("a denoiser returns (prediction, ε̂) only under a consistency boundary")
        x0, eps = to_x0_eps(pred, prediction, z, a_t, s_t)
        if boundary is not None:
            x0 = boundary(z, x0, t)
            # the DDIM move re-noises with the ε implied by f, or with the denoiser's own ε̂
            eps = (z - _bcast(a_t, z) * x0) / _bcast(s_t, z) if eps_hat is None else eps_hat
        noise = None if k is None else jax.random.normal(k, z.shape, z.dtype)
        z_next = ddim_step(x0, eps, a_t, s_t, a_s, s_s, eta=eta, noise=noise)
        return z_next.astype(z.dtype), None

    z, _ = jax.lax.scan(body, z, (model_t, alpha_t, sigma_t, alpha_s, sigma_s, keys))
    return z


def _discrete_chain_coefs(
    schedule: DiscreteSchedule, ts: jax.Array, final_index: int | None
) -> tuple[jax.Array, ...]:
    """(α_t, σ_t, α_s, σ_s) along descending indices ``ts``; the move after the last index goes to
    index ``final_index``, or to the clean state (α = 1, σ = 0) when it is None."""
    sa, s1ma = schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod
    nxt = ts[1:]
    end = (1, *ts.shape[1:])  # per-example timesteps (S, B): the last move per example too
    if final_index is None:
        a_end, s_end = jnp.ones(end, sa.dtype), jnp.zeros(end, sa.dtype)
    else:
        a_end = jnp.broadcast_to(sa[final_index], end)
        s_end = jnp.broadcast_to(s1ma[final_index], end)
    alpha_s = jnp.concatenate([sa[nxt], a_end])
    sigma_s = jnp.concatenate([s1ma[nxt], s_end])
    return sa[ts], s1ma[ts], alpha_s, sigma_s


# --------------------------------------------------------------------------------------------
# Discrete-time samplers (SD grid): DDIM / DDPM, RDEIC relay, DiffCR consistency
# --------------------------------------------------------------------------------------------


@_sampler(
    "num_steps", "eta", "spacing", "steps_offset", "t_start", "prediction", "set_alpha_to_one",
    "remat",
)  # fmt: skip
def ddim_sample(
    denoise: Denoiser,
    schedule: DiscreteSchedule,
    z_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    steps_offset: int = 0,
    t_start: int | None = None,
    prediction: Prediction = "eps",
    set_alpha_to_one: bool = True,
    remat: bool = False,
) -> jax.Array:
    """DDIM (``eta = 0``) / ancestral DDPM (``eta = 1``) over ``num_steps`` spaced timesteps.

    The grid is :func:`spaced_timesteps` of ``range(t_start)`` (default the whole schedule):
    ``z_T`` must be a sample of the marginal at the largest index of that grid. After the last
    index the chain moves to ᾱ = 1 (returns x̂0) when ``set_alpha_to_one``, else to ᾱ_0 (what SD's
    scheduler config does).
    """
    t_start = schedule.num_timesteps if t_start is None else t_start
    if not 1 <= t_start <= schedule.num_timesteps:
        raise ValueError(f"t_start must be in [1, {schedule.num_timesteps}], got {t_start}")
    ts = jnp.asarray(spaced_timesteps(num_steps, t_start, spacing, steps_offset))
    coefs = _discrete_chain_coefs(schedule, ts, None if set_alpha_to_one else 0)
    return _chain(denoise, z_T, key, ts, *coefs, prediction=prediction, eta=eta, remat=remat)


def ddpm_sample(
    denoise: Denoiser,
    schedule: DiscreteSchedule,
    z_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    **kwargs,
) -> jax.Array:
    """Ancestral DDPM over spaced timesteps: :func:`ddim_sample` with ``eta = 1``."""
    return ddim_sample(denoise, schedule, z_T, key, num_steps=num_steps, eta=1.0, **kwargs)


def relay_start_latent(
    schedule: DiscreteSchedule, z_c: jax.Array, eps: jax.Array, relay_start: int = 300
) -> jax.Array:
    """RDEIC's relay start ``z_N = sqrt(ᾱ_N)·z_c + sqrt(1-ᾱ_N)·ε`` at index ``N - 1``."""
    return schedule.q_sample(z_c, relay_start - 1, eps)


def relay_sample(
    denoise: Denoiser,
    schedule: DiscreteSchedule,
    z_N: jax.Array,
    key: jax.Array | None = None,
    *,
    relay_start: int = 300,
    num_steps: int = 2,
    eta: float = 1.0,
    spacing: Spacing = "linspace",
    prediction: Prediction = "eps",
    remat: bool = False,
) -> jax.Array:
    """RDEIC's relay residual sampling from ``z_N`` (see :func:`relay_start_latent`) to ẑ_0.

    ``num_steps`` (2 or 5 in the paper) spaced steps over ``[0, N)``; ``"linspace"`` spacing is
    RDEIC's respacing (N = 300: [299, 0] for 2 steps, [299, 224, 150, 75, 0] for 5) and
    ``eta = 1`` its spaced-DDPM sampler; ``eta = 0`` gives deterministic DDIM. The spacing must
    start at index ``N - 1``, where ``z_N`` lives (``"linspace"`` and ``"trailing"`` do).
    """
    first = spaced_timesteps(num_steps, relay_start, spacing)[0]
    if first != relay_start - 1:
        raise ValueError(f"{spacing!r} spacing starts at {first}, not at the relay start index")
    return ddim_sample(
        denoise,
        schedule,
        z_N,
        key,
        num_steps=num_steps,
        eta=eta,
        spacing=spacing,
        t_start=relay_start,
        prediction=prediction,
        set_alpha_to_one=True,
        remat=remat,
    )


def consistency_start_latent(
    schedule: DiscreteSchedule, c_hat: jax.Array, t_start: jax.Array | int
) -> jax.Array:
    """DiffCR's noise-free start ``sqrt(ᾱ_t)·ĉ`` at the start index sent in the header."""
    return _bcast(schedule.sqrt_ab(t_start), c_hat) * c_hat


def snr_start_index(
    schedule: DiscreteSchedule, c_hat: jax.Array, z0: jax.Array, grid_steps: int = 50
) -> jax.Array:
    """DiffCR's encoder-side start step, per example: an index on the ``grid_steps`` DDIM grid
    (index k ↔ timestep ``(k + 1)·T/grid_steps − 1``, SD's trailing grid).

    The SNR of ĉ's error, ``1 / mean((ĉ − z_0)²)``, is placed among the grid's SNRs
    ``ᾱ/(1 − ᾱ)`` (float32) as the public code does (``torch.bucketize`` over the sorted grid
    SNRs, then back to a grid index): the result is the noisiest grid index whose SNR is at
    least the error's, 0 when none is.
    """
    ts = spaced_timesteps(grid_steps, schedule.num_timesteps, "trailing")[::-1]  # ascending
    ab = schedule.alphas_cumprod[jnp.asarray(ts.copy())].astype(jnp.float32)
    snr = ab / (1.0 - ab)
    err = jnp.square(c_hat.astype(jnp.float32) - z0.astype(jnp.float32))
    e = 1.0 / jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    at_least = jnp.sum(snr[None, :] >= e[:, None], axis=1)
    return jnp.maximum(at_least - 1, 0).astype(jnp.int32)


def consistency_timesteps(
    start_index: int, num_steps: int, grid_steps: int = 50, num_timesteps: int = 1000
) -> np.ndarray:
    """The descending timesteps DiffCR samples from a start index (host, exact): the start is
    raised to ``num_steps + 1``, guided-diffusion's ``space_timesteps(start, num_steps + 1)``
    picks grid indices in ``[0, start)`` (Python's round-half-even), the first (0) is dropped,
    the rest are mapped to the grid's timesteps. E.g. start 30, 2 steps → [599, 299]."""
    start = max(int(start_index), num_steps + 1)
    if not 0 <= int(start_index) < grid_steps or start > grid_steps:
        raise ValueError(
            f"start index {start_index} with {num_steps} steps: outside the {grid_steps}-grid"
        )
    stride, cur, picked = (start - 1) / num_steps, 0.0, []
    for _ in range(num_steps + 1):
        picked.append(round(cur))
        cur += stride
    grid = spaced_timesteps(grid_steps, num_timesteps, "trailing")[::-1]
    return np.ascontiguousarray(grid[sorted(set(picked))[1:]][::-1]).astype(np.int32)


def consistency_timestep_table(
    num_steps: int, grid_steps: int = 50, num_timesteps: int = 1000
) -> np.ndarray:
    """``table[s]`` = :func:`consistency_timesteps` of start index s, for every s: indexed by a
    traced start index inside jit (training draws one per example)."""
    return np.stack(
        [consistency_timesteps(s, num_steps, grid_steps, num_timesteps) for s in range(grid_steps)]
    )


@_sampler("prediction", "remat")
def consistency_sample(
    denoise: Denoiser,
    schedule: DiscreteSchedule,
    z_start: jax.Array,
    timesteps: jax.Array,
    boundary: ConsistencyBoundary = ConsistencyBoundary(),  # noqa: B008 (frozen, static)
    *,
    prediction: Prediction = "x0",
    remat: bool = False,
) -> jax.Array:
    """Multi-step consistency sampling (DiffCR decodes with two steps).

    ``timesteps`` is a descending int array of shape ``(S,)``, or ``(S, B)`` for a start step
    per example; its values are traced (the start step is chosen per image and read from the
    file), only ``S`` fixes the compile. At each index the denoiser's output F (of kind
    ``prediction``, default x0) passes the boundary ``f = c_skip·z_t + c_out·F``
    (:class:`ConsistencyBoundary`); a deterministic DDIM move then goes to the next index with
    the ε implied by f — or, when the denoiser returns a pair ``(F, ε̂)``, with ε̂ (DiffCR
    re-noises with the frozen UNet's ε, not with the refined estimate's); the last ``f`` is
    returned.
    """
    ts = jnp.asarray(timesteps, jnp.int32)
    coefs = _discrete_chain_coefs(schedule, ts, None)
    return _chain(
        denoise,
        z_start,
        None,
        ts,
        *coefs,
        prediction=prediction,
        eta=0.0,
        remat=remat,
        boundary=boundary,
    )


# --------------------------------------------------------------------------------------------
# Continuous time (HFD): shifted cosine log-SNR, v-prediction
# --------------------------------------------------------------------------------------------


@_sampler("num_steps", "eta", "prediction", "remat")
def continuous_sample(
    denoise: Denoiser,
    schedule: ShiftedCosineSchedule,
    z_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    eta: float = 0.0,
    prediction: Prediction = "v",
    remat: bool = False,
) -> jax.Array:
    """HFD's sampler on the shifted log-SNR schedule: DDIM (``eta = 0``) or ancestral (``eta = 1``).

    Uniform grid ``t_i = 1 - i/S``; the denoiser sees ``t_i`` (map it to λ with
    ``schedule.logsnr`` if the network is conditioned on log-SNR). The last move goes to the clean
    state (returns x̂0 at ``t = 1/S``) rather than to the clipped λ_max.
    """
    # time in at least float32 (bf16 states must not quantise t), float64 under x64
    dtype = jnp.promote_types(z_T.dtype, jnp.float32)
    grid = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    t, s = grid[:-1], grid[1:]
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_s = alpha_s.at[-1].set(1.0)
    sigma_s = sigma_s.at[-1].set(0.0)
    return _chain(
        denoise,
        z_T,
        key,
        t,
        alpha_t,
        sigma_t,
        alpha_s,
        sigma_s,
        prediction=prediction,
        eta=eta,
        remat=remat,
    )


# --------------------------------------------------------------------------------------------
# Residual shifting (DiffO): one step from the shifted start
# --------------------------------------------------------------------------------------------


@_sampler("remat")
def residual_shift_sample(
    denoise: Denoiser,
    schedule: ResidualShiftSchedule,
    z_base: jax.Array,
    eps: jax.Array,
    t: jax.Array | int | None = None,
    *,
    noise_scale: float | jax.Array = 1.0,
    remat: bool = False,
) -> jax.Array:
    """DiffO's single step: ``x̂0 = denoise(z_base + s·κ·sqrt(η_t)·ε, t)``.

    The denoiser predicts the clean latent directly (residual shifting is not variance preserving,
    so there is no ε/v form). ``t`` (default ``T - 1``) and the noise scale ``s`` are traced: the
    rate-adaptive noise level.
    """
    t = jnp.asarray(schedule.num_timesteps - 1 if t is None else t, jnp.int32)
    z_t = schedule.prior_sample(z_base, eps, t, noise_scale)
    call = jax.checkpoint(_call_denoiser) if remat else _call_denoiser
    return call(denoise, z_t, jnp.broadcast_to(t, (z_base.shape[0],)))
