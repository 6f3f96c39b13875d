"""What a run keeps: the train state (orbax, resumable, sharded) and the codec bundle (portable).

Two formats for two readers. Training checkpoints (orbax) hold everything a resume needs —
trainable parameters, their EMA, optimiser state, mutable model state, the data iterator —
restored onto whatever mesh the resuming run has. A codec bundle (one safetensors file) holds
what a decoder needs and nothing else: EMA parameters, model state, integer entropy tables,
previous-stage models the method keeps frozen, the resolved config and the identity (source and
digest) of every frozen part; host arrays only, so it loads on any device count or host.

Frozen pretrained weights (an SD UNet, a VAE) never enter either: the workdir records where they
came from and their digest, and every reader checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

STATE = "state"
DATA = "data_iterator"
CODEC_FILE = "codec.safetensors"
BUNDLE_FORMAT = "jaxcodec-codec-bundle/1"
FROZEN_FILE = "frozen.json"  # the workdir's record of its frozen parts (source, digest)


class CheckpointError(RuntimeError):
    """A workdir or bundle cannot be used as asked (missing, unfinished, foreign, mismatched)."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable parameters only
    ema_params: Any
    opt_state: Any
    model_state: Any  # mutable collections (e.g. vq_stats): updated by the loss, never EMA'd
    nonfinite_streak: jax.Array  # consecutive skipped steps
    nonfinite_total: jax.Array  # all skipped steps of the run


# ---------------------------------------------------------------------------------------------
# Training checkpoints (orbax)
# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints of a workdir's `checkpoints/` folder.

    Orbax writes each step to a temporary directory and renames it when complete, so a run
    killed mid-write leaves the previous checkpoint intact.
    """

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict | None = None) -> None:
        items = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[DATA] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract_state: Any, *, with_data: bool = True
    ) -> tuple[Any, dict | None]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if with_data and DATA in self.item_names(step):
            items[DATA] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], (restored[DATA] if DATA in items else None)

    def restore_host(self, step: int, fields: tuple[str, ...]) -> dict[str, Any]:
        """Some fields of a saved TrainState as numpy arrays, whatever mesh wrote them (the
        optimiser state is never read)."""
        reader = ocp.CheckpointManager(
            self.directory,
            item_handlers={STATE: ocp.PyTreeCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()},
        )
        meta = reader.item_metadata(step)[STATE]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        tree = {
            f: jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta[f]
            )
            for f in fields
        }
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), tree)
        args = ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True)
        restored = reader.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
        reader.close()
        return jax.tree.map(np.asarray, {f: restored[f] for f in fields})

    def item_names(self, step: int) -> set[str]:
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying the given shardings, as restore targets."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


# ---------------------------------------------------------------------------------------------
# Identity of arrays
# ---------------------------------------------------------------------------------------------


def tree_digest(tree: Any, *prefix: str) -> str:
    """SHA-256 (hex) over the paths, dtypes, shapes and bytes of a pytree's leaves (and any
    prefix strings): the identity of weights, tables and models."""
    h = hashlib.sha256()
    for p in prefix:
        h.update(p.encode())
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        a = _contiguous(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data if a.size else b"")
    return h.hexdigest()


def _contiguous(x: Any) -> np.ndarray:
    """A C-contiguous numpy array of the same shape (np.ascontiguousarray turns 0-d into 1-d)."""
    a = np.asarray(x)
    return a if a.flags.c_contiguous else a.copy(order="C")


def read_frozen_record(workdir: str | Path) -> dict[str, dict] | None:
    path = Path(workdir) / FROZEN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_frozen_identity(expected: dict[str, dict], actual: dict[str, dict], where: str) -> None:
    """Refuses frozen parts that are not the ones a model was trained with."""
    problems = []
    for name in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(name), actual.get(name)
        if e is None or a is None:
            problems.append(f"{name}: {'not expected' if e is None else 'missing'}")
        elif e["sha256"] != a["sha256"]:
            problems.append(
                f"{name}: digest {a['sha256'][:12]} from {a['source']} differs from "
                f"{e['sha256'][:12]} (trained with {e['source']})"
            )
    if problems:
        raise CheckpointError(
            f"frozen weights differ from those {where} was trained with: " + "; ".join(problems)
        )


# ---------------------------------------------------------------------------------------------
# Codec bundles (portable, host arrays, one safetensors file)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CodecBundle:
    """Everything a decoder of one trained model needs, except external pretrained weights
    (identified by `frozen_identity`, loaded from their sources)."""

    config: ml_collections.ConfigDict
    params: Any
    state: Any
    tables: Any
    frozen: Any  # frozen parts stored with the model (previous stages' models)
    frozen_identity: dict[str, dict]  # every frozen part: {"source", "sha256", "bundled"}
    step: int

    @property
    def method(self) -> str:
        return self.config.method


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> Any:
    """Flattens nested dicts of arrays into `out` under '/'-joined keys; returns the skeleton
    (dicts, with dtype names at the leaves) that restores the exact structure."""
    if isinstance(tree, dict):
        skeleton = {}
        for k, v in tree.items():
            if "/" in str(k):
                raise ValueError(f"key {k!r} under {prefix!r} contains '/'")
            skeleton[str(k)] = _flatten(v, f"{prefix}/{k}", out)
        return skeleton
    if tree is None:
        return None
    a = _contiguous(tree)
    if a.dtype == object:
        raise TypeError(f"{prefix}: not an array ({type(tree).__name__})")
    out[prefix] = a.view(np.uint16) if a.dtype.name == "bfloat16" else a
    return a.dtype.name


def _unflatten(skeleton: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(skeleton, dict):
        return {k: _unflatten(v, f"{prefix}/{k}", arrays) for k, v in skeleton.items()}
    if skeleton is None:
        return None
    a = arrays[prefix]
    if skeleton == "bfloat16":
        import ml_dtypes

        a = a.view(ml_dtypes.bfloat16)
    return a


_BUNDLE_ITEMS = ("params", "state", "tables", "frozen")


def save_bundle(path: str | Path, bundle: CodecBundle) -> Path:
    """Writes a bundle atomically (temporary file in the same folder, then rename)."""
    import safetensors.numpy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    skeleton = {k: _flatten(jax.device_get(getattr(bundle, k)), k, arrays) for k in _BUNDLE_ITEMS}
    metadata = {
        "format": BUNDLE_FORMAT,
        "config": bundle.config.to_json_best_effort(),
        "structure": json.dumps(skeleton),
        "frozen_identity": json.dumps(bundle.frozen_identity),
        "step": str(int(bundle.step)),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.numpy.save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_bundle(path: str | Path) -> CodecBundle:
    """Reads a bundle written by `save_bundle` (numpy only: no device, no pickle)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no codec bundle there")
    try:
        with safe_open(str(path), "np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != BUNDLE_FORMAT:
                raise CheckpointError(
                    f"{path} is not a jaxcodec codec bundle (format "
                    f"{metadata.get('format')!r}, this reader: {BUNDLE_FORMAT})"
                )
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"{path}: unreadable codec bundle ({exc})") from None
    skeleton = json.loads(metadata["structure"])
    items = {k: _unflatten(skeleton[k], k, arrays) for k in _BUNDLE_ITEMS}
    return CodecBundle(
        config=ml_collections.ConfigDict(json.loads(metadata["config"])),
        frozen_identity=json.loads(metadata["frozen_identity"]),
        step=int(metadata["step"]),
        **items,
    )


