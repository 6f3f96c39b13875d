"""The method interface end to end with a tiny method that has a frozen pretrained VAE, a VQ
codebook in `vq_stats`, two stages and a stochastic decoder (tests/frozen_vq_method.py)."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from frozen_vq_method import get_config, write_vae_folder
from run_configs import set_fields

from jaxcodec.checkpoint import Checkpointer, CheckpointError, load_bundle, tree_digest
from jaxcodec.codec import load_codec
from jaxcodec.configlib import PROJECT_ROOT
from jaxcodec.train import jit_init, train_and_evaluate

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    return write_vae_folder(tmp_path_factory.mktemp("vae"), seed=0)


def config(vae: Path, *overrides: tuple[str, object]):
    c = get_config(str(vae))
    set_fields(c, dict(overrides))
    return c


def _jaxpr_outputs(jaxpr, primitives: set[str]) -> list[tuple[int, ...]]:
    """Shapes of every output of the given primitives, nested jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _jaxpr_outputs(sub, primitives)
    return shapes


def test_train_step_never_differentiates_or_optimises_the_frozen_part(vae_folder):
    from jaxcodec.checkpoint import TrainState
    from jaxcodec.codec import load_frozen
    from jaxcodec.methods import get_method
    from jaxcodec.train import make_optimizer, train_step

    c = config(vae_folder)
    method = get_method(c)
    frozen, identity = load_frozen(method, {})
    assert identity["vae"]["sha256"] == tree_digest(frozen["vae"])
    batch = {
        "image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
    }
    variables = jit_init(method.init, jax.random.key(0), batch)
    params, model_state = variables.pop("params"), variables
    tx = make_optimizer(c.optimizer, 10, jax.tree.map(lambda _: True, params))
    state = TrainState(
        jnp.int32(0), params, params, tx.init(params), model_state, jnp.int32(0), jnp.int32(0)
    )
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)  # own buffers to donate
    step = functools.partial(
        train_step, method=method, tx=tx, base_key=jax.random.key(1), ema_decay=0.9
    )
    jaxpr = jax.make_jaxpr(step)(state, frozen, batch).jaxpr
    # Weight gradients are convolutions whose output has a kernel's shape: there are some for
    # every trainable kernel and none for any frozen one.
    conv_outputs = set(_jaxpr_outputs(jaxpr, {"conv_general_dilated"}))
    frozen_kernels = {tuple(x.shape) for x in jax.tree.leaves(frozen["vae"]) if np.ndim(x) == 4}
    trainable_kernels = {tuple(x.shape) for x in jax.tree.leaves(params) if np.ndim(x) == 4}
    assert trainable_kernels and trainable_kernels <= conv_outputs
    assert frozen_kernels and not (frozen_kernels & conv_outputs), frozen_kernels & conv_outputs
    # The optimiser state mirrors the trainable params only.
    opt_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(state.opt_state) if np.ndim(x))
    param_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(params))
    assert opt_shapes == sorted(param_shapes * 2)  # Adam's mu and nu

    before = jax.tree.map(np.array, frozen)
    model_state = jax.tree.map(np.array, model_state)
    new_state, metrics = jax.jit(step, donate_argnums=0)(state, frozen, batch)
    jax.tree.map(np.testing.assert_array_equal, frozen, before)
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
        new_state.model_state["vq_stats"],
        model_state["vq_stats"],
    )
    assert changed["vq"]["codebook"] and changed["vq"]["ema_count"]


