"""Training entry point: `python -m jaxcodec.train --config configs/hfd.py:tiny --workdir DIR`.

Sections, in order: data → model shapes → previous stage and frozen parts → mesh and shardings
→ jitted init (or restore) → jitted train step → loop (metrics, evaluation, checkpoints,
non-finite guard) → codec bundle and real files.

The console shows one line per log interval and the final result; everything libraries log
(orbax, clu, absl) goes to `WORKDIR/train.log`.
"""

import contextlib
import dataclasses
import functools
import json
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxcodec import sharding as shd
from jaxcodec import throughput as tput
from jaxcodec.checkpoint import (
    CODEC_FILE,
    FROZEN_FILE,
    Checkpointer,
    CodecBundle,
    TrainState,
    abstract_like,
    check_frozen_identity,
    read_frozen_record,
    save_bundle,
)
from jaxcodec.codec import build_bundle, load_frozen, stage_start
from jaxcodec.methods import Method, StageStart, Variables
from jaxcodec.methods.base import pad_to_multiple, to_float
from jaxcodec.nn import layers
from jaxcodec.train_shapes import (  # noqa: F401  (re-exported: the loop's public API)
    ModelShapes,
    jit_init,
    make_optimizer,
    make_schedule,
    merge_params,
    model_shapes,
    param_labels,
    shardings,
)
from jaxcodec.train_shapes import mesh_devices as _devices


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------


def _micro_batches(batch: dict[str, jax.Array], accum_steps: int) -> dict[str, jax.Array]:
    """[B, ...] → [accum_steps, B / accum_steps, ...]: micro-batch i takes examples i,
    i + accum_steps, ..., so each keeps its share of every data-parallel device's examples."""

    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _constrain_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: layers.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), batch)


