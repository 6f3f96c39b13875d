"""Image-quality metrics in JAX: PSNR, MS-SSIM, LPIPS, DISTS, FID/KID, and BD-rate.

Inputs are NHWC batches, uint8 or float in [0, 1] (see ``common``). Each metric returns one
value per image; averaging over a dataset is the caller's choice (the protocol averages
per-image values). ``bjontegaard`` is imported only when a BD value is computed.
"""

from jaxcodec.metrics.bd_rate import bd_metric, bd_rate
from jaxcodec.metrics.dists import dists, dists_distance, dists_params
from jaxcodec.metrics.fid import (
    PatchFID,
    frechet_distance,
    hific_patches,
    kernel_inception_distance,
    load_inception,
)
from jaxcodec.metrics.lpips import lpips, lpips_distance, lpips_params
from jaxcodec.metrics.ms_ssim import ms_ssim
from jaxcodec.metrics.psnr import psnr

__all__ = [
    "PatchFID",
    "bd_metric",
    "bd_rate",
    "frechet_distance",
    "hific_patches",
    "kernel_inception_distance",
    "load_inception",
    "dists",
    "dists_distance",
    "dists_params",
    "lpips",
    "lpips_distance",
    "lpips_params",
    "ms_ssim",
    "psnr",
]
