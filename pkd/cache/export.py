"""`pkd cache export CACHE OUT --format plain|axolotl`: a cache as plain Parquet that other tools
read with `datasets` alone, no pkd decoder.

The cache's distributions are entropy-coded words only pkd decodes (pkd.cache.coded). An export
decodes them once, shard by shard (one output shard per cache shard, never the whole cache in
memory), into ordinary list columns:

- plain: one row per sample as pkd reads it: `input_ids`, `response_start`, and per response
  position t (the distribution of token `input_ids[response_start + t]`) `topk_ids` (T, k),
  `topk_logprobs` (T, k), `token_logprob` (T,); ℓ as `seq_logprob` and the sample weight
  w = σ((ℓ − μ)/γ) as `weight`. A sampled (RS-KD) cache adds `counts` (T, k): draws per id.
- axolotl: the columns axolotl's KD plugin trains on (its `ChatTemplateStrategyWithKD` output,
  read by its KD collator and trainer): `input_ids`, `attention_mask`, `labels` (-100 on the
  prompt), and per position of `input_ids` (L, k) `target_token_ids`, `target_logprobs`,
  `target_mask`; row p holds the distribution of token p (axolotl shifts by one in its loss),
  prompt rows are masked (ids 0..k-1, logprobs -inf, mask 0) as axolotl pads them.

Each shard is written whole under a temporary name and renamed, so a killed export resumes at
the first shard not yet written; `export.json` records what the folder is an export of.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pkd.cache.coded import codec_from_spec
from pkd.cache.ops import read_cache_manifest
from pkd.cache.shards import check_shard_header, decode_batch, open_shard, shard_side
from pkd.errors import ConfigError
from pkd.records import LogitCacheManifest
from pkd.store import Folder

Format = Literal["plain", "axolotl"]
FORMATS = ("plain", "axolotl")
RECORD = "export.json"
CARD = "README.md"


@dataclass
class ExportSummary:
    out: str
    rows: int
    shards: int
    written: int  # shards written by this run (the others were already there)
    cache_bytes: int
    export_bytes: int


def _lists(flat: np.ndarray, lengths: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """Rows of variable length over one flat array."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def _matrix_rows(values: np.ndarray, lengths: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """(sum T, k) values as one list<list<dtype>> per row (T_i lists of k)."""
    k = values.shape[1] if values.ndim == 2 else 0
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), k)
    inner = inner.cast(pa.list_(dtype))  # variable-size lists: what `datasets` reads as Sequence
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _weights(seq_logprob: np.ndarray, manifest: LogitCacheManifest) -> np.ndarray | None:
    stats = manifest.seq_logprob
    if stats is None:
        return None
    return (1.0 / (1.0 + np.exp(-(seq_logprob.astype(np.float64) - stats.mu) / max(stats.gamma, 1e-12)))).astype(np.float32)


def _plain_table(samples: list, manifest: LogitCacheManifest) -> pa.Table:
    lengths = np.array([s.num_tokens for s in samples], dtype=np.int64)
    k = int(manifest.codec["k"])
    ids = np.concatenate([s.topk_ids for s in samples]) if samples else np.zeros((0, k), np.int32)
    lps = np.concatenate([s.topk_logprobs for s in samples]) if samples else np.zeros((0, k), np.float32)
    seq = np.array([s.seq_logprob for s in samples], dtype=np.float32)
    columns = {
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "input_ids": _lists(np.concatenate([s.input_ids for s in samples]).astype(np.int32), np.array([len(s.input_ids) for s in samples]), pa.int32()),
        "response_start": pa.array([s.response_start for s in samples], pa.int32()),
        "topk_ids": _matrix_rows(ids.astype(np.int32), lengths, pa.int32()),
        "topk_logprobs": _matrix_rows(lps.astype(np.float32), lengths, pa.float32()),
        "token_logprob": _lists(np.concatenate([s.token_logprob for s in samples]).astype(np.float32), lengths, pa.float32()),
        "seq_logprob": pa.array(seq, pa.float32()),
    }
    if (w := _weights(seq, manifest)) is not None:
        columns["weight"] = pa.array(w, pa.float32())
    if samples and samples[0].counts is not None:
        columns["counts"] = _matrix_rows(np.concatenate([s.counts for s in samples]).astype(np.uint8), lengths, pa.uint8())
    return pa.table(columns)


def _axolotl_table(samples: list, manifest: LogitCacheManifest) -> pa.Table:
    k = int(manifest.codec["k"])
    ids, lps, masks, labels = [], [], [], []
    for s in samples:
        pad = s.response_start  # prompt positions: axolotl's own padding (ids 0..k-1, -inf, mask 0)
        ids.append(np.concatenate([np.tile(np.arange(k, dtype=np.int32), (pad, 1)), s.topk_ids.astype(np.int32)]))  # (L, k)
        lps.append(np.concatenate([np.full((pad, k), -np.inf, np.float32), s.topk_logprobs.astype(np.float32)]))  # (L, k)
        masks.append(np.concatenate([np.zeros((pad, k), np.int8), np.ones((s.num_tokens, k), np.int8)]))  # (L, k)
        labels.append(np.where(np.arange(len(s.input_ids)) < pad, -100, s.input_ids).astype(np.int32))  # (L,)
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    flat_ids = np.concatenate([s.input_ids for s in samples]).astype(np.int32)
    return pa.table({
        "input_ids": _lists(flat_ids, lengths, pa.int32()),
        "attention_mask": _lists(np.ones(len(flat_ids), np.int8), lengths, pa.int8()),
        "labels": _lists(np.concatenate(labels), lengths, pa.int32()),
        "target_token_ids": _matrix_rows(np.concatenate(ids), lengths, pa.int32()),
        "target_logprobs": _matrix_rows(np.concatenate(lps), lengths, pa.float32()),
        "target_mask": _matrix_rows(np.concatenate(masks), lengths, pa.int8()),
    })  # fmt: skip


def _record(cache: Folder, manifest: LogitCacheManifest, fmt: Format) -> dict:
    return {"format": fmt, "cache": cache.uri, "cache_files": {f.path: f.sha256 for f in manifest.files}, "rows": manifest.rows}


def _check_out(out: Folder, record: dict) -> None:
    """An empty folder, or an earlier export of the same cache in the same format (resumed)."""
    present = [p for p in out.listdir() if not posixpath.basename(p).startswith(".")]
    if not present:
        return
    if RECORD not in present:
        raise ConfigError(f"{out.uri} is not empty ({present[0]}, ...) and holds no pkd export: choose another OUT")
    before = json.loads(out.read_bytes(RECORD))
    if before != record:
        what = "format" if before.get("format") != record["format"] else "cache"
        raise ConfigError(f"{out.uri} holds an export of another {what} ({before.get('format')} of {before.get('cache')}): choose another OUT")


def export_cache(cache: Folder, out: Folder, fmt: Format, *, on_shard: Callable[[int, int], None] | None = None, batch_rows: int = 256) -> ExportSummary:
    """Write `cache` into `out` in format `fmt`, shard by shard; `on_shard(done, rows)` after each.
    Skips the shards an interrupted run already wrote."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose plain or axolotl")
    manifest = read_cache_manifest(cache)
    if not manifest.complete:
        raise ConfigError(f"{cache.uri}: the cache is incomplete (an interrupted cache-logits); finish it before exporting")
    sampled = manifest.codec.get("name", "").startswith("sampled")
    if fmt == "axolotl" and sampled:
        raise ConfigError(f"{cache.uri} holds sampled draws (RS-KD), not top-k logprobs: axolotl's KD plugin reads top-k; export --format plain instead")
    record = _record(cache, manifest, fmt)
    _check_out(out, record)
    out.remove_temporaries()
    out.write_bytes(RECORD, (json.dumps(record, indent=2) + "\n").encode())
    codec = codec_from_spec(manifest.codec)
    make = _plain_table if fmt == "plain" else _axolotl_table
    written = 0
    for entry in manifest.files:
        rel = f"data/{posixpath.basename(entry.path)}"
        if not out.exists(rel):
            pf = open_shard(cache, entry.path)
            check_shard_header(cache, entry.path, pf, manifest)
            side = shard_side(pf)
            with out.atomic_open(rel) as f:
                writer = None
                for batch in pf.iter_batches(batch_size=batch_rows):
                    table = make(decode_batch(batch, codec, side), manifest)
                    writer = writer or pq.ParquetWriter(f, table.schema, compression="zstd")
                    writer.write_table(table)
                if writer is not None:
                    writer.close()
            written += 1
        if on_shard:
            on_shard(1, entry.rows)
    out.write_bytes(CARD, card(manifest, fmt, cache.uri).encode())
    export_bytes = sum(out.size(f"data/{posixpath.basename(e.path)}") for e in manifest.files)
    return ExportSummary(out.uri, manifest.rows, len(manifest.files), written, manifest.total_bytes, export_bytes)


