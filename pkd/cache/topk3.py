"""Top-k logit codec v3: codec v2's entropy coding (constriction ANS against the shard's own
tables) with two changes that remove information v2 stored twice, and one ANS message per row.

- Ids copy the previous position. A proxy's top-k at neighbouring positions share ids (on
  bench/codec.py's data 14% of the top-20 ids sit in the previous position's top-20), so the
  id alphabet gains k symbols "the id of entry j of the previous position" beside the shard's
  literal ids (`CopyIdModel`, which also escapes ids seen once). Copies can chain; the decoder
  resolves the chains by pointer doubling over the whole batch (`_resolve`), in numpy.
- Levels are anchored. The decoder rescales the top-k to carry exactly 1 − tail, so adding a
  constant to every logprob of a position changes nothing: only the gaps below the top-1 and
  the tail carry information. v2 still coded the top-1's absolute level (~7 bits a token); v3
  shifts the position so that its top-1 lands on a coarse anchor (a multiple of
  `anchor_step` nats, ~2 bits) and codes the others' levels on v1's grid from there. The
  grid's steps still follow the entries' rough probability (the anchor is within
  `anchor_step`/2 of the top-1's −logprob), and the top-1 itself is now exact.
- One ANS message per row holds, in decoding order: the ids (n·k symbols), the escaped raw
  ids, then per-column tables for the anchor, the k − 1 level deltas and the tail level.

Steps: `lp_step` as in v1, `tail_step` a little finer, `lp_step_max` larger than v1's at small k
(`default_lp_step_max`); chosen on `bench/codec.py`'s data for the least bytes at k = 20 with
mean KL < 1e-4 at every k it measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
from constriction import stream

from pkd.cache.codec import TopkCodec, _nearest, spec_params
from pkd.cache.entropy import CopyIdModel, RankModel, join_tables, split_tables
from pkd.errors import CodecError

Columns = dict[str, tuple[np.ndarray, np.ndarray]]  # column -> (flat values, (S+1,) row offsets)


def _row_offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (S+1,)


def find_copies(ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(N, k) ids -> (N, k) int32: j where ids[t, r] == ids[t − 1, j] (the first such j), else
    −1; positions in `starts` (each row's first) copy nothing. One sort for the whole shard."""
    n, k = ids.shape
    out = np.full((n, k), -1, np.int32)
    if n < 2:
        return out
    vocab = int(ids.max()) + 1
    keys = (np.arange(n - 1, dtype=np.int64)[:, None] * vocab + ids[:-1]).reshape(-1)  # (t, id) of t < N−1
    order = np.argsort(keys, kind="stable")  # stable: the first j of a repeated id wins
    queries = (np.arange(n - 1, dtype=np.int64)[:, None] * vocab + ids[1:]).reshape(-1)  # (t−1, id of t)
    at = np.minimum(np.searchsorted(keys[order], queries), len(keys) - 1)
    hit = keys[order][at] == queries
    out[1:] = np.where(hit, order[at] % k, -1).reshape(n - 1, k)
    out[starts[starts < n]] = -1
    return out


