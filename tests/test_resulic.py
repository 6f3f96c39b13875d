"""ResULIC end to end on the tiny variant: both stages train through the real loop with
captions (losses fall), files with and without a caption round-trip exactly in a fresh process
and their size counts the caption stream, bad sampler settings are refused, and the official
checkpoint format round-trips through `jaxcodec import-weights --format resulic`, and the
encoder's hard-prompt search runs as one jitted program."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from run_configs import run_config

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "A close-up of an orange tabby cat with green eyes."


def photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.chelsea()[50 : 50 + h, 100 : 100 + w])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1, then stage 2 from it, on the scikit-image photos and their captions."""
    from jaxcodec.train import train_and_evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCODEC_CACHE", str(tmp_path_factory.mktemp("cache")))
        root = tmp_path_factory.mktemp("resulic")
        s1 = train_and_evaluate(run_config("configs/resulic.py:tiny", total_steps=24), root / "s1")
        c2 = run_config(
            "configs/resulic.py:tiny,stage=2", total_steps=24, init_from=str(root / "s1")
        )
        s2 = train_and_evaluate(c2, root / "s2")
        yield {"root": root, "stage1": s1, "stage2": s2}


@pytest.fixture(scope="module")
def codec(runs):
    from jaxcodec.codec import load_codec

    return load_codec(runs["root"] / "s2")


def _losses(summary):
    """The objective without the bottleneck's quantile loss (which reaches only quantiles)."""
    return np.array([h["loss"] - h["aux_loss"] for h in summary["history"]])


def test_both_stages_train_with_captions_and_losses_fall(runs):
    s1, s2 = _losses(runs["stage1"]), _losses(runs["stage2"])
    assert len(s1) == len(s2) == 24 and np.all(np.isfinite(np.concatenate([s1, s2])))
    print(f"stage 1 {s1[:6].mean():.4f} -> {s1[-6:].mean():.4f}; stage 2 {s2[:6].mean():.4f} ->")
    print(f"{s2[-6:].mean():.4f}")
    assert s1[-6:].mean() < 0.7 * s1[:6].mean() and s2[-6:].mean() < 0.97 * s2[:6].mean()
    last = runs["stage2"]["history"][-1]
    assert {"lpips", "mse", "eps_mse", "bpp", "z_c_mse", "aux_loss"} <= set(last)
    assert runs["stage1"]["nonfinite_total"] == runs["stage2"]["nonfinite_total"] == 0
    # The training batches carried the photos' captions.
    from jaxcodec.data import make_train_iterator

    data = run_config("configs/resulic.py:tiny").data
    batch = next(make_train_iterator(data, global_batch_size=4, seed=0))
    assert batch["caption_ids"].shape == (4, 77) and (batch["caption_ids"][:, 2] > 0).all()


