"""Range coding with integer tables: exact round trips, escapes, and rate close to −log2 p."""

import numpy as np
import pytest

from jaxcodec.entropy import coder, tables


@pytest.fixture(scope="module")
def gauss():
    return tables.gaussian_tables()


def _roundtrip(t, values, idx):
    enc = coder.new_encoder()
    coder.TableCoder(t).encode(enc, values, idx)
    data = coder.finish(enc)
    out = coder.TableCoder(t).decode(coder.new_decoder(data), idx)
    return data, out


def test_roundtrip_is_exact_and_rate_matches_the_tables(gauss):
    rng = np.random.default_rng(0)
    n = 60_000
    idx = rng.integers(0, 40, n)
    values = np.round(rng.normal(size=n) * gauss["scales"][idx]).astype(np.int64)
    data, out = _roundtrip(gauss, values, idx)
    np.testing.assert_array_equal(out, values)
    ideal = tables.table_bits(gauss, values, idx)
    assert ideal / 8 <= len(data) <= ideal / 8 * 1.005 + 8


def test_escape_codes_any_integer(gauss):
    idx = np.array([0, 0, 5, 63, 63, 0, 10])
    values = np.array([0, 10**6, -(2**39), 2**39, -5000, -1, 7])
    data, out = _roundtrip(gauss, values, idx)
    np.testing.assert_array_equal(out, values)
    with pytest.raises(ValueError, match="too large"):
        _roundtrip(gauss, np.array([2**42]), np.array([0]))


def test_factorized_style_tables_with_offsets():
    pmf = np.array([[0.1, 0.2, 0.4, 0.2, 0.1], [0.5, 0.5, 0, 0, 0]])
    t = {
        "freqs": np.stack(
            [
                tables.pmf_to_freqs(pmf[0], 1e-3),
                np.r_[tables.pmf_to_freqs(pmf[1, :2], 1e-3), [0, 0, 0]],
            ]
        ),
        "lengths": np.array([5, 2]),
        "offsets": np.array([-2, 0]),
    }
    values = np.array([[-2, 0], [2, 1], [3, -1], [0, 5]])
    idx = np.broadcast_to(np.arange(2), values.shape)
    _, out = _roundtrip(t, values, idx)
    np.testing.assert_array_equal(out.reshape(values.shape), values)


def test_empty_and_uniform_fixed_length():
    enc = coder.new_encoder()
    coder.uniform_encode(enc, np.array([0, 16383, 77, 12345]), 14)
    data = coder.finish(enc)
    assert len(data) <= 8  # 56 bits of payload, at most one extra word
    np.testing.assert_array_equal(
        coder.uniform_decode(coder.new_decoder(data), 4, 14), [0, 16383, 77, 12345]
    )
    with pytest.raises(ValueError):
        coder.uniform_encode(coder.new_encoder(), np.array([16384]), 14)


def test_invalid_tables_and_indices_are_refused(gauss):
    bad = dict(gauss, freqs=gauss["freqs"].copy())
    bad["freqs"][3, 0] = 0
    with pytest.raises(ValueError):
        coder.TableCoder(bad)
    with pytest.raises(ValueError):
        coder.TableCoder(gauss).encode(coder.new_encoder(), np.zeros(2), np.array([0, 64]))


def test_trailing_zero_bytes_are_restored():
    words = np.array([0x01020304, 0x05000000], np.uint32)
    data = coder.words_to_bytes(words)
    assert data == bytes([1, 2, 3, 4, 5])
    np.testing.assert_array_equal(coder.bytes_to_words(data), words)
