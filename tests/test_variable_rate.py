"""One model for every rate: the rate field of the container, the integer inverse-z tables, files
at every q decoding identically in a fresh process, and `--quality` / `--target-bpp`."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data

from jaxcodec import cli
from jaxcodec.codec import TargetSizeCodec, load_codec, save_codec
from jaxcodec.configlib import PROJECT_ROOT, load_config
from jaxcodec.entropy import container, fixedpoint
from jaxcodec.entropy.container import BitstreamError
from jaxcodec.methods import get_method
from jaxcodec.nn import latent_compressor as lc
from jaxcodec.nn import rate as rate_lib
from jaxcodec.nn.hyperprior import MeanScaleHyperprior
from jaxcodec.train import jit_init

# A plain mean-scale entropy model (one coding pass: fewer programs to compile); the latent
# compressor's test below covers the space-channel context.
TINY = ["model.N=16", "model.M=16", "model.entropy_model=hyperprior", "data.crop_size=64"]
IMAGE = data.astronaut()[100:164, 150:278]  # 64 x 128
INDICES = (0, 1, 100, 201, 255)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A rate-conditioned HFD autoencoder (gain units, untrained: the gains start at the
    sqrt(λ) prior, so q moves the rate by a factor of several)."""
    config = load_config("configs/hfd.py:tiny,variable_rate=1", TINY)
    method = get_method(config)
    variables = jit_init(method.init, jax.random.key(0), method.dummy_batch(1))
    return save_codec(tmp_path_factory.mktemp("vr") / "gain", config, variables["params"])


@pytest.fixture(scope="module")
def codec(model):
    return load_codec(model)


def _digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_the_rate_field_costs_two_bytes_and_version_3_files_are_unchanged():
    model_hash = bytes(range(32))
    streams = [b"abc", b"defg"]
    plain = container.pack(container.Header(64, 128, model_hash[:2]), streams, model_hash)
    rated = container.pack(
        container.Header(64, 128, model_hash[:2], {"rate": 300}), streams, model_hash
    )
    assert plain[2] >> 5 == 3 and rated[2] >> 5 == 4 and len(rated) == len(plain) + 2
    header, out = container.unpack(rated, model_hash, options={"rate"})
    assert header.options == {"rate": 300} and out == streams
    with_options = {"rate": 65535, "steps": 4, "seed": 1}
    both = container.pack(container.Header(1, 1, model_hash[:2], with_options), streams, model_hash)
    assert container.unpack(both, model_hash, options=with_options)[0].options == with_options
    with pytest.raises(BitstreamError, match="unknown: rate"):
        container.unpack(rated, model_hash, options=set())
    with pytest.raises(ValueError, match="rate must be an integer"):
        container.pack(container.Header(1, 1, b"xx", {"rate": 1 << 16}), streams, model_hash)


