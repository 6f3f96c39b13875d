"""The config of a training run inside a test: one device (the 8 fake host devices stay for
the tests that shard), no evaluation, no real files, a log line per step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxcodec.configlib import load_config


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