def accumulated_gradients(
    loss_fn: Callable, params: Any, model_state: Any, batch: dict[str, jax.Array], key, steps: int
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """Mean loss, metrics and gradients over `steps` micro-batches of `batch`, one at a time
    (`lax.scan`: the activations of one micro-batch live at once), the mutable model state
    threaded through them in order. `loss_fn(params, model_state, batch, key)` returns
    `(loss, (metrics, model_state))`; micro-batch i draws its randomness from `fold_in(key, i)`.
    For a loss that is a mean over examples the result equals the whole batch's."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro = _micro_batches(batch, steps)
    first = jax.tree.map(lambda x: x[0], micro)
    _, (metrics_shape, _) = jax.eval_shape(loss_fn, params, model_state, first, key)
    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731

    def body(carry, xs):
        grads, state, loss_sum, metric_sums = carry
        i, mb = xs
        (loss, (metrics, state)), g = grad_fn(
            params, state, _constrain_batch(mb), jax.random.fold_in(key, i)
        )
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        metric_sums = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), metric_sums, metrics)
        return (grads, state, loss_sum + loss.astype(jnp.float32), metric_sums), None

    carry = (zeros(params), model_state, jnp.zeros((), jnp.float32), zeros(metrics_shape))
    (grads, model_state, loss, metrics), _ = jax.lax.scan(body, carry, (jnp.arange(steps), micro))
    scale = 1.0 / steps
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
    metrics = jax.tree.map(lambda m, ref: (m * scale).astype(ref.dtype), metrics, metrics_shape)
    return loss * scale, metrics, model_state, grads


def train_step(
    state: TrainState,
    frozen: Any,
    batch: dict[str, jax.Array],
    *,
    method: Method,
    tx: optax.GradientTransformation,
    base_key: jax.Array,
    ema_decay: float,
    labels: Any = None,
    accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step. Only the trainable params are differentiated (frozen parts get no
    gradient computation at all); the mutable model state is what the loss returns. A step whose
    loss or gradients are not finite changes nothing but the counters (the batch is still
    consumed, so the data order never depends on it). With `accum_steps` > 1 the batch is
    split into that many micro-batches whose gradients are averaged (`accumulated_gradients`)."""
    key = jax.random.fold_in(base_key, state.step)

    def loss_fn(params, model_state, batch, key):
        loss, metrics, model_state = method.loss(params, frozen, model_state, batch, key)
        return loss, (metrics, model_state)

    if accum_steps > 1:
        loss, metrics, model_state, grads = accumulated_gradients(
            loss_fn, state.params, state.model_state, batch, key, accum_steps
        )
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, model_state)), grads = grad_fn(
            state.params, state.model_state, _constrain_batch(batch), key
        )
    # Gradients are all finite iff their squared norm is (a square past float32's range counts
    # as not finite too): one reduction per leaf that the norm needs anyway, where a separate
    # finiteness test per leaf would double XLA's kernels for it (and its compile time).
    # Parameters frozen by regex get gradients but no updates: they count for finiteness, not
    # for the norm shown.
    if labels is None:
        shown, hidden = grads, []
    else:
        pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(labels), strict=True))
        shown = [g for g, lab in pairs if lab != "frozen"]
        hidden = [g for g, lab in pairs if lab == "frozen"]
    shown_sq = optax.tree.norm(shown, squared=True)
    finite = jnp.isfinite(loss) & jnp.isfinite(shown_sq + optax.tree.norm(hidden, squared=True))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep(model_state, state.model_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, grad_norm=jnp.sqrt(shown_sq), step_finite=finite)
    return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def host_params(tree: Any) -> Any:
    """The full value of (possibly sharded, multi-host) arrays as numpy on every process (a
    collective: every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


class Evaluator:
    """Per-image metrics of the EMA model on full images, on the training mesh: compiled once
    per image size, with the parameters where training keeps them (nothing re-uploaded)."""

    def __init__(self, method: Method, mesh, seed: int, rules: shd.Rules = ()):
        self.mesh, self.rules = mesh, list(rules)
        self.key = jax.random.key(seed)
        self._fn = jax.jit(method.evaluate, static_argnums=2, out_shardings=shd.replicated(mesh))

    def __call__(
        self, variables: Variables, images: list[tuple[str, np.ndarray]], stride: int
    ) -> tuple[dict[str, float], list[np.ndarray]]:
        per_image, recons = [], []
        replicated = shd.replicated(self.mesh)
        for i, (_, image) in enumerate(images):
            h, w = image.shape[:2]
            x = np.asarray(to_float(pad_to_multiple(image, stride)[None]))
            x = jax.make_array_from_callback(x.shape, replicated, lambda idx, x=x: x[idx])
            with shd.scope(self.mesh, self.rules):
                metrics, recon = self._fn(variables, x, (h, w), jax.random.fold_in(self.key, i))
            per_image.append({k: np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
            recons.append(np.asarray(recon.addressable_data(0))[0])
        mean = {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}
        return mean, recons


def real_file_evaluation(
    codec, images: list[tuple[str, np.ndarray]], out_dir: Path, num_decoded_saved: int = 2
) -> dict[str, Any]:
    """Compresses each image to a real `.jxc` file and decodes it again: bpp from file sizes
    (header included), PSNR, LPIPS (AlexNet) and DISTS of the decoded 8-bit image, and a
    side-by-side PNG of the first image (original | stage-1 reconstruction, if the method has
    one | decoded). A method whose decoder refines a stage-1 reconstruction of the same file
    (HFD stage 2) also gets that reconstruction's metrics, under `stage1_reconstruction`."""
    from PIL import Image

    from jaxcodec.metrics import dists, dists_params, lpips, lpips_params

    out_dir.mkdir(parents=True, exist_ok=True)
    alex, vgg = lpips_params("alex"), dists_params()

    def quality(image, recon) -> dict[str, float]:
        mse = np.mean((recon.astype(np.float64) - image.astype(np.float64)) ** 2)
        return {
            "psnr": 10.0 * np.log10(255.0**2 / max(mse, 1e-12)),
            "lpips": float(lpips(image[None], recon[None], params=alex)[0]),
            "dists": float(dists(image[None], recon[None], params=vgg)[0]),
        }

    rows: list[dict[str, float]] = []
    stage1_rows: list[dict[str, float]] = []
    side_by_side = None
    for i, (name, image) in enumerate(images):
        stem = Path(name).stem or f"image{i}"
        data = codec.compress(image)
        (out_dir / f"{stem}.jxc").write_bytes(data)
        decoded = codec.decompress(data)
        middle = codec.last_info.get("stage1_reconstruction")
        if middle is not None:
            middle = np.asarray(middle)[: image.shape[0], : image.shape[1]]
            stage1_rows.append(quality(image, middle))
        if i < num_decoded_saved:
            Image.fromarray(decoded).save(out_dir / f"{stem}_decoded.png")
        if i == 0:
            panels = [image] + ([] if middle is None else [middle])
            side_by_side = out_dir / f"{stem}_side_by_side.png"
            Image.fromarray(np.concatenate([*panels, decoded], axis=1)).save(side_by_side)
        bpp = 8.0 * len(data) / (image.shape[0] * image.shape[1])
        rows.append({"bpp": bpp, **quality(image, decoded)})
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    if stage1_rows:
        out["stage1_reconstruction"] = {
            k: float(np.mean([r[k] for r in stage1_rows])) for k in stage1_rows[0]
        }
    return out | {"files": len(rows), "side_by_side": str(side_by_side)}


