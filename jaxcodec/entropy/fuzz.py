"""Mutated, truncated, extended, spliced and random files for decoder fuzzing (tests and
`benchmarks/fuzz_decoder.py` share this generator)."""

from collections.abc import Iterator

import numpy as np

KINDS = (
    "bitflip",
    "bytes",
    "truncate",
    "extend",
    "random",
    "magic_random",
    "splice",
    "delete",
    "insert",
)


def mutants(valid: list[bytes], count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yields `count` (kind, data) pairs, each different from every valid file."""
    rng = np.random.default_rng(seed)
    originals = set(valid)
    made = 0
    while made < count:
        kind = KINDS[made % len(KINDS)]
        src = valid[int(rng.integers(len(valid)))]
        n = len(src)
        if kind == "bitflip":
            data = bytearray(src)
            for pos in rng.integers(0, n, int(rng.integers(1, 9))):
                data[pos] ^= 1 << int(rng.integers(8))
        elif kind == "bytes":
            data = bytearray(src)
            pos = rng.integers(0, n, int(rng.integers(1, 5)))
            data_arr = np.frombuffer(bytes(data), np.uint8).copy()
            data_arr[pos] = rng.integers(0, 256, len(pos))
            data = data_arr.tobytes()
        elif kind == "truncate":
            data = src[: int(rng.integers(0, n))]
        elif kind == "extend":
            data = src + rng.integers(0, 256, int(rng.integers(1, 100))).astype(np.uint8).tobytes()
        elif kind == "random":
            data = rng.integers(0, 256, int(rng.integers(0, 2 * n))).astype(np.uint8).tobytes()
        elif kind == "magic_random":
            tail = rng.integers(0, 256, int(rng.integers(0, n))).astype(np.uint8).tobytes()
            data = src[:3] + tail
        elif kind == "splice":
            other = valid[int(rng.integers(len(valid)))]
            cut = int(rng.integers(1, n))
            data = src[:cut] + other[int(rng.integers(0, len(other))) :]
        elif kind == "delete":
            a = int(rng.integers(0, n))
            data = src[:a] + src[a + int(rng.integers(1, 16)) :]
        else:  # insert
            a = int(rng.integers(0, n))
            ins = rng.integers(0, 256, int(rng.integers(1, 16))).astype(np.uint8).tobytes()
            data = src[:a] + ins + src[a:]
        data = bytes(data)
        if data in originals:
            continue
        made += 1
        yield kind, data
