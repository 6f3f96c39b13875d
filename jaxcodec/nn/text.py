"""CLIP text: open_clip's tokenizer, and ``encode_prompt`` — SD 2.x's cross-attention context.

**Tokenizer.** open_clip (and OpenAI CLIP, and SD 2.x) tokenise with byte-level BPE over the
49,152-line ``bpe_simple_vocab_16e6`` merge list: text fixed with ftfy, HTML-unescaped twice,
whitespace collapsed, lower-cased, split by one regular expression, each piece BPE-encoded with
``</w>`` marking its end; ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407) around it,
zero padding to 77, truncation keeping the end token. Token ids are also what a ResULIC caption
costs in bits, so they must be exactly open_clip's.

Which implementation: open_clip's own ``SimpleTokenizer`` imports torch (and importing the
package pulls in torchvision), so it can serve only as the test reference. transformers'
``CLIPTokenizer`` needs vocabulary files from the hub. ``instant-clip-tokenizer`` bundles the
vocabulary and also matches, but has had no release since 2023 and ships one wheel per CPython
version (none beyond the versions of its day; elsewhere it would need a Rust toolchain). So the
BPE runs in Hugging Face ``tokenizers`` (maintained, abi3 wheels, the engine of transformers'
``CLIPTokenizerFast``), configured with open_clip's conventions; the cleaning uses ``ftfy`` and
the split uses ``regex`` with open_clip's exact pattern (the same engine and Unicode tables as
open_clip, so pieces are identical — including where a literal ``<end_of_text>`` in a caption
becomes the special token). The vocabulary file ships inside jaxcodec, byte-identical to the
one in the open_clip and OpenAI CLIP packages (OpenAI's, MIT licence, © 2021 OpenAI), and is
checked by hash on load. Nothing is downloaded. Tests compare against open_clip on 1,000
captions.

**Prompt condition.** SD 2.x feeds its UNet the text tower's *penultimate* block output after
the final LayerNorm (1×77×1024 for OpenCLIP ViT-H/14). :func:`load_prompt_encoder` reads an
open_clip checkpoint (block -2 of 24) or a diffusers ``text_encoder`` folder (transformers'
``CLIPTextModel``, which SD 2.x ships already cut to 23 blocks; diffusers reads its last
block, so block -1). Without weights, :func:`encode_prompt` falls back to the empty prompt's
embedding stored next to the UNet (:func:`jaxcodec.weights.diffusers.load_text_condition`).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ftfy
import jax
import jax.numpy as jnp
import numpy as np
import regex
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxcodec.nn.clip import TextConfig, TextTransformer
from jaxcodec.weights import diffusers as dw
from jaxcodec.weights import open_clip as oc

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # open_clip keeps this many merge lines: a 49,408-token vocab
# open_clip's split (case-insensitive): special tokens, English contractions, letter runs,
# single digits, runs of everything else except whitespace.
_PATTERN = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


def clean(text: str) -> str:
    """open_clip's default ('lower') cleaning: ftfy, HTML unescape (twice), whitespace, case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _byte_alphabet() -> list[str]:
    """The 256 byte symbols in vocabulary order: printable Latin-1 bytes as themselves, the
    other bytes as code points from 256 up (GPT-2's reversible byte↔unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


@functools.cache
def _read_merges(path: str) -> list[tuple[str, str]]:
    data = Path(path).read_bytes()
    if Path(path) == VOCAB_FILE and hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise ValueError(f"{path} is not the CLIP vocabulary this module was tested with")
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    return [tuple(line.split()) for line in lines]


class CLIPTokenizer:
    """open_clip's ``SimpleTokenizer`` (default 'lower' cleaning), bit-for-bit.

    ``tokenizer(texts)`` → ``(B, context_length)`` int32 ids; :meth:`encode` → the BPE ids of
    one text without start/end tokens; :meth:`decode` → text, as open_clip decodes.
    """

    def __init__(self, vocab_file: str | os.PathLike = VOCAB_FILE, context_length: int = 77):
        merges = _read_merges(str(vocab_file))
        alphabet = _byte_alphabet()
        symbols = alphabet + [s + "</w>" for s in alphabet] + ["".join(m) for m in merges]
        symbols += [SOT, EOT]
        vocab = {s: i for i, s in enumerate(symbols)}
        bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
        self._bpe = tokenizers.Tokenizer(bpe)
        # Pieces arrive pre-split (see _PATTERN); byte-level only maps bytes to symbols.
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._bpe.decoder = decoders.ByteLevel()
        self._bpe.add_special_tokens([SOT, EOT])  # whole pieces only: the split isolates them
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.sot_token_id, self.eot_token_id = vocab[SOT], vocab[EOT]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        pieces = [_PATTERN.findall(clean(t)) for t in texts]
        encodings = self._bpe.encode_batch(pieces, is_pretokenized=True, add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), np.int32)
        for row, ids in zip(out, self.encode_batch(texts), strict=True):
            ids = [self.sot_token_id, *ids][: length - 1] + [self.eot_token_id]
            row[: len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        text = self._bpe.decode([int(i) for i in ids], skip_special_tokens=False)
        return text.replace("</w>", " ")


@functools.cache
def default_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


# ----------------------------------------------------------------------------- prompt encoder


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(config: TextConfig, params, ids: jnp.ndarray, hidden_layer: int) -> jnp.ndarray:
    return TextTransformer(config).apply({"params": params}, ids, hidden_layer).hidden


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """A text tower ready to condition the UNet: ``encoder(texts)`` → (B, 77, width)."""

    config: TextConfig
    params: Any
    hidden_layer: int = -2

    def __call__(self, texts: str | Sequence[str]) -> jnp.ndarray:
        ids = default_tokenizer()(texts, self.config.context_length)
        return _encode(self.config, self.params, jnp.asarray(ids), self.hidden_layer)


def load_prompt_encoder(
    path: str | os.PathLike,
    config: TextConfig | None = None,
    hidden_layer: int | None = None,
    variant: str | None = None,
) -> PromptEncoder:
    """The text tower in ``path``: an open_clip folder or safetensors file (then pass
    ``config`` unless the folder has ``open_clip_config.json``), a transformers / diffusers
    ``text_encoder`` folder, or a diffusers pipeline folder containing ``text_encoder/``.

    ``hidden_layer`` defaults to SD 2.x's choice for that format: -2 (penultimate) for open_clip
    towers and transformers ``CLIPModel``/``WithProjection`` checkpoints, -1 for a bare
    ``CLIPTextModel`` (diffusers' ``text_encoder``, already cut below the last block).
    """
    path = Path(path)
    if (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    state = oc.read_state_dict(path, variant)
    naming = oc.detect_naming(state)
    if config is None:
        if not path.is_dir():
            raise ValueError(f"{path} is a bare file: pass its TextConfig")
        config = oc.read_config(path, state.keys()).text
        if config is None:
            raise ValueError(f"{path} holds no text tower")
    params = oc.tower_params(state, config, naming)
    if hidden_layer is None:
        bare_hf = naming == "transformers" and "text_projection.weight" not in state
        hidden_layer = -1 if bare_hf else -2
    return PromptEncoder(config, params, hidden_layer)


@functools.lru_cache(maxsize=1)  # a ViT-H text tower is 1.4 GB: keep one, not one per call
def _cached_encoder(path: str) -> PromptEncoder:
    return load_prompt_encoder(path)


def encode_prompt(
    texts: str | Sequence[str], encoder: PromptEncoder | str | os.PathLike
) -> jnp.ndarray:
    """SD 2.x's text condition for ``texts``: (B, 77, width) (1024 for ViT-H/14).

    ``encoder`` is a :class:`PromptEncoder` or a folder to load one from. A folder without text
    weights still serves empty prompts from its stored empty-prompt embedding (the offline
    fallback); any other prompt then needs the weights, and the error says where they go.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if isinstance(encoder, PromptEncoder):
        return encoder(texts)
    try:
        return _cached_encoder(str(Path(encoder).resolve()))(texts)
    except FileNotFoundError as no_weights:
        if any(t.strip() for t in texts):
            raise FileNotFoundError(
                f"encoding prompts other than '' needs CLIP text weights in {encoder} "
                f"(or its text_encoder/): {no_weights}"
            ) from no_weights
        try:
            empty = dw.load_text_condition(encoder)
        except FileNotFoundError as no_file:
            raise FileNotFoundError(f"{no_weights}; and {no_file}") from no_file
        empty = jnp.asarray(empty)
        empty = empty if empty.ndim == 3 else empty[None]
        return jnp.broadcast_to(empty[:1], (len(texts), *empty.shape[1:]))
