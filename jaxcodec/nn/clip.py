"""OpenCLIP's text tower and image tower (ViT) in Flax, and the image tower's preprocessing.

Three methods condition on CLIP: SD 2.x's UNet reads the text tower's penultimate layer
(OpenCLIP ViT-H/14), DiffCR adds the image embedding of its decoded image, and ResULIC embeds
a transmitted caption at the decoder. The modules reproduce open_clip's ``TextTransformer`` and
``VisionTransformer`` (the plain pre-LayerNorm blocks every CLIP ViT checkpoint uses) so that
open_clip's weights load by rule (:mod:`jaxcodec.weights.open_clip`): submodule names mirror
open_clip's (``transformer/resblocks_3/attn/in_proj`` ↔ ``transformer.resblocks.3.attn.
in_proj_weight``), attention keeps the fused q/k/v projection, ``text_projection`` and ``proj``
are bias-free ``(width, output_dim)`` kernels, exactly open_clip's ``x @ proj`` matrices.

Both towers return a :class:`TowerOutput`: the projected pooled embedding, the final-normed
token features, and the final-normed output of one intermediate block (``hidden_layer``, -2 by
default: the penultimate layer that SD 2.x feeds its UNet, as open_clip's
``forward_intermediates(normalize_intermediates=True)`` defines it). Under ``jax.jit`` the
blocks after the ones a caller reads are dead code and cost nothing.

Images are NHWC, already preprocessed (:func:`preprocess`); token ids come from
:class:`jaxcodec.nn.text.CLIPTokenizer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcodec.nn import layers
from jaxcodec.nn.attention import ATTENTION_IMPLS, dot_product_attention

# open_clip's defaults for every OpenAI and LAION ViT checkpoint (open_clip.constants).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every open_clip tower


def _check_pool(pool_type: str, allowed: tuple[str, ...], tower: str) -> None:
    if pool_type not in allowed:
        raise ValueError(f"{tower} pool_type must be one of {allowed}, got {pool_type!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig(layers.DtypeNames):
    """open_clip ``CLIPTextCfg`` fields of the plain text transformer (ViT-H/14 by default).

    ``output_dim`` is the CLIP embedding size (``text_projection``'s columns); None means the
    checkpoint has no projection (e.g. SD 2.x's ``text_encoder`` folder).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    output_dim: int | None = 1024
    proj_bias: bool = False
    quick_gelu: bool = False
    pool_type: str = "argmax"
    eps: float = LN_EPS
    # jaxcodec-only:
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_pool(self.pool_type, ("argmax", "first", "last"), "text")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not a multiple of {self.heads} heads")


@dataclasses.dataclass(frozen=True)
class VisionConfig(layers.DtypeNames):
    """open_clip ``CLIPVisionCfg`` fields of the plain ViT (ViT-H/14 by default)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    head_width: int = 80
    mlp_ratio: float = 4.0
    output_dim: int | None = 1024
    quick_gelu: bool = False
    pool_type: str = "tok"
    final_ln_after_pool: bool = False
    ln_pre: bool = True  # open_clip's ``no_ln_pre`` inverted
    eps: float = LN_EPS
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    # jaxcodec-only:
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"

    def __post_init__(self):
        _check_pool(self.pool_type, ("tok", "avg"), "vision")
        if self.width % self.head_width:
            raise ValueError(f"vision width {self.width} is not a multiple of {self.head_width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# open_clip config keys this implementation follows; any other key with a non-default value
# (layer scale, attentional pooling, custom blocks, HF or timm towers, ...) is refused by name.
_TEXT_FIELDS = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "proj_bias",
    "pool_type",
}
# Settings of custom blocks (qk-norm, scaled cosine attention, ...) that must stay off.
_CUSTOM_BLOCK_OFF = dict.fromkeys(
    ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"),
    False,
)
_TEXT_DEFAULTS = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "proj_type": "linear",
    "output_tokens": False,
    "pad_id": 0,
    "eos_id": 2,
    "block_type": None,
    "act_kwargs": None,
    "norm_kwargs": None,
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
    **_CUSTOM_BLOCK_OFF,
}
_VISION_FIELDS = {
    "image_size",
    "patch_size",
    "width",
    "layers",
    "head_width",
    "mlp_ratio",
    "pool_type",
    "final_ln_after_pool",
}
_VISION_DEFAULTS = {
    "ls_init_value": None,
    "attentional_pool": False,
    "pos_embed_type": "learnable",
    "output_tokens": False,
    "block_type": None,
    "act_kwargs": None,
    "norm_kwargs": None,
    "timm_model_name": None,
    **_CUSTOM_BLOCK_OFF,
}
# Inert here: settings of parts that the accepted configs leave switched off.
_INERT = {"attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool"}
_INERT |= {"timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "hf_model_pretrained"}
_INERT |= {"hf_proj_type", "hf_pooler_type"}


def _convert_tower(cfg: Mapping[str, Any], fields, defaults, tower: str) -> dict[str, Any]:
    out, unsupported = {}, []
    for key, value in cfg.items():
        if key in fields:
            out[key] = tuple(value) if isinstance(value, list) else value
        elif key == "no_ln_pre":
            out["ln_pre"] = not value
        elif key == "patch_dropout" or key in _INERT:  # patch dropout acts in training only
            continue
        elif key not in defaults or value != defaults[key]:
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(f"open_clip {tower} config not supported here: {', '.join(unsupported)}")
    return out


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers of one open_clip model. ``from_open_clip`` reads open_clip's model config
    (``model_configs/<name>.json``, or ``model_cfg`` in a hub folder's ``open_clip_config.json``)
    and refuses, by name, every setting these modules do not implement. A tower is None when a
    checkpoint holds only the other one (e.g. SD 2.x's ``text_encoder`` folder)."""

    text: TextConfig | None
    vision: VisionConfig | None

    @classmethod
    def from_open_clip(
        cls,
        model_cfg: Mapping[str, Any],
        preprocess_cfg: Mapping[str, Any] | None = None,
        **options: str,
    ) -> CLIPConfig:
        """``options``: jaxcodec-only fields (``dtype``, ``param_dtype``, ``attention_impl``)."""
        extra = set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
        extra -= {"custom_text", "init_logit_scale", "init_logit_bias", "nonscalar_logit_scale"}
        if extra:
            raise ValueError(f"open_clip model config not supported here: {sorted(extra)}")
        embed_dim, quick_gelu = model_cfg["embed_dim"], bool(model_cfg.get("quick_gelu", False))
        text = _convert_tower(model_cfg.get("text_cfg", {}), _TEXT_FIELDS, _TEXT_DEFAULTS, "text")
        vision = _convert_tower(
            model_cfg.get("vision_cfg", {}), _VISION_FIELDS, _VISION_DEFAULTS, "vision"
        )
        if isinstance(vision.get("layers"), tuple):
            raise ValueError("open_clip ModifiedResNet image towers are not supported here")
        for key in ("image_size", "patch_size"):
            value = vision.get(key)
            if isinstance(value, tuple):
                if len(set(value)) != 1:
                    raise ValueError(f"non-square vision {key} {value} is not supported")
                vision[key] = value[0]
        for key in ("mean", "std"):
            if key in (preprocess_cfg or {}):
                vision[key] = tuple(float(v) for v in preprocess_cfg[key])
        preprocess_cfg = preprocess_cfg or {}
        if preprocess_cfg.get("interpolation", "bicubic") != "bicubic":
            raise ValueError("only bicubic resizing is implemented for the image preprocessing")
        if preprocess_cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError("only shortest-side resizing is implemented for the preprocessing")
        text_options = {k: v for k, v in options.items() if k != "attention_impl"}
        return cls(
            text=TextConfig(output_dim=embed_dim, quick_gelu=quick_gelu, **text, **text_options),
            vision=VisionConfig(output_dim=embed_dim, quick_gelu=quick_gelu, **vision, **options),
        )


# open_clip's model_configs/ViT-H-14.json: SD 2.x's text encoder, DiffCR's image encoder.
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {
        "image_size": 224,
        "layers": 32,
        "width": 1280,
        "head_width": 80,
        "patch_size": 14,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 1024,
        "heads": 16,
        "layers": 24,
    },
}
# The same structure at test size (1.7 M parameters, nearly all in the 49,408-token embedding,
# which the real tokenizer needs).
TINY: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}


