"""The logit-cache codecs of format v2: ids entropy-coded against the shard's own frequencies
(pkd.cache.entropy), logprob levels and tails quantised as in codec v1 (pkd.cache.codec).

- `topk` v2 (`TopkAnsCodec`): the proxy's top-k per position, v1's quantisation, with the ids
  ANS-coded against the shard's id table and the level deltas against per-rank tables (both
  tables in the shard's footer), one message per row in each column.
- `topk` v3 (`TopkCopyCodec`, pkd.cache.topk3, written by default): v2's coding with ids that
  copy the previous position's, levels anchored below the top-1, one ANS message per row.
- `sampled` v1 (`SampledCodec`): N draws per position from the proxy's full distribution
  (RS-KD, Anshumann et al. 2025), stored as the distinct ids, their counts and the proxy's
  logprob of each. Entries of a position are sorted by descending logprob, so the level deltas
  are small as in top-k. Decoded as (T, N) arrays padded with count 0.

All share one interface with v1 (`kind`, `k`, `spec`, `columns`, `parquet_encodings`,
`encode_rows`, `decode_rows`); `codec_from_spec` picks the class a manifest names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from pkd.cache.codec import TopkCodec, _nearest, spec_params
from pkd.cache.entropy import IdModel, RankModel, join_tables, split_tables
from pkd.cache.topk3 import TopkCopyCodec
from pkd.errors import CodecError

Columns = dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (flat values, (S+1,) row offsets)
MAX_SAMPLES = 255  # draws per position: counts are one byte


def _row_offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (S+1,)


def _code_rows(model: IdModel, ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids cut into rows at `offsets` -> one ANS message per row, concatenated."""
    messages = [model.encode(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    words = np.concatenate(messages) if messages else np.zeros(0, np.uint32)
    return words, _row_offsets(np.array([len(m) for m in messages], dtype=np.int64))


def _decode_rows(model: IdModel, words: np.ndarray, word_offsets: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    out = np.empty(int(offsets[-1]), np.int32)
    for i in range(len(offsets) - 1):
        out[offsets[i] : offsets[i + 1]] = model.decode(words[word_offsets[i] : word_offsets[i + 1]], int(offsets[i + 1] - offsets[i]))
    return out


@dataclass(frozen=True)
class TopkAnsCodec:
    """Top-k codec v2: v1's quantisation, ids ANS-coded per row against the shard's table."""

    k: int
    vocab_size: int
    lp_step: float = 0.011  # v1's 0.008 gave 4.9e-5 nats/token at k = 20; this 6.7e-5 (bench/codec.py)
    lp_step_max: float = 0.1
    tail_step: float = 0.02
    tail_step_max: float = 0.5

    name: ClassVar[str] = "topk"
    version: ClassVar[int] = 2
    kind: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        self._v1  # validates the parameters

    @cached_property
    def _v1(self) -> TopkCodec:
        """v1 with the same parameters: its grids, its encoder (entries are split afterwards)."""
        return TopkCodec(self.k, self.vocab_size, self.lp_step, self.lp_step_max, self.tail_step, self.tail_step_max)

    def spec(self) -> dict:
        return {**self._v1.spec(), "version": self.version}

    @classmethod
    def from_spec(cls, spec: dict) -> TopkAnsCodec:
        params = spec_params(cls, spec, {"lp_step", "lp_step_max", "tail_step", "tail_step_max"})
        return cls(k=spec["k"], vocab_size=spec["vocab_size"], **params)

    def columns(self) -> dict[str, np.dtype]:
        return {"ids": np.dtype(np.uint32), "levels": np.dtype(np.uint32), "tail": np.dtype(np.uint8)}

    def parquet_encodings(self) -> dict[str, str]:
        # ANS words are incompressible: PLAIN. Tails: byte planes, as in v1.
        return {"ids": "PLAIN", "levels": "PLAIN", "tail": "BYTE_STREAM_SPLIT"}

    def encode_rows(self, ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None, lengths: np.ndarray) -> tuple[Columns, bytes]:
        """(N, k) top-k of S rows of `lengths` positions -> columns + the shard's tables."""
        streams = self._v1.encode(ids, logprobs)
        entries = streams["entries"]  # (N·k,) id | delta << id_bits
        flat_ids = (entries & np.uint32((1 << self._v1._id_bits) - 1)).astype(np.int32)
        tokens = _row_offsets(lengths)
        model = IdModel.fit(flat_ids)
        words, word_offsets = _code_rows(model, flat_ids, tokens * self.k)
        deltas = (entries >> self._v1._id_bits).astype(np.int32).reshape(-1, self.k)  # (N, k)
        ranks = RankModel.fit(deltas) if len(deltas) else RankModel(tuple(np.ones(1, np.uint8) for _ in range(self.k)))
        messages = [ranks.encode(deltas[a:b]) for a, b in zip(tokens[:-1], tokens[1:])]
        level_words = np.concatenate(messages) if messages else np.zeros(0, np.uint32)
        level_offsets = _row_offsets(np.array([len(m) for m in messages], dtype=np.int64))
        columns = {"ids": (words, word_offsets), "levels": (level_words, level_offsets), "tail": (streams["tail"], tokens)}
        return columns, join_tables(model.to_bytes(), ranks.to_bytes())

    def decode_rows(self, columns: Columns, lengths: np.ndarray, side: bytes) -> tuple[np.ndarray, np.ndarray, None]:
        n = int(lengths.sum())
        for name in self.columns():
            if name not in columns:
                raise CodecError(f"topk v2 codec: column {name!r} missing.")
        tail = columns["tail"][0]
        if len(tail) != n:
            raise CodecError(f"topk v2 codec: {len(tail)} tails for {n} tokens.")
        tables = split_tables(side)
        if len(tables) != 2:
            raise CodecError(f"topk v2 codec: the shard footer holds {len(tables)} side tables, expected 2 (ids, levels).")
        id_table, rank_table = tables
        tokens = _row_offsets(lengths)
        words, word_offsets = columns["ids"]
        ids = _decode_rows(IdModel.from_bytes(id_table), words, word_offsets, tokens * self.k)
        ranks = RankModel.from_bytes(rank_table)
        if len(ranks.levels) != self.k:
            raise CodecError(f"topk v2 codec: the shard's level tables are for k={len(ranks.levels)}, not {self.k}.")
        deltas = np.empty((n, self.k), np.uint16)
        level_words, level_offsets = columns["levels"]
        for i in range(len(lengths)):
            deltas[tokens[i] : tokens[i + 1]] = ranks.decode(level_words[level_offsets[i] : level_offsets[i + 1]], int(lengths[i]))
        logprobs = self._v1.decode_levels(deltas, tail.astype(np.uint8))
        return ids.reshape(n, self.k), logprobs, None


@dataclass(frozen=True)
class SampledCodec:
    """Sampled codec v1: per position the distinct ids among `k` draws, with counts and logprobs.

    `proposal_temperature` τ is what the draws came from (softmax(logits/τ)); the logprobs stored
    are the proxy's own (τ = 1), so the loss can importance-weight the draws when τ ≠ 1."""

    k: int  # draws per position (N)
    vocab_size: int
    proposal_temperature: float = 1.0
    lp_step: float = 0.008
    lp_step_max: float = 0.1

    name: ClassVar[str] = "sampled"
    version: ClassVar[int] = 1
    kind: ClassVar[str] = "sampled"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or not 1 <= self.k <= MAX_SAMPLES:
            raise CodecError(f"sampled codec: samples={self.k!r} must be an integer in [1, {MAX_SAMPLES}].")
        if not isinstance(self.proposal_temperature, (int, float)) or not 0.05 <= self.proposal_temperature <= 20:
            raise CodecError(f"sampled codec: proposal_temperature={self.proposal_temperature!r} must be in [0.05, 20].")
        self._grid_codec  # validates vocab_size and the steps

    @cached_property
    def _grid_codec(self) -> TopkCodec:
        """Codec v1 with these steps: its −logprob grid (k is irrelevant to it)."""
        return TopkCodec(1, self.vocab_size, self.lp_step, self.lp_step_max)

    def spec(self) -> dict:
        params = {"proposal_temperature": self.proposal_temperature, "lp_step": self.lp_step, "lp_step_max": self.lp_step_max}
        return {"name": self.name, "version": self.version, "k": self.k, "vocab_size": self.vocab_size, "params": params}

    @classmethod
    def from_spec(cls, spec: dict) -> SampledCodec:
        params = spec_params(cls, spec, {"proposal_temperature", "lp_step", "lp_step_max"})
        return cls(k=spec["k"], vocab_size=spec["vocab_size"], **params)

    def columns(self) -> dict[str, np.dtype]:
        return {"n_unique": np.dtype(np.uint8), "ids": np.dtype(np.uint32), "levels": np.dtype(np.uint16), "counts": np.dtype(np.uint8)}

    def parquet_encodings(self) -> dict[str, str]:
        return {"n_unique": "BYTE_STREAM_SPLIT", "ids": "PLAIN", "levels": "BYTE_STREAM_SPLIT", "counts": "BYTE_STREAM_SPLIT"}

    def encode_rows(self, ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None, lengths: np.ndarray) -> tuple[Columns, bytes]:
        """(N, k) ids / proxy logprobs / counts (0 = padding; each row's counts sum to k)."""
        n = len(ids)
        if counts is None or ids.shape != (n, self.k) or logprobs.shape != ids.shape or counts.shape != ids.shape:
            raise CodecError(f"sampled codec: expected ids, logprobs and counts of shape (N, {self.k}).")
        counts = np.asarray(counts)
        if n and (counts.min() < 0 or not (counts.sum(1) == self.k).all()):
            raise CodecError(f"sampled codec: every position's counts must sum to the {self.k} draws.")
        if n and ((ids[counts > 0] < 0).any() or (ids[counts > 0] >= self.vocab_size).any()):
            raise CodecError(f"sampled codec: token ids outside [0, {self.vocab_size}).")
        lp = np.minimum(np.asarray(logprobs, np.float64), 0.0)
        if not np.isfinite(lp[counts > 0]).all():
            raise CodecError("sampled codec: a drawn id has a non-finite logprob.")
        key = np.where(counts > 0, -lp, np.inf)  # valid entries first, by descending logprob
        order = np.argsort(key, axis=1, kind="stable")  # (N, k)
        valid = np.take_along_axis(counts, order, 1) > 0  # (N, k) a prefix of each row
        levels = _nearest(self._grid_codec._lp_grid, np.where(valid, np.take_along_axis(-lp, order, 1), 0.0))  # (N, k)
        deltas = np.diff(levels.astype(np.int32), axis=1, prepend=0)  # ≥ 0 on the valid prefix
        n_unique = valid.sum(1).astype(np.uint8)  # (N,)
        flat_ids = np.take_along_axis(ids, order, 1)[valid].astype(np.int32)  # (E,) row-major
        tokens = _row_offsets(lengths)
        entry_offsets = np.concatenate([[0], np.cumsum(n_unique, dtype=np.int64)])[tokens]  # (S+1,)
        model = IdModel.fit(flat_ids)
        words, word_offsets = _code_rows(model, flat_ids, entry_offsets)
        columns = {
            "n_unique": (n_unique, tokens),
            "ids": (words, word_offsets),
            "levels": (deltas[valid].astype(np.uint16), entry_offsets),
            "counts": (np.take_along_axis(counts, order, 1)[valid].astype(np.uint8), entry_offsets),
        }
        return columns, model.to_bytes()

    def decode_rows(self, columns: Columns, lengths: np.ndarray, side: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> ids (N, k) int32, proxy logprobs (N, k) float32, counts (N, k) uint8, each
        position's distinct entries first (descending logprob), then padding (count 0, lp 0)."""
        for name in self.columns():
            if name not in columns:
                raise CodecError(f"sampled codec: column {name!r} missing.")
        n = int(lengths.sum())
        m = columns["n_unique"][0].astype(np.int64)  # (N,)
        if len(m) != n or (m > self.k).any() or (n and m.min() < 1):
            raise CodecError(f"sampled codec: corrupt n_unique column for {n} positions.")
        e = int(m.sum())
        deltas, counts = columns["levels"][0].astype(np.int64), columns["counts"][0]
        if len(deltas) != e or len(counts) != e:
            raise CodecError(f"sampled codec: {len(deltas)} levels and {len(counts)} counts for {e} entries.")
        starts = np.concatenate([[0], np.cumsum(m)])  # (N+1,) entry offsets per position
        words, word_offsets = columns["ids"]
        flat_ids = _decode_rows(IdModel.from_bytes(side), words, word_offsets, starts[_row_offsets(lengths)])
        cum = np.cumsum(deltas)  # levels: cumulative deltas within each position
        levels = cum - np.repeat(cum[starts[:-1]] - deltas[starts[:-1]], m) if e else cum
        if e and (levels.min() < 0 or levels.max() >= len(self._grid_codec._neg_lp_grid)):
            raise CodecError("sampled codec: corrupt level stream (logprob level out of range).")
        valid = np.arange(self.k) < m[:, None]  # (N, k)
        out_ids, out_lp, out_counts = np.zeros((n, self.k), np.int32), np.zeros((n, self.k), np.float32), np.zeros((n, self.k), np.uint8)
        out_ids[valid], out_lp[valid], out_counts[valid] = flat_ids, self._grid_codec._neg_lp_grid[levels], counts
        return out_ids, out_lp, out_counts


Codec = TopkCodec | TopkAnsCodec | TopkCopyCodec | SampledCodec
_CODECS: dict[tuple[str, int], type] = {(c.name, c.version): c for c in (TopkCodec, TopkAnsCodec, TopkCopyCodec, SampledCodec)}


def codec_from_spec(spec: dict) -> Codec:
    """The codec a manifest names (top-k v1, v2 or v3, sampled v1)."""
    if not isinstance(spec, dict):
        raise CodecError(f"codec spec must be a JSON object, got {type(spec).__name__}.")
    cls = _CODECS.get((spec.get("name"), spec.get("version")))
    if cls is None:
        known = ", ".join(f"{n} v{v}" for n, v in _CODECS)
        raise CodecError(f"codec {spec.get('name')!r} version {spec.get('version')!r} is not supported (this pkd reads {known}); upgrade pkd.")
    return cls.from_spec(spec)