def stage_workdirs(path: str | Path) -> list[Path]:
    """The stage folders of a multi-stage workdir (WORKDIR/stageN, as `config.stages` trains
    them), in stage order; [] for any other folder."""
    path = Path(path)
    found = [(int(d.name[5:]), d) for d in path.glob("stage*") if d.name[5:].isdigit()]
    return [d for _, d in sorted(found) if d.is_dir()]


def bundle_path(path: str | Path) -> Path:
    """A bundle file, a training workdir's final bundle, or, in a multi-stage workdir, the
    last finished stage's (`WORKDIR/stageN/codec.safetensors` with the largest N)."""
    path = Path(path)
    if path.is_dir():
        if (path / CODEC_FILE).is_file():
            return path / CODEC_FILE
        stages = stage_workdirs(path)
        finished = [d for d in stages if (d / CODEC_FILE).is_file()]
        if finished:
            return finished[-1] / CODEC_FILE
        hint = (
            f"none of its stages ({', '.join(d.name for d in stages)}) has finished training"
            if stages
            else "its training has not finished; `jaxcodec export --checkpoint "
            f"{path} OUT.safetensors` writes one from its latest checkpoint"
            if (path / "checkpoints").is_dir()
            else "it is not a training workdir (no config.json or checkpoints)"
            if not (path / "config.json").is_file()
            else "it has no checkpoints"
        )
        raise CheckpointError(f"{path} has no {CODEC_FILE}: {hint}")
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    return path


def describe_bundle_choice(path: str | Path, source: Path) -> str | None:
    """What `bundle_path(path)` chose inside a multi-stage workdir, in words (None when `path`
    named the bundle or a single-stage workdir)."""
    path = Path(path)
    if not path.is_dir() or source.parent == path:
        return None
    stages = stage_workdirs(path)
    later = [d.name for d in stages[stages.index(source.parent) + 1 :]]
    note = f"using {source.parent.name} ({source}), the last finished stage of {path}"
    return note + (f"; not finished: {', '.join(later)}" if later else "")
