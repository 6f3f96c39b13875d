"""Image-quality metrics in JAX: PSNR, MS-SSIM, LPIPS, DISTS, FID/KID, and BD-rate.

Inputs are NHWC batches, uint8 or float in [0, 1] (see ``common``). Each metric returns one
value per image; averaging over a dataset is the caller's choice (the protocol averages
per-image values). Heavy imports (scipy, bjontegaard) happen only in the modules that need them.
"""

from jaxcodec.metrics.dists import dists, dists_distance, dists_params
from jaxcodec.metrics.lpips import lpips, lpips_distance, lpips_params
from jaxcodec.metrics.ms_ssim import ms_ssim
from jaxcodec.metrics.psnr import psnr

__all__ = [
    "dists",
    "dists_distance",
    "dists_params",
    "lpips",
    "lpips_distance",
    "lpips_params",
    "ms_ssim",
    "psnr",
]
