"""The interface a method implements so the shared training loop can run it."""

import abc
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class Method(abc.ABC):
    """A method composes shared parts into a model and per-stage losses.

    Subclasses set `model` in `__init__` and implement `loss` and `evaluate`. Everything here
    runs inside `jax.jit`; none of it knows about meshes or devices.
    """

    name: str = ""
    model: nn.Module

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.stage = int(config.get("stage", 1))

    def dummy_batch(self, batch_size: int) -> Batch:
        c = self.config.data.crop_size
        return {"image": jnp.zeros((batch_size, c, c, 3), jnp.uint8)}

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        """Returns the model variables (at least 'params')."""

    @abc.abstractmethod
    def loss(self, params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """Scalar training loss of the current stage and metrics to log."""

    @abc.abstractmethod
    def evaluate(
        self, params, images: jax.Array, valid_hw: tuple[int, int]
    ) -> tuple[Metrics, jax.Array]:
        """Per-image metrics and uint8 reconstructions of the valid region of padded images."""

    def entropy_tables(self, params) -> dict[str, Any] | None:
        """Integer coding tables (numpy) built from trained parameters, stored with the final
        checkpoint; None for a stage that codes nothing."""
        return None

    def trainable_mask(self, params) -> Any:
        """Pytree of bools: which parameters this stage trains (the rest are frozen)."""
        return jax.tree.map(lambda _: True, params)


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] → float32 [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)


def bits(likelihoods: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(-jnp.log2(likelihoods), axis=axis)


def psnr_from_mse(mse: jax.Array, peak: float = 1.0) -> jax.Array:
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, 1e-12))
