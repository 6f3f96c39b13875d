"""Writes the golden model and file that tests/test_golden.py decodes.

Run only when a format change is intended (and bump `container.VERSION` with it):
    .venv/bin/python tests/golden/make_golden.py
The model is a tiny HFD stage-1 ELIC model (factorized hyper latent) trained for a few steps.
A model that small codes almost every latent as zero, so the file is written from synthetic
latents instead (wide Gaussian y with a few escapes, random z) through the codec's own coding
functions: every table, the escape path and the context model are exercised. `golden.json`
holds the SHA-256 of the decoded pixels and of the decoded symbols.
"""

import gzip
import hashlib
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from jaxcodec.codec import load_codec  # noqa: E402
from jaxcodec.configlib import load_config  # noqa: E402
from jaxcodec.train import train_and_evaluate  # noqa: E402

OVERRIDES = [
    "model.N=8",
    "model.M=16",
    "model.context_groups=(4,4,8)",
    "data.crop_size=64",
    "batch_size=4",
    "loss.lmbda=0.05",
    "total_steps=60",
    "log_every=30",
    "eval_every=0",
    "checkpoint_every=60",
    "optimizer.lr=3e-3",
    "real_file_eval=False",
]


HEIGHT, WIDTH = 128, 192


def synthetic_file(codec) -> bytes:
    """A valid file for `codec` whose latents use the whole coding path."""
    import numpy as np

    from jaxcodec.entropy import container, tables
    from jaxcodec.entropy.coder import finish, new_encoder
    from jaxcodec.nn.hyperprior import STRIDE, encode_factorized

    coding, t = codec.coder, codec.tables
    rng = np.random.default_rng(20261130)
    n = t["z"]["lengths"].shape[0]
    z = rng.integers(-3, 4, (HEIGHT // STRIDE, WIDTH // STRIDE, n)).astype(np.float64)
    enc_z = new_encoder()
    z_hat_q = encode_factorized(enc_z, t["z"], z)
    m = int(sum(t["context"]["groups"]))
    y = rng.normal(0.0, 4.0, (HEIGHT // 16, WIDTH // 16, m))
    y.flat[rng.integers(0, y.size, 6)] = [300.0, -300.0, 70000.0, -5000.0, 1e6, 41.0]  # escapes
    enc_y = new_encoder()
    coding._code_y(t, z_hat_q, y=y, encoder=enc_y)
    header = container.Header(HEIGHT, WIDTH, codec.hash[: container.MODEL_ID_BYTES], {})
    assert tables.PRECISION == 16
    return container.pack(header, [finish(enc_z), finish(enc_y)], codec.hash)


def digest(array) -> str:
    import numpy as np

    a = np.ascontiguousarray(array)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        train_and_evaluate(load_config("configs/hfd.py:tiny", OVERRIDES), tmp)
        model = (Path(tmp) / "codec.safetensors").read_bytes()
        (HERE / "model.safetensors.gz").write_bytes(gzip.compress(model, mtime=0))
        codec = load_codec(Path(tmp) / "codec.safetensors")
        data = synthetic_file(codec)
        (HERE / "golden.jxc").write_bytes(data)
        pixels = codec.decompress(data)
    symbols = codec.last_info["y_symbols"]
    print(f"{(symbols != 0).sum()} of {symbols.size} y symbols are not zero")
    record = {
        "file": "golden.jxc",
        "size": [HEIGHT, WIDTH],
        "bytes": len(data),
        "pixels_sha256": digest(pixels),
        "y_symbols_sha256": digest(codec.last_info["y_symbols"]),
    }
    (HERE / "golden.json").write_text(json.dumps(record, indent=2) + "\n")
    print(record)


if __name__ == "__main__":
    main()
