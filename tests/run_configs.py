"""The config of a training run inside a test: one device (the 8 fake host devices stay for
the tests that shard), no evaluation, no real files, a log line per step; and a run's own
compiled train step, for tests that drive steps by hand."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxcodec.configlib import load_config

# HFD's stage 1 at its smallest, the run the training-stack tests share (test_train,
# test_multiprocess): one program for all of them through the persistent compilation cache.
SMALL = [
    "stages=()",  # stage 1 alone, in the workdir itself
    "model.N=16",
    "model.M=16",
    "model.context_groups=(8,8)",  # the default ELIC entropy model, two groups
    "data.crop_size=64",
    "batch_size=8",
    "eval_data.max_images=1",
    "log_every=1",
    "eval_every=0",
    "checkpoint_every=2",
    "optimizer.lr=1e-3",
    # A constant rate keeps total_steps out of the compiled step: runs of different lengths
    # share one program, and a run of 3 steps is the first 3 steps of a run of 4.
    "optimizer.schedule=constant",
    "real_file_eval=False",
]


def small_config(*overrides: str) -> ml_collections.ConfigDict:
    return load_config("configs/hfd.py:tiny", [*SMALL, *overrides])


def set_fields(config: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
    """Sets each `dotted.path` of `fields` (a value of any type, unlike --config flags)."""
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value


def run_config(spec: str, **fields: Any) -> ml_collections.ConfigDict:
    c = load_config(spec)
    c.mesh.num_devices = 1
    c.eval_every = 0
    c.real_file_eval = False
    c.checkpoint_every = 1000
    c.log_every = 1
    set_fields(c, fields)
    return c


@dataclasses.dataclass
class LoopStep:
    """A run's own train step outside the loop: the initial state, the frozen parts, the mesh
    and the compiled step, built by the loop's functions. The same config gives the same
    programs as `train_and_evaluate`, so a test that drives steps by hand takes them from the
    compilation cache when a run has compiled them."""

    config: ml_collections.ConfigDict
    mesh: Any
    state: Any
    frozen: Any
    step: Any
    speed: Any

    def batch(self, images: np.ndarray) -> dict[str, Any]:
        from jaxcodec import sharding as shd

        return shd.global_batch({"image": images}, self.mesh)


def loop_step(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> LoopStep:
    from jaxcodec import sharding as shd
    from jaxcodec import train

    workdir = Path(workdir or tempfile.mkdtemp(prefix="loop_step"))
    shapes = train.model_shapes(config)
    parts = train._frozen_parts(config, shapes.method, workdir)
    layout = train._layout(config, shapes, parts.host)
    frozen = train.place(parts.host, layout.frozen)
    with shd.scope(layout.mesh, layout.rules):
        state = train.jit_init(
            shapes.init_state,
            shapes.init_key,
            parts.start.params,
            parts.start.state,
            out_shardings=layout.state,
        )
    crop = config.data.crop_size
    example = shd.global_batch(
        {"image": np.zeros((config.batch_size, crop, crop, 3), np.uint8)}, layout.mesh
    )
    fn = train.make_train_step(config, shapes, layout.mesh, layout.state, layout.frozen)
    step, speed = train.compile_train_step(
        config, fn, layout.mesh, layout.rules, state, frozen, example
    )
    return LoopStep(config, layout.mesh, state, frozen, step, speed)
