"""Top-k logit codec v1: turns per-position top-k (ids, logprobs) into fixed-width, low-entropy
integer streams; Parquet + zstd does the entropy coding. numpy only.

Layout, per token (k entries in rank order, descending logprob):
- `entries` (uint32 × k): the low b = max(16, ⌈log2 V⌉) bits hold the token id, the high bits
  the increase of the logprob's quantisation level over the previous rank (levels never
  decrease down the ranks, so the deltas are small). Stored with BYTE_STREAM_SPLIT, so zstd sees
  four byte planes: the id's low byte (near uniform), its middle byte (skewed: BPE ids are
  roughly frequency-ordered), then the level deltas (small; for V > 2^16 they share a byte with
  the id's top bits). One Parquet value per entry keeps decoding fast.
- `tail` (uint8 × 1): the quantised mass outside the top-k, 1 − Σ exp(top-k).

Quantisation is where the fidelity budget goes (KL of the top-k + tail distribution). An entry
of probability p whose log-probability is off by ε adds about ½·p·ε² to the KL, so the level
grid for −logprob has steps ∝ 1/√p (uniform in √p: every entry costs the same KL), capped at
`lp_step_max` for rare entries. The top-k is then rescaled so that it sums to 1 − tail: the
tail's own error is then independent of the top-k errors, which matters when the tail is tiny
(a small absolute error on a 0.99 top-1 would otherwise swamp a 1e-3 tail). The tail grid lives
on logit(tail) with steps ∝ 1/√(t(1−t)) (again equal KL per level), capped at `tail_step_max`.
The grids are pure functions of the parameters: the codec has no fitted state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from pkd.errors import CodecError

MAX_K = 1024
MAX_VOCAB = 1 << 22  # ids take the low max(16, ⌈log2 V⌉) bits of an entry, level deltas the rest
_LP_LEVELS = 1024  # −logprob levels: deltas need 10 bits, left free up to MAX_VOCAB
_TAIL_LEVELS = 256  # tail levels: one byte
_TAIL_LOGIT_MIN = -30.0  # tail masses below e^-30 decode as e^-30: they cost < 1e-12 nats
_TAIL_EPS = 1e-12


def _grid(start: float, n: int, step: Callable[[float], float]) -> np.ndarray:
    """`n` increasing points from `start`, each `step(previous)` after the last (float64)."""
    points = np.empty(n)
    points[0] = start
    for i in range(1, n):
        points[i] = points[i - 1] + step(points[i - 1])
    return points


def _nearest(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest grid point for each value (grid increasing), as uint16."""
    mid = (grid[1:] + grid[:-1]) / 2
    return np.searchsorted(mid, values).astype(np.uint16)


