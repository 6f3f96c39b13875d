"""Image codecs over trained checkpoints: uint8 images ↔ `.jxc` bytes.

`load_codec(workdir)` reads the resolved config, the final EMA parameters and the integer
entropy tables stored with the checkpoint (never rebuilt here), and wraps the method's
host-side `compress` / `decompress` with padding, cropping and the container.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxcodec.entropy import container
from jaxcodec.entropy.coder import CodingError
from jaxcodec.entropy.container import BitstreamError


class CheckpointError(RuntimeError):
    """The workdir has no usable checkpoint for coding (missing, unfinished, no tables)."""


def model_hash(method_name: str, model_config: Any, params: Any, tables: Any) -> bytes:
    """SHA-256 over the method, its model config, the parameters and the entropy tables: the
    identity a file is tied to (a different checkpoint cannot decode it)."""
    h = hashlib.sha256()
    h.update(method_name.encode())
    h.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    for tree in (params, tables):
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
        for path, leaf in leaves:
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(jax.tree_util.keystr(path).encode())
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.digest()


def pad_image(image: np.ndarray, multiple: int) -> np.ndarray:
    """Edge padding to a multiple of the model's stride (cropped back after decoding)."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, (-h) % multiple), (0, (-w) % multiple), (0, 0)), mode="edge")


class MethodCodec:
    """An image codec (evaluation's `ImageCodec` interface: `name`, `compress`, `decompress`,
    `timings` in seconds) over any method that implements `compress` / `decompress` /
    `num_streams` / `stride`."""

    def __init__(self, method, params, tables, *, name: str, options: dict | None = None):
        for attr in ("compress", "decompress", "num_streams", "stride"):
            if not hasattr(method, attr):
                raise CheckpointError(
                    f"method {method.name!r} stage {method.stage} has no bitstream support"
                )
        self.method, self.params, self.tables = method, params, tables
        self.name = name
        self.options = {k: container.option_value(v, k) for k, v in (options or {}).items()}
        model_cfg = method.config.model.to_dict() if hasattr(method.config, "model") else {}
        self.hash = model_hash(method.name, model_cfg, params, tables)
        self.timings: dict[str, float] = {}
        self.last_info: dict[str, Any] = {}

    @property
    def model_id(self) -> str:
        return self.hash[: container.MODEL_ID_BYTES].hex()

    def compress(self, image: np.ndarray) -> bytes:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        t0 = time.perf_counter()
        streams, info = self.method.compress(
            self.params, self.tables, pad_image(image, self.method.stride)
        )
        header = container.Header(h, w, self.hash[: container.MODEL_ID_BYTES], self.options)
        data = container.pack(header, streams, self.hash)
        self.timings = {"encode": time.perf_counter() - t0}
        self.timings |= {k: v for k, v in info.items() if k.endswith("_s")}  # breakdown
        self.last_info = info
        return data

    def decompress(self, data: bytes) -> np.ndarray:
        t0 = time.perf_counter()
        header, streams = container.unpack(data, self.hash, num_streams=self.method.num_streams)
        s = self.method.stride
        hw = (-(-header.height // s) * s, -(-header.width // s) * s)
        try:
            image, info = self.method.decompress(self.params, self.tables, streams, hw)
        except (CodingError, ArithmeticError) as exc:  # garbage that passed the checksum
            raise BitstreamError(f"undecodable stream: {exc}") from None
        self.timings = {"decode": time.perf_counter() - t0}
        self.timings |= {k: v for k, v in info.items() if k.endswith("_s")}
        self.last_info = info
        return np.ascontiguousarray(image[: header.height, : header.width])


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a training workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_codec(workdir: str | Path, *, step: int | None = None) -> MethodCodec:
    """The codec of the latest (or given) checkpoint in a training workdir."""
    import orbax.checkpoint as ocp

    from jaxcodec.checkpoint import ENTROPY_TABLES, STATE, Checkpointer
    from jaxcodec.methods import get_method

    workdir = Path(workdir)
    config = load_config(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise CheckpointError(f"no checkpoints in {workdir}")
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoints in {workdir}")
    if ENTROPY_TABLES not in ckpt.item_names(step):
        raise CheckpointError(
            f"checkpoint {step} in {workdir} has no entropy tables: they are stored with the "
            "final checkpoint, when training reaches total_steps"
        )
    restored = ckpt.manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(), ENTROPY_TABLES: ocp.args.StandardRestore()}
        ),
    )
    ckpt.close()
    method = get_method(config)
    params = jax.tree.map(np.asarray, restored[STATE]["ema_params"])
    tables = jax.tree.map(np.asarray, restored[ENTROPY_TABLES])
    name = f"{config.method}-{config.get('variant', '')}-step{step}".replace("--", "-")
    return MethodCodec(method, params, tables, name=name)


def decompress_batch(codec: MethodCodec, files: list[bytes]) -> list[np.ndarray]:
    """Decodes files of one padded size together (batched synthesis on the device)."""
    parsed = [container.unpack(d, codec.hash, num_streams=codec.method.num_streams) for d in files]
    s = codec.method.stride
    sizes = {(-(-h.height // s) * s, -(-h.width // s) * s) for h, _ in parsed}
    if len(sizes) != 1:
        raise ValueError("decompress_batch needs files of one padded size")
    images = codec.method.decompress_batch(
        codec.params, codec.tables, [streams for _, streams in parsed], sizes.pop()
    )
    return [im[: h.height, : h.width] for im, (h, _) in zip(images, parsed, strict=True)]


def write_checkpoint(workdir: str | Path, config: ml_collections.ConfigDict, params, step: int):
    """Writes `params` as a final checkpoint in the training loop's format (config.json, train
    state with EMA = params, entropy tables built from them) — e.g. for converted weights."""
    import jax.numpy as jnp
    import optax

    from jaxcodec.checkpoint import ENTROPY_TABLES, Checkpointer
    from jaxcodec.methods import get_method
    from jaxcodec.train import TrainState

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    method = get_method(config)
    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        ema_params=params,
        opt_state=optax.set_to_zero().init(params),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, state, extra={ENTROPY_TABLES: method.entropy_tables(params)})
    ckpt.close()
