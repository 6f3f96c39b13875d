"""DiffCR's parts, small and fast: parity of the compressor, FaSE and ProjLayer with the official
PyTorch modules (Darc8-sun/DiffCR c26465f, small configurations, every weight perturbed;
reference files and the script that wrote them in tests/data/parity/diffcr_*), the official
parameter counts and state-dict keys at full size, the frequency-decoupled attention's bands,
the encoder's start step against a direct computation on the 50-step grid, and the side
information."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_files import close

from jaxcodec import diffusion as dd
from jaxcodec.nn import fase as fase_lib
from jaxcodec.nn import latent_compressor as lc
from jaxcodec.weights import diffcr as importer
from jaxcodec.weights import diffusers as dw

PARITY = Path(__file__).parent / "data" / "parity"

# The official modules of tests/data/parity/diffcr_make_reference.py, in jaxcodec's configs.
COMPRESSOR = lc.LatentCompressorConfig(
    in_channels=8, out_channels=8, N=16, M=16, groups=(8, 8), num_codes=32, res_blocks=(4, 3)
)
FASE = fase_lib.FaSEConfig(model_channels=32, num_rrdb=1, grow_channels=8)
PROJ_DIMS = (64, 64, 128)


def _reference(name: str) -> tuple[dict, dict, dict]:
    folder = PARITY / f"diffcr_{name}"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["repository"] == "Darc8-sun/DiffCR" and meta["commit"] == "c26465f"
    weights = dw.read_safetensors(folder / "weights.safetensors")
    ref = {
        k: np.asarray(v) for k, v in dw.read_safetensors(folder / "reference.safetensors").items()
    }
    return weights, ref, meta


def test_compressor_matches_the_official_compressor_v3():
    """Every stage of the official forward at 24×40 moments (y 12×20, z 3×5): g_a, h_a, the VQ
    indices, h_s, ŷ and its likelihoods, g_s/out, and ĉ through the frozen quant pair."""
    weights, ref, meta = _reference("compressor")
    assert meta["args"]["cb_size"] == COMPRESSOR.num_codes
    params, state, quant, report = importer.from_official(weights, COMPRESSOR, FASE, None)
    assert report["modules"] == ["compressor"] and not report["ignored"]
    assert report["quant"] == ["post_quant_conv", "quant_conv"]
    assert "gaussian_conditional._quantized_cdf" in report["rebuilt"]  # listed, never read
    model = lc.LatentCompressor(COMPRESSOR)
    v = {"params": params["compressor"], **state}
    h = jnp.asarray(ref["h"], jnp.float32)

    @jax.jit
    def run(v, quant, h):
        y, z = model.apply(v, h, method="analyse")
        vq = model.apply(v, z, method=lambda m, z: m.vq(z, train=False))
        hyper = model.apply(v, vq.z_q, method="hyper_synthesis")
        y_hat, _ = model.apply(v, y, hyper, method=lambda m, y, p: m.context(y, p, train=False))
        out = model.apply(v, h, train=False)
        moments = nn.Conv(8, (1, 1)).apply({"params": quant["quant_conv"]}, out.z_c)
        return dict(y=y, z=z, indices=vq.indices, hyper=hyper, y_hat=y_hat, out8=out.z_c,
                    y_likelihoods=out.y_likelihoods, c_mode=moments[..., :4])  # fmt: skip

    got = run(v, quant, h)
    np.testing.assert_array_equal(np.asarray(got.pop("indices")), ref["indices"])
    errors = {name: close(value, ref[name], name) for name, value in got.items()}
    print("compressor parity (max relative error):", {k: f"{e:.1e}" for k, e in errors.items()})


def test_fase_matches_the_official_time_aware_refinement():
    """FDA's output and FaSE's at 12×20 latents, two timesteps (batch 2)."""
    weights, ref, meta = _reference("fase")
    assert meta["args"]["model_channels"] == FASE.model_channels
    params, state, quant, report = importer.from_official(weights, COMPRESSOR, FASE, None)
    assert report["modules"] == ["fase"] and not state and not quant
    model = fase_lib.FaSE(FASE)
    z0, c_hat = (jnp.asarray(ref[k], jnp.float32) for k in ("z0", "c_hat"))
    t = jnp.asarray(ref["t"])
    v = {"params": params["fase"]}
    fda = jax.jit(lambda v: model.apply(v, c_hat, z0, t, method=lambda m, *a: m.fda(*a)))(v)
    out = jax.jit(lambda v: model.apply(v, z0, c_hat, t))(v)
    e_fda, e_out = close(fda, ref["fda"], "fda"), close(out, ref["out"], "out")
    print(f"FaSE parity: FDA {e_fda:.1e}, output {e_out:.1e}")


def test_proj_layer_matches_the_official_proj_layer():
    weights, ref, _ = _reference("proj_layer")
    params, _, _, _ = importer.from_official(weights, COMPRESSOR, FASE, PROJ_DIMS)
    out = fase_lib.ProjLayer(PROJ_DIMS[1], PROJ_DIMS[2]).apply(
        {"params": params["proj"]}, jnp.asarray(ref["x"], jnp.float32)
    )
    print(f"ProjLayer parity: {close(out, ref['out'], 'out'):.1e}")


def _official_keys(name: str) -> dict[str, tuple]:
    out = {}
    path = PARITY / "diffcr_official_keys" / f"diffcr_{name}_keys.txt"
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.startswith("buffer(non-persistent)"):
            continue
        _, key, rest = line.split(" ", 2)
        out[key] = tuple(int(d) for d in rest.rsplit(" ", 1)[0].strip("()").split(",") if d)
    return out


def test_full_size_counts_and_every_official_key():
    """configs/diffcr.py:full from shapes: 46,645,512 compressor parameters (codebook and the
    frozen quant pair included), FaSE 19,763,080, ProjLayer 4,199,424; every official key of
    the three modules mapped with its shape, and the export writes exactly those keys."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.nn.vae import vae_param_shapes

    method = get_method(load_config("configs/diffcr.py:full"))
    the_plan = importer.plan(method.compressor_config, method.fase_config, method.proj_dims)
    size = lambda entries: sum(int(np.prod(e.shape)) for e in entries)  # noqa: E731
    assert size(the_plan["compressor"].values()) - 32 == 46_645_512  # embed_prob is a buffer
    assert size(the_plan["fase"].values()) == 19_763_080
    assert size(the_plan["proj"].values()) == 4_199_424
    official = {
        "compressor": _official_keys("compressor"),
        "fase": _official_keys("time_aware_refinementX"),
        "proj": _official_keys("proj_layer"),
    }
    assert [len(v) for v in official.values()] == [327, 784, 6]
    assert importer.check(the_plan, official) == ([], [], [])
    # The method's own variables have those sizes: compressor + VQ codebook + the VAE's pair.
    shapes = jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(t)))  # noqa: E731
    vae = vae_param_shapes(method.vae_config)
    pair = count(vae["quant_conv"]) + count(vae["post_quant_conv"])
    codebook = count(shapes["vq_stats"]["vq"]["codebook"])
    assert count(shapes["params"]["compressor"]) + codebook + pair == 46_645_512
    assert count(shapes["params"]["fase"]) == 19_763_080
    assert count(shapes["params"]["proj"]) == 4_199_424


