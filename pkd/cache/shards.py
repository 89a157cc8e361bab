"""The logit cache, format v2: Parquet shards of the proxy's distributions + a manifest.

One row per (prompt, teacher response) sample. The codec (pkd.cache.coded) turns each sample's
(T, k) top-k — or sampled — ids/logprobs into `list<...>` columns, entropy-coded against the
shard's own frequency tables (kept in the Parquet footer's key-value metadata under
`pkd.tables`); Parquet's zstd does the rest. Format v1 shards (codec topk v1: no tables) still
read. Shards are written whole under a temporary name and renamed into place; the manifest is
rewritten after every shard (complete=False) and finally with μ/γ (complete=True), so an
interrupted writer resumes from its last committed shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pkd.cache.coded import Codec, codec_from_spec
from pkd.errors import CompatibilityError, IntegrityError, ManifestError, StorageError
from pkd.records import FileEntry, LogitCacheManifest, SeqLogprobStats, logit_cache_schema
from pkd.store import Folder

FILE_META_KEY = b"pkd"
TABLES_KEY = b"pkd.tables"  # the codec's frequency tables (footer only: not in the Arrow schema)
SHARD_DIR = "data"
ROW_GROUP_ROWS = 256  # unit of streaming and of work split between ranks


@dataclass
class LogitSample:
    """One scored sample. T = len(input_ids) - response_start response positions."""

    sample_id: str
    input_ids: np.ndarray  # (L,) int32: prompt + response, chat template applied
    response_start: int
    topk_ids: np.ndarray  # (T, k) int32, rank order
    topk_logprobs: np.ndarray  # (T, k) float32, descending
    token_logprob: np.ndarray  # (T,) float32: logprob of input_ids[response_start + t]
    counts: np.ndarray | None = None  # (T, k) uint8, sampled caches: draws of each id (0 = padding)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) - self.response_start

    @property
    def seq_logprob(self) -> float:
        """ℓ: mean log-likelihood of the response under the proxy (DESIGN §1)."""
        return float(np.mean(self.token_logprob, dtype=np.float64)) if self.num_tokens else 0.0


def part_prefix(part: int) -> str:
    return f"{SHARD_DIR}/part-{part:05d}-"


def shard_name(part: int, index: int) -> str:
    return f"{part_prefix(part)}{index:05d}.parquet"


def file_metadata(manifest: LogitCacheManifest) -> dict[str, object]:
    """What each shard says about itself, so a lone shard is still decodable."""
    return {
        "format_version": manifest.format_version,
        "codec": manifest.codec,
        "vocab_size": manifest.vocab_size,
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
        "proxy_fingerprint": manifest.proxy_fingerprint,
        "teacher_model": manifest.teacher_model,
    }


def check_finite(s: LogitSample) -> None:
    """A NaN or ±inf logprob would poison ℓ, μ/γ and the loss far from its cause: refuse it at
    the write, naming the sample and the position."""
    bad = ~np.isfinite(np.asarray(s.token_logprob, np.float64))
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise IntegrityError(f"sample {s.sample_id!r}: token logprob {float(s.token_logprob[t])} at response position {t} is not a finite number; nothing written for this shard (check the proxy's dtype and weights)")
    top = np.asarray(s.topk_logprobs, np.float64)
    if np.isnan(top).any() or np.isposinf(top).any():
        raise IntegrityError(f"sample {s.sample_id!r}: its top-k logprobs hold NaN or +inf; nothing written for this shard (check the proxy's dtype and weights)")


def check_top_mass(s: LogitSample, vocab_size: int) -> None:
    """The top-1 of a distribution over V ids has logprob ≥ −log V. A top-k row below that is
    not a proxy's top-k (all entries ≤ −104 even decoded to +inf): refuse it at the write."""
    if not s.num_tokens:
        return
    top = np.asarray(s.topk_logprobs, np.float64).max(axis=1)  # (T,)
    low = top < -math.log(vocab_size) - 1e-3
    if low.any():
        t = int(np.flatnonzero(low)[0])
        raise IntegrityError(
            f"sample {s.sample_id!r}: the top-k logprobs at response position {t} are all ≤ {top[t]:.4g}, below −log V = "
            f"{-math.log(vocab_size):.4g}: not the top of a distribution over {vocab_size} ids; nothing written for this shard "
            "(check how the logprobs were computed)"
        )


