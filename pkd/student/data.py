"""The student's data: a streaming, deterministic, resumable view of a logit cache.

Work is split into `num_streams` data streams, a fixed number independent of the machine: in
epoch e the cache's row groups are permuted with (seed, e) and stream s takes every
num_streams-th of them, then shuffles their rows through a buffer seeded with (seed, e, s).
Each stream cycles through epochs forever (the Trainer stops at `max_steps`). Rank r of W reads
the streams s ≡ r (mod W), dataloader workers split a rank's streams further, and a batch takes
its samples round-robin from the streams it owns. So ranks and workers read disjoint row groups,
and with the same `num_streams` a 2-process run sees the same global batches as a 1-process run
with twice the per-device batch.

The order is computed on (row group, row) keys from the manifest alone; rows are decoded only
when about to be yielded. Resuming after `start_batch` batches replays the keys without reading
any data, so a resumed run continues the exact stream of an uninterrupted one. Memory holds at
most the shuffle buffer plus one row group of decoded samples per stream.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pkd.cache.coded import codec_from_spec
from pkd.errors import CompatibilityError, ConfigError, IntegrityError, PkdError
from pkd.fingerprint import tokenizer_fingerprint
from pkd.cache.shards import ROW_GROUP_ROWS, LogitSample, decode_batch, iter_column, open_checked, seq_logprob_stats, shard_side
from pkd.student.losses import IGNORE_INDEX, sample_weights
from pkd.records import LogitCacheManifest
from pkd.store import Folder

OPEN_SHARDS = 4  # Parquet footers kept open per worker


@dataclass(frozen=True)
class RowGroup:
    shard: int  # index into manifest.files
    index: int  # row group within the shard
    rows: int


def row_groups(manifest: LogitCacheManifest) -> list[RowGroup]:
    """Every row group of the cache, from the manifest's row counts (the writer's fixed size)."""
    out = []
    for s, entry in enumerate(manifest.files):
        for i in range(math.ceil(entry.rows / ROW_GROUP_ROWS)):
            out.append(RowGroup(s, i, min(ROW_GROUP_ROWS, entry.rows - i * ROW_GROUP_ROWS)))
    return out


def stream_keys(groups: list[RowGroup], *, seed: int, stream: int, num_streams: int, buffer: int) -> Iterator[tuple[int, int]]:
    """(row group, row) keys of one stream, epoch after epoch, forever (see module doc)."""
    for epoch in itertools.count():
        mine = np.random.default_rng([seed, epoch]).permutation(len(groups))[stream::num_streams]
        rng = np.random.default_rng([seed, epoch, stream, 1])
        pool: list[tuple[int, int]] = []
        for g in mine:
            for row in range(groups[g].rows):
                if len(pool) < buffer:
                    pool.append((int(g), row))
                    continue
                j = int(rng.integers(buffer))
                yield pool[j]
                pool[j] = (int(g), row)
        rng.shuffle(pool)
        yield from pool


def check_student_compatible(manifest: LogitCacheManifest, tokenizer, model_vocab_size: int, where: str) -> None:
    """Refuse a cache made with another tokenizer, or whose ids do not fit the student's logits.

    Vocab sizes may differ only in padding rows (e.g. a family whose models pad the embedding to
    different multiples): the cache's ids must cover the tokenizer and fit the student."""
    problems = []
    if manifest.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        problems.append(f"tokenizer fingerprint {manifest.tokenizer_fingerprint} (cache) vs {tokenizer_fingerprint(tokenizer)} (student)")
    if not len(tokenizer) <= manifest.vocab_size <= model_vocab_size:
        problems.append(f"vocab size {manifest.vocab_size} (cache) vs {model_vocab_size} (student model, tokenizer has {len(tokenizer)} tokens)")
    if problems:
        raise CompatibilityError(f"{where} was made for another student: " + "; ".join(problems) + ". Re-run `pkd cache-logits` with a proxy that shares the student's tokenizer.")