def test_files_with_and_without_a_caption_round_trip_in_a_fresh_process(runs, codec, tmp_path):
    from jaxcodec.entropy import text_coder
    from jaxcodec.nn.text import default_tokenizer

    image = photo(72, 100)  # padded to 128 × 128 inside the codec
    coder = codec.coder
    coder.caption_source = lambda padded: CAPTION
    with_caption = codec.compress(image)
    tokens, symbols = codec.last_info["caption_tokens"], codec.last_info["y_symbols"]
    coder.caption_source = None
    without = codec.compress(image)
    assert tokens == default_tokenizer().encode(CAPTION)
    assert codec.last_info["caption_tokens"] is None and codec.last_info["caption_bits"] == 0
    caption_bytes = len(text_coder.encode(tokens))
    # The caption is its own stream: the file grows by exactly its bytes (the last stream's
    # length is implicit), and a file's bpp counts every byte.
    assert len(with_caption) == len(without) + caption_bytes and caption_bytes > 0
    bpp = 8 * len(with_caption) / (72 * 100)
    print(f"tiny ResULIC: {len(without)} bytes + caption {caption_bytes} bytes, {bpp:.4f} bpp")

    decoded = {}
    for name, data in (("with", with_caption), ("without", without)):
        decoded[name] = codec.decompress(data)
        assert decoded[name].shape == image.shape
        got = codec.last_info["caption_tokens"]
        assert got == (tokens if name == "with" else None)
        np.testing.assert_array_equal(codec.last_info["y_symbols"], symbols)
        (tmp_path / f"{name}.jxc").write_bytes(data)
    assert {"entropy_s", "denoise_s", "vae_decode_s"} <= set(codec.timings)
    assert not np.array_equal(decoded["with"], decoded["without"])  # the caption conditions

    script = (
        "import sys, json, numpy as np\n"
        "from jaxcodec.codec import load_codec\n"
        "c = load_codec(sys.argv[1]); out = {}\n"
        "for name in ('with', 'without'):\n"
        "    out[name] = c.decompress(open(f'{sys.argv[2]}/{name}.jxc', 'rb').read())\n"
        "    out[name + '_tokens'] = np.asarray(c.last_info['caption_tokens'] or [], np.int64)\n"
        "np.savez(f'{sys.argv[2]}/out.npz', **out)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    # Same XLA flags as this process: the decode programs come from the shared compilation
    # cache, and what is checked is the file and the process state (another device count is
    # test_method_interface's portable decoding).
    subprocess.run(
        [sys.executable, "-c", script, str(runs["root"] / "s2"), str(tmp_path)],
        check=True,
        env=env,
        cwd=ROOT,
    )
    fresh = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(fresh["with"], decoded["with"])
    np.testing.assert_array_equal(fresh["without"], decoded["without"])
    assert fresh["with_tokens"].tolist() == tokens and fresh["without_tokens"].size == 0


def test_captions_come_from_the_configured_json_file(codec):
    """The tiny config's caption file names the scikit-image photos: the full photo gets its
    caption by its pixels; a crop of it has none."""
    from skimage import data

    from jaxcodec.data.captions import SKIMAGE_CAPTIONS
    from jaxcodec.nn.text import default_tokenizer

    coder = codec.coder
    coder._caption_spec, coder._source = (str(SKIMAGE_CAPTIONS), ""), None
    caption = json.loads(SKIMAGE_CAPTIONS.read_text())["chelsea"]
    padded = np.pad(data.chelsea(), ((0, 84), (0, 61), (0, 0)), mode="edge")  # 384 × 512
    assert coder.caption_source(padded) == caption
    assert coder.caption_source(np.pad(photo(72, 100), ((0, 56), (0, 28), (0, 0)))) is None
    assert default_tokenizer().encode(caption)[: codec.method.caption_budget()]


def test_sampler_settings_are_checked(runs, codec):
    from jaxcodec.codec import load_codec
    from jaxcodec.entropy.container import BitstreamError

    with pytest.raises(ValueError, match="divide the start step"):
        load_codec(runs["root"] / "s2", options={"steps": 7}).compress(photo(72, 100))
    with pytest.raises(ValueError, match="no decode option"):
        load_codec(runs["root"] / "s2", options={"rate_index": 1})
    # A header whose settings the sampler cannot run is refused before decoding.
    from jaxcodec.entropy import container

    codec.coder.caption_source = None
    data = codec.compress(photo(72, 100))
    header, streams = codec._unpack(data)
    bad = container.Header(
        header.height, header.width, header.model_id, dict(header.options, start_step=301)
    )
    with pytest.raises(BitstreamError, match="divide the start step"):
        codec.decompress(container.pack(bad, streams, codec.hash))


def test_official_checkpoint_round_trip(runs, codec, tmp_path):
    """to_official (official key names, a torch .ckpt) → `jaxcodec import-weights --format
    resulic` → identical parameters and pixels."""
    torch = pytest.importorskip("torch")
    from jaxcodec import cli
    from jaxcodec.codec import load_codec
    from jaxcodec.weights import resulic as importer

    m, v = codec.method, codec.variables
    official = importer.to_official(v.params, m.compressor_config, m.unet_config, m.adapter_config)
    assert "preprocess_model.encoder.g_a1.0.conv1.weight" in official
    assert "control_model.enc_zero_convs_in.0.0.weight" in official
    state_dict = {k: torch.from_numpy(a) for k, a in official.items()}
    state_dict["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # SD parts are ignored
    ckpt = tmp_path / "resulic_tiny.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 3}, ckpt)
    out = tmp_path / "imported.safetensors"
    spec = "configs/resulic.py:tiny,stage=2"
    argv = ["import-weights", "--format", "resulic", str(ckpt), str(out), "--config", spec]
    assert cli.main([*argv, "--sd", m.config.model.sd_path]) == 0
    imported = load_codec(out)
    jax.tree.map(np.testing.assert_array_equal, imported.variables.params, v.params)
    codec.coder.caption_source = imported.coder.caption_source = lambda padded: CAPTION
    image = photo(72, 100)
    want = codec.decompress(codec.compress(image))
    np.testing.assert_array_equal(imported.decompress(imported.compress(image)), want)


def test_prompt_search_is_jitted_lowers_its_loss_and_round_trips(codec):
    """PEZ on the trained tiny model: one compiled program runs the whole search, its loss
    falls, and the prompt it finds is a token sequence the tokenizer decodes and re-encodes
    to itself (what the caption stream carries)."""
    import jax.numpy as jnp

    from jaxcodec import prompt_search as ps
    from jaxcodec.nn.text import default_tokenizer

    method, v = codec.method, codec.variables
    image = photo(128, 128)

    @jax.jit  # one program, not one eager dispatch (and compile) per op
    def z_c_of(frozen, params, x):
        z0 = method._encode(frozen, x)
        return method.compressor.apply({"params": params}, z0, train=False).z_c

    z_c = z_c_of(
        v.frozen, v.params["compressor"], jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0
    )
    clip = ps.load_clip(Path(method.config.model.sd_path) / "text_encoder")
    config = ps.SearchConfig(length=6, iterations=24, eval_every=8, clip_weight=1.0)
    result = ps.search(method, v, image, z_c, None, config, clip, steps=2, guidance=1.0)
    losses, trace = result["losses"], result["lpips_trace"]
    print(f"PEZ loss {losses[:4].mean():.3f} -> {losses[12:].mean():.3f}; LPIPS trace {trace}")
    assert ps._search._cache_size() == 1  # one compiled program ran the whole search
    # Each projection onto the vocabulary makes the loss jump (by up to 0.45 between iterations),
    # so the second half's mean, not the last few: with initial weights a few ulp apart the last 4
    # iterations' mean was 0.87 and 0.91 of the first 4's, the second half's 0.78 and 0.80.
    assert losses.shape == (24,) and losses[12:].mean() < 0.9 * losses[:4].mean()
    assert result["lpips"] == pytest.approx(trace.min()) and len(trace) == 4
    tok = default_tokenizer()
    tokens = result["tokens"]
    assert len(tokens) == 6 and tok.encode(tok.decode(tokens)) == tokens

    # Through the codec: the file carries the tokens the encoder's search chose.
    coder = codec.coder
    coder.caption_source = None
    coder.prompt_search = {"length": 6, "iterations": 24, "eval_every": 8, "clip_weight": 1.0}
    try:
        data = codec.compress(image)
        chosen = codec.last_info["caption_tokens"]
        assert len(chosen) == 6 and "prompt_lpips" in codec.last_info
        codec.decompress(data)
        assert codec.last_info["caption_tokens"] == chosen
        assert ps._search._cache_size() == 1  # the same program
    finally:
        coder.prompt_search = None