def stage_comparison(stages: list[tuple[int, dict[str, Any]]]) -> str | None:
    """The final real-file figures of trained stages, `(stage number, run summary)`, side by
    side: one row per stage, and for a stage that refines a stage-1 reconstruction of its own
    files, that reconstruction's row too (the same files, so the same bpp). None unless two or
    more stages have them."""
    rows, shown = [], 0
    for n, summary in stages:
        rf = summary.get("real_files") or {}
        if not rf:
            continue
        shown += 1
        inner = rf.get("stage1_reconstruction")
        if inner:
            rows.append((f"stage {n}'s files, stage-1 decode", {"bpp": rf["bpp"], **inner}))
        rows.append((f"stage {n}", rf))
    if shown < 2:
        return None
    keys = ("bpp", "psnr", "lpips", "dists")
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{k.upper():>7}" for k in keys)]
    for name, rf in rows:
        lines.append(
            f"{name:{width}}  "
            + "  ".join(f"{rf[k]:7.4f}" if k in rf else f"{'-':>7}" for k in keys)
        )
    last = stages[-1][1].get("real_files") or {}
    if last.get("side_by_side"):
        lines.append(
            f"side by side (original | stage-1 reconstruction | decoded): {last['side_by_side']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM (preemption) into a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@contextlib.contextmanager
def _library_log(workdir: Path):
    """Sends all Python/absl logging (orbax, clu, jax, our own details) and warnings to
    WORKDIR/train.log for the duration of a run, so the console keeps the project's lines."""
    import logging as pylogging

    root = pylogging.getLogger()
    saved = root.handlers[:], root.level
    stream = open(workdir / "train.log", "a", buffering=1)  # noqa: SIM115
    handler = pylogging.StreamHandler(stream)
    handler.setFormatter(logging.PythonFormatter())
    root.handlers = [handler]
    root.setLevel(pylogging.INFO)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    pylogging.captureWarnings(True)
    try:
        yield workdir / "train.log"
    finally:
        pylogging.captureWarnings(False)
        logging.set_verbosity(verbosity)
        root.handlers, level = saved
        root.setLevel(level)
        stream.close()


def _console(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


# Fields a run cannot change when it resumes: they define the checkpoint's parameters.
FIXED_ON_RESUME = ("method", "stage", "model", "init_from")


def _check_resumable(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuses, with the differing fields named, to resume a workdir whose checkpoints were
    trained with another model (orbax would fail later with a shape error, or worse not)."""
    path = workdir / "config.json"
    if not path.exists() or not (workdir / "checkpoints").is_dir():
        return
    saved = json.loads(path.read_text())
    now = json.loads(config.to_json_best_effort())
    diffs = []
    for key in FIXED_ON_RESUME:
        a, b = _flatten_json(saved.get(key), key), _flatten_json(now.get(key), key)
        diffs += [
            f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)
        ]
    if diffs:
        raise ValueError(
            f"{workdir} holds checkpoints of another model ({'; '.join(diffs)}); "
            "use a new --workdir or the original settings"
        )


def _check_frozen(workdir: Path, identity: dict[str, dict]) -> None:
    """A resume with other frozen weights is refused; a new run records its frozen parts."""
    recorded = read_frozen_record(workdir)
    if recorded is not None and (workdir / "checkpoints").is_dir():
        check_frozen_identity(recorded, identity, f"the checkpoints in {workdir}")
    if jax.process_index() == 0:
        (workdir / FROZEN_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def _flatten_json(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten_json(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def _make_writer(workdir: Path):
    from clu import metric_writers

    return metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0, asynchronous=False
    )


def _eval_images(config: ml_collections.ConfigDict) -> list[tuple[str, np.ndarray]]:
    from jaxcodec.data import load_eval_images

    return load_eval_images(config.eval_data, max_images=config.eval_data.get("max_images"))


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays → global arrays with the given shardings (every process holds the full
    value and contributes its addressable shards)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: x[idx]),
        tree,
        shardings,
    )


class Prefetcher:
    """Global device batches, transferred `size` steps ahead of the step that uses them.

    `get_state()` is the data iterator's position after the last batch handed out (not after
    the ones in flight), so a checkpoint resumes with the next unused batch.
    """

    def __init__(self, data_iter, mesh, size: int = 2):
        self.data_iter, self.mesh, self.size = data_iter, mesh, max(0, size)
        self.queue: deque = deque()
        self.state = data_iter.get_state()

    def _pull(self) -> None:
        batch = shd.global_batch(next(self.data_iter), self.mesh)
        self.queue.append((batch, self.data_iter.get_state()))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while len(self.queue) <= self.size:
            self._pull()
        batch, self.state = self.queue.popleft()
        return batch

    def get_state(self) -> dict:
        return self.state


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """The global batch must split over the data-parallel devices and the micro-batches."""
    shards = shd.data_parallel_size(mesh)
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"grad_accum_steps={accum}: use 1 (no accumulation) or more")
    if config.batch_size % (shards * accum):
        raise ValueError(
            f"batch_size {config.batch_size} does not split over the {shards} data-parallel "
            f"devices of mesh {dict(mesh.shape)}"
            + (f" times {accum} micro-batches" if accum > 1 else "")
            + f"; use a multiple of {shards * accum} (or --config.mesh.num_devices)"
        )


def make_train_step(config, shapes: ModelShapes, mesh, state_shardings, frozen_shardings):
    """The jitted, donating train step `(state, frozen, batch) → (state, metrics)`."""
    return jax.jit(
        functools.partial(
            train_step,
            method=shapes.method,
            tx=shapes.tx,
            base_key=shapes.base_key,
            ema_decay=config.ema_decay,
            labels=shapes.labels,
            accum_steps=int(config.get("grad_accum_steps", 1)),
        ),
        in_shardings=(state_shardings, frozen_shardings, shd.batch_sharding(mesh)),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )


def compile_train_step(config, step_fn, mesh, rules, *args):
    """Traces and compiles the step for `args` (arrays or `ShapeDtypeStruct`s with shardings)
    inside the mesh and rules scope; returns the executable and its `Throughput` (XLA's FLOPs
    per device, the configured or built-in peak of this device kind)."""
    with shd.scope(mesh, rules):
        traced = step_fn.trace(*args)
        compiled = traced.lower().compile()
    flops = tput.step_flops(compiled, traced.jaxpr)
    peak = tput.peak_tflops(jax.devices()[0].device_kind, config.get("peak_tflops", 0.0))
    return compiled, tput.Throughput(int(config.batch_size), flops, peak)


def _compiled_line(speed: tput.Throughput, device_kind: str) -> str:
    flops = speed.flops_per_step
    text = "compiled the train step: "
    text += f"{flops / 1e9:.4g} GFLOP per device per step" if flops else "no FLOP count from XLA"
    if speed.peak:
        text += f"; peak {speed.peak:g} TFLOP/s per device ({device_kind})"
    else:
        text += f"; no peak known for {device_kind!r} (config.peak_tflops sets one: MFU)"
    return text


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Trains until `config.total_steps`, resuming from the latest checkpoint in `workdir`,
    then writes the codec bundle (`codec.safetensors`) and real files of the eval images.

    Returns a summary: the logged training metrics per step, the last evaluation, the real
    files' measured bpp/PSNR and the number of skipped (non-finite) steps.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with _library_log(workdir):
        return _train(config, workdir, on_step)


def _train(config, workdir: Path, on_step) -> dict[str, Any]:
    _check_resumable(config, workdir)
    total_steps = int(config.total_steps)
    finished = _finished_run(workdir, total_steps)
    if finished is not None:
        _console(f"{workdir} is already trained to step {total_steps}: {CODEC_FILE} is there")
        return finished
    _write_config(config, workdir)
    writer = _make_writer(workdir)

    # --- Data ------------------------------------------------------------------------------
    data_iter = _train_iterator(config)

    # --- Model shapes ------------------------------------------------------------------------
    shapes = model_shapes(config)
    method = shapes.method

    # --- Previous stage and frozen parts -----------------------------------------------------
    parts = _frozen_parts(config, method, workdir)

    # --- Mesh and shardings ------------------------------------------------------------------
    layout = _layout(config, shapes, parts.host)
    frozen = place(parts.host, layout.frozen)
    _console(_model_line(config, shapes, parts, layout.mesh, workdir))

    # --- Jitted init, or restore -------------------------------------------------------------
    async_save = bool(config.get("checkpoint_async", False))
    ckpt = Checkpointer(workdir, max_to_keep=config.keep_checkpoints, async_save=async_save)
    run = _Run(config, workdir, method, layout, parts, frozen, ckpt, writer)
    state, start_step = _init_or_restore(run, shapes, data_iter)
    memory = _bytes_per_device(state, frozen)
    logging.info("bytes per device: %s", memory)

    # --- Jitted train step (compiled at the first batch, in the mesh and rules scope) ---------
    step_fn = make_train_step(config, shapes, layout.mesh, layout.state, layout.frozen)

    # --- Loop (metrics, evaluation, checkpoints, non-finite guard; the bundle at the end) ------
    batches = Prefetcher(data_iter, layout.mesh, size=int(config.get("prefetch", 2)))
    loop = _loop(run, state, start_step, step_fn, batches, on_step)

    # --- Real files of the codec bundle -------------------------------------------------------
    real_files, outputs = {}, {}
    if loop.bundle is not None and jax.process_index() == 0:
        if method.coder is not None and config.get("real_file_eval", True):
            real_files = _real_files(run, loop)
        outputs = _method_outputs(run, loop)
    jax.block_until_ready(loop.state)
    ckpt.close()
    writer.flush()

    # --- Summary -----------------------------------------------------------------------------
    summary = _summary(run, loop, start_step, memory, real_files, outputs)
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@dataclasses.dataclass
class FrozenParts:
    """How the stage starts from the previous one, and every frozen part as host arrays with
    its identity (source and digest)."""

    start: StageStart
    host: Any
    identity: dict[str, dict]


@dataclasses.dataclass
class Layout:
    """The mesh, its logical-axis rules, and where the train state and frozen parts live."""

    mesh: Any
    rules: list
    state: Any  # train-state shardings
    frozen: Any  # frozen-part shardings


@dataclasses.dataclass
class _Run:
    """What the loop runs on, built section by section before the first step."""

    config: ml_collections.ConfigDict
    workdir: Path
    method: Method
    layout: Layout
    parts: FrozenParts
    frozen: Any  # placed on the mesh
    ckpt: Checkpointer
    writer: Any


def _train_iterator(config: ml_collections.ConfigDict):
    """This process's share of every global batch, resumable (`get_state` / `set_state`)."""
    from jaxcodec.data import make_train_iterator

    return make_train_iterator(
        config.data,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _frozen_parts(config, method: Method, workdir: Path) -> FrozenParts:
    """The previous stage's model (copied into the workdir) and the pretrained parts, loaded
    once; a resume with other frozen weights than the workdir recorded is refused."""
    start, previous = stage_start(method, config, workdir)
    source = f"{config.get('init_from')} (step {previous.step})" if previous else ""
    host, identity = load_frozen(method, start.frozen, source)
    _check_frozen(workdir, identity)
    return FrozenParts(start, host, identity)


def _layout(config, shapes: ModelShapes, frozen_host: Any) -> Layout:
    """The mesh over the configured devices (the batch must split over it) and the shardings
    of the train state and the frozen parts."""
    mesh = shd.create_mesh(config.mesh.shape, config.mesh.axes, _devices(config))
    check_batch(config, mesh)
    state_shardings, frozen_shardings = shardings(config, mesh, shapes, frozen_host)
    return Layout(mesh, shd.rules_of(config), state_shardings, frozen_shardings)


def _model_line(config, shapes: ModelShapes, parts: FrozenParts, mesh, workdir: Path) -> str:
    """The console's first line: what trains, on what mesh, and where the log goes."""
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.abstract_params))
    num_frozen = sum(int(np.size(x)) for x in jax.tree.leaves(parts.host))
    return (
        f"{config.method} stage {shapes.method.stage} ({config.get('variant', '')}): "
        f"{num_params:,} trainable parameters, {num_frozen:,} frozen; mesh {dict(mesh.shape)}; "
        f"log: {workdir / 'train.log'}"
    )


def _init_or_restore(run: _Run, shapes: ModelShapes, data_iter) -> tuple[TrainState, int]:
    """(train state, its step): the latest checkpoint with the data iterator's position, or
    the jitted init with what the previous stage hands over, placed on the mesh."""
    layout, ckpt = run.layout, run.ckpt
    start_step = ckpt.latest_step()
    if start_step is not None:
        target = abstract_like(nn.unbox(shapes.abstract_state), layout.state)
        state, data_state = ckpt.restore(start_step, target)
        if data_state is not None:
            data_iter.set_state(data_state)
        else:
            logging.warning("checkpoint %d has no data-iterator state: data restarts", start_step)
        _console(f"resumed from step {start_step} in {run.workdir}")
        return state, start_step
    init_state, start = shapes.init_state, run.parts.start
    with shd.scope(layout.mesh, layout.rules):
        state = jit_init(
            init_state, shapes.init_key, start.params, start.state, out_shardings=layout.state
        )
    return state, 0


def _bytes_per_device(state: TrainState, frozen: Any) -> dict[str, int]:
    return {
        "params": shd.array_bytes_per_device(state.params),
        "ema_params": shd.array_bytes_per_device(state.ema_params),
        "opt_state": shd.array_bytes_per_device(state.opt_state),
        "model_state": shd.array_bytes_per_device(state.model_state),
        "frozen": shd.array_bytes_per_device(frozen),
    }


@dataclasses.dataclass
class _Clock:
    """Seconds of training between log lines: evaluation and checkpoints are left out."""

    t_first: float  # after the first step of this run (which compiles)
    first_step: int
    t_log: float
    log_step: int
    paused: float = 0.0  # evaluation and checkpoint seconds since the last log line
    train_seconds: float = 0.0

    @classmethod
    def start(cls, step: int) -> "_Clock":
        now = time.perf_counter()
        return cls(now, step, now, step)

    def lap(self, step: int) -> float:
        """Steps per second since the last log line (0 if none ran)."""
        now = time.perf_counter()
        busy = now - self.t_log - self.paused
        rate = (step - self.log_step) / busy if step > self.log_step and busy > 0 else 0.0
        self.train_seconds += max(busy, 0.0) if step > self.log_step else 0.0
        self.t_log, self.log_step, self.paused = now, step, 0.0
        return rate


class _MetricLog:
    """The steps' metrics, fetched once per log interval: written to the metric writer and the
    history, shown as one console line, and checked for a run of non-finite steps."""

    def __init__(self, run: _Run, on_step: Callable[[int, dict], None] | None):
        self.run, self.on_step = run, on_step
        self.total_steps = int(run.config.total_steps)
        self.max_streak = int(run.config.max_consecutive_nonfinite)
        self.keys = ("loss", *run.method.console_metrics)
        self.pending: list[dict[str, jax.Array]] = []
        self.history: list[dict[str, float]] = []
        self.streak = 0  # consecutive non-finite steps, read from the metrics at log time

    def flush(self, step: int, state: TrainState, clock: _Clock, speed) -> None:
        fetched = jax.device_get(self.pending)  # waits for the interval's steps to finish
        rate = clock.lap(step)  # after the wait: dispatch alone runs ahead of the steps
        self.pending = []
        self._check_finite(fetched)
        logged = _mean_metrics(fetched)
        logged["nonfinite_total"] = float(state.nonfinite_total)
        writer = self.run.writer
        writer.write_scalars(step, logged)
        self.history.append({"step": step, **logged})
        eta = _format_duration((self.total_steps - step) / rate) if rate else "?"
        shown = "  ".join(f"{k} {logged[k]:.4g}" for k in self.keys if k in logged)
        skipped = f"  skipped {int(logged['nonfinite_total'])}" if self.streak else ""
        speed_text = ""
        if rate:
            perf = speed.at(rate)
            writer.write_scalars(step, {f"perf/{k}": v for k, v in perf.items()})
            speed_text = "  " + speed.format(perf)
        _console(
            f"step {step}/{self.total_steps}  {shown}  {rate:.2f} steps/s{speed_text}  "
            f"ETA {eta}{skipped}"
        )
        if self.on_step is not None:
            self.on_step(step, logged)

    def _check_finite(self, fetched: list[dict[str, Any]]) -> None:
        for m in fetched:
            self.streak = 0 if bool(m["step_finite"]) else self.streak + 1
            if self.streak >= self.max_streak:
                ckpt = self.run.ckpt
                ckpt.close()
                raise NonFiniteError(
                    f"{self.streak} consecutive steps had a non-finite loss or gradients "
                    f"(limit config.max_consecutive_nonfinite={self.max_streak}); last good "
                    f"checkpoint: step {ckpt.latest_step()} in {self.run.workdir}"
                )


@dataclasses.dataclass
class _LoopEnd:
    """Where the loop stopped and what it gathered on the way."""

    state: TrainState
    step: int  # the last step run
    clock: _Clock
    history: list[dict[str, float]]
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    speed: tput.Throughput | None = None  # None when no step ran
    bundle: CodecBundle | None = None  # written after the final step
    preempted: bool = False
    eval_images: list[tuple[str, np.ndarray]] | None = None  # loaded at the first evaluation


def _loop(run: _Run, state, start_step: int, step_fn, batches, on_step) -> _LoopEnd:
    """Steps from `start_step` to `config.total_steps`: the step (compiled at the first batch),
    log lines, evaluations, checkpoints, and the codec bundle after the final step; stops
    early with a checkpoint on SIGTERM."""
    from clu import periodic_actions

    config, ckpt, writer, layout = run.config, run.ckpt, run.writer, run.layout
    total_steps = int(config.total_steps)
    compiled_step, speed = None, None
    hooks = []
    if jax.process_index() == 0:
        hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer))
    log = _MetricLog(run, on_step)
    evaluator = Evaluator(run.method, layout.mesh, config.seed, layout.rules)
    stride = run.method.stride
    writer.write_hparams(
        {k: v for k, v in _flat(config).items() if isinstance(v, int | float | str | bool)}
    )
    async_save = bool(config.get("checkpoint_async", False))
    end = _LoopEnd(state, start_step, _Clock.start(start_step), history=log.history)
    with _Preemption() as preemption:
        for step in range(start_step + 1, total_steps + 1):
            end.step = step
            batch = next(batches)
            if compiled_step is None:
                compiled_step, speed = compile_train_step(
                    config, step_fn, layout.mesh, layout.rules, state, run.frozen, batch
                )
                end.speed = speed
                _console(_compiled_line(speed, jax.devices()[0].device_kind))
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = compiled_step(state, run.frozen, batch)
            end.state = state
            if step == start_step + 1:
                jax.block_until_ready(state)  # the first step pays for the first transfers
                end.clock = _Clock.start(step)
            for hook in hooks:
                hook(step)
            log.pending.append(metrics)
            if step % config.log_every == 0 or step == total_steps or preemption.requested:
                log.flush(step, state, end.clock, speed)

            t_pause = time.perf_counter()
            if config.eval_every > 0 and (step % config.eval_every == 0 or step == total_steps):
                if end.eval_images is None:
                    end.eval_images = _eval_images(config)
                end.last_eval = _evaluate_ema(run, evaluator, state, end.eval_images, stride, step)
            final = step == total_steps
            if step % config.checkpoint_every == 0 or final or preemption.requested:
                # An async save reads the arrays after this call returns, while the next step
                # donates (overwrites) their buffers: give it a copy of its own.
                saved = jax.tree.map(jnp.copy, state) if async_save else state
                ckpt.save(step, saved, batches.get_state())
            end.clock.paused += time.perf_counter() - t_pause
            if final:
                end.bundle = _write_bundle(run, state, step)
            if preemption.requested:
                logging.warning("stopping after step %d on SIGTERM (checkpoint saved)", step)
                _console(
                    f"stopped after step {step} on SIGTERM; checkpoint saved, the same command "
                    "resumes"
                )
                break
    end.preempted = bool(preemption.requested)
    return end


