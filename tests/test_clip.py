"""OpenCLIP towers, loader, tokenizer and prompt encoder against the open_clip package.

The reference is the unmodified ``open_clip_torch`` 3.3.0 package, installed with
``pip install --no-deps open_clip_torch==3.3.0`` (its torchvision and timm requirements would
replace the CPU torch). Its towers and tokenizer need neither: the modules used here
(``open_clip.model``, ``open_clip.transformer``, ``open_clip.tokenizer``) import torchvision only
through ``open_clip.utils``, for the ``FrozenBatchNorm2d`` name that ResNet freezing uses. So the
package's ``__init__`` (which imports the torchvision image transforms) is bypassed by
registering a bare package object, and when torchvision cannot be imported beside the CPU torch
a stand-in module provides that one name (raising if anything instantiates it). Everything
under test — ``CLIP``, ``TextTransformer``, ``VisionTransformer``, ``SimpleTokenizer`` and the
model configs — is open_clip's own code and files. Without the package the reference tests skip.

The transformers-format tests (SD 2.x's ``text_encoder`` is a transformers ``CLIPTextModel``)
use the real transformers classes when that package is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import random
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from skimage import data

from jaxcodec.nn import clip
from jaxcodec.nn.text import CLIPTokenizer, encode_prompt, load_prompt_encoder
from jaxcodec.train import jit_init
from jaxcodec.weights import open_clip as ocw
from jaxcodec.weights.diffusers import WeightsMismatchError

TOL = 1e-4
GELU_CFG = clip.TINY
QUICK_GELU_CFG = {**clip.TINY, "quick_gelu": True}


@contextlib.contextmanager
def _loading_open_clip():
    """While open_clip's modules import: a torchvision stand-in holding the one name
    ``open_clip.utils`` imports (only if the real one cannot be imported), and transformers
    hidden (open_clip's optional HF text towers are not used; it skips them on ImportError).
    Both are taken back afterwards, so other tests see the environment unchanged."""
    names = ("transformers", "torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    sys.modules["transformers"] = None
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv.ops = types.ModuleType("torchvision.ops")
        tv.ops.misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d:  # only open_clip's ResNet freezing builds one
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision stand-in: FrozenBatchNorm2d is not available")

        tv.ops.misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        sys.modules.update(dict(zip(names[1:], (tv, tv.ops, tv.ops.misc), strict=True)))
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _import_open_clip():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or importlib.util.find_spec("torch") is None:
        pytest.skip("open_clip_torch (reference) not installed")
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip"]
    # A bare package object: open_clip's __init__ would import its torchvision transforms.
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["open_clip"] = package
    with _loading_open_clip():
        importlib.import_module("open_clip.model")
        importlib.import_module("open_clip.tokenizer")
    return package


@pytest.fixture(scope="module")
def open_clip():
    return _import_open_clip()


def _perturb(module, seed: int) -> None:
    """Move every parameter (LayerNorm scales, biases included) off its initial value."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _reference_towers(open_clip, model_cfg: dict, seed: int = 0):
    """open_clip's own text and image towers for ``model_cfg``, random weights, eval mode."""
    import torch

    torch.manual_seed(seed)
    m = open_clip.model
    quick = model_cfg.get("quick_gelu", False)
    text_cfg = {**model_cfg["text_cfg"], "output_tokens": True}
    vision_cfg = {**model_cfg["vision_cfg"], "output_tokens": True}
    text = m._build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=quick).eval()
    vision = m._build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=quick).eval()
    _perturb(text, seed + 1)
    _perturb(vision, seed + 2)
    return text, vision


def _clip_state_dict(text, vision) -> dict[str, np.ndarray]:
    """The towers' weights in open_clip ``CLIP``'s state-dict layout."""
    state = {k: v.detach().numpy().copy() for k, v in text.state_dict().items()}
    state |= {f"visual.{k}": v.detach().numpy().copy() for k, v in vision.state_dict().items()}
    state["logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
    return state


def _write_open_clip_folder(folder, model_cfg: dict, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(clip.OPENAI_MEAN)}}
    (folder / ocw.OPEN_CLIP_CONFIG).write_text(json.dumps(cfg))
    safetensors.numpy.save_file(state, str(folder / "open_clip_model.safetensors"))