def _resolve(copies: np.ndarray, literal: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(N, k) copy indices (−1: literal) and (N, k) literal ids -> (N, k) ids. Each copy
    points at an entry of the previous position; pointer doubling follows chains of copies
    in ⌈log2(longest chain)⌉ passes over the copies alone."""
    n, k = copies.shape
    if (copies[starts[starts < n]] >= 0).any():
        raise CodecError("topk v3 codec: corrupt id stream (a row's first position copies).")
    flat = copies.reshape(-1)
    at = np.flatnonzero(flat >= 0)  # (C,) the copies
    src = np.arange(n * k, dtype=np.int64)
    src[at] = at - at % k - k + flat[at]  # entry j of the previous position
    while True:
        nxt = src[src[at]]
        if np.array_equal(nxt, src[at]):
            return literal.reshape(-1)[src].reshape(n, k)
        src[at] = nxt


def default_lp_step_max(k: int) -> float:
    """The cap on the −logprob step for rare entries: 0.5 nats up to k = 20, 0.5·(20/k)³ above,
    v1's 0.1 from k = 35 on. Why it depends on k: a capped entry of probability p costs
    p·cap²/24 nats, and the larger k, the more mass sits in capped entries. On bench/codec.py's
    data the cap 0.5 takes 0.25 B/token off k = 20 within 1e-4 nats, but gives 2.2e-4 at k = 64;
    the curve keeps k = 24 and k = 32 under 1e-4 there too (measured: cap 0.18 at k = 32 would not)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CodecError(f"topk v3 codec: k={k!r} must be a positive integer.")
    return float(np.clip(0.5 * (20 / k) ** 3, 0.1, 0.5))


@dataclass(frozen=True)
class TopkCopyCodec:
    """Top-k codec v3: ids with copies from the previous position, anchored levels, one ANS
    message per row (see the module docstring)."""

    k: int
    vocab_size: int
    lp_step: float = 0.011
    lp_step_max: float | None = None  # None: `default_lp_step_max(k)`
    tail_step: float = 0.015  # v1/v2: 0.02
    tail_step_max: float = 0.5
    anchor_step: float = 1.0  # nats between anchors: ~2 bits a token for the top-1's level

    name: ClassVar[str] = "topk"
    version: ClassVar[int] = 3
    kind: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        if self.lp_step_max is None:  # resolved here, so the spec records the value used
            object.__setattr__(self, "lp_step_max", default_lp_step_max(self.k))
        self._v1  # validates the shared parameters
        if not isinstance(self.anchor_step, (int, float)) or not 0 < self.anchor_step <= 8:
            raise CodecError(f"topk v3 codec: anchor_step={self.anchor_step!r} must be a number in (0, 8].")

    @cached_property
    def _v1(self) -> TopkCodec:
        """v1 with the same steps: its grids, its tail quantisation and its level decoding."""
        return TopkCodec(self.k, self.vocab_size, self.lp_step, self.lp_step_max, self.tail_step, self.tail_step_max)

    def spec(self) -> dict:
        spec = self._v1.spec()
        return {**spec, "version": self.version, "params": {**spec["params"], "anchor_step": self.anchor_step}}

    @classmethod
    def from_spec(cls, spec: dict) -> TopkCopyCodec:
        params = spec_params(cls, spec, {"lp_step", "lp_step_max", "tail_step", "tail_step_max", "anchor_step"})
        return cls(k=spec["k"], vocab_size=spec["vocab_size"], **params)

    def columns(self) -> dict[str, np.dtype]:
        return {"ans": np.dtype(np.uint32)}

    def parquet_encodings(self) -> dict[str, str]:
        return {"ans": "PLAIN"}  # ANS words are incompressible

    def _anchor_levels(self, anchors: np.ndarray) -> np.ndarray:
        """Anchor indices -> the grid level each stands for, (N,) int64."""
        return _nearest(self._v1._lp_grid, anchors * self.anchor_step).astype(np.int64)

    def encode_rows(self, ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None, lengths: np.ndarray) -> tuple[Columns, bytes]:
        """(N, k) top-k of S rows of `lengths` positions -> one ANS message per row + the
        shard's tables (ids, then the per-column tables of anchor, level deltas and tail)."""
        tail = self._v1.encode(ids, logprobs)["tail"]  # validates shapes, ids and logprobs
        ids = np.asarray(ids, dtype=np.int32)
        grid = self._v1._lp_grid
        x = np.minimum(np.maximum.accumulate(-np.minimum(np.asarray(logprobs, np.float64), 0.0), axis=1), grid[-1])  # (N, k) −logprob, clamped monotone as in v1
        anchors = np.round(x[:, :1] / self.anchor_step).astype(np.int64)  # (N, 1)
        top = self._anchor_levels(anchors[:, 0])  # (N,)
        levels = _nearest(grid, x + (grid[top] - x[:, 0])[:, None]).astype(np.int64)  # (N, k), top-1 on its anchor
        levels[:, 0] = top
        small = np.concatenate([anchors, np.diff(levels, axis=1), tail[:, None].astype(np.int64)], axis=1)  # (N, k + 1)
        tokens = _row_offsets(lengths)
        copies = find_copies(ids, tokens[:-1])
        literals = ids[copies < 0]
        id_model = CopyIdModel.fit(self.k, copies.reshape(-1), literals)
        symbols, raw = id_model.symbols(copies.reshape(-1), literals)
        raw_offsets = np.concatenate([[0], np.cumsum(symbols == id_model.escape)])[tokens * self.k]
        ranks = RankModel.fit(small) if len(small) else RankModel(tuple(np.ones(1, np.uint8) for _ in range(self.k + 1)))
        model, uniform = id_model.model, stream.model.Uniform(self.vocab_size)
        messages = []
        for i in range(len(lengths)):
            coder = stream.stack.AnsCoder()
            ranks.push(coder, small[tokens[i] : tokens[i + 1]])  # decoded last
            if raw_offsets[i + 1] > raw_offsets[i]:
                coder.encode_reverse(raw[raw_offsets[i] : raw_offsets[i + 1]], uniform)
            if tokens[i + 1] > tokens[i]:
                coder.encode_reverse(symbols[tokens[i] * self.k : tokens[i + 1] * self.k], model)  # decoded first
            messages.append(coder.get_compressed())
        words = np.concatenate(messages) if messages else np.zeros(0, np.uint32)
        side = join_tables(id_model.to_bytes(), ranks.to_bytes())
        return {"ans": (words, _row_offsets(np.array([len(m) for m in messages], dtype=np.int64)))}, side

    def decode_rows(self, columns: Columns, lengths: np.ndarray, side: bytes) -> tuple[np.ndarray, np.ndarray, None]:
        if "ans" not in columns:
            raise CodecError("topk v3 codec: column 'ans' missing.")
        tables = split_tables(side)
        if len(tables) != 2:
            raise CodecError(f"topk v3 codec: the shard footer holds {len(tables)} side tables, expected 2 (ids, levels).")
        id_model, ranks = CopyIdModel.from_bytes(tables[0]), RankModel.from_bytes(tables[1])
        if id_model.copies != self.k or len(ranks.levels) != self.k + 1:
            raise CodecError(f"topk v3 codec: the shard's tables are for another k than {self.k}.")
        n, k = int(lengths.sum()), self.k
        words, offsets = columns["ans"]
        if len(offsets) != len(lengths) + 1:
            raise CodecError(f"topk v3 codec: {len(offsets) - 1} messages for {len(lengths)} rows.")
        symbols, small, raw = np.empty(n * k, np.int32), np.empty((n, k + 1), np.int32), []
        model, uniform, at = id_model.model, stream.model.Uniform(self.vocab_size), 0
        try:
            for i, m in enumerate(lengths.tolist()):
                coder = stream.stack.AnsCoder(np.ascontiguousarray(words[offsets[i] : offsets[i + 1]], dtype=np.uint32))
                if m:
                    row = symbols[at * k : (at + m) * k] = coder.decode(model, m * k)
                    escaped = int(np.count_nonzero(row == id_model.escape))
                    if escaped:
                        raw.append(coder.decode(uniform, escaped))
                    small[at : at + m] = ranks.pull(coder, m)
                if not coder.is_empty():
                    raise ValueError("words left after decoding")
                at += m
        except (ValueError, RuntimeError, AssertionError) as e:  # what constriction raises on bad words
            raise CodecError(f"topk v3 codec: corrupt ANS stream ({e})") from None
        if (symbols > id_model.escape).any():
            raise CodecError("topk v3 codec: corrupt id stream (symbol outside the table).")
        values = np.zeros(n * k, np.int32)  # literal ids where the symbol is one, copies resolve below
        is_literal = (symbols >= k) & (symbols < id_model.escape)
        values[is_literal] = id_model.ids[symbols[is_literal] - k]
        values[symbols == id_model.escape] = np.concatenate(raw) if raw else np.zeros(0, np.int32)
        copies = np.where(symbols < k, symbols, -1).reshape(n, k)
        ids = _resolve(copies, values.reshape(n, k), _row_offsets(lengths)[:-1])
        deltas = small[:, :k].astype(np.uint16)  # (N, k): the anchor's level, then level deltas
        deltas[:, 0] = self._anchor_levels(small[:, 0].astype(np.int64))
        logprobs = self._v1.decode_levels(deltas, small[:, k].astype(np.uint8))
        return ids, logprobs, None
