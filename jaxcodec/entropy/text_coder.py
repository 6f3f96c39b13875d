"""Entropy coding of captions (ResULIC's "semantic residual") as CLIP BPE tokens.

A caption is coded as the token ids the decoder feeds its CLIP text tower (open_clip's BPE,
:class:`jaxcodec.nn.text.CLIPTokenizer`), so nothing is lost between the two sides. The model
is an interpolated Kneser–Ney bigram over the 49,408-token vocabulary (Chen & Goodman 1998,
one discount D = 3/4)::

    P(w | v) = max(c(v, w) − D, 0) / c(v) + D·n(v) / c(v) · P_KN(w)
    P_KN(w) ∝ 10·N₁₊(•, w) + 1        (continuation counts, every token ≥ 1)

with ``<start_of_text>`` as the first context and ``<end_of_text>`` as the symbol that ends a
caption. Every probability is an integer frequency computed with exact integer arithmetic from
stored integer counts, then divided once by its exact integer total (an IEEE division): both
sides build bit-identical ``constriction`` categorical models on any machine.

The shipped model (``caption_bigram.npz``, 76 KB) holds bigram counts of 20,302 captions of
ResULIC's Flickr2K caption file (``dataset/prompt_flicker.json`` of NJUVISION's ResULIC,
commit 1b014ef, BSD-3-Clause © 2025 NJUVISION), every 100th caption held out for evaluation;
only counts ship, no text (the licence: ``caption_bigram.LICENSE``).
``python -m jaxcodec.entropy.text_coder build CORPUS.json OUT.npz``
rebuilds it, ``... evaluate CAPTIONS.txt`` reports bits per caption next to zlib and 16-bit
tokens (see ``benchmarks/caption_coding.py``).

Stream: the range-coded tokens up to and including ``<end_of_text>``; an empty stream means no
caption (zero bytes in the file).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxcodec.entropy import coder

MODEL_FILE = Path(__file__).with_name("caption_bigram.npz")
VOCAB_SIZE = 49408
SOT, EOT = 49406, 49407
MAX_TOKENS = 75  # a 77-token CLIP context minus <start_of_text> and <end_of_text>
DISCOUNT = (3, 4)  # D = 3/4 as an integer ratio
CONTINUATION_WEIGHT = 10  # P_KN(w) ∝ 10·N₁₊(•, w) + 1
HOLD_OUT_EVERY = 100  # corpus captions i with i % 100 == 0 are left out of the shipped model


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (the context cache)
class CaptionModel:
    """Bigram counts in CSR form: the successors of context v are ``next_ids[ptr[v]:ptr[v+1]]``
    with counts ``counts[...]``; ``backoff`` is the integer P_KN weight of every token."""

    ptr: np.ndarray  # int64 [V + 1]
    next_ids: np.ndarray  # int64 [nnz]
    counts: np.ndarray  # int64 [nnz]
    backoff: np.ndarray  # int64 [V]
    meta: dict

    @classmethod
    def from_arrays(cls, arrays: dict) -> CaptionModel:
        ptr = np.asarray(arrays["ptr"], np.int64)
        next_ids = np.asarray(arrays["next_ids"], np.int64)
        counts = np.asarray(arrays["counts"], np.int64)
        ok = ptr.shape == (VOCAB_SIZE + 1,) and ptr[0] == 0 and np.all(np.diff(ptr) >= 0)
        ok = ok and ptr[-1] == len(next_ids) == len(counts)
        ok = ok and (not len(next_ids) or (next_ids.min() >= 0 and next_ids.max() < VOCAB_SIZE))
        if not ok or (len(counts) and counts.min() < 1):
            raise ValueError("malformed caption model")
        continuation = np.bincount(next_ids, minlength=VOCAB_SIZE)
        backoff = CONTINUATION_WEIGHT * continuation.astype(np.int64) + 1
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        return cls(ptr, next_ids, counts, backoff, meta)

    def frequencies(self, context: int) -> np.ndarray:
        """Integer frequencies of every token after ``context`` (int64 [V], all ≥ 1)."""
        lo, hi = self.ptr[context], self.ptr[context + 1]
        if lo == hi:
            return self.backoff.copy()
        d_num, d_den = DISCOUNT
        counts, ids = self.counts[lo:hi], self.next_ids[lo:hi]
        b_total = int(self.backoff.sum())
        # Units of 1 / (d_den · c(v) · ΣU): discounted counts + the backoff mass d_num·n(v).
        freq = (d_num * len(ids)) * self.backoff
        freq[ids] += np.maximum(d_den * counts - d_num, 0) * b_total
        return freq

    @functools.lru_cache(maxsize=4096)  # noqa: B019 — one model per context, shared by files
    def categorical(self, context: int):
        freq = self.frequencies(int(context))
        return coder.Categorical(freq.astype(np.float64) / float(freq.sum()), perfect=False)

    def bits(self, tokens: Sequence[int]) -> float:
        """The ideal cost of a caption (its tokens and the end symbol), in bits."""
        total, context = 0.0, SOT
        for t in [*tokens, EOT]:
            freq = self.frequencies(context)
            total -= np.log2(freq[t] / freq.sum())
            context = t
        return float(total)


@functools.cache
def default_model() -> CaptionModel:
    """The shipped model (see the module docstring)."""
    return load(MODEL_FILE)


def load(path: str | Path) -> CaptionModel:
    with np.load(path, allow_pickle=False) as f:
        return CaptionModel.from_arrays(dict(f))


def _check_tokens(tokens: Sequence[int]) -> list[int]:
    tokens = [int(t) for t in tokens]
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"a caption has at most {MAX_TOKENS} tokens, got {len(tokens)}")
    if any(not 0 <= t < SOT for t in tokens):
        raise ValueError("caption tokens must be BPE ids below <start_of_text>")
    return tokens


def encode(tokens: Sequence[int] | None, model: CaptionModel | None = None) -> bytes:
    """Token ids (no start/end tokens) → the caption stream; None → b"" (no caption)."""
    if tokens is None:
        return b""
    model = model or default_model()
    tokens = _check_tokens(tokens)
    encoder = coder.new_encoder()
    context = SOT
    for t in [*tokens, EOT]:
        encoder.encode(np.array([t], np.int32), model.categorical(context))
        context = t
    return coder.finish(encoder) or b"\x00"  # a present caption never has an empty stream


def decode(data: bytes, model: CaptionModel | None = None) -> list[int] | None:
    """The caption stream → token ids (None for an empty stream: no caption). Raises
    :class:`~jaxcodec.entropy.coder.CodingError` on a stream that is not a caption."""
    if not data:
        return None
    model = model or default_model()
    decoder = coder.new_decoder(data)
    tokens, context = [], SOT
    for _ in range(MAX_TOKENS + 1):
        try:
            t = int(decoder.decode(model.categorical(context)))
        except Exception as exc:
            raise coder.CodingError(f"caption stream: {exc}") from None
        if t == EOT:
            return tokens
        if t == SOT:
            raise coder.CodingError("caption stream holds a start-of-text token")
        tokens.append(t)
        context = t
    raise coder.CodingError(f"caption stream longer than {MAX_TOKENS} tokens")


# ----------------------------------------------------------------------------- building


def build(captions: Sequence[str], meta: dict | None = None) -> dict[str, np.ndarray]:
    """Bigram counts of ``captions`` (tokenised with the CLIP tokenizer, at most
    ``MAX_TOKENS`` tokens each) as the arrays of a model file."""
    from jaxcodec.nn.text import default_tokenizer

    pairs = []
    for ids in default_tokenizer().encode_batch(list(captions)):
        seq = np.asarray([SOT, *ids[:MAX_TOKENS], EOT], np.int64)
        pairs.append(seq[:-1] * VOCAB_SIZE + seq[1:])
    keys, counts = np.unique(np.concatenate(pairs), return_counts=True)
    prev, nxt = np.divmod(keys, VOCAB_SIZE)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(prev, minlength=VOCAB_SIZE))])
    meta = dict(meta or {}, captions=len(captions), discount=list(DISCOUNT))
    return {
        "ptr": ptr.astype(np.int32),
        "next_ids": nxt.astype(np.int32),
        "counts": counts.astype(np.int32),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }


def read_corpus(path: str | Path) -> list[str]:
    """Captions of a JSON file — a list of strings, or ResULIC's {image: [caption, ...]} — or
    of a text file (one caption a line)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        values = data.values() if isinstance(data, dict) else data
        out = []
        for v in values:
            out += [v] if isinstance(v, str) else list(v)
        return out
    return [line for line in path.read_text().splitlines() if line.strip()]