def test_integer_inverse_z_is_exact_and_refuses_bad_tables():
    rng = np.random.default_rng(0)
    scale = np.exp(rng.uniform(-5.0, 5.0, (3, 7)))
    shift = rng.uniform(-3.0, 3.0, (3, 7))
    tables = rate_lib.z_inverse_tables(scale, shift)
    rate_lib.check_tables(tables, 3, 7)
    z = rng.integers(-fixedpoint.ACT_LIMIT, fixedpoint.ACT_LIMIT, (5, 4, 7))
    out = rate_lib.inverse_z(tables, z, 2)
    s, b = (np.asarray(tables[k][2]).tolist() for k in ("z_scale", "z_shift"))
    expect = [
        [[(int(v) * s[c] + (1 << 15)) // (1 << 16) + b[c] for c, v in enumerate(px)] for px in row]
        for row in z.tolist()
    ]  # Python integers: no overflow possible
    np.testing.assert_array_equal(out, np.asarray(expect))
    float_ref = fixedpoint.from_fixed(z) * scale[2] + shift[2]
    assert np.abs(fixedpoint.from_fixed(out) - float_ref).max() < 2e-3 * np.abs(float_ref).max()
    with pytest.raises(fixedpoint.FixedPointOverflow):
        rate_lib.check_tables({"z_scale": -tables["z_scale"], "z_shift": tables["z_shift"]}, 3, 7)
    with pytest.raises(ValueError, match="shape"):
        rate_lib.check_tables(tables, 4, 7)


def test_fixed_rate_models_keep_their_parameter_paths():
    x = jnp.zeros((1, 64, 64, 3))
    kw = dict(N=8, M=16, context_groups=(8, 8))
    key, q = jax.random.key(0), jnp.zeros((1,))
    fixed = jax.eval_shape(lambda: MeanScaleHyperprior(**kw).init(key, x, train=False))["params"]
    rate = rate_lib.RateConfig(0.001, 0.01)
    conditioned = jax.eval_shape(
        lambda: MeanScaleHyperprior(**kw, rate=rate).init(key, x, train=False, q=q)
    )["params"]
    assert set(conditioned) - set(fixed) == {"rate_conditioning"}
    paths = lambda tree: {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)
    }  # noqa: E731
    assert paths(fixed) == {p for p in paths(conditioned) if "rate_conditioning" not in p}
    with pytest.raises(ValueError, match="takes q"):
        jax.eval_shape(lambda: MeanScaleHyperprior(**kw).init(key, x, train=False, q=q))


def test_files_of_every_q_decode_identically_in_a_fresh_process(codec, model, tmp_path):
    sizes, record = [], {}
    for index in INDICES:
        c = codec.at_rate(index)
        data_ = c.compress(IMAGE)
        symbols = c.last_info["y_symbols"]
        pixels = c.decompress(data_)
        np.testing.assert_array_equal(c.last_info["y_symbols"], symbols)
        (tmp_path / f"{index}.jxc").write_bytes(data_)
        record[str(index)] = _digest(pixels)
        sizes.append(len(data_))
    assert sizes[-1] > 2 * sizes[0]  # q steers the rate (by sqrt(λ_max/λ_min) ≈ 2.7 in y's scale)
    script = (
        "import sys, json, hashlib, numpy as np\n"
        "from jaxcodec.codec import load_codec\n"
        "codec = load_codec(sys.argv[1])\n"
        "out = {}\n"
        "for i in sys.argv[3:]:\n"
        "    p = codec.decompress(open(f'{sys.argv[2]}/{i}.jxc', 'rb').read())\n"
        "    out[i] = hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest()\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), JAXCODEC_COMPILATION_CACHE="0")
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    out = subprocess.run(
        [sys.executable, "-c", script, str(model), str(tmp_path), *map(str, INDICES)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == record


def test_target_bpp_finds_the_largest_q_within_the_size(codec):
    h, w = IMAGE.shape[:2]
    lo, hi = (8.0 * len(codec.at_rate(i).compress(IMAGE)) / (h * w) for i in (0, 255))
    target = TargetSizeCodec(codec, (lo + hi) / 2)
    data_ = target.compress(IMAGE)
    s = target.last_search
    assert s["reached"] and 8.0 * len(data_) <= s["target_bpp"] * h * w
    assert s["probes"] <= 10  # bisection over 256 levels
    # Each probe is a real encode: the chosen file is the plain file at that q, and the next q
    # makes a file over the target.
    assert codec.at_rate(s["rate"]).compress(IMAGE) == data_
    assert 8.0 * len(codec.at_rate(s["rate"] + 1).compress(IMAGE)) > s["target_bpp"] * h * w
    assert np.array_equal(codec.decompress(data_), codec.at_rate(s["rate"]).decompress(data_))
    below = TargetSizeCodec(codec, lo / 2)
    assert len(below.compress(IMAGE)) * 8.0 / (h * w) == lo and not below.last_search["reached"]


def test_cli_quality_and_target_bpp(model, codec, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(IMAGE).save(src)
    out = tmp_path / "q.jxc"
    assert (
        cli.main(["compress", str(src), str(out), "--checkpoint", str(model), "--quality", "40"])
        == 0
    )
    assert out.read_bytes() == codec.at_quality(40).compress(IMAGE)
    assert load_codec(model).decompress(out.read_bytes()).shape == IMAGE.shape
    args = ["compress", str(src), str(tmp_path / "t.jxc"), "--checkpoint", str(model)]
    assert cli.main([*args, "--target-bpp", "0.5"]) == 0
    assert (tmp_path / "t.jxc").stat().st_size * 8 <= 0.5 * IMAGE.shape[0] * IMAGE.shape[1]
    assert "probes" in capsys.readouterr().out
    assert cli.main([*args, "--quality", "101"]) == 2
    assert "outside [0, 100]" in capsys.readouterr().err


def test_a_fixed_rate_model_refuses_a_rate(tmp_path, capsys):
    model = tmp_path / "golden.safetensors"  # the golden test's fixed-rate HFD model
    model.write_bytes(
        gzip.decompress((PROJECT_ROOT / "tests/golden/model.safetensors.gz").read_bytes())
    )
    src = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(IMAGE).save(src)
    args = ["compress", str(src), str(tmp_path / "o.jxc"), "--checkpoint", str(model)]
    assert cli.main([*args, "--target-bpp", "0.3"]) == 2
    assert "needs a rate-conditioned model" in capsys.readouterr().err
    assert not (tmp_path / "o.jxc").exists()


def test_latent_compressor_codes_at_every_q_with_the_decoders_integers():
    """RDEIC's compressor (VQ hyper latent: only the integer inverse_z reaches h_s)."""
    rate = rate_lib.RateConfig(0.1, 2.0, kind="affine")
    config = lc.LatentCompressorConfig(
        in_channels=4, N=8, M=16, groups=(16,), num_codes=32, res_blocks=(1, 1), rate=rate
    )
    comp = lc.LatentCompressor(config)
    h = jax.random.normal(jax.random.key(1), (1, 16, 16, 4))
    # Seeded random weights of the initialiser's shapes (compiling the init costs a minute).
    shapes = jax.eval_shape(lambda: comp.init(jax.random.key(0), h, train=False, q=jnp.zeros(1)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32),
        nn.unbox(shapes),
    )
    tables = lc.entropy_tables(config, variables["params"], variables["vq_stats"])
    y, z = comp.apply(variables, h, method="analyse")
    indices = np.asarray(comp.apply(variables, z, method="hyper_indices"))[0]
    coding = lc.LatentCoding()
    symbols = set()
    for index in (0, 255):
        q = jnp.full((1,), rate.q(index))
        y_q = np.asarray(comp.apply(variables, y, q, "forward_y", method="modulate"))[0]
        streams, y_hat, info = coding.encode(tables, y_q, indices, index)
        decoded, dec_info = coding.decode(tables, streams, (2, 2), index)
        np.testing.assert_array_equal(decoded, y_hat)
        np.testing.assert_array_equal(dec_info["y_symbols"], info["y_symbols"])
        symbols.add(_digest(info["y_symbols"]))
    assert len(symbols) == 2


def test_rdeic_decode_steps_follow_q():
    method = get_method(load_config("configs/rdeic.py:tiny,variable_rate=1"))
    assert method.steps_at(255) == 2 and method.steps_at(0) == 5  # λ_r = 2 and 0.1
    options = method.coder.options()
    assert options["rate"] == method.rate.default_index
    assert options["steps"] == method.steps_at(options["rate"])
