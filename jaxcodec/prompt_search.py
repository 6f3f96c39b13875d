"""ResULIC's encoder-side prompt optimisation: a PEZ hard-prompt search (Wen et al. 2023,
"Hard Prompts Made Easy"), as the official ``prompt_inversion/test_optim_zc.py`` runs it.

A prompt of L continuous token embeddings P is optimised; every step projects P onto its
nearest vocabulary embeddings P' (cosine), evaluates the loss at P' and applies that gradient
to P (AdamW). The loss is what the decoder will do with the prompt:

    clip_weight · (1 − cos(CLIP image(x), CLIP text(P')))
        + diffusion_weight · ‖ε_θ(z_t, t, c(P'), z_c) − ε‖²

with z_t the compression-aware forward process at a step t of the decoder's grid and c(P') the
UNet's text context of the decoder's sequence (P' + the positive suffix). Every ``eval_every``
steps the projected prompt is decoded exactly as a file would be and kept if its LPIPS to the
image is the best so far (the starting prompt included). The whole search is one ``jax.jit``.

The vocabulary is restricted to whole-word tokens whose text re-encodes to themselves
(`candidate_tokens`), so the tokens found are a sequence the tokenizer decodes and re-encodes
to itself — what the caption stream carries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcodec.diffusion import relay_forward
from jaxcodec.nn.clip import TextConfig, TextTransformer, VisionTransformer, preprocess
from jaxcodec.nn.text import default_tokenizer


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    length: int = 8  # tokens searched when there is no caption to start from
    iterations: int = 100
    eval_every: int = 25
    lr: float = 0.1
    weight_decay: float = 0.1
    clip_weight: float = 0.1
    diffusion_weight: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SearchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(config).items() if k in names})

    def __post_init__(self):
        if self.length < 1 or self.iterations < 1 or self.eval_every < 1:
            raise ValueError("length, iterations and eval_every must be positive")
        if self.iterations % self.eval_every:
            raise ValueError(f"eval_every={self.eval_every} must divide {self.iterations}")


@functools.cache
def candidate_tokens() -> np.ndarray:
    """Ids of whole-word tokens (``</w>``) whose text the tokenizer encodes back to them alone:
    any sequence of them decodes and re-encodes to itself."""
    tok = default_tokenizer()
    ids = np.arange(tok.sot_token_id)
    texts = [tok.decode([int(i)]) for i in ids]
    words = [i for i, t in zip(ids, texts, strict=True) if t.endswith(" ") and t.strip()]
    encoded = tok.encode_batch([texts[i] for i in words])
    return np.asarray([i for i, e in zip(words, encoded, strict=True) if e == [i]], np.int32)


@dataclasses.dataclass(frozen=True)
class Clip:
    """The CLIP towers the similarity term uses (their text tower must share the SD text
    encoder's token embedding: OpenCLIP ViT-H/14 for SD 2.x)."""

    text_config: TextConfig
    text: Any
    vision_config: Any
    vision: Any


def load_clip(path: str | Path) -> Clip:
    from jaxcodec.weights import open_clip as oc

    config, params = oc.load(path)
    return Clip(config.text, params["text"], config.vision, params["vision"])


def _template(method, tokens: Sequence[int]) -> np.ndarray:
    """The decoder's ids for `tokens` (the caption + the positive suffix)."""
    return method.prompt_ids(list(tokens))


@functools.partial(
    jax.jit,
    static_argnames=("method", "clip_configs", "cfg", "steps", "start", "guided"),
)
def _search(
    params,
    frozen,
    clip_params,
    lpips,
    image,
    z0,
    z_c,
    init_ids,
    template,
    candidates,
    uncond,
    guidance,
    key,
    *,
    method,
    clip_configs,
    cfg: SearchConfig,
    steps: int,
    start: int,
    guided: bool,
):
    from jaxcodec.metrics.lpips import lpips_distance

    length = init_ids.shape[0]
    table = frozen["text"]["token_embedding"]["embedding"]
    vocab = table[candidates]
    vocab_n = vocab / jnp.linalg.norm(vocab, axis=-1, keepdims=True)
    text_sd = TextTransformer(method.text_config)
    text_cfg, vision_cfg = clip_configs
    x01 = image.astype(jnp.float32)[None] / 255.0
    img = VisionTransformer(vision_cfg).apply(
        {"params": clip_params["vision"]}, preprocess(x01, vision_cfg)
    )
    img = img.pooled / jnp.linalg.norm(img.pooled, axis=-1, keepdims=True)
    base_emb = table[template][None]
    grid = jnp.arange(steps + 1) * (start // steps)  # the decoder's timesteps, {0 … N}

    def project(p):
        sim = (p / jnp.linalg.norm(p, axis=-1, keepdims=True)) @ vocab_n.T
        idx = jnp.argmax(sim, axis=-1)
        return vocab[idx], candidates[idx]

    def ids_of(prompt_ids):
        return template.at[1 : 1 + length].set(prompt_ids)[None]

    def loss_fn(p_proj, ids, k):
        emb = base_emb.at[0, 1 : 1 + length].set(p_proj)
        context = text_sd.apply({"params": frozen["text"]}, ids, method.text_layer, emb).hidden
        txt = TextTransformer(text_cfg).apply({"params": clip_params["text"]}, ids, -1, emb)
        txt = txt.pooled / jnp.linalg.norm(txt.pooled, axis=-1, keepdims=True)
        clip_loss = 1.0 - jnp.sum(img * txt)
        k_t, k_e = jax.random.split(k)
        t = grid[jax.random.randint(k_t, (1,), 0, steps + 1)]
        eps = jax.random.normal(k_e, z0.shape, jnp.float32)
        z_t, _ = relay_forward(method.schedule, z0, z_c, t, eps, start + 1)
        eps_hat = method.eps_theta(params["adapter"], frozen["unet"], z_c, context, z_t, t)
        diff_loss = jnp.mean(jnp.square(eps_hat - eps))
        return cfg.clip_weight * clip_loss + cfg.diffusion_weight * diff_loss

    def decode_lpips(prompt_ids):
        cond = method.encode_text(frozen, ids_of(prompt_ids))
        z = method.sample(
            params,
            frozen,
            z_c,
            cond,
            uncond if guided else None,
            jax.random.key(cfg.seed),
            steps=steps,
            guidance=guidance,
            start=start,
        )
        x_hat = (method._decode_latent(frozen, z) + 1.0) / 2.0
        return jnp.mean(lpips_distance(lpips, jnp.clip(x_hat, 0.0, 1.0), x01))

    tx = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    p0 = table[init_ids]

    def step(carry, k):
        p, opt = carry
        p_proj, ids = project(p)
        loss, grad = jax.value_and_grad(loss_fn)(p_proj, ids_of(ids), k)
        updates, opt = tx.update(grad, opt, p)  # PEZ: the projected point's gradient moves P
        return (optax.apply_updates(p, updates), opt), loss

    def block(carry, k):
        p, opt, best_ids, best = carry
        (p, opt), losses = jax.lax.scan(step, (p, opt), jax.random.split(k, cfg.eval_every))
        ids = project(p)[1]
        score = decode_lpips(ids)
        better = score < best
        best_ids = jnp.where(better, ids, best_ids)
        return (p, opt, best_ids, jnp.minimum(score, best)), (losses, score)

    first = project(p0)[1]
    carry = (p0, tx.init(p0), first, decode_lpips(first))
    blocks = jax.random.split(key, cfg.iterations // cfg.eval_every)
    (_, _, best_ids, best), (losses, scores) = jax.lax.scan(block, carry, blocks)
    return best_ids, best, losses.reshape(-1), jnp.concatenate([carry[3][None], scores])


def search(
    method,
    variables,
    image: np.ndarray,
    z_c: jax.Array,
    tokens: Sequence[int] | None,
    config: SearchConfig,
    clip: Clip,
    *,
    steps: int,
    guidance: float,
    start: int | None = None,
) -> dict[str, Any]:
    """Runs the search for one (padded) uint8 image whose decoded latent is `z_c` [1, h, w, 4],
    starting from `tokens` (the caption's) or `config.length` random candidate words; returns
    {"tokens": the best prompt's ids, "lpips": its decode's LPIPS, "losses": the loss of every
    step, "lpips_trace": the LPIPS of every evaluation (the start first)}."""
    candidates = candidate_tokens()
    if tokens:
        init = np.asarray(list(tokens)[: method.caption_budget()], np.int32)
    else:
        rng = np.random.default_rng(config.seed)
        init = rng.choice(candidates, min(config.length, method.caption_budget()))
    template = _template(method, init)
    frozen = variables.frozen
    z0 = method._encode(frozen, jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0)
    uncond = None
    if guidance != 1.0:
        uncond = method.encode_text(frozen, jnp.asarray(method.prompt_ids(negative=True)[None]))
    start = method.start if start is None else start
    best, score, losses, trace = _search(
        variables.params,
        frozen,
        {"text": clip.text, "vision": clip.vision},
        _lpips_params(),
        jnp.asarray(image),
        z0,
        jnp.asarray(z_c),
        jnp.asarray(init, jnp.int32),
        jnp.asarray(template),
        jnp.asarray(candidates),
        uncond,
        jnp.float32(guidance),
        jax.random.key(config.seed),
        method=method,
        clip_configs=(clip.text_config, clip.vision_config),
        cfg=config,
        steps=steps,
        start=start,
        guided=uncond is not None,
    )
    return {
        "tokens": [int(t) for t in np.asarray(best)],
        "lpips": float(score),
        "losses": np.asarray(losses),
        "lpips_trace": np.asarray(trace),
    }


@functools.cache
def _lpips_params():
    from jaxcodec.metrics.lpips import lpips_params

    return jax.tree.map(jnp.asarray, lpips_params("alex"))
