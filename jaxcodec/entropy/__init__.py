"""Entropy models: likelihoods for training (JAX) and, later, integer tables for coding."""

from jaxcodec.entropy.factorized import EntropyBottleneck
from jaxcodec.entropy.gaussian import GaussianConditional, gaussian_likelihood
from jaxcodec.entropy.quantization import quantize, round_ste

__all__ = [
    "EntropyBottleneck",
    "GaussianConditional",
    "gaussian_likelihood",
    "quantize",
    "round_ste",
]
