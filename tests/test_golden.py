"""Golden bitstream: a committed model and file must keep decoding to the same pixels.

A change of the range coder, the container, the fixed-point networks or the table code that
would break files already written fails here. Renew the golden files (tests/golden/
make_golden.py) only together with a format version bump.
"""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

from jaxcodec.codec import load_codec

GOLDEN = Path(__file__).resolve().parent / "golden"


def _digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def test_golden_file_decodes_to_the_recorded_pixels(tmp_path):
    record = json.loads((GOLDEN / "golden.json").read_text())
    model = tmp_path / "model.safetensors"
    model.write_bytes(gzip.decompress((GOLDEN / "model.safetensors.gz").read_bytes()))
    codec = load_codec(model)
    data = (GOLDEN / record["file"]).read_bytes()
    assert len(data) == record["bytes"]
    pixels = codec.decompress(data)
    assert list(pixels.shape[:2]) == record["size"]
    assert _digest(codec.last_info["y_symbols"]) == record["y_symbols_sha256"], "symbols differ"
    assert _digest(pixels) == record["pixels_sha256"], "symbols match but pixels differ"