_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
    from frozen_vq_method import get_config
    from jaxcodec.train import train_and_evaluate

    c = get_config({vae!r})
    c.total_steps = {total}

    def die(step, metrics):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

    train_and_evaluate(c, {workdir!r}, on_step=die)
    """
)


def test_eight_devices_frozen_vq_sigkill_resume_and_portable_decoding(vae_folder, tmp_path):
    """8 fake devices: losses and the VQ statistics match 1 device; a run killed with SIGKILL
    resumes with the same losses; the codec bundle decodes in a fresh 1-device process."""
    total = 6
    ref = train_and_evaluate(
        config(vae_folder, ("total_steps", total), ("mesh.num_devices", 8)), tmp_path / "ref"
    )
    one = train_and_evaluate(
        config(vae_folder, ("total_steps", 2), ("mesh.num_devices", 1)), tmp_path / "one"
    )
    np.testing.assert_allclose(
        [h["loss"] for h in one["history"]], [h["loss"] for h in ref["history"][:2]], rtol=1e-5
    )
    losses = [h["loss"] for h in ref["history"]]
    assert losses[-1] < losses[0]
    # The codebook moved with the data (and identically on 8 devices and on 1).
    ckpt = Checkpointer(tmp_path / "ref", async_save=False)
    stats_8 = ckpt.restore_host(2, ("model_state",))["model_state"]["vq_stats"]["vq"]
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "one", async_save=False)
    stats_1 = ckpt.restore_host(2, ("model_state",))["model_state"]["vq_stats"]["vq"]
    ckpt.close()
    np.testing.assert_allclose(stats_8["ema_count"], stats_1["ema_count"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats_8["codebook"], stats_1["codebook"], rtol=1e-4, atol=1e-5)
    # Nothing of the frozen VAE is checkpointed; the workdir records its source and digest.
    bundle = load_bundle(tmp_path / "ref" / "codec.safetensors")
    assert set(bundle.frozen_identity) == {"vae"} and bundle.frozen == {}
    assert bundle.frozen_identity["vae"]["source"] == str(vae_folder)
    assert "vq_stats" in bundle.state and "codebook_q" in bundle.tables

    killed = tmp_path / "killed"
    script = _KILLED.format(
        tests=str(TESTS), root=str(PROJECT_ROOT), vae=str(vae_folder), total=total, kill_at=5,
        workdir=str(killed),
    )  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resumed = train_and_evaluate(
        config(vae_folder, ("total_steps", total), ("mesh.num_devices", 8)), killed
    )
    assert resumed["resumed_from"] == 4
    ref_losses = {h["step"]: h["loss"] for h in ref["history"]}
    for h in resumed["history"]:
        assert h["loss"] == ref_losses[h["step"]], h["step"]

    # A stochastic decoder: the seed travels in the header, so a fresh single-device process
    # decodes the file to the same pixels, and another seed to other pixels.
    codec = load_codec(tmp_path / "ref")
    from skimage import data

    image = data.astronaut()[100:164, 200:264]
    a = codec.compress(image)
    reseeded = load_codec(tmp_path / "ref", options={"seed": 7}).compress(image)
    assert len(a) == len(reseeded) and a != reseeded
    decoded = codec.decompress(a)
    assert not np.array_equal(decoded, codec.decompress(reseeded))
    (tmp_path / "a.jxc").write_bytes(a)
    out = _decode_in_fresh_process(tmp_path / "ref", tmp_path / "a.jxc", tmp_path / "a.npy")
    np.testing.assert_array_equal(out, decoded)


_DECODE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from jaxcodec.codec import load_codec
    codec = load_codec(sys.argv[1])
    np.save(sys.argv[3], codec.decompress(open(sys.argv[2], "rb").read()))
    """
)


def _decode_in_fresh_process(model: Path, jxc: Path, out: Path, devices: int = 1) -> np.ndarray:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run(
        [sys.executable, "-c", _DECODE.format(tests=str(TESTS)), str(model), str(jxc), str(out)],
        check=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    return np.load(out)


def test_stage_two_starts_from_stage_one_and_frozen_weights_are_checked(vae_folder, tmp_path):
    stage1 = tmp_path / "stage1"
    train_and_evaluate(config(vae_folder, ("total_steps", 2)), stage1)
    first = load_bundle(stage1 / "codec.safetensors")

    stage2 = tmp_path / "stage2"
    c2 = config(vae_folder, ("stage", 2), ("init_from", str(stage1)), ("total_steps", 3))
    c2.checkpoint_every = 100
    c2.optimizer.lr = 0.0  # so the handed-over parameters are still there at the end
    train_and_evaluate(c2, stage2)
    # The stage started from stage 1's final EMA parameters and carried its codebook on.
    second = load_bundle(stage2 / "codec.safetensors")
    assert tree_digest(second.params) == tree_digest(first.params)
    assert not np.array_equal(
        second.state["vq_stats"]["vq"]["ema_count"], first.state["vq_stats"]["vq"]["ema_count"]
    )
    # The workdir keeps the stage-1 model it started from, and its source.
    copied = load_bundle(stage2 / "previous_stage.safetensors")
    assert tree_digest(copied.params) == tree_digest(first.params)
    assert load_bundle(stage2 / "codec.safetensors").config.init_from == str(stage1)
    # Resuming with another init_from is refused up front, naming the field.
    other = config(vae_folder, ("stage", 2), ("init_from", str(tmp_path)), ("total_steps", 4))
    with pytest.raises(ValueError, match="init_from"):
        train_and_evaluate(other, stage2)

    # Other VAE weights in the same folder: decoding and resuming are refused.
    write_vae_folder(vae_folder, seed=1)
    try:
        with pytest.raises(CheckpointError, match="frozen weights differ.*vae"):
            load_codec(stage2)
        with pytest.raises(CheckpointError, match="frozen weights differ.*vae"):
            train_and_evaluate(config(vae_folder, ("total_steps", 3)), stage1)
    finally:
        write_vae_folder(vae_folder, seed=0)
    load_codec(stage2)  # the original weights are accepted again
