"""The pod and cluster launchers, without a pod or a cluster: their --dry-run output (every
command they would run) for a 4-host TPU v5e slice and a 2-node x 8-GPU SLURM job, and real runs
against stand-ins for gcloud / sbatch / srun / flock that record what they are given. Nothing here
reaches the network, and the real gcloud (if installed) is never called."""

from __future__ import annotations

import os
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sbatch"
LOCAL = ROOT / "launch" / "local_processes.sh"

# Launcher settings come from the caller's environment: start from a clean one.
_LAUNCH_VARS = (
    "TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION CREATE TPU_CREATE_FLAGS REVISION "
    "REPO_URL CONFIG REMOTE_DIR JAX_SPEC GCS_MOUNT GCS_DIRECT DETACH INTERNAL_IP WORKDIR NODES "
    "GPUS_PER_NODE PARTITION ACCOUNT TIME_LIMIT CPUS_PER_TASK SBATCH_FLAGS JOB_NAME CODE_DIR VENV "
    "PYTHON PORT"
).split()
ODD_FLAG = "--config.data.path=/data/my photo's"  # a space and a quote survive every hop


def _env(extra: dict[str, str], path_prefix: Path | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")
    }
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return env | extra


def _launch(script: Path, env: dict, *args: str, path_prefix: Path | None = None, check=True):
    proc = subprocess.run(
        ["bash", str(script), *args],
        env=_env(env, path_prefix),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands as argv lists ('#' lines are the launcher's notes)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _notes(stdout: str) -> str:
    return "\n".join(line for line in stdout.splitlines() if line.startswith("#"))


def _flag(argv: list[str], name: str) -> str:
    """The value of `--name=VALUE` or `--name VALUE` in argv."""
    for i, a in enumerate(argv):
        if a.startswith(f"{name}="):
            return a.split("=", 1)[1]
        if a == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def _bash_syntax_ok(command: str) -> None:
    proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stderr}\n{command}"


V5E = {
    "TPU_NAME": "hfd-v5e",
    "ZONE": "us-west4-a",
    "PROJECT": "my-project",
    "ACCELERATOR_TYPE": "v5litepod-16",
    "CREATE": "1",
    "WORKDIR": "gs://my-bucket/runs/hfd",
}


def test_tpu_pod_dry_run_4_host_v5e():
    out = _launch(TPU, V5E, "--dry-run", "--config.total_steps=1000", ODD_FLAG).stdout
    assert "4 hosts, one process per host" in _notes(out)
    cmds = _commands(out)
    create, pack, scp, rm, *ssh = cmds
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert create[5] == "hfd-v5e"
    assert _flag(create, "--accelerator-type") == "v5litepod-16"
    assert _flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert _flag(create, "--zone") == "us-west4-a" and _flag(create, "--project") == "my-project"
    # The working tree, as git sees it, packed once and copied to every worker.
    assert pack[:2] == ["git", "-C"] and "ls-files" in pack and "tar" in pack
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp and scp[6] == "hfd-v5e:jaxcodec-src.tar.gz"
    assert rm[:2] == ["rm", "-f"]
    # Every remote step runs on every worker, in order: code, environment, bucket, training.
    assert len(ssh) == 4
    for argv in ssh:
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hfd-v5e"]
        assert "--worker=all" in argv and _flag(argv, "--zone") == "us-west4-a"
        _bash_syntax_ok(_flag(argv, "--command"))
    code, env, mount, train = (_flag(a, "--command") for a in ssh)
    assert "tar -xzf" in code and "! -name .venv" in code
    assert "-m venv .venv" in env and 'pip install -q -e . "jax[tpu]"' in env
    assert "gcsfuse" in mount and "my-bucket /tmp/gcs/my-bucket" in mount
    # One command, identical on every host: no per-host process id or count; jax.distributed
    # finds both from the TPU metadata.
    words = shlex.split(train.split("exec ", 1)[1])
    assert words[:3] == [".venv/bin/python", "-m", "jaxcodec.train"]
    assert _flag(words, "--config") == "configs/hfd.py:full"
    assert _flag(words, "--workdir") == "/tmp/gcs/my-bucket/runs/hfd"
    assert "--distributed" in words and words[-2:] == ["--config.total_steps=1000", ODD_FLAG]
    assert not any(w.startswith(("--process_id", "--num_processes")) for w in words)


def test_tpu_pod_dry_run_revision_shared_workdir_and_detach():
    env = V5E | {
        "CREATE": "0",
        "REVISION": "v0.1",
        "REPO_URL": "https://example.invalid/jaxcodec.git",
        "WORKDIR": "/mnt/nfs/runs/hfd",
        "DETACH": "1",
        "CONFIG": "configs/rdeic.py:full,stage=2",
    }
    cmds = _commands(_launch(TPU, env, "--dry-run").stdout)
    assert all(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] for c in cmds)
    assert len(cmds) == 3  # code, environment, training: no create, copy or bucket mount
    code, _, train = (_flag(c, "--command") for c in cmds)
    assert "git fetch -q --depth=1 origin v0.1" in code and "FETCH_HEAD" in code
    assert "https://example.invalid/jaxcodec.git" in code
    assert "nohup" in train and "--workdir /mnt/nfs/runs/hfd" in train
    assert "'configs/rdeic.py:full,stage=2'" in train or "configs/rdeic.py:full,stage=2" in train
    for c in cmds:
        _bash_syntax_ok(_flag(c, "--command"))