@dataclass(frozen=True)
class TopkCodec:
    """Codec v1 for top-k token distributions; stateless given its spec."""

    k: int
    vocab_size: int
    lp_step: float = 0.008  # −logprob step at p = 1 (nats); KL ≈ lp_step²/24 per large entry
    lp_step_max: float = 0.1  # cap on the −logprob step for rare entries (nats); matters at large k
    tail_step: float = 0.02  # logit(tail) step scale; KL ≈ tail_step²/24 per token
    tail_step_max: float = 0.5  # cap on the logit(tail) step for extreme tails

    name: ClassVar[str] = "topk"
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for field, value, low, high in (
            ("k", self.k, 1, MAX_K),
            ("vocab_size", self.vocab_size, 2, MAX_VOCAB),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise CodecError(f"topk codec: {field}={value!r} must be an integer in [{low}, {high}].")
        if self.k > self.vocab_size:
            raise CodecError(f"topk codec: k={self.k} exceeds vocab_size={self.vocab_size}.")
        for field in ("lp_step", "lp_step_max", "tail_step", "tail_step_max"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0 < value <= 4:
                raise CodecError(f"topk codec: {field}={value!r} must be a number in (0, 4].")
        if self.lp_step > self.lp_step_max or self.tail_step > self.tail_step_max:
            raise CodecError("topk codec: a step exceeds its cap (lp_step_max / tail_step_max).")

    # ------------------------------------------------------------------ spec

    def spec(self) -> dict:
        """JSON-able description (manifest, Parquet metadata) from which `from_spec` rebuilds it."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        k, vocab_size = params.pop("k"), params.pop("vocab_size")
        return {"name": self.name, "version": self.version, "k": k, "vocab_size": vocab_size, "params": params}

    @classmethod
    def from_spec(cls, spec: dict) -> TopkCodec:
        if not isinstance(spec, dict):
            raise CodecError(f"codec spec must be a JSON object, got {type(spec).__name__}.")
        if spec.get("name") != cls.name:
            raise CodecError(f"unknown codec name {spec.get('name')!r} (this pkd knows {cls.name!r}).")
        if spec.get("version") != cls.version:
            raise CodecError(
                f"codec {cls.name!r} version {spec.get('version')!r} is not supported "
                f"(this pkd reads version {cls.version}); upgrade pkd or re-encode the cache."
            )
        params = spec.get("params", {})
        known = {f.name for f in dataclasses.fields(cls)} - {"k", "vocab_size"}
        if not isinstance(params, dict) or set(params) - known:
            bad = sorted(set(params) - known) if isinstance(params, dict) else params
            raise CodecError(f"codec {cls.name!r} v{cls.version}: unknown params {bad!r} (known: {sorted(known)}).")
        if "k" not in spec or "vocab_size" not in spec:
            raise CodecError(f"codec {cls.name!r} spec lacks 'k' or 'vocab_size': {spec!r}.")
        return cls(k=spec["k"], vocab_size=spec["vocab_size"], **params)

    def streams(self) -> dict[str, tuple[np.dtype, int]]:
        return {"entries": (np.dtype(np.uint32), self.k), "tail": (np.dtype(np.uint8), 1)}

    def parquet_encodings(self) -> dict[str, str]:
        # Parquet stores every int ≤ 32 bits as 4-byte INT32: split the bytes into planes so
        # that the all-zero planes vanish and each plane gets its own zstd statistics.
        return {"entries": "BYTE_STREAM_SPLIT", "tail": "BYTE_STREAM_SPLIT"}

    # ------------------------------------------------------------------ grids

    @cached_property
    def _id_bits(self) -> int:
        """Bits of an entry holding the id: at least 16, so the delta bits start on byte 2."""
        return max(16, int(self.vocab_size - 1).bit_length())

    @cached_property
    def _lp_grid(self) -> np.ndarray:
        """Levels of −logprob: step lp_step·e^{x/2} (uniform in √p), capped. (256,) float64."""
        return _grid(0.0, _LP_LEVELS, lambda x: min(self.lp_step * np.exp(x / 2), self.lp_step_max))

    @cached_property
    def _neg_lp_grid(self) -> np.ndarray:
        return (-self._lp_grid).astype(np.float32)  # (1024,) decode table

    @cached_property
    def _tail_grid(self) -> np.ndarray:
        """Levels of logit(tail): step tail_step/√(t(1−t)) (equal KL per level), capped."""

        def step(z: float) -> float:
            t = 1.0 / (1.0 + np.exp(-z))
            return min(self.tail_step / np.sqrt(t * (1.0 - t)), self.tail_step_max)

        return _grid(_TAIL_LOGIT_MIN, _TAIL_LEVELS, step)

    @cached_property
    def _tail_log_mass(self) -> np.ndarray:
        """log(1 − tail) per tail level: the log of the mass the decoded top-k must carry."""
        return (-np.logaddexp(0.0, self._tail_grid)).astype(np.float32)  # log σ(−z)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        """(N, k) ids and logprobs in rank order -> flat streams (see the module docstring)."""
        ids, logprobs = np.asarray(ids), np.asarray(logprobs)
        if ids.ndim != 2 or ids.shape[1] != self.k or logprobs.shape != ids.shape:
            raise CodecError(
                f"topk codec: expected ids and logprobs of shape (N, {self.k}), "
                f"got {ids.shape} and {logprobs.shape}."
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise CodecError(f"topk codec: token ids outside [0, {self.vocab_size}).")
        lp = logprobs.astype(np.float64)
        if not np.all(np.isfinite(lp)) and not np.all(lp[~np.isfinite(lp)] == -np.inf):
            raise CodecError("topk codec: logprobs contain NaN or +inf.")
        # Rank order is the contract; ties and float noise that break it are clamped (running
        # max of −logprob) so that the level deltas stay non-negative.
        levels = _nearest(self._lp_grid, np.maximum.accumulate(-np.minimum(lp, 0.0), axis=1))  # (N, k)
        deltas = np.diff(levels.astype(np.int32), axis=1, prepend=0).astype(np.uint32)  # (N, k)
        entries = ids.astype(np.uint32) | (deltas << self._id_bits)  # (N, k)

        tail = np.clip(1.0 - np.exp(lp).sum(axis=1), _TAIL_EPS, 1.0 - _TAIL_EPS)  # (N,)
        tail_levels = _nearest(self._tail_grid, np.log(tail) - np.log1p(-tail)).astype(np.uint8)  # (N,)
        return {"entries": entries.reshape(-1), "tail": tail_levels}

    def decode(self, streams: dict[str, np.ndarray], n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat streams -> ids (N, k) int32 and logprobs (N, k) float32 in rank order."""
        for name, (dtype, width) in self.streams().items():
            if name not in streams:
                raise CodecError(f"topk codec: stream {name!r} missing (have {sorted(streams)}).")
            got = np.asarray(streams[name])
            if got.ndim != 1 or got.shape[0] != n_tokens * width:
                raise CodecError(
                    f"topk codec: stream {name!r} holds {got.shape} values, "
                    f"expected {n_tokens} tokens × {width} = {n_tokens * width}."
                )
        entries = np.asarray(streams["entries"], dtype=np.uint32).reshape(n_tokens, self.k)  # (N, k)
        ids = (entries & np.uint32((1 << self._id_bits) - 1)).view(np.int32)  # (N, k) fresh array
        deltas = (entries >> self._id_bits).astype(np.uint16)  # (N, k)
        return ids, self.decode_levels(deltas, np.asarray(streams["tail"], dtype=np.uint8))

    def decode_levels(self, deltas: np.ndarray, tail_idx: np.ndarray) -> np.ndarray:
        """(N, k) uint16 level deltas (summed in place) + (N,) tail levels -> (N, k) float32
        logprobs rescaled to carry exactly 1 − tail. Shared with the entropy-coded v2."""
        levels = deltas
        for r in range(1, self.k):  # a loop over ranks beats np.cumsum(axis=1) ~3x at k=20
            levels[:, r] += levels[:, r - 1]
        if levels[:, -1].max(initial=0) >= _LP_LEVELS:  # k = 1 too: its one level must index the grid
            raise CodecError("topk codec: corrupt entries stream (logprob level out of range).")
        logprobs = np.take(self._neg_lp_grid, levels)  # (N, k) unnormalised
        mass = np.exp(logprobs) @ np.ones(self.k, dtype=np.float32)  # (N,) row sums via BLAS
        logprobs += (np.take(self._tail_log_mass, tail_idx) - np.log(mass))[:, None]
        return logprobs

    # ------------------------------------------------------------------ shard rows (pkd.cache.shards)

    kind: ClassVar[str] = "topk"

    def columns(self) -> dict[str, np.dtype]:
        return {name: dtype for name, (dtype, _w) in self.streams().items()}

    def encode_rows(self, ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None, lengths: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bytes]:
        """(N, k) arrays of S rows of `lengths` tokens -> {column: (flat values, (S+1,) row
        offsets)} and the shard's side data (none for v1)."""
        tokens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (S+1,)
        streams = self.encode(ids, logprobs)
        return {name: (streams[name], tokens * width) for name, (_d, width) in self.streams().items()}, b""

    def decode_rows(self, columns: dict[str, tuple[np.ndarray, np.ndarray]], lengths: np.ndarray, side: bytes) -> tuple[np.ndarray, np.ndarray, None]:
        ids, logprobs = self.decode({name: values for name, (values, _o) in columns.items()}, int(lengths.sum()))
        return ids, logprobs, None


def spec_params(cls: type, spec: dict, allowed: set[str]) -> dict:
    if not isinstance(spec, dict):
        raise CodecError(f"codec spec must be a JSON object, got {type(spec).__name__}.")
    params = spec.get("params", {})
    if not isinstance(params, dict) or set(params) - allowed:
        bad = sorted(set(params) - allowed) if isinstance(params, dict) else params
        raise CodecError(f"codec {cls.name!r} v{cls.version}: unknown params {bad!r} (known: {sorted(allowed)}).")
    if "k" not in spec or "vocab_size" not in spec:
        raise CodecError(f"codec {cls.name!r} spec lacks 'k' or 'vocab_size': {spec!r}.")
    return params


def topk_tail_kl(ref_logprobs: np.ndarray, dec_logprobs: np.ndarray) -> np.ndarray:
    """KL(ref ‖ dec) per token, (N, k) x (N, k) -> (N,), over the k entries plus a tail bucket.

    Each side's tail is 1 − Σ exp(top-k), clipped at 1e-12; each side is then normalised to sum
    to 1 (a decoded top-k summing past 1 must not make the KL look smaller). Both inputs must
    describe the same ids in the same order: callers check ids before calling this.
    """
    ref = np.asarray(ref_logprobs, dtype=np.float64)
    dec = np.asarray(dec_logprobs, dtype=np.float64)
    if ref.shape != dec.shape or ref.ndim != 2:
        raise ValueError(f"topk_tail_kl: shapes {ref.shape} and {dec.shape} must be equal (N, k).")

    def full(lp: np.ndarray) -> np.ndarray:
        p = np.exp(lp)  # (N, k)
        tail = np.maximum(1.0 - p.sum(axis=1, keepdims=True), _TAIL_EPS)  # (N, 1)
        dist = np.concatenate([p, tail], axis=1)  # (N, k + 1)
        return dist / dist.sum(axis=1, keepdims=True)

    p, q = full(ref), full(dec)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(axis=1)
