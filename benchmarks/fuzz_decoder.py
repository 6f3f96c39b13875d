"""Decoder fuzzing: ≥ 100,000 mutated, truncated, extended, spliced and random `.jxc` files.

Every file must be refused with `BitstreamError`, quickly, leaving no output file. A second
pass feeds well-formed files (valid header and checksum) with random payloads — what a
malicious encoder could produce — which must either decode to an image of the declared size
or raise `BitstreamError`, never anything else.

    .venv/bin/python benchmarks/fuzz_decoder.py [--count 100000] [--checkpoint WORKDIR]

Without --checkpoint a tiny random-weight HFD model is written to a temporary workdir.
Ends with one JSON line.
"""

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxcodec.cli import decompress_file  # noqa: E402
from jaxcodec.codec import load_codec, save_codec  # noqa: E402
from jaxcodec.entropy import container, fuzz  # noqa: E402
from jaxcodec.entropy.container import BitstreamError  # noqa: E402


def tiny_workdir(path: Path) -> Path:
    import jax

    from jaxcodec.methods import get_method

    spec = importlib.util.spec_from_file_location("hfd_config", ROOT / "configs" / "hfd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("tiny")
    config.model.N, config.model.M = 16, 24
    config.data.crop_size = 64
    method = get_method(config)
    params = method.init(jax.random.key(0), method.dummy_batch(1))["params"]
    save_codec(path, config, params, step=1)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--crafted", type=int, default=500, help="valid-checksum random payloads")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        workdir = Path(args.checkpoint) if args.checkpoint else tiny_workdir(tmp / "model")
        codec = load_codec(workdir)
        from skimage import data

        photo = data.astronaut()
        valid = [codec.compress(photo[:64, :64]), codec.compress(photo[100:170, 50:180])]
        for v in valid:
            codec.decompress(v)  # warm-up, and the originals must decode
        src, out = tmp / "in.jxc", tmp / "out.png"
        refused, accepted, other, slowest = 0, 0, {}, 0.0
        kinds: dict[str, int] = {}
        t0 = time.perf_counter()
        for kind, blob in fuzz.mutants(valid, args.count, seed=args.seed):
            src.write_bytes(blob)
            t = time.perf_counter()
            try:
                decompress_file(codec, src, out)
                accepted += 1
            except BitstreamError:
                refused += 1
            except Exception as exc:  # anything else is a bug
                other[type(exc).__name__] = other.get(type(exc).__name__, 0) + 1
            slowest = max(slowest, time.perf_counter() - t)
            kinds[kind] = kinds.get(kind, 0) + 1
            if out.exists():
                raise SystemExit(f"output file left behind for a {kind} mutant")
        elapsed = time.perf_counter() - t0

        rng = np.random.default_rng(args.seed + 1)
        crafted = {"decoded": 0, "refused": 0, "other": 0}
        for _ in range(args.crafted):
            streams = [
                rng.integers(0, 256, int(rng.integers(0, 200))).astype(np.uint8).tobytes()
                for _ in range(2)
            ]
            h, w = (int(x) for x in rng.integers(1, 129, 2))
            blob = container.pack(container.Header(h, w, codec.hash[:2]), streams, codec.hash)
            try:
                image = codec.decompress(blob)
                assert image.shape == (h, w, 3) and image.dtype == np.uint8
                crafted["decoded"] += 1
            except BitstreamError:
                crafted["refused"] += 1
            except Exception:
                crafted["other"] += 1

    print(
        f"{args.count} mutated files: {refused} refused with BitstreamError, {accepted} accepted, "
        f"{sum(other.values())} other errors {other}; slowest {1e3 * slowest:.1f} ms, "
        f"{1e6 * elapsed / args.count:.0f} µs/file; kinds {kinds}"
    )
    print(f"{args.crafted} crafted files (valid checksum, random payload): {crafted}")
    print(
        json.dumps(
            {
                "benchmark": "fuzz_decoder",
                "files": args.count,
                "refused": refused,
                "accepted": accepted,
                "other_errors": sum(other.values()),
                "slowest_ms": 1e3 * slowest,
                "us_per_file": 1e6 * elapsed / args.count,
                "crafted": crafted,
            }
        )
    )
    if accepted or other or crafted["other"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