def _evaluate_ema(run: _Run, evaluator: Evaluator, state, images, stride: int, step: int):
    """The EMA model's mean metrics on the evaluation images, written and shown."""
    variables = Variables(state.ema_params, state.model_state, run.frozen)
    metrics, recons = evaluator(variables, images, stride)
    run.writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    n = int(run.config.get("num_eval_images_logged", 2))
    run.writer.write_images(step, {f"eval/recon_{i}": r[None] for i, r in enumerate(recons[:n])})
    _console(f"eval at step {step}: " + _format_metrics(metrics))
    return metrics


def _real_files(run: _Run, loop: _LoopEnd) -> dict[str, Any]:
    """Real `.jxc` files of the evaluation images from the codec bundle just written."""
    from jaxcodec.codec import MethodCodec

    if loop.eval_images is None:
        loop.eval_images = _eval_images(run.config)
    bundle = loop.bundle
    variables = Variables(bundle.params, bundle.state, run.parts.host)
    codec = MethodCodec(
        run.method,
        variables,
        bundle.tables,
        name=run.method.name,
        frozen_identity=run.parts.identity,
    )
    real_files = real_file_evaluation(codec, loop.eval_images, run.workdir / "final_eval")
    scalars = {k: v for k, v in real_files.items() if isinstance(v, int | float)}
    run.writer.write_scalars(loop.step, {f"real_files/{k}": v for k, v in scalars.items()})
    logging.info("real files at step %d: %s", loop.step, real_files)
    return real_files