def split_corpus(captions: Sequence[str]) -> tuple[list[str], list[str]]:
    """(model captions, held-out captions): every ``HOLD_OUT_EVERY``-th caption is held out,
    and held-out captions that also occur among the model's are dropped from the held-out set."""
    held = [c for i, c in enumerate(captions) if i % HOLD_OUT_EVERY == 0]
    kept = [c for i, c in enumerate(captions) if i % HOLD_OUT_EVERY]
    seen = set(kept)
    return kept, [c for c in held if c not in seen]


def compare(captions: Sequence[str], model: CaptionModel | None = None) -> dict[str, float]:
    """Mean bits per caption: this coder's real stream, its ideal cost, zlib (level 9) on the
    UTF-8 text and the CLIP tokens at 16 bits each."""
    from jaxcodec.nn.text import default_tokenizer

    model = model or default_model()
    ids = [i[:MAX_TOKENS] for i in default_tokenizer().encode_batch(list(captions))]
    stream = [8 * len(encode(t, model)) for t in ids]
    return {
        "captions": len(captions),
        "coder_bits": float(np.mean(stream)),
        "ideal_bits": float(np.mean([model.bits(t) for t in ids])),
        "zlib_bits": float(np.mean([8 * len(zlib.compress(c.encode(), 9)) for c in captions])),
        "token16_bits": float(np.mean([16 * len(t) for t in ids])),
        "tokens": float(np.mean([len(t) for t in ids])),
        "chars": float(np.mean([len(c) for c in captions])),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``build CORPUS OUT.npz`` | ``evaluate CAPTIONS [--model M.npz]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxcodec.entropy.text_coder")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="count bigrams of a caption corpus (held-out split kept)")
    b.add_argument("corpus")
    b.add_argument("output")
    b.add_argument("--source", default="", help="provenance recorded in the model file")
    e = sub.add_parser("evaluate", help="bits per caption vs zlib and 16-bit tokens")
    e.add_argument("captions")
    e.add_argument("--model", default=str(MODEL_FILE))
    e.add_argument("--held-out", action="store_true", help="the corpus's held-out captions")
    args = p.parse_args(argv)
    if args.cmd == "build":
        data = Path(args.corpus).read_bytes()
        kept, held = split_corpus(read_corpus(args.corpus))
        meta = {"source": args.source, "corpus_sha256": hashlib.sha256(data).hexdigest()}
        meta["held_out"] = f"every {HOLD_OUT_EVERY}th caption ({len(held)} kept out)"
        arrays = build(kept, meta)
        np.savez_compressed(args.output, **arrays)
        print(f"{args.output}: {len(arrays['counts'])} bigrams of {len(kept)} captions")
        return 0
    captions = read_corpus(args.captions)
    if args.held_out:
        captions = split_corpus(captions)[1]
    print(json.dumps(compare(captions, load(args.model)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