def mean_weight(folder: Folder, manifest: LogitCacheManifest) -> float:
    """w̄ = Σ_b w_b·T_b / Σ_b T_b, the token-weighted mean of w = σ((ℓ − μ)/γ) over the whole
    cache (T_b: sample b's response tokens). The loss averages over tokens, so this is the weight
    that scales the KD term on average: `--uniform-weights` gives every sample w̄ (keeping α·E[w];
    w = 1 would double the KD strength), and `--weight-ce` divides CE's weights by it (keeping
    CE's scale). One read of the ℓ and token-count columns; μ/γ from the manifest, or from the
    same values when the manifest lacks them."""
    values = np.concatenate([*iter_column(folder, manifest, "seq_logprob"), np.zeros(0)])  # (rows,)
    tokens = np.concatenate([*iter_column(folder, manifest, "num_tokens"), np.zeros(0)]).astype(np.float64)  # (rows,)
    if not len(values) or not tokens.sum():
        return 0.5
    stats = manifest.seq_logprob or seq_logprob_stats([values])
    w = sample_weights(torch.from_numpy(values.astype(np.float64)), stats.mu, stats.gamma).numpy()  # (rows,)
    return float((w * tokens).sum() / tokens.sum())


class CacheReader:
    """Decodes row groups, checking each shard when first opened: size, sha256 (streamed, once
    per shard and process: `verified` may be shared between readers), header and counts. So no
    row of a shard that `pkd cache verify` would reject reaches the model."""

    def __init__(self, folder: Folder, manifest: LogitCacheManifest, verified: set[int] | None = None) -> None:
        self.folder, self.manifest = folder, manifest
        self.codec = codec_from_spec(manifest.codec)
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.verified = verified if verified is not None else set()
        self.hash_s = 0.0  # time spent checking shards as they open, sha256 almost all of it (bench/train_student.py reports it)

    def _shard(self, s: int) -> pq.ParquetFile:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        t0 = time.perf_counter()
        pf = open_checked(self.folder, self.manifest.files[s], self.manifest, hashed=s in self.verified)
        self.hash_s += time.perf_counter() - t0
        self.verified.add(s)
        self._open[s] = pf
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return pf

    def read(self, group: RowGroup) -> list[LogitSample]:
        """Decoded samples of one row group; a damaged one raises IntegrityError naming the file."""
        pf = self._shard(group.shard)
        where = f"{self.folder.where(self.manifest.files[group.shard].path)} (row group {group.index})"
        try:
            batch = pf.read_row_group(group.index).combine_chunks().to_batches()[0]
            samples = decode_batch(batch, self.codec, shard_side(pf))
        except (pa.ArrowException, OSError, ValueError, PkdError) as e:
            raise IntegrityError(f"{where}: cannot be decoded ({e}); the shard is corrupted (run `pkd cache verify`)") from None
        for s in samples:
            bad_ids = s.topk_ids.size and (s.topk_ids.min() < 0 or s.topk_ids.max() >= self.manifest.vocab_size)
            bad_lp = not np.isfinite(s.topk_logprobs).all() or not np.isfinite(s.token_logprob).all()
            if bad_ids or bad_lp or not 0 <= s.response_start <= len(s.input_ids):
                raise IntegrityError(f"{where}: sample {s.sample_id} holds out-of-range ids or logprobs; the shard is corrupted")
        return [LogitSample(s.sample_id, s.input_ids.copy(), s.response_start, s.topk_ids.copy(), s.topk_logprobs.copy(), s.token_logprob.copy(), None if s.counts is None else s.counts.copy()) for s in samples]