CAPTIONS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Zürich’s OLD town &amp; the lake at dusk!!! 🌅",
    " ".join(["a very long caption that will be truncated"] * 20),
]


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("model_cfg", [GELU_CFG, QUICK_GELU_CFG], ids=["gelu", "quick_gelu"])
def test_towers_match_open_clip(open_clip, tmp_path, model_cfg):
    """Token features, projected embedding and penultimate layer within 1e-4 (fp32), for
    weights that went through a safetensors folder and the loader."""
    import torch

    text_ref, vision_ref = _reference_towers(open_clip, model_cfg)
    _write_open_clip_folder(tmp_path, model_cfg, _clip_state_dict(text_ref, vision_ref))
    config, params = ocw.load(tmp_path)
    assert config.text.quick_gelu == config.vision.quick_gelu == model_cfg.get("quick_gelu", False)

    ids = open_clip.tokenizer.tokenize(CAPTIONS)
    text_layers = model_cfg["text_cfg"]["layers"]
    with torch.no_grad():
        pooled, tokens = text_ref(ids)
        hidden = text_ref.forward_intermediates(
            ids,
            indices=[text_layers - 2],
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
        )["text_intermediates"][0]
    out = clip.TextTransformer(config.text).apply({"params": params["text"]}, jnp.asarray(ids))
    errors = {
        "text pooled": _max_err(out.pooled, pooled),
        "text tokens": _max_err(out.tokens, tokens),
        "text penultimate": _max_err(out.hidden, hidden),
    }

    rng = np.random.default_rng(0)
    size = model_cfg["vision_cfg"]["image_size"]
    images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    vision_layers = model_cfg["vision_cfg"]["layers"]
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        pooled, tokens = vision_ref(x)
        hidden = vision_ref.forward_intermediates(
            x,
            indices=[vision_layers - 2],
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
        )["image_intermediates"][0]
    out = clip.VisionTransformer(config.vision).apply(
        {"params": params["vision"]}, jnp.asarray(images)
    )
    errors |= {
        "image pooled": _max_err(out.pooled, pooled),
        "image tokens": _max_err(out.tokens, tokens),
        "image penultimate": _max_err(out.hidden, hidden),
    }
    print("max abs errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert all(v <= TOL for v in errors.values()), errors


def test_layout_is_open_clip_clip(open_clip):
    """The loader's open_clip layout is exactly ``open_clip.model.CLIP``'s state dict, and a
    real ``CLIP`` state dict loads."""
    import torch

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**GELU_CFG)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = clip.CLIPConfig.from_open_clip(GELU_CFG)
    expected = ocw.checkpoint_shapes(config)
    assert expected == {k: tuple(v.shape) for k, v in state.items() if k != "logit_scale"}
    text = ocw.tower_params(state, config.text)
    vision = ocw.tower_params(state, config.vision)
    back = ocw.to_state_dict(config, text, vision)
    assert set(back) == set(expected)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))


