"""The `.jxc` container: one compressed image, self-describing and checked before decoding.

Layout (all integers unsigned LEB128 varints unless stated):

    magic        2 bytes  b"JX"
    byte         bits 7-5 format version, bit 4 options present, bits 3-0 number of streams - 1
    [rate]       2 bytes  (version 4 only) q's grid index of a rate-conditioned model, big endian
    [options]    varint of flags (bit i = option i of `OPTIONS` present), then the present
                 options in bit order
    model id     2 bytes  first bytes of the model hash (fast, clear "wrong checkpoint" error)
    height - 1, width - 1
    length of every stream but the last (the last one fills the file up to the checksum)
    streams
    checksum     4 bytes  CRC-32 (big endian) of the full 32-byte model hash + all bytes above

The checksum is seeded with the full model hash, so a file made with another checkpoint fails
it too. Options are registered here once, so a bit means the same setting for every method; a
method declares which of them its decoder needs (`BitstreamCoder.options`), and `unpack`
refuses a file that carries any other set. With two streams and no options a Kodak-size file
has 15 bytes of overhead.

The rate of a rate-conditioned model (`jaxcodec.nn.rate`) travels as the option ``rate`` like
any other decode setting, but in a fixed 2-byte field right after the first byte: such files are
written as version 4, every other file stays version 3 (byte for byte what earlier writers
made), and readers take both. Every failure is a `BitstreamError` with a one-line message; sizes
are bounded before anything is allocated.
"""

import dataclasses
import struct
import zlib
from collections.abc import Collection

import numpy as np

MAGIC = b"JX"
VERSION = 3  # 2: option flags became a varint, options for noise level and patch size;
# 3: entropy parameters from integer networks (int8 weights, int32 accumulation) on the device
RATE_VERSION = 4  # version 3 + the 2-byte rate field (files of rate-conditioned models)
VERSIONS = (VERSION, RATE_VERSION)
RATE_OPTION = "rate"  # q's grid index: the option name methods and codecs use
RATE_MAX = (1 << 16) - 1
MODEL_ID_BYTES = 2
CHECKSUM_BYTES = 4
MAX_SIDE = 1 << 16  # pixels per side
MAX_PIXELS = 1 << 28
MAX_STREAMS = 16
MAX_FILE_BYTES = 1 << 31
_MAX_OPTION = 1 << 32

# Optional settings the decoder must repeat, in bit order. Codecs: "u" varint, "f16" float16.
# Never reorder: append new options at the end.
OPTIONS: tuple[tuple[str, str], ...] = (
    ("steps", "u"),  # sampler steps
    ("guidance", "f16"),  # λ_s
    ("start_step", "u"),  # relay / start timestep
    ("seed", "u"),  # of a stochastic decoder: the same file decodes to the same pixels
    ("rate_index", "u"),  # a rate point of a variable-rate model
    ("noise_level", "f16"),  # rate-adaptive noise strength (DiffO)
    ("patch", "u"),  # patch size of a patch-wise decoder (HFD)
)
OPTION_KINDS = dict(OPTIONS) | {RATE_OPTION: "u16"}


class BitstreamError(ValueError):
    """The file is not a valid `.jxc` for this codec: truncated, corrupted, foreign, oversized
    or made with another model. The message is one line."""