class TowerOutput(NamedTuple):
    """What a tower returns. ``pooled``: the CLIP embedding (projected when the checkpoint has a
    projection). ``tokens``: final-normed features of every token (text: all ``context_length``
    positions; image: the patch tokens, class token excluded, as open_clip's ``output_tokens``).
    ``hidden``: the same for the output of block ``hidden_layer`` (SD 2.x: -2)."""

    pooled: jnp.ndarray
    tokens: jnp.ndarray
    hidden: jnp.ndarray


# ----------------------------------------------------------------------------- blocks


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class MultiheadSelfAttention(nn.Module):
    """torch ``nn.MultiheadAttention`` as open_clip uses it: one fused ``in_proj`` (q, k, v
    stacked along the output axis, with bias) and ``out_proj``; optional causal mask."""

    width: int
    heads: int
    causal: bool = False
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = layers.dense(3 * self.width, ("embed", "heads"), name="in_proj", **kw)(x)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.width // self.heads)
        q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
        if self.causal:  # 77 text tokens: one fused op with the mask built in
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            o = dot_product_attention(q, k, v, self.impl)
        o = o.reshape(*o.shape[:2], self.width)
        return layers.dense(self.width, ("heads", "embed"), name="out_proj", **kw)(o)


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with
    ``mlp = c_proj(gelu(c_fc(.)))`` (exact GELU, or QuickGELU for OpenAI-trained weights)."""

    width: int
    heads: int
    mlp_width: int
    quick_gelu: bool = False
    causal: bool = False
    eps: float = LN_EPS
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = MultiheadSelfAttention(
            self.width, self.heads, self.causal, self.impl, name="attn", **kw
        )
        x = x + attn(layers.layer_norm(self.eps, name="ln_1", **kw)(x))
        h = layers.layer_norm(self.eps, name="ln_2", **kw)(x)
        h = _Mlp(self.width, self.mlp_width, self.quick_gelu, name="mlp", **kw)(h)
        return layers.constrain(x + h, layers.ACT_TOKENS)


class _Mlp(nn.Module):
    width: int
    mlp_width: int
    quick_gelu: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(self.mlp_width, ("embed", "mlp"), name="c_fc", **kw)(x)
        h = h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu else nn.gelu(h, approximate=False)
        return layers.dense(self.width, ("mlp", "embed"), name="c_proj", **kw)(h)


class Transformer(nn.Module):
    """``resblocks_0 … resblocks_{n-1}``; returns every block's output (dead ones are DCE'd)."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool = False
    causal: bool = False
    eps: float = LN_EPS
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        outputs = []
        for i in range(self.layers):
            x = ResidualAttentionBlock(
                self.width,
                self.heads,
                int(self.width * self.mlp_ratio),  # open_clip's mlp_width
                self.quick_gelu,
                self.causal,
                self.eps,
                self.impl,
                self.dtype,
                self.param_dtype,
                name=f"resblocks_{i}",
            )(x)
            outputs.append(x)
        return outputs