def test_vit_h_14_builds_with_open_clip_parameter_counts(open_clip):
    """ViT-H/14 through ``jax.eval_shape``; reference counts from open_clip's ``CLIP`` built
    from its own ``model_configs/ViT-H-14.json`` on torch's meta device (no memory):
    text tower 354,032,640, image tower 632,076,800 (``logit_scale`` belongs to neither)."""
    import torch

    config_file = f"{open_clip.__path__[0]}/model_configs/ViT-H-14.json"
    with open(config_file) as f:
        model_cfg = json.load(f)
    assert model_cfg == clip.VIT_H_14
    with torch.device("meta"):
        model = open_clip.model.CLIP(**model_cfg)
    ref_vision = sum(p.numel() for p in model.visual.parameters())
    ref_text = sum(p.numel() for p in model.parameters()) - ref_vision - model.logit_scale.numel()

    config = clip.CLIPConfig.from_open_clip(clip.VIT_H_14)
    assert (config.text.width, config.text.layers, config.text.heads) == (1024, 24, 16)
    assert (config.vision.width, config.vision.layers, config.vision.heads) == (1280, 32, 16)
    text_count = _count(clip.text_param_shapes(config.text))
    vision_count = _count(clip.vision_param_shapes(config.vision))
    print(
        f"text {text_count} (open_clip {ref_text}); image {vision_count} (open_clip {ref_vision})"
    )
    assert (text_count, vision_count) == (ref_text, ref_vision) == (354_032_640, 632_076_800)
    ref_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "logit_scale"}
    assert ocw.checkpoint_shapes(config) == ref_shapes


def _captions(n: int = 1000, seed: int = 0) -> list[str]:
    """Varied captions: plain English, case, contractions (straight and curly), HTML entities,
    mojibake, accents, Greek/Cyrillic/CJK/Hangul/Arabic/Devanagari, emoji with joiners, odd
    whitespace, digits and punctuation runs, URLs, literal special tokens, and long ones that
    overflow the 77-token context."""
    adjectives = "red small old wooden shiny fluffy Dark bright ancient modern tiny HUGE".split()
    nouns = "cat dog car house tree mountain river city bicycle woman child bird pizza".split()
    preps = "on under near behind beside in over through across".split()
    places = (
        "the beach|a kitchen|São Paulo|Zürich|東京タワー|Москва|the café|New York City|서울|"
        "القاهرة|मुंबई|Ελλάδα"
    ).split("|")
    extra = [
        "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "it’s", "don’t",
        "O'Neil's", "&amp;", "&quot;quoted&quot;", "&#39;s", "&lt;b&gt;bold&lt;/b&gt;",
        "&amp;amp;", "cafÃ©", "â€™", "🐶", "🔥🔥", "👩‍👩‍👧", "e\u0301", "ＡＢＣ１２３", "ﬁne",
        "\u00a0", "\u2009", "\t", "\n\n", "!!!", "...", "?!", "(1/2)", "#sunset", "@user",
        "http://example.com/a_b?c=1", "12.5%", "1,000", "3", "2024", "½", "x²", "naïve",
        "Σίσυφος", "ΟΔΟΣ", "straße", "İstanbul", "ǅ", "<start_of_text>", "<end_of_text>",
        "a<end_of_text>b", "<<end_of_text>", "—", "“smart quotes”", "C++", "snake_case",
    ]  # fmt: skip
    rng = random.Random(seed)
    out = ["", "   ", "A photo of a cat."]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.45:
            words = ["a", rng.choice(adjectives), rng.choice(nouns), rng.choice(preps)]
            words.append(rng.choice(places))
        elif kind < 0.9:
            pool = adjectives + nouns + preps + places + extra
            words = [rng.choice(pool) for _ in range(rng.randint(1, 14))]
        else:
            pool = adjectives + nouns + preps + extra
            words = [rng.choice(pool) for _ in range(rng.randint(60, 120))]
        if rng.random() < 0.2:
            words = [w.upper() for w in words]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(extra))
        out.append(rng.choice([" ", " ", " ", "  ", ", ", " \t", ""]).join(words))
    return out


def test_tokenizer_matches_open_clip(open_clip):
    captions = _captions()
    reference = open_clip.tokenizer.SimpleTokenizer()
    expected = reference(captions).numpy()
    tokenizer = CLIPTokenizer()
    got = tokenizer(captions)
    assert got.shape == expected.shape == (1000, 77)
    matches = int((got == expected).all(axis=1).sum())
    print(f"tokenisation matches open_clip for {matches}/1000 captions")
    assert matches == 1000
    assert (expected[:, -1] != 0).any()  # some captions were truncated
    assert tokenizer.vocab_size == 49408
    for caption in captions[:200]:
        ids = reference.encode(caption)
        assert tokenizer.encode(caption) == ids
        assert tokenizer.decode(ids) == reference.decode(ids)


