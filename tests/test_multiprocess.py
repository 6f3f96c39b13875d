"""Multi-host path on one machine: 2 processes (gloo collectives) train like 1 process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from jaxcodec.configlib import PROJECT_ROOT

FLAGS = [
    "--config.total_steps=3",
    "--config.model.N=16",
    "--config.model.M=16",
    "--config.model.context_groups=(8,8)",  # the default ELIC entropy model, two groups
    "--config.data.crop_size=64",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.real_file_eval=False",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process, as one host each
    base = [sys.executable, "-m", "jaxcodec.train", "--config", "configs/hfd.py:tiny"]
    port = _free_port()
    procs = [
        subprocess.Popen(
            base
            + ["--workdir", str(tmp_path / "two"), *FLAGS]
            + [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    single = subprocess.run(
        base + ["--workdir", str(tmp_path / "one"), *FLAGS],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

    two = json.loads((tmp_path / "two" / "summary.json").read_text())["history"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["history"]
    assert [h["step"] for h in two] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in one], rtol=1e-5)
    # The two-process run checkpointed once, for both processes.
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
