"""Command line: `jaxcodec compress IN.png OUT.jxc --checkpoint MODEL`,
`jaxcodec decompress IN.jxc OUT.png --checkpoint MODEL`, `jaxcodec export --checkpoint WORKDIR`.

MODEL is a codec bundle (`.safetensors`) or a finished training workdir (its
`codec.safetensors`; a multi-stage workdir, WORKDIR/stageN, stands for its last finished
stage). Subcommands register themselves in `SUBCOMMANDS`; others plug in the same way.
Outputs are written to a temporary file in the target folder and renamed only on success, so a
failed run never leaves a partial or stale output behind.

Many files, one process: `compress DIR OUTDIR` (or `compress a.png b.png OUTDIR`) and
`decompress DIR OUTDIR` load the model once and code images of one padded size together
(`--batch-size`); the files are the ones one-file calls write. A file that cannot be read or
decoded is skipped with a message naming it and the others go on; the exit status is then 1.
Exit status 2: nothing was done (bad arguments, an output that is a file, a folder mixed with
files, an unreadable model).
"""

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxcodec.compilation_cache import enable_compilation_cache

SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {}

# Images per device call of the many-file form on an accelerator. XLA:CPU is no faster with
# batches (its convolutions already use every core; benchmarks/batch_cli.py), so there it is 1.
ACCELERATOR_BATCH = 8


def subcommand(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def wrap(fn):
        SUBCOMMANDS[name] = (add_arguments, fn)
        return fn

    return wrap


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
        help="codec bundle (.safetensors) or finished training workdir (of several stages: "
        "the last finished one)",
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
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="INPUT OUTPUT (one file), or INPUT... OUTDIR: a folder or several files into a "
        "folder, coded in one process",
    )
    _model_args(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="many inputs: images of one padded size coded together on the device (default: "
        f"{ACCELERATOR_BATCH} on a GPU or TPU, 1 on a CPU, where batches are no faster)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="many inputs: no progress bar, no line per file"
    )


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


def _say_which_stage(checkpoint: str, codec) -> None:
    """A multi-stage workdir (WORKDIR/stageN) stands for its last finished stage: say which."""
    from jaxcodec.checkpoint import describe_bundle_choice

    note = describe_bundle_choice(checkpoint, codec.source)
    if note:
        print(note)