def encode_table(samples: list[LogitSample], codec: Codec) -> tuple[pa.Table, bytes]:
    """Samples -> Arrow table of the cache schema, and the shard's side data (its codec's tables)."""
    lengths = np.array([s.num_tokens for s in samples], dtype=np.int64)
    for s in samples:
        check_finite(s)
        if codec.kind == "topk":
            check_top_mass(s, codec.vocab_size)
        if s.topk_ids.shape != (s.num_tokens, codec.k) or s.topk_logprobs.shape != (s.num_tokens, codec.k):
            raise ValueError(f"sample {s.sample_id}: distribution arrays must be ({s.num_tokens}, {codec.k})")
        if (s.counts is None) != (codec.kind == "topk"):
            raise ValueError(f"sample {s.sample_id}: a {codec.kind} cache {'takes no' if codec.kind == 'topk' else 'needs'} draw counts")
    ids = np.concatenate([s.topk_ids for s in samples]) if samples else np.zeros((0, codec.k), np.int32)
    lps = np.concatenate([s.topk_logprobs for s in samples]) if samples else np.zeros((0, codec.k), np.float32)
    counts = None if codec.kind == "topk" else np.concatenate([s.counts for s in samples]) if samples else np.zeros((0, codec.k), np.uint8)
    streams, side = codec.encode_rows(ids, lps.astype(np.float32, copy=False), counts, lengths)
    schema = logit_cache_schema(codec.columns())
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "input_ids": pa.array([np.asarray(s.input_ids, np.int32) for s in samples], pa.list_(pa.int32())),
        "response_start": pa.array([s.response_start for s in samples], pa.int32()),
        "num_tokens": pa.array(lengths, pa.int32()),
        "token_logprob": pa.array([np.asarray(s.token_logprob, np.float32) for s in samples], pa.list_(pa.float32())),
        "seq_logprob": pa.array([s.seq_logprob for s in samples], pa.float64()),
    }
    for name, dtype in codec.columns().items():
        values, offsets = streams[name]
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values.astype(dtype, copy=False)))
    return pa.Table.from_pydict(columns, schema=schema), side


def write_shard(folder: Folder, rel: str, samples: list[LogitSample], manifest: LogitCacheManifest, codec: Codec, zstd_level: int = 9) -> FileEntry:
    """Encode and write one shard atomically; returns its manifest entry."""
    table, side = encode_table(samples, codec)
    table = table.replace_schema_metadata({FILE_META_KEY: json.dumps(file_metadata(manifest)).encode()})
    stream_cols = set(codec.columns())
    encodings = {f"{name}.list.element": enc for name, enc in codec.parquet_encodings().items()}
    encodings["token_logprob.list.element"] = "BYTE_STREAM_SPLIT"
    buf = io.BytesIO()
    with pq.ParquetWriter(
        buf,
        table.schema,
        compression="zstd",
        compression_level=zstd_level,
        use_dictionary=[c for c in table.column_names if c not in stream_cols and c != "token_logprob"],
        column_encoding=encodings,
    ) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        if side:  # footer key-value metadata only: the Arrow schema would store it twice
            writer.add_key_value_metadata({TABLES_KEY: side})
    data = buf.getvalue()
    folder.write_bytes(rel, data)
    return FileEntry(path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=len(samples), tokens=int(table["num_tokens"].to_numpy().sum()) if len(samples) else 0)