def test_loader_names_every_mismatch(tmp_path):
    config = clip.CLIPConfig.from_open_clip(GELU_CFG)
    text = jit_init(
        clip.TextTransformer(config.text).init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32)
    )
    state = ocw.to_state_dict(config, nn.meta.unbox(text["params"]))
    del state["ln_final.bias"]
    state["transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((3, 32), np.float32)
    state["transformer.resblocks.9.mlp.c_fc.weight"] = np.zeros((1,), np.float32)
    state["visual.conv1.weight"] = np.zeros((1,), np.float32)  # the other tower: not unexpected
    with pytest.raises(WeightsMismatchError) as err:
        ocw.tower_params(state, config.text)
    message = str(err.value)
    assert "missing keys (1): ln_final.bias" in message
    assert "unexpected keys (1): transformer.resblocks.9.mlp.c_fc.weight" in message
    assert "transformer.resblocks.0.attn.in_proj_weight (checkpoint (3, 32)" in message

    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        ocw.read_state_dict(tmp_path)
    with pytest.raises(ValueError, match="never loaded"):
        ocw.read_state_dict(tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="ls_init_value"):
        clip.CLIPConfig.from_open_clip({**GELU_CFG, "text_cfg": {"ls_init_value": 1e-5}})


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _hf_text_config(transformers, **kw):
    return transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=24,
        hidden_act="gelu",
        **kw,
    )


def test_sd_text_encoder_folder(transformers, tmp_path):
    """A diffusers pipeline folder whose ``text_encoder/`` is a transformers ``CLIPTextModel``
    (as SD 2.x ships it): ``encode_prompt`` is its final-normed last layer; with the older
    ``text_model.`` key prefix too."""
    import torch

    torch.manual_seed(0)
    model = transformers.CLIPTextModel(_hf_text_config(transformers)).eval()
    _perturb(model, 3)
    model.save_pretrained(tmp_path / "sd" / "text_encoder")
    ids = CLIPTokenizer()(CAPTIONS)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    got = encode_prompt(CAPTIONS, tmp_path / "sd")
    assert got.shape == (len(CAPTIONS), 77, 32)
    assert _max_err(got, expected) <= TOL

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(
        (tmp_path / "sd" / "text_encoder" / "config.json").read_text()
    )
    state = safetensors.numpy.load_file(str(tmp_path / "sd" / "text_encoder" / "model.safetensors"))
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = np.arange(77)[None]
    safetensors.numpy.save_file(state, str(legacy / "model.safetensors"))
    encoder = load_prompt_encoder(legacy)
    assert encoder.hidden_layer == -1
    assert _max_err(encoder(CAPTIONS), expected) <= TOL


def test_transformers_clip_with_projections(transformers, tmp_path):
    """transformers' ``CLIPModel`` layout: both towers, projections, penultimate layers."""
    import torch

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=_hf_text_config(transformers).to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        projection_dim=24,
    )
    model = transformers.CLIPModel(cfg).eval()
    _perturb(model, 4)
    model.save_pretrained(tmp_path)
    config, params = ocw.load(tmp_path)
    assert config.vision.quick_gelu and not config.text.quick_gelu

    ids = CLIPTokenizer()(CAPTIONS).astype(np.int64)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        t = model.text_model(torch.from_numpy(ids), output_hidden_states=True)
        v = model.vision_model(
            torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), output_hidden_states=True
        )
        ref = {
            "text pooled": model.text_projection(t.pooler_output),
            "text tokens": t.last_hidden_state,
            "text penultimate": model.text_model.final_layer_norm(t.hidden_states[-2]),
            "image pooled": model.visual_projection(v.pooler_output),
            "image penultimate": model.vision_model.post_layernorm(v.hidden_states[-2])[:, 1:],
        }
    text = clip.TextTransformer(config.text).apply({"params": params["text"]}, jnp.asarray(ids))
    vision = clip.VisionTransformer(config.vision).apply(
        {"params": params["vision"]}, jnp.asarray(images)
    )
    got = {
        "text pooled": text.pooled,
        "text tokens": text.tokens,
        "text penultimate": text.hidden,
        "image pooled": vision.pooled,
        "image penultimate": vision.hidden,
    }
    errors = {k: _max_err(got[k], ref[k].numpy()) for k in ref}
    assert all(v <= TOL for v in errors.values()), errors
    back = ocw.to_state_dict(config, params["text"], params["vision"], naming="transformers")
    saved = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == {k for k in saved if "position_ids" not in k and "logit" not in k}