def _method_outputs(run: _Run, loop: _LoopEnd) -> dict[str, Any]:
    """The method's end-of-run artefacts (sample grids, exports), named on the console."""
    bundle = loop.bundle
    variables = Variables(bundle.params, bundle.state, run.parts.host)
    outputs = run.method.on_trained(variables, run.workdir, run.writer, loop.step)
    for what, value in outputs.items():
        _console(f"{what}: {value}")
    return outputs


def _summary(
    run: _Run, loop: _LoopEnd, start_step: int, memory, real_files, outputs
) -> dict[str, Any]:
    step, clock, speed = loop.step, loop.clock, loop.speed
    timed_steps = step - clock.first_step if step > start_step else 0
    perf = {}
    if speed is not None:
        perf = speed.describe() | {"device_kind": jax.devices()[0].device_kind}
        if timed_steps and clock.train_seconds > 0:
            perf |= speed.at(timed_steps / clock.train_seconds)
    elapsed = time.perf_counter() - clock.t_first
    return {
        # Steady-state speed: steps after the first (which compiles), including data,
        # logging, evaluation and checkpoint time.
        "steps_per_sec": timed_steps / elapsed if timed_steps else None,
        # Training alone (evaluation and checkpoints left out): examples/s, TFLOP/s per
        # device (XLA's cost analysis of the compiled step) and MFU against the peak.
        "throughput": perf,
        "bytes_per_device": memory,
        "final_step": step,
        "preempted": loop.preempted,  # stopped on SIGTERM before total_steps
        "resumed_from": start_step,
        "history": loop.history,
        "eval": loop.last_eval,
        "real_files": real_files,
        "outputs": outputs,
        "nonfinite_total": int(loop.state.nonfinite_total),
        "codec": str(run.workdir / CODEC_FILE) if loop.bundle is not None else None,
    }


