"""Decoding memory per pixel: peak RSS of `jaxcodec decompress` at two image sizes.

Each decode runs in a fresh process (so the peak is its own; Linux); the marginal cost per pixel is
(peak_large - peak_small) / (pixels_large - pixels_small), which removes the fixed cost of the
interpreter, JAX and the model. Prints one JSON line.

    .venv/bin/python benchmarks/decode_memory.py [--variant full] [--sizes 1024 2048]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak RSS from /proc (VmHWM belongs to this process image; ru_maxrss would also count the
# parent's memory that a vfork/exec child inherits in its high-water mark).
_DECODE = """
import sys
from jaxcodec.codec import load_codec
codec = load_codec(sys.argv[1], max_pixels=1 << 28)
image = codec.decompress(open(sys.argv[2], "rb").read())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(int(hwm) * 1024, image.shape[0] * image.shape[1])
"""


def make_model(path: Path, variant: str) -> Path:
    import jax

    from jaxcodec.codec import save_codec
    from jaxcodec.configlib import load_config
    from jaxcodec.methods import get_method
    from jaxcodec.train_shapes import jit_init

    config = load_config(f"configs/hfd.py:{variant}", ["data.crop_size=64"])
    method = get_method(config)
    params = jit_init(method.init, jax.random.key(0), method.dummy_batch(1))
    return save_codec(path, config, params["params"])


def photo(side: int) -> np.ndarray:
    from skimage import data

    img = data.astronaut()
    reps = (-(-side // img.shape[0]), -(-side // img.shape[1]), 1)
    return np.ascontiguousarray(np.tile(img, reps)[:side, :side])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="full", help="configs/hfd.py variant")
    p.add_argument("--sizes", type=int, nargs=2, default=(1024, 2048))
    args = p.parse_args()
    from jaxcodec.codec import load_codec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model.safetensors", args.variant)
        codec = load_codec(model, max_pixels=1 << 28)
        peaks = {}
        for side in args.sizes:
            jxc = tmp / f"{side}.jxc"
            jxc.write_bytes(codec.compress(photo(side)))
            out = subprocess.run(
                [sys.executable, "-c", _DECODE, str(model), str(jxc)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=dict(os.environ, JAX_PLATFORMS="cpu"),
            ).stdout.split()
            peaks[side] = (int(out[-2]), int(out[-1]))
    (rss_a, px_a), (rss_b, px_b) = peaks[args.sizes[0]], peaks[args.sizes[1]]
    print(
        json.dumps(
            {
                "benchmark": "decode_memory",
                "variant": args.variant,
                "peak_rss_mb": {str(s): round(r / 2**20, 1) for s, (r, _) in peaks.items()},
                "bytes_per_pixel": round((rss_b - rss_a) / (px_b - px_a), 1),
                "hardware": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
            }
        )
    )


if __name__ == "__main__":
    main()
