"""Image codecs over trained models: uint8 images ↔ `.jxc` bytes.

`load_codec(path)` reads a codec bundle (`jaxcodec.checkpoint`: EMA parameters, model state,
integer entropy tables, previous stages' models, never optimiser state), loads the method's
pretrained frozen parts from their sources and checks their digests, and wraps the method's
`BitstreamCoder` with padding, cropping, header options, the decoder's budget and the container.

A rate-conditioned model's codec picks its rate per file: `at_quality(Q)` / `at_rate(index)`
(the header option ``rate``), or `compress_to_size(image, bpp)`, which bisects q for the largest
file within a size (`TargetSizeCodec` wraps that as a codec, for the CLI and evaluation).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxcodec.checkpoint import (
    CODEC_FILE,
    Checkpointer,
    CheckpointError,
    CodecBundle,
    bundle_path,
    check_frozen_identity,
    load_bundle,
    read_frozen_record,
    save_bundle,
    tree_digest,
)
from jaxcodec.entropy import container
from jaxcodec.entropy.coder import CodingError
from jaxcodec.entropy.container import BitstreamError
from jaxcodec.methods import Method, Variables, get_method
from jaxcodec.methods.base import pad_to_multiple, padded_size

# Decoders refuse files that declare more pixels than this (≈ 8K UHD) unless told otherwise:
# a forged header must not make a decoder allocate what the machine does not have.
DEFAULT_MAX_PIXELS = 1 << 25
PREVIOUS_STAGE_FILE = "previous_stage.safetensors"


# ---------------------------------------------------------------------------------------------
# Frozen parts and stages
# ---------------------------------------------------------------------------------------------


def load_frozen(
    method: Method,
    stage_frozen: Mapping[str, Any],
    stage_source: str = "",
    *,
    decode_only: bool = False,
) -> tuple[dict[str, Any], dict[str, dict]]:
    """The method's frozen variables (pretrained parts loaded from their sources, plus previous
    stages' models) as host arrays, and the identity of each: source and SHA-256. A decoder
    (`decode_only`) skips the parts only training needs."""
    frozen, identity = {}, {}
    for name, part in method.pretrained().items():
        if decode_only and not part.decode:
            continue
        frozen[name] = jax.tree.map(np.asarray, part.load())
        identity[name] = {"source": part.source, "sha256": tree_digest(frozen[name])}
    for name, tree in stage_frozen.items():
        if name in frozen:
            raise ValueError(f"frozen part {name!r} is both pretrained and from a previous stage")
        frozen[name] = jax.tree.map(np.asarray, tree)
        identity[name] = {"source": stage_source, "sha256": tree_digest(tree), "bundled": True}
    return frozen, identity


def previous_stage(config: ml_collections.ConfigDict, workdir: Path) -> CodecBundle | None:
    """The model a stage starts from (`config.init_from`). Its bundle is copied into the
    workdir when the stage starts, so resuming never depends on the other workdir."""
    local = workdir / PREVIOUS_STAGE_FILE
    if local.is_file():
        return load_bundle(local)
    if not config.get("init_from"):
        return None
    source = bundle_path(config.init_from)
    bundle = load_bundle(source)
    if jax.process_index() == 0:
        tmp = local.with_name(f".{local.name}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(local)
    return bundle


def stage_start(method: Method, config, workdir: Path):
    """(StageStart, previous bundle or None) of a run in `workdir`."""
    from jaxcodec.methods import StageStart

    previous = previous_stage(config, workdir)
    if previous is None:
        return StageStart(), None
    return method.init_from(previous), previous


def build_bundle(
    method: Method,
    config: ml_collections.ConfigDict,
    params: Any,
    state: Any,
    stage_frozen: Mapping[str, Any],
    frozen_identity: dict[str, dict],
    step: int,
) -> CodecBundle:
    """A codec bundle from final host variables; builds the integer entropy tables (from the
    trained variables only: params, state and previous stages' models)."""
    # Logical-axis boxes (a method's `init` output) are training metadata: host arrays only.
    params, state = jax.tree.map(np.asarray, nn.unbox((params, state)))
    state = method.calibrate(Variables(params, state, dict(stage_frozen)))
    tables = method.entropy_tables(Variables(params, state, dict(stage_frozen)))
    return CodecBundle(
        config=config,
        params=params,
        state=state,
        tables=tables,
        frozen=dict(stage_frozen),
        frozen_identity=frozen_identity,
        step=step,
    )


# ---------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------


def _without_paths(config: Any) -> Any:
    """The model config less its `*_path` fields: where a frozen part lives is machine-local
    (`--set model.sd_path=...` on the decoding machine); what it holds is in the digests."""
    if isinstance(config, dict):
        return {k: _without_paths(v) for k, v in config.items() if not str(k).endswith("_path")}
    return config


def model_hash(
    method_name: str, model_config: Any, params, state, tables, frozen_identity: dict
) -> bytes:
    """SHA-256 over the method, its model config (paths left out), the trained variables, the
    entropy tables and the frozen parts' digests: the identity a file is tied to."""
    h = hashlib.sha256()
    h.update(method_name.encode())
    h.update(json.dumps(_without_paths(model_config), sort_keys=True, default=str).encode())
    for tree in (params, state, tables):
        h.update(tree_digest(tree).encode())
    digests = {k: v["sha256"] for k, v in frozen_identity.items()}
    h.update(json.dumps(digests, sort_keys=True).encode())
    return h.digest()


class MethodCodec:
    """An image codec (evaluation's `ImageCodec` interface: `name`, `compress`, `decompress`,
    `timings` in seconds) over a method's `BitstreamCoder`."""

    def __init__(
        self,
        method: Method,
        variables: Variables,
        tables,
        *,
        name: str,
        frozen_identity: dict | None = None,
        options: Mapping[str, Any] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        coder = method.coder
        if coder is None or tables is None:
            raise CheckpointError(
                f"method {method.name!r} stage {method.stage} writes no bitstream"
            )
        self.method, self.coder = method, coder
        self.variables, self.tables = variables, tables
        self.name = name
        self.max_pixels = int(max_pixels)
        declared = coder.options()
        unknown = set(options or {}) - set(declared)
        if unknown:
            raise ValueError(
                f"{method.name} stage {method.stage} has no decode option(s) {sorted(unknown)}; "
                f"it takes {sorted(declared) or 'none'}"
            )
        self.user_options = {
            k: container.option_value(v, k) for k, v in dict(options or {}).items()
        }
        index = self.user_options.get(container.RATE_OPTION, declared.get(container.RATE_OPTION))
        self.options = self._options_at(index, declared)
        model_cfg = method.config.model.to_dict() if "model" in method.config else {}
        self.hash = model_hash(
            method.name,
            model_cfg,
            variables.params,
            variables.state,
            tables,
            frozen_identity or {},
        )
        self.timings: dict[str, float] = {}
        self.last_info: dict[str, Any] = {}

    @property
    def model_id(self) -> str:
        return self.hash[: container.MODEL_ID_BYTES].hex()

    # --- Rate control (rate-conditioned models) ---------------------------------------------

    @property
    def rate_config(self):
        """The model's `jaxcodec.nn.rate.RateConfig`, or None for a fixed-rate model."""
        return self.coder.rate_config

    def _options_at(self, index: int | None, base: dict | None = None) -> dict[str, Any]:
        """Header options of a file at q's grid index: the coder's rate-dependent defaults
        (e.g. sampler steps) under the options given explicitly."""
        out = dict(self.coder.options() if base is None else base)
        if index is not None:
            index = self.rate_config.check_index(index)
            out |= self.coder.rate_options(index) | {container.RATE_OPTION: index}
        out |= self.user_options
        if index is not None:
            out[container.RATE_OPTION] = index
        return {k: container.option_value(v, k) for k, v in out.items()}

    def _require_rate(self, what: str):
        if self.rate_config is None:
            raise ValueError(
                f"{what} needs a rate-conditioned model; {self.name} has one fixed rate "
                "(train one with the config's variable_rate=1)"
            )
        return self.rate_config

    def at_rate(self, index: int) -> MethodCodec:
        """This codec writing files at q's grid index (shares the model and compiled code)."""
        rate = self._require_rate("a rate index")
        out = copy.copy(self)
        out.options = self._options_at(rate.check_index(index))
        out.name = f"{self.name}-q{rate.quality_of_index(index):g}"
        return out

    def at_quality(self, quality: float) -> MethodCodec:
        """`--quality Q`: Q ∈ [0, 100] runs linearly over q (log-linearly over λ)."""
        return self.at_rate(self._require_rate("--quality").index_of_quality(quality))

    def compress_to_size(self, image: np.ndarray, target_bpp: float) -> bytes:
        """The file at the largest q whose size (header included) is ≤ `target_bpp`, found by
        bisection over q's grid; each probe is a real encode of the same analysis (computed
        once). When even the lowest q is larger, its file is returned: the nearest reachable
        rate. `last_search` reports the outcome."""
        rate = self._require_rate("--target-bpp")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        if not target_bpp > 0 or not np.isfinite(target_bpp):
            raise ValueError(f"target bpp {target_bpp} must be a positive number")
        h, w = image.shape[:2]
        max_bytes = int(np.floor(target_bpp * h * w / 8.0))
        t0 = time.perf_counter()
        analysis = self.coder.analyse(self.variables, pad_to_multiple(image, self.coder.stride))
        t1 = time.perf_counter()
        files: dict[int, tuple[bytes, dict]] = {}

        def size(index: int) -> int:
            options = self._options_at(index)
            streams, info = self.coder.encode_analysed(
                self.variables, self.tables, analysis, options
            )
            header = container.Header(h, w, self.hash[: container.MODEL_ID_BYTES], options)
            files[index] = (container.pack(header, streams, self.hash), info)
            return len(files[index][0])

        lo, hi = 0, rate.levels - 1
        if size(hi) <= max_bytes:
            best = hi
        elif size(lo) > max_bytes:
            best = lo  # unreachable: the smallest file this model makes
        else:  # size(lo) ≤ max_bytes < size(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if size(mid) <= max_bytes else (lo, mid)
            best = lo
        data, info = files[best]
        self.timings = {"encode": time.perf_counter() - t0, "analysis": t1 - t0}
        self.last_info = info
        self.last_search = {
            "rate": best,
            "quality": rate.quality_of_index(best),
            "bpp": 8.0 * len(data) / (h * w),
            "target_bpp": float(target_bpp),
            "reached": len(data) <= max_bytes,
            "probes": len(files),
        }
        return data

    def compress(self, image: np.ndarray) -> bytes:
        return self.compress_batch([image])[0]

    def compress_batch(self, images: Sequence[np.ndarray]) -> list[bytes]:
        """Compresses images of one padded size together (the coder's `compress_batch`); each
        file is byte for byte what `compress` makes of that image alone."""
        images = [np.asarray(image) for image in images]
        if not images:
            return []
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        s = self.coder.stride
        if len({padded_size(image.shape[:2], s) for image in images}) != 1:
            raise ValueError("compress_batch needs images of one padded size")
        t0 = time.perf_counter()
        padded = np.stack([pad_to_multiple(image, s) for image in images])
        coded = self.coder.compress_batch(self.variables, self.tables, padded, self.options)
        files = []
        for image, (streams, _) in zip(images, coded, strict=True):
            h, w = image.shape[:2]
            header = container.Header(h, w, self.hash[: container.MODEL_ID_BYTES], self.options)
            files.append(container.pack(header, streams, self.hash))
        info = coded[-1][1]  # the last image's breakdown
        self.timings = {"encode": time.perf_counter() - t0}
        self.timings |= {k: v for k, v in info.items() if k.endswith("_s")}
        self.last_info = info
        return files

    def read_header(self, data: bytes) -> container.Header:
        """The header of a file, after every check `decompress` makes before decoding."""
        return self._unpack(data)[0]

    def _unpack(self, data: bytes) -> tuple[container.Header, list[bytes]]:
        return container.unpack(
            data,
            self.hash,
            num_streams=self.coder.num_streams,
            options=self.options.keys(),
            max_pixels=self.max_pixels,
        )

    def decompress(self, data: bytes) -> np.ndarray:
        t0 = time.perf_counter()
        header, streams = self._unpack(data)
        hw = padded_size((header.height, header.width), self.coder.stride)
        rng = jax.random.key(int(header.options.get("seed", 0)))
        try:
            image, info = self.coder.decompress(
                self.variables, self.tables, streams, hw, header.options, rng
            )
        except (CodingError, ArithmeticError) as exc:  # garbage that passed the checksum
            raise BitstreamError(f"undecodable stream: {exc}") from None
        self.timings = {"decode": time.perf_counter() - t0}
        self.timings |= {k: v for k, v in info.items() if k.endswith("_s")}
        self.last_info = info
        return np.ascontiguousarray(image[: header.height, : header.width])

    def decompress_batch(self, files: Sequence[bytes]) -> list[np.ndarray]:
        """Decodes files of one padded size and the same options together; each image is pixel
        for pixel what `decompress` makes of that file alone."""
        parsed = [self._unpack(d) for d in files]
        if not parsed:
            return []
        s = self.coder.stride
        sizes = {padded_size((h.height, h.width), s) for h, _ in parsed}
        options = {json.dumps(h.options, sort_keys=True) for h, _ in parsed}
        if len(sizes) != 1 or len(options) != 1:
            raise ValueError("decompress_batch needs files of one padded size and options")
        head = parsed[0][0]
        t0 = time.perf_counter()
        try:
            images = self.coder.decompress_batch(
                self.variables,
                self.tables,
                [streams for _, streams in parsed],
                sizes.pop(),
                head.options,
                jax.random.key(int(head.options.get("seed", 0))),
            )
        except (CodingError, ArithmeticError) as exc:  # garbage that passed the checksum
            raise BitstreamError(f"undecodable stream: {exc}") from None
        self.timings = {"decode": time.perf_counter() - t0}
        return [
            np.ascontiguousarray(im[: h.height, : h.width])
            for im, (h, _) in zip(images, parsed, strict=True)
        ]


class TargetSizeCodec:
    """A rate-conditioned codec whose every file is the largest within `target_bpp`
    (`MethodCodec.compress_to_size`); anything else is the wrapped codec's."""

    def __init__(self, codec: MethodCodec, target_bpp: float):
        codec._require_rate("--target-bpp")
        self.codec, self.target_bpp = codec, float(target_bpp)
        self.name = f"{codec.name}-target{self.target_bpp:g}bpp"

    def __getattr__(self, name: str):
        return getattr(self.codec, name)

    def compress(self, image: np.ndarray) -> bytes:
        data = self.codec.compress_to_size(image, self.target_bpp)
        self.last_search = self.codec.last_search
        return data

    def compress_batch(self, images: Sequence[np.ndarray]) -> list[bytes]:
        return [self.compress(image) for image in images]


def rate_controlled(
    codec: MethodCodec, quality: float | None = None, target_bpp: float | None = None
) -> MethodCodec | TargetSizeCodec:
    """The codec at `--quality Q`, or hitting `--target-bpp X`, or as it is (neither)."""
    if quality is not None and target_bpp is not None:
        raise ValueError("give --quality or --target-bpp, not both")
    if quality is not None:
        return codec.at_quality(quality)
    if target_bpp is not None:
        return TargetSizeCodec(codec, target_bpp)
    return codec


def _apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """`key.sub=value` strings (values parsed as JSON when they parse, else strings): e.g. a
    local path of pretrained weights on the decoding machine."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value


def parse_options(items: Sequence[str]) -> dict[str, float]:
    """`["steps=4", "seed=3"]` → `{"steps": 4.0, "seed": 3.0}` (the coder types them)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"option {item!r} is not NAME=NUMBER") from None
    return options


def load_codec(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> MethodCodec:
    """The codec of a bundle file or of a workdir's final bundle (`codec.safetensors`; in a
    multi-stage workdir, that of its last finished stage: `checkpoint.bundle_path`)."""
    source = bundle_path(path)
    bundle = load_bundle(source)
    _apply_overrides(bundle.config, overrides)
    method = get_method(bundle.config)
    frozen, identity = load_frozen(method, bundle.frozen, f"{source} (bundled)", decode_only=True)
    training_only = {n for n, p in method.pretrained().items() if not p.decode}
    expected = {k: v for k, v in bundle.frozen_identity.items() if k not in training_only}
    check_frozen_identity(expected, identity, f"the model in {source}")
    variables = Variables(bundle.params, bundle.state, frozen)
    cfg = bundle.config
    name = f"{cfg.method}-{cfg.get('variant', '')}-step{bundle.step}".replace("--", "-")
    codec = MethodCodec(
        method,
        variables,
        bundle.tables,
        name=name,
        frozen_identity=bundle.frozen_identity,
        options=options,
        max_pixels=max_pixels,
    )
    codec.source = source  # the bundle file `path` resolved to (a multi-stage workdir's last)
    return codec


def decompress_batch(codec: MethodCodec, files: list[bytes]) -> list[np.ndarray]:
    return codec.decompress_batch(files)


# ---------------------------------------------------------------------------------------------
# Writing bundles
# ---------------------------------------------------------------------------------------------


def export(workdir: str | Path, out: str | Path | None = None, *, step: int | None = None) -> Path:
    """Writes the codec bundle of a training checkpoint (default: the latest) — restorable on
    any device or host count; the optimiser state is never read."""
    from jaxcodec.configlib import load_workdir_config

    workdir = Path(workdir)
    config = load_workdir_config(workdir)
    method = get_method(config)
    if not (workdir / "checkpoints").is_dir():
        raise CheckpointError(f"no checkpoints in {workdir}")
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps():
        ckpt.close()
        raise CheckpointError(f"no checkpoint {step if step is not None else ''} in {workdir}")
    host = ckpt.restore_host(step, ("ema_params", "model_state"))
    ckpt.close()
    start, previous = stage_start(method, config, workdir)
    identity = read_frozen_record(workdir) or {}
    bundle = build_bundle(
        method, config, host["ema_params"], host["model_state"], start.frozen, identity, step
    )
    return save_bundle(out or workdir / CODEC_FILE, bundle)


def save_codec(
    path: str | Path,
    config: ml_collections.ConfigDict,
    params: Any,
    state: Any = None,
    *,
    step: int = 0,
    stage_frozen: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a bundle for given variables (e.g. converted weights); a directory `path` gets
    `codec.safetensors` and `config.json`, like a finished training workdir."""
    path = Path(path)
    method = get_method(config)
    stage_frozen = dict(stage_frozen or {})
    _, identity = load_frozen(method, stage_frozen, "save_codec")
    bundle = build_bundle(method, config, params, state or {}, stage_frozen, identity, step)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        path = path / CODEC_FILE
    return save_bundle(path, bundle)