def _block_index(hidden_layer: int, n: int) -> int:
    i = hidden_layer + n if hidden_layer < 0 else hidden_layer
    if not 0 <= i < n:
        raise ValueError(f"hidden_layer {hidden_layer} is outside a {n}-block transformer")
    return i


# ----------------------------------------------------------------------------- towers


class TextTransformer(nn.Module):
    """open_clip ``TextTransformer``: token + learned position embeddings, causal blocks,
    ``ln_final``, the end-of-text token's features (the highest id: ``pool_type='argmax'``)
    times ``text_projection``. ``text``: (B, context_length) int ids."""

    config: TextConfig

    @nn.compact
    def __call__(
        self, text: jnp.ndarray, hidden_layer: int = -2, embeddings: jnp.ndarray | None = None
    ) -> TowerOutput:
        """``embeddings`` (B, length, width), when given, replace the token embedding lookup
        (soft or projected prompts, e.g. a hard-prompt search); ``text`` still gives the
        pooling position (its end-of-text token)."""
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        batch, length = text.shape
        if length > c.context_length:
            raise ValueError(f"{length} tokens exceed the context length {c.context_length}")
        index = _block_index(hidden_layer, c.layers)
        embed = nn.Embed(
            c.vocab_size,
            c.width,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="token_embedding",
            **kw,
        )
        pos = _param(
            self,
            "positional_embedding",
            nn.initializers.normal(0.01),
            (c.context_length, c.width),
            (None, "embed"),
            c.params_dtype,
        )
        tokens_in = embed(text) if embeddings is None else embeddings.astype(c.compute_dtype)
        x = tokens_in + pos[:length].astype(c.compute_dtype)
        outputs = Transformer(
            c.width,
            c.layers,
            c.heads,
            c.mlp_ratio,
            c.quick_gelu,
            causal=True,
            eps=c.eps,
            name="transformer",
            **kw,
        )(x)
        ln_final = layers.layer_norm(c.eps, name="ln_final", **kw)
        tokens = ln_final(outputs[-1])
        if c.pool_type == "argmax":  # the end-of-text token has the highest id
            pooled = tokens[jnp.arange(batch), jnp.argmax(text, axis=-1)]
        else:
            pooled = tokens[:, 0] if c.pool_type == "first" else tokens[:, -1]
        if c.output_dim:
            proj = layers.dense(
                c.output_dim, ("embed", None), use_bias=c.proj_bias, name="text_projection", **kw
            )
            pooled = proj(pooled)
        return TowerOutput(pooled, tokens, ln_final(outputs[index]))


