"""Multi-host path on one machine: 2 processes (gloo collectives) train like 1 process, and
the model they write compresses and decompresses through the CLI in fresh processes of any
device count, to the same pixels."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from run_configs import SMALL, small_config

from jaxcodec.configlib import PROJECT_ROOT
from jaxcodec.train import train_and_evaluate

# test_train's small HFD run (its one-device program comes from the compilation cache).
FLAGS = [f"--config.{o}" for o in SMALL] + ["--config.total_steps=3"]


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
    # The reference: the same run in this process, on one of its devices.
    single = train_and_evaluate(
        small_config("total_steps=3", "mesh.num_devices=1"), tmp_path / "one"
    )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    two = json.loads((tmp_path / "two" / "summary.json").read_text())["history"]
    one = single["history"]
    assert [h["step"] for h in two] == [1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in one], rtol=1e-5)
    # The two-process run checkpointed once, for both processes, and wrote one codec bundle
    # that fresh single- and eight-device processes use through the CLI.
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
    check_portable_files(tmp_path / "two", tmp_path)


def cli(commands: list[list[str]], devices: int) -> subprocess.CompletedProcess:
    """The CLI's commands (`jaxcodec ARGS` each, in order) in one fresh process with `devices`
    CPU devices: `jaxcodec.cli.main`, what the console script and `python -m jaxcodec` call."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    script = "import sys\nfrom jaxcodec.cli import main\n" + "".join(
        f"rc = main({c!r})\nif rc: sys.exit(rc)\n" for c in commands
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_portable_files(model, tmp_path) -> None:
    """Compress on 8 devices and on 1: the same bytes; the 8-device file decoded on 8 devices
    and, in a fresh 1-device process, on 1: the same pixels."""
    from PIL import Image
    from skimage import data

    src = tmp_path / "in.png"
    Image.fromarray(data.chelsea()[:120, :150]).save(src)
    enc = {n: str(tmp_path / f"enc{n}.jxc") for n in (1, 8)}
    dec = {n: str(tmp_path / f"dec{n}.png") for n in (1, 8)}
    ckpt = ["--checkpoint", str(model)]
    cli([["compress", str(src), enc[8], *ckpt], ["decompress", enc[8], dec[8], *ckpt]], 8)
    cli([["compress", str(src), enc[1], *ckpt], ["decompress", enc[8], dec[1], *ckpt]], 1)
    assert Path(enc[1]).read_bytes() == Path(enc[8]).read_bytes()
    decoded = [np.asarray(Image.open(dec[n])) for n in (1, 8)]
    np.testing.assert_array_equal(decoded[0], decoded[1])
    assert decoded[0].shape == (120, 150, 3)
