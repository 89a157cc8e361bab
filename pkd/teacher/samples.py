"""A `pkd teacher-sample` folder: the writer both modes (online, batch) commit through, and the
one reader every later step uses (proxy-align, cache-logits, eval), so that they agree on what a
teacher-sample folder is.

Output folder (local path or fsspec URI):
  shards/part-NNNNN.parquet  kept samples, zstd, schema `sample_schema()`
  ledger/part-NNNNN.jsonl    one line per prompt handled by that commit: ok, filtered or failed
  failures.jsonl             every prompt that failed for good, with its error kind and message
  manifest.json              rewritten after every commit (complete=false), complete=true at the end

A commit writes its shard, its ledger, then the manifest listing both, each atomically, and all n
samples of a prompt go into the same commit: a prompt is done exactly when a listed ledger names
it. Resuming drops temporaries and unlisted files and requests only the prompts no listed ledger
names, so after `kill -9` every (prompt_id, sample_index) is written once and nothing committed is
requested again. Only the shards carry samples; the reader streams them batch by batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pkd.errors import ConfigError, InputError, StorageError
from pkd.fingerprint import sha256_text
from pkd.records import FileEntry, Manifest
from pkd.store import Folder

# Fields that decide what a folder holds; the rest (endpoint URL, concurrency, retries, limit)
# may change between a run and its resumption.
SAMPLING_KEYS = ("model", "system_prompt", "n", "temperature", "top_p", "max_tokens", "seed", "seeds", "top_logprobs", "keep_truncated", "split_ratios")
SHARDS, LEDGER, FAILURES = "shards", "ledger", "failures.jsonl"
SHARDS_PREFIX = SHARDS + "/"
COLUMNS = ["sample_id", "prompt_id", "split", "messages", "response", "reference"]


def sample_schema() -> pa.Schema:
    """One row per kept teacher sample. `usage` is the whole request's (shared by its n rows)."""
    text = pa.string()
    return pa.schema([
        pa.field("sample_id", text, nullable=False),  # "<prompt_id>#<sample_index>"
        pa.field("prompt_id", text, nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),  # choice index in [0, n)
        pa.field("split", text, nullable=False),  # warmup | align | distill (pkd.teacher.splits)
        pa.field("messages", pa.list_(pa.struct([("role", text), ("content", text)])), nullable=False),  # as sent
        pa.field("response", text, nullable=False),
        pa.field("finish_reason", text),
        pa.field("usage", pa.struct([("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32())])),
        pa.field("latency_s", pa.float32(), nullable=False),  # of the successful attempt
        pa.field("teacher", text, nullable=False),  # model name the server reported
        pa.field("reference", text),
        pa.field("logprobs", pa.list_(pa.struct([  # per response token, with --top-logprobs only
            ("token", text), ("logprob", pa.float32()), ("top_tokens", pa.list_(text)), ("top_logprobs", pa.list_(pa.float32())),
        ]))),
    ])  # fmt: skip


@dataclass
class Outcome:
    """What happened to one prompt: its kept rows and its ledger line."""

    rows: list[dict[str, Any]]
    ledger: dict[str, Any]



class Writer:
    """Commits outcomes in batches: shard, ledger, failures file, then the manifest (each atomic)."""

    def __init__(self, folder: Folder, manifest: Manifest, failures: list[dict[str, Any]], shard_size: int, interval_s: float = 60.0, retrying: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder, self.manifest, self.failures, self.shard_size, self.interval_s = folder, manifest, failures, shard_size, interval_s
        self.retrying = retrying or {}  # prompt id -> its failed ledger line, for prompts asked again
        self.pending: list[Outcome] = []
        self.pending_rows = 0
        self.session: Counter[str] = Counter()  # this invocation, committed or pending
        self.next_index = 1 + max((int(f.path.rsplit("-", 1)[1].split(".")[0]) for f in manifest.files if f.path.startswith(LEDGER + "/")), default=-1)
        self._last_commit = time.monotonic()
        self._write_lock = threading.Lock()  # commits run in a worker thread and at exit
        self._async_lock: asyncio.Lock | None = None

    def add(self, outcome: Outcome) -> None:
        self.pending.append(outcome)
        self.pending_rows += len(outcome.rows)
        self.session.update(_tally(outcome.ledger))

    def _due(self) -> bool:
        full = max(len(self.pending), self.pending_rows) >= self.shard_size
        return bool(self.pending) and (full or time.monotonic() - self._last_commit >= self.interval_s)

    async def commit_if_due(self) -> None:
        """Commit in a thread so requests keep flowing; one commit at a time, in order."""
        self._async_lock = self._async_lock or asyncio.Lock()
        if not self._due():
            return
        async with self._async_lock:
            if self._due():
                batch = self._take()
                await asyncio.to_thread(self.commit, batch, False)

    def _take(self) -> list[Outcome]:
        batch, self.pending, self.pending_rows = self.pending, [], 0
        return batch

    def flush(self, complete: bool) -> None:
        self.commit(self._take(), complete)

    def commit(self, batch: list[Outcome], complete: bool) -> None:
        """Write the batch's files, then a manifest listing them; the in-memory state changes only
        once the manifest is written, so a failed commit leaves nothing listed half-done."""
        import pyarrow.parquet as pq

        with self._write_lock:
            m = self.manifest
            if not batch and m.complete == complete:
                return
            files, counts, failures = list(m.files), Counter(m.counts), self.failures
            if batch:
                part = f"part-{self.next_index:05d}"
                rows = [r for o in batch for r in o.rows]
                if rows:
                    sink = pa.BufferOutputStream()
                    pq.write_table(pa.Table.from_pylist(rows, schema=sample_schema()), sink, compression="zstd")
                    files.append(self._put(f"{SHARDS}/{part}.parquet", sink.getvalue().to_pybytes(), len(rows)))
                files.append(self._put(f"{LEDGER}/{part}.jsonl", jsonl([o.ledger for o in batch]), len(batch)))
                again = {o.ledger["prompt_id"] for o in batch} & set(self.retrying)
                failed = [o.ledger for o in batch if o.ledger["status"] == "failed"]
                if failed or again:  # a prompt asked again replaces its old failure
                    failures = [f for f in failures if f["prompt_id"] not in again] + failed
                    files = [f for f in files if f.path != FAILURES] + [self._put(FAILURES, jsonl(failures), len(failures))]
                for o in batch:
                    counts.update(_tally(o.ledger))
                for pid in again:
                    counts.subtract(_untally(self.retrying[pid]))
            new = m.model_copy(update={"files": files, "counts": {k: v for k, v in counts.items() if v}, "complete": complete})
            self.folder.write_manifest(new)
            self.manifest, self.failures, self.next_index = new, failures, self.next_index + bool(batch)
            self.retrying = {k: v for k, v in self.retrying.items() if k not in {o.ledger["prompt_id"] for o in batch}}
            self._last_commit = time.monotonic()

    def _put(self, rel: str, data: bytes, rows: int) -> FileEntry:
        try:
            self.folder.write_bytes(rel, data)
        except OSError as e:  # the folder was writable at the start: a full disk, a remount, ...
            raise StorageError(f"cannot write {self.folder.where(rel)} ({type(e).__name__}: {e.strerror or e}); what is committed is kept: free the space and rerun to continue") from None
        return FileEntry(path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rows=rows)


def _tally(ledger: dict[str, Any]) -> Counter[str]:
    """Manifest/summary counters contributed by one prompt's ledger line."""
    c: Counter[str] = Counter(prompts_done=1, samples=ledger["samples"], requests=ledger["attempts"], retries=ledger["attempts"] - 1)
    c["prompt_tokens"] += ledger.get("prompt_tokens") or 0
    c["completion_tokens"] += ledger.get("completion_tokens") or 0
    for reason, k in ledger.get("dropped", {}).items():
        c[f"dropped_{reason}"] += k
    if ledger["status"] == "failed":
        c["failed"] += 1
        c[f"failed_{ledger['error']['kind']}"] += 1
    return +c


def _untally(ledger: dict[str, Any]) -> Counter[str]:
    """What a failed prompt asked again no longer counts for: it is done once, by its new line.
    Its requests and retries stay counted: they were sent (and maybe paid for)."""
    return Counter({"prompts_done": 1, "failed": 1, f"failed_{ledger['error']['kind']}": 1})


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def read_jsonl(folder: Folder, rel: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in folder.read_bytes(rel).decode("utf-8").splitlines() if line]


def open_output(folder: Folder, fingerprint: str, config: dict[str, Any], clean: bool) -> tuple[Manifest, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The folder's manifest (a fresh one if none), the last ledger line of every prompt already
    handled, and the failures so far. With `clean`, temporaries and files no manifest lists are
    deleted (uncommitted work)."""
    ours = lambda p: p.startswith((SHARDS + "/", LEDGER + "/")) or p == FAILURES  # noqa: E731
    folder.check_folder("--out", write=False)
    if not folder.has_manifest():
        foreign = [p for p in folder.listdir() if not ours(p) and ".tmp-" not in p]
        if foreign:
            raise InputError(f"{folder.uri} is not empty ({foreign[0]}, ...) and holds no teacher-sample manifest: choose another --out")
        if clean:
            folder.remove_temporaries()
            for p in folder.listdir():
                folder.remove(p)
        return Manifest(kind="teacher", inputs={"prompts": fingerprint}, config=config), {}, []
    m = folder.read_manifest()
    if m.kind != "teacher":
        raise InputError(f"{folder.uri} holds a {m.kind!r} artifact, not teacher samples: choose another --out")
    if m.inputs.get("prompts") != fingerprint:
        raise ConfigError(f"{folder.uri} holds samples of a different prompt set ({m.inputs.get('prompts')}, now {fingerprint}): choose another --out")
    changed = [f"{k}: {m.config.get(k)!r} there, {config[k]!r} now" for k in SAMPLING_KEYS if m.config.get(k) != config[k]]
    if changed:
        raise ConfigError(f"{folder.uri} holds samples made with other settings ({'; '.join(changed)}): choose another --out, or rerun with the same settings")
    listed = {f.path for f in m.files}
    if clean:
        folder.remove_temporaries()
        for p in folder.listdir():
            if ours(p) and p not in listed:
                folder.remove(p)
    ledger_files = sorted((f.path for f in m.files if f.path.startswith(LEDGER + "/")), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
    last = {line["prompt_id"]: line for rel in ledger_files for line in read_jsonl(folder, rel)}  # later commits win
    failures = read_jsonl(folder, FAILURES) if FAILURES in listed else []
    m.config = config
    return m, last, failures


@dataclass(frozen=True)
class TeacherSample:
    sample_id: str
    prompt_id: str
    split: str  # warmup | align | distill
    messages: list[dict[str, str]]  # the prompt as sent to the teacher
    response: str
    reference: str | None = None  # the prompt's reference answer, for exact-match evaluation


def teacher_fingerprint(manifest: Manifest) -> str:
    """Content fingerprint of a teacher-sample folder: its shards' sha256 (the ledgers only say
    which prompts were handled, not what later steps learn from)."""
    return "teacher-" + sha256_text(*sorted(f.sha256 for f in manifest.files if f.path.startswith(SHARDS_PREFIX)))


def open_teacher_samples(folder: Folder) -> Manifest:
    """The manifest of a complete teacher-sample folder; a clear error for anything else."""
    m = folder.read_manifest()
    if m.kind != "teacher":
        raise InputError(f"{folder.uri} holds a {m.kind!r} artifact, not teacher samples (the output of `pkd teacher-sample`)")
    if not m.complete:
        raise InputError(f"{folder.uri}: teacher sampling has not finished (manifest says complete=false); rerun `pkd teacher-sample` to finish it first")
    return m


def iter_teacher_samples(folder: Folder, manifest: Manifest, split: str | None = None) -> Iterator[TeacherSample]:
    """Samples in file order, shard by shard, optionally of one split only."""
    import pyarrow.parquet as pq

    for f in manifest.files:
        if not f.path.startswith(SHARDS_PREFIX):
            continue
        with folder.open(f.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=COLUMNS):
                for row in batch.to_pylist():
                    if split is None or row["split"] == split:
                        yield TeacherSample(**row)


def count_teacher_samples(folder: Folder, manifest: Manifest, split: str | None = None) -> int:
    """Rows of one split (all rows for None), reading only the `split` column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = [f for f in manifest.files if f.path.startswith(SHARDS_PREFIX)]
    if split is None:
        return sum(f.rows for f in shards)
    total = 0
    for f in shards:
        with folder.open(f.path) as fh:
            total += pc.sum(pc.equal(pq.read_table(fh, columns=["split"])["split"], split)).as_py() or 0
    return total


def read_teacher_samples(folder: Folder) -> tuple[Manifest, list[TeacherSample]]:
    """All samples of a complete teacher-sample folder, in file order."""
    m = open_teacher_samples(folder)
    return m, list(iter_teacher_samples(folder, m))
