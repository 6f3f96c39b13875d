"""Range coding of integer symbols with table-based categorical models (constriction).

Symbols are grouped by table index and each group is coded with one prebuilt
`Categorical` model, so the per-symbol cost is the coder's, not Python's. Values outside a
table's range are coded as the escape symbol followed by an Exp-Golomb-style payload (bit
count, then the bits in 16-bit chunks, all with uniform models) after the group. The order of
operations is a pure function of the table indices, which the decoder knows before decoding.
"""

import time

import constriction
import numpy as np

from jaxcodec.entropy.tables import PRECISION

# constriction is a compiled module whose submodules are attributes, not importable paths.
Categorical = constriction.stream.model.Categorical
Uniform = constriction.stream.model.Uniform
RangeEncoder = constriction.stream.queue.RangeEncoder
RangeDecoder = constriction.stream.queue.RangeDecoder

_NBITS_MODEL_SIZE = 64  # the bit count is coded with 6 bits...
MAX_ESCAPE_BITS = 40  # ...but escaped values stay below 2**40 (latents never come close)
_CHUNK = 16


class CodingError(ValueError):
    """The compressed data does not decode (raised on garbage input)."""


def words_to_bytes(words: np.ndarray) -> bytes:
    """Big-endian words with trailing zero bytes stripped (the decoder pads them back)."""
    return np.asarray(words, np.uint32).astype(">u4").tobytes().rstrip(b"\x00")


def bytes_to_words(data: bytes) -> np.ndarray:
    pad = (-len(data)) % 4
    return np.frombuffer(bytes(data) + b"\x00" * pad, ">u4").astype(np.uint32)


def _groups(idx: np.ndarray, num_tables: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions sorted by table (stable, so in raster order within a table) and the bounds of
    each table's run."""
    # numpy's stable sort is a radix sort for ≤16-bit integers: ~10x faster than for int64.
    small = np.uint8 if num_tables <= 256 else np.uint16 if num_tables <= 65536 else np.int64
    order = np.argsort(idx.astype(small), kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=num_tables))])
    return order, bounds