def test_encode_prompt_is_sd2_penultimate_layer(open_clip, tmp_path):
    """From an open_clip folder: ln_final of the penultimate block's output, as SD 2.x's
    FrozenOpenCLIPEmbedder(layer='penultimate') computes it with open_clip."""
    import torch

    text_ref, vision_ref = _reference_towers(open_clip, GELU_CFG, seed=5)
    _write_open_clip_folder(tmp_path, GELU_CFG, _clip_state_dict(text_ref, vision_ref))
    ids = open_clip.tokenizer.tokenize(CAPTIONS)
    with torch.no_grad():
        x = text_ref.token_embedding(ids) + text_ref.positional_embedding
        for block in text_ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=text_ref.attn_mask)
        expected = text_ref.ln_final(x).numpy()
    got = encode_prompt(CAPTIONS, tmp_path)
    assert got.shape == (len(CAPTIONS), 77, 32)
    assert _max_err(got, expected) <= TOL


def test_encode_prompt_falls_back_to_the_empty_prompt_file(tmp_path):
    empty = np.random.default_rng(0).normal(size=(1, 77, 16)).astype(np.float32)
    np.save(tmp_path / "empty_prompt_embedding.npy", empty)
    got = encode_prompt(["", " "], tmp_path)
    np.testing.assert_array_equal(got, np.concatenate([empty, empty]))
    with pytest.raises(FileNotFoundError, match="needs CLIP text weights"):
        encode_prompt("a cat", tmp_path)


def test_preprocess_matches_pil_bicubic_and_is_differentiable():
    """Resize (shortest side, bicubic), centre crop, normalise: PIL's float bicubic to 1e-4,
    open_clip's 8-bit PIL path to its rounding; gradients reach the input."""
    config = clip.VisionConfig(image_size=64, patch_size=8, width=32, head_width=8, layers=1)
    mean, std = np.array(config.mean), np.array(config.std)
    for img in (data.astronaut()[:200, :150], data.chelsea()):
        h, w = img.shape[:2]
        nh, nw = (int(64 * h / w), 64) if w <= h else (64, int(64 * w / h))
        top, left = int(round((nh - 64) / 2)), int(round((nw - 64) / 2))
        crop = lambda a, t=top, lf=left: a[t : t + 64, lf : lf + 64]
        got = np.asarray(clip.preprocess(jnp.asarray(img[None] / 255.0, jnp.float32), config))[0]
        channels = [
            Image.fromarray((img[..., c] / 255.0).astype(np.float32), mode="F").resize(
                (nw, nh), Image.BICUBIC
            )
            for c in range(3)
        ]
        float_ref = np.clip(crop(np.stack([np.asarray(c) for c in channels], -1)), 0, 1)
        assert _max_err(got * std + mean, float_ref) <= TOL
        uint8_ref = crop(np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))) / 255
        diff = np.abs(got * std + mean - uint8_ref)
        assert diff.max() <= 4 / 255 and diff.mean() <= 0.5 / 255

    x = jnp.asarray(data.chelsea()[None, :100, :120] / 255.0, jnp.float32)
    grad = jax.grad(lambda a: clip.preprocess(a, config).sum())(x)
    assert np.isfinite(grad).all() and float(jnp.abs(grad).sum()) > 0
