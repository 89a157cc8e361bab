"""Entropy coding of cache streams against per-shard frequency models, with `constriction`'s ANS
coder (a well-kept Rust coder; hand-writing rANS would be the alternative): `IdModel` for token
ids, `RankModel` for the logprob level deltas of top-k entries (one small model per rank).

Ids are most of a cache's bytes: stored as they are they cost ⌈log2 V⌉ bits each (16 at
V = 49,152), but the ids a proxy ranks highly follow a steep, shard-stable frequency law
(punctuation, common words), so coded against the shard's own unigram counts they cost about
their entropy. The model is the sorted list of the distinct ids of the shard and their counts
(quantised to half-octaves, which costs < 0.5% in rate and halves the table); it travels in the
shard's Parquet metadata, so a lone shard still decodes. Each row is one independent ANS
message (uint32 words), so rows decode in any order.

Level deltas depend strongly on the rank (rank 0 holds the top-1's absolute level, later ranks
small steps), so they are coded with one model per rank: ~25% fewer bytes than zstd on their
byte planes at k = 20, and small alphabets decode fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zstandard
from constriction import stream

from pkd.errors import CodecError

_COUNT_STEPS = 2  # quantised count = round(2·log2 count): half-octave levels, one byte each
_ZSTD_LEVEL = 19  # the table is small: spend time on it once per shard


def _planes(values: np.ndarray) -> bytes:
    """uint32 values as four byte planes (low bytes first): zstd sees each plane's statistics."""
    return np.ascontiguousarray(values.astype("<u4").view(np.uint8).reshape(-1, 4).T).tobytes()


def _unplanes(data: bytes, n: int) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(4, n).T.copy().view("<u4").reshape(-1)


def join_tables(*tables: bytes) -> bytes:
    """Several side tables in one footer value: each prefixed by its uint32 length."""
    return b"".join(np.uint32(len(t)).tobytes() + t for t in tables)


