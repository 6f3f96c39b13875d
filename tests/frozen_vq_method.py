"""A tiny method with every kind of variable, for the interface tests: a frozen pretrained part
(an SD-style VAE from a diffusers folder), a mutable collection (a VQ codebook, `vq_stats`),
two stages, and a stochastic decoder whose noise comes from the seed in the file's header.

It composes shared parts the way RDEIC does (frozen VAE latent → trainable compressor with a
VQ code), small enough to train on a CPU in seconds. `config.method` is this module's name.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxcodec.entropy import coder
from jaxcodec.entropy import vq as vq_lib
from jaxcodec.methods import (
    BitstreamCoder,
    Method,
    Pretrained,
    StageStart,
    Variables,
    register,
)
from jaxcodec.methods.base import psnr_from_mse, to_float, to_uint8
from jaxcodec.nn import layers
from jaxcodec.nn.vae import AutoencoderKL, VAEConfig, vae_param_shapes
from jaxcodec.train import jit_init
from jaxcodec.weights import diffusers as dw

NAME = "frozen_vq_method"
TINY_VAE = VAEConfig(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


def write_vae_folder(folder: Path, seed: int) -> Path:
    """A random tiny VAE in diffusers format (what a user's pretrained folder looks like)."""
    model = AutoencoderKL(TINY_VAE)
    params = jit_init(model.init, jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))["params"]
    dw.write_folder(folder, TINY_VAE.to_diffusers(), nn.unbox(params))
    return folder


class LatentVQ(nn.Module):
    """VAE latent → VQ code at half its resolution → latent."""

    dim: int = 8
    num_codes: int = 32

    def setup(self):
        self.encode = layers.conv(self.dim, 3, stride=2)
        self.vq = vq_lib.VectorQuantizer(num_codes=self.num_codes, dim=self.dim, decay=0.9)
        self.decode = layers.conv(4 * 4, 3)

    def __call__(self, z: jax.Array, *, train: bool) -> tuple[jax.Array, vq_lib.VQOutput]:
        out = self.vq(self.encode(z), train=train)
        return self.synthesise(out.z_q), out

    def indices(self, z: jax.Array) -> jax.Array:
        return self.vq(self.encode(z), train=False).indices

    def synthesise(self, z_q: jax.Array) -> jax.Array:
        y = self.decode(z_q)
        n, h, w, _ = y.shape
        return y.reshape(n, h, w, 2, 2, 4).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, 4)


def get_config(vae_path: str = "") -> ml_collections.ConfigDict:
    from jaxcodec.configlib import load_config

    c = load_config("configs/hfd.py:tiny")
    c.unlock()
    c.method = __name__
    c.model = ml_collections.ConfigDict(dict(vae_path=vae_path, dim=6, num_codes=32))
    c.decode = ml_collections.ConfigDict(dict(seed=0, noise=0.1))
    c.data.crop_size = 32
    c.batch_size = 8
    c.eval_data.max_images = 1
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 2
    c.real_file_eval = False
    c.optimizer.lr = 1e-2
    c.mesh.logical_axis_rules = (("batch", ("data", "fsdp")), ("conv_out", "fsdp"))
    return c


