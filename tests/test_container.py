"""The .jxc container: round trip, overhead, and one documented error for every bad file."""

import numpy as np
import pytest

from jaxcodec.entropy import container
from jaxcodec.entropy.container import BitstreamError, Header

HASH = bytes(range(32))


def _file(options=None, streams=(b"\x01" * 200, b"\x02" * 5000), h=512, w=768):
    header = Header(h, w, HASH[:2], options or {})
    return container.pack(header, list(streams), HASH)


def test_roundtrip_and_fixed_overhead():
    streams = [b"\x01" * 200, b"\x02" * 5000]
    data = _file(streams=streams)
    assert len(data) - sum(map(len, streams)) <= 16  # Kodak size, two streams, no options
    header, out = container.unpack(data, HASH, num_streams=2)
    assert (header.height, header.width, header.options) == (512, 768, {})
    assert out == streams


def test_options_roundtrip():
    opts = {"steps": 5, "guidance": container.option_value(1.25, "guidance"), "start_step": 299}
    header, out = container.unpack(_file(opts), HASH)
    assert header.options == opts
    with pytest.raises(ValueError):
        container.pack(Header(4, 4, HASH[:2], {"bogus": 1}), [b""], HASH)


def test_empty_streams_and_single_stream():
    data = container.pack(Header(1, 1, HASH[:2]), [b""], HASH)
    assert container.unpack(data, HASH)[1] == [b""]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d[:-1], "checksum"),
        (lambda d: d[:10], "truncated|checksum"),
        (lambda d: d[:3], "truncated"),
        (lambda d: d + b"\x00", "checksum"),
        (lambda d: b"PK" + d[2:], "magic"),
        (lambda d: d[:2] + bytes([d[2] ^ 0x80]) + d[3:], "version"),
        (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum"),
    ],
)
def test_bad_files_raise_one_error(mutate, message):
    with pytest.raises(BitstreamError, match=message):
        container.unpack(mutate(_file()), HASH)


def test_other_model_is_named_in_the_error():
    other = bytes([0xAA]) * 32
    with pytest.raises(BitstreamError, match="another model"):
        container.unpack(_file(), other)


def test_declared_sizes_are_bounded_before_allocation():
    # A header claiming a 65536 x 65536 image (beyond MAX_PIXELS) with a valid checksum.
    header = bytearray(b"JX" + bytes([container.VERSION << 5 | 1]) + HASH[:2])
    header += bytes([0xFF, 0xFF, 0x03]) * 2 + bytes([1])
    body = bytes(header) + b"\x00\x00"
    data = body + container._checksum(HASH, body)
    with pytest.raises(BitstreamError, match="exceeds"):
        container.unpack(data, HASH)
    # Stream lengths larger than the file.
    header = bytearray(b"JX" + bytes([container.VERSION << 5 | 1]) + HASH[:2] + b"\x07\x07")
    header += bytes([0xFF, 0x7F])
    body = bytes(header) + b"\x00" * 10
    with pytest.raises(BitstreamError, match="exceeds|truncated"):
        container.unpack(body + container._checksum(HASH, body), HASH)


def test_varint_canonical():
    for n in [0, 1, 127, 128, 300, 2**20]:
        r = container._Reader(container._varint(n), len(container._varint(n)))
        assert r.varint(2**32) == n
    r = container._Reader(b"\x80\x00", 2)
    with pytest.raises(BitstreamError):
        r.varint(2**32)


def test_random_bytes_never_parse():
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = rng.integers(0, 256, rng.integers(0, 64)).astype(np.uint8).tobytes()
        with pytest.raises(BitstreamError):
            container.unpack(b"JX" + data, HASH)
