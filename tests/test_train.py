"""The training stack: sharding invariance, crash-safe resume, the non-finite guard, configs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from run_configs import SMALL, loop_step, small_config

from jaxcodec.checkpoint import Checkpointer
from jaxcodec.configlib import PROJECT_ROOT, load_config
from jaxcodec.train import NonFiniteError, jit_init, train_and_evaluate


def _params_at(workdir: Path, step: int):
    """The raw saved parameters of a checkpoint, as host arrays."""
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(workdir, async_save=False)
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return jax.tree.map(np.asarray, restored["state"]["params"])


def test_eight_devices_match_one_device(tmp_path):
    """Same global batch on a 1-device and an 8-device mesh: the same losses, step by step."""

    one = train_and_evaluate(small_config("total_steps=4", "mesh.num_devices=1"), tmp_path / "one")
    eight = train_and_evaluate(small_config("total_steps=3", "mesh.num_devices=8"), tmp_path / "8")
    loss_one = [h["loss"] for h in one["history"]]
    loss_eight = [h["loss"] for h in eight["history"]]
    assert len(loss_one) == 4
    np.testing.assert_allclose(loss_eight, loss_one[:3], rtol=2e-5)
    assert loss_one[0] != loss_one[2]  # the model trains: the losses are not a constant

    # (Its files in fresh 1- and 8-device processes: test_multiprocess, on a 2-process model.)

    # Restoring the 8-device checkpoint on a 1-device mesh continues the same run.
    resumed = train_and_evaluate(
        small_config("total_steps=4", "mesh.num_devices=1"), tmp_path / "8"
    )
    assert resumed["resumed_from"] == 3
    np.testing.assert_allclose(resumed["history"][-1]["loss"], loss_one[3], rtol=2e-5)

    # Resuming with another model is refused up front, naming what differs.
    with pytest.raises(ValueError, match=r"model.N: 16 -> 8"):
        train_and_evaluate(small_config("total_steps=5", "model.N=8"), tmp_path / "one")


_KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from run_configs import small_config
    from jaxcodec.train import train_and_evaluate

    def die(step, metrics):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

    train_and_evaluate(small_config("total_steps={total}"), {workdir!r}, on_step=die)
    """
)


def test_sigkill_mid_run_resumes_with_the_next_batch(tmp_path):
    total, kill_at = 7, 5
    reference = train_and_evaluate(small_config(f"total_steps={total}"), tmp_path / "ref")

    workdir = tmp_path / "killed"
    script = _KILLED_RUN.format(
        tests=str(PROJECT_ROOT / "tests"), kill_at=kill_at, total=total, workdir=str(workdir)
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    steps_on_disk = Checkpointer(workdir).all_steps()
    assert steps_on_disk and max(steps_on_disk) < total

    resumed = train_and_evaluate(small_config(f"total_steps={total}"), workdir)
    start = resumed["resumed_from"]
    assert 0 < start < kill_at + 1
    # Every step after the restart sees the batch the uninterrupted run saw: same losses ...
    ref_losses = {h["step"]: h["loss"] for h in reference["history"]}
    for h in resumed["history"]:
        assert h["step"] > start
        assert h["loss"] == ref_losses[h["step"]], h["step"]
    # ... and bit-identical final parameters.
    a, b = _params_at(tmp_path / "ref", total), _params_at(workdir, total)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    # λ = inf makes every loss infinite: the run must stop after the configured streak. (The
    # plain mean-scale entropy model: a program of its own either way, compiled in a third of
    # the default ELIC one's time.)
    config = small_config(
        "total_steps=10",
        "loss.lmbda=inf",
        "max_consecutive_nonfinite=3",
        "model.entropy_model=hyperprior",
    )
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train_and_evaluate(config, tmp_path / "inf")


def test_nonfinite_step_leaves_state_untouched():
    import dataclasses

    import jax.numpy as jnp

    # The loop's own step of test_eight_devices_match_one_device's one-device run (the same
    # program, from the compilation cache); it donates the state, so copies are compared.
    run = loop_step(small_config("total_steps=4", "mesh.num_devices=1"))
    images = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    batch = run.batch(images)
    params, opt_state = jax.device_get((run.state.params, run.state.opt_state))
    leaves, treedef = jax.tree.flatten(params)
    poisoned = jax.tree.unflatten(treedef, [leaves[0].copy(), *leaves[1:]])
    jax.tree.leaves(poisoned)[0].flat[0] = np.nan  # a NaN in one weight: a non-finite loss
    bad = dataclasses.replace(run.state, params=jax.tree.map(jnp.asarray, poisoned))

    skipped, metrics = run.step(bad, run.frozen, batch)
    assert not bool(metrics["step_finite"])
    assert int(skipped.step) == 1 and int(skipped.nonfinite_streak) == 1
    assert int(skipped.nonfinite_total) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(skipped.params), poisoned)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(skipped.opt_state), opt_state)

    repaired = dataclasses.replace(skipped, params=jax.tree.map(jnp.asarray, params))
    good, metrics = run.step(repaired, run.frozen, batch)
    assert bool(metrics["step_finite"])
    assert int(good.nonfinite_streak) == 0 and int(good.nonfinite_total) == 1
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), jax.device_get(good.params), params
    )
    assert any(jax.tree.leaves(changed))