def split_tables(side: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(side):
        size = int(np.frombuffer(side[at : at + 4], "<u4")[0]) if len(side) >= at + 4 else -1
        if size < 0 or at + 4 + size > len(side):
            raise CodecError("codec: corrupt side tables in the shard footer")
        out.append(side[at + 4 : at + 4 + size])
        at += 4 + size
    return out


@dataclass(frozen=True)
class IdModel:
    """A shard's id frequencies: the alphabet of the ANS coder is the shard's distinct ids."""

    ids: np.ndarray  # (S,) int32, sorted, distinct
    levels: np.ndarray  # (S,) uint8, round(2·log2 count)

    @classmethod
    def fit(cls, ids: np.ndarray) -> IdModel:
        symbols, counts = np.unique(np.asarray(ids).reshape(-1), return_counts=True)
        levels = np.round(_COUNT_STEPS * np.log2(counts)).astype(np.uint8)
        return cls(symbols.astype(np.int32), levels)

    @property
    def _model(self) -> stream.model.Categorical:
        return _categorical(self.levels.tobytes())

    def to_bytes(self) -> bytes:
        """S (uint32), then zstd of: id gaps as byte planes, then the count levels."""
        gaps = np.diff(self.ids, prepend=0).astype(np.uint32)
        body = _planes(gaps) + self.levels.tobytes()
        return np.uint32(len(self.ids)).tobytes() + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> IdModel:
        try:
            n = int(np.frombuffer(data[:4], "<u4")[0])
            body = zstandard.ZstdDecompressor().decompress(data[4:], max_output_size=5 * n)
            if len(body) != 5 * n:
                raise ValueError(f"table holds {len(body)} bytes, expected {5 * n}")
        except (ValueError, IndexError, zstandard.ZstdError) as e:
            raise CodecError(f"id model: corrupt frequency table ({e})") from None
        ids = np.cumsum(_unplanes(body[: 4 * n], n), dtype=np.int64)
        return cls(ids.astype(np.int32), np.frombuffer(body[4 * n :], np.uint8).copy())

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids, all in the model -> uint32 words of one ANS message."""
        ids = np.asarray(ids).reshape(-1)
        symbols = np.searchsorted(self.ids, ids).astype(np.int32)  # (n,) alphabet indices
        if len(ids) and (symbols.max() >= len(self.ids) or not np.array_equal(self.ids[symbols], ids)):
            raise CodecError("id model: an id to encode is not in the shard's frequency table")
        coder = stream.stack.AnsCoder()
        if len(ids):
            coder.encode_reverse(symbols, self._model)
        return coder.get_compressed()

    def decode(self, words: np.ndarray, n: int) -> np.ndarray:
        """uint32 words of one ANS message -> (n,) int32 ids."""
        if not n:
            return np.zeros(0, np.int32)
        try:
            coder = stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
            symbols = coder.decode(self._model, n)  # (n,) alphabet indices
        except (ValueError, RuntimeError, AssertionError) as e:  # what constriction raises on bad words
            raise CodecError(f"id model: corrupt id stream ({e})") from None
        if not coder.is_empty():  # a message decodes to exactly its symbols, no words left over
            raise CodecError("id model: corrupt id stream (words left after decoding)")
        return self.ids[symbols]


_MODELS: dict[bytes, stream.model.Categorical] = {}


def _categorical(levels: bytes) -> stream.model.Categorical:
    """The ANS model of a table, built once per shard (a few per process in use)."""
    model = _MODELS.get(levels)
    if model is None:
        if levels[:1] == b"r":  # a RankModel or CopyIdModel table: 0 marks a symbol that never occurs
            q = np.frombuffer(levels[1:], np.uint8).astype(np.float64)
            probs = np.where(q > 0, np.exp2((q - 1) / _COUNT_STEPS), 0.0)
            if not probs.any():  # the table of a shard without tokens: nothing is coded with it
                probs = np.ones_like(probs)
        else:
            probs = np.exp2(np.frombuffer(levels, np.uint8) / _COUNT_STEPS)  # (S,) unnormalised
        if len(probs) < 2:  # constriction needs two symbols at least: add one that never occurs
            probs = np.append(probs, 0.0)
        model = stream.model.Categorical(probs, perfect=False)
        if len(_MODELS) >= 256:  # a shard's id table and its k rank tables, a few shards
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[levels] = model
    return model


@dataclass(frozen=True)
class RankModel:
    """Per-rank frequencies of small non-negative symbols (level deltas), for (n, k) arrays."""

    levels: tuple[np.ndarray, ...]  # k × (L_r,) uint8: 0 = absent, else 1 + round(2·log2 count)

    @classmethod
    def fit(cls, symbols: np.ndarray) -> RankModel:
        """(n, k) symbols (n ≥ 1) -> one frequency table per column."""
        tables = []
        for column in np.asarray(symbols).T:
            tables.append(_absent_or_level(np.bincount(column.astype(np.int64))))
        return cls(tuple(tables))

    def to_bytes(self) -> bytes:
        sizes = np.array([len(t) for t in self.levels], dtype="<u2")
        body = sizes.tobytes() + b"".join(t.tobytes() for t in self.levels)
        return np.uint32(len(self.levels)).tobytes() + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> RankModel:
        try:
            k = int(np.frombuffer(data[:4], "<u4")[0])
            body = zstandard.ZstdDecompressor().decompress(data[4:], max_output_size=2 * k + k * 65536)
            sizes = np.frombuffer(body[: 2 * k], "<u2").astype(np.int64)
            if len(sizes) != k or len(body) != 2 * k + sizes.sum():
                raise ValueError("table sizes do not add up")
        except (ValueError, IndexError, zstandard.ZstdError) as e:
            raise CodecError(f"rank model: corrupt frequency table ({e})") from None
        ends = 2 * k + np.cumsum(sizes)
        return cls(tuple(np.frombuffer(body[e - n : e], np.uint8).copy() for e, n in zip(ends, sizes)))

    @cached_property
    def _models(self) -> list[stream.model.Categorical]:
        return [_categorical(b"r" + t.tobytes()) for t in self.levels]

    def push(self, coder: stream.stack.AnsCoder, symbols: np.ndarray) -> None:
        """Put (n, k) symbols on `coder` so that `pull` takes them off first, column by column."""
        symbols = np.asarray(symbols, dtype=np.int32)
        if symbols.size:
            models = self._models
            for r in reversed(range(symbols.shape[1])):  # a stack: the last column goes in first
                coder.encode_reverse(np.ascontiguousarray(symbols[:, r]), models[r])

    def pull(self, coder: stream.stack.AnsCoder, n: int) -> np.ndarray:
        """Take (n, k) int32 symbols off `coder` (constriction's errors pass through)."""
        out = np.empty((len(self.levels), n), np.int32)
        if n:
            for r, model in enumerate(self._models):
                out[r] = coder.decode(model, n)
        return out.T

    def encode(self, symbols: np.ndarray) -> np.ndarray:
        """(n, k) symbols -> uint32 words of one ANS message, column by column."""
        coder = stream.stack.AnsCoder()
        self.push(coder, symbols)
        return coder.get_compressed()

    def decode(self, words: np.ndarray, n: int) -> np.ndarray:
        """uint32 words of one message -> (n, k) int32 symbols."""
        if not n:
            return np.empty((n, len(self.levels)), np.int32)
        try:
            coder = stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
            out = self.pull(coder, n)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise CodecError(f"rank model: corrupt level stream ({e})") from None
        if not coder.is_empty():
            raise CodecError("rank model: corrupt level stream (words left after decoding)")
        return out


def _absent_or_level(counts: np.ndarray) -> np.ndarray:
    """Counts -> the "r" table convention: 0 = never occurs, else 1 + round(2·log2 count)."""
    return np.where(counts > 0, 1 + np.round(_COUNT_STEPS * np.log2(np.maximum(counts, 1))), 0).astype(np.uint8)


@dataclass(frozen=True)
class CopyIdModel:
    """A shard's id alphabet for codec topk v3: `copies` symbols "the id of entry j of the
    previous position", then the shard's literal ids seen at least twice, then one escape
    symbol for ids seen once (their raw id follows, uniform over the vocabulary).

    Why the escape: an id seen once costs ~log2(shard ids) bits in the stream plus its table
    entry; coded raw it costs log2(V) and no entry, ~0.2 B/token less at k = 20 on
    bench/codec.py's data (4.7k of its 11.4k distinct ids are seen once)."""

    copies: int
    ids: np.ndarray  # (S,) int32, sorted, distinct: the literal ids
    levels: np.ndarray  # (copies + S + 1,) uint8, the "r" convention (0 = absent)

    @property
    def escape(self) -> int:
        return self.copies + len(self.ids)

    @classmethod
    def fit(cls, copies: int, symbols: np.ndarray, literals: np.ndarray) -> CopyIdModel:
        """`symbols` (n,) in [0, copies) for copies, −1 for literals; `literals` the literal
        ids in stream order (one per −1)."""
        ids, counts = np.unique(literals, return_counts=True)
        kept = counts > 1
        copy_counts = np.bincount(symbols[symbols >= 0], minlength=copies)
        all_counts = np.concatenate([copy_counts, counts[kept], [np.count_nonzero(~kept)]])
        return cls(copies, ids[kept].astype(np.int32), _absent_or_level(all_counts))

    def symbols(self, symbols: np.ndarray, literals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ANS alphabet indices of `fit`'s input, and the escaped raw ids in stream order."""
        at = np.minimum(np.searchsorted(self.ids, literals), max(len(self.ids) - 1, 0))
        known = self.ids[at] == literals if len(self.ids) else np.zeros(len(literals), bool)
        out = symbols.astype(np.int32)  # a copy
        out[out < 0] = np.where(known, self.copies + at, self.escape)
        return out, literals[~known].astype(np.int32)

    @property
    def model(self) -> stream.model.Categorical:
        return _categorical(b"r" + self.levels.tobytes())

    def to_bytes(self) -> bytes:
        """copies and S (uint32 each), then zstd of: literal id gaps as byte planes, then the levels."""
        gaps = np.diff(self.ids, prepend=0).astype(np.uint32)
        body = _planes(gaps) + self.levels.tobytes()
        head = np.array([self.copies, len(self.ids)], "<u4").tobytes()
        return head + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> CopyIdModel:
        try:
            copies, n = (int(x) for x in np.frombuffer(data[:8], "<u4"))
            size = 4 * n + copies + n + 1
            body = zstandard.ZstdDecompressor().decompress(data[8:], max_output_size=size)
            if len(body) != size:
                raise ValueError(f"table holds {len(body)} bytes, expected {size}")
        except (ValueError, IndexError, zstandard.ZstdError) as e:
            raise CodecError(f"id model: corrupt frequency table ({e})") from None
        ids = np.cumsum(_unplanes(body[: 4 * n], n), dtype=np.int64)
        return cls(copies, ids.astype(np.int32), np.frombuffer(body[4 * n :], np.uint8).copy())
