"""Diffusion core: schedules, parameterisations (ε, v, x0), samplers and losses.

Shared by every method: SD's discrete grid (RDEIC, DiffCR, ResULIC), HFD's shifted cosine
log-SNR, DiffO's residual shifting. Samplers are jitted pure functions of a denoiser
``denoise(z_t, t) -> prediction`` and know nothing about networks.
"""

from jaxcodec.diffusion.losses import (
    Weighting,
    diffusion_training_sample,
    loss_weight,
    regression_loss,
    relay_forward,
    relay_lambda,
    relay_loss,
    relay_training_sample,
    residual_shift_training_sample,
)
from jaxcodec.diffusion.parameterization import (
    ConsistencyBoundary,
    Prediction,
    convert,
    from_x0_eps,
    to_x0_eps,
)
from jaxcodec.diffusion.samplers import (
    Denoiser,
    as_denoiser,
    consistency_sample,
    consistency_start_latent,
    consistency_timestep_table,
    consistency_timesteps,
    continuous_sample,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    guided_denoiser,
    relay_sample,
    relay_start_latent,
    residual_shift_sample,
    snr_start_index,
)
from jaxcodec.diffusion.schedules import (
    DiscreteSchedule,
    ResidualShiftSchedule,
    ShiftedCosineSchedule,
    Spacing,
    residual_shift_schedule,
    resshift_schedule,
    scaled_linear_schedule,
    spaced_timesteps,
)

__all__ = [
    "ConsistencyBoundary",
    "Denoiser",
    "DiscreteSchedule",
    "Prediction",
    "ResidualShiftSchedule",
    "ShiftedCosineSchedule",
    "Spacing",
    "Weighting",
    "as_denoiser",
    "consistency_sample",
    "consistency_start_latent",
    "consistency_timestep_table",
    "consistency_timesteps",
    "continuous_sample",
    "convert",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "diffusion_training_sample",
    "discrete_schedule",
    "from_x0_eps",
    "guided_denoiser",
    "loss_weight",
    "regression_loss",
    "relay_forward",
    "relay_lambda",
    "relay_loss",
    "relay_sample",
    "relay_start_latent",
    "relay_training_sample",
    "residual_shift_sample",
    "residual_shift_schedule",
    "residual_shift_training_sample",
    "resshift_schedule",
    "scaled_linear_schedule",
    "snr_start_index",
    "spaced_timesteps",
    "to_x0_eps",
]