class VisionTransformer(nn.Module):
    """open_clip ``VisionTransformer``: bias-free patch conv ``conv1``, class token, learned
    position embeddings, ``ln_pre``, blocks, ``ln_post``, class-token (or mean) pooling times
    ``proj``. ``images``: (B, H, W, 3) NHWC at ``image_size``, normalised (:func:`preprocess`)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray, hidden_layer: int = -2) -> TowerOutput:
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        if images.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(
                f"expected (B, {c.image_size}, {c.image_size}, 3) images, got {images.shape}"
            )
        index = _block_index(hidden_layer, c.layers)
        p = c.patch_size
        x = nn.Conv(
            c.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), layers.CONV_KERNEL_AXES
            ),
            name="conv1",
            **kw,
        )(images)
        batch = x.shape[0]
        x = x.reshape(batch, c.grid * c.grid, c.width)  # row-major patches, as torch's flatten
        scale = c.width**-0.5
        init = nn.initializers.normal(scale)
        cls = _param(self, "class_embedding", init, (c.width,), ("embed",), c.params_dtype)
        pos = _param(
            self,
            "positional_embedding",
            init,
            (c.grid * c.grid + 1, c.width),
            (None, "embed"),
            c.params_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, c.width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        if c.ln_pre:
            x = layers.layer_norm(c.eps, name="ln_pre", **kw)(x)
        outputs = Transformer(
            c.width,
            c.layers,
            c.heads,
            c.mlp_ratio,
            c.quick_gelu,
            causal=False,
            eps=c.eps,
            impl=c.attention_impl,
            name="transformer",
            **kw,
        )(x)
        ln_post = layers.layer_norm(c.eps, name="ln_post", **kw)
        last = outputs[-1]
        if c.final_ln_after_pool:
            pooled = last[:, 0] if c.pool_type == "tok" else last[:, 1:].mean(axis=1)
            pooled, tokens = ln_post(pooled), last[:, 1:]
        else:
            normed = ln_post(last)
            pooled = normed[:, 0] if c.pool_type == "tok" else normed[:, 1:].mean(axis=1)
            tokens = normed[:, 1:]
        if c.output_dim:
            pooled = layers.dense(c.output_dim, ("embed", None), use_bias=False, name="proj", **kw)(
                pooled
            )
        return TowerOutput(pooled, tokens, ln_post(outputs[index])[:, 1:])


def text_param_shapes(config: TextConfig) -> dict:
    """Parameter shapes (``jax.ShapeDtypeStruct``, logical boxes kept) via ``jax.eval_shape``."""
    text = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    init = lambda t: TextTransformer(config).init(jax.random.key(0), t)
    return jax.eval_shape(init, text)["params"]


def vision_param_shapes(config: VisionConfig) -> dict:
    """Parameter shapes via ``jax.eval_shape`` (nothing allocated)."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    init = lambda x: VisionTransformer(config).init(jax.random.key(0), x)
    return jax.eval_shape(init, images)["params"]


# ----------------------------------------------------------------------------- preprocessing


def resize_shortest(images: jnp.ndarray, size: int, method: str = "bicubic") -> jnp.ndarray:
    """Resize (B, H, W, C) so the shorter side is ``size``, the longer ``int(size·long/short)``
    (torchvision's ``Resize(int)`` rule, which open_clip's eval transform uses). Antialiased
    when shrinking, like PIL; differentiable."""
    b, h, w, ch = images.shape
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) == (h, w):
        return images
    return jax.image.resize(images, (b, new_h, new_w, ch), method=method, antialias=True)


def center_crop(images: jnp.ndarray, size: int) -> jnp.ndarray:
    """The central ``size``×``size`` window (torchvision's offsets: ``int(round((H-size)/2))``)."""
    _, h, w, _ = images.shape
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}: resize first")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[:, top : top + size, left : left + size]


def normalize(
    images: jnp.ndarray, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> jnp.ndarray:
    return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def preprocess(images: jnp.ndarray, config: VisionConfig) -> jnp.ndarray:
    """open_clip's eval transform in JAX: resize the shortest side to ``image_size`` (bicubic),
    centre-crop, normalise with the checkpoint's mean/std. ``images``: (B, H, W, 3) floats in
    [0, 1] (e.g. a decoder's output). Differentiable, so losses can reach the codec through CLIP.

    The resize matches PIL's bicubic filter (to ~1e-5 on float images); like PIL on open_clip's
    8-bit images, the cubic's overshoot is clipped to [0, 1], but there is no rounding to 8 bits.
    """
    x = jnp.clip(resize_shortest(images, config.image_size), 0.0, 1.0)
    x = center_crop(x, config.image_size)
    return normalize(x, config.mean, config.std)