@pytest.mark.parametrize(
    "accelerator, hosts",
    [("v5litepod-8", 1), ("v5litepod-64", 16), ("v4-32", 4), ("v5p-16", 2), ("v6e-16", 4)],
)
def test_tpu_pod_host_counts(accelerator, hosts):
    env = V5E | {"ACCELERATOR_TYPE": accelerator, "CREATE": "0"}
    assert f": {hosts} hosts," in _launch(TPU, env, "--dry-run").stdout


def test_tpu_pod_refuses_without_its_settings():
    proc = _launch(TPU, {"ZONE": "z", "WORKDIR": "w"}, "--dry-run", check=False)
    assert proc.returncode != 0 and "TPU_NAME" in proc.stderr
    proc = _launch(TPU, {"TPU_NAME": "t", "ZONE": "z"}, "--dry-run", check=False)
    assert proc.returncode != 0 and "WORKDIR" in proc.stderr


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records its argv (one shell-quoted line) and plays a worker: scp copies into FAKE_HOME, the
# code step runs there; nothing else is executed.
printf '%q ' "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
if [[ "$4" == scp ]]; then cp "$5" "$FAKE_HOME/${6#*:}"; fi
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == --command ]]; then j=$((i + 1)); cmd="${!j}"; fi
done
if [[ -n "${cmd:-}" && "$cmd" == *"tar -xzf"* ]]; then HOME="$FAKE_HOME" bash -c "$cmd"; fi
"""


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_tpu_pod_runs_what_it_prints(tmp_path):
    """Without --dry-run (a stand-in gcloud): the commands run are the ones printed, and the
    working tree arrives on a worker, replacing old code but not the worker's environment."""
    bin_dir = _fake_bin(tmp_path, gcloud=FAKE_GCLOUD)
    home, log = tmp_path / "home", tmp_path / "gcloud.log"
    (home / "jaxcodec" / ".venv").mkdir(parents=True)
    (home / "jaxcodec" / "stale.py").write_text("")
    env = V5E | {"FAKE_LOG": str(log), "FAKE_HOME": str(home), "TMPDIR": str(tmp_path)}
    printed = _commands(_launch(TPU, env, "--dry-run", ODD_FLAG).stdout)
    _launch(TPU, env, ODD_FLAG, path_prefix=bin_dir)
    ran = [shlex.split(line) for line in log.read_text().splitlines()]
    assert [["gcloud", *argv] for argv in ran] == [c for c in printed if c[0] == "gcloud"]
    worker = home / "jaxcodec"
    assert (worker / "jaxcodec" / "train.py").is_file() and (worker / "pyproject.toml").is_file()
    assert (worker / "launch" / "tpu_pod.sh").is_file()
    assert (worker / ".venv").is_dir() and not (worker / "stale.py").exists()
    assert not (home / "jaxcodec-src.tar.gz").exists()  # unpacked and removed
    assert not (tmp_path / "jaxcodec-src.tar.gz").exists()  # the local copy too


