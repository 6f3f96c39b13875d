"""Device mesh and logical-axis sharding: the one place that knows how arrays map to devices.

Parameters carry logical axis names (`nn.with_logical_partitioning`, see `jaxcodec.nn.layers`);
the rules in the config (`config.mesh.logical_axis_rules`, documented in
`jaxcodec.configlib.base_config`) map them to the mesh axes `data`, `fsdp` and `tensor`.
`tree_shardings` turns annotated shapes into `NamedSharding`s, leaving unsharded any dimension
the mapped mesh axes do not divide, and shards any large array that ends up without an `fsdp`
axis over `fsdp` along its largest divisible dimension (big_vision's size-gated `fsdp`
tactic), so unnamed or oddly shaped parameters do not replicate a pod's worth of memory.

`scope(mesh, rules)` is the context every jitted init, train step and evaluation is traced
and run in, so activation constraints (`layers.constrain`) take effect.

`jaxcodec shardings --config configs/rdeic.py:full,stage=2 --devices 8`
(`jaxcodec.sharding_report`) prints every parameter's sharding and the bytes each device holds.
"""

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis
FSDP_AXIS = "fsdp"
# Arrays at least this large that the rules leave without an fsdp axis are split over fsdp.
DEFAULT_FSDP_MIN_BYTES = 4 * 2**20

Rules = Sequence[tuple[str, Any]]


