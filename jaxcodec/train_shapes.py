"""The train state before any array exists: the optimiser and its parameter labels, the boxed
(logical-axis) shapes of the train state from `jax.eval_shape`, and their shardings on a mesh.

Below both the training loop (`jaxcodec.train`) and the sharding report
(`jaxcodec.sharding_report`), which prints the same placements from shapes alone.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxcodec import sharding as shd
from jaxcodec.checkpoint import TrainState
from jaxcodec.methods import Method, get_method

# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = int(cfg.get("warmup_steps", 0))
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(
            cfg.lr, max(total_steps - warmup, 1), cfg.get("end_factor", 0.0)
        )
    elif cfg.schedule == "step":
        # Piecewise constant: multiply by `decay_factor` at each fraction in `decay_at`.
        bounds = {int(f * total_steps) - warmup: cfg.decay_factor for f in cfg.decay_at}
        main = optax.piecewise_constant_schedule(cfg.lr, bounds)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}: use constant, cosine or step")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])
    return main


def param_labels(params: Any, cfg: ml_collections.ConfigDict, trainable: Any) -> Any:
    """'frozen' for parameters matched by `cfg.frozen` regexes or frozen by the method's stage,
    'aux' for entropy-bottleneck quantiles (own learning rate), 'main' otherwise."""
    frozen = [re.compile(p) for p in cfg.get("frozen", ())]
    aux = re.compile(cfg.get("aux_params", r"quantiles$"))

    def label(path, _, train):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not train or any(p.search(name) for p in frozen):
            return "frozen"
        return "aux" if aux.search(name) else "main"

    return jax.tree_util.tree_map_with_path(label, nn.unbox(params), nn.unbox(trainable))


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int, trainable: Any
) -> optax.GradientTransformation:
    def adam(lr):
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

    main = [adam(make_schedule(cfg, total_steps))]
    if cfg.get("clip_norm"):
        main.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
    transforms = {
        "main": optax.chain(*main),
        "aux": adam(cfg.get("aux_lr", cfg.lr)),
        "frozen": optax.set_to_zero(),
    }
    # Labels are computed on unboxed parameters; for logically partitioned (boxed) parameters
    # the label tree is then a prefix of the parameter tree, which optax accepts.
    return optax.multi_transform(transforms, lambda p: param_labels(nn.unbox(p), cfg, trainable))


# ---------------------------------------------------------------------------------------------
# Shapes and shardings
# ---------------------------------------------------------------------------------------------


def merge_params(init: Any, loaded: Any, path: str = "") -> Any:
    """`init` with the subtrees of `loaded` put in place; a key `init` lacks or a shape that
    differs is an error naming the parameter (boxed logical-axis leaves keep their axes)."""
    if loaded is None:
        return init
    if isinstance(loaded, dict):
        if not isinstance(init, dict):
            raise ValueError(f"{path or '/'}: previous stage has a subtree, this stage a leaf")
        unknown = set(loaded) - set(init)
        if unknown:
            raise ValueError(f"{path or '/'}: this stage has no {sorted(unknown)}")
        return {k: merge_params(v, loaded.get(k), f"{path}/{k}") for k, v in init.items()}
    value = init.unbox() if isinstance(init, nn.meta.AxisMetadata) else init
    if tuple(value.shape) != tuple(np.shape(loaded)):
        raise ValueError(
            f"{path}: shape {np.shape(loaded)} from the previous stage, {value.shape} here"
        )
    new = jnp.asarray(loaded, value.dtype)
    return init.replace_boxed(new) if isinstance(init, nn.meta.AxisMetadata) else new


# Below this many bytes of output, an init compiles faster at LLVM level 0 than it runs slower:
# HFD full (429 MiB of state) compiles in 5.3 CPU-s against 8.8 at level 1 and runs in 2.7
# against 0.6; the tiny configs (20-40 MiB) save 30 % of their init's compile.
INIT_LEVEL0_MAX_BYTES = 512 * 2**20


def jit_init(init_fn: Callable, *args: Any, out_shardings: Any = None) -> Any:
    """`init_fn(*args)` unboxed, computed where `out_shardings` puts it. It runs once, so on a
    CPU it is compiled for compile time: at LLVM level 0 up to `INIT_LEVEL0_MAX_BYTES` of
    output, level 1 above (level 2, XLA's default, spends twice level 1's compile time on the
    random initialisers: HFD tiny 10.4 s against 3.9 s). Levels 1 and 2 give the same arrays
    bit for bit; level 0 rounds the initialisers' float transforms differently, by at most
    a few ulp (ResULIC tiny: 170 of 882 leaves differ, by at most 3.3e-7 relative)."""
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    lowered = jax.jit(lambda *a: nn.unbox(init_fn(*a)), **kw).lower(*args)
    options = None
    if jax.default_backend() == "cpu":
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lowered.out_info))
        options = {"xla_backend_optimization_level": 0 if size <= INIT_LEVEL0_MAX_BYTES else 1}
    return lowered.compile(compiler_options=options)(*args)


@dataclasses.dataclass
class ModelShapes:
    """What the loop knows before any array exists: the method, the optimiser, the labels of
    its parameters and the boxed (logical-axis) shapes of the train state."""

    method: Method
    tx: optax.GradientTransformation
    labels: Any
    init_state: Callable[[jax.Array, Any, Any], TrainState]  # (key, loaded params, state)
    abstract_state: Any  # boxed
    abstract_params: Any  # boxed
    init_key: jax.Array
    base_key: jax.Array


def model_shapes(config: ml_collections.ConfigDict, method: Method | None = None) -> ModelShapes:
    """The train state's shapes with their logical axes (`jax.eval_shape`: nothing is
    allocated), the optimiser and the init function the jitted init runs."""
    method = get_method(config) if method is None else method
    dummy = method.dummy_batch(config.batch_size)
    init_key, base_key = jax.random.split(jax.random.key(config.seed))
    abstract_params = jax.eval_shape(method.init, init_key, dummy)["params"]
    trainable = method.trainable_mask(nn.unbox(abstract_params))
    tx = make_optimizer(config.optimizer, int(config.total_steps), trainable)
    labels = param_labels(nn.unbox(abstract_params), config.optimizer, trainable)

    def init_state(key: jax.Array, loaded_params: Any, loaded_state: Any) -> TrainState:
        variables = dict(method.init(key, dummy))
        params = merge_params(variables.pop("params"), loaded_params)
        model_state = merge_params(variables, loaded_state)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=tx.init(params),
            model_state=model_state,
            nonfinite_streak=jnp.zeros((), jnp.int32),
            nonfinite_total=jnp.zeros((), jnp.int32),
        )

    abstract_state = jax.eval_shape(init_state, init_key, None, None)
    return ModelShapes(
        method, tx, labels, init_state, abstract_state, abstract_params, init_key, base_key
    )


def mesh_devices(config: ml_collections.ConfigDict) -> list:
    n = int(config.mesh.get("num_devices", 0))
    devices = jax.devices()
    if n:
        if n > len(devices):
            raise ValueError(f"config.mesh.num_devices={n} but only {len(devices)} devices exist")
        devices = devices[:n]
    return devices


def shardings(config, mesh, shapes: ModelShapes, frozen: Any = None) -> tuple[Any, Any]:
    """(train-state shardings, frozen shardings) from the logical axes through the config's
    rules, with the size-gated fsdp fallback (`config.mesh.fsdp_min_bytes`). Frozen parts the
    method gives no annotated shapes for are placed from their arrays (`frozen`)."""
    rules = shd.rules_of(config)
    min_bytes = config.mesh.get("fsdp_min_bytes", shd.DEFAULT_FSDP_MIN_BYTES)
    min_bytes = None if min_bytes is None or min_bytes < 0 else int(min_bytes)
    state = shd.tree_shardings(shapes.abstract_state, mesh, rules, min_bytes)
    abstract_frozen = shapes.method.abstract_frozen()
    if abstract_frozen is None:
        abstract_frozen = {} if frozen is None else frozen
    return state, shd.tree_shardings(abstract_frozen, mesh, rules, min_bytes)