def open_shard(folder: Folder, rel: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(folder.open(rel))
    except FileNotFoundError:
        raise IntegrityError(f"{folder.where(rel)}: missing (run `pkd cache verify`)") from None
    except (pa.ArrowException, OSError) as e:
        raise IntegrityError(f"{folder.where(rel)}: not a readable Parquet file ({type(e).__name__}: {e}); run `pkd cache verify`") from None


def check_shard_bytes(folder: Folder, entry: FileEntry) -> None:
    """The shard is there with the size and sha256 (streamed) its manifest entry lists: a flipped
    byte otherwise decodes to other numbers, or to a reader's own error, far from its cause."""
    where = folder.where(entry.path)
    try:
        size = folder.size(entry.path)
        digest = folder.sha256(entry.path) if size == entry.bytes else ""
    except (FileNotFoundError, NotADirectoryError, StorageError):
        raise IntegrityError(f"{where}: missing (run `pkd cache verify`)") from None
    except OSError as e:
        raise IntegrityError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
    if size != entry.bytes:
        raise IntegrityError(f"{where}: {size} bytes, the manifest says {entry.bytes}; the shard is truncated or replaced (run `pkd cache verify`)")
    if digest != entry.sha256:
        raise IntegrityError(f"{where}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}…; the shard is corrupted or was replaced (run `pkd cache verify`)")


def open_checked(folder: Folder, entry: FileEntry, manifest: LogitCacheManifest, *, hashed: bool = False) -> pq.ParquetFile:
    """Open a listed shard after checking it against the manifest: bytes and sha256 (unless the
    caller `hashed` it already), schema and footer metadata, rows and row groups."""
    if not hashed:
        check_shard_bytes(folder, entry)
    pf = open_shard(folder, entry.path)
    check_shard_header(folder, entry.path, pf, manifest)
    if pf.metadata.num_rows != entry.rows or pf.metadata.num_row_groups != math.ceil(entry.rows / ROW_GROUP_ROWS):
        raise IntegrityError(f"{folder.where(entry.path)}: {pf.metadata.num_rows} rows in {pf.metadata.num_row_groups} row groups, the manifest says {entry.rows} rows")
    return pf


def shard_side(pf: pq.ParquetFile) -> bytes:
    """The side data the codec wrote beside a shard's rows (b"" for codec v1)."""
    return (pf.metadata.metadata or {}).get(TABLES_KEY, b"")


def check_shard_header(folder: Folder, rel: str, pf: pq.ParquetFile, manifest: LogitCacheManifest) -> None:
    """A shard must carry the schema and metadata its manifest promises."""
    expected = logit_cache_schema(codec_from_spec(manifest.codec).columns())
    actual = pf.schema_arrow
    if not actual.remove_metadata().equals(expected):
        raise IntegrityError(f"{folder.where(rel)}: schema differs from logit-cache format v{manifest.format_version}: got {actual.remove_metadata()}")
    raw = (actual.metadata or {}).get(FILE_META_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:  # UnicodeDecodeError or JSONDecodeError: a damaged footer
        raise IntegrityError(f"{folder.where(rel)}: its footer metadata is not readable JSON (the shard is corrupted; run `pkd cache verify`)") from None
    if meta != file_metadata(manifest):
        raise IntegrityError(f"{folder.where(rel)}: file metadata does not match the manifest (codec, vocab or fingerprints differ)")


def _list_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column's flat values and its (rows+1,) offsets from 0 (the batch may be a slice)."""
    column = batch.column(name)
    offsets = column.offsets.to_numpy().astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def decode_batch(batch: pa.RecordBatch, codec: Codec, side: bytes = b"") -> list[LogitSample]:
    """Decode one record batch into samples (vectorised over the whole batch); `side` is the
    shard's `shard_side`."""
    lengths = batch.column("num_tokens").to_numpy().astype(np.int64)
    ids, lps, counts = codec.decode_rows({name: _list_column(batch, name) for name in codec.columns()}, lengths, side)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    token_lp = batch.column("token_logprob").flatten().to_numpy(zero_copy_only=False)
    input_ids = batch.column("input_ids")
    sample_ids = batch.column("sample_id").to_pylist()
    starts = batch.column("response_start").to_numpy()
    out = []
    for i in range(batch.num_rows):
        a, b = bounds[i], bounds[i + 1]
        out.append(
            LogitSample(
                sample_id=sample_ids[i],
                input_ids=input_ids[i].values.to_numpy(zero_copy_only=False),
                response_start=int(starts[i]),
                topk_ids=ids[a:b],
                topk_logprobs=lps[a:b],
                token_logprob=token_lp[a:b],
                counts=None if counts is None else counts[a:b],
            )
        )
    return out


def iter_samples(folder: Folder, manifest: LogitCacheManifest, batch_rows: int = ROW_GROUP_ROWS) -> Iterator[LogitSample]:
    """Stream every sample of a cache, shard by shard (never the whole cache in memory). Each
    shard is checked against the manifest as it is opened (`open_checked`: size, sha256, header,
    rows), so a damaged one raises IntegrityError naming it instead of yielding other numbers."""
    codec = codec_from_spec(manifest.codec)
    for entry in manifest.files:
        pf = open_checked(folder, entry, manifest)
        side = shard_side(pf)
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                yield from decode_batch(batch, codec, side)
        except (pa.ArrowException, OSError, ValueError) as e:  # only a shard written wrongly gets here: its bytes match
            raise IntegrityError(f"{folder.where(entry.path)}: cannot be decoded ({e}); run `pkd cache verify`") from None


def iter_column(folder: Folder, manifest: LogitCacheManifest, column: str) -> Iterator[np.ndarray]:
    """Stream one scalar column (e.g. seq_logprob) across shards, batch by batch."""
    for entry in manifest.files:
        try:
            for batch in open_shard(folder, entry.path).iter_batches(columns=[column]):
                yield batch.column(0).to_numpy(zero_copy_only=False)
        except (pa.ArrowException, OSError, KeyError) as e:
            raise IntegrityError(f"{folder.where(entry.path)}: column {column!r} cannot be read ({type(e).__name__}: {e}); the shard is corrupted (run `pkd cache verify`)") from None


def seq_logprob_stats(values: Iterable[np.ndarray]) -> SeqLogprobStats:
    """μ, γ of ℓ over the whole set, one streaming pass (Chan et al. parallel merge of moments)."""
    count, mean, m2 = 0, 0.0, 0.0
    for v in values:
        v = np.asarray(v, np.float64)
        if not len(v):
            continue
        n_b, mean_b = len(v), float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        delta = mean_b - mean
        total = count + n_b
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    gamma = math.sqrt(m2 / count) if count else 0.0
    return SeqLogprobStats(mu=mean, gamma=gamma, count=count)


def check_compatible(a: LogitCacheManifest, b: LogitCacheManifest, a_name: str, b_name: str) -> None:
    """Caches can be joined only if a student could train on both as one: say what differs."""
    fields = ("format_version", "codec", "vocab_size", "tokenizer_fingerprint", "proxy_fingerprint", "teacher_model")
    diffs = [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in fields if getattr(a, f) != getattr(b, f)]
    if diffs:
        raise CompatibilityError(f"{a_name} and {b_name} cannot be merged, they differ in " + "; ".join(diffs))


class LogitCacheWriter:
    """Appends scored samples to a cache folder as shards of `shard_rows` rows.

    Resumable: on a folder left by an interrupted run with the same header, it drops
    temporaries and shards the manifest does not list (renamed but never committed), keeps
    the committed ones, and `committed_ids()` tells the caller what not to score again."""

    def __init__(self, folder: Folder, header: LogitCacheManifest, *, shard_rows: int = 1024, part: int = 0, zstd_level: int = 9) -> None:
        self.folder, self.shard_rows, self.part, self.zstd_level = folder, shard_rows, part, zstd_level
        self.codec = codec_from_spec(header.codec)
        self.manifest = header.model_copy(deep=True)
        if folder.has_manifest():
            existing = folder.read_manifest(LogitCacheManifest)
            assert isinstance(existing, LogitCacheManifest)
            same = ("codec", "vocab_size", "tokenizer_fingerprint", "proxy_fingerprint", "teacher_model", "inputs", "config")
            changed = [f for f in same if getattr(existing, f) != getattr(header, f)]
            if changed:
                raise ManifestError(
                    f"{folder.where('manifest.json')}: this folder holds a cache made with different {', '.join(changed)}; "
                    "write to a new folder (or delete this one) instead of mixing them"
                )
            self.manifest = existing
        folder.remove_temporaries()
        listed = {f.path for f in self.manifest.files}
        for rel in folder.listdir(SHARD_DIR):
            if rel not in listed:
                folder.remove(rel)
        self._buffer: list[LogitSample] = []

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def committed_ids(self) -> set[str]:
        ids: set[str] = set()
        for entry in self.manifest.files:
            for batch in open_shard(self.folder, entry.path).iter_batches(columns=["sample_id"]):
                ids.update(batch.column(0).to_pylist())
        return ids

    def add(self, sample: LogitSample) -> None:
        self._buffer.append(sample)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self.write_chunk(sum(f.path.startswith(part_prefix(self.part)) for f in self.manifest.files), self._buffer)
        self._buffer = []

    def write_chunk(self, index: int, samples: list[LogitSample]) -> None:
        """Commit `samples` as shard `index` of this part (`shard_name`): cache-logits names each
        shard after its chunk of the global row order, so parts' shards keep their place."""
        rel = shard_name(self.part, index)
        if any(f.path == rel for f in self.manifest.files):
            raise ManifestError(f"{self.folder.where(rel)} is already committed; a chunk is written once")
        self.manifest.files.append(write_shard(self.folder, rel, samples, self.manifest, self.codec, self.zstd_level))
        self.manifest.complete = False
        self.folder.write_manifest(self.manifest)

    def close(self, counts: dict[str, int] | None = None) -> LogitCacheManifest:
        """Commit the last shard, compute μ/γ over the whole cache, mark it complete; `counts`
        (e.g. the caller's selection tallies) go into the manifest beside rows and tokens."""
        self.flush()
        self.manifest.seq_logprob = seq_logprob_stats(iter_column(self.folder, self.manifest, "seq_logprob"))
        self.manifest.counts = {**(counts or {}), "rows": self.manifest.rows, "tokens": self.manifest.tokens}
        self.manifest.complete = True
        self.folder.write_manifest(self.manifest)
        return self.manifest