@dataclasses.dataclass(frozen=True)
class Header:
    height: int
    width: int
    model_id: bytes  # MODEL_ID_BYTES
    options: dict = dataclasses.field(default_factory=dict)


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, end: int):
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise BitstreamError("truncated file (header runs past the end)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, max_value: int) -> int:
        value, shift = 0, 0
        for _ in range(10):
            (b,) = self.take(1)
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if value > max_value:
                    raise BitstreamError(f"header field {value} exceeds its bound {max_value}")
                if b == 0 and shift > 7:
                    raise BitstreamError("non-canonical varint in header")
                return value
        raise BitstreamError("overlong varint in header")


def _checksum(model_hash: bytes, body: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(body, zlib.crc32(model_hash)) & 0xFFFFFFFF)


def pack(header: Header, streams: list[bytes], model_hash: bytes) -> bytes:
    """Serialises a header and its streams (the encoder side)."""
    if not 1 <= len(streams) <= MAX_STREAMS:
        raise ValueError(f"between 1 and {MAX_STREAMS} streams, got {len(streams)}")
    if not (1 <= header.height <= MAX_SIDE and 1 <= header.width <= MAX_SIDE):
        raise ValueError(f"image size {header.height}x{header.width} out of range")
    if header.height * header.width > MAX_PIXELS:
        raise ValueError("image too large for the container")
    unknown = set(header.options) - set(OPTION_KINDS)
    if unknown:
        raise ValueError(f"unknown container options {sorted(unknown)}")
    out = bytearray(MAGIC)
    rate = header.options.get(RATE_OPTION)
    has_options = bool(set(header.options) - {RATE_OPTION})
    version = VERSION if rate is None else RATE_VERSION
    out.append((version << 5) | (int(has_options) << 4) | (len(streams) - 1))
    if rate is not None:
        out += struct.pack(">H", option_value(rate, RATE_OPTION))
    if has_options:
        flags = 0
        payload = bytearray()
        for bit, (name, kind) in enumerate(OPTIONS):
            if name in header.options:
                flags |= 1 << bit
                payload += _encode_option(option_value(header.options[name], name), kind)
        out += _varint(flags)
        out += payload
    out += model_hash[:MODEL_ID_BYTES]
    out += _varint(header.height - 1) + _varint(header.width - 1)
    for s in streams[:-1]:
        out += _varint(len(s))
    for s in streams:
        out += s
    out += _checksum(model_hash, bytes(out))
    return bytes(out)


def _encode_option(value, kind: str) -> bytes:
    if kind == "u":
        return _varint(int(value))
    return np.array([value], ">f2").tobytes()


def option_value(value, name: str):
    """The value of an option as the decoder will read it (encoders use this too)."""
    if name not in OPTION_KINDS:
        raise ValueError(f"unknown container option {name!r}; known: {sorted(OPTION_KINDS)}")
    if OPTION_KINDS[name] in ("u", "u16"):
        top = _MAX_OPTION if OPTION_KINDS[name] == "u" else RATE_MAX
        if int(value) != value or not 0 <= int(value) <= top:
            raise ValueError(f"option {name} must be an integer in [0, {top}], got {value}")
        return int(value)
    v = float(np.float16(value))
    if not np.isfinite(v):
        raise ValueError(f"option {name}={value} is not finite in float16")
    return v


def unpack(
    data: bytes,
    model_hash: bytes,
    *,
    num_streams: int | None = None,
    options: Collection[str] | None = None,
    max_pixels: int | None = None,
) -> tuple[Header, list[bytes]]:
    """Parses and validates a file; raises BitstreamError on anything unexpected.

    `options`: the option names the decoder needs; a file carrying any other set is refused.
    `max_pixels`: the decoder's budget; a larger declared image is refused before decoding.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BitstreamError("expected bytes")
    data = bytes(data)
    if len(data) > MAX_FILE_BYTES:
        raise BitstreamError("file too large")
    if len(data) < len(MAGIC) + 1 + MODEL_ID_BYTES + 2 + CHECKSUM_BYTES:
        raise BitstreamError("truncated file (shorter than the smallest header)")
    if data[:2] != MAGIC:
        raise BitstreamError("not a .jxc file (bad magic bytes)")
    end = len(data) - CHECKSUM_BYTES
    r = _Reader(data, end)
    r.take(2)
    (first,) = r.take(1)
    version = first >> 5
    if version not in VERSIONS:
        readable = ", ".join(map(str, VERSIONS))
        raise BitstreamError(f"unsupported .jxc format version {version} (this reader: {readable})")
    n_streams = (first & 0x0F) + 1
    found = {}
    if version == RATE_VERSION:
        (found[RATE_OPTION],) = struct.unpack(">H", r.take(2))
    if first & 0x10:
        flags = r.varint(1 << 62)
        if flags >> len(OPTIONS) or not flags:
            raise BitstreamError("unknown option flags in header")
        for bit, (name, kind) in enumerate(OPTIONS):
            if flags & (1 << bit):
                if kind == "u":
                    found[name] = r.varint(_MAX_OPTION)
                else:
                    v = float(np.frombuffer(r.take(2), ">f2")[0])
                    if not np.isfinite(v):
                        raise BitstreamError(f"non-finite option {name}")
                    found[name] = v
    model_id = r.take(MODEL_ID_BYTES)
    height = r.varint(MAX_SIDE - 1) + 1
    width = r.varint(MAX_SIDE - 1) + 1
    if height * width > MAX_PIXELS:
        raise BitstreamError(f"declared image size {height}x{width} exceeds {MAX_PIXELS} pixels")
    lengths = [r.varint(end) for _ in range(n_streams - 1)]
    rest = end - r.pos - sum(lengths)
    if rest < 0:
        raise BitstreamError("truncated file (streams shorter than declared)")
    if data[end:] != _checksum(model_hash, data[:end]):
        if model_id != model_hash[:MODEL_ID_BYTES]:
            raise BitstreamError(
                f"file was made with another model (id {model_id.hex()}, "
                f"checkpoint has {model_hash[:MODEL_ID_BYTES].hex()})"
            )
        raise BitstreamError("checksum mismatch: the file is corrupted or truncated")
    if max_pixels is not None and height * width > max_pixels:
        raise BitstreamError(
            f"declared image size {width}x{height} ({height * width:,} pixels) exceeds this "
            f"decoder's budget of {max_pixels:,} pixels (raise it with --max-pixels)"
        )
    if num_streams is not None and n_streams != num_streams:
        raise BitstreamError(f"file has {n_streams} streams, this codec expects {num_streams}")
    if options is not None and set(found) != set(options):
        unknown, missing = sorted(set(found) - set(options)), sorted(set(options) - set(found))
        raise BitstreamError(
            "header options do not match this decoder"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    streams = []
    for n in [*lengths, rest]:
        streams.append(r.take(n))
    return Header(height, width, model_id, found), streams