def test_fda_bands_reach_only_their_own_attention():
    """A pure low-frequency pair (ĉ and ẑ_0 features whose spectra lie in the centre window)
    and a pure high-frequency pair: the other band's attention sees exactly zero input, so its
    term is what a zero input gives — zero for the high band (its attention's response to
    zeros is a constant, whose spectrum is DC, masked out), and the attention's bias response
    (DC only) for the low band — while the own band's term depends on the input."""
    config = fase_lib.FaSEConfig(
        model_channels=16, fda_channels=8, fda_heads=2, feature_channels=8, norm_groups=4
    )
    fda = fase_lib.FrequencyDecouplingAttention(config)
    hw, c = (12, 20), config.fda_channels
    low, high = fase_lib.band_masks(*hw)
    assert low.sum() > 0 and high.sum() > 0 and low[6, 10] == 1.0  # DC is in the low band
    x0 = jnp.zeros((2, *hw, 4))
    shapes = jax.eval_shape(lambda: fda.init(jax.random.key(0), x0, x0, jnp.zeros((2,))))
    params = dw.random_params(shapes["params"], seed=1)
    t = jnp.array([700, 150])

    def mirror(mask):  # the centred spectrum under f → −f (a real signal's symmetry)
        rows, cols = ((2 * (n // 2) - np.arange(n)) % n for n in hw)
        return mask[np.ix_(rows, cols)]

    def band_signal(mask, seed):  # real signals whose centred spectra lie inside `mask`
        r = np.random.default_rng(seed)
        spec = r.normal(size=(2, *hw, c)) + 1j * r.normal(size=(2, *hw, c))
        spec = spec * (mask * mirror(mask))[..., None]  # the window is not symmetric
        x = np.fft.ifft2(np.fft.ifftshift(spec, axes=(1, 2)), axes=(1, 2)).real
        back = np.fft.fftshift(np.fft.fft2(x, axes=(1, 2)), axes=(1, 2))
        assert np.abs(back * (1 - mask[..., None])).max() < 1e-9  # still inside the band
        return jnp.asarray(x, jnp.float32)

    terms = jax.jit(lambda x, ctx: fda.apply({"params": params}, x, ctx, t, method="band_terms"))
    zero = jnp.zeros((2, *hw, c))
    zero_high, zero_low = (np.asarray(a) for a in terms(zero, zero))
    assert np.abs(zero_high).max() < 1e-5  # constant response: DC, masked to the low band
    assert np.abs(zero_low[:, 6, 10]).max() > 1e-3  # the low attention's bias response

    for mask, own, other, zero_other in ((low, 1, 0, zero_high), (high, 0, 1, zero_low)):
        pairs = [(band_signal(mask, 10 + i), band_signal(mask, 20 + i)) for i in range(2)]
        results = [tuple(np.asarray(a) for a in terms(x, ctx)) for x, ctx in pairs]
        scale = max(np.abs(r[own]).max() for r in results)
        for r in results:  # within float32 FFT round-off (≈1e-7 per point, 240 points summed)
            assert np.abs(r[other] - zero_other).max() <= 1e-4 * scale
            assert np.abs(r[own] * (1 - mask[None, ..., None])).max() <= 1e-4 * scale
        assert np.abs(results[0][own] - results[1][own]).max() > 1e-2 * scale


def test_start_step_against_a_direct_computation_on_the_50_step_grid():
    """`snr_start_index` = the noisiest of the 50 DDIM grid steps (timesteps 19, 39, …, 999)
    whose SNR ᾱ/(1−ᾱ) is at least 1/mse(ĉ, z_0) (0 if none), computed directly in float64; and
    = the public code's torch.bucketize route; and the timesteps sampled from each start."""
    torch = pytest.importorskip("torch")
    sched = dd.scaled_linear_schedule()
    ab = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    grid = np.arange(1, 51) * 20 - 1
    snr = ab[grid] / (1.0 - ab[grid])
    rng = np.random.default_rng(0)
    z0 = rng.normal(size=(64, 4, 6, 10)).astype(np.float32)
    # errors spanning every bucket, from SNR above the grid's top to below its bottom
    sigma = np.exp(rng.uniform(np.log(1e-3), np.log(30.0), size=64)).astype(np.float32)
    c_hat = z0 + sigma[:, None, None, None] * rng.normal(size=z0.shape).astype(np.float32)
    got = np.asarray(dd.snr_start_index(sched, jnp.asarray(c_hat), jnp.asarray(z0)))
    e = 1.0 / np.mean((c_hat.astype(np.float64) - z0) ** 2, axis=(1, 2, 3))
    direct = np.array([max([k for k in range(50) if snr[k] >= v], default=0) for v in e])
    np.testing.assert_array_equal(got, direct)
    assert len(set(direct)) > 20  # most of the grid was exercised
    # the public code: SNR_diff = ᾱ/(1−ᾱ) in float32, sorted, bucketize, clamp 49, back
    ab32 = torch.tensor(ab, dtype=torch.float32)
    select, index = (ab32 / (1.0 - ab32))[torch.from_numpy(grid)].sort()
    snr_d = 1.0 / torch.square(torch.from_numpy(c_hat) - torch.from_numpy(z0)).mean([1, 2, 3])
    official = index[torch.where((b := torch.bucketize(snr_d, select)) > 49, 49, b)].numpy()
    np.testing.assert_array_equal(got, official)
    # timesteps: start raised to steps + 1, space_timesteps over [0, start), first dropped
    assert dd.consistency_timesteps(30, 2).tolist() == [599, 299]
    assert dd.consistency_timesteps(0, 2).tolist() == [59, 39]
    assert dd.consistency_timesteps(49, 2).tolist() == [979, 499]
    assert dd.consistency_timesteps(22, 2).tolist() == [439, 219]  # round(10.5) = 10: to even


def test_side_information_and_colour_correction():
    """The start index and six colour codes pack into 8 bytes and back; the correction is the
    public code's adaptive instance normalisation with 8-bit statistics."""
    torch = pytest.importorskip("torch")
    from jaxcodec.entropy.coder import CodingError
    from jaxcodec.methods.diffcr import colour_codes, colour_correct, pack_side, unpack_side

    rng = np.random.default_rng(0)
    image = rng.uniform(size=(1, 16, 24, 3)).astype(np.float32)
    image[..., 0] = 1.0  # a saturated channel: mean code 256 needs the 9th bit
    decoded = np.clip(image * 0.7 + 0.2 + 0.05 * rng.normal(size=image.shape), 0, 1)
    codes = np.asarray(colour_codes(jnp.asarray(image)))[0]
    assert codes[0] == 256
    data = pack_side(37, codes)
    assert len(data) == 8 and unpack_side(data, True, 50) == (37, pytest.approx(codes))
    assert unpack_side(pack_side(5, None), False, 50) == (5, None)
    with pytest.raises(CodingError):
        unpack_side(pack_side(49, codes)[:7], True, 50)
    for bad in (pack_side(63, None), bytes([0b11000101])):  # off the grid; stray high bits
        with pytest.raises(CodingError):
            unpack_side(bad, False, 50)
    got = np.asarray(colour_correct(jnp.asarray(decoded), jnp.asarray(codes)[None]))

    def calc_mean_std(feat, eps=1e-5):  # the public code's, on NCHW
        b, c = feat.shape[:2]
        var = feat.reshape(b, c, -1).var(dim=2) + eps
        return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(
            b, c, 1, 1
        )

    content = torch.from_numpy(decoded.transpose(0, 3, 1, 2).copy())
    style = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    s_mean, s_std = calc_mean_std(style)
    bitquant = lambda t: torch.round(t * 255 + 0.5) / 255  # noqa: E731
    c_mean, c_std = calc_mean_std(content)
    want = ((content - c_mean) / c_std * bitquant(s_std) + bitquant(s_mean)).clamp(0, 1)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), atol=2e-6)


def test_clip_condition_builds_the_context_from_the_decoded_image(tmp_path):
    """model.condition='clip' (tiny sizes): the UNet's context is ProjLayer over [CLIP image
    embedding of the decoded ĉ, prompt tokens, base-prompt tokens] — 1 + 2·L tokens; the first
    follows the image, the text tokens do not (ProjLayer acts per token)."""
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.nn import clip
    from jaxcodec.nn.vae import vae_param_shapes
    from jaxcodec.weights import open_clip

    cfg = {**clip.TINY, "embed_dim": 32}  # = the tiny UNet's cross-attention width
    clip_config = clip.CLIPConfig.from_open_clip(cfg)
    vision = dw.random_params(clip.vision_param_shapes(clip_config.vision), seed=3)
    folder = tmp_path / "open_clip_tiny"
    open_clip.save(folder, clip_config, cfg, vision_params=vision)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCODEC_CACHE", str(tmp_path / "cache"))
        config = load_config("configs/diffcr.py:tiny")
    config.model.condition, config.model.clip_path = "clip", str(folder)
    method = get_method(config)
    assert method.proj_dims == (32, 32, 64)
    loaded = nn.unbox(method.pretrained()["clip"].load())
    jax.tree.map(np.testing.assert_array_equal, loaded, vision)
    params = dw.random_params(
        jax.eval_shape(method.init, jax.random.key(0), method.dummy_batch(1))["params"], seed=4
    )
    frozen = {
        "vae": dw.random_params(vae_param_shapes(method.vae_config), seed=5),
        "text": np.random.default_rng(6).normal(size=(2, 8, 32)).astype(np.float32),
        "clip": loaded,
    }
    c_hat = jax.random.normal(jax.random.key(7), (2, 8, 8, 4))
    context = jax.jit(method.context)(params, frozen, c_hat)
    assert context.shape == (2, 1 + 8 + 8, 32)
    other = jax.jit(method.context)(params, frozen, c_hat[::-1])
    assert np.abs(np.asarray(context[0, 0] - other[0, 0])).max() > 1e-4  # the image token
    np.testing.assert_allclose(context[0, 1:], other[0, 1:], atol=1e-6)  # the prompts
    np.testing.assert_allclose(context[0, 1:], context[1, 1:], atol=1e-6)


def test_two_step_sampler_follows_the_public_crsampler():
    """consistency_sample with DiffCR's denoiser contract — (refined ẑ_0, the UNet's ε) — and a
    start step per example equals the public CRSampler loop written out in float64: start
    sqrt(ᾱ)·ĉ, then per step ε → ẑ_0 → F → f = c_skip·z + c_out·F → sqrt(ᾱ')·f + sqrt(1−ᾱ')·ε."""
    sched = dd.scaled_linear_schedule()
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    rng = np.random.default_rng(0)
    c_hat = rng.normal(size=(3, 6, 10, 4)).astype(np.float32)
    starts = np.array([30, 2, 49])
    table = dd.consistency_timestep_table(2)
    ts = table[starts].T  # (S, B)
    eps_fn = lambda z, t: np.sin(z) * (1 + t[:, None, None, None] / 1000)  # noqa: E731
    refine = lambda x0, t: 0.8 * x0 + 0.05 * np.cos(x0)  # noqa: E731

    def denoise(z, t):
        eps = jnp.sin(z) * (1 + t[:, None, None, None] / 1000)
        a, s = sched.alpha_sigma(t)
        x0 = (z - s[:, None, None, None] * eps) / a[:, None, None, None]
        return 0.8 * x0 + 0.05 * jnp.cos(x0), eps

    z = dd.consistency_start_latent(sched, jnp.asarray(c_hat), jnp.asarray(ts[0]))
    got = np.asarray(dd.consistency_sample(denoise, sched, z, jnp.asarray(ts)))

    x = np.sqrt(ab[ts[0]])[:, None, None, None] * c_hat.astype(np.float64)
    for i in range(ts.shape[0]):
        t = ts[i]
        a, s = (np.sqrt(v)[:, None, None, None] for v in (ab[t], 1 - ab[t]))
        eps = eps_fn(x, t)
        e_t = refine((x - s * eps) / a, t)
        c_skip = 0.25 / ((t / 0.1) ** 2 + 0.25)
        c_out = (t / 0.1) / np.sqrt((t / 0.1) ** 2 + 0.25)
        f = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * e_t
        if i + 1 == ts.shape[0]:
            x = f
        else:
            prev = ab[ts[i + 1]][:, None, None, None]
            x = np.sqrt(prev) * f + np.sqrt(1 - prev) * eps
    np.testing.assert_allclose(got, x, rtol=2e-5, atol=2e-5)
    assert ts[:, 1].tolist() == [59, 39]  # start 2 is raised to steps + 1 = 3