@register(__name__)
class FrozenVQMethod(Method):
    console_metrics = ("mse", "perplexity")

    def __init__(self, config):
        super().__init__(config)
        self.vae = AutoencoderKL(TINY_VAE)
        self.model = LatentVQ(config.model.dim, config.model.num_codes)
        self._coder = _Coder(self)

    # --- variables
    def init(self, rng, batch):
        z = jnp.zeros((1, batch["image"].shape[1] // 2, batch["image"].shape[2] // 2, 4))
        return self.model.init({"params": rng}, z, train=False)

    def pretrained(self) -> dict[str, Pretrained]:
        path = self.config.model.vae_path
        return {"vae": Pretrained(path, lambda: nn.unbox(dw.load_vae(path)[1]))}

    def abstract_frozen(self) -> Any:
        return {"vae": vae_param_shapes(TINY_VAE)}

    def init_from(self, previous) -> StageStart:
        return StageStart(params=previous.params, state=previous.state)

    # --- training
    def latent(self, frozen, images: jax.Array) -> jax.Array:
        x = to_float(images) * 2.0 - 1.0
        return self.vae.apply({"params": frozen["vae"]}, x, method="encode")["mean"]

    def loss(self, params, frozen, state, batch, rng):
        z = self.latent(frozen, batch["image"])
        (z_hat, out), new_state = self.model.apply(
            {"params": params, **state},
            z,
            train=True,
            mutable=["vq_stats"],
            rngs={"vq_restart": rng},
        )
        mse = jnp.mean(jnp.square(z_hat - z))
        metrics = {"loss": mse + out.loss, "mse": mse, "perplexity": out.perplexity}
        return mse + out.loss, metrics, dict(new_state)

    def evaluate(self, variables: Variables, images, valid_hw, rng):
        z = self.latent(variables.frozen, to_uint8(images))
        z_hat, out = self.model.apply(variables.collections(), z, train=False)
        x = self.vae.apply({"params": variables.frozen["vae"]}, z_hat, method="decode")
        recon = to_uint8((x[:, : valid_hw[0], : valid_hw[1]] + 1.0) / 2.0)
        ref = to_uint8(images[:, : valid_hw[0], : valid_hw[1]]).astype(jnp.float32)
        mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - ref), axis=(1, 2, 3))
        index_bits = max(1, int(np.ceil(np.log2(self.config.model.num_codes))))
        bpp = out.indices[0].size * index_bits / (valid_hw[0] * valid_hw[1])
        return {"psnr": psnr_from_mse(mse, 255.0), "bpp": jnp.full(mse.shape, bpp)}, recon

    # --- coding
    @property
    def coder(self):
        return self._coder

    def entropy_tables(self, variables: Variables):
        return vq_lib.vq_tables(variables.state["vq_stats"]["vq"])


class _Coder(BitstreamCoder):
    """VQ indices at a fixed number of bits; decoding adds seeded noise to the latent."""

    stride = 4
    num_streams = 1

    def __init__(self, method: FrozenVQMethod):
        self.method = method
        m = method.model
        self._indices = jax.jit(
            lambda v, x: m.apply(v, method.latent(v["frozen"], x), method="indices")
        )

        def decode(v, z_q, key, noise):
            z = m.apply({"params": v["params"]}, z_q, method="synthesise")
            z = z + noise * jax.random.normal(key, z.shape)
            x = method.vae.apply({"params": v["frozen"]["vae"]}, z, method="decode")
            return to_uint8((x + 1.0) / 2.0)

        self._decode = jax.jit(decode)

    def options(self) -> dict[str, Any]:
        return {"seed": self.method.config.decode.seed}

    def compress(self, variables, tables, image, options: Mapping[str, Any]):
        v = {"params": variables.params, **variables.state, "frozen": variables.frozen}
        idx = np.asarray(self._indices(v, jnp.asarray(image)[None]))[0]
        enc = coder.new_encoder()
        vq_lib.encode_indices(enc, tables, idx)
        return [coder.finish(enc)], {"indices": idx}

    def decompress(self, variables, tables, streams, hw, options, rng):
        shape = (hw[0] // self.stride, hw[1] // self.stride)
        idx = vq_lib.decode_indices(coder.new_decoder(streams[0]), tables, shape)
        z_q = np.asarray(tables["codebook_q"], np.float64)[idx] / (1 << 12)
        v = {"params": variables.params, "frozen": variables.frozen}
        noise = float(self.method.config.decode.noise)
        image = self._decode(v, jnp.asarray(z_q, jnp.float32)[None], rng, noise)
        return np.asarray(image)[0], {"indices": idx}
