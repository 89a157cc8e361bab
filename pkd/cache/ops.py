"""Operations on whole logit caches behind `pkd cache`: inspect, verify, merge, copy (push/pull).

They work on any fsspec location and stream shard by shard; none imports torch.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pkd.cache.coded import Codec, codec_from_spec
from pkd.errors import CompatibilityError, IntegrityError, ManifestError, PkdError, StorageError
from pkd.cache.shards import (
    SHARD_DIR,
    LogitSample,
    check_compatible,
    check_shard_bytes,
    check_shard_header,
    decode_batch,
    iter_column,
    open_checked,
    open_shard,
    seq_logprob_stats,
    shard_name,
    shard_side,
)
from pkd.records import FileEntry, LogitCacheManifest
from pkd.store import Folder

_STATS_RTOL = 1e-6
_LOGPROB_SLACK = 1e-3  # logprobs may exceed 0 by rounding only


def read_cache_manifest(folder: Folder) -> LogitCacheManifest:
    """The folder's logit-cache manifest; another artifact's is named as such, not as a list of
    fields a cache manifest would need."""
    manifest = folder.read_manifest()  # the generic model, which parses a "logits" kind as a cache
    if not isinstance(manifest, LogitCacheManifest):
        raise ManifestError(f"{folder.uri} holds a {manifest.kind!r} artifact, not a logit cache: pass a folder written by `pkd cache-logits`")
    return manifest


# inspect ---------------------------------------------------------------------------------------


@dataclass
class CacheSummary:
    uri: str
    manifest: LogitCacheManifest
    seq_logprob_hist: tuple[np.ndarray, np.ndarray]  # (counts, bin edges)

    @property
    def bytes_per_token(self) -> float:
        return self.manifest.total_bytes / max(self.manifest.tokens, 1)


def summarize(folder: Folder, bins: int = 12) -> CacheSummary:
    manifest = read_cache_manifest(folder)
    values = np.concatenate(list(iter_column(folder, manifest, "seq_logprob")) or [np.zeros(0)])
    hist = np.histogram(values, bins=bins) if len(values) else (np.zeros(0, np.int64), np.zeros(0))
    return CacheSummary(folder.uri, manifest, hist)


# verify ----------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    uri: str
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_sampled(where: str, s: LogitSample, draws: int) -> None:
    """A sampled record: each position's counts sum to the draws, its ids are distinct."""
    if s.counts is None or s.counts.shape != s.topk_ids.shape or (s.counts.sum(axis=1, dtype=np.int64) != draws).any():
        raise IntegrityError(f"{where}: draw counts do not sum to the {draws} draws per position")
    valid = s.counts > 0
    ids = np.where(valid, s.topk_ids, -1 - np.arange(s.topk_ids.shape[1]))  # padding never collides
    if (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
        raise IntegrityError(f"{where}: an id appears twice among one position's draws")
    lp = np.where(valid, s.topk_logprobs, -np.inf)
    if (np.exp(lp.astype(np.float64)).sum(axis=1) > 1 + 1e-2).any():
        raise IntegrityError(f"{where}: the drawn ids' probabilities sum to more than 1")


def _check_decoded(folder: Folder, entry: FileEntry, manifest: LogitCacheManifest, codec: Codec) -> tuple[int, int]:
    """Decode every row of a shard and check it is a valid distribution record."""
    rows = tokens = 0
    pf = open_shard(folder, entry.path)
    side = shard_side(pf)
    for batch in pf.iter_batches():
        for s in decode_batch(batch, codec, side):
            rows += 1
            tokens += s.num_tokens
            where = f"{folder.where(entry.path)}: sample {s.sample_id!r}"
            if s.response_start < 0 or s.num_tokens < 0:
                raise IntegrityError(f"{where}: response_start {s.response_start} outside input_ids (length {len(s.input_ids)})")
            if len(s.token_logprob) != s.num_tokens:
                raise IntegrityError(f"{where}: {len(s.token_logprob)} token logprobs for {s.num_tokens} response tokens")
            if s.topk_ids.size and (s.topk_ids.min() < 0 or s.topk_ids.max() >= manifest.vocab_size):
                raise IntegrityError(f"{where}: top-k id outside the vocabulary (size {manifest.vocab_size})")
            lp = s.topk_logprobs
            if not np.isfinite(lp).all() or (lp > _LOGPROB_SLACK).any():
                raise IntegrityError(f"{where}: top-k logprobs are not finite logprobs ≤ 0")
            if codec.kind == "sampled":
                _check_sampled(where, s, codec.k)
                continue
            if (np.diff(lp, axis=1) > _LOGPROB_SLACK).any():
                raise IntegrityError(f"{where}: top-k logprobs are not in descending rank order")
            if (np.exp(lp.astype(np.float64)).sum(axis=1) > 1 + 1e-2).any():
                raise IntegrityError(f"{where}: top-k probabilities sum to more than 1")
    return rows, tokens


def verify(folder: Folder, *, decode: bool = True) -> VerifyReport:
    """Check a cache against its manifest: presence, size, sha256, schema, counts, decodability,
    and μ/γ. Every problem is collected (one line each, naming the file), not just the first."""
    manifest = read_cache_manifest(folder)
    report = VerifyReport(folder.uri)
    if not manifest.complete:
        report.problems.append(f"{folder.where('manifest.json')}: cache is incomplete (an interrupted writer; rerun it to finish)")
    codec = codec_from_spec(manifest.codec)
    for entry in manifest.files:
        report.files_checked += 1
        where = folder.where(entry.path)
        try:
            if not folder.exists(entry.path):
                raise IntegrityError(f"{where}: missing")
            size = folder.size(entry.path)
            if size != entry.bytes:
                raise IntegrityError(f"{where}: {size} bytes, manifest says {entry.bytes} (truncated, appended to or replaced)")
            digest = folder.sha256(entry.path)
            if digest != entry.sha256:
                raise IntegrityError(f"{where}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}… (corrupted or tampered)")
            pf = open_shard(folder, entry.path)
            check_shard_header(folder, entry.path, pf, manifest)
            if pf.metadata.num_rows != entry.rows:
                raise IntegrityError(f"{where}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
            if decode:
                rows, tokens = _check_decoded(folder, entry, manifest, codec)
                if tokens != entry.tokens:
                    raise IntegrityError(f"{where}: {tokens} tokens, manifest says {entry.tokens}")
        except PkdError as e:
            report.problems.append(str(e))
    listed = {f.path for f in manifest.files}
    report.problems += [f"{folder.where(p)}: not listed in the manifest (stray or uncommitted file)" for p in folder.listdir(SHARD_DIR) if p not in listed]
    try:
        check_counts(folder, manifest, strays=False)
    except IntegrityError as e:
        report.problems.append(str(e))
    if manifest.complete and not report.problems and manifest.seq_logprob is not None:
        stats = seq_logprob_stats(iter_column(folder, manifest, "seq_logprob"))
        if stats.count != manifest.seq_logprob.count or not np.allclose([stats.mu, stats.gamma], [manifest.seq_logprob.mu, manifest.seq_logprob.gamma], rtol=_STATS_RTOL, atol=1e-9):
            report.problems.append(f"{folder.where('manifest.json')}: μ/γ of seq_logprob ({manifest.seq_logprob.mu:.6g}/{manifest.seq_logprob.gamma:.6g}) do not match the shards ({stats.mu:.6g}/{stats.gamma:.6g})")
    return report


# the manifest against its shards (cheap: no full read) ------------------------------------------


def check_counts(folder: Folder, manifest: LogitCacheManifest, *, strays: bool = True) -> None:
    """The manifest's counts must add up to its file list, and (with `strays`) no shard may sit in
    `data/` unlisted: an entry removed from the list would otherwise silently drop its rows."""
    where = folder.where("manifest.json")
    for key, listed in (("rows", manifest.rows), ("tokens", manifest.tokens)):
        if key in manifest.counts and manifest.counts[key] != listed:
            raise IntegrityError(f"{where}: counts say {manifest.counts[key]:,} {key}, its file list holds {listed:,}; the manifest was edited or damaged (run `pkd cache verify`)")
    if manifest.seq_logprob is not None and manifest.seq_logprob.count != manifest.rows:
        raise IntegrityError(f"{where}: μ/γ were computed over {manifest.seq_logprob.count:,} samples, its file list holds {manifest.rows:,}; the manifest was edited or damaged")
    if strays:
        try:
            present = folder.listdir(SHARD_DIR)
        except OSError as e:
            raise IntegrityError(f"{folder.where(SHARD_DIR)}: cannot be listed ({type(e).__name__}: {e})") from None
        listed_paths = {f.path for f in manifest.files}
        if unlisted := [p for p in present if p not in listed_paths]:
            raise IntegrityError(f"{folder.where(unlisted[0])}: a shard the manifest does not list ({len(unlisted)} in all); the manifest was edited or the folder mixes caches (run `pkd cache verify`)")


def check_present(folder: Folder, manifest: LogitCacheManifest) -> None:
    """Every listed shard is there, as a file of the listed size (a stat each, no read)."""
    for entry in manifest.files:
        where = folder.where(entry.path)
        try:
            size = folder.size(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            raise IntegrityError(f"{where}: missing (deleted, or {SHARD_DIR}/ is not a folder); run `pkd cache verify`") from None
        except OSError as e:
            raise IntegrityError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
        if size != entry.bytes:
            raise IntegrityError(f"{where}: {size:,} bytes, the manifest says {entry.bytes:,}; the shard is truncated, appended to or replaced (run `pkd cache verify`)")


def check_stats(folder: Folder, manifest: LogitCacheManifest) -> None:
    """μ/γ in the manifest must be those of the shards' `seq_logprob` column (one column read):
    an edited μ or γ would silently reweight, or zero, every sample."""
    if manifest.seq_logprob is None:
        return
    stats = seq_logprob_stats(iter_column(folder, manifest, "seq_logprob"))
    m = manifest.seq_logprob
    if stats.count != m.count or not np.allclose([stats.mu, stats.gamma], [m.mu, m.gamma], rtol=_STATS_RTOL, atol=1e-9):
        raise IntegrityError(f"{folder.where('manifest.json')}: μ/γ of seq_logprob ({m.mu:.6g}/{m.gamma:.6g} over {m.count:,}) do not match the shards ({stats.mu:.6g}/{stats.gamma:.6g} over {stats.count:,}); the manifest or a shard was edited (run `pkd cache verify`)")


# merge -----------------------------------------------------------------------------------------


def _require_empty(folder: Folder) -> None:
    folder.check_folder("destination", write=True)
    if folder.listdir():
        raise StorageError(f"{folder.uri}: destination is not empty; choose a new folder")


def merge(parts: list[Folder], out: Folder) -> LogitCacheManifest:
    """Join caches built in parts into one; μ/γ recomputed for the whole. The N parts of one
    `pkd cache-logits` run (`--part I/N`) are put back together as that run: each shard in its
    chunk's place, the run's settings and counts, so the result is the cache a single process
    writes (`run_of_parts`). Other caches are concatenated, their settings kept under
    `merged_from`."""
    if not parts:
        raise CompatibilityError("merge needs at least one cache")
    manifests = [read_cache_manifest(p) for p in parts]
    for p, m in zip(parts, manifests):
        if not m.complete:
            raise CompatibilityError(f"{p.uri}: cache is incomplete; finish or rerun it before merging")
    for p, m in zip(parts[1:], manifests[1:]):
        check_compatible(manifests[0], m, parts[0].uri, p.uri)
    seen: dict[str, str] = {}
    for p, m in zip(parts, manifests):
        for ids in iter_column(p, m, "sample_id"):
            for sid in ids:
                if sid in seen:
                    raise CompatibilityError(f"sample {sid!r} is in both {seen[sid]} and {p.uri}; parts must be disjoint")
                seen[sid] = p.uri
    chunks = run_of_parts(manifests)
    _require_empty(out)
    merged = LogitCacheManifest(**manifests[0].model_dump(exclude={"created_at", "pkd_version", "files", "complete", "counts"}))
    if chunks is not None:
        merged.config = {**manifests[0].config, "part": "0/1"}
        counts = sum((Counter({k: v for k, v in m.counts.items() if k not in ("rows", "tokens")}) for m in manifests), Counter[str]())
        placed = sorted(((c, p, e) for p, m, cs in zip(parts, manifests, chunks) for e, c in zip(m.files, cs)), key=lambda t: t[0])
        moves = [(p, e, shard_name(0, c)) for c, p, e in placed]
    else:
        moves = [(p, e, shard_name(i, j)) for i, (p, m) in enumerate(zip(parts, manifests)) for j, e in enumerate(m.files)]
        same_inputs = all(m.inputs == manifests[0].inputs for m in manifests)
        merged.inputs = manifests[0].inputs if same_inputs else {f"part{i}.{k}": v for i, m in enumerate(manifests) for k, v in m.inputs.items()}
        merged.config = {"merged_from": [{"uri": p.uri, "config": m.config} for p, m in zip(parts, manifests)]}
        counts = Counter()
    for p, entry, new in moves:
        _copy_checked(p, entry, out, new)
        merged.files.append(entry.model_copy(update={"path": new}))
    merged.seq_logprob = seq_logprob_stats(iter_column(out, merged, "seq_logprob"))
    merged.counts = {**counts, "rows": merged.rows, "tokens": merged.tokens}
    merged.complete = True
    out.write_manifest(merged)
    return merged


def run_of_parts(manifests: list[LogitCacheManifest]) -> list[list[int]] | None:
    """Each shard's chunk when `manifests` are the N parts of one cache-logits run: part I holds
    chunks c ≡ I (mod N) of the run as data/part-I-c (pkd.steps.cache_logits), which one process
    names data/part-0-c. Per manifest, per file: c. None for caches that are not `--part` runs
    over one set of teacher samples (they are concatenated). Parts over the same samples that are
    not exactly the N parts of one run are refused: a part holds whole shards of its own run's
    layout, so parts of runs with other settings, or some of the parts, would drop or repeat
    samples unsaid."""
    configs = [dict(m.config) for m in manifests]
    index = [str(c.pop("part", "0/1")) for c in configs]
    if any(m.inputs != manifests[0].inputs for m in manifests) or not all(re.fullmatch(r"\d+/[1-9]\d*", p) for p in index):
        return None
    if not any("shard_rows" in c and not p.endswith("/1") for c, p in zip(configs, index)):
        return None
    differ = sorted({k for c in configs for k in c.keys() | configs[0].keys() if c.get(k) != configs[0].get(k)})
    totals = sorted({p.partition("/")[2] for p in index}, key=int)
    if differ or len(totals) > 1:
        why = []
        if differ:
            why.append(f"settings differ: {', '.join(differ)}")
        if len(totals) > 1:
            why.append(f"split {' and '.join(totals)} ways")
        raise CompatibilityError(
            f"these are parts of different cache-logits runs over the same teacher samples ({'; '.join(why)}): a part holds whole shards of "
            "its own run, so only all the parts of one run join; rerun the odd ones with the others' settings"
        )
    n, given = int(totals[0]), [int(p.partition("/")[0]) for p in index]
    missing = sorted(set(range(n)) - set(given))
    if missing:
        raise CompatibilityError(
            f"these are {n - len(missing)} of the {n} parts of one cache-logits run: {', '.join(f'{i}/{n}' for i in missing)} missing; "
            "merge all of them (a cache of some parts would silently lack their samples)"
        )
    if len(given) != n:
        twice = sorted({i for i in given if given.count(i) > 1})
        raise CompatibilityError(f"part(s) {', '.join(f'{i}/{n}' for i in twice)} given more than once")
    chunks = []
    for i, m in zip(given, manifests):
        found = [re.fullmatch(rf"{SHARD_DIR}/part-{i:05d}-(\d+)\.parquet", entry.path) for entry in m.files]
        for entry, f in zip(m.files, found):
            if f is None or int(f[1]) % n != i:
                raise IntegrityError(f"part {i}/{n} lists {entry.path}, not a shard that part writes (data/part-{i:05d}-c.parquet, c ≡ {i} mod {n}); its manifest was edited")
        chunks.append([int(f[1]) for f in found if f is not None])
    return chunks


# push / pull -----------------------------------------------------------------------------------


def _copy_checked(src: Folder, entry: FileEntry, dst: Folder, dst_rel: str) -> None:
    """Copy one shard, counting and hashing the bytes on the way; a size or sha256 that differs
    from the entry's leaves nothing at the destination."""
    h, size = hashlib.sha256(), 0
    with src.open(entry.path) as fin, dst.atomic_open(dst_rel) as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            fout.write(chunk)
        if size != entry.bytes:
            raise IntegrityError(f"{src.where(entry.path)}: {size:,} bytes, the manifest says {entry.bytes:,} (a damaged manifest or shard); nothing copied for it")
        if h.hexdigest() != entry.sha256:
            raise IntegrityError(f"{src.where(entry.path)}: sha256 does not match the manifest (corrupted or tampered); nothing copied for it")


def _check_tokens(folder: Folder, entry: FileEntry, pf: pq.ParquetFile) -> None:
    """The shard's response tokens (its num_tokens column) are the entry's."""
    tokens = sum(int(b.column(0).to_numpy().sum()) for b in pf.iter_batches(columns=["num_tokens"]))
    if tokens != entry.tokens:
        raise IntegrityError(f"{folder.where(entry.path)}: {tokens:,} tokens, the manifest says {entry.tokens:,}; the manifest was edited or damaged")


@dataclass
class CopyReport:
    manifest: LogitCacheManifest
    transferred: int  # shards copied (the others were already there, checked)
    manifest_replaced: bool  # the destination held these shards under a manifest that differed


def copy_cache(src: Folder, dst: Folder) -> CopyReport:
    """Copy a complete cache between locations (push and pull), verified on the way: the source
    manifest's counts must match its file list, manifest paths are checked to stay inside `dst`,
    each file's size and sha256 are checked while it streams, every shard at the destination is
    checked against the manifest (schema, footer metadata, rows, tokens), μ/γ are recomputed
    there, and the manifest comes last. Files already at the destination are hashed: kept if
    right, copied again if not (resumable, and a second pull repairs a damaged copy); a
    destination manifest that differs from the source's is replaced. So a copy reported as
    verified is one `pkd cache verify --no-decode` accepts."""
    manifest = read_cache_manifest(src)
    if not manifest.complete:
        raise IntegrityError(f"{src.uri}: cache is incomplete; only complete caches are shared")
    check_counts(src, manifest, strays=False)
    dst.check_folder("destination", write=True)
    existing = read_cache_manifest(dst) if dst.has_manifest() else None
    if existing is not None and not (existing.complete and existing.files == manifest.files):
        raise StorageError(f"{dst.uri}: holds a different cache already; choose a new destination")
    dst.remove_temporaries()
    transferred = 0
    for entry in manifest.files:
        try:
            check_shard_bytes(dst, entry)
        except IntegrityError:
            _copy_checked(src, entry, dst, entry.path)
            transferred += 1
        _check_tokens(dst, entry, open_checked(dst, entry, manifest, hashed=True))
    check_stats(dst, manifest)
    replaced = existing is not None and existing != manifest
    if transferred or existing != manifest:
        dst.write_manifest(manifest)
    return CopyReport(manifest, transferred, replaced)