def _finished_run(workdir: Path, total_steps: int) -> dict[str, Any] | None:
    """The summary of a run that already reached `total_steps` and wrote its bundle."""
    path = workdir / "summary.json"
    if not (path.is_file() and (workdir / CODEC_FILE).is_file()):
        return None
    summary = json.loads(path.read_text())
    if summary.get("final_step") != total_steps:
        return None
    return summary | {"resumed_from": total_steps, "already_trained": True}


def _write_bundle(run: _Run, state: TrainState, step: int) -> CodecBundle:
    """The portable codec bundle of the final EMA model (every process gathers the arrays,
    process 0 writes). A failure while building tables never loses the saved checkpoint."""
    params, model_state = host_params((state.ema_params, state.model_state))
    stage_frozen, identity, workdir = run.parts.start.frozen, run.parts.identity, run.workdir
    try:
        bundle = build_bundle(
            run.method, run.config, params, model_state, stage_frozen, identity, step
        )
    except Exception as exc:
        run.ckpt.close()
        raise RuntimeError(
            f"building the entropy tables failed; the trained state is saved at step {step} in "
            f"{workdir} (retry with `jaxcodec export --checkpoint {workdir}`)"
        ) from exc
    if jax.process_index() == 0:
        save_bundle(workdir / CODEC_FILE, bundle)
    return bundle


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def _mean_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for k in metrics[0]:
        vals = np.asarray([m[k] for m in metrics], np.float64)
        out[k] = float(np.mean(vals))
    return out


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def train_stages(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict[str, Any]]:
    """Trains `config.stages` in order, stage N in WORKDIR/stageN starting from the stage
    before it (or from `config.init_from` for the first one listed); with no `stages`, trains
    `config.stage` in the workdir itself. Each stage resumes on its own."""
    from jaxcodec.configlib import stage_config

    workdir = Path(workdir)
    stages = tuple(int(n) for n in (config.get("stages") or ()))
    if not stages:
        return [train_and_evaluate(stage_config(config, config.get("stage", 1)), workdir)]
    summaries = []
    for i, n in enumerate(stages):
        cfg = stage_config(config, n)
        cfg.stages = ()
        if n > 1 and not (i == 0 and config.get("init_from")):
            cfg.init_from = str((workdir / f"stage{n - 1}").absolute())
        _console(f"=== stage {n} of {config.method}: {workdir / f'stage{n}'}")
        summaries.append(train_and_evaluate(cfg, workdir / f"stage{n}"))
        if summaries[-1].get("preempted"):  # the same command resumes this stage
            break
    return summaries


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # library details go to each stage's train.log
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    summaries = train_stages(FLAGS.config, FLAGS.workdir)
    summary = summaries[-1]
    stages = tuple(int(n) for n in (FLAGS.config.get("stages") or ()))
    comparison = stage_comparison(list(zip(stages, summaries, strict=False)))
    if jax.process_index() == 0:
        print(
            f"trained to step {summary['final_step']} (resumed from {summary['resumed_from']}), "
            f"{summary['nonfinite_total']} non-finite steps skipped, "
            f"{summary['steps_per_sec'] or 0:.2f} steps/s overall (with evaluation and saving)"
        )
        if summary.get("throughput", {}).get("examples_per_sec"):
            print("training throughput: " + tput.Throughput.format(summary["throughput"]))
        if summary["eval"]:
            print("final eval: " + _format_metrics(summary["eval"]))
        if summary["codec"]:
            print(f"codec bundle (for jaxcodec compress/decompress/evaluate): {summary['codec']}")
        if summary["real_files"]:
            rf = summary["real_files"]
            print(
                f"real .jxc files in {Path(summary['codec']).parent / 'final_eval'}: "
                f"{rf['files']} images, measured bpp={rf['bpp']:.4f} (header included), "
                + ", ".join(
                    f"{k.upper()}={v:.4f}"
                    for k, v in rf.items()
                    if k not in ("bpp", "files") and isinstance(v, float)
                )
            )
            if rf.get("side_by_side") and comparison is None:
                print(
                    "side by side (original | stage-1 reconstruction | decoded): "
                    + rf["side_by_side"]
                )
        if comparison is not None:
            print("\nstages side by side (real .jxc files of the evaluation images, means):")
            print(comparison)


def run() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (clu, tfds) C++ logs
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF computes nothing here; no notice
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hfd.py:tiny.")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the resolved config.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    flags.DEFINE_bool(
        "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