class TableCoder:
    """Codes integer values with a fixed set of integer CDF tables (see `tables.py`)."""

    def __init__(self, tables: dict[str, np.ndarray]):
        self.freqs = np.asarray(tables["freqs"], np.int64)
        self.lengths = np.asarray(tables["lengths"], np.int64)
        self.offsets = np.asarray(tables["offsets"], np.int64)
        self.num_tables = len(self.lengths)
        total = 1 << PRECISION
        self.models = []
        for i in range(self.num_tables):
            f = self.freqs[i, : self.lengths[i] + 1]
            if f.min() < 1 or f.sum() != total:
                raise ValueError(f"table {i} is not a valid {PRECISION}-bit frequency table")
            # f / 2**16 is exact in float64, so both sides build bit-identical models.
            self.models.append(Categorical(f.astype(np.float64) / total, perfect=False))
        self.seconds = 0.0  # time spent coding, for benchmarks and timing breakdowns
        self._nbits_model = Uniform(_NBITS_MODEL_SIZE)
        self._chunk_model = Uniform(1 << _CHUNK)

    def _check_idx(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tables):
            raise ValueError("table index out of range")
        return idx

    def encode(self, encoder: RangeEncoder, values: np.ndarray, idx: np.ndarray) -> None:
        """Appends the integer `values` (any shape) coded with tables `idx` (same size)."""
        values = np.asarray(values, np.int64).ravel()
        idx = self._check_idx(idx)
        if values.shape != idx.shape:
            raise ValueError(f"{values.size} values but {idx.size} table indices")
        t0 = time.perf_counter()
        order, bounds = _groups(idx, self.num_tables)
        sorted_idx = idx[order]
        s = values[order] - self.offsets[sorted_idx]  # contiguous per table from here on
        n = self.lengths[sorted_idx]
        escaped = (s < 0) | (s >= n)
        symbols = np.where(escaped, n, s).astype(np.int32)
        any_escape = bool(escaped.any())
        for t in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[t], bounds[t + 1]
            encoder.encode(symbols[lo:hi], self.models[t])
            if any_escape and escaped[lo:hi].any():
                e = s[lo:hi][escaped[lo:hi]]
                # Fold both overflow directions onto u ≥ 0: below → odd, above → even.
                u = np.where(e < 0, 2 * (-e - 1) + 1, 2 * (e - self.lengths[t]))
                self._encode_payload(encoder, u)
        self.seconds += time.perf_counter() - t0

    def decode(self, decoder: RangeDecoder, idx: np.ndarray) -> np.ndarray:
        """Decodes values for tables `idx` (flat), in the order `encode` wrote them."""
        idx = self._check_idx(idx)
        out = np.empty(idx.shape, np.int64)
        t0 = time.perf_counter()
        order, bounds = _groups(idx, self.num_tables)
        s = np.empty(idx.shape, np.int64)
        for t in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[t], bounds[t + 1]
            try:
                s[lo:hi] = decoder.decode(self.models[t], int(hi - lo))
            except Exception as exc:  # constriction raises on exhausted/invalid data
                raise CodingError(f"range decoder failed: {exc}") from None
            n = self.lengths[t]
            escaped = s[lo:hi] == n
            if escaped.any():
                u = self._decode_payload(decoder, int(escaped.sum()))
                below = (u & 1) == 1
                s[lo:hi][escaped] = np.where(below, -(u >> 1) - 1, n + (u >> 1))
        out[order] = s + self.offsets[idx[order]]
        self.seconds += time.perf_counter() - t0
        return out

    def _encode_payload(self, encoder: RangeEncoder, u: np.ndarray) -> None:
        for value in u.tolist():
            v = value + 1
            nbits = v.bit_length() - 1
            if nbits > MAX_ESCAPE_BITS:
                raise ValueError(f"escape value {value} too large to code")
            encoder.encode(nbits, self._nbits_model)
            rest = v - (1 << nbits)
            for shift in range(0, nbits, _CHUNK):
                encoder.encode((rest >> shift) & ((1 << _CHUNK) - 1), self._chunk_model)

    def _decode_payload(self, decoder: RangeDecoder, count: int) -> np.ndarray:
        out = []
        try:
            for _ in range(count):
                nbits = int(decoder.decode(self._nbits_model))
                if nbits > MAX_ESCAPE_BITS:
                    raise CodingError("escape value out of range")
                rest = 0
                for shift in range(0, nbits, _CHUNK):
                    rest |= int(decoder.decode(self._chunk_model)) << shift
                out.append((1 << nbits) + rest - 1)
        except CodingError:
            raise
        except Exception as exc:
            raise CodingError(f"range decoder failed: {exc}") from None
        return np.array(out, np.int64)


def uniform_encode(encoder: RangeEncoder, values: np.ndarray, bits: int) -> None:
    """Fixed-length integers (e.g. VQ indices at 14 bits): exactly `bits` bits each."""
    values = np.asarray(values, np.int64).ravel()
    if values.size and (values.min() < 0 or values.max() >= (1 << bits)):
        raise ValueError(f"values do not fit {bits} bits")
    if bits > 24:
        raise ValueError("uniform coding supports at most 24 bits per value")
    encoder.encode(values.astype(np.int32), Uniform(1 << bits))


def uniform_decode(decoder: RangeDecoder, count: int, bits: int) -> np.ndarray:
    try:
        return np.asarray(decoder.decode(Uniform(1 << bits), count), np.int64)
    except Exception as exc:
        raise CodingError(f"range decoder failed: {exc}") from None


def new_encoder() -> RangeEncoder:
    return RangeEncoder()


def finish(encoder: RangeEncoder) -> bytes:
    return words_to_bytes(encoder.get_compressed())


def new_decoder(data: bytes) -> RangeDecoder:
    return RangeDecoder(bytes_to_words(data))


_CACHE: dict[int, tuple[np.ndarray, TableCoder]] = {}


def cached_coder(tables: dict[str, np.ndarray]) -> TableCoder:
    """One TableCoder per table set (models are built once per loaded checkpoint)."""
    key = id(tables["freqs"])
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not tables["freqs"]:
        if len(_CACHE) >= 32:
            _CACHE.clear()
        hit = (tables["freqs"], TableCoder(tables))  # holding the array keeps its id unique
        _CACHE[key] = hit
    return hit[1]