def create_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh over `devices` (default: all); one entry of `shape` may be -1 (take the rest).

    Axes are Auto so that linen's logical partitioning can place parameters (Explicit axes,
    the default of `jax.make_mesh` since jax 0.9, reject it).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape} has more than one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh shape {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {np.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(
        tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=devices
    )


def rules_of(config) -> list[tuple[str, Any]]:
    """The config's logical-axis rules as flax takes them."""
    return [
        (name, tuple(axes) if isinstance(axes, list) else axes)
        for name, axes in config.mesh.logical_axis_rules
    ]


@contextlib.contextmanager
def scope(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """`jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`: trace, compile and run jitted
    training and evaluation steps in here (flax's lm1b, maxdiffusion's `compile_train_step`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in rules]):
        yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def _axes_size(mesh: Mesh, entry) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def _uses(spec: Sequence, axis: str) -> bool:
    for entry in spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if axis in names:
            return True
    return False


def leaf_spec(
    shape: Sequence[int],
    itemsize: int,
    names: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Rules,
    fsdp_min_bytes: int | None = DEFAULT_FSDP_MIN_BYTES,
) -> PartitionSpec:
    """The mesh partitioning of one array: its logical `names` through `rules`, dimensions the
    mapped mesh axes do not divide left whole; an array the rules split over fsdp whose fsdp
    dimension fsdp does not divide (a conv with 213 output channels on 8 devices) is split on
    another dimension instead, and arrays of at least `fsdp_min_bytes` that use no fsdp axis
    are split too: in both cases over the largest dimension fsdp divides."""
    shape = tuple(int(s) for s in shape)
    if names is None:
        spec = [None] * len(shape)
    else:
        spec = list(nn.logical_to_mesh_axes(tuple(names), [tuple(r) for r in rules]))
    wants_fsdp = _uses(spec, FSDP_AXIS)
    spec = [
        e if e is not None and s % _axes_size(mesh, e) == 0 else None
        for e, s in zip(spec, shape, strict=True)
    ]
    n = mesh.shape.get(FSDP_AXIS, 1)
    size = int(np.prod(shape)) * itemsize
    big = fsdp_min_bytes is not None and size >= fsdp_min_bytes
    if n > 1 and (wants_fsdp or big) and not _uses(spec, FSDP_AXIS):
        free = [
            i for i, (e, s) in enumerate(zip(spec, shape, strict=True)) if e is None and s % n == 0
        ]
        if free:
            i = max(free, key=lambda i: (shape[i], i))
            spec[i] = FSDP_AXIS
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _names(box) -> tuple | None:
    if isinstance(box, nn.Partitioned):
        return tuple(box.names)
    return None


def tree_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    rules: Rules,
    fsdp_min_bytes: int | None = DEFAULT_FSDP_MIN_BYTES,
) -> Any:
    """Shardings for a pytree of (possibly boxed) shapes or arrays, in the structure of the
    unboxed tree: logical annotations through the rules, then the size-gated fsdp fallback
    (unannotated small leaves replicate)."""

    def one(leaf):
        names = _names(leaf) if _is_box(leaf) else None
        value = leaf.unbox() if _is_box(leaf) else leaf
        dtype = np.dtype(getattr(value, "dtype", np.float32))
        spec = leaf_spec(np.shape(value), dtype.itemsize, names, mesh, rules, fsdp_min_bytes)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process batches into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


# ---------------------------------------------------------------------------------------------
# Bytes per device
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafPlacement:
    path: str
    shape: tuple[int, ...]
    dtype: str
    names: tuple | None  # logical axes (None: unannotated)
    spec: PartitionSpec
    bytes: int  # the whole array
    bytes_per_device: int  # the largest shard one device holds


def placements(abstract_tree: Any, shardings: Any) -> list[LeafPlacement]:
    """One row per leaf of a (possibly boxed) tree and its shardings (unboxed structure)."""
    rows = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=_is_box)[0]
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(flat_shardings):
        raise ValueError(f"{len(leaves)} leaves but {len(flat_shardings)} shardings")
    for (path, leaf), sharding in zip(leaves, flat_shardings, strict=True):
        value = leaf.unbox() if _is_box(leaf) else leaf
        shape = tuple(int(s) for s in np.shape(value))
        dtype = np.dtype(getattr(value, "dtype", np.float32))
        shard = sharding.shard_shape(shape)
        rows.append(
            LeafPlacement(
                path="/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path),
                shape=shape,
                dtype=dtype.name,
                names=_names(leaf) if _is_box(leaf) else None,
                spec=sharding.spec,
                bytes=int(np.prod(shape)) * dtype.itemsize,
                bytes_per_device=int(np.prod(shard)) * dtype.itemsize,
            )
        )
    return rows


def unannotated(tree: Any) -> list[str]:
    """Paths of the leaves of a (possibly boxed) tree that carry no logical axes."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
    return [
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        for path, leaf in leaves
        if not _is_box(leaf)
    ]


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    return sum(r.bytes_per_device for r in placements(abstract_tree, shardings))


def array_bytes_per_device(tree: Any) -> int:
    """Bytes the most loaded device holds of a tree of placed `jax.Array`s."""
    per_device: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_placements(title: str, rows: list[LeafPlacement], *, top: int | None = None) -> str:
    """A table of parameters: path, shape, logical axes, mesh spec, bytes per device."""
    shown = sorted(rows, key=lambda r: -r.bytes)[:top] if top else rows
    lines = [f"{title}: {len(rows)} arrays"]
    width = min(max((len(r.path) for r in shown), default=10), 90)
    for r in shown:
        names = "-" if r.names is None else "(" + ", ".join(str(n) for n in r.names) + ")"
        spec = "(" + ", ".join(str(e) for e in r.spec) + ")"
        lines.append(
            f"  {r.path[-width:]:<{width}}  {str(r.shape):<22} {names:<40} {spec:<26} "
            f"{format_bytes(r.bytes_per_device):>11} / {format_bytes(r.bytes):>11}"
        )
    if top and len(rows) > top:
        lines.append(f"  ... {len(rows) - top} smaller arrays")
    total = sum(r.bytes for r in rows)
    per_dev = sum(r.bytes_per_device for r in rows)
    lines.append(
        f"  total {format_bytes(total)}, {format_bytes(per_dev)} per device "
        f"({per_dev / max(total, 1):.3f} of it)"
    )
    return "\n".join(lines)
