"""What ResULIC's caption stream costs: bits per caption of jaxcodec's caption coder (the real
range-coded stream, and the model's ideal cost) next to zlib (level 9) on the UTF-8 text and
the CLIP tokens at 16 bits each.

Captions: benchmarks/data/captions_varied.txt (200 varied English captions written for this
benchmark: several styles and subjects; none of them is in the model's corpus) and, with
``--corpus prompt_flicker.json`` (ResULIC's Flickr2K captions, the model's corpus), the
captions held out of the shipped model (every 100th).

    .venv/bin/python benchmarks/caption_coding.py [--corpus prompt_flicker.json]

Ends with one JSON line of headline figures.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxcodec.entropy import text_coder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", default=str(ROOT / "benchmarks/data/captions_varied.txt"))
    p.add_argument("--corpus", default=None, help="the model's corpus, for its held-out split")
    args = p.parse_args()
    sets = {"varied": text_coder.read_corpus(args.captions)}
    if args.corpus:
        sets["flickr_held_out"] = text_coder.split_corpus(text_coder.read_corpus(args.corpus))[1]
    out = {}
    print(f"{'set':<16} {'n':>4} {'chars':>6} {'tokens':>6} {'coder':>7} {'ideal':>7} "
          f"{'zlib':>7} {'16-bit':>7}  (bits per caption)")  # fmt: skip
    for name, captions in sets.items():
        r = text_coder.compare(captions)
        out[name] = {k: round(v, 2) for k, v in r.items()}
        print(
            f"{name:<16} {r['captions']:>4} {r['chars']:>6.1f} {r['tokens']:>6.1f} "
            f"{r['coder_bits']:>7.1f} {r['ideal_bits']:>7.1f} {r['zlib_bits']:>7.1f} "
            f"{r['token16_bits']:>7.1f}"
        )
    print(json.dumps({"benchmark": "caption_coding", **out}))


if __name__ == "__main__":
    main()