def collate(samples: list[LogitSample], weights: list[float], max_length: int, pad_id: int = 0, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch; logits position p predicts token p+1, so response row t (which
    predicts input_ids[response_start + t]) sits at position response_start + t − 1."""
    lengths = [min(len(s.input_ids), max_length) for s in samples]
    L = max(max(lengths), 1)
    L = -(-L // pad_multiple) * pad_multiple
    B, k = len(samples), samples[0].topk_ids.shape[1]
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)  # HF convention (unshifted)
    shift_labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)  # (B, L) target of position p
    topk_ids = torch.zeros((B, L, k), dtype=torch.long)
    topk_logprobs = torch.zeros((B, L, k), dtype=torch.float32)
    sampled = samples[0].counts is not None  # a sampled cache: draw counts per entry (0 = padding)
    topk_counts = torch.zeros((B, L, k), dtype=torch.long) if sampled else None
    for b, (s, n) in enumerate(zip(samples, lengths)):
        ids = torch.from_numpy(s.input_ids[:n].astype(np.int64))
        input_ids[b, :n], attention_mask[b, :n] = ids, 1
        first = max(s.response_start, 1)  # a token with no context before it is not predicted
        if first >= n:
            continue
        labels[b, first:n] = ids[first:n]
        shift_labels[b, first - 1 : n - 1] = ids[first:n]
        t0, t1 = first - s.response_start, n - s.response_start  # cache rows kept
        topk_ids[b, first - 1 : n - 1] = torch.from_numpy(s.topk_ids[t0:t1].astype(np.int64))
        topk_logprobs[b, first - 1 : n - 1] = torch.from_numpy(s.topk_logprobs[t0:t1])
        if topk_counts is not None:
            topk_counts[b, first - 1 : n - 1] = torch.from_numpy(s.counts[t0:t1].astype(np.int64))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "shift_labels": shift_labels,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
        "weights": torch.tensor(weights, dtype=torch.float32),  # (B,)
    }
    if topk_counts is not None:
        batch["topk_counts"] = topk_counts  # (B, L, k)
    return batch


class CacheStream(IterableDataset):
    """Endless batches of `batch_size` samples for one rank (see module doc).

    Set `start_batch` (batches this rank already consumed) before iterating to resume."""

    def __init__(
        self,
        folder: Folder,
        manifest: LogitCacheManifest,
        *,
        batch_size: int,
        max_length: int,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        num_streams: int = 1,
        rank: int = 0,
        world_size: int = 1,
        uniform_weights: bool = False,  # every w = the cache's mean weight (see mean_weight)
        pad_id: int = 0,
        pad_multiple: int = 1,
    ) -> None:
        super().__init__()
        self.folder, self.manifest = folder, manifest
        self.groups = row_groups(manifest)
        if num_streams % world_size:
            raise ConfigError(f"data_streams = {num_streams} must be a multiple of the number of processes ({world_size})")
        if len(self.groups) < num_streams:
            raise ConfigError(f"{folder.uri} has {len(self.groups)} row groups of up to {ROW_GROUP_ROWS} rows, fewer than data_streams = {num_streams}: lower data_streams")
        if manifest.seq_logprob is None and not uniform_weights:
            raise IntegrityError(f"{folder.where('manifest.json')}: no seq_logprob μ/γ (an unfinished cache?); finish it or pass --uniform-weights")
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.shuffle_buffer, self.num_streams = shuffle_buffer, num_streams
        self.rank, self.world_size = rank, world_size
        self.uniform_weight = mean_weight(folder, manifest) if uniform_weights else None
        self.pad_id, self.pad_multiple = pad_id, pad_multiple
        self.start_batch = 0
        self.verified: set[int] = set()  # shards whose sha256 this process has checked
        self.readers: list[CacheReader] = []  # for the integrity check's cost (hash_s)

    def _weight(self, s: LogitSample) -> float:
        if self.uniform_weight is not None:
            return self.uniform_weight
        stats = self.manifest.seq_logprob
        return float(sample_weights(torch.tensor(s.seq_logprob, dtype=torch.float64), stats.mu, stats.gamma))

    def _samples(self, stream: int, skip: int) -> Iterator[LogitSample]:
        """One stream's samples after its first `skip`: keys are replayed, not read."""
        keys = stream_keys(self.groups, seed=self.seed, stream=stream, num_streams=self.num_streams, buffer=self.shuffle_buffer)
        done: dict[int, set[int]] = defaultdict(set)  # rows of partly skipped groups
        for g, row in itertools.islice(keys, skip):
            done[g].add(row)
            if len(done[g]) == self.groups[g].rows:
                del done[g]
        reader = CacheReader(self.folder, self.manifest, self.verified)
        self.readers.append(reader)
        decoded: dict[int, dict[int, LogitSample]] = {}
        for g, row in keys:
            if g not in decoded:
                skipped = done.pop(g, set())
                decoded[g] = {r: s for r, s in enumerate(reader.read(self.groups[g])) if r not in skipped}
            sample = decoded[g].pop(row)
            if not decoded[g]:
                del decoded[g]
            yield sample

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # Batch i of this rank is made by role i mod workers, from that role's streams. The
        # DataLoader asks worker 0 first, so after `start_batch` the roles rotate.
        role = (worker + self.start_batch) % workers
        mine = list(range(self.rank, self.num_streams, self.world_size))[role::workers]
        if not mine:
            raise ConfigError(f"{workers} dataloader workers but only {self.num_streams // self.world_size} data streams per process: raise data_streams or lower dataloader_workers")
        skip_batches = max(0, -(-(self.start_batch - role) // workers))  # #{i < start_batch: i ≡ role}
        skip = skip_batches * self.batch_size
        streams = [self._samples(s, skip // len(mine) + (i < skip % len(mine))) for i, s in enumerate(mine)]
        turn = skip % len(mine)
        while True:
            batch = []
            for _ in range(self.batch_size):
                batch.append(next(streams[turn]))
                turn = (turn + 1) % len(mine)
            yield collate(batch, [self._weight(s) for s in batch], self.max_length, self.pad_id, self.pad_multiple)