def test_tpu_pod_tarball_is_the_git_working_tree(tmp_path):
    out = _launch(TPU, V5E | {"TMPDIR": str(tmp_path)}, "--dry-run").stdout
    pack = next(line for line in out.splitlines() if line.startswith("git "))
    subprocess.run(["bash", "-o", "pipefail", "-c", pack], check=True, cwd=ROOT)
    with tarfile.open(tmp_path / "jaxcodec-src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "jaxcodec/train.py", "launch/gpu_slurm.sbatch"} <= names
    assert not any(n.startswith((".venv", ".git/", "runs/")) or "__pycache__" in n for n in names)


SLURM_SUBMIT = {
    "NODES": "2",
    "GPUS_PER_NODE": "8",
    "PARTITION": "gpu",
    "ACCOUNT": "my-account",
    "WORKDIR": "/shared/runs/hfd",
}


def test_slurm_submit_dry_run_2_nodes_8_gpus():
    out = _launch(SLURM, SLURM_SUBMIT, "--dry-run", "--config.total_steps=1000", ODD_FLAG).stdout
    sbatch, setup, mkdir, srun = _commands(out)
    assert sbatch[0] == "sbatch" and sbatch[-3] == str(SLURM)
    assert sbatch[-2:] == ["--config.total_steps=1000", ODD_FLAG]
    assert _flag(sbatch, "--nodes") == "2" and _flag(sbatch, "--ntasks-per-node") == "8"
    assert _flag(sbatch, "--gpus-per-node") == "8" and "--gpus-per-task" not in " ".join(sbatch)
    assert _flag(sbatch, "--partition") == "gpu" and _flag(sbatch, "--account") == "my-account"
    assert "16 processes, one per GPU" in _notes(out)
    # The environment once, on the shared filesystem, with the CUDA build of JAX.
    assert setup[:3] == ["flock", f"{ROOT}/.venv-cuda.lock", "bash"]
    _bash_syntax_ok(setup[-1])
    assert f"-m venv {ROOT}/.venv-cuda" in setup[-1] and "'jax[cuda12]'" in setup[-1]
    assert mkdir == ["mkdir", "-p", "/shared/runs/hfd"]
    assert srun[0] == "srun" and _flag(srun, "--ntasks") == "16"
    assert _flag(srun, "--ntasks-per-node") == "8" and _flag(srun, "--nodes") == "2"
    assert _flag(srun, "--workdir") == "/shared/runs/hfd" and "--distributed" in srun
    assert srun[-2:] == ["--config.total_steps=1000", ODD_FLAG]
    assert not any(w.startswith(("--process_id", "--num_processes")) for w in srun)


FAKE_JOB = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NAME": "jaxcodec",
}


def test_slurm_job_dry_run_and_what_jax_detects(tmp_path, monkeypatch):
    env = FAKE_JOB | {
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "REVISION": "abc123",
        "REPO_URL": "https://example.invalid/jaxcodec.git",
    }
    out = _launch(SLURM, env, "--dry-run").stdout
    code = tmp_path / "runs" / "src-abc123"
    cmds = _commands(out)
    assert ["git", "-C", str(code), "fetch", "-q", "--depth=1", "origin", "abc123"] in cmds
    srun = cmds[-1]
    assert _flag(srun, "--chdir") == str(code) and srun[6] == f"{code}/.venv-cuda/bin/python"
    assert _flag(srun, "--workdir") == str(tmp_path / "runs" / "jaxcodec")
    note = _notes(out)
    assert "coordinator gpu017:62016" in note and "SLURM_PROCID (0-15)" in note
    # What jax.distributed's SLURM detection makes of each of the 16 tasks srun starts.
    from jax._src.clusters.slurm_cluster import SlurmCluster

    seen = set()
    for procid in range(16):
        task = {
            **FAKE_JOB,
            "SLURM_STEP_NODELIST": "gpu[017-018]",
            "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % 8),
        }
        for k, v in task.items():
            monkeypatch.setenv(k, v)
        assert SlurmCluster.is_env_present()
        assert SlurmCluster.get_coordinator_address(None, None) == "gpu017:62016"
        assert SlurmCluster.get_process_count() == 16
        seen.add((SlurmCluster.get_process_id(), SlurmCluster.get_local_process_id()))
    assert seen == {(i, i % 8) for i in range(16)}  # every id once, GPUs 0-7 on each node


def test_slurm_job_runs_what_it_prints(tmp_path):
    record = (
        '#!/usr/bin/env bash\nprintf "%q " "$(basename "$0")" "$@" >> "$FAKE_LOG"\n'
        'echo >> "$FAKE_LOG"\n'
    )
    bin_dir = _fake_bin(tmp_path, srun=record, flock=record, sbatch=record)
    log = tmp_path / "ran.log"
    env = FAKE_JOB | {
        "SLURM_SUBMIT_DIR": str(ROOT),
        "WORKDIR": str(tmp_path / "run"),
        "FAKE_LOG": str(log),
    }
    printed = _commands(_launch(SLURM, env, "--dry-run", ODD_FLAG).stdout)
    _launch(SLURM, env, ODD_FLAG, path_prefix=bin_dir)
    ran = [shlex.split(line) for line in log.read_text().splitlines()]
    assert ran == [c for c in printed if c[0] in ("flock", "srun")]
    assert (tmp_path / "run").is_dir()
    # Submission from a login node: sbatch gets the flags it printed.
    log.unlink()
    env = SLURM_SUBMIT | {"FAKE_LOG": str(log)}
    printed = _commands(_launch(SLURM, env, "--dry-run").stdout)
    _launch(SLURM, env, path_prefix=bin_dir)
    assert [shlex.split(line) for line in log.read_text().splitlines()] == printed[:1]