def test_config_overrides_reach_the_model():
    from jaxcodec.methods import get_method

    config = load_config(
        "configs/hfd.py:tiny",
        ["model.N=24", "model.M=40", "model.context_groups=(8,8,24)", "--config.optimizer.lr=2e-5"],
    )
    assert config.optimizer.lr == 2e-5
    method = get_method(config)
    shapes = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))["params"]
    shapes = nn.unbox(shapes)  # the shapes, without their logical axes
    assert shapes["g_a"]["Conv_0"]["kernel"].shape[-1] == 24
    assert shapes["g_a"]["Conv_3"]["kernel"].shape[-1] == 40
    assert shapes["entropy_bottleneck"]["quantiles"].shape == (24, 1, 3)
    # The ELIC context follows the overridden channel groups: one spatial model per group.
    assert [shapes["context"][f"spatial_{i}"]["layer_0"]["kernel"].shape[2] for i in range(3)] == [
        8,
        8,
        24,
    ]


def test_unknown_variant_and_bad_mesh_are_clear_errors():
    from absl import flags

    with pytest.raises((ValueError, flags.Error), match="unknown variant"):
        load_config("configs/hfd.py:huge")
    from jaxcodec.sharding import create_mesh

    with pytest.raises(ValueError, match="do not split"):
        create_mesh((-1, 3, 1))


def test_cli_trains_checkpoints_and_resumes(tmp_path):
    """The issue's command: total_steps=3 leaves a checkpoint for 3; total_steps=5 resumes."""
    workdir = tmp_path / "cli"
    base = [
        sys.executable,
        "-m",
        "jaxcodec.train",
        "--config",
        "configs/hfd.py:tiny",
        "--workdir",
        str(workdir),
    ] + [f"--config.{o}" for o in SMALL]
    env = dict(os.environ)
    first = subprocess.run(
        base + ["--config.total_steps=3", "--config.real_file_eval=True"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert 3 in Checkpointer(workdir).all_steps()
    # The run ends with real files: one .jxc per evaluation image, its measured bpp printed.
    jxc = sorted((workdir / "final_eval").glob("*.jxc"))
    assert len(jxc) == 1 and jxc[0].stat().st_size > 16
    assert "measured bpp=" in first.stdout
    # The console shows the project's own lines: one per log interval and the result; what
    # libraries log (orbax, clu, absl) goes to the workdir's train.log.
    assert [line.split()[:2] for line in first.stdout.splitlines() if line.startswith("step ")] == [
        ["step", "1/3"],
        ["step", "2/3"],
        ["step", "3/3"],
    ]
    assert "orbax" not in first.stdout + first.stderr
    assert "checkpoint_manager" in (workdir / "train.log").read_text()
    written = json.loads((workdir / "config.json").read_text())
    assert written["model"]["N"] == 16 and written["total_steps"] == 3

    second = subprocess.run(
        base + ["--config.total_steps=5"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from 3" in second.stdout + second.stderr
    assert 5 in Checkpointer(workdir).all_steps()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and [h["step"] for h in summary["history"]] == [4, 5]


def test_frozen_parameter_subsets_do_not_move():
    """`optimizer.frozen` regexes freeze parameters; the quantiles follow their own (aux) rate."""
    import jax.numpy as jnp

    from jaxcodec.methods import get_method
    from jaxcodec.train import make_optimizer, param_labels

    config = small_config("model.entropy_model=hyperprior", "optimizer.frozen=('g_a/.*',)")
    method = get_method(config)
    batch = method.dummy_batch(2)
    batch["image"] = jnp.asarray(
        np.random.default_rng(1).integers(0, 255, batch["image"].shape), jnp.uint8
    )
    params = jit_init(method.init, jax.random.key(0), batch)["params"]
    trainable = jax.tree.map(lambda _: True, params)
    labels = param_labels(params, config.optimizer, trainable)
    assert set(jax.tree.leaves(labels["g_a"])) == {"frozen"}
    assert labels["entropy_bottleneck"]["quantiles"] == "aux"
    assert labels["g_s"]["GDN_0"]["beta"] == "main"

    tx = make_optimizer(config.optimizer, 10, trainable)
    grads = jax.jit(jax.grad(lambda p: method.loss(p, {}, {}, batch, jax.random.key(2))[0]))(params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert not any(jax.tree.leaves(moved["g_a"]))
    assert all(jax.tree.leaves(moved["g_s"]))


def test_a_preempted_stage_ends_the_stage_driver(tmp_path, monkeypatch):
    """SIGTERM in stage 1 stops `train_stages` there: stage 2 must not start from a half-trained
    stage 1 (the same command resumes stage 1, then runs stage 2)."""
    from jaxcodec import train

    ran = []

    def fake_stage(cfg, workdir):
        ran.append(Path(workdir).name)
        return {"preempted": len(ran) == 1, "final_step": 2}

    monkeypatch.setattr(train, "train_and_evaluate", fake_stage)
    summaries = train.train_stages(small_config("stages=(1,2)"), tmp_path)
    assert ran == ["stage1"] and summaries[-1]["preempted"]
    ran.clear()
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: ran.append(Path(w).name) or {})
    train.train_stages(small_config("stages=(1,2)"), tmp_path)
    assert ran == ["stage1", "stage2"]