def card(manifest: LogitCacheManifest, fmt: Format, source: str) -> str:
    """The export's dataset card: what the columns mean, where it came from, how to load it."""
    k = manifest.codec.get("k")
    stats = manifest.seq_logprob
    weight = f"w = σ((ℓ − μ)/γ) with μ = {stats.mu:.4f}, γ = {stats.gamma:.4f}" if stats else "no μ/γ recorded"
    if fmt == "plain":
        columns = f"""| column | shape | meaning |
| --- | --- | --- |
| `sample_id` | | the teacher sample's id (`prompt_id#index`) |
| `input_ids` | (L,) | prompt + teacher response, chat template applied, student tokenizer |
| `response_start` | | index in `input_ids` of the first response token |
| `topk_ids` | (T, {k}) | per response position t: the proxy's top-{k} ids for token `input_ids[response_start + t]`, rank order |
| `topk_logprobs` | (T, {k}) | their log-probabilities (full-vocabulary softmax, descending) |
| `token_logprob` | (T,) | the proxy's log-probability of the teacher's token |
| `seq_logprob` | | ℓ: mean of `token_logprob` |
| `weight` | | Proxy-KD sample weight, {weight} |
"""
    else:
        columns = f"""Rows as axolotl's KD plugin trains on them (its KD chat-template strategy's output):

| column | shape | meaning |
| --- | --- | --- |
| `input_ids`, `attention_mask` | (L,) | prompt + teacher response, chat template applied |
| `labels` | (L,) | `input_ids`, -100 on the prompt |
| `target_token_ids` | (L, {k}) | row p: the proxy's top-{k} ids for token p (axolotl shifts by one in its loss) |
| `target_logprobs` | (L, {k}) | their log-probabilities (prompt rows: -inf) |
| `target_mask` | (L, {k}) | 1 on response positions, 0 on the prompt |
"""
    return f"""---
configs:
- config_name: default
  data_files: data/*.parquet
tags:
- knowledge-distillation
- pkd
---
# Proxy-KD logit cache, exported ({fmt})

{manifest.rows:,} samples, {manifest.tokens:,} response tokens; top-{k} of vocabulary {manifest.vocab_size:,}.
Decoded from the pkd cache `{source}` (codec {manifest.codec.get("name")} v{manifest.codec.get("version")}: values are the codec's, i.e. the
proxy's log-probabilities to within its quantisation) so that any tool reads it: `datasets.load_dataset("parquet", data_files="data/*.parquet")`.

{columns}
## Lineage

- teacher: {manifest.teacher_model or "-"}
- proxy fingerprint: `{manifest.proxy_fingerprint}`
- tokenizer fingerprint: `{manifest.tokenizer_fingerprint}`
- pkd {manifest.pkd_version}, cache format v{manifest.format_version}; cache size {manifest.total_bytes:,} bytes ({manifest.total_bytes / max(manifest.tokens, 1):.1f} per token)
"""