@subcommand("compress", _compress_args)
def _compress(args) -> int:
    from jaxcodec.codec import load_codec, parse_options, rate_controlled
    from jaxcodec.data.images import IMAGE_EXTENSIONS

    inputs, output = _input_output(args)
    jobs = plan_many(inputs, output, IMAGE_EXTENSIONS, ".jxc")
    codec = load_codec(
        args.checkpoint, overrides=args.overrides, options=parse_options(args.option)
    )
    _say_which_stage(args.checkpoint, codec)
    codec = rate_controlled(codec, args.quality, args.target_bpp)
    if jobs is not None:
        return compress_many(codec, jobs, batch_size=args.batch_size, quiet=args.quiet)
    r = compress_file(codec, inputs[0], output)
    print(
        f"{output}: {r['bytes']} bytes, {r['bpp']:.4f} bpp "
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

    inputs, output = _input_output(args)
    jobs = plan_many(inputs, output, (".jxc",), ".png")
    codec = load_codec(args.checkpoint, overrides=args.overrides, max_pixels=args.max_pixels)
    _say_which_stage(args.checkpoint, codec)
    if jobs is not None:
        return decompress_many(codec, jobs, batch_size=args.batch_size, quiet=args.quiet)
    image = decompress_file(codec, inputs[0], output)
    print(f"{output}: {image.shape[1]}x{image.shape[0]}")
    return 0


# ---------------------------------------------------------------------------------------------
# Many files, one process
# ---------------------------------------------------------------------------------------------


def _input_output(args) -> tuple[list[str], str]:
    """(inputs, output) of the paths; resolves the default batch size."""
    if len(args.paths) < 2:
        raise ValueError(f"{args.command} needs an input and an output, got {args.paths}")
    if args.batch_size is None:
        import jax

        args.batch_size = 1 if jax.default_backend() == "cpu" else ACCELERATOR_BATCH
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: use 1 or more")
    return args.paths[:-1], args.paths[-1]


def plan_many(
    inputs: list[str], output: str, suffixes: tuple[str, ...], out_suffix: str
) -> list[tuple[Path, Path]] | None:
    """(source, destination) pairs of the many-file form, checked before any model loads; None
    for the one-file form `INPUT OUTPUT` (one input that is a file, an output that is not a
    folder). A folder input takes its files with `suffixes` (not recursive, sorted by name);
    each destination is OUTDIR/stem + `out_suffix` (OUTDIR is made when missing)."""
    out = Path(output)
    folders = [p for p in inputs if Path(p).is_dir()]
    if len(inputs) == 1 and not folders and not out.is_dir() and not output.endswith(("/", os.sep)):
        return None
    if folders and len(inputs) > 1:
        raise ValueError(f"give one folder or a list of files, not both (folder {folders[0]})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{output} is a file: several inputs need an output folder")
    if folders:
        sources = sorted(
            p for p in Path(folders[0]).iterdir() if p.is_file() and p.suffix.lower() in suffixes
        )
        if not sources:
            raise FileNotFoundError(f"no {' '.join(suffixes)} files in {folders[0]}")
    else:
        sources = [Path(p) for p in inputs]
    jobs, taken = [], {}
    for src in sources:
        dst = out / (src.stem + out_suffix)
        if dst in taken:
            raise ValueError(f"{taken[dst]} and {src} would both be written to {dst}")
        if dst.resolve() == src.resolve():
            raise ValueError(f"{src} would be overwritten by its own output")
        taken[dst] = src
        jobs.append((src, dst))
    return jobs


class _Report:
    """What a many-file run shows: a progress bar on stderr (when it is a terminal), a line per
    file written (stdout) and one per file skipped (stderr), then a summary line."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.total, self.desc, self.quiet = total, desc, quiet
        self.done, self.failed = 0, []
        self.t0 = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)
            except ImportError:
                self.bar = None

    def wrote(self, line: str) -> None:
        self.done += 1
        if not self.quiet:
            if self.bar is not None:
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)
        if self.bar is not None:
            self.bar.update(1)

    def skipped(self, path: Path, exc: Exception) -> None:
        self.failed.append(path)
        message = f"jaxcodec {self.desc}: skipped {path}: {exc}"
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
            self.bar.update(1)
        else:
            print(message, file=sys.stderr, flush=True)

    def finish(self, summary: str) -> int:
        """The summary line; exit status 1 when any file was skipped, else 0."""
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.t0
        rate = self.done / seconds if seconds > 0 else 0.0
        print(f"{summary}; {self.done} files in {seconds:.1f} s ({rate:.2f} images/s)")
        if self.failed:
            print(
                f"jaxcodec {self.desc}: {len(self.failed)} of {self.total} files skipped "
                f"(named above)",
                file=sys.stderr,
            )
            return 1
        return 0


def _batches(items: list, key, size: int):
    """`items` grouped by `key(item)` (first appearance order), in chunks of `size`."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    for members in groups.values():
        for i in range(0, len(members), size):
            yield members[i : i + size]


def compress_many(codec, jobs: list[tuple[Path, Path]], *, batch_size: int, quiet: bool) -> int:
    """Compresses every (source, destination) pair with one model: images of one padded size
    go through the codec `batch_size` at a time. An image that cannot be read is skipped with
    a message; the exit status is then 1."""
    from jaxcodec.data.images import image_size
    from jaxcodec.methods.base import padded_size

    jobs[0][1].parent.mkdir(parents=True, exist_ok=True)
    report = _Report(len(jobs), "compress", quiet)
    sized = []
    for src, dst in jobs:
        try:
            sized.append((src, dst, padded_size(image_size(src), codec.coder.stride)))
        except (OSError, ValueError) as exc:
            report.skipped(src, _reason(exc))
    total_bytes, total_pixels = 0, 0
    for chunk in _batches(sized, key=lambda job: job[2], size=batch_size):
        read = []
        for src, dst, _ in chunk:
            try:
                read.append((src, dst, read_image(src)))
            except (OSError, ValueError) as exc:
                report.skipped(src, _reason(exc))
        # Sizes came from the headers: group again by the decoded images' own sizes.
        stride = codec.coder.stride
        for part in _batches(
            read, key=lambda r: padded_size(r[2].shape[:2], stride), size=len(read)
        ):
            try:
                files = codec.compress_batch([image for _, _, image in part])
            except ValueError:  # an image the container refuses (too large): one at a time
                files = []
                for src, _, image in part:
                    try:
                        files.append(codec.compress(image))
                    except ValueError as exc:
                        report.skipped(src, exc)
                        files.append(None)
            for (_, dst, image), data in zip(part, files, strict=True):
                if data is None:
                    continue
                atomic_write(dst, lambda p, data=data: p.write_bytes(data))
                h, w = image.shape[:2]
                total_bytes, total_pixels = total_bytes + len(data), total_pixels + h * w
                report.wrote(f"{dst}: {len(data)} bytes, {8.0 * len(data) / (h * w):.4f} bpp")
    bpp = 8.0 * total_bytes / total_pixels if total_pixels else 0.0
    return report.finish(
        f"compressed to {jobs[0][1].parent}: {total_bytes:,} bytes, {bpp:.4f} bpp over all "
        f"pixels (model {codec.name} id {codec.model_id})"
    )


def decompress_many(codec, jobs: list[tuple[Path, Path]], *, batch_size: int, quiet: bool) -> int:
    """Decodes every (source, destination) pair with one model: files of one padded size and
    one set of options go through the codec `batch_size` at a time. A file that cannot be read
    or decoded is skipped with a message (and no output); the exit status is then 1."""
    import json

    from PIL import Image

    from jaxcodec.entropy.container import BitstreamError
    from jaxcodec.methods.base import padded_size

    jobs[0][1].parent.mkdir(parents=True, exist_ok=True)
    report = _Report(len(jobs), "decompress", quiet)
    parsed = []
    for src, dst in jobs:
        try:
            data = src.read_bytes()
            header = codec.read_header(data)
        except (OSError, BitstreamError) as exc:
            report.skipped(src, _reason(exc))
            continue
        hw = padded_size((header.height, header.width), codec.coder.stride)
        parsed.append((src, dst, data, (hw, json.dumps(header.options, sort_keys=True))))
    for chunk in _batches(parsed, key=lambda job: job[3], size=batch_size):
        try:
            images = codec.decompress_batch([data for _, _, data, _ in chunk])
        except BitstreamError:  # one of them is undecodable: one at a time, to name it
            images = []
            for src, _, data, _ in chunk:
                try:
                    images.append(codec.decompress(data))
                except BitstreamError as exc:
                    report.skipped(src, exc)
                    images.append(None)
        for (_, dst, _, _), image in zip(chunk, images, strict=True):
            if image is not None:
                atomic_write(dst, lambda p, im=image: Image.fromarray(im).save(p, format="PNG"))
                report.wrote(f"{dst}: {image.shape[1]}x{image.shape[0]}")
    return report.finish(f"decoded to {jobs[0][1].parent} (model {codec.name} id {codec.model_id})")


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


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


def _export_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the diffusers folder to write (replaced if it exists)")
    p.add_argument("--checkpoint", required=True, help="LDM stage-2 workdir or codec bundle")
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the final model)"
    )


@subcommand("export-backbone", _export_backbone_args)
def _export_backbone(args) -> int:
    """Writes an LDM backbone (configs/ldm.py) as the SD-shaped diffusers folder that
    `model.sd_path` of the SD-based methods takes."""
    from jaxcodec.methods.ldm import export_backbone

    path = export_backbone(args.checkpoint, args.output, step=args.step)
    print(f"{path}: diffusers folder (unet/, vae/, text condition) of {args.checkpoint}")
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
    from jaxcodec.sharding_report import add_report_arguments

    add_report_arguments(p)


@subcommand("shardings", _shardings_args)
def _shardings(args) -> int:
    """Every parameter's logical axes, mesh partitioning and bytes per device (from shapes)."""
    from jaxcodec.sharding_report import print_report

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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Paths after an option (`compress IN --checkpoint M OUT`) belong to the paths too.
    if extra and hasattr(args, "paths") and not any(e.startswith("-") for e in extra):
        args.paths += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (BitstreamError, CheckpointError, ValueError, FileNotFoundError) as exc:
        kind = "invalid bitstream" if isinstance(exc, BitstreamError) else "error"
        print(f"jaxcodec {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