def test_local_processes_dry_run():
    out = _launch(LOCAL, {}, "--dry-run", "3", "runs/multi", "--config.total_steps=2").stdout
    cmds = _commands(out)
    assert len(cmds) == 3
    assert [_flag(c, "--process_id") for c in cmds] == ["0", "1", "2"]
    assert {_flag(c, "--num_processes") for c in cmds} == {"3"}
    # Identical but for the process id.
    strip = [[w for w in c if w not in ("0", "1", "2")] for c in cmds]
    assert strip[0] == strip[1] == strip[2]


# ---------------------------------------------------------------------------------------------
# benchmarks/accelerator_check.sh: the refusal and the plan only (the check itself needs a GPU
# or TPU; its CPU smoke mode takes minutes)
# ---------------------------------------------------------------------------------------------

CHECK = ROOT / "benchmarks" / "accelerator_check.sh"


def test_accelerator_check_refuses_without_an_accelerator():
    proc = _launch(CHECK, {"ACCELERATOR": "none"}, check=False)
    assert proc.returncode == 2
    assert "no GPU or TPU" in proc.stderr and "--allow-cpu" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("hw, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_accelerator_check_plan(tmp_path, hw, platform):
    out = _launch(CHECK, {"ACCELERATOR": hw}, "--dry-run", "--out", str(tmp_path)).stdout
    parts = {}
    for line in out.splitlines():
        if not line.startswith("#"):
            name, _, command = line.partition(":")
            parts[name.split(" (")[0]] = shlex.split(command)
    assert list(parts) == [
        "parity",
        "unet_speed",
        "decode_hfd",
        "decode_rdeic",
        "decode_diffo",
        "train_mfu",
    ]
    parity = parts["parity"]
    assert (
        f"JAX_PLATFORMS={platform}" in parity and "JAX_DEFAULT_MATMUL_PRECISION=highest" in parity
    )
    tests = {w for w in parity if w.startswith("tests/")}
    assert {"tests/test_unet.py", "tests/test_vae.py", "tests/test_control.py"} <= tests
    assert {"tests/test_clip.py", "tests/test_metrics_perceptual.py"} <= tests
    assert all((ROOT / t).is_file() for t in tests)
    assert parts["unet_speed"][1:] == [
        "benchmarks/unet_speed.py",
        "--repeats",
        "3",
        "--device",
        "auto",
    ]
    for method in ("hfd", "rdeic", "diffo"):
        argv = parts[f"decode_{method}"]
        assert _flag(argv, "--method") == method and _flag(argv, "--variant") == "full"
        assert _flag(argv, "--size") == "768x512"
    assert _flag(parts["train_mfu"], "--config") == "configs/hfd.py:full"
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_accelerator_check_report(tmp_path):
    """The one JSON line, from the parts' files (no JAX needed)."""
    import json

    (tmp_path / "parity.log").write_text(
        "....F\nFAILED tests/test_vae.py::test_x - boom\n1 failed, 41 passed in 61.20s (0:01:01)\n"
    )
    helper = ["python3", str(ROOT / "benchmarks" / "accelerator_check.py")]
    summary = subprocess.run(
        [*helper, "pytest-summary", str(tmp_path / "parity.log")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "parity.json").write_text(summary)
    (tmp_path / "parity.status").write_text("1 70")
    speed = {
        "unet_jax_s": 0.05,
        "unet_torch_s": 0.06,
        "unet_ratio": 0.83,
        "vae_decoder_ratio": 0.9,
        "torch_device": "cuda",
        "jax_backend": "gpu",
    }
    (tmp_path / "unet_speed.json").write_text(json.dumps(speed))
    (tmp_path / "unet_speed.status").write_text("0 80")
    (tmp_path / "decode_hfd.json").write_text(json.dumps({"decode_s": 0.4}))
    (tmp_path / "decode_hfd.status").write_text("0 50")
    (tmp_path / "decode_rdeic.status").write_text("124 100")
    (tmp_path / "train_mfu.status").write_text("skipped: the time budget (465s) was spent")
    line = subprocess.run(
        [*helper, "report", str(tmp_path), "--set", 'mode="accelerator"', "--set", "total_s=300"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(line.splitlines()) == 1
    r = json.loads(line)
    assert r["mode"] == "accelerator" and r["total_s"] == 300
    assert r["parity_passed"] == 41 and r["parity_failed"] == 1
    assert r["parts"]["parity"]["result"]["failures"] == ["tests/test_vae.py::test_x"]
    assert r["unet_ratio"] == 0.83 and r["decode_hfd_s"] == 0.4 and r["decode_rdeic_s"] is None
    assert r["parts"]["decode_rdeic"]["status"] == "timeout"
    assert r["parts"]["train_mfu"]["status"].startswith("skipped")
    assert r["ok"] is False
