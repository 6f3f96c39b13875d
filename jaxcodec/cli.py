"""Command line: `jaxcodec compress IN.png OUT.jxc --checkpoint MODEL`,
`jaxcodec decompress IN.jxc OUT.png --checkpoint MODEL`, `jaxcodec export --checkpoint WORKDIR`.

MODEL is a codec bundle (`.safetensors`) or a finished training workdir (its
`codec.safetensors`). Subcommands register themselves in `SUBCOMMANDS`; others plug in the
same way. Outputs are written to a temporary file in the target folder and renamed only
on success, so a failed run never leaves a partial or stale output behind.
"""

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {}


def subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def wrap(fn):
        SUBCOMMANDS[name] = (add_arguments, fn)
        return fn

    return wrap


def enable_compilation_cache() -> str | None:
    """Keeps XLA's compiled decoders on disk between calls (one compilation per model and
    image size, not per call): `JAXCODEC_COMPILATION_CACHE` names the folder (default
    ~/.cache/jaxcodec/xla), `0` or an empty value turns it off; JAX's own
    `JAX_COMPILATION_CACHE_DIR`, when set, wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = os.environ.get(
        "JAXCODEC_COMPILATION_CACHE", os.path.join("~", ".cache", "jaxcodec", "xla")
    )
    if path in ("", "0"):
        return None
    import jax

    path = os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls write(tmp_path) in the destination folder, then renames over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_image(path: str | Path) -> np.ndarray:
    """Any PIL-readable image → uint8 RGB (grey, RGBA, 16-bit and palette are converted)."""
    from jaxcodec.data import read_rgb

    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read {path} as an image: {exc}") from None


def compress_file(codec, src: str | Path, dst: str | Path) -> dict:
    image = read_image(src)
    data = codec.compress(image)
    atomic_write(dst, lambda p: p.write_bytes(data))
    h, w = image.shape[:2]
    return {"bytes": len(data), "bpp": 8.0 * len(data) / (h * w), "height": h, "width": w}


def decompress_file(codec, src: str | Path, dst: str | Path) -> np.ndarray:
    """Decodes `src` to a PNG at `dst`; raises BitstreamError (and writes nothing) on bad input."""
    from PIL import Image

    from jaxcodec.entropy.container import BitstreamError

    try:
        data = Path(src).read_bytes()
    except OSError as exc:
        raise BitstreamError(f"cannot read {src}: {exc.strerror}") from None
    image = codec.decompress(data)
    atomic_write(dst, lambda p: Image.fromarray(image).save(p, format="PNG"))
    return image


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="codec bundle (.safetensors) or finished training workdir",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field of the model, e.g. a local path of pretrained weights "
        "(their digest is still checked)",
    )


def _codec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input")
    p.add_argument("output")
    _model_args(p)


def _compress_args(p: argparse.ArgumentParser) -> None:
    _codec_args(p)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="decode setting stored in the file (e.g. steps=4, seed=3, guidance=1.5)",
    )
    _rate_args(p)


def _rate_args(p: argparse.ArgumentParser) -> None:
    """The rate of a rate-conditioned model (`configs/...:variable_rate=1`)."""
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--quality",
        type=float,
        default=None,
        metavar="Q",
        help="rate-conditioned models: 0 (smallest files) … 100 (best quality); default: the "
        "model's",
    )
    rate.add_argument(
        "--target-bpp",
        type=float,
        default=None,
        metavar="X",
        help="rate-conditioned models: the largest file of at most X bits per pixel (header "
        "included; bisection over the quality, each probe a real encode)",
    )


def _decompress_args(p: argparse.ArgumentParser) -> None:
    from jaxcodec.codec import DEFAULT_MAX_PIXELS

    _codec_args(p)
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse files declaring larger images (default {DEFAULT_MAX_PIXELS:,})",
    )


@subcommand("compress", _compress_args)
def _compress(args) -> int:
    from jaxcodec.codec import load_codec, parse_options, rate_controlled

    codec = load_codec(
        args.checkpoint, overrides=args.overrides, options=parse_options(args.option)
    )
    codec = rate_controlled(codec, args.quality, args.target_bpp)
    r = compress_file(codec, args.input, args.output)
    print(
        f"{args.output}: {r['bytes']} bytes, {r['bpp']:.4f} bpp "
        f"({r['width']}x{r['height']}, model {codec.name} id {codec.model_id})"
    )
    if args.target_bpp is not None:
        s = codec.last_search
        note = "" if s["reached"] else " (the smallest file this model makes: above the target)"
        print(f"quality {s['quality']:.1f} after {s['probes']} probes{note}")
    return 0


@subcommand("decompress", _decompress_args)
def _decompress(args) -> int:
    from jaxcodec.codec import load_codec

    codec = load_codec(args.checkpoint, overrides=args.overrides, max_pixels=args.max_pixels)
    image = decompress_file(codec, args.input, args.output)
    print(f"{args.output}: {image.shape[1]}x{image.shape[0]}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", nargs="?", default=None, help="default: WORKDIR/codec.safetensors")
    p.add_argument("--checkpoint", required=True, help="training workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


@subcommand("export", _export_args)
def _export(args) -> int:
    """Writes the portable codec bundle of a training checkpoint."""
    from jaxcodec.codec import export

    path = export(args.checkpoint, args.output, step=args.step)
    print(f"{path}: codec bundle of {args.checkpoint} ({path.stat().st_size:,} bytes)")
    return 0


def _import_args(p: argparse.ArgumentParser) -> None:
    from jaxcodec.importers import FORMATS

    p.add_argument("source", help="the public checkpoint (.safetensors, .ckpt, .pth)")
    p.add_argument("output", help="the weights file or codec bundle in jaxcodec's format")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--config", default=None, help="config whose model it is (default: per format)")
    p.add_argument(
        "--sd",
        default=None,
        help="rdeic, resulic, diffcr: the SD 2.1-base diffusers folder it runs on",
    )
    p.add_argument(
        "--control-scale",
        type=float,
        default=None,
        help="rdeic: the official run-time control_scale (config value; default 1)",
    )
    p.add_argument("--base", default=None, help="diffo: the base-code autoencoder checkpoint")
    p.add_argument(
        "--vqgan", default=None, help="diffo: the VQGAN file of --format vqgan (GT latent space)"
    )


@subcommand("import-weights", _import_args)
def _import_weights(args) -> int:
    """Converts a public checkpoint (see jaxcodec.importers); the report names every key left
    out."""
    from jaxcodec.importers import run

    options = dict(sd=args.sd, control_scale=args.control_scale, base=args.base, vqgan=args.vqgan)
    report = []
    atomic_write(
        args.output,
        lambda tmp: report.append(run(args.format, args.source, tmp, args.config, **options)),
    )
    print(f"{args.output}: {report[0]}")
    return 0


def _shardings_args(p: argparse.ArgumentParser) -> None:
    from jaxcodec.sharding import add_report_arguments

    add_report_arguments(p)


@subcommand("shardings", _shardings_args)
def _shardings(args) -> int:
    """Every parameter's logical axes, mesh partitioning and bytes per device (from shapes)."""
    from jaxcodec.sharding import print_report

    return print_report(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcodec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name)
        add_arguments(p)
        p.set_defaults(func=fn)
    # Listed for --help only: main() hands its arguments to jaxcodec.evaluate's own parser.
    sub.add_parser("evaluate", help="same arguments as `python -m jaxcodec.evaluate`")
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxcodec.checkpoint import CheckpointError
    from jaxcodec.entropy.container import BitstreamError

    argv = sys.argv[1:] if argv is None else list(argv)
    enable_compilation_cache()
    if argv[:1] == ["evaluate"]:  # its own parser owns every argument after the name
        from jaxcodec.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (BitstreamError, CheckpointError, ValueError, FileNotFoundError) as exc:
        kind = "invalid bitstream" if isinstance(exc, BitstreamError) else "error"
        print(f"jaxcodec {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
